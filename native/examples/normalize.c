/* Normalize a small NCHW batch with fastbn and print each channel's statistics.
 *
 *   python -m fastbn.capi build --outdir fastbn-c
 *   cc native/examples/normalize.c -I"$PWD/fastbn-c" -L"$PWD/fastbn-c" -lfastbn -Wl,-rpath,"$PWD/fastbn-c" -o normalize
 *   ./normalize
 */
#include <stdint.h>
#include <stdio.h>

#include "fastbn.h"

int main(void)
{
    enum { N = 8, C = 3, HW = 16 };
    static float x[N * C * HW], y[N * C * HW];
    float running_mean[C] = {0}, running_var[C] = {1, 1, 1};
    float mean[C], invstd[C];

    uint32_t state = 12345;
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int i = 0; i < HW; i++) {  /* channel c: uniform around 10 * (c + 1) */
                state = state * 1664525u + 1013904223u;
                x[(n * C + c) * HW + i] = 10.0f * (c + 1) + (c + 1) * (state >> 8) / 16777216.0f;
            }

    printf("fastbn %s\n", fastbn_version());
    int rc = fastbn_forward_train_f32(N, C, HW, x, NULL, NULL, 1e-5f, 0.1f,
                                      running_mean, running_var, y, mean, invstd);
    if (rc != FASTBN_OK) {
        fprintf(stderr, "fastbn_forward_train_f32 failed (%d): %s\n", rc, fastbn_last_error());
        return 1;
    }
    for (int c = 0; c < C; c++) {
        double s = 0, s2 = 0;
        for (int n = 0; n < N; n++)
            for (int i = 0; i < HW; i++) {
                double v = y[(n * C + c) * HW + i];
                s += v;
                s2 += v * v;
            }
        double m = s / (N * HW);
        printf("channel %d: batch mean %.4f, var %.4f -> output mean %.1e, var %.4f; "
               "running mean %.4f, var %.4f\n", c, mean[c], 1.0 / ((double)invstd[c] * invstd[c]),
               m, s2 / (N * HW) - m * m, running_mean[c], running_var[c]);
    }
    /* errors come back as codes, with a message for this thread */
    rc = fastbn_forward_train_f32(1, C, 1, x, NULL, NULL, 1e-5f, 0.1f, NULL, NULL, y, NULL, NULL);
    printf("one value per channel: code %d (%s)\n", rc, fastbn_last_error());
    return 0;
}

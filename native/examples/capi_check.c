/* fastbn C ABI test driver, run by tests/test_capi.py (also usable by hand).
 *
 *   capi_check run f32|f64 OUTER C INNER MASK DIR   forward, inference, backward on DIR's files
 *   capi_check errors                               every bad argument: code 1, message, no write
 *   capi_check threads                              4 threads at once give the 1-thread results
 *   capi_check init-failure                         every call returns FASTBN_ERR_INIT
 *   capi_check overhead                             per-call time on a tiny input, first call
 *   capi_check fork                                 children of fork() compute the parent's
 *                                                   results, also while a thread is in a call
 *
 * MASK bits for `run`: 1 weight, 2 bias, 4 running statistics, 8 save_mean/save_invstd,
 * 16 dweight/dbias (a clear bit passes NULL).  Files are raw native-endian arrays:
 * inputs x, dy, w, b, rm, rv, res; outputs y, y_inplace, mean, invstd, rm_out, rv_out,
 * y_infer, y_infer_inplace, dx, dw, db, and through the fused epilogues (residual res,
 * ReLU) y_ex, y_infer_ex, dx_ex, dw_ex, db_ex, dres_ex, then the statistics alone
 * stats_mean, stats_var (double).
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fastbn.h"

static int failures = 0;

#define CHECK(cond, ...)                                             \
    do {                                                             \
        if (!(cond)) {                                               \
            failures++;                                              \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);     \
            fprintf(stderr, __VA_ARGS__);                            \
            fprintf(stderr, "\n");                                   \
        }                                                            \
    } while (0)

static void *read_file(const char *dir, const char *name, size_t bytes)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.bin", dir, name);
    void *p = malloc(bytes ? bytes : 1);
    FILE *f = fopen(path, "rb");
    if (!f || fread(p, 1, bytes, f) != bytes) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(3);
    }
    fclose(f);
    return p;
}

static void write_file(const char *dir, const char *name, const void *p, size_t bytes)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.bin", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, bytes, f) != bytes) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(3);
    }
    fclose(f);
}

/* ------------------------------------------------------------------ run */

#define DEFINE_RUN(REAL, SUFFIX)                                                               \
static int run_##SUFFIX(long long outer, long long C, long long inner, int mask, const char *dir)\
{                                                                                              \
    size_t n = (size_t)(outer * C * inner), bx = n * sizeof(REAL), bc = (size_t)C * sizeof(REAL);\
    REAL *x = read_file(dir, "x", bx), *dy = read_file(dir, "dy", bx);                         \
    REAL *w = read_file(dir, "w", bc), *b = read_file(dir, "b", bc);                           \
    REAL *rm = read_file(dir, "rm", bc), *rv = read_file(dir, "rv", bc);                       \
    REAL *rm_in = malloc(bc + 1), *rv_in = malloc(bc + 1);                                     \
    REAL *y = malloc(bx + 1), *yi = malloc(bx + 1), *mean = malloc(bc + 1);                    \
    REAL *invstd = malloc(bc + 1), *dx = malloc(bx + 1), *dw = malloc(bc + 1);                 \
    REAL *db = malloc(bc + 1);                                                                 \
    memcpy(rm_in, rm, bc);                                                                     \
    memcpy(rv_in, rv, bc);                                                                     \
    const REAL *W = (mask & 1) ? w : NULL, *B = (mask & 2) ? b : NULL;                         \
    REAL *RM = (mask & 4) ? rm : NULL, *RV = (mask & 4) ? rv : NULL;                           \
    REAL *SM = (mask & 8) ? mean : NULL, *SI = (mask & 8) ? invstd : NULL;                     \
    REAL *DW = (mask & 16) ? dw : NULL, *DB = (mask & 16) ? db : NULL;                         \
    int rc = fastbn_forward_train_##SUFFIX(outer, C, inner, x, W, B, (REAL)1e-5, (REAL)0.1,    \
                                           RM, RV, y, SM, SI);                                 \
    CHECK(rc == FASTBN_OK, "forward_train: %d %s", rc, fastbn_last_error());                   \
    write_file(dir, "y", y, bx);                                                               \
    write_file(dir, "mean", mean, bc);                                                         \
    write_file(dir, "invstd", invstd, bc);                                                     \
    write_file(dir, "rm_out", rm, bc);                                                         \
    write_file(dir, "rv_out", rv, bc);                                                         \
    /* in place: y == x (on a copy), no optional outputs */                                   \
    memcpy(yi, x, bx);                                                                         \
    rc = fastbn_forward_train_##SUFFIX(outer, C, inner, yi, W, B, (REAL)1e-5, (REAL)0.1,       \
                                       NULL, NULL, yi, NULL, NULL);                            \
    CHECK(rc == FASTBN_OK, "forward_train in place: %d %s", rc, fastbn_last_error());          \
    write_file(dir, "y_inplace", yi, bx);                                                      \
    rc = fastbn_forward_infer_##SUFFIX(outer, C, inner, x, rm_in, rv_in, W, B, (REAL)1e-5, y); \
    CHECK(rc == FASTBN_OK, "forward_infer: %d %s", rc, fastbn_last_error());                   \
    write_file(dir, "y_infer", y, bx);                                                         \
    memcpy(yi, x, bx);                                                                         \
    rc = fastbn_forward_infer_##SUFFIX(outer, C, inner, yi, rm_in, rv_in, W, B, (REAL)1e-5, yi);\
    CHECK(rc == FASTBN_OK, "forward_infer in place: %d %s", rc, fastbn_last_error());          \
    write_file(dir, "y_infer_inplace", yi, bx);                                                \
    /* the backward always gets the statistics (they are required) */                         \
    rc = fastbn_forward_train_##SUFFIX(outer, C, inner, x, W, B, (REAL)1e-5, (REAL)0.1,        \
                                       NULL, NULL, y, mean, invstd);                           \
    CHECK(rc == FASTBN_OK, "forward_train for backward: %d %s", rc, fastbn_last_error());      \
    rc = fastbn_backward_##SUFFIX(outer, C, inner, dy, x, mean, invstd, W, dx, DW, DB);        \
    CHECK(rc == FASTBN_OK, "backward: %d %s", rc, fastbn_last_error());                        \
    write_file(dir, "dx", dx, bx);                                                             \
    write_file(dir, "dw", dw, bc);                                                             \
    write_file(dir, "db", db, bc);                                                             \
    /* the fused epilogues: relu(bn(x) + res), its inference and backward */                  \
    REAL *res = read_file(dir, "res", bx), *dres = malloc(bx + 1);                            \
    rc = fastbn_forward_train_ex_##SUFFIX(outer, C, inner, x, W, B, (REAL)1e-5, (REAL)0.1,     \
                                          NULL, NULL, y, mean, invstd, res, FASTBN_ACT_RELU);  \
    CHECK(rc == FASTBN_OK, "forward_train_ex: %d %s", rc, fastbn_last_error());                \
    write_file(dir, "y_ex", y, bx);                                                            \
    rc = fastbn_forward_infer_ex_##SUFFIX(outer, C, inner, x, rm_in, rv_in, W, B, (REAL)1e-5, \
                                          yi, res, FASTBN_ACT_RELU);                           \
    CHECK(rc == FASTBN_OK, "forward_infer_ex: %d %s", rc, fastbn_last_error());                \
    write_file(dir, "y_infer_ex", yi, bx);                                                     \
    rc = fastbn_backward_ex_##SUFFIX(outer, C, inner, dy, x, mean, invstd, W, dx, DW, DB,      \
                                     NULL, FASTBN_ACT_RELU, y, dres);                          \
    CHECK(rc == FASTBN_OK, "backward_ex: %d %s", rc, fastbn_last_error());                     \
    write_file(dir, "dx_ex", dx, bx);                                                          \
    write_file(dir, "dw_ex", dw, bc);                                                          \
    write_file(dir, "db_ex", db, bc);                                                          \
    write_file(dir, "dres_ex", dres, bx);                                                      \
    double *smean = malloc((size_t)C * sizeof(double) + 1);                                    \
    double *svar = malloc((size_t)C * sizeof(double) + 1);                                     \
    rc = fastbn_batch_stats_##SUFFIX(outer, C, inner, x, smean, svar);                        \
    CHECK(rc == FASTBN_OK, "batch_stats: %d %s", rc, fastbn_last_error());                     \
    write_file(dir, "stats_mean", smean, (size_t)C * sizeof(double));                          \
    write_file(dir, "stats_var", svar, (size_t)C * sizeof(double));                            \
    free(x); free(dy); free(w); free(b); free(rm); free(rv); free(rm_in); free(rv_in);         \
    free(y); free(yi); free(mean); free(invstd); free(dx); free(dw); free(db);                 \
    free(res); free(dres); free(smean); free(svar);                                            \
    return failures;                                                                           \
}

DEFINE_RUN(float, f32)
DEFINE_RUN(double, f64)

/* ------------------------------------------------------------------ errors */

#define NX 24   /* outer 2, channels 3, inner 4 */
#define SENTINEL 12345.0f

static int untouched(const float *p, int n)
{
    for (int i = 0; i < n; i++)
        if (p[i] != SENTINEL)
            return 0;
    return 1;
}

static void fill(float *p, int n, float v)
{
    for (int i = 0; i < n; i++)
        p[i] = v;
}

/* Expect code 1, a message naming `word`, and every output still SENTINEL. */
#define EXPECT_INVALID(call, word, ...)                                                        \
    do {                                                                                       \
        fill(y, NX, SENTINEL); fill(rm, 3, SENTINEL); fill(rv, 3, SENTINEL);                   \
        fill(sm, 3, SENTINEL); fill(si, 3, SENTINEL); fill(dw, 3, SENTINEL); fill(db, 3, SENTINEL);\
        int rc_ = (call);                                                                      \
        CHECK(rc_ == FASTBN_ERR_INVALID_ARGUMENT, "%s: code %d, expected 1", #call, rc_);      \
        CHECK(strstr(fastbn_last_error(), word) != NULL, "%s: message '%s' lacks '%s'",        \
              #call, fastbn_last_error(), word);                                               \
        CHECK(untouched(y, NX) && untouched(rm, 3) && untouched(rv, 3) && untouched(sm, 3)     \
              && untouched(si, 3) && untouched(dw, 3) && untouched(db, 3),                     \
              "%s wrote an output", #call);                                                    \
        checked++;                                                                             \
    } while (0)

static int errors(void)
{
    float x[NX], dy[NX], y[NX], w[3] = {1, 2, 3}, b[3] = {0}, rm[3], rv[3], sm[3], si[3];
    float dw[3], db[3], mean[3] = {0}, inv[3] = {1, 1, 1}, var[3] = {1, 1, 1};
    double xd[NX], yd[NX];
    int checked = 0;
    const int64_t big = (int64_t)1 << 40;
    for (int i = 0; i < NX; i++) {
        x[i] = (float)i;
        dy[i] = 1.0f;
        xd[i] = i;
    }
    /* NULL required pointers */
    EXPECT_INVALID(fastbn_forward_train_f32(2, 3, 4, NULL, w, b, 1e-5f, 0.1f, rm, rv, y, sm, si), "x");
    EXPECT_INVALID(fastbn_forward_train_f32(2, 3, 4, x, w, b, 1e-5f, 0.1f, rm, rv, NULL, sm, si), "y");
    EXPECT_INVALID(fastbn_forward_infer_f32(2, 3, 4, NULL, mean, var, w, b, 1e-5f, y), "x");
    EXPECT_INVALID(fastbn_forward_infer_f32(2, 3, 4, x, NULL, var, w, b, 1e-5f, y), "running_mean");
    EXPECT_INVALID(fastbn_forward_infer_f32(2, 3, 4, x, mean, NULL, w, b, 1e-5f, y), "running_var");
    EXPECT_INVALID(fastbn_forward_infer_f32(2, 3, 4, x, mean, var, w, b, 1e-5f, NULL), "y");
    EXPECT_INVALID(fastbn_backward_f32(2, 3, 4, NULL, x, mean, inv, w, y, dw, db), "dy");
    EXPECT_INVALID(fastbn_backward_f32(2, 3, 4, dy, NULL, mean, inv, w, y, dw, db), "x");
    EXPECT_INVALID(fastbn_backward_f32(2, 3, 4, dy, x, NULL, inv, w, y, dw, db), "save_mean");
    EXPECT_INVALID(fastbn_backward_f32(2, 3, 4, dy, x, mean, NULL, w, y, dw, db), "save_invstd");
    EXPECT_INVALID(fastbn_backward_f32(2, 3, 4, dy, x, mean, inv, w, NULL, dw, db), "dx");
    /* negative sizes, each position */
    EXPECT_INVALID(fastbn_forward_train_f32(-1, 3, 4, x, w, b, 1e-5f, 0.1f, rm, rv, y, sm, si), ">= 0");
    EXPECT_INVALID(fastbn_forward_train_f32(2, -3, 4, x, w, b, 1e-5f, 0.1f, rm, rv, y, sm, si), ">= 0");
    EXPECT_INVALID(fastbn_forward_infer_f32(2, 3, -4, x, mean, var, w, b, 1e-5f, y), ">= 0");
    EXPECT_INVALID(fastbn_backward_f32(-2, 3, 4, dy, x, mean, inv, w, y, dw, db), ">= 0");
    /* size products that overflow (elements, then bytes) */
    EXPECT_INVALID(fastbn_forward_train_f32(big, big, 4, x, w, b, 1e-5f, 0.1f, rm, rv, y, sm, si), "overflows");
    EXPECT_INVALID(fastbn_forward_infer_f32(big, 3, big, x, mean, var, w, b, 1e-5f, y), "overflows");
    EXPECT_INVALID(fastbn_backward_f32((int64_t)1 << 61, 1, 1, dy, x, mean, inv, w, y, dw, db), "overflows");
    /* n < 2 in training */
    EXPECT_INVALID(fastbn_forward_train_f32(1, 3, 1, x, w, b, 1e-5f, 0.1f, rm, rv, y, sm, si), "at least 2");
    EXPECT_INVALID(fastbn_forward_train_f32(0, 3, 4, x, w, b, 1e-5f, 0.1f, rm, rv, y, sm, si), "at least 2");
    EXPECT_INVALID(fastbn_backward_f32(1, 3, 1, dy, x, mean, inv, w, y, dw, db), "at least 2");
    /* bad scalars */
    EXPECT_INVALID(fastbn_forward_train_f32(2, 3, 4, x, w, b, -1.0f, 0.1f, rm, rv, y, sm, si), "eps");
    EXPECT_INVALID(fastbn_forward_train_f32(2, 3, 4, x, w, b, NAN, 0.1f, rm, rv, y, sm, si), "eps");
    EXPECT_INVALID(fastbn_forward_train_f32(2, 3, 4, x, w, b, 1e-5f, 1.5f, rm, rv, y, sm, si), "momentum");
    EXPECT_INVALID(fastbn_forward_infer_f32(2, 3, 4, x, mean, var, w, b, -1e-3f, y), "eps");
    /* one rule with the Python API: eps must be finite */
    EXPECT_INVALID(fastbn_forward_train_f32(2, 3, 4, x, w, b, INFINITY, 0.1f, rm, rv, y, sm, si), "eps");
    EXPECT_INVALID(fastbn_forward_infer_f32(2, 3, 4, x, mean, var, w, b, INFINITY, y), "eps");
    /* the fused epilogues: an unknown activation, RELU's backward without y, dx and
     * dresidual in one buffer; the statistics alone need x, mean, var and a value */
    EXPECT_INVALID(fastbn_forward_train_ex_f32(2, 3, 4, x, w, b, 1e-5f, 0.1f, rm, rv, y, sm, si,
                                               dy, 7), "activation");
    EXPECT_INVALID(fastbn_forward_train_ex_f32(2, 3, 4, x, w, b, 1e-5f, 0.1f, rm, rv, NULL, sm,
                                               si, dy, FASTBN_ACT_RELU), "y");
    EXPECT_INVALID(fastbn_forward_infer_ex_f32(2, 3, 4, x, mean, var, w, b, 1e-5f, y, dy, -1),
                   "activation");
    EXPECT_INVALID(fastbn_backward_ex_f32(2, 3, 4, dy, x, mean, inv, w, y, dw, db, NULL, 2, x,
                                          NULL), "activation");
    EXPECT_INVALID(fastbn_backward_ex_f32(2, 3, 4, dy, x, mean, inv, w, y, dw, db, NULL,
                                          FASTBN_ACT_RELU, NULL, NULL), "y");
    EXPECT_INVALID(fastbn_backward_ex_f32(2, 3, 4, dy, x, mean, inv, w, y, dw, db, NULL,
                                          FASTBN_ACT_RELU, x, y), "different");
    {
        double smean[3] = {SENTINEL, SENTINEL, SENTINEL}, svar[3] = {SENTINEL, SENTINEL, SENTINEL};
        EXPECT_INVALID(fastbn_batch_stats_f32(2, 3, 4, NULL, smean, svar), "x");
        EXPECT_INVALID(fastbn_batch_stats_f32(2, 3, 4, x, NULL, svar), "mean");
        EXPECT_INVALID(fastbn_batch_stats_f32(2, 3, 4, x, smean, NULL), "var");
        EXPECT_INVALID(fastbn_batch_stats_f32(0, 3, 4, x, smean, svar), "at least 1");
        CHECK(smean[0] == SENTINEL && svar[2] == SENTINEL, "batch_stats wrote on error");
    }
    /* the plain functions name themselves in their messages */
    fastbn_forward_train_f32(2, 3, 4, NULL, w, b, 1e-5f, 0.1f, rm, rv, y, sm, si);
    CHECK(strstr(fastbn_last_error(), "fastbn_forward_train_f32:") != NULL, "message '%s'",
          fastbn_last_error());
    /* the version macros are the library's version */
    {
        char version[64];
        snprintf(version, sizeof version, "%d.%d.%d", FASTBN_VERSION_MAJOR, FASTBN_VERSION_MINOR,
                 FASTBN_VERSION_PATCH);
        CHECK(!strcmp(version, fastbn_version()), "header %s, library %s", version,
              fastbn_version());
    }
    /* the f64 functions share the checks; one of each */
    fill(y, NX, SENTINEL);
    CHECK(fastbn_forward_train_f64(2, 3, 4, NULL, NULL, NULL, 1e-5, 0.1, NULL, NULL, yd, NULL, NULL)
          == FASTBN_ERR_INVALID_ARGUMENT, "f64 forward NULL x");
    CHECK(fastbn_forward_infer_f64(-2, 3, 4, xd, NULL, NULL, NULL, NULL, 1e-5, yd)
          == FASTBN_ERR_INVALID_ARGUMENT, "f64 infer negative");
    CHECK(fastbn_backward_f64(1, 3, 1, xd, xd, NULL, NULL, NULL, yd, NULL, NULL)
          == FASTBN_ERR_INVALID_ARGUMENT, "f64 backward n < 2");
    /* messages are per thread; a valid call leaves the last failure's message alone */
    CHECK(fastbn_forward_train_f32(2, 3, 4, x, w, b, 1e-5f, 0.1f, NULL, NULL, y, NULL, NULL)
          == FASTBN_OK, "valid call after errors: %s", fastbn_last_error());
    /* empty work is fine: zero channels, and inference over an empty batch */
    CHECK(fastbn_forward_train_f32(2, 0, 4, x, NULL, NULL, 1e-5f, 0.1f, NULL, NULL, y, NULL, NULL)
          == FASTBN_OK, "zero channels");
    CHECK(fastbn_forward_infer_f32(0, 3, 4, x, mean, var, NULL, NULL, 1e-5f, y) == FASTBN_OK,
          "empty inference");
    printf("errors: %d invalid calls checked, %d failures\n", checked, failures);
    return failures;
}

/* ------------------------------------------------------------------ threads */

enum { T_OUTER = 16, T_C = 8, T_INNER = 300, T_N = T_OUTER * T_C * T_INNER, T_THREADS = 4 };

typedef struct {
    int id;
    float *x, *dy, *y_ref, *dx_ref;
    int mismatches;
} job_t;

static void make_input(float *x, float *dy, int seed)
{
    for (int i = 0; i < T_N; i++) {
        x[i] = 100.0f * seed + sinf(0.37f * i + seed);
        dy[i] = cosf(0.11f * i * (seed + 1));
    }
}

static void forward_backward(const float *x, const float *dy, float *y, float *dx)
{
    float mean[T_C], inv[T_C], dw[T_C], db[T_C];
    if (fastbn_forward_train_f32(T_OUTER, T_C, T_INNER, x, NULL, NULL, 1e-5f, 0.1f, NULL, NULL,
                                 y, mean, inv) != FASTBN_OK
        || fastbn_backward_f32(T_OUTER, T_C, T_INNER, dy, x, mean, inv, NULL, dx, dw, db)
               != FASTBN_OK)
        fprintf(stderr, "call failed: %s\n", fastbn_last_error());
}

static void *worker(void *arg)
{
    job_t *job = arg;
    float *y = malloc(sizeof(float) * T_N), *dx = malloc(sizeof(float) * T_N);
    for (int rep = 0; rep < 25; rep++) {
        forward_backward(job->x, job->dy, y, dx);
        if (memcmp(y, job->y_ref, sizeof(float) * T_N) || memcmp(dx, job->dx_ref, sizeof(float) * T_N))
            job->mismatches++;
        /* a bad call in this thread sets only this thread's message */
        fastbn_forward_train_f32(-job->id - 1, 1, 1, job->x, NULL, NULL, 1e-5f, 0.1f, NULL, NULL,
                                 y, NULL, NULL);
        char expect[64];
        snprintf(expect, sizeof expect, "outer=%d,", -job->id - 1);
        if (!strstr(fastbn_last_error(), expect))
            job->mismatches++;
    }
    free(y);
    free(dx);
    return NULL;
}

static int threads(void)
{
    job_t jobs[T_THREADS];
    pthread_t tid[T_THREADS];
    for (int t = 0; t < T_THREADS; t++) {
        jobs[t] = (job_t){t, malloc(sizeof(float) * T_N), malloc(sizeof(float) * T_N),
                          malloc(sizeof(float) * T_N), malloc(sizeof(float) * T_N), 0};
        make_input(jobs[t].x, jobs[t].dy, t);
        forward_backward(jobs[t].x, jobs[t].dy, jobs[t].y_ref, jobs[t].dx_ref);
    }
    for (int t = 0; t < T_THREADS; t++)
        pthread_create(&tid[t], NULL, worker, &jobs[t]);
    for (int t = 0; t < T_THREADS; t++) {
        pthread_join(tid[t], NULL);
        CHECK(jobs[t].mismatches == 0, "thread %d: %d mismatches", t, jobs[t].mismatches);
    }
    printf("threads: %d threads x 25 forward+backward, %d failures\n", T_THREADS, failures);
    return failures;
}

/* ------------------------------------------------------------------ init failure */

static int init_failure(void)
{
    float x[NX] = {0}, y[NX], v[3] = {1, 1, 1};
    double xd[NX] = {0}, yd[NX], vd[3] = {1, 1, 1};
    for (int rep = 0; rep < 2; rep++) {
        int codes[6] = {
            fastbn_forward_train_f32(2, 3, 4, x, NULL, NULL, 1e-5f, 0.1f, NULL, NULL, y, NULL, NULL),
            fastbn_forward_train_f64(2, 3, 4, xd, NULL, NULL, 1e-5, 0.1, NULL, NULL, yd, NULL, NULL),
            fastbn_forward_infer_f32(2, 3, 4, x, v, v, NULL, NULL, 1e-5f, y),
            fastbn_forward_infer_f64(2, 3, 4, xd, vd, vd, NULL, NULL, 1e-5, yd),
            fastbn_backward_f32(2, 3, 4, x, x, v, v, NULL, y, NULL, NULL),
            fastbn_backward_f64(2, 3, 4, xd, xd, vd, vd, NULL, yd, NULL, NULL),
        };
        for (int i = 0; i < 6; i++)
            CHECK(codes[i] == FASTBN_ERR_INIT, "call %d returned %d, expected FASTBN_ERR_INIT", i,
                  codes[i]);
        CHECK(strlen(fastbn_last_error()) > 0, "no message");
    }
    printf("init-failure: %s\n", fastbn_last_error());
    return failures;
}

/* ------------------------------------------------------------------ overhead */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int overhead(void)
{
    enum { O = 4, CH = 4, I = 4, N = O * CH * I, REPS = 20000 };
    float x[N], y[N], mean[CH], inv[CH];
    for (int i = 0; i < N; i++)
        x[i] = (float)(i % 7);
    double t0 = now();
    int rc = fastbn_forward_train_f32(O, CH, I, x, NULL, NULL, 1e-5f, 0.1f, NULL, NULL, y, mean, inv);
    double first = now() - t0;
    CHECK(rc == FASTBN_OK, "first call: %s", fastbn_last_error());
    double best_train = 1e9, best_infer = 1e9;
    for (int round = 0; round < 5; round++) {
        t0 = now();
        for (int r = 0; r < REPS; r++)
            fastbn_forward_train_f32(O, CH, I, x, NULL, NULL, 1e-5f, 0.1f, NULL, NULL, y, mean, inv);
        double t = (now() - t0) / REPS;
        best_train = t < best_train ? t : best_train;
        t0 = now();
        for (int r = 0; r < REPS; r++)
            fastbn_forward_infer_f32(O, CH, I, x, mean, inv, NULL, NULL, 1e-5f, y);
        t = (now() - t0) / REPS;
        best_infer = t < best_infer ? t : best_infer;
    }
    printf("first call %.3f s\nper call, (4, 4, 4) float32: forward_train %.2f us, "
           "forward_infer %.2f us\n", first, best_train * 1e6, best_infer * 1e6);
    return failures;
}

/* ------------------------------------------------------------------ fork */

static volatile int fork_stop = 0;

static void *busy_caller(void *arg)
{
    job_t *job = arg;
    float *y = malloc(sizeof(float) * T_N), *dx = malloc(sizeof(float) * T_N);
    while (!fork_stop)
        forward_backward(job->x, job->dy, y, dx);
    free(y);
    free(dx);
    return NULL;
}

/* Fork; the child computes and compares with the parent's results.  A child that hangs
 * is killed by its alarm; returns 0 when the child exited 0. */
static int fork_child_matches(const float *x, const float *dy, const float *y_ref,
                              const float *dx_ref)
{
    pid_t pid = fork();
    if (pid == 0) {
        alarm(60);
        float *y = malloc(sizeof(float) * T_N), *dx = malloc(sizeof(float) * T_N);
        forward_backward(x, dy, y, dx);
        int same = !memcmp(y, y_ref, sizeof(float) * T_N) && !memcmp(dx, dx_ref, sizeof(float) * T_N);
        _exit(same ? 0 : 3);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid)
        return 1;
    if (WIFSIGNALED(status))
        fprintf(stderr, "child killed by signal %d\n", WTERMSIG(status));
    return !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

static int fork_test(void)
{
    float *x = malloc(sizeof(float) * T_N), *dy = malloc(sizeof(float) * T_N);
    float *y_ref = malloc(sizeof(float) * T_N), *dx_ref = malloc(sizeof(float) * T_N);
    make_input(x, dy, 1);
    forward_backward(x, dy, y_ref, dx_ref);
    int bad = 0, children = 0;
    for (int k = 0; k < 3; k++, children++)
        bad += fork_child_matches(x, dy, y_ref, dx_ref);
    /* and while another thread is inside a call (and may hold the library's lock) */
    job_t job = {0, x, dy, y_ref, dx_ref, 0};
    pthread_t t;
    pthread_create(&t, NULL, busy_caller, &job);
    for (int k = 0; k < 12; k++, children++) {
        bad += fork_child_matches(x, dy, y_ref, dx_ref);
        usleep(2000);
    }
    fork_stop = 1;
    pthread_join(t, NULL);
    printf("fork: %d children, %d failures\n", children, bad);
    return bad;
}

int main(int argc, char **argv)
{
    if (argc >= 8 && !strcmp(argv[1], "run")) {
        long long outer = atoll(argv[3]), C = atoll(argv[4]), inner = atoll(argv[5]);
        int mask = atoi(argv[6]);
        int rc = !strcmp(argv[2], "f32") ? run_f32(outer, C, inner, mask, argv[7])
                                         : run_f64(outer, C, inner, mask, argv[7]);
        return rc ? 1 : 0;
    }
    if (argc == 2 && !strcmp(argv[1], "errors"))
        return errors() ? 1 : 0;
    if (argc == 2 && !strcmp(argv[1], "threads"))
        return threads() ? 1 : 0;
    if (argc == 2 && !strcmp(argv[1], "init-failure"))
        return init_failure() ? 1 : 0;
    if (argc == 2 && !strcmp(argv[1], "overhead"))
        return overhead() ? 1 : 0;
    if (argc == 2 && !strcmp(argv[1], "fork"))
        return fork_test() ? 1 : 0;
    fprintf(stderr, "usage: see the top of capi_check.c\n");
    return 2;
}

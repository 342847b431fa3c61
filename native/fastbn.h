/* fastbn: batch normalization kernels for C and C++ (docs/contract.md section 4).
 *
 * Build the library with `python -m fastbn.capi build --outdir DIR`, then
 *     cc prog.c -IDIR -LDIR -lfastbn -Wl,-rpath,DIR
 *
 * Data are contiguous, of logical shape (outer, channels, inner): element
 * (o, c, i) is at p[(o * channels + c) * inner + i].  NCHW is (N, C, H*W),
 * NHWC is (N*H*W, C, 1), (N, C) is (N, C, 1).  Per-channel arrays have
 * `channels` elements.  Every function returns FASTBN_OK or an error code, and
 * on error writes nothing; fastbn_last_error() then describes the failure.
 * eps must be finite and >= 0, momentum in [0, 1] (the Python API's rule).
 * All functions may be called from several threads at once, and in a child
 * after fork() (the library resets its lock there; see the README on threads).
 *
 * Buffers: an output may be exactly the same buffer as an input where a
 * function says so ("y may equal x"); any other overlap between an output and
 * another argument (a partial overlap, a per-channel array inside x or y, two
 * outputs sharing memory) is undefined behaviour.
 *
 * This file is the single source of truth for the ABI: fastbn's cffi build
 * reads the declarations between the CDEF markers below.
 */
#ifndef FASTBN_H
#define FASTBN_H

#include <stdint.h>

#if defined(_WIN32) && defined(FASTBN_BUILDING)
#  define FASTBN_API __declspec(dllexport)
#elif defined(_WIN32)
#  define FASTBN_API __declspec(dllimport)
#elif defined(__GNUC__)
#  define FASTBN_API __attribute__((visibility("default")))
#else
#  define FASTBN_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* FASTBN_CDEF_BEGIN */
#define FASTBN_OK 0
#define FASTBN_ERR_INVALID_ARGUMENT 1
#define FASTBN_ERR_INIT 2
#define FASTBN_ERR_INTERNAL 3

/* The version of this header; fastbn_version() returns the library's as
 * "MAJOR.MINOR.PATCH". */
#define FASTBN_VERSION_MAJOR 0
#define FASTBN_VERSION_MINOR 1
#define FASTBN_VERSION_PATCH 0

/* Activations fused after the normalization (the _ex functions). */
#define FASTBN_ACT_NONE 0
#define FASTBN_ACT_RELU 1

/* The library's version, e.g. "0.1.0". */
FASTBN_API const char *fastbn_version(void);
/* The message of the calling thread's last failure ("" if none). */
FASTBN_API const char *fastbn_last_error(void);

/* Training forward: batch statistics over (outer, inner) per channel, then
 * y = weight * (x - mean) / sqrt(var + eps) + bias.  weight/bias NULL mean
 * 1/0.  running_mean/running_var, when not NULL, are updated in place:
 * r = (1 - momentum) r + momentum s, with the unbiased batch variance.
 * save_mean/save_invstd, when not NULL, receive the batch mean and
 * 1 / sqrt(var + eps) (biased variance) for the backward.  y may equal x.
 * Needs outer * inner >= 2. */
FASTBN_API int fastbn_forward_train_f32(int64_t outer, int64_t channels, int64_t inner,
    const float *x, const float *weight, const float *bias, float eps, float momentum,
    float *running_mean, float *running_var, float *y, float *save_mean, float *save_invstd);
FASTBN_API int fastbn_forward_train_f64(int64_t outer, int64_t channels, int64_t inner,
    const double *x, const double *weight, const double *bias, double eps, double momentum,
    double *running_mean, double *running_var, double *y, double *save_mean,
    double *save_invstd);

/* Inference: y = weight * (x - running_mean) / sqrt(running_var + eps) + bias.
 * weight/bias NULL mean 1/0; y may equal x. */
FASTBN_API int fastbn_forward_infer_f32(int64_t outer, int64_t channels, int64_t inner,
    const float *x, const float *running_mean, const float *running_var,
    const float *weight, const float *bias, float eps, float *y);
FASTBN_API int fastbn_forward_infer_f64(int64_t outer, int64_t channels, int64_t inner,
    const double *x, const double *running_mean, const double *running_var,
    const double *weight, const double *bias, double eps, double *y);

/* Training backward, given the forward's save_mean and save_invstd:
 * dx = weight * invstd * (dy - dbias / n - (x - mean) * invstd * dweight / n),
 * dweight = sum(dy * (x - mean) * invstd), dbias = sum(dy) per channel
 * (n = outer * inner >= 2).  weight NULL means 1; dweight/dbias NULL are not
 * written; dx may equal dy or x. */
FASTBN_API int fastbn_backward_f32(int64_t outer, int64_t channels, int64_t inner,
    const float *dy, const float *x, const float *save_mean, const float *save_invstd,
    const float *weight, float *dx, float *dweight, float *dbias);
FASTBN_API int fastbn_backward_f64(int64_t outer, int64_t channels, int64_t inner,
    const double *dy, const double *x, const double *save_mean, const double *save_invstd,
    const double *weight, double *dx, double *dweight, double *dbias);

/* Fused epilogues (ResNet's relu(bn(x) + shortcut)), in the same pass as the
 * functions above, whose arguments they take first.  residual (NULL: none) has
 * x's layout and is added to the normalized output; activation is
 * FASTBN_ACT_NONE or FASTBN_ACT_RELU, applied last:
 *     y = act(weight * (x - mean) * invstd + bias + residual).
 * The statistics are those of x alone.  y may equal x or residual. */
FASTBN_API int fastbn_forward_train_ex_f32(int64_t outer, int64_t channels, int64_t inner,
    const float *x, const float *weight, const float *bias, float eps, float momentum,
    float *running_mean, float *running_var, float *y, float *save_mean, float *save_invstd,
    const float *residual, int activation);
FASTBN_API int fastbn_forward_train_ex_f64(int64_t outer, int64_t channels, int64_t inner,
    const double *x, const double *weight, const double *bias, double eps, double momentum,
    double *running_mean, double *running_var, double *y, double *save_mean,
    double *save_invstd, const double *residual, int activation);
FASTBN_API int fastbn_forward_infer_ex_f32(int64_t outer, int64_t channels, int64_t inner,
    const float *x, const float *running_mean, const float *running_var,
    const float *weight, const float *bias, float eps, float *y,
    const float *residual, int activation);
FASTBN_API int fastbn_forward_infer_ex_f64(int64_t outer, int64_t channels, int64_t inner,
    const double *x, const double *running_mean, const double *running_var,
    const double *weight, const double *bias, double eps, double *y,
    const double *residual, int activation);

/* The backward through the epilogue.  With FASTBN_ACT_RELU, y is the forward's
 * output (required) and the gradient flows where y > 0: g = dy there, 0
 * elsewhere; with FASTBN_ACT_NONE, g = dy and y is not read.  dx, dweight and
 * dbias are those of fastbn_backward_* for g; dresidual (NULL: not written)
 * receives g, the residual's gradient.  residual is not read (the backward does
 * not need it; it keeps the forward's argument list).  dx and dresidual may
 * each equal dy, but not each other. */
FASTBN_API int fastbn_backward_ex_f32(int64_t outer, int64_t channels, int64_t inner,
    const float *dy, const float *x, const float *save_mean, const float *save_invstd,
    const float *weight, float *dx, float *dweight, float *dbias,
    const float *residual, int activation, const float *y, float *dresidual);
FASTBN_API int fastbn_backward_ex_f64(int64_t outer, int64_t channels, int64_t inner,
    const double *dy, const double *x, const double *save_mean, const double *save_invstd,
    const double *weight, double *dx, double *dweight, double *dbias,
    const double *residual, int activation, const double *y, double *dresidual);

/* Statistics only (standardizing data): the per-channel mean and biased
 * variance of x over (outer, inner), in double, as the forward computes them.
 * Needs outer * inner >= 1. */
FASTBN_API int fastbn_batch_stats_f32(int64_t outer, int64_t channels, int64_t inner,
    const float *x, double *mean, double *var);
FASTBN_API int fastbn_batch_stats_f64(int64_t outer, int64_t channels, int64_t inner,
    const double *x, double *mean, double *var);
/* FASTBN_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* FASTBN_H */

/* The C side of libfastbn.so: argument checks, errors, and the embedded Python.
 *
 * Compiled by fastbn/capi/_build.py into the cffi embedding module, after
 * cffi's embedding support (cffi_start_python) and Python.h.  The build
 * defines FASTBN_PYTHON_EXECUTABLE (the interpreter fastbn is installed
 * for, a virtual environment's python included) and FASTBN_VERSION_STRING.
 *
 * The first call starts Python once (PyConfig with that executable, so the
 * environment's site-packages are found with no variable set by the caller),
 * runs the init code, which registers the Numba @cfunc entry points; every
 * call after that checks its arguments here and jumps straight into compiled
 * code, without Python or its lock.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define FASTBN_BUILDING
#include "fastbn.h"

#define FASTBN_ERROR_SIZE 512

static __thread char fastbn__error[FASTBN_ERROR_SIZE];
static char fastbn__init_error[FASTBN_ERROR_SIZE];
static pthread_once_t fastbn__once = PTHREAD_ONCE_INIT;
static int fastbn__init_status = FASTBN_ERR_INIT;

enum { FWD_F32, FWD_F64, INFER_F32, INFER_F64, BWD_F32, BWD_F64, STATS_F32, STATS_F64,
       N_ENTRIES };
static void *fastbn__entries[N_ENTRIES];
static int64_t fastbn__threads = 1;
/* Calls reading fewer bytes run on the calling thread: the threading layer's thread mask
 * (thread-local, Numba's set/get_num_threads) is set to 1 around them, as in Python. */
static int64_t fastbn__serial_max_bytes = 0;
static void (*fastbn__mask_set)(int) = NULL;
static int (*fastbn__mask_get)(void) = NULL;
/* Numba's workqueue layer aborts the process on concurrent parallel regions:
 * under it, calls take this lock (the init code says which layer loaded). */
static int fastbn__serialize = 1;
static pthread_mutex_t fastbn__serial = PTHREAD_MUTEX_INITIALIZER;
/* Every call holds this for reading; fork() takes it for writing (pthread_atfork), so a
 * fork waits until no call is inside the kernels: TBB can shut its workers down cleanly
 * then, and a child never inherits a thread pool or lock in the middle of a call. */
static pthread_rwlock_t fastbn__fork_gate;

/* flags: which optional pointers are given (fastbn/capi/_entries.py) */
enum {
    HAS_WEIGHT = 1, HAS_BIAS = 2, HAS_RUNNING_MEAN = 4, HAS_RUNNING_VAR = 8,
    HAS_SAVE_MEAN = 16, HAS_SAVE_INVSTD = 32, HAS_DWEIGHT = 64, HAS_DBIAS = 128,
    HAS_RESIDUAL = 256, RELU = 512, HAS_DRESIDUAL = 1024
};

static void fastbn__set_error(const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vsnprintf(fastbn__error, FASTBN_ERROR_SIZE, fmt, args);
    va_end(args);
}

/* Called by the init code (Python) through cffi. */
static void fastbn__register_entry(int index, void *address)
{
    if (index >= 0 && index < N_ENTRIES)
        fastbn__entries[index] = address;
}

static void fastbn__set_threads(int64_t n, int serialize)
{
    fastbn__threads = n > 0 ? n : 1;
    fastbn__serialize = serialize;
}

static void fastbn__set_small_calls(int64_t max_bytes, void *mask_set, void *mask_get)
{
    fastbn__serial_max_bytes = max_bytes;
    fastbn__mask_set = (void (*)(int))mask_set;
    fastbn__mask_get = (int (*)(void))mask_get;
}

/* One lock for every caller in the process: the Python API takes it too when this
 * library is loaded (fastbn/capi/_entries.py). */
static void fastbn__serial_lock(void)
{
    pthread_mutex_lock(&fastbn__serial);
}

static void fastbn__serial_unlock(void)
{
    pthread_mutex_unlock(&fastbn__serial);
}

static void fastbn__init_fork_gate(void)
{
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
#ifdef __GLIBC__
    /* a fork must not wait forever behind a stream of calls */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
#endif
    pthread_rwlock_init(&fastbn__fork_gate, &attr);
    pthread_rwlockattr_destroy(&attr);
}

static void fastbn__before_fork(void)
{
    pthread_rwlock_wrlock(&fastbn__fork_gate);
}

static void fastbn__after_fork_in_parent(void)
{
    pthread_rwlock_unlock(&fastbn__fork_gate);
}

/* The child has one thread, the one that forked: the locks other threads of the parent
 * may have held start afresh. */
static void fastbn__after_fork_in_child(void)
{
    pthread_mutex_init(&fastbn__serial, NULL);
    fastbn__init_fork_gate();
}

static void fastbn__init_once(void)
{
    fastbn__init_fork_gate();
    if (!Py_IsInitialized()) {
        PyConfig config;
        PyStatus status;
        PyConfig_InitPythonConfig(&config);
        config.install_signal_handlers = 0;
        status = PyConfig_SetBytesString(&config, &config.executable, FASTBN_PYTHON_EXECUTABLE);
        if (!PyStatus_Exception(status))
            status = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
        if (PyStatus_Exception(status)) {
            snprintf(fastbn__init_error, FASTBN_ERROR_SIZE,
                     "fastbn: could not start Python (%s) for %s",
                     status.err_msg ? status.err_msg : "unknown error",
                     FASTBN_PYTHON_EXECUTABLE);
            return;
        }
        /* Initialization holds the GIL: release it for cffi and other threads. */
        PyEval_SaveThread();
    }
    if (cffi_start_python() != 0) {
        snprintf(fastbn__init_error, FASTBN_ERROR_SIZE,
                 "fastbn: the embedded Python could not import fastbn from %s "
                 "(its traceback went to stderr)", FASTBN_PYTHON_EXECUTABLE);
        return;
    }
    for (int i = 0; i < N_ENTRIES; i++) {
        if (fastbn__entries[i] == NULL) {
            snprintf(fastbn__init_error, FASTBN_ERROR_SIZE,
                     "fastbn: the embedded runtime registered no entry point %d", i);
            return;
        }
    }
    /* registered after the runtime started its threading layer: prepare handlers run in
     * reverse order, so this one waits for calls in flight before TBB's shuts it down */
    pthread_atfork(fastbn__before_fork, fastbn__after_fork_in_parent,
                   fastbn__after_fork_in_child);
    fastbn__init_status = FASTBN_OK;
}

static int fastbn__ready(void)
{
    pthread_once(&fastbn__once, fastbn__init_once);
    if (fastbn__init_status != FASTBN_OK) {
        snprintf(fastbn__error, FASTBN_ERROR_SIZE, "%s", fastbn__init_error);
        return FASTBN_ERR_INIT;
    }
    return FASTBN_OK;
}

FASTBN_API const char *fastbn_version(void)
{
    return FASTBN_VERSION_STRING;
}

FASTBN_API const char *fastbn_last_error(void)
{
    return fastbn__error;
}

/* ------------------------------------------------------------------ checks */

static int fastbn__check_sizes(const char *func, int64_t outer, int64_t channels, int64_t inner,
                               size_t itemsize, int64_t *total)
{
    int64_t bytes;
    if (outer < 0 || channels < 0 || inner < 0) {
        fastbn__set_error("%s: sizes must be >= 0 (outer=%lld, channels=%lld, inner=%lld)",
                          func, (long long)outer, (long long)channels, (long long)inner);
        return FASTBN_ERR_INVALID_ARGUMENT;
    }
    if (__builtin_mul_overflow(outer, channels, total)
        || __builtin_mul_overflow(*total, inner, total)
        || __builtin_mul_overflow(*total, (int64_t)itemsize, &bytes)) {
        fastbn__set_error("%s: outer * channels * inner overflows (outer=%lld, channels=%lld, "
                          "inner=%lld)", func, (long long)outer, (long long)channels,
                          (long long)inner);
        return FASTBN_ERR_INVALID_ARGUMENT;
    }
    return FASTBN_OK;
}

static int fastbn__check_pointer(const char *func, const void *p, const char *name)
{
    if (p == NULL) {
        fastbn__set_error("%s: %s must not be NULL", func, name);
        return FASTBN_ERR_INVALID_ARGUMENT;
    }
    return FASTBN_OK;
}

static int fastbn__check_batch(const char *func, int64_t outer, int64_t inner)
{
    int64_t n;
    if (!__builtin_mul_overflow(outer, inner, &n) && n >= 2)
        return FASTBN_OK;
    fastbn__set_error("%s: training needs at least 2 values per channel (outer=%lld, inner=%lld)",
                      func, (long long)outer, (long long)inner);
    return FASTBN_ERR_INVALID_ARGUMENT;
}

static int fastbn__check_scalar(const char *func, double value, const char *name, double low,
                                double high)
{
    if (!(value >= low && value <= high && isfinite(value))) {
        fastbn__set_error("%s: %s must be finite and in [%g, %g] (got %g)", func, name, low,
                          high, value);
        return FASTBN_ERR_INVALID_ARGUMENT;
    }
    return FASTBN_OK;
}

/* The epilogue's flags (HAS_RESIDUAL, RELU), or -1 with the error set. */
static int64_t fastbn__activation(const char *func, int activation)
{
    if (activation == FASTBN_ACT_NONE)
        return 0;
    if (activation == FASTBN_ACT_RELU)
        return RELU;
    fastbn__set_error("%s: activation must be FASTBN_ACT_NONE (0) or FASTBN_ACT_RELU (1) "
                      "(got %d)", func, activation);
    return -1;
}

#define FASTBN_TRY(expr) do { int fastbn__rc = (expr); if (fastbn__rc) return fastbn__rc; } while (0)
#define FASTBN_FLAG(p, bit) ((p) != NULL ? (bit) : 0)

/* Runs `call`, which takes `nthreads` as its thread count, between the locks. */
#define FASTBN_CALL(rc, nbytes, call)                                                  \
    do {                                                                               \
        int64_t nthreads = fastbn__threads;                                            \
        int fastbn__one = (nbytes) < fastbn__serial_max_bytes && nthreads > 1          \
            && fastbn__mask_set != NULL;                                               \
        int fastbn__prev = 0;                                                          \
        pthread_rwlock_rdlock(&fastbn__fork_gate);                                     \
        if (fastbn__one) {                                                             \
            fastbn__prev = fastbn__mask_get();                                         \
            fastbn__mask_set(1);                                                       \
            nthreads = 1;                                                              \
        }                                                                              \
        if (fastbn__serialize) {                                                       \
            pthread_mutex_lock(&fastbn__serial);                                       \
            rc = (call);                                                               \
            pthread_mutex_unlock(&fastbn__serial);                                     \
        } else {                                                                       \
            rc = (call);                                                               \
        }                                                                              \
        if (fastbn__one)                                                               \
            fastbn__mask_set(fastbn__prev > 0 ? fastbn__prev : (int)fastbn__threads); \
        pthread_rwlock_unlock(&fastbn__fork_gate);                                     \
    } while (0)

static int fastbn__entry_status(const char *func, int32_t rc)
{
    if (rc != 0) {
        fastbn__set_error("%s: internal error %d in the kernels", func, (int)rc);
        return FASTBN_ERR_INTERNAL;
    }
    return FASTBN_OK;
}

/* ------------------------------------------------------------------ the ABI */

#define FASTBN_DEFINE(REAL, SUFFIX, FWD, INFER, BWD, STATS)                                   \
typedef int32_t (*fastbn__fwd_##SUFFIX)(int64_t, int64_t, int64_t, const REAL *, const REAL *, \
    const REAL *, REAL, REAL, REAL *, REAL *, REAL *, REAL *, REAL *, const REAL *, int64_t,  \
    int64_t);                                                                                 \
typedef int32_t (*fastbn__infer_##SUFFIX)(int64_t, int64_t, int64_t, const REAL *,           \
    const REAL *, const REAL *, const REAL *, const REAL *, REAL, REAL *, const REAL *,       \
    int64_t, int64_t);                                                                        \
typedef int32_t (*fastbn__bwd_##SUFFIX)(int64_t, int64_t, int64_t, const REAL *, const REAL *,\
    const REAL *, const REAL *, const REAL *, REAL *, REAL *, REAL *, const REAL *, REAL *,    \
    int64_t, int64_t);                                                                        \
typedef int32_t (*fastbn__stats_##SUFFIX)(int64_t, int64_t, int64_t, const REAL *, double *,  \
    double *, int64_t, int64_t);                                                              \
                                                                                              \
static int fastbn__forward_train_##SUFFIX(const char *func, int64_t outer, int64_t channels, \
    int64_t inner, const REAL *x, const REAL *weight, const REAL *bias, REAL eps,             \
    REAL momentum, REAL *running_mean, REAL *running_var, REAL *y, REAL *save_mean,           \
    REAL *save_invstd, const REAL *residual, int activation)                                  \
{                                                                                             \
    int64_t total;                                                                            \
    FASTBN_TRY(fastbn__ready());                                                              \
    FASTBN_TRY(fastbn__check_sizes(func, outer, channels, inner, sizeof(REAL), &total));      \
    FASTBN_TRY(fastbn__check_pointer(func, x, "x"));                                          \
    FASTBN_TRY(fastbn__check_pointer(func, y, "y"));                                          \
    FASTBN_TRY(fastbn__check_batch(func, outer, inner));                                      \
    FASTBN_TRY(fastbn__check_scalar(func, eps, "eps", 0.0, DBL_MAX));                        \
    FASTBN_TRY(fastbn__check_scalar(func, momentum, "momentum", 0.0, 1.0));                   \
    int64_t act = fastbn__activation(func, activation);                                       \
    if (act < 0)                                                                              \
        return FASTBN_ERR_INVALID_ARGUMENT;                                                   \
    if (channels == 0)                                                                        \
        return FASTBN_OK;                                                                     \
    int64_t flags = FASTBN_FLAG(weight, HAS_WEIGHT) | FASTBN_FLAG(bias, HAS_BIAS)             \
        | FASTBN_FLAG(running_mean, HAS_RUNNING_MEAN) | FASTBN_FLAG(running_var, HAS_RUNNING_VAR)\
        | FASTBN_FLAG(save_mean, HAS_SAVE_MEAN) | FASTBN_FLAG(save_invstd, HAS_SAVE_INVSTD)    \
        | FASTBN_FLAG(residual, HAS_RESIDUAL) | act;                                          \
    int32_t rc;                                                                               \
    FASTBN_CALL(rc, total * (int64_t)sizeof(REAL), ((fastbn__fwd_##SUFFIX)fastbn__entries[FWD])(\
        outer, channels, inner, x, weight, bias, eps, momentum, running_mean, running_var, y,  \
        save_mean, save_invstd, residual, flags, nthreads));                                  \
    return fastbn__entry_status(func, rc);                                                    \
}                                                                                             \
                                                                                              \
FASTBN_API int fastbn_forward_train_ex_##SUFFIX(int64_t outer, int64_t channels, int64_t inner,\
    const REAL *x, const REAL *weight, const REAL *bias, REAL eps, REAL momentum,             \
    REAL *running_mean, REAL *running_var, REAL *y, REAL *save_mean, REAL *save_invstd,       \
    const REAL *residual, int activation)                                                     \
{                                                                                             \
    return fastbn__forward_train_##SUFFIX("fastbn_forward_train_ex_" #SUFFIX, outer, channels,\
        inner, x, weight, bias, eps, momentum, running_mean, running_var, y, save_mean,       \
        save_invstd, residual, activation);                                                   \
}                                                                                             \
                                                                                              \
FASTBN_API int fastbn_forward_train_##SUFFIX(int64_t outer, int64_t channels, int64_t inner,   \
    const REAL *x, const REAL *weight, const REAL *bias, REAL eps, REAL momentum,             \
    REAL *running_mean, REAL *running_var, REAL *y, REAL *save_mean, REAL *save_invstd)       \
{                                                                                             \
    return fastbn__forward_train_##SUFFIX("fastbn_forward_train_" #SUFFIX, outer, channels,   \
        inner, x, weight, bias, eps, momentum, running_mean, running_var, y, save_mean,       \
        save_invstd, NULL, FASTBN_ACT_NONE);                                                  \
}                                                                                             \
                                                                                              \
static int fastbn__forward_infer_##SUFFIX(const char *func, int64_t outer, int64_t channels, \
    int64_t inner, const REAL *x, const REAL *running_mean, const REAL *running_var,          \
    const REAL *weight, const REAL *bias, REAL eps, REAL *y, const REAL *residual,            \
    int activation)                                                                           \
{                                                                                             \
    int64_t total;                                                                            \
    FASTBN_TRY(fastbn__ready());                                                              \
    FASTBN_TRY(fastbn__check_sizes(func, outer, channels, inner, sizeof(REAL), &total));      \
    FASTBN_TRY(fastbn__check_pointer(func, x, "x"));                                          \
    FASTBN_TRY(fastbn__check_pointer(func, running_mean, "running_mean"));                    \
    FASTBN_TRY(fastbn__check_pointer(func, running_var, "running_var"));                      \
    FASTBN_TRY(fastbn__check_pointer(func, y, "y"));                                          \
    FASTBN_TRY(fastbn__check_scalar(func, eps, "eps", 0.0, DBL_MAX));                        \
    int64_t act = fastbn__activation(func, activation);                                       \
    if (act < 0)                                                                              \
        return FASTBN_ERR_INVALID_ARGUMENT;                                                   \
    if (total == 0)                                                                           \
        return FASTBN_OK;                                                                     \
    int64_t flags = FASTBN_FLAG(weight, HAS_WEIGHT) | FASTBN_FLAG(bias, HAS_BIAS)             \
        | FASTBN_FLAG(residual, HAS_RESIDUAL) | act;                                          \
    int32_t rc;                                                                               \
    FASTBN_CALL(rc, total * (int64_t)sizeof(REAL),                                            \
                ((fastbn__infer_##SUFFIX)fastbn__entries[INFER])(                             \
        outer, channels, inner, x, running_mean, running_var, weight, bias, eps, y, residual, \
        flags, nthreads));                                                                    \
    return fastbn__entry_status(func, rc);                                                    \
}                                                                                             \
                                                                                              \
FASTBN_API int fastbn_forward_infer_ex_##SUFFIX(int64_t outer, int64_t channels, int64_t inner,\
    const REAL *x, const REAL *running_mean, const REAL *running_var,                         \
    const REAL *weight, const REAL *bias, REAL eps, REAL *y, const REAL *residual,            \
    int activation)                                                                           \
{                                                                                             \
    return fastbn__forward_infer_##SUFFIX("fastbn_forward_infer_ex_" #SUFFIX, outer, channels,\
        inner, x, running_mean, running_var, weight, bias, eps, y, residual, activation);     \
}                                                                                             \
                                                                                              \
FASTBN_API int fastbn_forward_infer_##SUFFIX(int64_t outer, int64_t channels, int64_t inner,   \
    const REAL *x, const REAL *running_mean, const REAL *running_var,                         \
    const REAL *weight, const REAL *bias, REAL eps, REAL *y)                                  \
{                                                                                             \
    return fastbn__forward_infer_##SUFFIX("fastbn_forward_infer_" #SUFFIX, outer, channels,   \
        inner, x, running_mean, running_var, weight, bias, eps, y, NULL, FASTBN_ACT_NONE);    \
}                                                                                             \
                                                                                              \
static int fastbn__backward_##SUFFIX(const char *func, int64_t outer, int64_t channels,       \
    int64_t inner, const REAL *dy, const REAL *x, const REAL *save_mean,                      \
    const REAL *save_invstd, const REAL *weight, REAL *dx, REAL *dweight, REAL *dbias,        \
    int activation, const REAL *y, REAL *dresidual)                                           \
{                                                                                             \
    int64_t total;                                                                            \
    FASTBN_TRY(fastbn__ready());                                                              \
    FASTBN_TRY(fastbn__check_sizes(func, outer, channels, inner, sizeof(REAL), &total));      \
    FASTBN_TRY(fastbn__check_pointer(func, dy, "dy"));                                        \
    FASTBN_TRY(fastbn__check_pointer(func, x, "x"));                                          \
    FASTBN_TRY(fastbn__check_pointer(func, save_mean, "save_mean"));                          \
    FASTBN_TRY(fastbn__check_pointer(func, save_invstd, "save_invstd"));                      \
    FASTBN_TRY(fastbn__check_pointer(func, dx, "dx"));                                        \
    FASTBN_TRY(fastbn__check_batch(func, outer, inner));                                      \
    int64_t act = fastbn__activation(func, activation);                                       \
    if (act < 0)                                                                              \
        return FASTBN_ERR_INVALID_ARGUMENT;                                                   \
    if (act == RELU && y == NULL) {                                                           \
        fastbn__set_error("%s: y (the forward's output) must not be NULL with "               \
                          "FASTBN_ACT_RELU", func);                                           \
        return FASTBN_ERR_INVALID_ARGUMENT;                                                   \
    }                                                                                         \
    if (dresidual != NULL && dresidual == dx) {                                               \
        fastbn__set_error("%s: dx and dresidual must be different buffers", func);            \
        return FASTBN_ERR_INVALID_ARGUMENT;                                                   \
    }                                                                                         \
    if (channels == 0)                                                                        \
        return FASTBN_OK;                                                                     \
    int64_t flags = FASTBN_FLAG(weight, HAS_WEIGHT) | FASTBN_FLAG(dweight, HAS_DWEIGHT)       \
        | FASTBN_FLAG(dbias, HAS_DBIAS) | FASTBN_FLAG(dresidual, HAS_DRESIDUAL) | act;        \
    int32_t rc;                                                                               \
    FASTBN_CALL(rc, 2 * total * (int64_t)sizeof(REAL),                                        \
                ((fastbn__bwd_##SUFFIX)fastbn__entries[BWD])(                                 \
        outer, channels, inner, dy, x, save_mean, save_invstd, weight, dx, dweight, dbias,    \
        y, dresidual, flags, nthreads));                                                      \
    return fastbn__entry_status(func, rc);                                                    \
}                                                                                             \
                                                                                              \
FASTBN_API int fastbn_backward_ex_##SUFFIX(int64_t outer, int64_t channels, int64_t inner,     \
    const REAL *dy, const REAL *x, const REAL *save_mean, const REAL *save_invstd,            \
    const REAL *weight, REAL *dx, REAL *dweight, REAL *dbias, const REAL *residual,           \
    int activation, const REAL *y, REAL *dresidual)                                           \
{                                                                                             \
    (void)residual; /* the backward needs y, not the residual */                              \
    return fastbn__backward_##SUFFIX("fastbn_backward_ex_" #SUFFIX, outer, channels, inner,   \
        dy, x, save_mean, save_invstd, weight, dx, dweight, dbias, activation, y, dresidual); \
}                                                                                             \
                                                                                              \
FASTBN_API int fastbn_backward_##SUFFIX(int64_t outer, int64_t channels, int64_t inner,        \
    const REAL *dy, const REAL *x, const REAL *save_mean, const REAL *save_invstd,            \
    const REAL *weight, REAL *dx, REAL *dweight, REAL *dbias)                                 \
{                                                                                             \
    return fastbn__backward_##SUFFIX("fastbn_backward_" #SUFFIX, outer, channels, inner, dy,  \
        x, save_mean, save_invstd, weight, dx, dweight, dbias, FASTBN_ACT_NONE, NULL, NULL);  \
}                                                                                             \
                                                                                              \
FASTBN_API int fastbn_batch_stats_##SUFFIX(int64_t outer, int64_t channels, int64_t inner,     \
    const REAL *x, double *mean, double *var)                                                 \
{                                                                                             \
    static const char *func = "fastbn_batch_stats_" #SUFFIX;                                  \
    int64_t total, n;                                                                         \
    FASTBN_TRY(fastbn__ready());                                                              \
    FASTBN_TRY(fastbn__check_sizes(func, outer, channels, inner, sizeof(REAL), &total));      \
    FASTBN_TRY(fastbn__check_pointer(func, x, "x"));                                          \
    FASTBN_TRY(fastbn__check_pointer(func, mean, "mean"));                                    \
    FASTBN_TRY(fastbn__check_pointer(func, var, "var"));                                      \
    if (__builtin_mul_overflow(outer, inner, &n) || n < 1) {                                  \
        fastbn__set_error("%s: needs at least 1 value per channel (outer=%lld, inner=%lld)",  \
                          func, (long long)outer, (long long)inner);                          \
        return FASTBN_ERR_INVALID_ARGUMENT;                                                   \
    }                                                                                         \
    if (channels == 0)                                                                        \
        return FASTBN_OK;                                                                     \
    int32_t rc;                                                                               \
    FASTBN_CALL(rc, total * (int64_t)sizeof(REAL),                                            \
                ((fastbn__stats_##SUFFIX)fastbn__entries[STATS])(                             \
        outer, channels, inner, x, mean, var, 0, nthreads));                                  \
    return fastbn__entry_status(func, rc);                                                    \
}

FASTBN_DEFINE(float, f32, FWD_F32, INFER_F32, BWD_F32, STATS_F32)
FASTBN_DEFINE(double, f64, FWD_F64, INFER_F64, BWD_F64, STATS_F64)

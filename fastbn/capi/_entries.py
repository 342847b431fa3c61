"""The C entry points: Numba ``@cfunc``s that the C library calls directly.

A call from C never enters Python: ``libfastbn.so`` validates the arguments
in C, then calls one of these compiled functions through its address, which
wraps the raw pointers as arrays and runs the same plans as the Python API
(``fastbn._cpu.kernels.run_*``), so both give the same results for the same
data.  Arguments after the C signature's: ``flags`` (which optional pointers
are not NULL, bits below) and ``nthreads`` (the thread count the element-wise
passes are planned for; reductions follow ``kernels.PLAN_THREADS``, so results
do not depend on it).

These functions are cached with the kernels, in the directory named by a digest
of every source they embed (``fastbn._cache.code_digest``): Numba's cache only
watches the file that defines a function, and these embed the kernels and the
plans' ``MIN_RUN``.
"""

import importlib

import numba
import numpy as np
from numba import carray, types

from .. import _cache, _threads
from .._cpu import backend, kernels

MIN_RUN = kernels.MIN_RUN  # compiled into the entry points

HAS_WEIGHT, HAS_BIAS, HAS_RUNNING_MEAN, HAS_RUNNING_VAR = 1, 2, 4, 8
HAS_SAVE_MEAN, HAS_SAVE_INVSTD, HAS_DWEIGHT, HAS_DBIAS = 16, 32, 64, 128
# the fused epilogues (contract section 6): a residual, ReLU (with the forward's output y
# in the backward), the residual's gradient
HAS_RESIDUAL, RELU, HAS_DRESIDUAL = 256, 512, 1024

# Order of the entry table in the C library (fastbn/capi/shim.c).
NAMES = ("forward_train_f32", "forward_train_f64", "forward_infer_f32", "forward_infer_f64",
         "backward_f32", "backward_f64", "batch_stats_f32", "batch_stats_f64")


@numba.njit  # compiled into the entry points, which are cached themselves
def _per_channel(ptr, channels, given, default):
    """A float64 copy of a per-channel C array, or ``default`` everywhere if not given."""
    out = np.full(channels, default)
    if given:
        src = carray(ptr, (channels,))
        for c in range(channels):
            out[c] = src[c]
    return out


@numba.njit
def _shape_if(flags, bit, outer, channels, inner):
    """The (outer, C, inner) shape of an optional array, (0, 0, 0) when not given."""
    if flags & bit:
        return (outer, channels, inner)
    return (0, 0, 0)


@numba.njit
def _line_offset(a):
    return a.ctypes.data % 64


@numba.njit
def _aligned_like(ref, shape):
    """An uninitialized array of ``ref``'s dtype and ``shape`` that starts at ``ref``'s offset
    within a 64-byte line (two outputs written with streaming stores share their lines)."""
    size = shape[0] * shape[1] * shape[2]
    lanes = 64 // ref.itemsize
    raw = np.empty(size + lanes, ref.dtype)
    start = ((_line_offset(ref) - _line_offset(raw)) % 64) // ref.itemsize
    return raw[start:start + size].reshape(shape)


def _forward_train(outer, channels, inner, x_p, w_p, b_p, eps, momentum, rm_p, rv_p, y_p,
                   sm_p, si_p, res_p, flags, nthreads):
    x = carray(x_p, (outer, channels, inner))
    y = carray(y_p, (outer, channels, inner))
    weight = _per_channel(w_p, channels, flags & HAS_WEIGHT, 1.0)
    bias = _per_channel(b_p, channels, flags & HAS_BIAS, 0.0)
    mean, var, invstd = np.empty(channels), np.empty(channels), np.empty(channels)
    relu = (flags & RELU) != 0
    if flags & HAS_RESIDUAL:
        kernels.run_forward_train(x, weight, bias, np.float64(eps), y, mean, var, invstd,
                                  nthreads, MIN_RUN, carray(res_p, (outer, channels, inner)),
                                  relu)
    else:
        kernels.run_forward_train(x, weight, bias, np.float64(eps), y, mean, var, invstd,
                                  nthreads, MIN_RUN, None, relu)
    kernels.update_running(carray(rm_p, (channels if flags & HAS_RUNNING_MEAN else 0,)),
                           carray(rv_p, (channels if flags & HAS_RUNNING_VAR else 0,)),
                           mean, var, np.float64(outer * inner), np.float64(momentum))
    if flags & HAS_SAVE_MEAN:
        sm = carray(sm_p, (channels,))
        for c in range(channels):
            sm[c] = mean[c]
    if flags & HAS_SAVE_INVSTD:
        si = carray(si_p, (channels,))
        for c in range(channels):
            si[c] = invstd[c]
    return 0


def _forward_infer(outer, channels, inner, x_p, rm_p, rv_p, w_p, b_p, eps, y_p, res_p, flags,
                   nthreads):
    x = carray(x_p, (outer, channels, inner))
    y = carray(y_p, (outer, channels, inner))
    mean = _per_channel(rm_p, channels, True, 0.0)
    var = _per_channel(rv_p, channels, True, 0.0)
    weight = _per_channel(w_p, channels, flags & HAS_WEIGHT, 1.0)
    bias = _per_channel(b_p, channels, flags & HAS_BIAS, 0.0)
    scale = np.empty(channels)
    for c in range(channels):
        scale[c] = kernels._invstd(var[c], np.float64(eps)) * weight[c]
    relu = (flags & RELU) != 0
    if flags & HAS_RESIDUAL:
        kernels.run_affine(x, mean, np.zeros(channels), scale, bias, y, nthreads, MIN_RUN,
                           carray(res_p, (outer, channels, inner)), relu)
    else:
        kernels.run_affine(x, mean, np.zeros(channels), scale, bias, y, nthreads, MIN_RUN, None,
                           relu)
    return 0


def _backward(outer, channels, inner, dy_p, x_p, sm_p, si_p, w_p, dx_p, dw_p, db_p, y_p, dres_p,
              flags, nthreads):
    dy = carray(dy_p, (outer, channels, inner))
    x = carray(x_p, (outer, channels, inner))
    dx = carray(dx_p, (outer, channels, inner))
    mean = _per_channel(sm_p, channels, True, 0.0)
    invstd = _per_channel(si_p, channels, True, 0.0)
    weight = _per_channel(w_p, channels, flags & HAS_WEIGHT, 1.0)
    sum_dy, sum_dy_xmu = np.empty(channels), np.empty(channels)
    dres = carray(dres_p, _shape_if(flags, HAS_DRESIDUAL, outer, channels, inner))
    target = dres
    if dres.size and _line_offset(dres) != _line_offset(dx):
        target = _aligned_like(dx, dres.shape)  # its lines split as dx's: a copy after
    if flags & RELU:
        kernels.run_backward_train(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu,
                                   nthreads, MIN_RUN, carray(y_p, (outer, channels, inner)),
                                   target)
    else:
        kernels.run_backward_train(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu,
                                   nthreads, MIN_RUN, None, target)
    if target.size and target.ctypes.data != dres.ctypes.data:
        dres.reshape(dres.size)[:] = target.reshape(target.size)
    if flags & HAS_DWEIGHT:
        dw = carray(dw_p, (channels,))
        for c in range(channels):
            dw[c] = sum_dy_xmu[c] * invstd[c]
    if flags & HAS_DBIAS:
        db = carray(db_p, (channels,))
        for c in range(channels):
            db[c] = sum_dy[c]
    return 0


def _batch_stats(outer, channels, inner, x_p, mean_p, var_p, flags, nthreads):
    """Per-channel mean and biased variance (float64), the Python API's ``batch_stats``."""
    x = carray(x_p, (outer, channels, inner))
    mean = carray(mean_p, (channels,))
    var = carray(var_p, (channels,))
    n = kernels.channel_moments_any_path(x, mean, var, MIN_RUN)
    for c in range(channels):
        var[c] /= n
    return 0


def _signatures(real):
    p = types.CPointer(real)
    d = types.CPointer(types.float64)
    i64 = types.int64
    return {
        "forward_train": types.int32(i64, i64, i64, p, p, p, real, real, p, p, p, p, p, p, i64,
                                     i64),
        "forward_infer": types.int32(i64, i64, i64, p, p, p, p, p, real, p, p, i64, i64),
        "backward": types.int32(i64, i64, i64, p, p, p, p, p, p, p, p, p, p, i64, i64),
        "batch_stats": types.int32(i64, i64, i64, p, d, d, i64, i64),
    }


def cache_dir():
    """Where the entry points are cached: with every kernel, in the directory named by a
    digest of the sources they embed (``fastbn._cache.kernel_cache_dir``; this file and
    the plans' constants among them); None if there is none."""
    return _cache.kernel_cache_dir()


def _cfunc(impl, signature, cached):
    """``cfunc(signature, cache=cached, nogil=True)(impl)``, with fastbn's guarded cache,
    not compiled yet."""
    from numba.core import sigutils
    from numba.core.ccallback import CFunc

    # what numba.cfunc does, with the cache guarded between creation and compilation
    _cache.mark(impl)
    compiled = CFunc(impl, sigutils.normalize_signature(signature), locals={},
                     options={"nogil": True})
    if cached:
        compiled.enable_caching()
        _cache.guard(compiled)
    return compiled


def _compile(impl, signature, cached):
    """``_cfunc``, compiled (or loaded from the cache)."""
    compiled = _cfunc(impl, signature, cached)
    compiled.compile()
    return compiled


def _in_cache(compiled):
    """Whether ``compiled`` (a CFunc) will load from the disk cache (Numba's private
    interface; False when it cannot tell)."""
    cache = getattr(compiled, "_cache", None)
    try:
        return cache is not None and cache.load_overload(
            compiled._sig, compiled._targetdescr.target_context) is not None
    except Exception:
        return False


def compile_entries():
    """``{name: cfunc}`` for every entry point, loaded from (or compiled into) the cache."""
    from numba.np.ufunc.parallel import _launch_threads

    # The entry points' parallel regions link against the threading layer's
    # symbols, and a region started from C needs the layer loaded: load it first.
    _launch_threads()
    cached = cache_dir() is not None
    pending = {}
    for suffix, real in (("f32", types.float32), ("f64", types.float64)):
        sigs = _signatures(real)
        for op, impl in (("forward_train", _forward_train), ("forward_infer", _forward_infer),
                         ("backward", _backward), ("batch_stats", _batch_stats)):
            pending[f"{op}_{suffix}"] = _cfunc(impl, sigs[op], cached)
    if not all(_in_cache(c) for c in pending.values()):
        # Compile every kernel the entries reach as plain jitted functions first, and let
        # the entries link those.  A kernel first compiled inside a cfunc's compilation
        # and cached poisons the cache: a kernel compiled later in another process that
        # links the cached copy is cached without it, and segfaults when the process after
        # that loads it (seen: `python -m fastbn.capi build`, then two Python runs).
        for dtype in (np.float32, np.float64):
            backend.backend.compile_kernels(dtype, epilogues=True)
    for compiled in pending.values():
        compiled.compile()
    return pending


class _CLock:
    """The C library's serial mutex, as a lock for the Python API (workqueue layer): one
    lock for every caller in the process, C or Python."""

    def __init__(self, lib):
        self._lib = lib

    def acquire(self):
        self._lib.fastbn__serial_lock()
        return True

    def release(self):
        self._lib.fastbn__serial_unlock()


_LAYER_MODULES = {"tbb": "tbbpool", "omp": "omppool", "workqueue": "workqueue"}


def register(ffi, lib):
    """Hand the entry points and the thread count to the C library (its init code calls this)."""
    entries = compile_entries()
    for index, name in enumerate(NAMES):
        lib.fastbn__register_entry(index, ffi.cast("void *", entries[name].address))
    # workqueue aborts on concurrent use: then the C library serializes calls, and the
    # Python API in this process takes the same mutex
    layer = numba.threading_layer()
    lib.fastbn__set_threads(numba.config.NUMBA_NUM_THREADS, int(layer == "workqueue"))
    # small calls run on the calling thread, as in Python: the layer's own thread mask
    pool = importlib.import_module(f"numba.np.ufunc.{_LAYER_MODULES[layer]}")
    lib.fastbn__set_small_calls(_threads.SERIAL_MAX_BYTES,
                                ffi.cast("void *", pool.set_num_threads),
                                ffi.cast("void *", pool.get_num_threads))
    backend._SerialLock.use_lock(_CLock(lib))
    _alive.update(entries)  # the addresses stay valid while the cfuncs live
    return entries


_alive = {}

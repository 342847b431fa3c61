"""CUDA backend: the functional API on device arrays (CONTRACT section 2, "CUDA").

Imported only when a call receives device arrays, so ``import fastbn`` never
needs numba-cuda, CUDA or a GPU.  Arguments are validated before the first
launch (nothing is written on a bad call), data stay on the device, and
results come back as the input's array type (CuPy in, CuPy out; torch in,
torch out; otherwise Numba device arrays).

Work arrays are float32 for float16/float32 input and float64 otherwise, as
on the CPU; float16 and integer input go through a converted copy.
"""

import math

import numba
import numpy as np
from numba import cuda

from .. import _validate as v
from . import kernels as k

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
# The simulator runs every thread as a Python thread: keep launches tiny there.
THREADS = 32 if SIMULATOR else k.THREADS
MAX_BLOCKS = 4 if SIMULATOR else 4096
TARGET_BLOCKS = 4 if SIMULATOR else 1024  # reduction blocks to aim for (C x parts)
FLOATS = (np.float16, np.float32, np.float64)


# ----------------------------------------------------------------- arrays

def is_device_array(a):
    """True for objects with ``__cuda_array_interface__`` and Numba device arrays."""
    if a is None or type(a) is np.ndarray:
        return False
    return hasattr(a, "__cuda_array_interface__") or type(a).__module__.startswith("numba.cuda")


def _numba_view(a):
    if type(a).__module__.startswith("numba.cuda"):
        return a
    return cuda.as_cuda_array(a)


def _wrap(result, like):
    """``result`` (a Numba device array) as the array type of ``like``, sharing memory."""
    module = type(like).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy.asarray(result)
    if module.startswith("torch"):
        import torch

        return torch.as_tensor(result, device=like.device)
    return result


def _work_dtype(dtype):
    return np.dtype(np.float32) if dtype in (np.float16, np.float32) else np.dtype(np.float64)


def _blocks(total):
    return max(1, min(MAX_BLOCKS, -(-total // THREADS)))


def _cast(src, dtype):
    """A C-contiguous copy of device array ``src`` converted to ``dtype`` (same shape)."""
    dst = cuda.device_array(src.shape, dtype=dtype)
    if src.size:
        k.cast[_blocks(src.size), THREADS](src.reshape(src.size), dst.reshape(dst.size))
    return dst


def _filled(n, value):
    a = cuda.device_array(n, dtype=np.float64)
    if n:
        k.fill[_blocks(n), THREADS](a, value)
    return a


class _Input:
    """A validated device array: its Numba view, shape, dtype and channel axis."""

    def __init__(self, a, name, axis=None):
        d = _numba_view(a)
        if d.dtype.kind not in "biu" and d.dtype not in FLOATS:
            raise TypeError(f"{name} has unsupported dtype {d.dtype}: expected float16, "
                            "float32, float64, an integer or bool dtype")
        if d.ndim == 0:
            raise ValueError(f"{name} must have at least 1 dimension, got a 0-d array")
        if not d.is_c_contiguous():
            raise ValueError(f"{name}: device arrays must be C-contiguous (make a contiguous "
                             "copy on the device first)")
        self.original, self.d, self.shape, self.dtype = a, d, tuple(d.shape), np.dtype(d.dtype)
        if axis is not None:
            self.axis = v.channel_axis(axis, d.ndim)
            self.channels = self.shape[self.axis]
            self.shape3 = (math.prod(self.shape[:self.axis]), self.channels,
                           math.prod(self.shape[self.axis + 1:]))

    def work3(self, dtype):
        """The (outer, C, inner) view in ``dtype``: a view, or a converted copy."""
        d = self.d if self.dtype == dtype else _cast(self.d, dtype)
        return d.reshape(self.shape3)


def _per_channel(a, name, channels, default=None):
    """A float64 device copy of a per-channel device vector, or ``default`` filled."""
    if a is None:
        return None if default is None else _filled(channels, default)
    if not is_device_array(a):
        raise TypeError(f"{name} is a host array, but x is a CUDA device array")
    d = _numba_view(a)
    if d.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real array, got dtype {d.dtype}")
    if tuple(d.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(d.shape)}")
    return _cast(d, np.float64)


def _running(a, name, channels):
    if a is None:
        return cuda.device_array(0, dtype=np.float64)
    d = _numba_view(a)
    if d.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must have dtype float32 or float64, got {d.dtype}")
    if tuple(d.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(d.shape)}")
    return d


def _out(out, shape, dtype):
    if out is None:
        return None
    d = _numba_view(out)
    if tuple(d.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(d.shape)}")
    if d.dtype != dtype:
        raise ValueError(f"out must have dtype {dtype}, got {d.dtype}")
    if not d.is_c_contiguous():
        raise ValueError("out: device arrays must be C-contiguous")
    return d


def _parts(shape3):
    outer, channels, inner = shape3
    n = outer * inner
    want = max(1, -(-TARGET_BLOCKS // max(channels, 1)))
    return int(max(1, min(want, -(-n // (THREADS * 4)), 65535)))


def _result(work3, out_d, shape, out_dtype):
    """Deliver ``work3`` (work dtype) as the output array: ``out`` or a new array."""
    if out_d is None:
        if work3.dtype == out_dtype:
            return work3.reshape(shape)
        return _cast(work3, out_dtype).reshape(shape)
    if work3.dtype != out_dtype:
        k.cast[_blocks(work3.size), THREADS](work3.reshape(work3.size), out_d.reshape(out_d.size))
    return out_d


def _output_work(out_d, shape3, wd):
    """Where kernels write: ``out`` itself when it has the work dtype, else a temporary."""
    if out_d is not None and out_d.dtype == wd:
        return out_d.reshape(shape3)
    return cuda.device_array(shape3, dtype=wd)


class CUDABackend:
    name = "cuda"
    device = True

    # ----------------------------------------------------------------- statistics
    def _moments(self, x3):
        """Per-(channel, part) moments of ``x3``; returns the (count, mean_rel, m2) arrays."""
        channels = x3.shape[1]
        nparts = _parts(x3.shape)
        count = cuda.device_array((channels, nparts))
        mean_rel = cuda.device_array((channels, nparts))
        m2 = cuda.device_array((channels, nparts))
        k.partial_moments[(channels, nparts), THREADS](x3, nparts, count, mean_rel, m2)
        return count, mean_rel, m2

    def batch_norm_forward(self, x, weight, bias, axis, eps, running_mean, running_var,
                           momentum, out):
        xi = _Input(x, "x", axis)
        c = xi.channels
        out_dtype, stats_dtype = v.output_dtype(xi.dtype), v.stats_dtype(xi.dtype)
        w = _per_channel(weight, "weight", c, 1.0)
        b = _per_channel(bias, "bias", c, 0.0)
        eps = v.real_scalar(eps, "eps", low=0.0)
        momentum = v.real_scalar(momentum, "momentum", low=0.0, high=1.0)
        rm = _running(running_mean, "running_mean", c)
        rv = _running(running_var, "running_var", c)
        out_d = _out(out, xi.shape, out_dtype)
        n = v.require_training_batch(xi.shape, xi.axis)

        wd = _work_dtype(out_dtype)
        x3 = xi.work3(wd)
        y3 = _output_work(out_d, xi.shape3, wd)
        mean, var, inv = (cuda.device_array(c) for _ in range(3))
        if c:
            if wd == np.float32 and n <= k.FUSED_MAX_VALUES:
                k.fused_forward[c, THREADS](x3, w, b, eps, y3, mean, var, inv)
            else:
                count, mean_rel, m2 = self._moments(x3)
                params = cuda.device_array((c, 4), dtype=wd)
                k.finish_forward[_blocks(c), THREADS](x3, count, mean_rel, m2, w, b, eps, mean,
                                                      var, inv, params)
                k.affine[_blocks(x3.size), THREADS](x3, params, y3)
            if rm.shape[0] or rv.shape[0]:
                k.update_running[_blocks(c), THREADS](rm, rv, mean, var, float(n), momentum)
        y = _result(y3, out_d, xi.shape, out_dtype)
        return (out if out is not None else _wrap(y, x),
                _wrap(_cast(mean, stats_dtype), x), _wrap(_cast(inv, stats_dtype), x))

    def batch_norm_inference(self, x, running_mean, running_var, weight, bias, axis, eps, out):
        xi = _Input(x, "x", axis)
        c = xi.channels
        out_dtype = v.output_dtype(xi.dtype)
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required in inference")
        rm = _per_channel(running_mean, "running_mean", c)
        rv = _per_channel(running_var, "running_var", c)
        w = _per_channel(weight, "weight", c, 1.0)
        b = _per_channel(bias, "bias", c, 0.0)
        eps = v.real_scalar(eps, "eps", low=0.0)
        out_d = _out(out, xi.shape, out_dtype)

        wd = _work_dtype(out_dtype)
        x3 = xi.work3(wd)
        y3 = _output_work(out_d, xi.shape3, wd)
        if x3.size:
            params = cuda.device_array((c, 4), dtype=wd)
            k.inference_params[_blocks(c), THREADS](rm, rv, w, b, eps, params)
            k.affine[_blocks(x3.size), THREADS](x3, params, y3)
        y = _result(y3, out_d, xi.shape, out_dtype)
        return out if out is not None else _wrap(y, x)

    def batch_norm_backward(self, dy, x, mean, invstd, weight, axis, out):
        xi = _Input(x, "x", axis)
        gi = _Input(dy, "dy")
        if gi.shape != xi.shape:
            raise ValueError(f"dy and x must have the same shape, got {gi.shape} and {xi.shape}")
        gi.axis, gi.channels, gi.shape3 = xi.axis, xi.channels, xi.shape3
        c = xi.channels
        out_dtype = np.result_type(v.output_dtype(gi.dtype), v.output_dtype(xi.dtype))
        stats_dtype = v.stats_dtype(out_dtype)
        if mean is None or invstd is None:
            raise ValueError("mean and invstd are required: pass the ones batch_norm_forward returned")
        mu = _per_channel(mean, "mean", c)
        inv = _per_channel(invstd, "invstd", c)
        w = _per_channel(weight, "weight", c, 1.0)
        out_d = _out(out, xi.shape, out_dtype)
        n = v.require_training_batch(xi.shape, xi.axis)

        wd = _work_dtype(out_dtype)
        x3, g3 = xi.work3(wd), gi.work3(wd)
        d3 = _output_work(out_d, xi.shape3, wd)
        sum_dy, sum_dy_xmu = cuda.device_array(c), cuda.device_array(c)
        if c:
            nparts = _parts(xi.shape3)
            s, sx = cuda.device_array((c, nparts)), cuda.device_array((c, nparts))
            k.partial_grad_sums[(c, nparts), THREADS](g3, x3, mu, nparts, s, sx)
            params = cuda.device_array((c, 5), dtype=wd)
            k.finish_backward[_blocks(c), THREADS](s, sx, mu, inv, w, float(n), sum_dy,
                                                   sum_dy_xmu, params)
            k.dx[_blocks(x3.size), THREADS](g3, x3, params, d3)
        dweight = cuda.device_array(c)
        if c:
            k.multiply[_blocks(c), THREADS](sum_dy_xmu, inv, dweight)
        result = _result(d3, out_d, xi.shape, out_dtype)
        like = x
        return (out if out is not None else _wrap(result, like),
                _wrap(_cast(dweight, stats_dtype), like), _wrap(_cast(sum_dy, stats_dtype), like))

    def batch_stats(self, x, axis, ddof):
        xi = _Input(x, "x", axis)
        c = xi.channels
        stats_dtype = v.stats_dtype(xi.dtype)
        n = v.channel_count(xi.shape, xi.axis)
        mean, var = cuda.device_array(c), cuda.device_array(c)
        if c and n:
            x3 = xi.work3(_work_dtype(v.output_dtype(xi.dtype)))
            count, mean_rel, m2 = self._moments(x3)
            k.finish_stats[_blocks(c), THREADS](x3, count, mean_rel, m2, float(ddof), mean, var)
        elif c:
            k.fill[_blocks(c), THREADS](mean, math.nan)
            k.fill[_blocks(c), THREADS](var, math.nan)
        return n, _wrap(_cast(mean, stats_dtype), x), _wrap(_cast(var, stats_dtype), x)


backend = CUDABackend()

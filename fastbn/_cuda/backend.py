"""CUDA backend: the functional API on device arrays (docs/contract.md section 2, "CUDA").

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
from .._layout import Layout
from . import kernels as k

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
# The simulator runs every thread as a Python thread: keep launches tiny there.
THREADS = 32 if SIMULATOR else k.THREADS
MAX_BLOCKS = 4 if SIMULATOR else 4096
TARGET_BLOCKS = 4 if SIMULATOR else 1024  # reduction blocks to aim for (C x parts)


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


def _stand_in(d):
    """A NumPy array with ``d``'s shape, dtype and strides, never read: for ``Layout``."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, d.dtype), d.shape, d.strides)


def _flipped_axes(index):
    return [ax for ax, sl in enumerate(index) if sl.step == -1]


def _view(d, order, flips):
    """``d.transpose(order)`` with the axes ``flips`` (numbered after the transpose)
    reversed: a view sharing ``d``'s memory."""
    if SIMULATOR:
        t = d.transpose(order)
        return t[tuple(slice(None, None, -1) if ax in flips else slice(None)
                       for ax in range(t.ndim))]
    cai = d.__cuda_array_interface__
    ptr = cai["data"][0]
    shape = [d.shape[a] for a in order]
    strides = [d.strides[a] for a in order]
    for ax in flips:
        if shape[ax] > 0:
            ptr += (shape[ax] - 1) * strides[ax]
        strides[ax] = -strides[ax]
    desc = {"shape": tuple(shape), "strides": tuple(strides), "data": (ptr, False),
            "typestr": cai["typestr"], "version": 2}
    return cuda.from_cuda_array_interface(desc, owner=d, sync=False)


def _transformed(d, layout):
    """``layout.transformed`` for a device array."""
    flips = _flipped_axes(layout.index)
    return _view(d, layout.order, [pos for pos, ax in enumerate(layout.order) if ax in flips])


def _untransformed(t, layout):
    """``layout.untransformed`` for a device array of shape ``layout.tshape``."""
    return _view(t, tuple(int(a) for a in np.argsort(layout.order)), _flipped_axes(layout.index))


class _Input:
    """A validated device array: its Numba view, shape, dtype, channel axis and layout.

    Like the CPU backend, any strides work when a permutation and flips of the
    non-channel axes make the array contiguous (channels-last tensors, transposed
    or reversed views); kernels then see a C-contiguous (outer, C, inner) view
    without a copy.  Other strides (gaps between elements) are refused.
    """

    def __init__(self, a, name, axis=None, layout=None):
        d = _numba_view(a)
        v.check_input(name, d.dtype, d.ndim)
        self.original, self.d, self.shape, self.dtype = a, d, tuple(d.shape), np.dtype(d.dtype)
        self.name, self.ndim, self.size = name, d.ndim, math.prod(self.shape)
        if axis is not None:
            self.at_axis(v.channel_axis(axis, d.ndim), layout)

    def at_axis(self, axis, layout=None):
        """Take channel axis ``axis`` (normalized): the layout (``layout``, that of the
        array this one must match, or found from the strides) and the canonical view."""
        self.axis = axis
        self.channels = self.shape[axis]
        self.layout = layout or Layout.of(_stand_in(self.d), axis)
        self.shape3 = self.layout.shape3
        self.view3 = _canonical_view(self.d, self.layout)
        if self.view3 is None:
            raise ValueError(f"{self.name}: this device array's strides leave gaps between its "
                             "elements; make a contiguous copy on the device first")
        return self

    def work3(self, dtype):
        """The C-contiguous (outer, C, inner) view in ``dtype``: a view, or a converted copy."""
        if self.dtype == dtype:
            return self.view3
        return _cast(self.view3, dtype)

    def new(self, dtype):
        """(work view (outer, C, inner), caller-facing array laid out like the input)."""
        t = cuda.device_array(self.layout.tshape, dtype=dtype)
        return t.reshape(self.shape3), _untransformed(t, self.layout)


def _canonical_view(d, layout):
    """The C-contiguous (outer, C, inner) view of ``d`` in ``layout``, or None."""
    t = layout.transformed(_stand_in(d))
    if not t.flags.c_contiguous:
        return None
    view = d if layout.order == tuple(range(d.ndim)) and not _flipped_axes(layout.index) \
        else _transformed(d, layout)
    return view.reshape(layout.shape3)


def _per_channel(a, name, channels):
    """A float64 device copy of a per-channel device vector (None stays None)."""
    if a is None:
        return None
    if not is_device_array(a):
        raise TypeError(f"{name} is a host array, but x is a CUDA device array")
    d = _numba_view(a)
    v.check_per_channel(name, d.dtype, d.shape, channels)
    return _cast(d, np.float64)


def _running(a, name, channels):
    if a is None:
        return None
    d = _numba_view(a)
    v.check_running_stat(name, d.dtype, d.shape, channels)
    return d


def _out(out, xi, dtype):
    """``out`` as a C-contiguous (outer, C, inner) view in the input's layout."""
    if out is None:
        return None
    d = _numba_view(out)
    v.check_out("out", d.shape, d.dtype, xi.shape, dtype)
    view = _canonical_view(d, xi.layout)
    if view is None:
        raise ValueError("out must be laid out like x in device memory (same strides order)")
    return view


class _OutArg:
    """A validated ``out``: what the caller passed, and its canonical (outer, C, inner) view."""

    def __init__(self, out, view3):
        self.out, self.view3 = out, view3


class DeviceArrays:
    """The call descriptions' view of device arrays (``fastbn._validate.HostArrays``'s
    methods, on device arrays, under the same rules)."""

    device = True

    def input(self, value, name):
        return _Input(value, name)

    def at_axis(self, a, axis, like=None):
        return a.at_axis(axis, like.layout if like is not None else None)

    def per_channel(self, value, name, channels):
        return _per_channel(value, name, channels)

    def running(self, value, name, channels):
        return _running(value, name, channels)

    def out(self, value, x, dtype, name="out"):
        view3 = _out(value, x, dtype)
        return None if view3 is None else _OutArg(value, view3)

    def filled(self, channels, value):
        return _filled(channels, value)


def _parts(shape3):
    outer, channels, inner = shape3
    n = outer * inner
    want = max(1, -(-TARGET_BLOCKS // max(channels, 1)))
    return int(max(1, min(want, -(-n // (THREADS * 4)), 65535)))


class _Output:
    """Where kernels write (``y3``, work dtype) and what the caller gets (``result``)."""

    def __init__(self, xi, out, out3, out_dtype, wd):
        self.out, self.out3, self.out_dtype = out, out3, out_dtype
        if out3 is not None and out3.dtype == wd:
            self.y3 = out3
        else:
            self.y3 = cuda.device_array(xi.shape3, dtype=wd)
        self.xi = xi

    def finish(self, like):
        if self.out3 is not None:
            if self.y3 is not self.out3:
                k.cast[_blocks(self.y3.size), THREADS](self.y3.reshape(self.y3.size),
                                                       self.out3.reshape(self.out3.size))
            return self.out
        y3 = self.y3 if self.y3.dtype == self.out_dtype else _cast(self.y3, self.out_dtype)
        return _wrap(_untransformed(y3.reshape(self.xi.layout.tshape), self.xi.layout), like)


class CUDABackend:
    """The device ops: the host backends' names (``fastbn._cpu.calls``), on the same
    validated call descriptions, built by ``fastbn._validate`` with ``arrays``."""

    name = "cuda"
    device = True
    arrays = DeviceArrays()

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

    def batch_norm_forward(self, a, n):
        """``(y, mean, invstd)`` of a training forward (``fastbn._validate.forward_args``)
        over ``n`` values per channel; the running statistics updated."""
        xi, c = a.x, a.channels
        out, out3 = (a.out.out, a.out.view3) if a.out is not None else (None, None)
        rm = a.running_mean if a.running_mean is not None else cuda.device_array(0)
        rv = a.running_var if a.running_var is not None else cuda.device_array(0)
        w, b, eps = a.weight, a.bias, a.eps
        wd = _work_dtype(a.out_dtype)
        x3 = xi.work3(wd)
        dest = _Output(xi, out, out3, a.out_dtype, wd)
        y3 = dest.y3
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
                k.update_running[_blocks(c), THREADS](rm, rv, mean, var, float(n), a.momentum)
        x = xi.original
        return (dest.finish(x), _wrap(_cast(mean, a.stats_dtype), x),
                _wrap(_cast(inv, a.stats_dtype), x))

    def batch_norm_inference(self, a):
        """``y`` of an inference forward (``fastbn._validate.inference_args``)."""
        xi, c = a.x, a.channels
        out, out3 = (a.out.out, a.out.view3) if a.out is not None else (None, None)
        wd = _work_dtype(a.out_dtype)
        x3 = xi.work3(wd)
        dest = _Output(xi, out, out3, a.out_dtype, wd)
        if x3.size:
            params = cuda.device_array((c, 4), dtype=wd)
            k.inference_params[_blocks(c), THREADS](a.running_mean, a.running_var, a.weight,
                                                    a.bias, a.eps, params)
            k.affine[_blocks(x3.size), THREADS](x3, params, dest.y3)
        return dest.finish(xi.original)

    def batch_norm_backward(self, a, n):
        """``(dx, dweight, dbias)`` of a training backward (``fastbn._validate.backward_args``)
        over ``n`` values per channel."""
        xi, gi, c = a.x, a.dy, a.channels
        out, out3 = (a.out.out, a.out.view3) if a.out is not None else (None, None)
        out_dtype, stats_dtype = a.out_dtype, a.stats_dtype
        mu, inv, w = a.mean, a.invstd, a.weight

        wd = _work_dtype(out_dtype)
        x3, g3 = xi.work3(wd), gi.work3(wd)
        dest = _Output(xi, out, out3, out_dtype, wd)
        d3 = dest.y3
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
        x = xi.original
        return (dest.finish(x), _wrap(_cast(dweight, stats_dtype), x),
                _wrap(_cast(sum_dy, stats_dtype), x))

    def batch_stats(self, a):
        """``(count, mean, var)`` (``fastbn._validate.stats_args``); NaN for an empty batch."""
        xi, c, n = a.x, a.channels, a.count
        mean, var = cuda.device_array(c), cuda.device_array(c)
        if c and n:
            x3 = xi.work3(_work_dtype(v.output_dtype(xi.dtype)))
            count, mean_rel, m2 = self._moments(x3)
            k.finish_stats[_blocks(c), THREADS](x3, count, mean_rel, m2, float(a.ddof), mean,
                                                var)
        elif c:
            k.fill[_blocks(c), THREADS](mean, math.nan)
            k.fill[_blocks(c), THREADS](var, math.nan)
        x = xi.original
        return n, _wrap(_cast(mean, a.stats_dtype), x), _wrap(_cast(var, a.stats_dtype), x)

    # ----------------------------------------------------------------- data normalization
    def _feature_stats(self, xi, x3):
        channels = xi.channels
        nparts = _parts(xi.shape3)
        arrays = [cuda.device_array((channels, nparts)) for _ in range(5)]
        k.partial_feature_stats[(channels, nparts), THREADS](x3, nparts, *arrays)
        return arrays

    def _normalize(self, x, axis, out, make_params, clip=None, width=4, kernel=k.affine):
        xi = _Input(x, "x", axis)
        c = xi.channels
        out_dtype = v.output_dtype(xi.dtype)
        out3 = _out(out, xi, out_dtype)
        wd = _work_dtype(out_dtype)
        x3 = xi.work3(wd)
        dest = _Output(xi, out, out3, out_dtype, wd)
        if x3.size:
            params = cuda.device_array((c, width), dtype=wd)
            make_params(xi, x3, params)
            kernel[_blocks(x3.size), THREADS](x3, params, dest.y3)
            if clip is not None:
                flat = dest.y3.reshape(dest.y3.size)
                k.clip[_blocks(flat.size), THREADS](flat, clip[0], clip[1])
        return dest.finish(x)

    def standardize(self, x, axis, out):
        def params(xi, x3, p):
            count, mean_rel, m2, _, _ = self._feature_stats(xi, x3)
            k.standardize_params[_blocks(xi.channels), THREADS](x3, count, mean_rel, m2, p)
        return self._normalize(x, axis, out, params)

    def minmax_scale(self, x, axis, feature_range, out, clip=False):
        low, high = feature_range

        def params(xi, x3, p):
            _, _, _, vmin, vmax = self._feature_stats(xi, x3)
            k.minmax_params[_blocks(xi.channels), THREADS](vmin, vmax, low, high, p)
        return self._normalize(x, axis, out, params, (low, high) if clip else None, width=7,
                               kernel=k.two_sided)


backend = CUDABackend()

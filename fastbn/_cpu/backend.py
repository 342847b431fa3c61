"""CPU backend: canonical layouts, kernel selection and the bits of NumPy around them.

Arguments arrive validated by ``fastbn.api``: ``x`` and ``dy`` are ndarrays of a
supported dtype, per-channel vectors are float64 of length C.  Every method
returns float64 per-channel results; the API casts them to the stats dtype.
"""

import threading

import numba
import numpy as np

from .. import _moments
from .._layout import Layout, Output
from . import kernels

# A channel whose contiguous runs are shorter than this is reduced row-wise
# over a (rows, C * inner) view instead: short runs defeat vectorization.
MIN_RUN = 64
# Column path: rows per chunk so that a chunk stays in L1/L2.
CHUNK_VALUES = 16384
# Channel path: a group of neighbouring channels is read as one long stream, then
# re-read from cache to normalize; keep a group within this many bytes of input.
GROUP_BYTES = 8 << 20
MAX_GROUP = 16
# Below this many values, a part of a channel is not worth its own task.
MIN_PART_VALUES = 16384

_serial = threading.Lock()


class _KernelGuard:
    """Serialize kernel calls under Numba's workqueue layer, which is not thread-safe.

    The layer is only known after the first parallel call, which therefore runs
    under the lock too.  A class, not a generator: this sits on every call's path.
    """

    layer = None

    def __enter__(self):
        if self.layer is None or self.layer == "workqueue":
            _serial.acquire()
            self._locked = True
        else:
            self._locked = False

    def __exit__(self, *exc):
        if self._locked:
            if _KernelGuard.layer is None:
                try:
                    _KernelGuard.layer = numba.threading_layer()
                except ValueError:
                    pass
            _serial.release()
        return False


def _kernel_guard():
    return _KernelGuard()


def work_dtype(dtype):
    """Kernels run on float32 or float64; float16 goes through float32, integers through float64."""
    return np.dtype(np.float32) if dtype in (np.float16, np.float32) else np.dtype(np.float64)


def channel_plan(shape3, bytes_per_value, nthreads):
    """``(group, nparts)`` for the channel path: channels per task, parts per channel.

    Fused (``nparts == 1``) when there are enough groups to keep every thread
    busy; otherwise channels are also split along ``outer`` and normalized in a
    second pass.
    """
    outer, channels, inner = shape3
    channel_bytes = max(1, outer * inner * bytes_per_value)
    group = max(1, min(MAX_GROUP, channels // (2 * nthreads), GROUP_BYTES // channel_bytes))
    ngroups = -(-channels // group)
    if ngroups >= 2 * nthreads or nthreads == 1:
        return group, 1
    nparts = min(-(-2 * nthreads // ngroups), outer, max(1, outer * inner // MIN_PART_VALUES))
    return group, int(max(1, nparts))


def _column_blocks(rows, nthreads):
    return int(max(1, min(nthreads, rows)))


def _run_blocks(shape3):
    """Tasks for an element-wise pass over the (outer, C) runs: a few per thread."""
    return int(max(1, min(4 * numba.get_num_threads(), shape3[0] * shape3[1])))


def _chunk_rows(width):
    return int(max(4, CHUNK_VALUES // max(width, 1)))


def _shift(x3):
    """Per-channel shift for the moments: each channel's first value."""
    return x3[0, :, 0].astype(np.float64)


class CPUBackend:
    name = "cpu"

    # ----------------------------------------------------------------- statistics
    def _moments3(self, x3):
        """Count, mean (hi + lo, float64) and M2 per channel."""
        outer, channels, inner = x3.shape
        nthreads = numba.get_num_threads()
        if self._column_path(x3):
            mean, var, unused = np.empty(channels), np.empty(channels), np.zeros(channels)
            with _kernel_guard():
                kernels.column_forward(x3.reshape(outer, -1), inner,
                                       _column_blocks(outer, nthreads), _chunk_rows(channels * inner),
                                       False, unused, unused, 0.0, x3.reshape(outer, -1), mean, var,
                                       np.empty(channels))
            return float(outer * inner), mean, np.zeros(channels), var * (outer * inner)
        shift = _shift(x3)
        group, nparts = channel_plan(x3.shape, x3.itemsize, nthreads)
        count = np.empty((channels, nparts))
        mean_rel = np.empty((channels, nparts))
        m2 = np.empty((channels, nparts))
        with _kernel_guard():
            kernels.channel_moments(x3, shift, group, nparts, count, mean_rel, m2)
        n, mu, q = _moments.merge_moments(count, mean_rel, m2, axis=1)
        hi, lo = _moments.two_sum(shift, mu)
        return n, hi, lo, q

    def moments(self, x, axis, dtype):
        """``(count, mean, m2)`` per channel of a non-empty ``x`` computed in ``dtype`` (float64)."""
        layout = Layout.of(x, axis)
        x3 = layout.work3(x, work_dtype(dtype))
        n, hi, lo, m2 = self._moments3(x3)
        return n, hi + lo, m2

    # ----------------------------------------------------------------- forward
    def forward_train(self, x, axis, weight, bias, eps, out, out_dtype):
        """Batch statistics and ``y``, fused in one call where the plan allows.

        Returns ``(y, mean, var, invstd)``, statistics in float64.
        """
        layout = Layout.of(x, axis)
        wd = work_dtype(out_dtype)
        x3 = layout.work3(x, wd)
        dest = Output(layout, out, out_dtype, wd, [x3])
        outer, channels, inner = x3.shape
        nthreads = numba.get_num_threads()
        mean, var, inv = np.empty(channels), np.empty(channels), np.empty(channels)
        if self._column_path(x3):
            with _kernel_guard():
                kernels.column_forward(x3.reshape(outer, -1), inner,
                                       _column_blocks(outer, nthreads), _chunk_rows(channels * inner),
                                       True, weight, bias, float(eps), dest.y3.reshape(outer, -1),
                                       mean, var, inv)
            return dest.finish(), mean, var, inv
        group, nparts = channel_plan(x3.shape, x3.itemsize, nthreads)
        if nparts == 1:
            with _kernel_guard():
                kernels.channel_forward(x3, group, weight, bias, float(eps),
                                        dest.y3, mean, var, inv)
            return dest.finish(), mean, var, inv
        n, hi, lo, m2 = self._moments3(x3)
        var = m2 / n
        inv = _moments.invstd(var, eps)
        self._affine3(x3, hi, lo, inv * weight, bias, dest.y3)
        return dest.finish(), hi + lo, var, inv

    def affine(self, x, axis, mean, scale, shift, out, out_dtype):
        """``y = (x - mean) * scale + shift`` per channel (inference, eval backward)."""
        layout = Layout.of(x, axis)
        wd = work_dtype(out_dtype)
        x3 = layout.work3(x, wd)
        dest = Output(layout, out, out_dtype, wd, [x3])
        self._affine3(x3, mean, np.zeros_like(mean), scale, shift, dest.y3)
        return dest.finish()

    def _affine3(self, x3, hi64, lo64, scale, shift, y3):
        outer, channels, inner = x3.shape
        hi, lo = _moments.split_hi_lo(hi64, lo64, x3.dtype)
        params = np.ascontiguousarray(
            np.stack([hi, lo, scale.astype(x3.dtype), shift.astype(x3.dtype)], axis=1))
        with _kernel_guard():
            if self._column_path(x3):
                kernels.affine_columns(x3.reshape(outer, -1), params, inner,
                                       _column_blocks(outer, numba.get_num_threads()),
                                       y3.reshape(outer, -1))
            else:
                kernels.affine_channels(x3, params, _run_blocks(x3.shape), y3)

    @staticmethod
    def _column_path(x3):
        """Reduce over rows of (outer, C * inner) when a channel's runs are short."""
        return x3.shape[2] < MIN_RUN

    # ----------------------------------------------------------------- backward
    def _grad_sums3(self, dy3, x3, mean):
        outer, channels, inner = x3.shape
        nthreads = numba.get_num_threads()
        if self._column_path(x3):
            s, sx = np.empty(channels), np.empty(channels)
            ones = np.ones(channels)
            with _kernel_guard():
                kernels.column_backward(dy3.reshape(outer, -1), x3.reshape(outer, -1), mean, ones,
                                        ones, inner, _column_blocks(outer, nthreads), False,
                                        x3.reshape(outer, -1), s, sx)
            return s, sx
        group, nparts = channel_plan(x3.shape, 2 * x3.itemsize, nthreads)
        s = np.empty((channels, nparts))
        sx = np.empty_like(s)
        with _kernel_guard():
            kernels.channel_grad_sums(dy3, x3, mean, group, nparts, s, sx)
        return s.sum(axis=1), sx.sum(axis=1)

    def grad_sums(self, dy, x, axis, mean, dtype):
        """``(sum(dy), sum(dy * (x - mean)))`` per channel, computed in ``dtype``."""
        layout = Layout.of(x, axis)
        wd = work_dtype(dtype)
        return self._grad_sums3(layout.work3(dy, wd), layout.work3(x, wd), mean)

    def backward_train(self, dy, x, axis, mean, invstd, weight, out, out_dtype):
        """Training-mode ``dx`` and ``(sum(dy), sum(dy * (x - mean)))``, fused where possible."""
        layout = Layout.of(x, axis)
        wd = work_dtype(out_dtype)
        x3 = layout.work3(x, wd)
        dy3 = layout.work3(dy, wd)
        dest = Output(layout, out, out_dtype, wd, [x3, dy3])
        outer, channels, inner = x3.shape
        nthreads = numba.get_num_threads()
        s, sx = np.empty(channels), np.empty(channels)
        if self._column_path(x3):
            with _kernel_guard():
                kernels.column_backward(dy3.reshape(outer, -1), x3.reshape(outer, -1), mean, invstd,
                                        weight, inner, _column_blocks(outer, nthreads), True,
                                        dest.y3.reshape(outer, -1), s, sx)
            return dest.finish(), s, sx
        group, nparts = channel_plan(x3.shape, 2 * x3.itemsize, nthreads)
        if nparts == 1:
            with _kernel_guard():
                kernels.channel_backward(dy3, x3, mean, invstd, weight, group, dest.y3, s, sx)
            return dest.finish(), s, sx
        s, sx = self._grad_sums3(dy3, x3, mean)
        n = float(outer * inner)
        hi, lo = _moments.split_hi_lo(mean, np.zeros_like(mean), wd)
        params = np.ascontiguousarray(np.stack(
            [hi, lo, (weight * invstd).astype(wd), (s / n).astype(wd),
             (invstd * invstd * sx / n).astype(wd)], axis=1))
        with _kernel_guard():
            kernels.dx_channels(dy3, x3, params, _run_blocks(x3.shape), dest.y3)
        return dest.finish(), s, sx

    # ----------------------------------------------------------------- compilation
    def compile_kernels(self, dtype):
        """Run every kernel once on tiny ``dtype`` arrays, with the argument types of real calls."""
        wd = work_dtype(dtype)
        x3 = np.linspace(-1.0, 1.0, 2 * 3 * 4).astype(wd).reshape(2, 3, 4)
        y3 = np.empty_like(x3)
        x2, y2 = x3.reshape(2, -1), y3.reshape(2, -1)
        c = x3.shape[1]
        shift, ones, zeros = _shift(x3), np.ones(3), np.zeros(3)
        per_part = [np.empty((c, 2)) for _ in range(3)]
        per_channel = [np.empty(c) for _ in range(3)]
        with _kernel_guard():
            kernels.channel_moments(x3, shift, 1, 2, *per_part)
            kernels.channel_forward(x3, 1, ones, zeros, 1e-5, y3, *per_channel)
            kernels.affine_channels(x3, np.zeros((c, 4), wd), 2, y3)
            kernels.column_forward(x2, 4, 2, 4, True, ones, zeros, 1e-5, y2, *per_channel)
            kernels.affine_columns(x2, np.zeros((c, 4), wd), 4, 2, y2)
            kernels.channel_grad_sums(x3, x3, zeros, 1, 2, *per_part[:2])
            kernels.channel_backward(x3, x3, zeros, ones, ones, 1, y3, *per_channel[:2])
            kernels.dx_channels(x3, x3, np.zeros((c, 5), wd), 2, y3)
            kernels.column_backward(x2, x2, zeros, ones, ones, 4, 2, True, y2, *per_channel[:2])
            kernels.parallel_copy(x2.reshape(-1), y2.reshape(-1), 2)
            kernels.parallel_read(x2.reshape(-1), 2)
            kernels.parallel_add(x2.reshape(-1), x2.reshape(-1), y2.reshape(-1), 2)

    # ----------------------------------------------------------------- memory floor
    def copy(self, src, dst):
        """Parallel copy of ``src`` into ``dst`` (contiguous, same size): the memory floor."""
        with _kernel_guard():
            kernels.parallel_copy(src.reshape(-1), dst.reshape(-1), numba.get_num_threads())

    def read(self, src):
        """Parallel read-only pass over contiguous ``src`` (the floor of a statistics pass)."""
        with _kernel_guard():
            return kernels.parallel_read(src.reshape(-1), numba.get_num_threads())

    def add(self, a, b, out):
        """Parallel ``out = a + b`` (contiguous): the floor of two reads and one write."""
        with _kernel_guard():
            kernels.parallel_add(a.reshape(-1), b.reshape(-1), out.reshape(-1),
                                 numba.get_num_threads())


backend = CPUBackend()

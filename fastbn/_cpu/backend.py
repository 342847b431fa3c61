"""CPU backend: canonical layouts, kernel selection and the bits of NumPy around them.

Arguments arrive validated by ``fastbn.api``: ``x`` and ``dy`` are ndarrays of a
supported dtype, per-channel vectors are float64 of length C.  Every method
returns float64 per-channel results; the API casts them to the stats dtype.
"""

import threading
from contextlib import contextmanager

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
# Channel path: below this many channels per thread, channels are split in parts.
CHANNELS_PER_THREAD = 4

_serial = threading.Lock()
_threading_layer = None


@contextmanager
def _kernel_guard():
    """Serialize kernel calls under Numba's workqueue layer, which is not thread-safe.

    The layer is only known after the first parallel call, which therefore runs
    under the lock too.
    """
    global _threading_layer
    if _threading_layer is not None and _threading_layer != "workqueue":
        yield
        return
    with _serial:
        yield
        if _threading_layer is None:
            try:
                _threading_layer = numba.threading_layer()
            except ValueError:
                pass


def work_dtype(dtype):
    """Kernels run on float32 or float64; float16 goes through float32, integers through float64."""
    return np.dtype(np.float32) if dtype in (np.float16, np.float32) else np.dtype(np.float64)


def _channel_parts(shape3, nthreads):
    outer, channels, inner = shape3
    if channels >= CHANNELS_PER_THREAD * nthreads or nthreads == 1:
        return 1
    wanted = -(-CHANNELS_PER_THREAD * nthreads // channels)
    return int(max(1, min(wanted, outer * inner // kernels.CHUNK)))


def _column_blocks(rows, nthreads):
    return int(max(1, min(nthreads, rows)))


def _chunk_rows(width):
    return int(max(4, CHUNK_VALUES // max(width, 1)))


def _shift(x3):
    """Per-channel shift for the moments: each channel's first value."""
    return x3[0, :, 0].astype(np.float64)


def _finish_moments(shift, n, mean_rel, m2):
    hi, lo = _moments.two_sum(shift, mean_rel)
    return n, hi, lo, m2


class CPUBackend:
    name = "cpu"

    # ----------------------------------------------------------------- statistics
    def _moments3(self, x3, fuse=None):
        """Count, mean (hi, lo) and M2 per channel; with ``fuse=(weight, bias, eps, y3)``
        the channel path also normalizes.  Returns ``(n, hi, lo, m2, fused)``."""
        outer, channels, inner = x3.shape
        nthreads = numba.get_num_threads()
        shift = _shift(x3)
        if inner < MIN_RUN:
            x2 = x3.reshape(outer, channels * inner)
            nblocks = _column_blocks(outer, nthreads)
            count = np.empty(nblocks)
            mean_rel = np.empty((nblocks, channels * inner))
            m2 = np.empty_like(mean_rel)
            with _kernel_guard():
                kernels.column_moments(x2, np.repeat(shift, inner), nblocks,
                                       _chunk_rows(channels * inner), count, mean_rel, m2)
            n, mu, q = _moments.merge_moments(count[:, None], mean_rel, m2, axis=0)
            n, mu, q = _moments.merge_moments(n.reshape(channels, inner), mu.reshape(channels, inner),
                                              q.reshape(channels, inner), axis=1)
            return (*_finish_moments(shift, n, mu, q), False)
        nparts = _channel_parts(x3.shape, nthreads)
        fused = fuse is not None and nparts == 1
        weight, bias, eps, y3 = fuse if fused else (shift, shift, 0.0, x3)
        count = np.empty((channels, nparts))
        mean_rel = np.empty((channels, nparts))
        m2 = np.empty((channels, nparts))
        with _kernel_guard():
            kernels.channel_forward(x3, shift, nparts, fused, weight, bias, float(eps), y3,
                                    count, mean_rel, m2)
        n, mu, q = _moments.merge_moments(count, mean_rel, m2, axis=1)
        return (*_finish_moments(shift, n, mu, q), fused)

    def moments(self, x, axis, dtype):
        """``(count, mean, m2)`` per channel of a non-empty ``x`` computed in ``dtype`` (float64)."""
        layout = Layout.of(x, axis)
        x3 = layout.work3(x, work_dtype(dtype))
        n, hi, lo, m2, _ = self._moments3(x3)
        return n, hi + lo, m2

    # ----------------------------------------------------------------- forward
    def forward_train(self, x, axis, weight, bias, eps, out, out_dtype):
        """Batch statistics and ``y`` in one fused call.  Returns ``(y, mean, var, invstd)``."""
        layout = Layout.of(x, axis)
        wd = work_dtype(out_dtype)
        x3 = layout.work3(x, wd)
        dest = Output(layout, out, out_dtype, wd, [x3])
        n, hi, lo, m2, fused = self._moments3(x3, fuse=(weight, bias, eps, dest.y3))
        var = m2 / n
        inv = _moments.invstd(var, eps)
        if not fused:
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
        params = np.stack([hi, lo, scale.astype(x3.dtype), shift.astype(x3.dtype)])
        with _kernel_guard():
            if inner < MIN_RUN:
                kernels.affine_columns(x3.reshape(outer, -1), np.repeat(params, inner, axis=1),
                                       y3.reshape(outer, -1))
            else:
                kernels.affine_channels(x3, np.ascontiguousarray(params.T), y3)

    # ----------------------------------------------------------------- backward
    def _grad_sums3(self, dy3, x3, mean, fuse=None):
        outer, channels, inner = x3.shape
        nthreads = numba.get_num_threads()
        if inner < MIN_RUN:
            nblocks = _column_blocks(outer, nthreads)
            s = np.empty((nblocks, channels * inner))
            sx = np.empty_like(s)
            with _kernel_guard():
                kernels.column_grad_sums(dy3.reshape(outer, -1), x3.reshape(outer, -1),
                                         np.repeat(mean, inner), nblocks, s, sx)
            return (s.reshape(nblocks, channels, inner).sum(axis=(0, 2)),
                    sx.reshape(nblocks, channels, inner).sum(axis=(0, 2)), False)
        nparts = min(_channel_parts(x3.shape, nthreads), outer)
        fused = fuse is not None and nparts == 1
        invstd, weight, dx3 = fuse if fused else (mean, mean, x3)
        s = np.empty((channels, nparts))
        sx = np.empty_like(s)
        with _kernel_guard():
            kernels.channel_backward(dy3, x3, nparts, fused, mean, invstd, weight, dx3, s, sx)
        return s.sum(axis=1), sx.sum(axis=1), fused

    def grad_sums(self, dy, x, axis, mean, dtype):
        """``(sum(dy), sum(dy * (x - mean)))`` per channel, computed in ``dtype``."""
        layout = Layout.of(x, axis)
        wd = work_dtype(dtype)
        s, sx, _ = self._grad_sums3(layout.work3(dy, wd), layout.work3(x, wd), mean)
        return s, sx

    def backward_train(self, dy, x, axis, mean, invstd, weight, out, out_dtype):
        """Training-mode ``dx`` and ``(sum(dy), sum(dy * (x - mean)))`` in one fused call."""
        layout = Layout.of(x, axis)
        wd = work_dtype(out_dtype)
        x3 = layout.work3(x, wd)
        dy3 = layout.work3(dy, wd)
        dest = Output(layout, out, out_dtype, wd, [x3, dy3])
        s, sx, fused = self._grad_sums3(dy3, x3, mean, fuse=(invstd, weight, dest.y3))
        if not fused:
            outer, channels, inner = x3.shape
            n = float(outer * inner)
            hi, lo = _moments.split_hi_lo(mean, np.zeros_like(mean), wd)
            params = np.stack([hi, lo, (weight * invstd).astype(wd), (s / n).astype(wd),
                               (invstd * invstd * sx / n).astype(wd)])
            with _kernel_guard():
                if inner < MIN_RUN:
                    kernels.dx_columns(dy3.reshape(outer, -1), x3.reshape(outer, -1),
                                       np.repeat(params, inner, axis=1), dest.y3.reshape(outer, -1))
                else:
                    kernels.dx_channels(dy3, x3, np.ascontiguousarray(params.T), dest.y3)
        return dest.finish(), s, sx

    # ----------------------------------------------------------------- memory floor
    def copy(self, src, dst, nthreads=None):
        """Parallel copy of ``src`` into ``dst`` (contiguous, same size): the memory floor."""
        nblocks = int(nthreads or numba.get_num_threads())
        with _kernel_guard():
            kernels.parallel_copy(src.reshape(-1), dst.reshape(-1), nblocks)


backend = CPUBackend()

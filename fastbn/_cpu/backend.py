"""CPU backend: canonical layouts, kernel selection and the bits of NumPy around them.

Arguments arrive validated by ``fastbn.api``: ``x`` and ``dy`` are ndarrays of a
supported dtype, per-channel vectors are float64 of length C.  Every method
returns float64 per-channel results; the API casts them to the stats dtype.
"""

import math
import threading

import numpy as np

from .. import _moments, _notice, _threads
from .._jit import serial_module
from .._layout import Layout, Output
from . import kernels
from .calls import HostCalls

_notice.install()  # a line on stderr before kernels compile (first use only)

# Passed to the kernels' plans on every call (``kernels.plans.MIN_RUN``: runs shorter
# than this are reduced row-wise); tests lower this copy to force a path.
MIN_RUN = kernels.MIN_RUN

# Calls reading fewer bytes than this run on the calling thread (tests set it).
SERIAL_MAX_BYTES = _threads.SERIAL_MAX_BYTES


class _SerialLock:
    """Serializes parallel calls under Numba's workqueue layer, which is not thread-safe.
    One lock for the whole process: the C library, when loaded in the same process,
    hands its own mutex over (``use_lock``), so Python and C callers share it."""

    lock = threading.Lock()

    @classmethod
    def use_lock(cls, lock):
        cls.lock = lock

    @classmethod
    def _reset_after_fork(cls):
        # a thread of the parent may have held it: the child has no such thread
        if isinstance(cls.lock, type(threading.Lock())):
            cls.lock = threading.Lock()


_threads.at_fork_in_child(_SerialLock._reset_after_fork)
_threads.register_with_threadpoolctl()

_serial_kernels = None


def serial_kernels():
    """The kernels' serial twins (compiled on first use, cached on disk like the others)."""
    global _serial_kernels
    if _serial_kernels is None:
        _serial_kernels = serial_module(kernels)
    return _serial_kernels


class _Call:
    """How one kernel call runs: ``k``, the kernels module, and ``n``, the thread count its
    plan is given; as a context manager, the lock (workqueue layer) and Numba's thread mask
    around the call.  A class, not a generator: it is on every call's path.

    A call of fewer than ``SERIAL_MAX_BYTES`` runs on one thread: Numba's thread mask set
    to 1 for it, so the parallel region runs on the calling thread and no worker is woken
    (on a machine whose cores are busy, a worker that is not scheduled made a 10 us call
    take milliseconds).  In a process forked from one whose GNU OpenMP pool ran, every call
    takes the kernels' serial twins, which never enter the threading layer; so does a call
    of fewer than ``twins_below`` bytes (fastbn.torch's, right after a convolution, where
    PyTorch's workers hold the other cores and the layer's entry is cold).
    """

    __slots__ = ("k", "n", "_locked", "_restore")

    def __init__(self, nbytes, twins_below=0):
        full = _threads.numba_threads()
        n = _threads.limited(full)
        if nbytes < SERIAL_MAX_BYTES:
            n = 1
        self._locked = False
        if nbytes < twins_below or _threads.pool_unusable():
            self.k, self.n, self._restore = serial_kernels(), 1, None
        else:
            self.k, self.n = kernels, n
            self._restore = full if n < full else None

    def __enter__(self):
        if self.k is kernels:
            if _threads.layer() in (None, "workqueue"):
                _SerialLock.lock.acquire()
                self._locked = True
            if self._restore is not None:
                _threads.set_mask(self.n)
            _threads.enter_parallel()
        return self

    def __exit__(self, *exc):
        if self.k is kernels:
            _threads.exit_parallel()
        if self._restore is not None:
            _threads.set_mask(self._restore)
        if self._locked:
            _SerialLock.lock.release()
        return False


def _call(*arrays, twins_below=0):
    return _Call(sum(a.nbytes for a in arrays), twins_below)


def work_dtype(dtype):
    """Kernels run on float32 or float64; float16 goes through float32, integers through float64."""
    return np.dtype(np.float32) if dtype in (np.float16, np.float32) else np.dtype(np.float64)


def channel_plan(shape3, bytes_per_value):
    """``(group, nparts)`` of the channel path for an (outer, C, inner) shape."""
    return kernels.channel_plan(*shape3, bytes_per_value, kernels.PLAN_THREADS)


def pipelined(shape3, bytes_per_value, out):
    """Whether the fused channel path runs pipelined for this shape and output."""
    return kernels.pipelined(*shape3, bytes_per_value, kernels.PLAN_THREADS, out)


def plan_chains(channels):
    """The pipelined schedules' chains of channels: one per thread of the plan, none
    empty (the kernels take the pipelined path only with two channels per chain)."""
    return max(1, min(kernels.PLAN_THREADS, channels))


def _shape3(shape, axis):
    """(outer, C, inner) of a C-contiguous array with channel axis ``axis``."""
    outer = math.prod(shape[:axis])
    channels = shape[axis]
    return outer, channels, math.prod(shape[axis + 1:])


class _ReadOnlyAlias:
    """An ``__array_interface__`` for a writable-typed view of read-only memory."""

    def __init__(self, a):
        self.base = a
        interface = dict(a.__array_interface__)
        interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface


def _in(a):
    """``a`` as the kernels take their inputs.

    Kernels only read their inputs, but Numba types a read-only array (a memory map
    opened 'r', ``np.frombuffer`` of bytes, ``np.broadcast_to``) as a type of its own,
    with a second compilation of every kernel it reaches, and a kernel that takes an
    input in an output's place (an unused output) would not compile for it at all.  A
    writable-typed view of the same memory, no copy, keeps one compiled signature.
    """
    if a.flags.writeable:
        return a
    return np.asarray(_ReadOnlyAlias(a))


_UNWRITTEN = {}


def _unwritten(dtype):
    """An empty (0, 0, 0) array of ``dtype``: the backward's ``dresidual`` when nobody asked
    for it (the kernels skip writing an empty one, with the type of a real one)."""
    dtype = np.dtype(dtype)
    if dtype not in _UNWRITTEN:
        _UNWRITTEN[dtype] = np.empty((0, 0, 0), dtype)
    return _UNWRITTEN[dtype]


def _operand3(layout, a, dtype):
    """An epilogue's operand (residual, or the forward's output ``y``) laid out like the
    input: a C-contiguous, aligned (outer, C, inner) array of the work dtype, or None."""
    if a is None:
        return None
    a3 = layout.work3(a, dtype)
    if not a3.flags.aligned:
        a3 = a3.copy()
    return _in(a3)


def _first_row_shift(x2):
    """Per column, the first row's value (0 where it is not finite): the feature statistics
    accumulate relative to it, so that large offsets cost no precision."""
    if not x2.shape[0]:
        return np.zeros(x2.shape[1])
    first = x2[0].astype(np.float64)
    return np.where(np.isfinite(first), first, 0.0)


class CPUBackend(HostCalls):
    name = "cpu"
    device = False

    # ----------------------------------------------------------------- statistics
    def moments(self, x, axis, dtype):
        """``(count, mean, m2)`` per channel of a non-empty ``x`` computed in ``dtype`` (float64)."""
        layout = Layout.of(x, axis)
        x3 = _in(layout.work3(x, work_dtype(dtype)))
        channels = x3.shape[1]
        mean, m2 = np.empty(channels), np.empty(channels)
        with _call(x3) as call:
            n = call.k.channel_moments_any_path(x3, mean, m2, MIN_RUN)
        return n, mean, m2

    def feature_stats(self, x, axis, dtype, min_max=True):
        """Per channel (feature) with NaN ignored: ``(count, mean, m2, min, max)``, float64.

        Features with no value get count 0 and NaN elsewhere.  Without
        ``min_max`` (min and max are then None), data without NaN take the
        batch-statistics kernels, which are several times faster; only data
        whose statistics come out non-finite go through the NaN-aware kernel.
        """
        if not min_max:
            n, mean, m2 = self.moments(x, axis, dtype)
            if np.isfinite(mean).all() and np.isfinite(m2).all():
                return np.full(mean.shape, float(n)), mean, m2, None, None
        layout = Layout.of(x, axis)
        x3 = _in(layout.work3(x, work_dtype(dtype)))
        outer, channels, inner = x3.shape
        width = channels * inner
        x2 = x3.reshape(outer, width)
        shift = _first_row_shift(x2)
        with _call(x3) as call:
            nblocks = call.k.feature_blocks(outer, width)
            parts = [np.empty((nblocks, width)) for _ in range(5)]
            call.k.feature_moments(x2, None, nblocks, call.k.chunk_rows(width), shift, *parts)
        count, mean_rel, m2, vmin, vmax = parts
        # merge the blocks, then the inner columns of each channel
        count, mean, m2 = _moments.merge_moments(count, mean_rel + shift, m2, axis=0)
        vmin, vmax = vmin.min(axis=0), vmax.max(axis=0)
        if inner > 1:
            count, mean, m2 = _moments.merge_moments(count.reshape(channels, inner),
                                                     mean.reshape(channels, inner),
                                                     m2.reshape(channels, inner), axis=1)
            vmin = vmin.reshape(channels, inner).min(axis=1)
            vmax = vmax.reshape(channels, inner).max(axis=1)
        empty = count == 0
        vmin[empty] = np.nan
        vmax[empty] = np.nan
        return count, mean, m2, vmin, vmax

    def weighted_feature_stats(self, x2, weights, dtype):
        """Per column of ``x2`` (samples, features), NaN ignored, each sample weighted by
        ``weights`` (samples,) float64 >= 0: ``(weight sum, mean, m2)``, float64; a column
        with no weight gets NaN mean and M2."""
        x2 = _in(np.ascontiguousarray(x2, dtype=work_dtype(dtype)))
        weights = _in(weights)
        rows, width = x2.shape
        shift = _first_row_shift(x2)
        with _call(x2) as call:
            nblocks = call.k.column_stat_blocks(rows)
            count = np.empty(nblocks)
            mean_rel, m2 = np.empty((nblocks, width)), np.empty((nblocks, width))
            call.k.column_moments(x2, weights, nblocks, call.k.chunk_rows(width), shift, count,
                                  mean_rel, m2)
            count = np.repeat(count[:, None], width, axis=1)
            if not (np.isfinite(mean_rel).all() and np.isfinite(m2).all()):
                # NaN (or inf) in the data: the NaN-aware kernel, several times slower
                nblocks = call.k.feature_blocks(rows, width)
                parts = [np.empty((nblocks, width)) for _ in range(5)]
                call.k.feature_moments(x2, weights, nblocks, call.k.chunk_rows(width), shift,
                                       *parts)
                count, mean_rel, m2 = parts[:3]
        return _moments.merge_moments(count, mean_rel + shift, m2, axis=0)

    # ----------------------------------------------------------------- forward
    def forward_train(self, x, axis, weight, bias, eps, out, out_dtype, residual=None,
                      relu=False):
        """Batch statistics and ``y``, fused in one call where the plan allows; ``y`` with
        the epilogue (``+ residual``, then ReLU where ``relu``; contract section 6).

        Returns ``(y, mean, var, invstd)``, statistics in float64.
        """
        layout = Layout.of(x, axis)
        wd = work_dtype(out_dtype)
        x3 = _in(layout.work3(x, wd))
        res3 = _operand3(layout, residual, wd)
        dest = Output(layout, out, out_dtype, wd, [a for a in (x3, res3) if a is not None])
        channels = x3.shape[1]
        mean, var, inv = np.empty(channels), np.empty(channels), np.empty(channels)
        with _call(x3) as call:
            call.k.run_forward_train(x3, weight, bias, float(eps), dest.y3, mean, var, inv,
                                     call.n, MIN_RUN, res3, bool(relu))
        return dest.finish(), mean, var, inv

    # The common host call (``fastbn._validate.plain_*_args``): C-contiguous float32/float64
    # arrays, float64 per-channel vectors, an ``out`` that is None, an input, or a
    # C-contiguous array of the dtype overlapping no input.  No layout or output plumbing.

    def forward_train_contiguous(self, x, axis, weight, bias, eps, out):
        shape3 = _shape3(x.shape, axis)
        y = np.empty_like(x) if out is None else out
        channels = shape3[1]
        mean, var, inv = np.empty(channels), np.empty(channels), np.empty(channels)
        with _call(x) as call:
            call.k.run_forward_train(_in(x).reshape(shape3), weight, bias, eps,
                                     y.reshape(shape3), mean, var, inv, call.n, MIN_RUN, None,
                                     False)
        return y, mean, var, inv

    def inference_scale(self, var, eps, weight):
        """``weight / sqrt(var + eps)`` per channel (float64), 0 where ``var + eps == 0``."""
        return kernels.inference_scale(var, float(eps), weight)

    def inference_contiguous(self, x, axis, mean, var, weight, bias, eps, out):
        shape3 = _shape3(x.shape, axis)
        y = np.empty_like(x) if out is None else out
        scale = self.inference_scale(var, eps, weight)
        with _call(x) as call:
            call.k.run_affine(_in(x).reshape(shape3), mean, np.zeros(shape3[1]), scale, bias,
                              y.reshape(shape3), call.n, MIN_RUN, None, False)
        return y

    def backward_train_contiguous(self, dy, x, axis, mean, invstd, weight, out):
        shape3 = _shape3(x.shape, axis)
        dx = np.empty_like(x) if out is None else out
        s, sx = np.empty(shape3[1]), np.empty(shape3[1])
        with _call(dy, x) as call:
            call.k.run_backward_train(_in(dy).reshape(shape3), _in(x).reshape(shape3), mean,
                                      invstd, weight, dx.reshape(shape3), s, sx, call.n, MIN_RUN,
                                      None, _unwritten(x.dtype))
        return dx, s, sx

    def affine(self, x, axis, mean, scale, shift, out, out_dtype, residual=None, relu=False):
        """``y = (x - mean) * scale + shift`` per channel (inference, eval backward), with
        the epilogue (``+ residual``, then ReLU where ``relu``)."""
        layout = Layout.of(x, axis)
        wd = work_dtype(out_dtype)
        x3 = _in(layout.work3(x, wd))
        res3 = _operand3(layout, residual, wd)
        dest = Output(layout, out, out_dtype, wd, [a for a in (x3, res3) if a is not None])
        self._affine3(x3, mean, np.zeros_like(mean), scale, shift, dest.y3, res3, relu)
        return dest.finish()

    def minmax(self, x, axis, lo, hi, scale, f0, f1, out, out_dtype):
        """Min-max scaling per channel about both ends (``kernels.minmax``): ``lo``, ``hi``
        the data's minimum and maximum, ``[f0, f1]`` the feature range."""
        layout = Layout.of(x, axis)
        wd = work_dtype(out_dtype)
        x3 = _in(layout.work3(x, wd))
        dest = Output(layout, out, out_dtype, wd, [x3])
        with _call(x3) as call:
            call.k.run_two_sided(x3, lo, hi, scale, float(f0), float(f1), dest.y3, call.n,
                                 MIN_RUN)
        return dest.finish()

    def _affine3(self, x3, hi64, lo64, scale, shift, y3, res3=None, relu=False):
        with _call(x3) as call:
            call.k.run_affine(x3, hi64, lo64, scale, shift, y3, call.n, MIN_RUN, res3, bool(relu))

    # ----------------------------------------------------------------- backward
    def _grad_sums3(self, dy3, x3, mean):
        channels = x3.shape[1]
        s, sx = np.empty(channels), np.empty(channels)
        with _call(dy3, x3) as call:
            call.k.run_grad_sums(dy3, x3, mean, s, sx, MIN_RUN, None)
        return s, sx

    def grad_sums(self, dy, x, axis, mean, dtype):
        """``(sum(dy), sum(dy * (x - mean)))`` per channel, computed in ``dtype``."""
        layout = Layout.of(x, axis)
        wd = work_dtype(dtype)
        return self._grad_sums3(_in(layout.work3(dy, wd)), _in(layout.work3(x, wd)), mean)

    def dx_from_sums(self, dy, x, axis, mean, invstd, weight, sum_dy, sum_dy_xmu, n, out,
                     out_dtype):
        """Training-mode ``dx`` for per-channel sums over ``n`` values taken elsewhere
        (synchronized batch norm: over every rank's batch)."""
        layout = Layout.of(x, axis)
        wd = work_dtype(out_dtype)
        x3 = _in(layout.work3(x, wd))
        dy3 = _in(layout.work3(dy, wd))
        dest = Output(layout, out, out_dtype, wd, [x3, dy3])
        if x3.size:
            with _call(dy3, x3) as call:
                call.k.run_dx(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xmu, float(n),
                              dest.y3, call.n, MIN_RUN)
        return dest.finish()

    def backward_train(self, dy, x, axis, mean, invstd, weight, out, out_dtype, y=None,
                       residual_grad=False, residual_out=None):
        """Training-mode ``dx`` and ``(sum(g), sum(g * (x - mean)))``, fused where possible;
        ``g`` is ``dy``, or with ``y`` (ReLU's backward) ``dy`` where ``y > 0`` and 0
        elsewhere.  Returns ``(dx, sum_g, sum_g_xmu, dresidual)``, ``dresidual`` being ``g``
        (into ``residual_out`` where given) with ``residual_grad``, else None.
        """
        layout = Layout.of(x, axis)
        wd = work_dtype(out_dtype)
        x3 = _in(layout.work3(x, wd))
        dy3 = _in(layout.work3(dy, wd))
        y3 = _operand3(layout, y, wd)
        inputs = [a for a in (x3, dy3, y3) if a is not None]
        dest = Output(layout, out, out_dtype, wd, inputs)
        res_dest = None
        if residual_grad:
            res_dest = Output(layout, residual_out, out_dtype, wd, inputs + [dest.y3])
            res_dest.align_like(dest.y3)
        channels = x3.shape[1]
        s, sx = np.empty(channels), np.empty(channels)
        with _call(dy3, x3) as call:
            call.k.run_backward_train(dy3, x3, mean, invstd, weight, dest.y3, s, sx, call.n,
                                      MIN_RUN, y3, _unwritten(wd) if res_dest is None
                                      else res_dest.y3)
        return dest.finish(), s, sx, None if res_dest is None else res_dest.finish()

    # ----------------------------------------------------------------- compilation
    def compile_kernels(self, dtype, serial=False, epilogues=False):
        """Run every kernel once on tiny ``dtype`` arrays, with the argument types of real
        calls; with ``serial``, the serial twins too (only a process forked from a GNU
        OpenMP one uses them); with ``epilogues``, the fused epilogues' variants too (a
        residual, ReLU's ``y``)."""
        wd = work_dtype(dtype)
        x3 = np.linspace(-1.0, 1.0, 2 * 3 * 4).astype(wd).reshape(2, 3, 4)
        y3 = np.empty_like(x3)
        x2 = x3.reshape(2, -1)
        c = x3.shape[1]
        ones, zeros = np.ones(c), np.zeros(c)
        per_channel = [np.empty(c) for _ in range(3)]
        width = x2.shape[1]
        modules = (kernels, serial_kernels()) if serial else (kernels,)
        for k in modules:
            with _Call(math.inf):
                # A plan compiles every kernel it can reach, whichever branch runs.
                k.run_forward_train(x3, ones, zeros, 1e-5, y3, *per_channel, 2, MIN_RUN, None,
                                    False)
                k.run_backward_train(x3, x3, zeros, ones, ones, y3, *per_channel[:2], 2, MIN_RUN,
                                     None, _unwritten(wd))
                k.run_affine(x3, zeros, zeros, ones, zeros, y3, 2, MIN_RUN, None, False)
                if epilogues:
                    k.run_forward_train(x3, ones, zeros, 1e-5, y3, *per_channel, 2, MIN_RUN,
                                        x3, True)
                    k.run_backward_train(x3, x3, zeros, ones, ones, y3, *per_channel[:2], 2,
                                         MIN_RUN, x3, np.empty_like(x3))
                    k.run_affine(x3, zeros, zeros, ones, zeros, y3, 2, MIN_RUN, x3, True)
                k.run_two_sided(x3, zeros, ones, ones, 0.0, 1.0, y3, 2, MIN_RUN)
                k.inference_scale(ones, 1e-5, ones)
                k.update_running(np.zeros(c, wd), np.ones(c, wd), zeros, ones, 2.0, 0.1)
                k.channel_moments_any_path(x3, *per_channel[:2], MIN_RUN)
                k.run_dx(x3, x3, zeros, ones, ones, zeros, zeros, 2.0, y3, 2, MIN_RUN)
                k.feature_blocks(2, width)
                k.feature_moments(x2, None, 2, 4, np.zeros(width),
                                  *[np.empty((2, width)) for _ in range(5)])
                k.column_moments(x2, np.ones(2), 2, 4, np.zeros(width), np.empty(2),
                                 np.empty((2, width)), np.empty((2, width)))  # sample_weight


backend = CPUBackend()

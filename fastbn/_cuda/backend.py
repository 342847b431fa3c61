"""CUDA backend: the functional API on device arrays (docs/contract.md section 2, "CUDA").

Imported only when a call receives device arrays, so ``import fastbn`` never
needs numba-cuda, CUDA or a GPU.  Arguments are validated before the first
launch (nothing is written on a bad call), data stay on the device, and
results come back as the input's array type (CuPy in, CuPy out; torch in,
torch out; otherwise Numba device arrays).

Work arrays are float32 for float16/float32 input and float64 otherwise, as
on the CPU; float16 and integer input go through a converted copy.

Streams: a call launches everything on the caller's stream (``_Run``): PyTorch's
current stream for torch tensors, the CUDA Array Interface v3 ``stream`` of ``x``
(CuPy exports its current stream there) or CuPy's current stream, a Numba
array's own stream, else the default stream.  Inputs that carry another stream
are waited for on the device (an event), never by blocking the host.  Results
are Numba arrays bound to that stream (their interface exports it); wrapped as
torch or CuPy they export none, since that library's current stream is the one
they were written on.
"""

import math
import threading

import numba
import numpy as np
from numba import cuda

from .. import _notice
from .. import _validate as v
from .._layout import Layout
from . import kernels as k

_notice.install()  # a line on stderr before kernels compile (first use only)

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
# The simulator runs every thread as a Python thread: keep launches tiny there.
THREADS = 16 if SIMULATOR else k.THREADS
MAX_BLOCKS = 2 if SIMULATOR else 4096
# blocks along the channels of a block-per-channel kernel; each block strides over the
# channels (few under the simulator, so that the tests cross the cap)
MAX_CHANNEL_BLOCKS = 8 if SIMULATOR else 65535
# float32 channels of at most this many values take the fused one-block forward (its
# shared memory holds k.FUSED_MAX_VALUES); few under the simulator, so that its tests
# reach the two-pass path with tiny shapes
FUSED_MAX = 64 if SIMULATOR else k.FUSED_MAX_VALUES
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
    # sync=False: the interface's stream is waited for on the device (``_Run``), not by
    # blocking the host
    return cuda.as_cuda_array(a, sync=False)


def _interface_stream(a):
    """The CUDA Array Interface v3 ``stream`` of ``a`` (None when it gives none)."""
    cai = getattr(a, "__cuda_array_interface__", None)
    return cai.get("stream") if isinstance(cai, dict) else None


def _stream_from_handle(handle):
    if handle in (None, 0):
        return cuda.default_stream()
    if handle == 1:
        return cuda.legacy_default_stream()
    if handle == 2:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


# work arrays kept between calls (``_Run.scratch``), most recently used last
_SCRATCH = {}
_SCRATCH_LOCK = threading.Lock()
SCRATCH_ENTRIES = 64


class _Run:
    """One call's stream: where its launches, copies and allocations go."""

    def __init__(self, x, others=()):
        """The stream of the caller of ``x`` (an ``_Input``); ``others`` (``_Input``s) are
        waited for on the device where their interface names another stream."""
        module = type(x.original).__module__
        handle = None
        if module.startswith("torch"):
            import torch

            handle = torch.cuda.current_stream(x.original.device).cuda_stream
            self.stream = _stream_from_handle(handle)
        elif x.cai_stream is not None:
            handle = x.cai_stream
            self.stream = _stream_from_handle(handle)
        elif module.startswith("cupy"):
            import cupy

            handle = cupy.cuda.get_current_stream().ptr
            self.stream = _stream_from_handle(handle)
        elif module.startswith("numba.cuda") and x.d.stream:
            self.stream = x.d.stream
        else:
            self.stream = cuda.default_stream()
        for other in others:
            if other is not None and other.cai_stream not in (None, handle):
                done = cuda.event(timing=False)
                done.record(stream=_stream_from_handle(other.cai_stream))
                done.wait(stream=self.stream)

    def array(self, shape, dtype=np.float64):
        return cuda.device_array(shape, dtype=dtype, stream=self.stream)

    def scratch(self, name, shape, dtype=np.float64):
        """A work array that is no output (partial statistics, parameters): kept between
        calls for this stream and thread, so that a call allocates only its outputs."""
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        # the simulator's streams have no handle, and it runs every launch at once
        stream_key = None if SIMULATOR else int(self.stream)
        key = (stream_key, threading.get_ident(), name, dtype.str)
        with _SCRATCH_LOCK:
            flat = _SCRATCH.pop(key, None)
            if flat is None or flat.size < size:
                flat = self.array(max(size, 1), dtype)
            _SCRATCH[key] = flat
            while len(_SCRATCH) > SCRATCH_ENTRIES:
                _SCRATCH.pop(next(iter(_SCRATCH)))
        return flat[:size].reshape(shape)

    def launch(self, kernel, blocks, threads=None):
        return kernel[blocks, THREADS if threads is None else threads, self.stream]

    def map(self, kernel, inputs, params, out):
        """Launch a channel map (``kernels.affine``, ``dx``, ``two_sided``) of the
        (outer, C, inner) arrays ``inputs`` into ``out`` with per-channel ``params``."""
        outer, channels, inner = out.shape
        flat = [a.reshape(a.size) for a in inputs]
        if len(flat) == 1:  # a one-input map takes it twice and reads it once
            flat *= 2
        self.launch(kernel, map_blocks(out.size, channels * inner))(
            *flat, params, out.reshape(out.size), channels, inner)

    def cast(self, src, dtype):
        """A C-contiguous copy of device array ``src`` converted to ``dtype`` (same shape)."""
        dst = self.array(src.shape, dtype)
        if src.size:
            self.launch(k.cast, _blocks(src.size))(src.reshape(src.size), dst.reshape(dst.size))
        return dst

    def empty(self):
        """An empty float64 array: an argument not given, or an output not wanted."""
        return self.scratch("empty", (0,))

    def given(self, v):
        """A per-channel argument for the kernels: its device vector, read in its own
        dtype, or an empty one for a value not given (None: ``kernels._given`` then
        takes 1 for a weight, 0 for a bias)."""
        return v if v is not None else self.empty()


def _wrap(result, like, run):
    """``result`` (a Numba device array written on ``run``'s stream) as the array type of
    ``like``, sharing memory.  A Numba result is bound to that stream (its interface
    exports it).  A torch or CuPy result exports none: it was written on that library's
    current stream, where its consumer works (exporting it would make the consumer
    block the host on it, as the interface's version 3 asks)."""
    module = type(like).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy.asarray(result.bind(0))
    if module.startswith("torch"):
        import torch

        return torch.as_tensor(result.bind(0), device=like.device)
    return result.bind(run.stream)


def _work_dtype(dtype):
    return np.dtype(np.float32) if dtype in (np.float16, np.float32) else np.dtype(np.float64)


def _blocks(total):
    return max(1, min(MAX_BLOCKS, -(-total // THREADS)))


def map_blocks(n, width):
    """Blocks of a channel map (``kernels._channel_map``) over ``n`` values in rows of
    ``width = C * inner``: a multiple of ``width`` threads in all (each thread's values
    then share one channel), or one thread a value, whichever is fewer; about
    ``MAX_BLOCKS`` where both allow."""
    full = max(1, -(-n // THREADS))  # one thread a value
    unit = math.lcm(max(width, 1), THREADS) // THREADS  # blocks in a multiple of width threads
    if unit >= full:
        return full
    return min(full, max(unit, MAX_BLOCKS // unit * unit))


def _channel_blocks(channels):
    return max(1, min(MAX_CHANNEL_BLOCKS, channels))


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
        self.cai_stream = None if d is a else _interface_stream(a)
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
        if self.view3 is None and layout is not None:
            raise ValueError(f"{self.name} must be laid out like x in device memory (the "
                             "same order of strides); make a copy in x's layout first")
        if self.view3 is None:
            raise ValueError(f"{self.name}: this device array's strides leave gaps between its "
                             "elements; make a contiguous copy on the device first")
        return self

    def data3(self, run):
        """The C-contiguous (outer, C, inner) view that kernels read in its own dtype
        (converting as they load); booleans through a float64 copy on ``run``'s stream."""
        if self.dtype.kind == "b":
            return run.cast(self.view3, np.float64)
        return self.view3


def _canonical_view(d, layout):
    """The C-contiguous (outer, C, inner) view of ``d`` in ``layout``, or None."""
    t = layout.transformed(_stand_in(d))
    if not t.flags.c_contiguous:
        return None
    view = d if layout.order == tuple(range(d.ndim)) and not _flipped_axes(layout.index) \
        else _transformed(d, layout)
    return view.reshape(layout.shape3)


def _per_channel(a, name, channels):
    """A validated per-channel device vector, read by the kernels in its own dtype (None
    stays None)."""
    if a is None:
        return None
    if not is_device_array(a):
        raise TypeError(f"{name} is a host array, but x is a CUDA device array")
    d = _numba_view(a)
    v.check_per_channel(name, d.dtype, d.shape, channels)
    return d


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
        return None  # the kernels' default (``_Run.given``)


def _row_grid(shape3):
    """(grid, block, row parts) of a row-layout statistics kernel (``kernels.row_moments``)
    over (outer, C, inner) seen as (outer, W = C * inner): threads along the columns (a
    power of two covering W, at most a block), the rest along rows."""
    outer, channels, inner = shape3
    width = channels * inner
    bx = min(THREADS, 1 << max(0, (width - 1).bit_length()))
    by = THREADS // bx
    gx = min(-(-width // bx), 65535)
    rows_per_part = by * k.CHUNK * 4  # at least a few chunks a thread
    gy = max(1, min(-(-TARGET_BLOCKS // gx), -(-outer // rows_per_part), 65535))
    return (gx, gy), (bx, by), gy


def _parts(shape3):
    outer, channels, inner = shape3
    n = outer * inner
    want = max(1, -(-TARGET_BLOCKS // max(channels, 1)))
    return int(max(1, min(want, -(-n // (THREADS * 4)), 65535)))


class _Output:
    """Where kernels write (``y3``, work dtype) and what the caller gets (``finish``)."""

    def __init__(self, run, xi, out, out_dtype):
        self.run, self.xi = run, xi
        self.out = out.out if out is not None else None
        self.y3 = out.view3 if out is not None else run.array(xi.shape3, out_dtype)

    def finish(self, like):
        if self.out is not None:
            return self.out
        return _wrap(_untransformed(self.y3.reshape(self.xi.layout.tshape), self.xi.layout),
                     like, self.run)


def _operand(run, a):
    """A residual or ``y`` (an ``_Input`` in ``x``'s layout, or None) as the flat array the
    epilogue kernels read in its own dtype, or an empty one (not given)."""
    if a is None:
        return run.empty()
    d3 = a.data3(run)
    return d3.reshape(d3.size)


def _epilogue(a):
    """Whether a call has a fused epilogue (contract section 6)."""
    return (getattr(a, "residual", None) is not None or getattr(a, "relu", False)
            or getattr(a, "y", None) is not None or getattr(a, "residual_grad", False))


class CUDABackend:
    """The device ops: the host backends' names (``fastbn._cpu.calls``), on the same
    validated call descriptions, built by ``fastbn._validate`` with ``arrays``."""

    name = "cuda"
    device = True
    arrays = DeviceArrays()

    # ----------------------------------------------------------------- statistics
    def _moments(self, run, x3):
        """Partial moments of ``x3``: (count, mean_rel, m2) arrays (C, parts)."""
        outer, channels, inner = x3.shape
        zero = _work_dtype(v.output_dtype(x3.dtype)).type(0)
        if inner >= k.PLANE_MIN:
            nparts = _parts(x3.shape)
            arrays = [run.scratch(name, (channels, nparts)) for name in ("n", "mean", "m2")]
            run.launch(k.plane_moments, (_channel_blocks(channels), nparts))(
                x3.reshape(x3.size), outer, channels, inner, nparts, zero, *arrays,
                run.empty(), run.empty())
            return arrays
        grid, block, nparts = _row_grid(x3.shape)
        arrays = [run.scratch(name, (channels * inner, nparts)) for name in ("n", "mean", "m2")]
        run.launch(k.row_moments, grid, block)(x3.reshape(x3.size), outer, channels, inner, zero,
                                               *arrays, run.empty(), run.empty())
        return [a.reshape(channels, inner * nparts) for a in arrays]

    def _grad_sums(self, run, g3, x3, mean, wd, yf):
        """Partial ``sum(g)`` and ``sum(g * (x - mean))``: float64 arrays (C, parts); ``g``
        is ``dy`` masked by ``y > 0`` (flat ``yf``; empty: ``g = dy``)."""
        outer, channels, inner = x3.shape
        zero = wd.type(0)
        if inner >= k.PLANE_MIN:
            nparts = _parts(x3.shape)
            s, sx = run.scratch("s", (channels, nparts)), run.scratch("sx", (channels, nparts))
            run.launch(k.plane_grad_sums, (_channel_blocks(channels), nparts))(
                g3.reshape(g3.size), x3.reshape(x3.size), outer, channels, inner, mean, nparts,
                zero, s, sx, yf)
            return s, sx
        grid, block, nparts = _row_grid(x3.shape)
        s = run.scratch("s", (channels * inner, nparts))
        sx = run.scratch("sx", (channels * inner, nparts))
        run.launch(k.row_grad_sums, grid, block)(g3.reshape(g3.size), x3.reshape(x3.size), outer,
                                                 channels, inner, mean, zero, s, sx, yf)
        return s.reshape(channels, inner * nparts), sx.reshape(channels, inner * nparts)

    def batch_norm_forward(self, a, n):
        """``(y, mean, invstd)`` of a training forward (``fastbn._validate.forward_args``)
        over ``n`` values per channel; the running statistics updated.  Three launches
        (one for channels that fit in shared memory), no allocation but the outputs."""
        xi, c = a.x, a.channels
        run = _Run(xi, (a.residual,))
        res = _operand(run, a.residual)
        rm = a.running_mean if a.running_mean is not None else run.empty()
        rv = a.running_var if a.running_var is not None else run.empty()
        w, b = run.given(a.weight), run.given(a.bias)
        x3 = xi.data3(run)
        outer, _, inner = x3.shape
        dest = _Output(run, xi, a.out, a.out_dtype)
        mean, inv = run.array(c, a.stats_dtype), run.array(c, a.stats_dtype)
        if c:
            xf, yf = x3.reshape(x3.size), dest.y3.reshape(dest.y3.size)
            if _work_dtype(a.out_dtype) == np.float32 and n <= FUSED_MAX:
                run.launch(k.fused_forward, _channel_blocks(c))(
                    xf, outer, c, inner, w, b, a.eps, rm, rv, a.momentum, yf, mean, inv, res,
                    a.relu)
            else:
                count, mean_rel, m2 = self._moments(run, x3)
                params = run.scratch("params", (c, 4), _work_dtype(a.out_dtype))
                run.launch(k.finish_forward, _blocks(c))(
                    xf, inner, count, mean_rel, m2, w, b, a.eps, rm, rv, float(n), a.momentum,
                    mean, inv, params)
                self._affine(run, a, x3, params, dest, res)
        x = xi.original
        return dest.finish(x), _wrap(mean, x, run), _wrap(inv, x, run)

    def batch_norm_inference(self, a):
        """``y`` of an inference forward (``fastbn._validate.inference_args``)."""
        xi, c = a.x, a.channels
        run = _Run(xi, (a.residual,))
        x3 = xi.data3(run)
        dest = _Output(run, xi, a.out, a.out_dtype)
        if x3.size:
            params = run.scratch("params", (c, 4), _work_dtype(a.out_dtype))
            run.launch(k.inference_params, _blocks(c))(
                run.given(a.running_mean), run.given(a.running_var), run.given(a.weight),
                run.given(a.bias), a.eps, params)
            self._affine(run, a, x3, params, dest, _operand(run, a.residual))
        return dest.finish(xi.original)

    @staticmethod
    def _affine(run, a, x3, params, dest, res):
        """The forward's channel map: ``affine``, or with the epilogue ``affine_epilogue``."""
        if not _epilogue(a):
            run.map(k.affine, [x3], params, dest.y3)
            return
        y3 = dest.y3
        run.launch(k.affine_epilogue, map_blocks(y3.size, y3.shape[1] * y3.shape[2]))(
            x3.reshape(x3.size), params, y3.reshape(y3.size), y3.shape[1], y3.shape[2], res,
            a.relu)

    def batch_norm_backward(self, a, n):
        """``(dx, dweight, dbias)`` of a training backward (``fastbn._validate.backward_args``)
        over ``n`` values per channel: three launches, no allocation but the outputs."""
        xi, gi, c = a.x, a.dy, a.channels
        run = _Run(xi, (gi, a.y))
        mu, inv, w = run.given(a.mean), run.given(a.invstd), run.given(a.weight)
        wd = _work_dtype(a.out_dtype)
        x3, g3 = xi.data3(run), gi.data3(run)
        yf = _operand(run, a.y)
        dest = _Output(run, xi, a.out, a.out_dtype)
        dres = _Output(run, xi, a.residual_out, a.out_dtype) if a.residual_grad else None
        dweight, dbias = run.array(c, a.stats_dtype), run.array(c, a.stats_dtype)
        if c:
            s, sx = self._grad_sums(run, g3, x3, mu, wd, yf)
            params = run.scratch("params", (c, 5), wd)
            run.launch(k.finish_backward, _blocks(c))(s, sx, mu, inv, w, float(n), dweight,
                                                      dbias, params)
            if not _epilogue(a):
                run.map(k.dx, [g3, x3], params, dest.y3)
            elif x3.size:
                y3 = dest.y3
                dres_f = run.empty() if dres is None else dres.y3.reshape(dres.y3.size)
                run.launch(k.dx_epilogue, map_blocks(y3.size, c * y3.shape[2]))(
                    g3.reshape(g3.size), x3.reshape(x3.size), params, y3.reshape(y3.size), c,
                    y3.shape[2], yf, dres_f)
        x = xi.original
        grads = dest.finish(x), _wrap(dweight, x, run), _wrap(dbias, x, run)
        return grads + (dres.finish(x),) if a.residual_grad else grads

    def batch_stats(self, a):
        """``(count, mean, var)`` (``fastbn._validate.stats_args``); NaN for an empty batch."""
        xi, c, n = a.x, a.channels, a.count
        run = _Run(xi)
        mean, var = run.array(c, a.stats_dtype), run.array(c, a.stats_dtype)
        if c and n:
            x3 = xi.data3(run)
            count, mean_rel, m2 = self._moments(run, x3)
            run.launch(k.finish_stats, _blocks(c))(x3.reshape(x3.size), x3.shape[2], count,
                                                   mean_rel, m2, float(a.ddof), mean, var)
        elif c:
            run.launch(k.fill, _blocks(c))(mean, math.nan)
            run.launch(k.fill, _blocks(c))(var, math.nan)
        x = xi.original
        return n, _wrap(mean, x, run), _wrap(var, x, run)

    # ----------------------------------------------------------------- data normalization
    def _feature_stats(self, run, xi, x3):
        """NaN-free partial moments, minima and maxima of ``x3``: arrays (C, parts)."""
        outer, channels, inner = x3.shape
        names = ("n", "mean", "m2", "min", "max")
        zero = _work_dtype(v.output_dtype(x3.dtype)).type(0)
        xf = x3.reshape(x3.size)
        if inner >= k.PLANE_MIN:
            nparts = _parts(x3.shape)
            arrays = [run.scratch(name, (channels, nparts)) for name in names]
            run.launch(k.plane_features, (_channel_blocks(channels), nparts))(
                xf, outer, channels, inner, nparts, zero, *arrays)
            return arrays
        grid, block, nparts = _row_grid(x3.shape)
        arrays = [run.scratch(name, (channels * inner, nparts)) for name in names]
        run.launch(k.row_features, grid, block)(xf, outer, channels, inner, zero, *arrays)
        return [a.reshape(channels, inner * nparts) for a in arrays]

    def _normalize(self, x, axis, out, make_params, clip=None, width=4, kernel=k.affine):
        xi = _Input(x, "x", axis)
        c = xi.channels
        out_dtype = v.output_dtype(xi.dtype)
        out3 = _out(out, xi, out_dtype)
        run = _Run(xi)
        wd = _work_dtype(out_dtype)
        x3 = xi.data3(run)
        dest = _Output(run, xi, None if out3 is None else _OutArg(out, out3), out_dtype)
        if x3.size:
            params = run.scratch("params", (c, width), wd)
            make_params(run, xi, x3, params)
            run.map(kernel, [x3], params, dest.y3)
            if clip is not None:
                flat = dest.y3.reshape(dest.y3.size)
                run.launch(k.clip, _blocks(flat.size))(flat, clip[0], clip[1])
        return dest.finish(x)

    def standardize(self, x, axis, out):
        def params(run, xi, x3, p):
            count, mean_rel, m2, _, _ = self._feature_stats(run, xi, x3)
            run.launch(k.standardize_params, _blocks(xi.channels))(
                x3.reshape(x3.size), x3.shape[2], count, mean_rel, m2, p)
        return self._normalize(x, axis, out, params)

    def minmax_scale(self, x, axis, feature_range, out, clip=False):
        low, high = feature_range

        def params(run, xi, x3, p):
            _, _, _, vmin, vmax = self._feature_stats(run, xi, x3)
            run.launch(k.minmax_params, _blocks(xi.channels))(vmin, vmax, low, high, p)
        return self._normalize(x, axis, out, params, (low, high) if clip else None, width=7,
                               kernel=k.two_sided)


backend = CUDABackend()

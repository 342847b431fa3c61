"""The argument rules, each written once: the host API, the CUDA backend, ``fastbn.dask``
and ``fastbn.distributed`` all raise these messages.  Every check runs before anything
is written.

The ``check_*`` and ``require_*`` functions take what every array kind has (dtype,
shape) so that host and device arrays and dask arrays obey one rulebook; the
functions below them convert host arrays after checking them.
"""

import math
import numbers
import operator
from types import SimpleNamespace

import numpy as np

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# ----------------------------------------------------------------- the rules

def check_input(name, dtype, ndim):
    """An input (``x``, ``dy``): float16/32/64, an integer or bool dtype; at least 1-D."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biu" and dtype.newbyteorder("=") not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {dtype}: expected float16, float32, "
                        "float64, an integer or bool dtype")
    if ndim == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-d array")


def check_per_channel(name, dtype, shape, channels):
    """A per-channel input (weight, bias, mean, invstd, running statistics in inference)."""
    if np.dtype(dtype).kind not in "biuf":
        raise TypeError(f"{name} must be a real array, got dtype {dtype}")
    if tuple(shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(shape)}")


def check_running_stat(name, dtype, shape, channels):
    """A running statistic updated in place: float32 or float64, shape (C,)."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f" or dtype.itemsize not in (4, 8):
        raise ValueError(f"{name} must have dtype float32 or float64, got {dtype}")
    if tuple(shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(shape)}")


def check_out(name, shape, dtype, want_shape, want_dtype):
    """An output array: exactly the result's shape and dtype."""
    if tuple(shape) != tuple(want_shape):
        raise ValueError(f"{name} must have shape {tuple(want_shape)}, got {tuple(shape)}")
    if dtype != want_dtype:
        raise ValueError(f"{name} must have dtype {want_dtype}, got {dtype}")


def check_same_shape(shape_a, shape_b, name_a, name_b):
    if tuple(shape_a) != tuple(shape_b):
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got "
                         f"{tuple(shape_a)} and {tuple(shape_b)}")


def require_saved_stats(mean, invstd):
    if mean is None or invstd is None:
        raise ValueError("mean and invstd are required: pass the ones the forward returned")


def require_running_stats(running_mean, running_var):
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required in inference")


def require_global_batch(total):
    """Synchronized batch norm: more than one value per channel over all ranks."""
    if total < 2:
        raise ValueError("Expected more than 1 value per channel when training, got a global "
                         f"batch of {total:g} values per channel")


def check_ddof(ddof):
    if isinstance(ddof, (bool, np.bool_)) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise ValueError(f"ddof must be a non-negative integer, got {ddof!r}")
    return int(ddof)


# ----------------------------------------------------------------- host arrays

def as_input(x, name):
    """``np.asarray(x)`` for a real numeric array with at least one dimension."""
    if type(x) is not np.ndarray and hasattr(x, "__cuda_array_interface__"):
        raise TypeError(f"{name} is a CUDA device array; this call computes on the host")
    a = native_order(np.asarray(x))
    check_input(name, a.dtype, a.ndim)
    return a


def native_order(a):
    """``a`` in the machine's byte order: non-native data (``>f4`` on x86, read from a
    big-endian .npy file) is byte-swapped once into a new array."""
    if a.dtype.isnative:
        return a
    return a.astype(a.dtype.newbyteorder("="))


def output_dtype(dtype):
    """Floats keep their dtype (in native byte order); integers and bool are promoted to
    float64 (as ``np.mean``)."""
    dt = np.dtype(dtype).newbyteorder("=")
    return dt if dt in _FLOAT_DTYPES else np.dtype(np.float64)


def stats_dtype(dtype):
    """float64 for float64 (and promoted) input, float32 otherwise."""
    return np.dtype(np.float64) if output_dtype(dtype) == np.float64 else np.dtype(np.float32)


def channel_axis(axis, ndim, name="axis"):
    try:
        ax = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {axis!r}") from None
    if not -ndim <= ax < ndim:
        raise np.exceptions.AxisError(ax, ndim, msg_prefix=name)
    return ax % ndim


def channel_count(shape, axis):
    """Values per channel: the product of every extent but the channel axis."""
    return math.prod(shape[:axis]) * math.prod(shape[axis + 1:])


def require_training_batch(shape, axis):
    n = channel_count(shape, axis)
    if n == 0:
        raise ValueError(
            f"x is an empty batch: shape {tuple(shape)} has no values to reduce over "
            f"(channel axis {axis})"
        )
    if n < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(shape)}"
        )
    return n


def real_scalar(value, name, *, low=None, high=None):
    if type(value) is not float and (
            isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.generic))):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not np.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be finite and {bounds}, got {value!r}")
    return v


def per_channel(value, name, channels):
    """A float64 copy of an optional per-channel vector (weight, bias, mean, ...)."""
    if value is None:
        return None
    if hasattr(value, "__cuda_array_interface__"):
        raise TypeError(f"{name} is a CUDA device array, but x is a host array")
    a = np.asarray(value)
    check_per_channel(name, a.dtype, a.shape, channels)
    return np.array(a, dtype=np.float64, order="C")


def running_stat(value, name, channels):
    """A running statistic updated in place: a writable float32/float64 array of shape (C,)."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray updated in place, got {type(value).__name__}")
    check_running_stat(name, value.dtype, value.shape, channels)
    if not value.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return value


def out_array(out, shape, dtype, name="out"):
    if out is None:
        return None
    if not isinstance(out, np.ndarray) or isinstance(out, (np.matrix, np.ma.MaskedArray)):
        # a matrix stays 2-D under reshape and a masked array's mask would be ignored
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__module__}."
                        f"{type(out).__name__}")
    check_out(name, out.shape, out.dtype, shape, dtype)
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def same_shape(a, b, name_a, name_b):
    check_same_shape(a.shape, b.shape, name_a, name_b)


class HostArrays:
    """How the call descriptions below take host arrays (NumPy, or anything
    ``np.asarray`` takes).  A device backend has its own (``fastbn._cuda.backend``): the
    same methods on device arrays, and the same rules, from the ``check_*`` functions."""

    device = False

    def input(self, value, name):
        return as_input(value, name)

    def at_axis(self, a, axis, like=None):
        """``a`` with its channel axis known (a device array finds its layout here)."""
        return a

    def per_channel(self, value, name, channels):
        return per_channel(value, name, channels)

    def running(self, value, name, channels):
        return running_stat(value, name, channels)

    def out(self, value, x, dtype, name="out"):
        return out_array(value, x.shape, dtype, name)

    def filled(self, channels, value):
        return np.full(channels, float(value))


HOST = HostArrays()


def activation_relu(activation):
    """Whether ``activation`` (None or "relu", contract section 6) asks for ReLU."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":
        return True
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def operand_like(value, name, xa, axis, arrays):
    """An optional array of ``x``'s shape (a residual, the forward's output), any strides
    and float dtype, or None."""
    if value is None:
        return None
    a = arrays.input(value, name)
    check_same_shape(a.shape, xa.shape, name, "x")
    return arrays.at_axis(a, axis, like=xa)


def forward_args(x, weight, bias, axis, eps, running_mean, running_var, momentum, out,
                 arrays=HOST, residual=None, activation=None):
    """The validated call of a training forward, for the backend whose ``arrays`` these
    are (the batch size is the caller's to check: synchronized batch norm checks the
    global one)."""
    xa = arrays.input(x, "x")
    ax = channel_axis(axis, xa.ndim)
    xa = arrays.at_axis(xa, ax)
    channels = xa.shape[ax]
    out_dtype = output_dtype(xa.dtype)
    w = arrays.per_channel(weight, "weight", channels)
    b = arrays.per_channel(bias, "bias", channels)
    relu = activation_relu(activation)
    return SimpleNamespace(
        x=xa, axis=ax, channels=channels, out_dtype=out_dtype, stats_dtype=stats_dtype(xa.dtype),
        weight=arrays.filled(channels, 1.0) if w is None else w,
        bias=arrays.filled(channels, 0.0) if b is None else b,
        eps=real_scalar(eps, "eps", low=0.0),
        momentum=real_scalar(momentum, "momentum", low=0.0, high=1.0),
        running_mean=arrays.running(running_mean, "running_mean", channels),
        running_var=arrays.running(running_var, "running_var", channels),
        residual=operand_like(residual, "residual", xa, ax, arrays), relu=relu,
        out=arrays.out(out, xa, out_dtype))


def inference_args(x, running_mean, running_var, weight, bias, axis, eps, out, arrays=HOST,
                   residual=None, activation=None):
    """The validated call of an inference forward."""
    xa = arrays.input(x, "x")
    ax = channel_axis(axis, xa.ndim)
    xa = arrays.at_axis(xa, ax)
    channels = xa.shape[ax]
    out_dtype = output_dtype(xa.dtype)
    require_running_stats(running_mean, running_var)
    rm = arrays.per_channel(running_mean, "running_mean", channels)
    rv = arrays.per_channel(running_var, "running_var", channels)
    w = arrays.per_channel(weight, "weight", channels)
    b = arrays.per_channel(bias, "bias", channels)
    relu = activation_relu(activation)
    return SimpleNamespace(
        x=xa, axis=ax, channels=channels, out_dtype=out_dtype, running_mean=rm,
        running_var=rv, weight=arrays.filled(channels, 1.0) if w is None else w,
        bias=arrays.filled(channels, 0.0) if b is None else b,
        eps=real_scalar(eps, "eps", low=0.0),
        residual=operand_like(residual, "residual", xa, ax, arrays), relu=relu,
        out=arrays.out(out, xa, out_dtype))


def backward_args(dy, x, mean, invstd, weight, axis, out, arrays=HOST, activation=None,
                  y=None, residual_grad=False, residual_out=None):
    """The validated call of a training backward (with ReLU's mask and the residual's
    gradient, contract section 6)."""
    xa = arrays.input(x, "x")
    dya = arrays.input(dy, "dy")
    check_same_shape(dya.shape, xa.shape, "dy", "x")
    ax = channel_axis(axis, xa.ndim)
    xa = arrays.at_axis(xa, ax)
    dya = arrays.at_axis(dya, ax, like=xa)
    channels = xa.shape[ax]
    out_dtype = np.result_type(output_dtype(dya.dtype), output_dtype(xa.dtype))
    require_saved_stats(mean, invstd)
    w = arrays.per_channel(weight, "weight", channels)
    relu = activation_relu(activation)
    if relu and y is None:
        raise ValueError("activation='relu' needs y, the forward's output (the gradient "
                         "flows where y > 0)")
    if not isinstance(residual_grad, (bool, np.bool_)):
        raise TypeError(f"residual_grad must be True or False, got {residual_grad!r}")
    if residual_out is not None and not residual_grad:
        raise ValueError("residual_out is given but residual_grad is False")
    out_a = arrays.out(out, xa, out_dtype)
    res_out = arrays.out(residual_out, xa, out_dtype, "residual_out") if residual_grad else None
    if out_a is not None and res_out is not None and _same_memory(out_a, res_out):
        raise ValueError("out and residual_out must be different arrays")
    return SimpleNamespace(
        dy=dya, x=xa, axis=ax, channels=channels, out_dtype=out_dtype,
        stats_dtype=stats_dtype(out_dtype), mean=arrays.per_channel(mean, "mean", channels),
        invstd=arrays.per_channel(invstd, "invstd", channels),
        weight=arrays.filled(channels, 1.0) if w is None else w,
        y=operand_like(y, "y", xa, ax, arrays) if relu else None,
        residual_grad=bool(residual_grad), residual_out=res_out, out=out_a)


def _same_memory(a, b):
    """Whether two outputs share any memory (neither may then be written first)."""
    if hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray):
        return a.__cuda_array_interface__["data"][0] == b.__cuda_array_interface__["data"][0]
    return np.may_share_memory(a, b)


def stats_args(x, axis, ddof, arrays=HOST):
    """The validated call of ``batch_stats``."""
    ddof = check_ddof(ddof)
    xa = arrays.input(x, "x")
    ax = channel_axis(axis, xa.ndim)
    xa = arrays.at_axis(xa, ax)
    return SimpleNamespace(x=xa, axis=ax, channels=xa.shape[ax], ddof=ddof,
                           count=channel_count(xa.shape, ax), stats_dtype=stats_dtype(xa.dtype))


F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

# The common host call, checked in O(1): the functions below return None for anything
# else, and the call then takes the general checks above, which convert what they
# can and raise the errors.  They never raise.


def _plain_array(a):
    return (type(a) is np.ndarray and (a.dtype is F32 or a.dtype is F64)
            and a.flags.c_contiguous)


def _plain_vectors(channels, *vectors):
    for a in vectors:
        if a is not None and not (type(a) is np.ndarray and (a.dtype is F32 or a.dtype is F64)
                                  and a.shape == (channels,)):
            return False
    return True


def _plain_out(out, x, inputs, vectors=()):
    """``out`` may be written by the kernels directly: None, or of ``x``'s dtype and shape,
    C-contiguous, writable, an input itself or overlapping none, and overlapping none of the
    per-channel ``vectors`` (read while ``out`` is written: they are used without a copy
    on this path)."""
    if out is None:
        return True
    if not (type(out) is np.ndarray and out.dtype is x.dtype and out.shape == x.shape):
        return False
    flags = out.flags
    if not (flags.c_contiguous and flags.writeable):
        return False
    for a in inputs:  # a loop, not all(generator): this runs on every call
        if out is not a and np.may_share_memory(out, a):
            return False
    for a in vectors:
        if a is not None and np.may_share_memory(out, a):
            return False
    return True


def _plain_axis(x, axis):
    if not _plain_array(x) or type(axis) is not int or not -x.ndim <= axis < x.ndim:
        return None
    return axis % x.ndim


def as_float64(a):
    """A per-channel vector the plain checks accepted, as C-contiguous float64."""
    if a is None or (a.dtype is F64 and a.flags.c_contiguous):
        return a
    return np.ascontiguousarray(a, dtype=np.float64)


def plain_forward_args(x, weight, bias, axis, eps, running_mean, running_var, momentum, out):
    """``(axis, channels, n)`` for a common training forward: C-contiguous float32/float64
    ``x`` with at least 2 values per channel, float32/float64 vectors of shape (C,),
    Python float ``eps`` and ``momentum`` in range, writable running statistics, an
    ``out`` that is ``x`` or a C-contiguous array of its dtype not overlapping it; or None."""
    ax = _plain_axis(x, axis)
    if ax is None or type(eps) is not float or type(momentum) is not float:
        return None
    if not (0.0 <= eps < math.inf and 0.0 <= momentum <= 1.0):
        return None
    channels = x.shape[ax]
    if channels == 0 or x.size // channels < 2:
        return None
    if not _plain_vectors(channels, weight, bias, running_mean, running_var):
        return None
    for r in (running_mean, running_var):
        if r is not None and not r.flags.writeable:
            return None
    if not _plain_out(out, x, (x,), (weight, bias)):
        return None
    return ax, channels, x.size // channels


def plain_inference_args(x, running_mean, running_var, weight, bias, axis, eps, out):
    """``(axis, channels)`` for a common inference call (as ``plain_forward_args``, the
    running statistics required), or None."""
    ax = _plain_axis(x, axis)
    if ax is None or type(eps) is not float or not 0.0 <= eps < math.inf or x.size == 0:
        return None
    channels = x.shape[ax]
    if running_mean is None or running_var is None:
        return None
    if not _plain_vectors(channels, running_mean, running_var, weight, bias):
        return None
    if not _plain_out(out, x, (x,), (running_mean, running_var, weight, bias)):
        return None
    return ax, channels


def plain_backward_args(dy, x, mean, invstd, weight, axis, out):
    """``(axis, channels)`` for a common backward: ``dy`` and ``x`` C-contiguous, of one
    float dtype and shape, at least 2 values per channel, float32/float64 vectors, an
    ``out`` that is ``dy``, ``x`` or overlaps neither; or None."""
    ax = _plain_axis(x, axis)
    if ax is None or not _plain_array(dy) or dy.dtype is not x.dtype or dy.shape != x.shape:
        return None
    channels = x.shape[ax]
    if channels == 0 or x.size // channels < 2 or mean is None or invstd is None:
        return None
    if not _plain_vectors(channels, mean, invstd, weight):
        return None
    if not _plain_out(out, x, (dy, x), (mean, invstd, weight)):
        return None
    return ax, channels

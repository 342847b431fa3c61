"""The operators' short road to the CPU kernels.

In a network every batch norm follows a convolution, which leaves the core's caches and
branch predictors full of its own work: the Python that runs between the two then costs
several times what it costs in a loop.  Measured on the 2-core machine of the README, a
call on a tiny tensor right after a convolution took 191 us through ``fastbn``'s NumPy
API and 330 us through the operator (17.8 us and 67 us in a loop), against 56 us for
PyTorch's own batch norm and ReLU.  This module takes the common case straight to the
kernels' plans (``fastbn._cpu.kernels.run_*``) with the (outer, C, inner) views the API
would have built:

- the input is a CPU tensor of float32 or float64, contiguous or channels_last, with at
  least one value;
- every activation operand (residual, ``y``, ``dy``) and output has the input's dtype
  and strides;
- the per-channel tensors have shape (C,) and a float dtype (running statistics: float32
  or float64);
- every tensor is a strided CPU tensor whose ``numpy()`` is a view of its values.

Anything else returns None, and the operator takes ``fastbn``'s general API, which
converts, copies where it must, and raises its errors, or PyTorch's kernel
(``_ops.why_not_fastbn``): what this path accepts, those accept too, so the operators try
it first and check the rest only when it refuses.  The arithmetic is the same kernels'
either way, so the bits are the same.
"""

import numpy as np
import torch

from .. import _moments
from .._cpu import backend as host
from .._cpu import kernels

WORK_DTYPES = (torch.float32, torch.float64)

# Calls on inputs below this many bytes run the kernels' serial twins on the calling
# thread.  Right after a convolution PyTorch's OpenMP workers spin on the other cores and
# the threading layer's entry is cold: measured on the README's 2-core machine, a
# channels_last training forward of (32, 256, 7, 7) took 0.23 ms serial against 0.39 ms on
# two threads (PyTorch's batch norm and ReLU: 0.21 ms), (32, 128, 14, 14) 0.48 against
# 0.62 ms, and (32, 64, 28, 28), 6.4 MB, 1.30 against 1.26 ms; backward (with ReLU's
# mask), the same order or better up to 6.4 MB.  The same plans give the same bits.
# That is the column path's (short runs: channels_last, or spatial sizes under MIN_RUN),
# whose parallel calls enter the threading layer twice (statistics, then the map).
SERIAL_MAX_BYTES = 8 << 20

# The channel path (contiguous runs of at least MIN_RUN values) enters it once, and its
# second thread paid off from smaller inputs, right after a convolution: contiguous
# (32, 64, 28, 28), 6.4 MB, forward 0.53 ms on two threads against 0.67 serial, backward
# 1.22 against 1.49; (32, 128, 14, 14), 3.2 MB, backward 0.72 against 0.91 (forward
# even).
CHANNEL_SERIAL_MAX_BYTES = 2 << 20

_STATS_DTYPES = (torch.float32, torch.float64)
_PARAM_DTYPES = (torch.float16, torch.float32, torch.float64)


def _call(x3):
    """``host._call`` for the (outer, C, inner) input ``x3``, on the serial twins below
    SERIAL_MAX_BYTES (column path) or CHANNEL_SERIAL_MAX_BYTES (channel path)."""
    column = x3.shape[2] < host.MIN_RUN
    return host._call(x3, twins_below=SERIAL_MAX_BYTES if column else CHANNEL_SERIAL_MAX_BYTES)


def view3(t):
    """The (outer, C, inner) NumPy view of ``t``'s memory that the kernels take: (N, C,
    prod(spatial)) when contiguous, (N * prod(spatial), C, 1) when channels-last; None for
    any other layout or dtype, or an empty tensor."""
    if t.dtype not in WORK_DTYPES or t.dim() < 2 or t.numel() == 0 or not _plain_cpu(t):
        return None
    a = t.detach().numpy()
    n, c = a.shape[0], a.shape[1]
    if a.flags.c_contiguous:
        a3 = a.reshape(n, c, -1)
    else:
        last = a.transpose((0,) + tuple(range(2, a.ndim)) + (1,))
        if not last.flags.c_contiguous:
            return None
        a3 = last.reshape(-1, c, 1)
    return a3 if a3.flags.aligned else None


def like(t, x, x3):
    """``t`` viewed as ``x3`` is, when it has ``x``'s shape, dtype and strides; else None."""
    if t.dtype != x.dtype or t.shape != x.shape or t.stride() != x.stride():
        return None
    return view3(t)


def _plain_cpu(t):
    """Whether ``t.numpy()`` is a view of ``t``'s values: a strided CPU tensor without a
    negative bit (conjugate and quantized tensors fail the dtype checks first)."""
    return t.is_cpu and t.layout == torch.strided and not t.is_neg()


def per_channel(t, channels, fill):
    """A float64 (C,) copy of a per-channel tensor (``fill`` where it is None), or a (C,)
    float array as float64 (itself when it is one already: the kernels only read it);
    None when it is not one of those (shape, dtype, device), which the general API then
    handles."""
    if t is None:
        return np.full(channels, fill)
    if type(t) is np.ndarray:
        if t.shape != (channels,) or t.dtype.kind != "f":
            return None
        return t.astype(np.float64, copy=False)
    if t.shape != (channels,) or t.dtype not in _PARAM_DTYPES or not _plain_cpu(t):
        return None
    return t.detach().numpy().astype(np.float64)


def running(t, channels):
    """The NumPy view of a running statistic updated in place, or None when it is not a
    (C,) CPU tensor of the kernels' stats dtypes (the general API then reports it)."""
    if t.dtype not in _STATS_DTYPES or t.shape != (channels,) or not _plain_cpu(t):
        return None
    return t.detach().numpy()


def _finite_at_least_zero(value):
    return value >= 0.0 and value != float("inf")


def _forward_operands(input, weight, bias, residual, y):
    """``(x3, y3, res3, w, b)`` of a forward into ``y``, or None where the general API must
    take the call."""
    x3 = view3(input)
    if x3 is None:
        return None
    y3 = like(y, input, x3)
    res3 = None if residual is None else like(residual, input, x3)
    channels = x3.shape[1]
    w = per_channel(weight, channels, 1.0)
    b = per_channel(bias, channels, 0.0)
    if y3 is None or (residual is not None and res3 is None) or w is None or b is None:
        return None
    return x3, y3, res3, w, b


def forward_train(input, weight, bias, residual, running_mean, running_var, momentum, eps,
                  relu, y):
    """Training forward into ``y``; ``running_mean``/``running_var`` (the buffers, or the
    registered operator's copies) updated once the kernel succeeded.  Returns float64
    ``(mean, invstd, weight)`` (weight: ones where None), or None where the general API
    must take the call."""
    if not _finite_at_least_zero(eps) or not 0.0 <= momentum <= 1.0:
        return None  # the API's errors
    operands = _forward_operands(input, weight, bias, residual, y)
    if operands is None:
        return None
    x3, y3, res3, w, b = operands
    count, channels = x3.shape[0] * x3.shape[2], x3.shape[1]
    tracked = running_mean is not None or running_var is not None
    rm = None if running_mean is None else running(running_mean, channels)
    rv = None if running_var is None else running(running_var, channels)
    if count < 2 or (tracked and (rm is None or rv is None)):
        return None  # the API's errors: one value per channel, the running statistics
    mean, var, invstd = np.empty(channels), np.empty(channels), np.empty(channels)
    with _call(x3) as call:
        call.k.run_forward_train(x3, w, b, float(eps), y3, mean, var, invstd, call.n,
                                 host.MIN_RUN, res3, bool(relu))
    if rm is not None:
        _moments.update_running_stats(rm, rv, mean, var, count, momentum)
    return mean, invstd, w


def inference(input, weight, bias, residual, running_mean, running_var, eps, relu, y):
    """Inference into ``y``; True, or None where the general API must take the call."""
    if not _finite_at_least_zero(eps):
        return None
    operands = _forward_operands(input, weight, bias, residual, y)
    if operands is None:
        return None
    x3, y3, res3, w, b = operands
    channels = x3.shape[1]
    mean = per_channel(running_mean, channels, 0.0)
    var = per_channel(running_var, channels, 1.0)
    if mean is None or var is None:
        return None
    scale = kernels.inference_scale(var, float(eps), w)
    with _call(x3) as call:
        call.k.run_affine(x3, mean, np.zeros(channels), scale, b, y3, call.n, host.MIN_RUN,
                          res3, bool(relu))
    return True


def backward_train(grad, input, weight, save_mean, save_invstd, y, relu, dx, dres):
    """Training backward into ``dx`` (and ``dres`` where it is not None).  ``weight``,
    ``save_mean`` and ``save_invstd`` are tensors or NumPy arrays (the eager forward's).  Returns
    float64 ``(dweight, dbias)``, or None where the general API must take the call."""
    x3 = view3(input)
    if x3 is None:
        return None
    dy3 = like(grad, input, x3)
    dx3 = like(dx, input, x3)
    y3 = like(y, input, x3) if relu else None
    dres3 = host._unwritten(x3.dtype) if dres is None else like(dres, input, x3)
    if dy3 is None or dx3 is None or dres3 is None or (relu and y3 is None):
        return None
    channels = x3.shape[1]
    w = per_channel(weight, channels, 1.0)
    mean = per_channel(save_mean, channels, 0.0)
    invstd = per_channel(save_invstd, channels, 1.0)
    if w is None or mean is None or invstd is None:
        return None
    s, sx = np.empty(channels), np.empty(channels)
    with _call(x3) as call:
        call.k.run_backward_train(dy3, x3, mean, invstd, w, dx3, s, sx, call.n, host.MIN_RUN,
                                  y3, dres3)
    return sx * invstd, s

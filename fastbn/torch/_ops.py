"""fastbn's batch norm as PyTorch operators (``torch.library``, namespace ``fastbn``).

Three operators, each with a fake kernel (shapes only, for ``torch.compile``) and the
first two with autograd formulas:

- ``fastbn::batch_norm_train``: batch statistics, normalized output, optional residual
  and ReLU (CONTRACT section 6), and the updated running statistics;
- ``fastbn::batch_norm_infer``: the same with given statistics;
- ``fastbn::batch_norm_backward``: the training forward's gradients.

CPU tensors that fastbn computes are handed to the kernels as NumPy views of their own
memory (``Tensor.numpy()`` shares it), and the outputs are tensors PyTorch allocated
with the input's memory format, written through such views: no activation is copied.
CUDA tensors go to fastbn's CUDA backend through ``__cuda_array_interface__`` when a GPU
is usable.  Anything else (bfloat16, half running statistics, a sparse or quantized
tensor, a GPU without numba-cuda) runs PyTorch's own kernel and is counted in
:func:`stats`.
"""

import functools
import threading
from collections import Counter
from typing import Optional

import numpy as np
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

import fastbn

from . import _host
from ._fallback import (reduced_dims, reference_backward, reference_forward,
                        reference_inference, stats_dtype)

Tensor = torch.Tensor

_HOST_DTYPES = (torch.float16, torch.float32, torch.float64)
_STATS_DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_counts = Counter()


def stats():
    """How often each operator ran on fastbn's kernels and on PyTorch's fallback.

    Returns
    -------
    dict
        ``{"fastbn": {op: calls}, "fallback": {op: calls}, "fallback_reasons":
        {reason: calls}}``; op is ``"train"``, ``"infer"`` or ``"backward"``.
    """
    with _lock:
        out = {"fastbn": {}, "fallback": {}, "fallback_reasons": {}}
        for (kind, key), n in _counts.items():
            out[kind][key] = n
        return out


def reset_stats():
    """Set every :func:`stats` counter back to zero."""
    with _lock:
        _counts.clear()


def _count(kind, key):
    with _lock:
        _counts[(kind, key)] += 1


def _plain_strided(t):
    return (t.layout == torch.strided and not t.is_conj() and not t.is_neg()
            and not t.is_quantized)


@functools.lru_cache(maxsize=1)
def _cuda_usable():
    try:
        from numba import cuda
        return cuda.is_available()
    except Exception:  # numba-cuda missing or no driver
        return False


def why_not_fastbn(input, weight=None, bias=None, residual=None, running_mean=None,
                   running_var=None, others=()):
    """None when fastbn computes this call, else a short reason for the fallback."""
    device = input.device
    tensors = [t for t in (input, weight, bias, residual, running_mean, running_var, *others)
               if t is not None]
    if any(t.device != device for t in tensors):
        return "tensors on different devices"
    if device.type == "cuda":
        if not _cuda_usable():
            return "CUDA tensor without a usable numba-cuda"
    elif device.type != "cpu":
        return f"device {device.type}"
    if input.dtype not in _HOST_DTYPES:
        return f"dtype {input.dtype}"
    if residual is not None and residual.dtype not in _HOST_DTYPES:
        return f"residual dtype {residual.dtype}"
    for t in (weight, bias, *others):
        if t is not None and t.dtype not in _HOST_DTYPES:
            return f"dtype {t.dtype}"
    for t in (running_mean, running_var):
        if t is not None and t.dtype not in _STATS_DTYPES:
            return f"running statistics of dtype {t.dtype}"
    if not all(_plain_strided(t) for t in tensors):
        return "not a plain strided tensor"
    return None


def _np(t):
    """The array fastbn reads or writes for tensor ``t``: a NumPy view of a CPU tensor's
    memory, the tensor itself on CUDA (``__cuda_array_interface__``)."""
    if t is None:
        return None
    t = t.detach()
    return t.numpy() if t.device.type == "cpu" else t


def _torch_thread_count():
    """fastbn's kernels use at most PyTorch's intra-op thread count (1 in a DataLoader
    worker, whatever ``torch.set_num_threads`` said), so the two pools never
    oversubscribe the cores more than PyTorch alone would."""
    return fastbn.threads(max(1, torch.get_num_threads()))


def _fallback(op, reason):
    _count("fallback", op)
    _count("fallback_reasons", reason)


def _activation(relu):
    return "relu" if relu else None


# --- training forward ---------------------------------------------------------------

@torch.library.custom_op("fastbn::batch_norm_train", mutates_args=())
def batch_norm_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     residual: Optional[Tensor], running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], momentum: float, eps: float,
                     relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training batch norm: ``(y, save_mean, save_invstd, new_running_mean,
    new_running_var)``.

    Functional, so that it can carry an autograd formula: the updated running statistics
    are returned (empty without running statistics), and
    :func:`fastbn.torch.batch_norm` copies them into the buffers.
    """
    new_rm, new_rv = _updatable_copies(running_mean, running_var)
    return train_impl(input, weight, bias, residual, new_rm, new_rv, momentum, eps, relu)


def train_impl(input, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
    """The training forward, updating ``running_mean``/``running_var`` in place (the
    operator passes copies) only once it succeeded; the operator's five outputs."""
    y, mean, invstd, _ = _train_core(input, weight, bias, residual, running_mean, running_var,
                                     momentum, eps, relu)
    return (y, _stats_tensor(mean, input), _stats_tensor(invstd, input),
            _or_empty(running_mean, input), _or_empty(running_var, input))


def _train_core(input, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
    """``(y, mean, invstd, weight64)``.  When fastbn's host path computed the call, the
    statistics are its float64 arrays and ``weight64`` the float64 weight it used (the
    eager backward reuses it); otherwise ``weight64`` is None.  The statistics are
    arrays or tensors for :func:`_stats_tensor`."""
    y = None
    if input.is_cpu and input.dtype in _host.WORK_DTYPES:
        y = torch.empty_like(input)
        with _torch_thread_count():
            fast = _host.forward_train(input, weight, bias, residual, running_mean,
                                       running_var, momentum, eps, relu, y)
        if fast is not None:
            _count("fastbn", "train")
            return (y, *fast)
    reason = why_not_fastbn(input, weight, bias, residual, running_mean, running_var)
    if reason is not None:
        _fallback("train", reason)
        y, mean, invstd = reference_forward(input, weight, bias, residual, running_mean,
                                            running_var, momentum, eps, relu)
        return y, mean, invstd, None
    if y is None:
        y = torch.empty_like(input)
    with _torch_thread_count():
        _, mean, invstd = fastbn.batch_norm_forward(
            _np(input), _np(weight), _np(bias), axis=1, eps=eps,
            running_mean=_np(running_mean), running_var=_np(running_var),
            momentum=momentum, residual=_np(residual), activation=_activation(relu), out=_np(y))
    _count("fastbn", "train")
    return y, mean, invstd, None


def _updatable_copies(running_mean, running_var):
    if running_mean is None or running_var is None:
        return None, None
    return running_mean.clone(), running_var.clone()


def _or_empty(t, like):
    return like.new_empty((0,)) if t is None else t


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _stats_tensor(a, input):
    """Per-channel statistics ``a`` (an array of fastbn's, or already a tensor) as a tensor
    of ``input``'s stats dtype on its device."""
    if isinstance(a, Tensor):
        return a
    return _as_tensor(a, input.device, stats_dtype(input.dtype))


def _stats_array(a, input):
    """The host forward's float64 statistics ``a`` rounded to ``input``'s stats dtype, as
    the operator's outputs are (so that the eager backward computes with the same
    values as the operator's)."""
    return a.astype(_NUMPY_DTYPES[stats_dtype(input.dtype)], copy=False)


def _as_tensor(a, device, dtype):
    """The float64 array ``a`` as a tensor of ``dtype`` (a stats dtype) on ``device``.  On
    the CPU NumPy converts and the tensor takes the result's memory: one allocation,
    not two, on every call's path."""
    if device.type == "cpu":
        return torch.from_numpy(a.astype(_NUMPY_DTYPES[dtype], copy=False))
    return torch.as_tensor(a, device=device).to(dtype)


@batch_norm_train.register_fake
def _(input, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
    c = input.shape[1]
    sd = stats_dtype(input.dtype)
    new_rm = input.new_empty((0,)) if running_mean is None else torch.empty_like(running_mean)
    new_rv = input.new_empty((0,)) if running_var is None else torch.empty_like(running_var)
    return (torch.empty_like(input), input.new_empty((c,), dtype=sd),
            input.new_empty((c,), dtype=sd), new_rm, new_rv)


# --- inference ------------------------------------------------------------------------

@torch.library.custom_op("fastbn::batch_norm_infer", mutates_args=())
def batch_norm_infer(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     residual: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                     eps: float, relu: bool) -> Tensor:
    """Inference batch norm with the given statistics, optional residual and ReLU."""
    return infer_impl(input, weight, bias, residual, running_mean, running_var, eps, relu)


def infer_impl(input, weight, bias, residual, running_mean, running_var, eps, relu):
    y = None
    if input.is_cpu and input.dtype in _host.WORK_DTYPES:
        y = torch.empty_like(input)
        with _torch_thread_count():
            done = _host.inference(input, weight, bias, residual, running_mean, running_var,
                                   eps, relu, y)
        if done:
            _count("fastbn", "infer")
            return y
    reason = why_not_fastbn(input, weight, bias, residual, running_mean, running_var)
    if reason is not None:
        _fallback("infer", reason)
        return reference_inference(input, weight, bias, residual, running_mean, running_var,
                                   eps, relu)
    if y is None:
        y = torch.empty_like(input)
    with _torch_thread_count():
        fastbn.batch_norm_inference(
            _np(input), _np(running_mean), _np(running_var), _np(weight), _np(bias),
            axis=1, eps=eps, residual=_np(residual), activation=_activation(relu),
            out=_np(y))
    _count("fastbn", "infer")
    return y


@batch_norm_infer.register_fake
def _(input, weight, bias, residual, running_mean, running_var, eps, relu):
    return torch.empty_like(input)


# --- backward ---------------------------------------------------------------------------

@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad: Tensor, input: Tensor, weight: Optional[Tensor],
                        save_mean: Tensor, save_invstd: Tensor, y: Optional[Tensor],
                        relu: bool, residual_grad: bool) -> tuple[Tensor, Tensor, Tensor,
                                                                  Tensor]:
    """Gradients of the training forward: ``(dx, dweight, dbias, dresidual)``.

    ``dweight``/``dbias`` are in the stats dtype; ``dresidual`` is empty unless
    ``residual_grad``.
    """
    return backward_impl(grad, input, weight, save_mean, save_invstd, y, relu, residual_grad)


def backward_impl(grad, input, weight, save_mean, save_invstd, y, relu, residual_grad,
                  weight64=None):
    """The backward operator's outputs.  ``save_mean``/``save_invstd`` may be NumPy arrays
    of the stats dtype, with ``weight64`` the host forward's float64 weight (the eager
    path)."""
    dx = dres = None
    if input.is_cpu and input.dtype in _host.WORK_DTYPES:
        dx = torch.empty_like(input)
        dres = torch.empty_like(input) if residual_grad else input.new_empty((0,))
        with _torch_thread_count():
            fast = _host.backward_train(
                grad, input, weight if weight64 is None else weight64, save_mean,
                save_invstd, y, relu, dx, dres if residual_grad else None)
        if fast is not None:
            _count("fastbn", "backward")
            return (dx, _stats_tensor(fast[0], input), _stats_tensor(fast[1], input), dres)
    save_mean, save_invstd = _stats_tensor(save_mean, input), _stats_tensor(save_invstd, input)
    reason = why_not_fastbn(input, weight, others=(grad, save_mean, save_invstd)
                            + ((y,) if y is not None else ()))
    if reason is not None:
        _fallback("backward", reason)
        return reference_backward(grad, input, weight, save_mean, save_invstd, y, relu,
                                  residual_grad)
    if dx is None:
        dx = torch.empty_like(input)
        dres = torch.empty_like(input) if residual_grad else input.new_empty((0,))
    with _torch_thread_count():
        result = fastbn.batch_norm_backward(
            _np(grad), _np(input), _np(save_mean), _np(save_invstd), _np(weight), axis=1,
            activation=_activation(relu), y=_np(y) if relu else None, out=_np(dx),
            residual_grad=residual_grad, residual_out=_np(dres) if residual_grad else None)
    _count("fastbn", "backward")
    return dx, _stats_tensor(result[1], input), _stats_tensor(result[2], input), dres


@batch_norm_backward.register_fake
def _(grad, input, weight, save_mean, save_invstd, y, relu, residual_grad):
    c = input.shape[1]
    sd = stats_dtype(input.dtype)
    dres = torch.empty_like(input) if residual_grad else input.new_empty((0,))
    return (torch.empty_like(input), input.new_empty((c,), dtype=sd),
            input.new_empty((c,), dtype=sd), dres)


# --- autograd -------------------------------------------------------------------------

def _train_setup(ctx, inputs, output):
    y, mean, invstd, new_rm, new_rv = output
    ctx.mark_non_differentiable(mean, invstd, new_rm, new_rv)
    _save_train(ctx, inputs, y, mean, invstd)


def _save_train(ctx, inputs, y, mean, invstd, host=None):
    """What the backward needs.  ``host``: the host forward's ``(mean, invstd, weight64)``
    as NumPy arrays (the statistics rounded to the stats dtype), kept instead of the
    statistics tensors (eager path)."""
    input, weight, bias, residual, _, _, _, _, relu = inputs
    ctx.host = host
    ctx.relu = relu
    ctx.eps = inputs[7]
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.param_dtypes = (None if weight is None else weight.dtype,
                        None if bias is None else bias.dtype)
    ctx.save_for_backward(input, weight, mean, invstd, y if relu else None)


def _train_backward(ctx, grad_y, *_stats_grads):
    input, weight, mean, invstd, y = ctx.saved_tensors
    need = ctx.needs_input_grad
    want_res = ctx.has_residual and need[3]
    if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
        dx, dweight, dbias, dres = _composite_train_backward(grad_y, input, weight, y,
                                                             ctx.eps)
    elif eager(grad_y, input):
        weight64 = None
        if ctx.host is not None:
            mean, invstd, weight64 = ctx.host
        dx, dweight, dbias, dres = backward_impl(grad_y, input, weight, mean, invstd, y,
                                                 ctx.relu, want_res, weight64)
    else:
        if ctx.host is not None:
            mean, invstd = (_stats_tensor(a, input) for a in ctx.host[:2])
        dx, dweight, dbias, dres = batch_norm_backward(grad_y, input, weight, mean, invstd, y,
                                                       ctx.relu, want_res)
    wdt, bdt = ctx.param_dtypes
    return (dx if need[0] else None,
            dweight.to(wdt) if weight is not None and need[1] else None,
            dbias.to(bdt) if bdt is not None and need[2] else None,
            dres.to(ctx.residual_dtype) if want_res else None,
            None, None, None, None, None)


def _composite_train_backward(grad_y, input, weight, y, eps):
    """The training backward from PyTorch's differentiable ops, for double backward: the
    statistics are recomputed from ``input`` so that their dependence on it is seen."""
    dims, shape = reduced_dims(input)
    sd = stats_dtype(input.dtype)
    g = (grad_y if y is None else grad_y * (y > 0)).to(sd)
    x = input.to(sd)
    n = x.numel() // x.shape[1]
    mean = x.mean(dims, keepdim=True)
    invstd = torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)
    xhat = (x - mean) * invstd
    dbias = g.sum(dims)
    dweight = (g * xhat).sum(dims)
    scale = invstd if weight is None else invstd * weight.to(sd).view(shape)
    dx = scale * (g - (dbias.view(shape) + xhat * dweight.view(shape)) / n)
    return dx.to(input.dtype), dweight, dbias, g.to(input.dtype)


batch_norm_train.register_autograd(_train_backward, setup_context=_train_setup)


def _infer_setup(ctx, inputs, output):
    input, weight, bias, residual, running_mean, running_var, eps, relu = inputs
    ctx.eps = eps
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(input, weight, running_mean, running_var, output if relu else None)


def _infer_backward(ctx, grad_y):
    # Elementwise and two per-channel sums: PyTorch's own ops, differentiable again.
    input, weight, running_mean, running_var, y = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = grad_y if y is None else grad_y * (y > 0)
    dims, shape = reduced_dims(input)
    invstd = torch.rsqrt(running_var.to(stats_dtype(input.dtype)) + ctx.eps)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    dx = (g * scale.view(shape)).to(input.dtype) if need[0] else None
    dweight = dbias = None
    if weight is not None and need[1]:
        xhat = (input - running_mean.view(shape)) * invstd.view(shape)
        dweight = (g * xhat).sum(dims, dtype=invstd.dtype).to(weight.dtype)
    if ctx.bias_dtype is not None and need[2]:
        dbias = g.sum(dims, dtype=invstd.dtype).to(ctx.bias_dtype)
    dres = g.to(ctx.residual_dtype) if ctx.has_residual and need[3] else None
    return dx, dweight, dbias, dres, None, None, None, None


batch_norm_infer.register_autograd(_infer_backward, setup_context=_infer_setup)


# --- eager calls ----------------------------------------------------------------------
# The registered operators are what torch.compile, fx, jit tracing, fake tensors and
# dispatch modes see.  An eager call on plain CPU tensors does not need their Python
# dispatch (argument defaults, redispatch, the autograd wrapper: about 15 us in a loop,
# several times that right after a convolution, fastbn.torch._host): it runs the same
# implementation through a plain autograd.Function, or with no autograd at all when no
# gradient is wanted.

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors):
    """True when a call on ``tensors`` (None allowed) may skip the operators' dispatch:
    plain CPU tensors, and no compiling, tracing or Python mode active."""
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or not t.is_cpu):
            return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or _get_current_dispatch_mode() is not None
                or torch._C._is_torch_function_mode_enabled())


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Train(torch.autograd.Function):
    """The training operator's eager twin: ``y``, the running statistics updated in place."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, momentum, eps,
                relu):
        y, mean, invstd, weight64 = _train_core(input, weight, bias, residual, running_mean,
                                                running_var, momentum, eps, relu)
        inputs = (input, weight, bias, residual, running_mean, running_var, momentum, eps,
                  relu)
        if weight64 is not None:  # the statistics stay arrays, as the operator rounds them
            _save_train(ctx, inputs, y, None, None,
                        host=(_stats_array(mean, input), _stats_array(invstd, input), weight64))
        else:
            _save_train(ctx, inputs, y, _stats_tensor(mean, input),
                        _stats_tensor(invstd, input))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _train_backward(ctx, grad_y)


class _Infer(torch.autograd.Function):
    """The inference operator's eager twin."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, eps, relu):
        y = infer_impl(input, weight, bias, residual, running_mean, running_var, eps, relu)
        _infer_setup(ctx, (input, weight, bias, residual, running_mean, running_var, eps,
                           relu), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _infer_backward(ctx, grad_y)


def train_eager(input, weight, bias, residual, running_mean, running_var, momentum, eps,
                relu):
    """``y`` of a training call that ``eager`` allows; the running statistics (both or
    neither) updated in place once it succeeded."""
    if _wants_grad(input, weight, bias, residual):
        return _Train.apply(input, weight, bias, residual, running_mean, running_var, momentum,
                            eps, relu)
    return train_impl(input, weight, bias, residual, running_mean, running_var, momentum, eps,
                      relu)[0]


def infer_eager(input, weight, bias, residual, running_mean, running_var, eps, relu):
    """``y`` of an inference call that ``eager`` allows."""
    if _wants_grad(input, weight, bias, residual):
        return _Infer.apply(input, weight, bias, residual, running_mean, running_var, eps, relu)
    return infer_impl(input, weight, bias, residual, running_mean, running_var, eps, relu)

"""PyTorch's own kernels for what fastbn does not compute (bfloat16, half running
statistics, other devices): the same operator contracts as ``_ops``, built from
``native_batch_norm`` and its backward."""

import torch


def stats_dtype(dtype):
    """The dtype of mean and invstd: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduced_dims(input):
    """``(dims, shape)``: the dims a per-channel sum reduces over (all but 1), and the shape
    that broadcasts a (C,) tensor against ``input``."""
    return [0] + list(range(2, input.dim())), (1, -1) + (1,) * (input.dim() - 2)


def _act(y, residual, relu):
    if residual is not None:
        y = y + residual.to(y.dtype)
    return torch.relu(y) if relu else y


def reference_forward(input, weight, bias, residual, running_mean, running_var, momentum, eps,
                      relu):
    y, mean, invstd = torch.ops.aten.native_batch_norm(
        input, weight, bias, running_mean, running_var, True, momentum, eps)
    sd = stats_dtype(input.dtype)
    return _act(y, residual, relu), mean.to(sd), invstd.to(sd)


def reference_inference(input, weight, bias, residual, running_mean, running_var, eps, relu):
    y, _, _ = torch.ops.aten.native_batch_norm(
        input, weight, bias, running_mean, running_var, False, 0.0, eps)
    return _act(y, residual, relu)


def reference_backward(grad, input, weight, save_mean, save_invstd, y, relu, residual_grad):
    g = torch.ops.aten.threshold_backward(grad, y, 0) if relu else grad
    sd = stats_dtype(input.dtype)
    if weight is None:  # a weight of ones gives the same dx, and dweight besides
        weight = torch.ones(input.shape[1], dtype=sd, device=input.device)
    dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
        g, input, weight, None, None, save_mean, save_invstd, True, 0.0, [True, True, True])
    dres = g.clone() if residual_grad else input.new_empty((0,))
    return dx, dweight.to(sd), dbias.to(sd), dres

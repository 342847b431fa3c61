"""``batch_norm`` and ``batch_norm_act``: ``torch.nn.functional.batch_norm`` on fastbn's
operators, autograd-aware (CONTRACT section 7)."""

import torch

from . import _ops

__all__ = ["batch_norm", "batch_norm_act"]

_ACTIVATIONS = (None, "relu")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch normalization with ``torch.nn.functional.batch_norm``'s signature.

    Parameters
    ----------
    input : Tensor
        (N, C, ...) of float16, float32 or float64, contiguous or channels_last (other
        dtypes and layouts run PyTorch's kernel, see :func:`fastbn.torch.stats`).
    running_mean, running_var : Tensor of shape (C,) or None
        Updated in place in training; used for normalization otherwise.
    weight, bias : Tensor of shape (C,), optional
    training : bool
        Batch statistics (True) or the running ones (False).
    momentum : float
        Weight of the batch statistics in the running update.
    eps : float

    Returns
    -------
    Tensor
        The input's shape, dtype and memory format.
    """
    return batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum,
                          eps, activation=None)


def batch_norm_act(input, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5, residual=None, activation="relu"):
    """``act(batch_norm(input) + residual)`` in one pass (CONTRACT sections 6 and 7).

    Parameters are those of :func:`batch_norm`, plus

    residual : Tensor, optional
        The input's shape; added before the activation (ResNet's shortcut).  Its
        gradient is returned by autograd.
    activation : {"relu", None}

    Returns
    -------
    Tensor
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, ...), got shape "
                         f"{tuple(input.shape)}")
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"residual must have input's shape {tuple(input.shape)}, got "
                         f"{tuple(residual.shape)}")
    relu = activation == "relu"
    if training:
        size = input.numel() // input.shape[1] if input.shape[1] else 0
        if size <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"input size {torch.Size(input.shape)}")
        track = running_mean is not None and running_var is not None
        if _ops.eager(input, weight, bias, residual, running_mean, running_var):
            return _ops.train_eager(input, weight, bias, residual,
                                    running_mean if track else None,
                                    running_var if track else None, float(momentum),
                                    float(eps), relu)
        y, _, _, new_rm, new_rv = _ops.batch_norm_train(
            input, weight, bias, residual, running_mean, running_var, float(momentum),
            float(eps), relu)
        if track:
            with torch.no_grad():
                running_mean.copy_(new_rm)
                running_var.copy_(new_rv)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when not training")
    call = (_ops.infer_eager if _ops.eager(input, weight, bias, residual, running_mean,
                                           running_var) else _ops.batch_norm_infer)
    return call(input, weight, bias, residual, running_mean, running_var, float(eps), relu)

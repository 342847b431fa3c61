"""The public functional API (docs/contract.md sections 1 and 2).

Each function validates every argument first, so that a bad call raises before
anything visible changes, then hands plain arrays to the backend that
``fastbn._dispatch`` picks for them.
"""

import warnings

import numpy as np

from . import _validate as v
from ._dispatch import backend_for, host_backend
from ._moments import update_running_stats

__all__ = [
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_inference",
    "batch_norm",
    "batch_stats",
]


def _ones_or(a, channels):
    return np.ones(channels) if a is None else a


def _zeros_or(a, channels):
    return np.zeros(channels) if a is None else a


def batch_norm_forward(x, weight=None, bias=None, *, axis=1, eps=1e-5, running_mean=None,
                       running_var=None, momentum=0.1, residual=None, activation=None, out=None):
    """Training-mode batch normalization: batch statistics and normalized output in one pass.

    Parameters
    ----------
    x : array_like
        Input of any shape with at least one dimension.  float16, float32 and
        float64 keep their dtype; integer and bool input is promoted to float64.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale (gamma, default 1) and shift (beta, default 0).
    axis : int, default 1
        The channel axis, which is kept; statistics reduce over all others.
    eps : float, default 1e-5
        Added to the variance before the square root; must be >= 0.
    running_mean, running_var : ndarray of shape (C,), optional
        float32 or float64 running statistics, updated in place with
        ``momentum`` (the variance update uses the unbiased batch variance).
    momentum : float, default 0.1
        Weight of the batch statistics in the running update, in [0, 1].
    residual : array_like, optional
        Added to the normalized output before the activation, in the same pass
        (ResNet's shortcut): ``x``'s shape, any strides and float dtype.  The
        statistics are those of ``x`` alone.
    activation : {None, "relu"}
        Applied last, in the same pass.
    out : ndarray, optional
        Where to write ``y``: the shape of ``x`` and its output dtype; may be
        ``x`` or ``residual`` itself.

    Returns
    -------
    y : ndarray
        ``act(weight * (x - mean) * invstd + bias + residual)``.
    mean, invstd : ndarray of shape (C,)
        Batch mean and ``1 / sqrt(var + eps)`` (biased variance; 0 where
        ``var + eps == 0``), float64 for float64 input, float32 otherwise.

    Raises
    ------
    ValueError
        On a bad shape, axis, eps, momentum or ``out``, on an empty batch, or
        with one value per channel.  Nothing is written when it raises.
    TypeError
        On an unsupported dtype.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, (8, 3, 4, 4)).astype(np.float32)
    >>> y, mean, invstd = fastbn.batch_norm_forward(x)
    >>> bool(abs(y.mean()) < 1e-5)
    True
    """
    plain = None
    if residual is None and activation is None:
        plain = v.plain_forward_args(x, weight, bias, axis, eps, running_mean, running_var,
                                     momentum, out)
    if plain is not None:  # host arrays in the common form: no conversions to make
        ax, channels, n = plain
        y, mean, var, invstd = host_backend().forward_train_contiguous(
            x, ax, _ones_or(v.as_float64(weight), channels),
            _zeros_or(v.as_float64(bias), channels), eps, out)
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
        return y, mean.astype(x.dtype), invstd.astype(x.dtype)  # float32/64 keep theirs
    backend = backend_for(x=x, weight=weight, bias=bias, running_mean=running_mean,
                          running_var=running_var, residual=residual, out=out)
    a = v.forward_args(x, weight, bias, axis, eps, running_mean, running_var, momentum, out,
                       arrays=backend.arrays, residual=residual, activation=activation)
    return backend.batch_norm_forward(a, v.require_training_batch(a.x.shape, a.axis))


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, activation=None, y=None,
                        out=None, residual_grad=False, residual_out=None):
    """Gradients of the training-mode forward, through its activation.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to ``y``, the shape of ``x``.
    x : array_like
        The forward's input.
    mean, invstd : array_like of shape (C,)
        The statistics returned by :func:`batch_norm_forward`.
    weight : array_like of shape (C,), optional
        The forward's weight (default 1).
    axis : int, default 1
        The channel axis.
    activation : {None, "relu"}
        The forward's activation.  With "relu", ``y`` is required and the gradient
        flows where ``y > 0`` (``g = dy`` there, 0 elsewhere); below, ``g`` is ``dy``
        without an activation.
    y : array_like, optional
        The forward's output (only read with ``activation="relu"``).
    out : ndarray, optional
        Where to write ``dx`` (may be ``dy`` or ``x``).
    residual_grad : bool, default False
        Also return ``dresidual``, the gradient reaching the forward's residual.
    residual_out : ndarray, optional
        Where to write ``dresidual`` (may be ``dy``; not ``out``).

    Returns
    -------
    dx : ndarray
        ``weight * invstd * (g - dbias / n - (x - mean) * invstd * dweight / n)``.
    dweight, dbias : ndarray of shape (C,)
        ``sum(g * (x - mean) * invstd)`` and ``sum(g)`` over each channel.
    dresidual : ndarray
        With ``residual_grad=True`` only: ``g``, in ``dx``'s dtype.  All in one pass
        over ``dy``, ``y`` and ``x``.
    """
    plain = None
    if activation is None and not residual_grad and residual_out is None:
        plain = v.plain_backward_args(dy, x, mean, invstd, weight, axis, out)
    if plain is not None:
        ax, channels = plain
        inv64 = v.as_float64(invstd)
        dx, sum_dy, sum_dy_xmu = host_backend().backward_train_contiguous(
            dy, x, ax, v.as_float64(mean), inv64, _ones_or(v.as_float64(weight), channels), out)
        return dx, (sum_dy_xmu * inv64).astype(x.dtype), sum_dy.astype(x.dtype)
    backend = backend_for(dy=dy, x=x, mean=mean, invstd=invstd, weight=weight, y=y, out=out,
                          residual_out=residual_out)
    a = v.backward_args(dy, x, mean, invstd, weight, axis, out, arrays=backend.arrays,
                        activation=activation, y=y, residual_grad=residual_grad,
                        residual_out=residual_out)
    return backend.batch_norm_backward(a, v.require_training_batch(a.x.shape, a.axis))


def batch_norm_inference(x, running_mean, running_var, weight=None, bias=None, *, axis=1,
                         eps=1e-5, residual=None, activation=None, out=None):
    """Inference-mode batch normalization with given (running) statistics.

    ``y = act(weight * (x - running_mean) / sqrt(running_var + eps) + bias + residual)``,
    one fused pass.  Parameters are those of :func:`batch_norm_forward`; the
    statistics are only read.  An empty ``x`` gives an empty output.
    """
    plain = None
    if residual is None and activation is None:
        plain = v.plain_inference_args(x, running_mean, running_var, weight, bias, axis, eps,
                                       out)
    if plain is not None:
        ax, channels = plain
        return host_backend().inference_contiguous(
            x, ax, v.as_float64(running_mean), v.as_float64(running_var),
            _ones_or(v.as_float64(weight), channels), _zeros_or(v.as_float64(bias), channels),
            eps, out)
    backend = backend_for(x=x, running_mean=running_mean, running_var=running_var,
                          weight=weight, bias=bias, residual=residual, out=out)
    a = v.inference_args(x, running_mean, running_var, weight, bias, axis, eps, out,
                         arrays=backend.arrays, residual=residual, activation=activation)
    return backend.batch_norm_inference(a)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """Mirror of ``torch.nn.functional.batch_norm``.

    With ``training=True``, normalizes with batch statistics and updates the
    running statistics when given (see :func:`batch_norm_forward`); otherwise
    normalizes with the running statistics (see :func:`batch_norm_inference`).
    Returns ``y``.
    """
    if training:
        y, _, _ = batch_norm_forward(x, weight, bias, axis=axis, eps=eps,
                                     running_mean=running_mean, running_var=running_var,
                                     momentum=momentum, out=out)
        return y
    return batch_norm_inference(x, running_mean, running_var, weight, bias, axis=axis,
                                eps=eps, out=out)


def batch_stats(x, *, axis=1, ddof=0):
    """Per-channel count, mean and variance in one pass.

    Parameters
    ----------
    x : array_like
    axis : int, default 1
        The channel axis, which is kept.
    ddof : int, default 0
        The variance divides by ``count - ddof``, as in ``np.var``.

    Returns
    -------
    count : int
        Values per channel.
    mean, var : ndarray of shape (C,)
        float64 for float64 input, float32 otherwise.  As with ``np.var``, an
        empty batch or ``ddof >= count`` gives NaN or inf with a RuntimeWarning.
    """
    backend = backend_for(x=x)
    a = v.stats_args(x, axis, ddof, arrays=backend.arrays)
    if a.count == 0:
        warnings.warn("batch_stats of an empty batch", RuntimeWarning, stacklevel=2)
    return backend.batch_stats(a)

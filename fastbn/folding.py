"""Folding inference batch normalization into the layer before it (contract section 6)."""

import numpy as np

from . import _validate as v

__all__ = ["fold_batch_norm"]


def fold_batch_norm(weight, bias, running_mean, running_var, gamma=None, beta=None, *,
                    eps=1e-5, axis=0):
    """Fold an inference-mode batch normalization into the convolution or linear layer
    before it.

    The layer ``z = W x + bias`` followed by ``gamma * (z - running_mean) /
    sqrt(running_var + eps) + beta`` equals the one layer ``W2 x + b2`` with ``W2 =
    W * s`` and ``b2 = (bias - running_mean) * s + beta``, ``s = gamma /
    sqrt(running_var + eps)`` per output channel.

    Parameters
    ----------
    weight : array_like
        The layer's weight, any number of dimensions, with its output channels along
        ``axis``: PyTorch's Conv (O, I, kh, kw) and Linear (out, in) take ``axis=0``,
        NumPy's ``x @ W`` with ``W`` of shape (in, out) takes ``axis=-1``.
    bias : array_like of shape (C,) or None
        The layer's bias (None: 0).
    running_mean, running_var : array_like of shape (C,)
        The batch normalization's statistics.
    gamma, beta : array_like of shape (C,), optional
        Its scale (default 1) and shift (default 0).
    eps : float, default 1e-5
        Added to ``running_var``, >= 0.  Where ``running_var + eps == 0`` the scale is 0,
        as in :func:`fastbn.batch_norm_inference`.
    axis : int, default 0
        The output-channel axis of ``weight``.

    Returns
    -------
    w2 : ndarray
        The folded weight, ``weight``'s shape and dtype (float64 for integer weights).
    b2 : ndarray of shape (C,)
        The folded bias, in ``w2``'s dtype.

    Computed in float64; the inputs are not modified.

    Raises
    ------
    ValueError
        On a bad ``axis`` or ``eps``, a per-channel vector of the wrong length, or
        ``running_var + eps < 0``.
    TypeError
        On a non-float, non-integer dtype.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> w = np.ones((2, 3), np.float32)
    >>> w2, b2 = fastbn.fold_batch_norm(w, None, np.zeros(2), np.full(2, 4.0), eps=0.0)
    >>> w2[0], b2
    (array([0.5, 0.5, 0.5], dtype=float32), array([0., 0.], dtype=float32))
    """
    w = v.as_input(weight, "weight")
    ax = v.channel_axis(axis, w.ndim)
    channels = w.shape[ax]
    eps = v.real_scalar(eps, "eps", low=0.0)
    mean = v.per_channel(running_mean, "running_mean", channels)
    var = v.per_channel(running_var, "running_var", channels)
    if mean is None or var is None:
        raise TypeError("running_mean and running_var are required")
    b = _zeros_or(v.per_channel(bias, "bias", channels), channels)
    g = _ones_or(v.per_channel(gamma, "gamma", channels), channels)
    be = _zeros_or(v.per_channel(beta, "beta", channels), channels)
    denom = var + eps
    if np.any(denom < 0):
        c = int(np.argmax(denom < 0))
        raise ValueError(f"running_var + eps must be >= 0, got {var[c]!r} + {eps!r} at "
                         f"channel {c}")
    with np.errstate(divide="ignore"):
        inv = np.where(denom == 0, 0.0, 1.0 / np.sqrt(denom))
    s = g * inv
    shape = [1] * w.ndim
    shape[ax] = channels
    dtype = v.output_dtype(w.dtype)
    w2 = (w.astype(np.float64) * s.reshape(shape)).astype(dtype)
    b2 = ((b - mean) * s + be).astype(dtype)
    return w2, b2


def _ones_or(a, channels):
    return np.ones(channels) if a is None else a


def _zeros_or(a, channels):
    return np.zeros(channels) if a is None else a

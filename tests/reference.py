"""Slow, obviously correct NumPy twins of every fastbn function: the test oracle.

Computed in extended precision (``np.longdouble``, 64-bit mantissa on x86) with
two-pass statistics, from the same input values fastbn sees, then rounded to
float64.  No performance tricks, no shared code with fastbn.
"""

import numpy as np

EXT = np.longdouble


def _moved(a, axis):
    """``a`` as an extended-precision (n, C) matrix, the channel axis last."""
    a = np.asarray(a)
    return np.moveaxis(a.astype(EXT), axis, -1).reshape(-1, a.shape[axis])


def _unmoved(m, shape, axis):
    moved = list(np.moveaxis(np.empty(shape, dtype=np.int8), axis, -1).shape)
    return np.moveaxis(m.reshape(moved), -1, axis)


def _bcast(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


def stats(x, axis=1, ddof=0):
    """(count, mean, biased-or-ddof variance) per channel, float64."""
    m = _moved(x, axis)
    n = m.shape[0]
    mean = m.sum(axis=0) / n
    mean = mean + (m - mean).sum(axis=0) / n  # corrected two-pass
    var = ((m - mean) ** 2).sum(axis=0) / (n - ddof)
    return n, mean.astype(np.float64), var.astype(np.float64)


def invstd(var, eps):
    v = np.asarray(var, dtype=EXT) + EXT(eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1 / np.sqrt(v)
    return np.where(v == 0, 0, out)


def forward(x, weight=None, bias=None, axis=1, eps=1e-5):
    """Training-mode forward: (y, mean, var, invstd), float64."""
    x = np.asarray(x)
    axis = axis % x.ndim
    m = _moved(x, axis)
    n = m.shape[0]
    mean = m.sum(axis=0) / n
    mean = mean + (m - mean).sum(axis=0) / n
    var = ((m - mean) ** 2).sum(axis=0) / n
    inv = invstd(var, eps)
    w = EXT(1) if weight is None else np.asarray(weight, dtype=EXT)
    b = EXT(0) if bias is None else np.asarray(bias, dtype=EXT)
    y = (m - mean) * inv * w + b
    return (_unmoved(y, x.shape, axis).astype(np.float64), mean.astype(np.float64),
            var.astype(np.float64), inv.astype(np.float64))


def inference(x, running_mean, running_var, weight=None, bias=None, axis=1, eps=1e-5):
    x = np.asarray(x)
    axis = axis % x.ndim
    m = _moved(x, axis)
    inv = invstd(running_var, eps)
    w = EXT(1) if weight is None else np.asarray(weight, dtype=EXT)
    b = EXT(0) if bias is None else np.asarray(bias, dtype=EXT)
    y = (m - np.asarray(running_mean, dtype=EXT)) * inv * w + b
    return _unmoved(y, x.shape, axis).astype(np.float64)


def backward(dy, x, mean, invstd_, weight=None, axis=1):
    """Training-mode gradients: (dx, dweight, dbias), float64."""
    x = np.asarray(x)
    axis = axis % x.ndim
    m = _moved(x, axis)
    g = _moved(dy, axis)
    n = m.shape[0]
    mean = np.asarray(mean, dtype=EXT)
    inv = np.asarray(invstd_, dtype=EXT)
    w = EXT(1) if weight is None else np.asarray(weight, dtype=EXT)
    xhat = (m - mean) * inv
    dbias = g.sum(axis=0)
    dweight = (g * xhat).sum(axis=0)
    dx = w * inv * (g - dbias / n - xhat * dweight / n)
    return (_unmoved(dx, x.shape, axis).astype(np.float64), dweight.astype(np.float64),
            dbias.astype(np.float64))


def epilogue(y, residual=None, activation=None):
    """Contract section 6, composed step by step: ``y + residual``, then ReLU (float64)."""
    y = np.asarray(y, dtype=np.float64)
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    if activation == "relu":
        y = np.where(y < 0, 0.0, y)  # NaN stays NaN, as np.maximum and torch.relu
    return y


def backward_through(dy, x, mean, invstd_, weight=None, axis=1, y=None, activation=None):
    """The chain rule through the fused forward: ``g = dy * (y > 0)`` (ReLU; ``dy`` without
    an activation) is the residual's gradient and the gradient of the normalized sum;
    then the plain backward of ``g``.  Returns (dx, dweight, dbias, dresidual), float64."""
    g = np.asarray(dy, dtype=np.float64)
    if activation == "relu":
        g = np.where(np.asarray(y, dtype=np.float64) > 0, g, 0.0)
    return backward(g, x, mean, invstd_, weight, axis) + (g,)


def running_update(running_mean, running_var, mean, var, n, momentum):
    """PyTorch's running statistics update, float64."""
    rm = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * np.asarray(mean)
    rv = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * np.asarray(var) * n / (n - 1)
    return rm, rv


def bcast(v, ndim, axis):
    """A per-channel vector shaped to broadcast against an ndim array."""
    return _bcast(v, ndim, axis % ndim)

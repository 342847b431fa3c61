"""Exact helpers on per-channel moments, shared by every backend (NumPy, float64)."""

import numpy as np


def merge_moments(count, mean, m2, axis):
    """Chan's parallel merge of partial (count, mean, M2) along ``axis``.

    ``count`` broadcasts against ``mean``.  Every term of the merged M2 is
    non-negative, so there is no cancellation; means should be relative to a
    shift near the data so that they are small.  An empty part (count 0)
    contributes nothing; a NaN stays in its own channel.
    """
    count = np.broadcast_to(np.asarray(count, dtype=np.float64), mean.shape)
    n = count.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = (count * mean).sum(axis=axis) / n
        dev = mean - np.expand_dims(mu, axis)
        weighted = np.where(count > 0, count * dev * dev, 0.0)
    return n, mu, m2.sum(axis=axis) + weighted.sum(axis=axis)


def two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def split_hi_lo(hi64, lo64, dtype):
    """Represent ``hi64 + lo64`` as ``hi + lo`` with both parts in ``dtype``."""
    hi = hi64.astype(dtype)
    lo = ((hi64 - hi.astype(np.float64)) + lo64).astype(dtype)
    return hi, lo


def invstd(var, eps):
    """``1 / sqrt(var + eps)``, 0 where ``var + eps == 0`` (CONTRACT section 2)."""
    v = np.asarray(var, dtype=np.float64) + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 / np.sqrt(v)
    return np.where(v == 0.0, 0.0, out)

"""Per-channel helpers shared by the API and every backend (NumPy, float64)."""

import numpy as np


def invstd(var, eps):
    """``1 / sqrt(var + eps)``, 0 where ``var + eps == 0`` (docs/contract.md section 2)."""
    v = np.asarray(var, dtype=np.float64) + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 / np.sqrt(v)
    return np.where(v == 0.0, 0.0, out)


def merge_moments(count, mean, m2, axis):
    """Chan's merge of partial (count, mean, M2) along ``axis`` (float64 arrays).

    ``n = sum(c)``, ``mean = sum(c * m) / n``, ``M2 = sum(M2) + sum(c * (m - mean)^2)``:
    every term is non-negative, so there is no cancellation.  Empty parts
    (count 0) contribute nothing; where every part is empty, mean and M2 are NaN.
    """
    count = np.asarray(count, dtype=np.float64)
    n = count.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = np.where(count > 0, count * np.where(count > 0, mean, 0.0), 0.0)
        mu = weighted.sum(axis=axis) / n
        dev = np.where(count > 0, mean - np.expand_dims(mu, axis), 0.0)
        q = np.where(count > 0, m2, 0.0).sum(axis=axis) + (count * dev * dev).sum(axis=axis)
    return n, mu, np.where(n > 0, q, np.nan)


def update_running_stats(running_mean, running_var, mean, var, n, momentum):
    """PyTorch's update: ``rm = (1 - m) rm + m mean``, ``rv = (1 - m) rv + m var n / (n - 1)``."""
    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean
    if running_var is not None:
        running_var[...] = (1.0 - momentum) * running_var + momentum * (var * (n / (n - 1)))

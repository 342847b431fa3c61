"""fastbn on ``dask.array`` (extra ``fastbn[dask]``): lazy, any chunking, along any axes.

Per-block partial statistics come from fastbn's kernels and are tree-combined
with Chan's merge through ``dask.array.reduction`` (count, mean, M2, min, max
per feature, as one structured array); normalization is ``map_blocks`` of
fastbn's fused affine pass.  Everything stays lazy in one graph.  Task
functions are plain module-level functions that call the disk-cached kernels:
a pickled Numba function would lose its disk cache, and every worker would
recompile it.
"""

import math

import numpy as np

from . import _validate as v
from ._dask_graph import STATS, affine, checked_input, feature_stats, is_dask_array, minmax
from ._dask_graph import kernel_cache_report
from .scalers import _feature_range, minmax_scale_factor, standard_scale

__all__ = ["batch_stats", "standardize", "minmax_scale", "batch_norm_forward", "feature_stats",
           "affine", "is_dask_array", "kernel_cache_report", "STATS"]

def batch_stats(x, *, axis=1, ddof=0):
    """``(count, mean, var)``: count an int, mean and var lazy dask arrays (stats dtype)."""
    x, ax = checked_input(x, axis)
    ddof = v.check_ddof(ddof)
    stats = feature_stats(x, ax, nan_aware=False)
    sd = v.stats_dtype(x.dtype)
    count = math.prod(s for d, s in enumerate(x.shape) if d != ax)
    dof = max(count - int(ddof), 0)
    return count, stats["mean"].astype(sd), (stats["m2"] / dof).astype(sd)


def standardize(x, *, axis=-1):
    """Lazy :func:`fastbn.standardize` (NaN ignored in the statistics, kept in the output)."""
    x, ax = checked_input(x, axis)
    s = feature_stats(x, ax)
    count, mean = s["count"], s["mean"]
    var = s["m2"] / count
    import dask.array as da

    scale = standard_scale(count, mean, var)
    return affine(x, ax, da.where(count > 0, mean, np.nan), 1.0 / scale, da.zeros_like(mean))


def minmax_scale(x, *, axis=-1, feature_range=(0.0, 1.0)):
    """Lazy :func:`fastbn.minmax_scale`."""
    import dask.array as da

    low, high = _feature_range(feature_range)
    x, ax = checked_input(x, axis)
    s = feature_stats(x, ax)
    dmin = da.where(s["count"] > 0, s["min"], np.nan)
    dmax = da.where(s["count"] > 0, s["max"], np.nan)
    scale = minmax_scale_factor(low, high, dmax - dmin)
    # about both ends: the minimum maps to exactly ``low``, the maximum to exactly ``high``
    return minmax(x, ax, dmin, dmax, scale, low, high)


def batch_norm_forward(x, weight=None, bias=None, *, axis=1, eps=1e-5):
    """Lazy training-mode forward: ``(y, mean, invstd)`` as dask arrays.

    Running statistics are not taken: update them from the computed ``mean``
    and ``invstd`` (see :func:`fastbn.api.update_running_stats`).
    """
    import dask.array as da

    x, ax = checked_input(x, axis)
    channels = x.shape[ax]
    v.require_training_batch(x.shape, ax)
    eps = v.real_scalar(eps, "eps", low=0.0)
    w = np.ones(channels) if weight is None else v.per_channel(weight, "weight", channels)
    b = np.zeros(channels) if bias is None else v.per_channel(bias, "bias", channels)
    s = feature_stats(x, ax, nan_aware=False)
    var = s["m2"] / s["count"]
    denom = var + eps
    invstd = da.where(denom == 0, 0.0, 1.0 / da.sqrt(da.where(denom == 0, 1.0, denom)))
    y = affine(x, ax, s["mean"], invstd * w, b)
    sd = v.stats_dtype(x.dtype)
    return y, s["mean"].astype(sd), invstd.astype(sd)

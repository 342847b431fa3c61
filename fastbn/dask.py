"""fastbn on ``dask.array`` (extra ``fastbn[dask]``): lazy, any chunking, along any axes.

Per-block partial statistics come from fastbn's kernels and are tree-combined
with Chan's merge through ``dask.array.reduction`` (count, mean, M2, min, max
per feature, as one structured array); normalization is ``map_blocks`` of
fastbn's fused affine pass.  Everything stays lazy in one graph.  Task
functions are plain module-level functions that call the disk-cached kernels:
a pickled Numba function would lose its disk cache, and every worker would
recompile it.
"""

import functools
import math

import numpy as np

from . import _moments
from . import _validate as v

__all__ = ["batch_stats", "standardize", "minmax_scale", "batch_norm_forward", "feature_stats",
           "affine", "is_dask_array", "kernel_cache_report"]

STATS = np.dtype([("count", "f8"), ("mean", "f8"), ("m2", "f8"), ("min", "f8"), ("max", "f8")])
_EPS = np.finfo(np.float64).eps


def is_dask_array(x):
    return type(x).__module__.startswith("dask.array")


def _cpu():
    from ._dispatch import host_backend

    return host_backend()


# ----------------------------------------------------------------- task functions

def _flatten(parts):
    if isinstance(parts, dict):
        return [parts]
    return [p for part in parts for p in _flatten(part)]


def _block_partials(block, axis, keepdims, feature_axis, nan_aware, computing_meta=False):
    """One block's per-feature (count, mean, M2, min, max), float64, as a dict."""
    if computing_meta:  # dask asks for the meta: an array, as dask's own mean_chunk does
        return block
    features = block.shape[feature_axis] if block.ndim else 0
    if block.size == 0:
        z = np.zeros(features)
        inf = np.full(features, np.inf)
        return {"count": z, "mean": z, "m2": z, "min": inf, "max": -inf}
    dtype = v.output_dtype(block.dtype)
    if nan_aware:
        count, mean, m2, vmin, vmax = _cpu().feature_stats(block, feature_axis, dtype)
        vmin = np.where(count > 0, vmin, np.inf)
        vmax = np.where(count > 0, vmax, -np.inf)
    else:  # batch norm: NaN propagates into its channel's statistics
        n, mean, m2 = _cpu().moments(block, feature_axis, dtype)
        count = np.full(features, float(n))
        vmin = vmax = np.full(features, np.nan)
    return {"count": count, "mean": np.where(count > 0, mean, 0.0),
            "m2": np.where(count > 0, m2, 0.0), "min": vmin, "max": vmax}


def _combine_partials(parts, axis=None, keepdims=False):
    parts = _flatten(parts)
    if len(parts) == 1:
        return parts[0]
    n, mean, m2 = _moments.merge_moments(np.stack([p["count"] for p in parts]),
                                         np.stack([p["mean"] for p in parts]),
                                         np.stack([p["m2"] for p in parts]), axis=0)
    return {"count": n, "mean": np.where(n > 0, mean, 0.0), "m2": np.where(n > 0, m2, 0.0),
            "min": np.min(np.stack([p["min"] for p in parts]), axis=0),
            "max": np.max(np.stack([p["max"] for p in parts]), axis=0)}


def _aggregate_partials(parts, axis=None, keepdims=False):
    merged = _combine_partials(parts)
    out = np.empty(merged["count"].shape, STATS)
    for name in STATS.names:
        out[name] = merged[name]
    return out


def _affine_block(block, mean, scale, shift, feature_axis, out_dtype):
    """fastbn's fused ``(x - mean) * scale + shift`` on one block (parameters broadcast)."""
    if block.size == 0:
        return np.empty(block.shape, out_dtype)
    flat = lambda p: np.ascontiguousarray(p, dtype=np.float64).reshape(-1)  # noqa: E731
    return _cpu().affine(np.asarray(block), feature_axis, flat(mean), flat(scale), flat(shift),
                         None, np.dtype(out_dtype))


def kernel_cache_report():
    """``{kernel: (loaded from the disk cache, compiled here)}`` for this process (run it on
    workers with ``client.run``)."""
    from ._cpu import kernels

    report = {}
    for name in dir(kernels):
        fn = getattr(kernels, name)
        stats = getattr(fn, "stats", None)
        if stats is not None and hasattr(stats, "cache_hits"):
            hits, misses = sum(stats.cache_hits.values()), sum(stats.cache_misses.values())
            if hits or misses:
                report[name] = (hits, misses)
    return report


# ----------------------------------------------------------------- graph builders

def _checked(x, axis):
    import dask.array as da

    x = da.asarray(x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"x has unsupported dtype {x.dtype}: expected float16, float32, "
                        "float64, an integer or bool dtype")
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dimension, got a 0-d array")
    return x, v.channel_axis(axis, x.ndim)


def feature_stats(x, axis, nan_aware=True):
    """Lazy per-feature statistics: a dask array of dtype ``STATS`` (fields count, mean,
    m2, min, max), chunked like the feature axis of ``x``."""
    import dask.array as da

    x, ax = _checked(x, axis)
    reduced = tuple(d for d in range(x.ndim) if d != ax)
    chunk = functools.partial(_block_partials, feature_axis=ax, nan_aware=nan_aware)
    return da.reduction(x, chunk, _aggregate_partials, combine=_combine_partials, axis=reduced,
                        keepdims=False, dtype=STATS, concatenate=False,
                        meta=np.empty(0, STATS))


def affine(x, axis, mean, scale, shift):
    """Lazy ``(x - mean) * scale + shift`` per feature; parameters are (C,) arrays (NumPy or
    dask, chunked like the feature axis)."""
    import dask.array as da

    x, ax = _checked(x, axis)
    out_dtype = v.output_dtype(x.dtype)
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    params = []
    for p in (mean, scale, shift):
        p = da.asarray(p, chunks=(x.chunks[ax],)) if not is_dask_array(p) else p
        params.append(p.rechunk((x.chunks[ax],)).reshape(shape))
    return da.map_blocks(_affine_block, x, *params, feature_axis=ax, out_dtype=out_dtype,
                         dtype=out_dtype, meta=np.empty((0,) * x.ndim, out_dtype))


def batch_stats(x, *, axis=1, ddof=0):
    """``(count, mean, var)``: count an int, mean and var lazy dask arrays (stats dtype)."""
    x, ax = _checked(x, axis)
    if isinstance(ddof, (bool, np.bool_)) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise ValueError(f"ddof must be a non-negative integer, got {ddof!r}")
    stats = feature_stats(x, ax, nan_aware=False)
    sd = v.stats_dtype(x.dtype)
    count = math.prod(s for d, s in enumerate(x.shape) if d != ax)
    dof = max(count - int(ddof), 0)
    return count, stats["mean"].astype(sd), (stats["m2"] / dof).astype(sd)


def standardize(x, *, axis=-1):
    """Lazy :func:`fastbn.standardize` (NaN ignored in the statistics, kept in the output)."""
    x, ax = _checked(x, axis)
    s = feature_stats(x, ax)
    count, mean = s["count"], s["mean"]
    var = s["m2"] / count
    upper = count * _EPS * var + (count * mean * _EPS) ** 2
    import dask.array as da

    scale = da.where(var <= upper, 1.0, da.sqrt(var))
    return affine(x, ax, da.where(count > 0, mean, np.nan), 1.0 / scale, da.zeros_like(mean))


def minmax_scale(x, *, axis=-1, feature_range=(0.0, 1.0)):
    """Lazy :func:`fastbn.minmax_scale`."""
    import dask.array as da

    from .scalers import _feature_range

    low, high = _feature_range(feature_range)
    x, ax = _checked(x, axis)
    s = feature_stats(x, ax)
    dmin = da.where(s["count"] > 0, s["min"], np.nan)
    data_range = da.where(s["count"] > 0, s["max"], np.nan) - dmin
    scale = (high - low) / da.where(data_range < 10 * _EPS, 1.0, data_range)
    return affine(x, ax, da.zeros_like(scale), scale, low - dmin * scale)


def batch_norm_forward(x, weight=None, bias=None, *, axis=1, eps=1e-5):
    """Lazy training-mode forward: ``(y, mean, invstd)`` as dask arrays.

    Running statistics are not taken: update them from the computed ``mean``
    and ``invstd`` (see :func:`fastbn.api.update_running_stats`).
    """
    import dask.array as da

    x, ax = _checked(x, axis)
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

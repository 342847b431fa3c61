"""The dask graphs under ``fastbn.dask`` and the scalers: per-block partial statistics
from fastbn's kernels, tree-combined with Chan's merge through ``dask.array.reduction``
(count, mean, M2, min, max per feature, as one structured array), and the fused
affine pass as ``map_blocks``.  Task functions are plain module-level functions that
call the disk-cached kernels: a pickled Numba function would lose its disk cache, and
every worker would recompile it.  dask is imported only when a graph is built.
"""

import functools

import numpy as np

from . import _moments
from . import _validate as v

STATS = np.dtype([("count", "f8"), ("mean", "f8"), ("m2", "f8"), ("min", "f8"), ("max", "f8")])


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


def _flat(p):
    return np.ascontiguousarray(p, dtype=np.float64).reshape(-1)


def _affine_block(block, mean, scale, shift, feature_axis, out_dtype):
    """fastbn's fused ``(x - mean) * scale + shift`` on one block (parameters broadcast)."""
    if block.size == 0:
        return np.empty(block.shape, out_dtype)
    return _cpu().affine(np.asarray(block), feature_axis, _flat(mean), _flat(scale),
                         _flat(shift), None, np.dtype(out_dtype))


def _minmax_block(block, lo, hi, scale, feature_axis, out_dtype, f0, f1):
    """fastbn's two-sided min-max map on one block (parameters broadcast)."""
    if block.size == 0:
        return np.empty(block.shape, out_dtype)
    return _cpu().minmax(np.asarray(block), feature_axis, _flat(lo), _flat(hi), _flat(scale),
                         f0, f1, None, np.dtype(out_dtype))


def kernel_cache_report():
    """``{kernel: (loaded from the disk cache, compiled here)}`` for this process (run it on
    workers with ``client.run``); kernels are named ``module.function``."""
    from ._jit import kernels_defined

    report = {}
    for name, fn in kernels_defined():
        stats = getattr(fn, "stats", None)
        if stats is not None and hasattr(stats, "cache_hits"):
            hits, misses = sum(stats.cache_hits.values()), sum(stats.cache_misses.values())
            if hits or misses:
                report[name] = (hits, misses)
    return report


# ----------------------------------------------------------------- graph builders

def checked_input(x, axis):
    """``x`` as a dask array of a supported dtype, and its feature axis."""
    import dask.array as da

    x = da.asarray(x)
    v.check_input("x", x.dtype, x.ndim)
    return x, v.channel_axis(axis, x.ndim)


def feature_stats(x, axis, nan_aware=True):
    """Lazy per-feature statistics: a dask array of dtype ``STATS`` (fields count, mean,
    m2, min, max), chunked like the feature axis of ``x``."""
    import dask.array as da

    x, ax = checked_input(x, axis)
    reduced = tuple(d for d in range(x.ndim) if d != ax)
    chunk = functools.partial(_block_partials, feature_axis=ax, nan_aware=nan_aware)
    return da.reduction(x, chunk, _aggregate_partials, combine=_combine_partials, axis=reduced,
                        keepdims=False, dtype=STATS, concatenate=False,
                        meta=np.empty(0, STATS))


def affine(x, axis, mean, scale, shift):
    """Lazy ``(x - mean) * scale + shift`` per feature; parameters are (C,) arrays (NumPy or
    dask, chunked like the feature axis)."""
    return _per_feature_map(_affine_block, x, axis, (mean, scale, shift))


def minmax(x, axis, lo, hi, scale, f0, f1):
    """Lazy min-max scaling about both ends (``fastbn._cpu.kernels.minmax``): ``lo``,
    ``hi`` the data's minimum and maximum and ``scale`` per feature, ``[f0, f1]`` the
    feature range."""
    return _per_feature_map(_minmax_block, x, axis, (lo, hi, scale), f0=f0, f1=f1)


def _per_feature_map(block_fn, x, axis, per_feature, **kwargs):
    import dask.array as da

    x, ax = checked_input(x, axis)
    out_dtype = v.output_dtype(x.dtype)
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    params = []
    for p in per_feature:
        p = da.asarray(p, chunks=(x.chunks[ax],)) if not is_dask_array(p) else p
        params.append(p.rechunk((x.chunks[ax],)).reshape(shape))
    return da.map_blocks(block_fn, x, *params, feature_axis=ax, out_dtype=out_dtype,
                         dtype=out_dtype, meta=np.empty((0,) * x.ndim, out_dtype), **kwargs)

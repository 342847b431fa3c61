"""Feature statistics for data normalization (``fastbn.standardize``, the scalers):
per column of a (rows, W) view, NaN ignored (scikit-learn's semantics), rows
optionally weighted, with each column's count, mean (relative to ``shift``), M2,
min and max.  Chunks of rows stay in cache and are reduced exactly in two
passes, then merged with Chan's formula, so the result does not depend on the
offset of the data.
"""

import numpy as np
from numba import prange

from ..._jit import kernel
from .column import _column_partials, _row_weight


# Branch-free (selects) so that the column loops vectorize; NaN fails every comparison.
# ``w``: a weight per row (``sample_weight``), or None for weight 1 (the branch on it is
# resolved at compile time; a weight of 1 gives the unweighted sums' bits).

@kernel()
def _weight_of(v, wr):
    return wr if v == v else 0.0


@kernel()
def _weighted_dev(v, wr, shift):
    return wr * (v - shift) if v == v else 0.0


@kernel()
def _weighted_sq(v, wr, d):
    return wr * (d * d) if v == v else 0.0


@kernel()
def _four_weights(w, r):
    return _row_weight(w, r), _row_weight(w, r + 1), _row_weight(w, r + 2), _row_weight(w, r + 3)


@kernel()
def _four_values(x, r, j):
    """Column ``j`` of rows r .. r + 3, as float64."""
    return (np.float64(x[r, j]), np.float64(x[r + 1, j]), np.float64(x[r + 2, j]),
            np.float64(x[r + 3, j]))


# The chunk loops take four rows per update of the per-column accumulators (a quarter of
# their loads and stores, which bound a row-at-a-time loop), summed pairwise; the last
# rows of a chunk one at a time.  Chunks start at fixed rows, so the order is fixed too.

@kernel()
def _chunk_counts_sums(x, w, r0, r1, shift, c, s):
    width = np.uint64(x.shape[1])
    r = r0
    while r + 4 <= r1:
        w0, w1, w2, w3 = _four_weights(w, r)
        for j in range(np.uint64(0), width):
            a0, a1, a2, a3 = _four_values(x, r, j)
            sh = shift[j]
            c[j] += ((_weight_of(a0, w0) + _weight_of(a1, w1))
                     + (_weight_of(a2, w2) + _weight_of(a3, w3)))
            s[j] += ((_weighted_dev(a0, w0, sh) + _weighted_dev(a1, w1, sh))
                     + (_weighted_dev(a2, w2, sh) + _weighted_dev(a3, w3, sh)))
        r += 4
    for rr in range(r, r1):
        wr = _row_weight(w, rr)
        for j in range(np.uint64(0), width):
            v = np.float64(x[rr, j])
            c[j] += _weight_of(v, wr)
            s[j] += _weighted_dev(v, wr, shift[j])


@kernel()
def _chunk_m2_min_max(x, w, r0, r1, shift, mu, q, vmin, vmax):
    # NaN fails every comparison, so it never becomes a minimum or a maximum
    width = np.uint64(x.shape[1])
    r = r0
    while r + 4 <= r1:
        w0, w1, w2, w3 = _four_weights(w, r)
        for j in range(np.uint64(0), width):
            a0, a1, a2, a3 = _four_values(x, r, j)
            sh, m = shift[j], mu[j]
            q[j] += ((_weighted_sq(a0, w0, (a0 - sh) - m) + _weighted_sq(a1, w1, (a1 - sh) - m))
                     + (_weighted_sq(a2, w2, (a2 - sh) - m)
                        + _weighted_sq(a3, w3, (a3 - sh) - m)))
            lo, hi = vmin[j], vmax[j]
            lo = a0 if a0 < lo else lo
            lo = a1 if a1 < lo else lo
            lo = a2 if a2 < lo else lo
            lo = a3 if a3 < lo else lo
            hi = a0 if a0 > hi else hi
            hi = a1 if a1 > hi else hi
            hi = a2 if a2 > hi else hi
            hi = a3 if a3 > hi else hi
            vmin[j], vmax[j] = lo, hi
        r += 4
    for rr in range(r, r1):
        wr = _row_weight(w, rr)
        for j in range(np.uint64(0), width):
            v = np.float64(x[rr, j])
            q[j] += _weighted_sq(v, wr, (v - shift[j]) - mu[j])
            vmin[j] = v if v < vmin[j] else vmin[j]
            vmax[j] = v if v > vmax[j] else vmax[j]


@kernel()
def _feature_block(x, w, r0, r1, chunk_rows, shift, count, mean_rel, m2, vmin, vmax):
    """Statistics of rows [r0, r1) of ``x`` (rows, W) into the (W,) arrays given."""
    width = x.shape[1]
    c = np.zeros(width)
    s = np.zeros(width)
    mu = np.zeros(width)
    q = np.zeros(width)
    count[:] = 0.0
    mean_rel[:] = 0.0
    m2[:] = 0.0
    vmin[:] = np.inf
    vmax[:] = -np.inf
    for a in range(r0, r1, chunk_rows):
        b = min(a + chunk_rows, r1)
        c[:] = 0.0
        s[:] = 0.0
        q[:] = 0.0
        _chunk_counts_sums(x, w, a, b, shift, c, s)
        for j in range(width):
            mu[j] = s[j] / c[j] if c[j] > 0.0 else 0.0
        _chunk_m2_min_max(x, w, a, b, shift, mu, q, vmin, vmax)
        for j in range(width):  # Chan's merge of the chunk into the block
            if c[j] > 0.0:
                n = count[j]
                total = n + c[j]
                delta = mu[j] - mean_rel[j]
                mean_rel[j] += delta * (c[j] / total)
                m2[j] += q[j] + delta * delta * (n * c[j] / total)
                count[j] = total


@kernel(parallel=True)
def feature_moments(x, w, nblocks, chunk_rows, shift, count, mean_rel, m2, vmin, vmax):
    """Per-(block of rows, column) statistics of ``x`` (rows, W) with NaN ignored, each
    row weighted by ``w`` (rows,) float64, or by 1 when ``w`` is None: arrays (nblocks,
    W) of the count (weight sum), mean relative to ``shift``, M2, min and max (min/max
    are +inf/-inf where a block has no value)."""
    rows = x.shape[0]
    for blk in prange(nblocks):
        _feature_block(x, w, blk * rows // nblocks, (blk + 1) * rows // nblocks, chunk_rows,
                       shift, count[blk], mean_rel[blk], m2[blk], vmin[blk], vmax[blk])


@kernel(parallel=True)
def column_moments(x, w, nblocks, chunk_rows, shift, count, mean_rel, m2):
    """Per-(block of rows, column) moments of ``x`` (rows, W) without NaN, each row
    weighted by ``w`` (rows,) float64, or by 1 when ``w`` is None: ``count`` (nblocks,)
    the weight sums, ``mean_rel`` (relative to ``shift``) and ``m2`` (nblocks, W).  The
    column path's register tiles: several times faster than ``feature_moments``, whose
    NaN handling data without NaN do not need."""
    rows = x.shape[0]
    for blk in prange(nblocks):
        count[blk] = _column_partials(x, w, blk * rows // nblocks, (blk + 1) * rows // nblocks,
                                      shift, chunk_rows, mean_rel[blk], m2[blk])

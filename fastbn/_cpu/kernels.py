"""Numba kernels for the CPU backend.

Every kernel works on C-contiguous arrays of one float dtype (float32 or
float64) in a canonical layout and knows nothing about axes:

* "channel" kernels take ``x`` of shape (outer, C, inner); a channel is
  ``x[:, c, :]``, a set of ``outer`` contiguous runs of ``inner`` values.  A
  task owns a group of neighbouring channels, whose runs are adjacent in memory
  (long streams for the prefetchers), and normalizes the group right after
  reducing it, while its data is still in cache.
* "column" kernels take ``x`` of shape (rows, W) and reduce over rows, with
  every column its own accumulator.  This is the fast path when ``inner`` is
  short (channels-last, (N, C)): the loop over W is contiguous and vectorizes.

Numerics (CONTRACT section 5).  Statistics are accumulated in float64 relative
to a per-channel shift (the channel's first value) in L1-sized pieces: the
first piece of a channel is exact two-pass, later pieces take deviations about
the channel's running mean (see ``_accumulate``), and pieces are combined
with Chan's merge.  There is no ``E[x^2] - E[x]^2`` anywhere.
The normalization subtracts the mean as an unevaluated sum ``hi + lo`` of two
numbers of the working dtype, ``(x - hi) - lo``: with ``x`` near the mean,
``x - hi`` is exact (Sterbenz), so float32 data far from zero keep their full
precision even though the arithmetic is float32 and vectorizes 16 wide.

Per-channel parameters of an affine pass are rows ``(hi, lo, scale, shift)``
(channel kernels: shape (C, 4)) or columns (column kernels: shape (4, W)) in
the working dtype.  Backward parameters are ``(hi, lo, a, b, k)`` and give
``dx = ((dy - b) - ((x - hi) - lo) * k) * a``.
"""

import numpy as np
from numba import prange

from .._jit import kernel

# Reductions may be reassociated so that LLVM vectorizes them (several
# accumulators).  No 'nnan'/'ninf': NaN and inf must propagate to their channel.
REDUCE_MATH = {"reassoc", "contract", "nsz"}

# Values per piece of a run: a two-pass piece stays in L1.
CHUNK = 4096


@kernel()
def _two_sum(a, b):
    """Return ``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


@kernel()
def _invstd(var, eps):
    """``1 / sqrt(var + eps)``, and 0 where ``var + eps == 0`` (a constant channel with eps 0)."""
    v = var + eps
    if v == 0.0:
        return 0.0
    return 1.0 / np.sqrt(v)


# Run helpers index x[o, c, i] directly (no slice objects: their set-up costs
# more than a short run) with an unsigned loop index: with a signed one LLVM
# cannot drop Numba's negative-index wraparound and falls back to gathers.
# Each helper covers x[o0:o1, c, i0:i1], runs of several rows in one call.
@kernel(fastmath=REDUCE_MATH)
def _run_sum(x, o0, o1, c, i0, i1, shift):
    s = 0.0
    for o in range(o0, o1):
        for i in range(np.uint64(i0), np.uint64(i1)):
            s += np.float64(x[o, c, i]) - shift
    return s


@kernel(fastmath=REDUCE_MATH)
def _run_sqdev(x, o0, o1, c, i0, i1, center):
    q = 0.0
    for o in range(o0, o1):
        for i in range(np.uint64(i0), np.uint64(i1)):
            d = np.float64(x[o, c, i]) - center
            q += d * d
    return q


@kernel(fastmath=REDUCE_MATH)
def _run_dev_sums(x, o0, o1, c, i0, i1, center):
    s1 = 0.0
    s2 = 0.0
    for o in range(o0, o1):
        for i in range(np.uint64(i0), np.uint64(i1)):
            d = np.float64(x[o, c, i]) - center
            s1 += d
            s2 += d * d
    return s1, s2


@kernel()
def _accumulate(x, o0, o1, i0, i1, c, shift, j, n, mean_rel, m2):
    """Merge the moments of ``x[o0:o1, c, i0:i1]`` (one piece) into accumulator ``j``.

    Means are relative to ``shift``.  A channel's first piece is exact two-pass.
    Every later piece takes its deviations about the channel's running mean
    ``center`` in one pass: ``s1 = sum(x - center)``, ``s2 = sum((x - center)^2)``,
    piece mean ``center + s1/m`` and piece M2 ``s2 - s1^2/m``.  This is the
    corrected two-pass algorithm with the first pass replaced by the running
    mean, not ``E[x^2] - E[x]^2``: ``s1^2/m <= s2``, and the rounding error of
    ``s2`` is eps times ``M2_piece + m (piece mean - center)^2``, both of which
    the channel's total M2 contains (Chan's merge adds the second), so the
    error relative to the final variance stays O(eps) whatever the offset.
    """
    m = float((o1 - o0) * (i1 - i0))
    if n[j] == 0.0:
        mk = _run_sum(x, o0, o1, c, i0, i1, shift) / m
        n[j] = m
        mean_rel[j] = mk
        m2[j] = _run_sqdev(x, o0, o1, c, i0, i1, shift + mk)
    else:
        s1, s2 = _run_dev_sums(x, o0, o1, c, i0, i1, shift + mean_rel[j])
        _merge_piece(s1, s2, m, j, n, mean_rel, m2)


@kernel()
def _merge_piece(s1, s2, m, j, n, mean_rel, m2):
    """Chan-merge a piece of ``m`` values, given as deviation sums about the current mean."""
    delta = s1 / m
    n_new = n[j] + m
    mean_rel[j] += delta * (m / n_new)
    m2[j] += (s2 - s1 * delta) + delta * delta * (n[j] * m / n_new)
    n[j] = n_new


@kernel()
def _accumulate_rows(x, o0, o1, c0, c1, shift, n, mean_rel, m2):
    """Moments of channels [c0, c1) over rows [o0, o1), in L1-sized pieces.

    Long runs are cut into pieces of at most CHUNK values; short runs are
    batched, several rows to a piece, so that merges stay rare.  A channel's
    first piece (two passes) is one run, or one CHUNK of it.
    """
    inner = x.shape[2]
    if inner >= CHUNK:
        for o in range(o0, o1):
            for c in range(c0, c1):
                for i0 in range(0, inner, CHUNK):
                    _accumulate(x, o, o + 1, i0, min(i0 + CHUNK, inner), c, shift[c], c - c0,
                                n, mean_rel, m2)
    elif o1 > o0:
        # Row-major: the group's runs in a row are adjacent in memory, while one
        # channel's runs are C * inner apart and alias in L1.
        for c in range(c0, c1):
            _accumulate(x, o0, o0 + 1, 0, inner, c, shift[c], c - c0, n, mean_rel, m2)
        rows = max(1, CHUNK // inner)
        s1 = np.empty(c1 - c0)
        s2 = np.empty(c1 - c0)
        for b0 in range(o0 + 1, o1, rows):
            b1 = min(b0 + rows, o1)
            s1[:] = 0.0
            s2[:] = 0.0
            for o in range(b0, b1):
                for c in range(c0, c1):
                    a, b = _run_dev_sums(x, o, o + 1, c, 0, inner, shift[c] + mean_rel[c - c0])
                    s1[c - c0] += a
                    s2[c - c0] += b
            m = float((b1 - b0) * inner)
            for j in range(c1 - c0):
                _merge_piece(s1[j], s2[j], m, j, n, mean_rel, m2)


@kernel()
def _affine_run(x, o0, o1, c, hi, lo, scale, shift, y):
    for o in range(o0, o1):
        for i in range(np.uint64(0), np.uint64(x.shape[2])):
            y[o, c, i] = ((x[o, c, i] - hi) - lo) * scale + shift


@kernel()
def _affine_group(x, c0, c1, params, y):
    """Normalize channels [c0, c1) row by row: the group's runs of a row are adjacent,
    so reads and writes stream (channel by channel, runs ``C * inner`` apart alias in L1)."""
    for o in range(x.shape[0]):
        for c in range(c0, c1):
            _affine_run(x, o, o + 1, c, params[c, 0], params[c, 1], params[c, 2], params[c, 3], y)


@kernel(parallel=True)
def channel_moments(x, shift, group, nparts, count, mean_rel, m2):
    """Per-(channel, part) count, mean relative to ``shift[c]`` and M2, arrays (C, nparts).

    One task per (group of channels, part of the ``outer`` axis): within a
    task, the runs of ``group`` neighbouring channels are contiguous in memory,
    so the hardware prefetchers see long streams instead of short hops.
    """
    outer, channels, inner = x.shape
    ngroups = -(-channels // group)
    for t in prange(ngroups * nparts):
        g = t // nparts
        part = t - g * nparts
        c0 = g * group
        c1 = min(c0 + group, channels)
        n = np.zeros(c1 - c0)
        mu = np.zeros(c1 - c0)
        q = np.zeros(c1 - c0)
        _accumulate_rows(x, part * outer // nparts, (part + 1) * outer // nparts, c0, c1,
                         shift, n, mu, q)
        for c in range(c0, c1):
            count[c, part] = n[c - c0]
            mean_rel[c, part] = mu[c - c0]
            m2[c, part] = q[c - c0]


@kernel(parallel=True)
def channel_forward(x, shift, group, weight, bias, eps, y, mean, var, invstd):
    """Training forward, fused: each group of channels is reduced, then normalized from cache.

    Writes ``y`` and the float64 ``mean``, biased ``var`` and ``invstd`` per channel.
    """
    outer, channels, inner = x.shape
    ngroups = -(-channels // group)
    params = np.empty((channels, 4), x.dtype)
    for g in prange(ngroups):
        c0 = g * group
        c1 = min(c0 + group, channels)
        n = np.zeros(c1 - c0)
        mu = np.zeros(c1 - c0)
        q = np.zeros(c1 - c0)
        _accumulate_rows(x, 0, outer, c0, c1, shift, n, mu, q)
        for c in range(c0, c1):
            v = q[c - c0] / n[c - c0]
            inv = _invstd(v, eps)
            hi, lo = _two_sum(shift[c], mu[c - c0])
            mean[c] = hi
            var[c] = v
            invstd[c] = inv
            params[c, 0] = hi
            params[c, 1] = (hi - np.float64(params[c, 0])) + lo
            params[c, 2] = inv * weight[c]
            params[c, 3] = bias[c]
        _affine_group(x, c0, c1, params, y)


@kernel(parallel=True)
def affine_channels(x, params, y):
    """``y = ((x - hi) - lo) * scale + shift`` per channel, ``params`` of shape (C, 4)."""
    outer, channels, inner = x.shape
    for t in prange(outer * channels):
        o = t // channels
        c = t - o * channels
        _affine_run(x, o, o + 1, c, params[c, 0], params[c, 1], params[c, 2], params[c, 3], y)


# Row helpers: element-wise over one row, arguments as 1-D arrays so that LLVM
# vectorizes them (inlined loops over views of local arrays stay scalar).
@kernel()
def _row_add_dev(row, shift, s1):
    for j in range(row.shape[0]):
        s1[j] += np.float64(row[j]) - shift[j]


@kernel()
def _row_add_sqdev(row, shift, mu, q):
    for j in range(row.shape[0]):
        d = (np.float64(row[j]) - shift[j]) - mu[j]
        q[j] += d * d


@kernel()
def _row_add_dev_sums(row, shift, mu, s1, s2):
    for j in range(row.shape[0]):
        d = (np.float64(row[j]) - shift[j]) - mu[j]
        s1[j] += d
        s2[j] += d * d


@kernel()
def _merge_chunk(s1, s2, m, n, mu, q):
    """Merge a chunk of ``m`` rows (deviation sums about ``mu``) into ``n`` rows' ``mu``, ``q``."""
    wk = m / (n + m)
    wm = n * m / (n + m)
    inv_m = 1.0 / m
    for j in range(s1.shape[0]):
        delta = s1[j] * inv_m
        q[j] += (s2[j] - s1[j] * delta) + delta * delta * wm
        mu[j] += delta * wk


@kernel()
def _column_partials(x, r0, r1, shift, chunk_rows, mu, q):
    """Moments of rows [r0, r1) of ``x`` (rows, W) per column into ``mu``, ``q``; returns count.

    Chunks of ``chunk_rows`` rows stay in cache; the first chunk is exact
    two-pass, later ones take deviations about each column's running mean
    (see ``_accumulate``).  Every loop runs over contiguous columns.
    """
    width = x.shape[1]
    mu[:] = 0.0
    q[:] = 0.0
    s1 = np.zeros(width)
    s2 = np.zeros(width)
    n = 0.0
    for r in range(r0, r1, chunk_rows):
        re = min(r + chunk_rows, r1)
        m = float(re - r)
        if n == 0.0:
            for rr in range(r, re):
                _row_add_dev(x[rr], shift, mu)
            mu /= m
            for rr in range(r, re):
                _row_add_sqdev(x[rr], shift, mu, q)
        else:
            s1[:] = 0.0
            s2[:] = 0.0
            for rr in range(r, re):
                _row_add_dev_sums(x[rr], shift, mu, s1, s2)
            _merge_chunk(s1, s2, m, n, mu, q)
        n += m
    return n


@kernel()
def _fold_columns(count, mean_rel, m2, c, inner):
    """Merge channel ``c``'s partials: its ``inner`` columns in every block, then the blocks.

    Within a block every column has the same count, so the columns merge with
    equal weights (mean of means, plus the spread of the means) without a
    division per column; blocks then merge with Chan's formula.
    """
    n = 0.0
    mu = 0.0
    q = 0.0
    for blk in range(count.shape[0]):
        nk = count[blk]
        if nk == 0.0:
            continue
        means = mean_rel[blk, c * inner:(c + 1) * inner]
        m2s = m2[blk, c * inner:(c + 1) * inner]
        mb = 0.0
        for j in range(inner):
            mb += means[j]
        mb /= inner
        qb = 0.0
        spread = 0.0
        for j in range(inner):
            d = means[j] - mb
            qb += m2s[j]
            spread += d * d
        qb += nk * spread
        nb = nk * inner
        n_new = n + nb
        delta = mb - mu
        mu += delta * (nb / n_new)
        q += qb + delta * delta * (n * nb / n_new)
        n = n_new
    return n, mu, q


@kernel()
def _expand(per_channel, inner):
    """Repeat each per-channel value ``inner`` times: one value per column."""
    out = np.empty(per_channel.shape[0] * inner)
    for j in range(out.shape[0]):
        out[j] = per_channel[j // inner]
    return out


@kernel(parallel=True)
def column_forward(x, shift, inner, nblocks, chunk_rows, normalize, weight, bias, eps, y,
                   mean, var, invstd):
    """Statistics over rows of ``x`` (rows, C * inner), then (``normalize``) ``y``, in one call.

    Three phases: per-block column moments in parallel, a serial fold to
    channels (count, mean, var, invstd into the float64 outputs), and a
    parallel affine pass over rows.
    """
    rows, width = x.shape
    channels = width // inner
    count = np.empty(nblocks)
    mean_rel = np.empty((nblocks, width))
    m2 = np.empty((nblocks, width))
    shift_cols = _expand(shift, inner)
    for blk in prange(nblocks):
        count[blk] = _column_partials(x, blk * rows // nblocks, (blk + 1) * rows // nblocks,
                                      shift_cols, chunk_rows, mean_rel[blk], m2[blk])
    params = np.empty((4, width), x.dtype)
    for c in range(channels):
        n, mu, q = _fold_columns(count, mean_rel, m2, c, inner)
        v = q / n
        inv = _invstd(v, eps)
        hi, lo = _two_sum(shift[c], mu)
        mean[c] = hi
        var[c] = v
        invstd[c] = inv
        for j in range(c * inner, (c + 1) * inner):
            params[0, j] = hi
            params[1, j] = (hi - np.float64(params[0, j])) + lo
            params[2, j] = inv * weight[c]
            params[3, j] = bias[c]
    if normalize:
        for r in prange(rows):
            _affine_row(x[r], params, y[r])


@kernel()
def _affine_row(row, params, out):
    hi = params[0]
    lo = params[1]
    scale = params[2]
    shift = params[3]
    for j in range(row.shape[0]):
        out[j] = ((row[j] - hi[j]) - lo[j]) * scale[j] + shift[j]


@kernel(parallel=True)
def affine_columns(x, params, inner, y):
    """``y = ((x - hi) - lo) * scale + shift`` per channel, ``params`` of shape (C, 4),
    over rows of ``x`` (rows, C * inner)."""
    rows, width = x.shape
    cols = np.empty((4, width), x.dtype)
    for j in range(width):
        for k in range(4):
            cols[k, j] = params[j // inner, k]
    for r in prange(rows):
        _affine_row(x[r], cols, y[r])


@kernel(fastmath=REDUCE_MATH)
def _run_grad_sums(dy, x, o, c, mean):
    s = 0.0
    sx = 0.0
    for i in range(np.uint64(0), np.uint64(x.shape[2])):
        g = np.float64(dy[o, c, i])
        s += g
        sx += g * (np.float64(x[o, c, i]) - mean)
    return s, sx


@kernel()
def _dx_run(dy, x, o, c, hi, lo, a, b, k, dx):
    for i in range(np.uint64(0), np.uint64(x.shape[2])):
        dx[o, c, i] = ((dy[o, c, i] - b) - ((x[o, c, i] - hi) - lo) * k) * a


@kernel(parallel=True)
def channel_grad_sums(dy, x, mean, group, nparts, sum_dy, sum_dy_xmu):
    """Per-(channel, part) ``sum(dy)`` and ``sum(dy * (x - mean))``, arrays (C, nparts).

    ``mean`` is float64 and exact: the caller's mean, converted.
    """
    outer, channels, inner = x.shape
    ngroups = -(-channels // group)
    for t in prange(ngroups * nparts):
        g = t // nparts
        part = t - g * nparts
        for c in range(g * group, min(g * group + group, channels)):
            sum_dy[c, part] = 0.0
            sum_dy_xmu[c, part] = 0.0
        for o in range(part * outer // nparts, (part + 1) * outer // nparts):
            for c in range(g * group, min(g * group + group, channels)):
                a, b = _run_grad_sums(dy, x, o, c, mean[c])
                sum_dy[c, part] += a
                sum_dy_xmu[c, part] += b


@kernel(parallel=True)
def channel_backward(dy, x, mean, invstd, weight, group, dx, sum_dy, sum_dy_xmu):
    """Training backward, fused: each group's sums, then its ``dx`` from cache.

    Writes ``dx`` and the float64 ``sum(dy)``, ``sum(dy * (x - mean))`` per channel.
    """
    outer, channels, inner = x.shape
    n = float(outer * inner)
    ngroups = -(-channels // group)
    params = np.empty((channels, 5), x.dtype)
    for g in prange(ngroups):
        c0 = g * group
        c1 = min(c0 + group, channels)
        for c in range(c0, c1):
            sum_dy[c] = 0.0
            sum_dy_xmu[c] = 0.0
        for o in range(outer):
            for c in range(c0, c1):
                a, b = _run_grad_sums(dy, x, o, c, mean[c])
                sum_dy[c] += a
                sum_dy_xmu[c] += b
        for c in range(c0, c1):
            params[c, 0] = mean[c]
            params[c, 1] = mean[c] - np.float64(params[c, 0])
            params[c, 2] = weight[c] * invstd[c]
            params[c, 3] = sum_dy[c] / n
            params[c, 4] = invstd[c] * invstd[c] * sum_dy_xmu[c] / n
        for o in range(outer):
            for c in range(c0, c1):
                _dx_run(dy, x, o, c, params[c, 0], params[c, 1], params[c, 2], params[c, 3],
                        params[c, 4], dx)


@kernel(parallel=True)
def dx_channels(dy, x, params, dx):
    """``dx = ((dy - b) - ((x - hi) - lo) * k) * a`` per channel, ``params`` (C, 5)."""
    outer, channels, inner = x.shape
    for t in prange(outer * channels):
        o = t // channels
        c = t - o * channels
        _dx_run(dy, x, o, c, params[c, 0], params[c, 1], params[c, 2], params[c, 3],
                params[c, 4], dx)


@kernel(parallel=True)
def column_backward(dy, x, mean, invstd, weight, inner, nblocks, write_dx, dx, sum_dy,
                    sum_dy_xmu):
    """Per-channel ``sum(dy)``, ``sum(dy * (x - mean))`` over rows of (rows, C * inner)
    arrays and (``write_dx``) the training-mode ``dx``, in one call."""
    rows, width = x.shape
    channels = width // inner
    mean_cols = _expand(mean, inner)
    s = np.zeros((nblocks, width))
    sx = np.zeros((nblocks, width))
    for blk in prange(nblocks):
        sb = s[blk]
        sxb = sx[blk]
        for r in range(blk * rows // nblocks, (blk + 1) * rows // nblocks):
            g_row = dy[r]
            x_row = x[r]
            for j in range(width):
                g = np.float64(g_row[j])
                sb[j] += g
                sxb[j] += g * (np.float64(x_row[j]) - mean_cols[j])
    n = float(rows * inner)
    params = np.empty((5, width), x.dtype)
    for c in range(channels):
        a = 0.0
        b = 0.0
        for blk in range(nblocks):
            for j in range(c * inner, (c + 1) * inner):
                a += s[blk, j]
                b += sx[blk, j]
        sum_dy[c] = a
        sum_dy_xmu[c] = b
        for j in range(c * inner, (c + 1) * inner):
            params[0, j] = mean[c]
            params[1, j] = mean[c] - np.float64(params[0, j])
            params[2, j] = weight[c] * invstd[c]
            params[3, j] = a / n
            params[4, j] = invstd[c] * invstd[c] * b / n
    if write_dx:
        for r in prange(rows):
            _dx_row(dy[r], x[r], params, dx[r])


@kernel()
def _dx_row(g_row, x_row, params, out):
    hi = params[0]
    lo = params[1]
    a = params[2]
    b = params[3]
    k = params[4]
    for j in range(x_row.shape[0]):
        out[j] = ((g_row[j] - b[j]) - ((x_row[j] - hi[j]) - lo[j]) * k[j]) * a[j]


@kernel(parallel=True)
def parallel_copy(src, dst, nblocks):
    """Copy flat ``src`` into ``dst`` in ``nblocks`` parallel blocks (the memory floor)."""
    n = src.shape[0]
    for blk in prange(nblocks):
        lo = blk * n // nblocks
        hi = (blk + 1) * n // nblocks
        dst[lo:hi] = src[lo:hi]

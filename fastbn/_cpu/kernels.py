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
the channel's running mean (see ``_accumulate_run``), and pieces are combined
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


# Run helpers take 1-D contiguous slices and loop from 0: with a variable start
# LLVM cannot prove the index non-negative, keeps Numba's wraparound check and
# falls back to gathers.
@kernel(fastmath=REDUCE_MATH)
def _run_sum(run, shift):
    s = 0.0
    for i in range(run.shape[0]):
        s += np.float64(run[i]) - shift
    return s


@kernel(fastmath=REDUCE_MATH)
def _run_sqdev(run, center):
    q = 0.0
    for i in range(run.shape[0]):
        d = np.float64(run[i]) - center
        q += d * d
    return q


@kernel(fastmath=REDUCE_MATH)
def _run_dev_sums(run, center):
    s1 = 0.0
    s2 = 0.0
    for i in range(run.shape[0]):
        d = np.float64(run[i]) - center
        s1 += d
        s2 += d * d
    return s1, s2


@kernel()
def _accumulate_run(run, shift, j, n, mean_rel, m2):
    """Merge the moments of ``run`` into accumulator ``j`` (means relative to ``shift``).

    A channel's first piece is exact two-pass.  Every later piece takes its
    deviations about the channel's running mean ``center`` in one pass:
    ``s1 = sum(x - center)``, ``s2 = sum((x - center)^2)``, piece mean
    ``center + s1/m`` and piece M2 ``s2 - s1^2/m``.  This is the corrected
    two-pass algorithm with the first pass replaced by the running mean, not
    ``E[x^2] - E[x]^2``: ``s1^2/m <= s2``, and the rounding error of ``s2`` is
    eps times ``M2_piece + m (piece mean - center)^2``, both of which the
    channel's total M2 contains (Chan's merge adds the second), so the error
    relative to the final variance stays O(eps) whatever the offset.
    """
    length = run.shape[0]
    for p0 in range(0, length, CHUNK):
        piece = run[p0:min(p0 + CHUNK, length)]
        m = float(piece.shape[0])
        if n[j] == 0.0:
            mk = _run_sum(piece, shift) / m
            qk = _run_sqdev(piece, shift + mk)
        else:
            s1, s2 = _run_dev_sums(piece, shift + mean_rel[j])
            mk = mean_rel[j] + s1 / m
            qk = s2 - s1 * (s1 / m)
        n_new = n[j] + m
        delta = mk - mean_rel[j]
        mean_rel[j] += delta * (m / n_new)
        m2[j] += qk + delta * delta * (n[j] * m / n_new)
        n[j] = n_new


@kernel()
def _affine_run(run, hi, lo, scale, shift, out):
    for i in range(run.shape[0]):
        out[i] = ((run[i] - hi) - lo) * scale + shift


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
        for o in range(part * outer // nparts, (part + 1) * outer // nparts):
            for c in range(c0, c1):
                _accumulate_run(x[o, c], shift[c], c - c0, n, mu, q)
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
        for o in range(outer):
            for c in range(c0, c1):
                _accumulate_run(x[o, c], shift[c], c - c0, n, mu, q)
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
        for o in range(outer):
            for c in range(c0, c1):
                _affine_run(x[o, c], params[c, 0], params[c, 1], params[c, 2], params[c, 3],
                            y[o, c])


@kernel(parallel=True)
def affine_channels(x, params, y):
    """``y = ((x - hi) - lo) * scale + shift`` per channel, ``params`` of shape (C, 4)."""
    outer, channels, inner = x.shape
    for t in prange(outer * channels):
        o = t // channels
        c = t - o * channels
        _affine_run(x[o, c], params[c, 0], params[c, 1], params[c, 2], params[c, 3], y[o, c])


@kernel(parallel=True)
def column_moments(x, shift, nblocks, chunk_rows, count, mean_rel, m2):
    """Per-(block of rows, column) moments of ``x`` (rows, W), means relative to ``shift``.

    ``count`` has shape (nblocks,); ``mean_rel`` and ``m2`` (nblocks, W).
    """
    rows, width = x.shape
    for blk in prange(nblocks):
        r0 = blk * rows // nblocks
        r1 = (blk + 1) * rows // nblocks
        mu = mean_rel[blk]
        q = m2[blk]
        mu[:] = 0.0
        q[:] = 0.0
        sk = np.empty(width)
        qk = np.empty(width)
        n = 0.0
        r = r0
        while r < r1:
            re = min(r + chunk_rows, r1)
            nk = float(re - r)
            sk[:] = 0.0
            for rr in range(r, re):
                for j in range(width):
                    sk[j] += np.float64(x[rr, j]) - shift[j]
            for j in range(width):
                sk[j] /= nk
            qk[:] = 0.0
            for rr in range(r, re):
                for j in range(width):
                    d = (np.float64(x[rr, j]) - shift[j]) - sk[j]
                    qk[j] += d * d
            n_new = n + nk
            wk = nk / n_new
            wm = n * nk / n_new
            for j in range(width):
                delta = sk[j] - mu[j]
                mu[j] += delta * wk
                q[j] += qk[j] + delta * delta * wm
            n = n_new
            r = re
        count[blk] = n


@kernel(parallel=True)
def affine_columns(x, params, y):
    """``y = ((x - hi) - lo) * scale + shift`` per column, ``params`` of shape (4, W)."""
    rows, width = x.shape
    hi = params[0]
    lo = params[1]
    scale = params[2]
    shift = params[3]
    for r in prange(rows):
        for j in range(width):
            y[r, j] = ((x[r, j] - hi[j]) - lo[j]) * scale[j] + shift[j]


@kernel(fastmath=REDUCE_MATH)
def _run_grad_sums(dy, x, mean):
    s = 0.0
    sx = 0.0
    for i in range(x.shape[0]):
        g = np.float64(dy[i])
        s += g
        sx += g * (np.float64(x[i]) - mean)
    return s, sx


@kernel()
def _dx_run(dy, x, hi, lo, a, b, k, dx):
    for i in range(x.shape[0]):
        dx[i] = ((dy[i] - b) - ((x[i] - hi) - lo) * k) * a


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
                a, b = _run_grad_sums(dy[o, c], x[o, c], mean[c])
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
                a, b = _run_grad_sums(dy[o, c], x[o, c], mean[c])
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
                _dx_run(dy[o, c], x[o, c], params[c, 0], params[c, 1], params[c, 2],
                        params[c, 3], params[c, 4], dx[o, c])


@kernel(parallel=True)
def dx_channels(dy, x, params, dx):
    """``dx = ((dy - b) - ((x - hi) - lo) * k) * a`` per channel, ``params`` (C, 5)."""
    outer, channels, inner = x.shape
    for t in prange(outer * channels):
        o = t // channels
        c = t - o * channels
        _dx_run(dy[o, c], x[o, c], params[c, 0], params[c, 1], params[c, 2], params[c, 3],
                params[c, 4], dx[o, c])


@kernel(parallel=True)
def column_grad_sums(dy, x, mean, nblocks, sum_dy, sum_dy_xmu):
    """Per-(block of rows, column) ``sum(dy)`` and ``sum(dy * (x - mean))``, (nblocks, W)."""
    rows, width = x.shape
    for blk in prange(nblocks):
        r0 = blk * rows // nblocks
        r1 = (blk + 1) * rows // nblocks
        s = sum_dy[blk]
        sx = sum_dy_xmu[blk]
        s[:] = 0.0
        sx[:] = 0.0
        for r in range(r0, r1):
            for j in range(width):
                g = np.float64(dy[r, j])
                s[j] += g
                sx[j] += g * (np.float64(x[r, j]) - mean[j])


@kernel(parallel=True)
def dx_columns(dy, x, params, dx):
    """``dx = ((dy - b) - ((x - hi) - lo) * k) * a`` per column, ``params`` (5, W)."""
    rows, width = x.shape
    hi = params[0]
    lo = params[1]
    a = params[2]
    b = params[3]
    k = params[4]
    for r in prange(rows):
        for j in range(width):
            dx[r, j] = ((dy[r, j] - b[j]) - ((x[r, j] - hi[j]) - lo[j]) * k[j]) * a[j]


@kernel(parallel=True)
def parallel_copy(src, dst, nblocks):
    """Copy flat ``src`` into ``dst`` in ``nblocks`` parallel blocks (the memory floor)."""
    n = src.shape[0]
    for blk in prange(nblocks):
        lo = blk * n // nblocks
        hi = (blk + 1) * n // nblocks
        dst[lo:hi] = src[lo:hi]

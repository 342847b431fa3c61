"""Numba kernels for the CPU backend.

Every kernel works on C-contiguous arrays of one float dtype (float32 or
float64) in a canonical layout and knows nothing about axes:

* "channel" kernels take ``x`` of shape (outer, C, inner); a channel is
  ``x[:, c, :]``, a set of ``outer`` contiguous runs of ``inner`` values.  They
  run one task per (channel, part) and, when a channel is one task, normalize it
  right after computing its statistics, while its data is still in cache.
* "column" kernels take ``x`` of shape (rows, W) and reduce over rows, with
  every column its own accumulator.  This is the fast path when ``inner`` is
  short (channels-last, (N, C)): the loop over W is contiguous and vectorizes.

Numerics (CONTRACT section 5).  Statistics are accumulated in float64 relative
to a per-channel shift (the channel's first value), in chunks that fit in L1:
each chunk gets an exact two-pass mean and sum of squared deviations, and chunks
are combined with Chan's merge.  There is no ``E[x^2] - E[x]^2`` anywhere.
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

# Values per chunk of a channel: two passes over a chunk stay in L1.
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


@kernel()
def _segment_sum(x, c, e0, e1, shift):
    """Sum of ``x - shift`` over the flat elements [e0, e1) of channel ``c``."""
    inner = x.shape[2]
    s = 0.0
    p = e0
    while p < e1:
        o = p // inner
        i0 = p - o * inner
        i1 = min(inner, i0 + (e1 - p))
        s += _run_sum(x[o, c, i0:i1], shift)
        p += i1 - i0
    return s


@kernel()
def _segment_sqdev(x, c, e0, e1, center):
    inner = x.shape[2]
    q = 0.0
    p = e0
    while p < e1:
        o = p // inner
        i0 = p - o * inner
        i1 = min(inner, i0 + (e1 - p))
        q += _run_sqdev(x[o, c, i0:i1], center)
        p += i1 - i0
    return q


@kernel()
def _segment_moments(x, c, e0, e1, shift):
    """Count, mean relative to ``shift`` and M2 of channel ``c``'s elements [e0, e1)."""
    n = 0.0
    mean = 0.0
    m2 = 0.0
    a = e0
    while a < e1:
        b = min(a + CHUNK, e1)
        nk = float(b - a)
        mk = _segment_sum(x, c, a, b, shift) / nk
        qk = _segment_sqdev(x, c, a, b, shift + mk)
        n_new = n + nk
        delta = mk - mean
        mean += delta * (nk / n_new)
        m2 += qk + delta * delta * (n * nk / n_new)
        n = n_new
        a = b
    return n, mean, m2


@kernel()
def _affine_run(run, hi, lo, scale, shift, out):
    for i in range(run.shape[0]):
        out[i] = ((run[i] - hi) - lo) * scale + shift


@kernel(parallel=True)
def channel_forward(x, shift, nparts, fuse, weight, bias, eps, y, count, mean_rel, m2):
    """Per-(channel, part) moments; with ``fuse``, also normalize each channel into ``y``.

    ``count``, ``mean_rel``, ``m2`` have shape (C, nparts); means are relative
    to ``shift[c]``.  ``fuse`` requires ``nparts == 1``.
    """
    outer, channels, inner = x.shape
    n = outer * inner
    params = np.empty((channels, 4), x.dtype)
    for t in prange(channels * nparts):
        c = t // nparts
        part = t - c * nparts
        e0 = part * n // nparts
        e1 = (part + 1) * n // nparts
        cnt, mu, q = _segment_moments(x, c, e0, e1, shift[c])
        count[c, part] = cnt
        mean_rel[c, part] = mu
        m2[c, part] = q
        if fuse:
            hi, lo = _two_sum(shift[c], mu)
            params[c, 0] = hi
            params[c, 1] = (hi - np.float64(params[c, 0])) + lo
            params[c, 2] = _invstd(q / cnt, eps) * weight[c]
            params[c, 3] = bias[c]
            for o in range(outer):
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
def channel_backward(dy, x, nparts, fuse, mean, invstd, weight, dx, sum_dy, sum_dy_xmu):
    """Per-(channel, part) ``sum(dy)`` and ``sum(dy * (x - mean))``, outputs (C, nparts).

    With ``fuse`` (``nparts == 1``) also writes the training-mode ``dx``.
    ``mean`` is float64 and exact: the caller's mean, converted.
    """
    outer, channels, inner = x.shape
    n = float(outer * inner)
    params = np.empty((channels, 5), x.dtype)
    for t in prange(channels * nparts):
        c = t // nparts
        part = t - c * nparts
        o0 = part * outer // nparts
        o1 = (part + 1) * outer // nparts
        s = 0.0
        sx = 0.0
        for o in range(o0, o1):
            a, b = _run_grad_sums(dy[o, c], x[o, c], mean[c])
            s += a
            sx += b
        sum_dy[c, part] = s
        sum_dy_xmu[c, part] = sx
        if fuse:
            params[c, 0] = mean[c]
            params[c, 1] = mean[c] - np.float64(params[c, 0])
            params[c, 2] = weight[c] * invstd[c]
            params[c, 3] = s / n
            params[c, 4] = invstd[c] * invstd[c] * sx / n
            for o in range(outer):
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

"""The channel path: ``x`` of shape (outer, C, inner), a channel ``x[:, c, :]`` being
``outer`` contiguous runs of ``inner`` values.  A task owns a group of
neighbouring channels, whose runs are adjacent in memory (long streams for the
prefetchers), and normalizes the group right after reducing it, while its data
is still in cache.  Short runs are reduced row-wise over several channels.

The normalization subtracts the mean as an unevaluated sum ``hi + lo`` of two
numbers of the working dtype, ``(x - hi) - lo``: with ``x`` near the mean,
``x - hi`` is exact (Sterbenz), so float32 data far from zero keep their full
precision even though the arithmetic is float32 and vectorizes.  Parameters of
an affine pass are rows ``(hi, lo, scale, shift)`` of a (C, 4) array.
"""

import numpy as np
from numba import prange

from ..._jit import kernel
from .numerics import CHUNK, REDUCE_MATH, _invstd, _merge_piece, _merged, _two_sum
from .codegen import (
    LINE_BYTES, _ep, _flat, _grad, _line_affine, _line_affine_split, _line_dx, _put, _store_fence,
    _stream_span, _streams
)
from .pipes import _strided_dev_sums, _strided_dev_sums_affine
from .tiles import PREFETCH_BYTES, _prefetch_line


# Run helpers index x[o, c, i] directly (no slice objects: their set-up costs
# more than a short run) with an unsigned loop index: with a signed one LLVM
# cannot drop Numba's negative-index wraparound and falls back to gathers.

@kernel()
def _affine_stream(xf, yf, start, stop, hi, lo, scale, shift, resf, relu):
    """``yf[start:stop] = ((xf - hi) - lo) * scale + shift`` with streaming stores, with the
    epilogue (``codegen._ep``: ``+ resf``, then ReLU where ``relu``)."""
    first, last = _stream_span(yf, start, stop)
    for i in range(np.uint64(start), np.uint64(first)):
        yf[i] = _ep(((xf[i] - hi) - lo) * scale + shift, resf, i, relu)
    for i in range(first, last, LINE_BYTES // yf.itemsize):
        _line_affine(xf, i, yf, hi, lo, scale, shift, True, resf, relu)
    for i in range(np.uint64(last), np.uint64(stop)):
        yf[i] = _ep(((xf[i] - hi) - lo) * scale + shift, resf, i, relu)


@kernel(inline="always")
def _dx_value(dyf, xf, yf, dresf, i, hi, lo, a, b, k):
    """``dx`` at flat ``i`` from ``g``, ``dy`` masked by ``yf > 0`` (``yf`` None: ``dy``);
    ``g`` also into ``dresf`` unless it is empty."""
    g = _grad(dyf, yf, i)
    _put(dresf, i, g)
    return ((g - b) - ((xf[i] - hi) - lo) * k) * a


@kernel()
def _dx_stream(dyf, xf, outf, start, stop, hi, lo, a, b, k, yf, dresf):
    """``outf[start:stop] = ((g - b) - ((x - hi) - lo) * k) * a`` with streaming stores
    (``_dx_value``)."""
    first, last = _stream_span(outf, start, stop)
    for i in range(np.uint64(start), np.uint64(first)):
        outf[i] = _dx_value(dyf, xf, yf, dresf, i, hi, lo, a, b, k)
    ahead = PREFETCH_BYTES // dyf.itemsize
    for i in range(first, last, LINE_BYTES // outf.itemsize):
        if yf is not None:
            # the mask becomes a masked load of dy that waits for y's compare: fetch ahead
            _prefetch_line(dyf, i + ahead)
        _line_dx(dyf, xf, i, outf, hi, lo, a, b, k, True, yf, dresf)
    for i in range(np.uint64(last), np.uint64(stop)):
        outf[i] = _dx_value(dyf, xf, yf, dresf, i, hi, lo, a, b, k)


@kernel()
def _line_stores(out):
    """How ``out`` is written: 2 streamed lines, 1 cached lines (an item-aligned output
    below STREAM_MIN_BYTES), 0 scalar stores (runs shorter than a line, or misaligned)."""
    if _streams(out):
        return 2
    return 1 if out.ctypes.data % out.itemsize == 0 else 0


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
def _accumulate_rows(x, o0, o1, c0, c1, shift, n, mean_rel, m2):
    """Moments of channels [c0, c1) over rows [o0, o1), in L1-sized pieces, into fresh
    (zero) accumulators.

    Long runs are cut into pieces of at most CHUNK values, a channel's first piece
    exact two-pass.  Short runs are batched, several rows to a piece, so that merges
    stay rare; each piece takes deviations about the channel's running mean, which
    starts as the mean of its first run (``_first_run_mean``).  The first piece then
    has the error bound of every later one (see ``_accumulate``) for one extra pass over
    a single run, not two.
    """
    inner = x.shape[2]
    if inner >= CHUNK:
        for o in range(o0, o1):
            for c in range(c0, c1):
                for i0 in range(0, inner, CHUNK):
                    _accumulate(x, o, o + 1, i0, min(i0 + CHUNK, inner), c, shift[c], c - c0,
                                n, mean_rel, m2)
    elif o1 > o0:
        # Channel by channel over a batch of rows, sums in registers across runs.  The
        # same operations per channel as _short_runs_moments, in batch-major order.
        xf = x.reshape(x.size)
        acc = np.empty(2)
        for c in range(c0, c1):
            mean_rel[c - c0] = _first_run_mean(x, xf, o0, c, shift, acc)
        rows = _batch_rows(inner)
        for b0 in range(o0, o1, rows):
            b1 = min(b0 + rows, o1)
            m = float((b1 - b0) * inner)
            for c in range(c0, c1):
                a1, a2 = _runs_dev_sums(x, xf, b0, b1, c, shift[c] + mean_rel[c - c0], acc)
                _merge_piece(a1, a2, m, c - c0, n, mean_rel, m2)


@kernel(inline="always")
def _batch_rows(inner):
    """Rows per piece of a channel of short runs: about CHUNK values."""
    return max(1, CHUNK // inner)


@kernel(inline="always")
def _first_run_mean(x, xf, o, c, shift, acc):
    """Mean of the run ``x[o, c, :]`` relative to ``shift[c]``: the first centre of a
    channel of short runs."""
    return _runs_dev_sums(x, xf, o, o + 1, c, shift[c], acc)[0] / x.shape[2]


@kernel()
def _short_runs_moments(x, xf, yf, o0, o1, c, shift, w, params, acc, resf, relu):
    """``(count, mean relative to shift[c], M2)`` of channel ``c`` of short runs over rows
    [o0, o1), exactly as ``_accumulate_rows`` computes them; where ``w >= 0`` channel ``w``
    is normalized into ``yf`` (an output that stays in cache) with row ``w`` of ``params``
    over the same rows, in the same loop (``_strided_dev_sums_affine``), with the epilogue."""
    channels, inner = x.shape[1], x.shape[2]
    lanes = LINE_BYTES // x.itemsize
    nlines = inner // lanes
    whole = nlines * lanes
    stride = channels * inner
    n, mu, q = 0.0, _first_run_mean(x, xf, o0, c, shift, acc), 0.0
    rows = _batch_rows(inner)
    for b0 in range(o0, o1, rows):
        b1 = min(b0 + rows, o1)
        center = shift[c] + mu
        acc[0] = 0.0
        acc[1] = 0.0
        start = (b0 * channels + c) * inner
        if w >= 0:
            hi, lo, scale, shift_w = params[w, 0], params[w, 1], params[w, 2], params[w, 3]
            _strided_dev_sums_affine(xf, start, b1 - b0, stride, nlines, center, yf,
                                     (b0 * channels + w) * inner, hi, lo, scale, shift_w, resf,
                                     relu, acc)
            for o in range(b0, b1):
                t = (o * channels + w) * inner
                for i in range(np.uint64(t + whole), np.uint64(t + inner)):
                    yf[i] = _ep(((xf[i] - hi) - lo) * scale + shift_w, resf, i, relu)
        else:
            _strided_dev_sums(xf, start, b1 - b0, stride, nlines, center, acc)
        a1, a2 = acc[0], acc[1]
        if whole < inner:
            t1, t2 = _run_dev_sums(x, b0, b1, c, whole, inner, center)
            a1 += t1
            a2 += t2
        m = float((b1 - b0) * inner)
        mu, q = _merged(n, mu, q, a1, a2, m)
        n += m
    return n, mu, q


@kernel()
def _short_runs_forward(x, c0, c1, shift, weight, bias, eps, y, mean, var, invstd, params, res,
                        relu):
    """Training forward of channels [c0, c1) of short runs into ``y`` that stays in cache:
    the statistics of channel c + 1 and the output of channel c in one loop."""
    outer = x.shape[0]
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    resf = _flat(res)
    acc = np.empty(2)
    n, mu, q = _short_runs_moments(x, xf, yf, 0, outer, c0, shift, -1, params, acc, resf, relu)
    for c in range(c0, c1):
        _finish_channel(c, n, mu, q, shift, weight, bias, eps, mean, var, invstd, params)
        if c + 1 < c1:
            n, mu, q = _short_runs_moments(x, xf, yf, 0, outer, c + 1, shift, c, params, acc,
                                           resf, relu)
        else:
            _affine_runs(x, 0, outer, c, c + 1, params, y, res, relu)


# The fused short-run forward pays off for float32 runs of at least this many bytes.
# Measured on the 2-core EPYC (32 channels per thread, A/B in one process): 0.3-2 us
# faster for runs of 128-512 values, but with runs of 4 lines it stalls whenever the
# output lies within a few hundred bytes of x modulo 4 KiB (the usual placement of two
# arrays of one size: NumPy puts both 16 bytes past a page boundary), and the row
# stride is a multiple of 4 KiB: a store that straddles into the next channel's first
# line aliases the next row's loads (16.5 vs 12 us for (32, 64, 64)).  float64 runs
# need no conversion for their statistics, and the fused loop measured 0.3-4 us slower.
FUSE_MIN_RUN_BYTES = 512


@kernel()
def _fuses_short_runs(x, y):
    """Whether the forward takes ``_short_runs_forward``: float32 runs of at least
    FUSE_MIN_RUN_BYTES but below CHUNK values, ``y`` written with ordinary vector stores
    (it stays in cache)."""
    inner = x.shape[2]
    return (x.itemsize == 4 and FUSE_MIN_RUN_BYTES <= inner * x.itemsize and inner < CHUNK
            and _line_stores(y) == 1)


@kernel(inline="always")
def _runs_dev_sums(x, xf, o0, o1, c, center, acc):
    """``sum(x - center)`` and ``sum((x - center)^2)`` over the runs ``x[o0:o1, c, :]``
    (``xf`` its flat view, ``acc`` scratch of 2): whole lines in vector registers, then
    the runs' scalar tails."""
    channels, inner = x.shape[1], x.shape[2]
    lanes = LINE_BYTES // x.itemsize
    whole = inner // lanes * lanes
    acc[0] = 0.0
    acc[1] = 0.0
    _strided_dev_sums(xf, (o0 * channels + c) * inner, o1 - o0, channels * inner,
                      inner // lanes, center, acc)
    a1, a2 = acc[0], acc[1]
    if whole < inner:
        t1, t2 = _run_dev_sums(x, o0, o1, c, whole, inner, center)
        a1 += t1
        a2 += t2
    return a1, a2


@kernel()
def _affine_runs(x, o0, o1, c0, c1, params, y, res, relu):
    """Normalize the runs ``x[o, c, :]`` for o in [o0, o1), c in [c0, c1), row by row.

    Within a row the runs of neighbouring channels are adjacent, so reads and
    writes stream (channel by channel, runs ``C * inner`` apart alias in L1).
    The flat views are made once here, not per run: for short runs their set-up
    would cost more than the run.  Whole lines are written with streaming stores,
    or, for an output that stays in cache, ordinary vector stores (``_line_stores``).
    The epilogue (``codegen._ep``) adds ``res`` (None: nothing) and applies ReLU where
    ``relu``.
    """
    outer, channels, inner = x.shape
    stores = _line_stores(y)
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    resf = _flat(res)
    if stores == 0 or inner < LINE_BYTES // y.itemsize:
        for o in range(o0, o1):
            for c in range(c0, c1):
                hi, lo, scale, shift = params[c, 0], params[c, 1], params[c, 2], params[c, 3]
                t = (o * channels + c) * inner
                for i in range(np.uint64(t), np.uint64(t + inner)):
                    yf[i] = _ep(((xf[i] - hi) - lo) * scale + shift, resf, i, relu)
        return
    lanes = LINE_BYTES // y.itemsize
    whole = inner // lanes * lanes
    for o in range(o0, o1):
        for c in range(c0, c1):
            start = (o * channels + c) * inner
            hi, lo, scale, shift = params[c, 0], params[c, 1], params[c, 2], params[c, 3]
            if stores == 2:
                _affine_stream(xf, yf, start, start + inner, hi, lo, scale, shift, resf, relu)
                continue
            # cached: whole lines from the run's start (inlined: a call per short run costs
            # as much as its lines), then a scalar tail
            for i in range(start, start + whole, lanes):
                _line_affine(xf, i, yf, hi, lo, scale, shift, False, resf, relu)
            for i in range(np.uint64(start + whole), np.uint64(start + inner)):
                yf[i] = _ep(((xf[i] - hi) - lo) * scale + shift, resf, i, relu)


@kernel()
def _first_values(x):
    """Each channel's first value of ``x`` (outer, C, inner), float64: the statistics' shift."""
    shift = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        shift[c] = x[0, c, 0]
    return shift


@kernel(inline="always")
def _group_part(t, group, nparts, channels, outer):
    """Task ``t`` of a plan of (group of ``group`` channels, part of ``nparts`` of the rows):
    ``(c0, c1, part, o0, o1)``, channels [c0, c1) over rows [o0, o1)."""
    g = t // nparts
    part = t - g * nparts
    c0 = g * group
    return c0, min(c0 + group, channels), part, part * outer // nparts, (part + 1) * outer // nparts


@kernel(parallel=True)
def channel_moments(x, shift, group, nparts, count, mean_rel, m2):
    """Per-(channel, part) count, mean relative to ``shift[c]`` and M2, arrays (C, nparts).

    One task per (group of channels, part of the ``outer`` axis): within a
    task, the runs of ``group`` neighbouring channels are contiguous in memory,
    so the hardware prefetchers see long streams instead of short hops.
    """
    outer, channels, inner = x.shape
    for t in prange(-(-channels // group) * nparts):
        c0, c1, part, o0, o1 = _group_part(t, group, nparts, channels, outer)
        n = np.zeros(c1 - c0)
        mu = np.zeros(c1 - c0)
        q = np.zeros(c1 - c0)
        _accumulate_rows(x, o0, o1, c0, c1, shift, n, mu, q)
        for c in range(c0, c1):
            count[c, part] = n[c - c0]
            mean_rel[c, part] = mu[c - c0]
            m2[c, part] = q[c - c0]


@kernel(inline="always")
def _channel_stats(c, n, mu, q, shift, eps, mean, var, invstd):
    """Channel ``c``'s ``mean``, biased ``var`` and ``invstd`` from its count, mean relative
    to ``shift[c]`` and M2; returns ``(hi, lo, invstd)``, the mean as an unevaluated sum."""
    v = q / n
    inv = _invstd(v, eps)
    hi, lo = _two_sum(shift[c], mu)
    mean[c] = hi
    var[c] = v
    invstd[c] = inv
    return hi, lo, inv


@kernel(inline="always")
def _finish_channel(c, n, mu, q, shift, weight, bias, eps, mean, var, invstd, params):
    """``_channel_stats`` and channel ``c``'s affine parameters ``(hi, lo, scale, shift)``
    (row ``c`` of ``params``)."""
    hi, lo, inv = _channel_stats(c, n, mu, q, shift, eps, mean, var, invstd)
    params[c, 0] = hi
    params[c, 1] = (hi - np.float64(params[c, 0])) + lo
    params[c, 2] = inv * weight[c]
    params[c, 3] = bias[c]


@kernel(parallel=True)
def channel_forward(x, group, weight, bias, eps, y, mean, var, invstd, res, relu):
    """Training forward, fused: each group of channels is reduced, then normalized from cache.

    Writes ``y`` (with the epilogue of ``_affine_runs``) and the float64 ``mean``, biased
    ``var`` and ``invstd`` per channel.
    """
    outer, channels, inner = x.shape
    shift = _first_values(x)
    ngroups = -(-channels // group)
    params = np.empty((channels, 4), x.dtype)
    fused = _fuses_short_runs(x, y)
    for g in prange(ngroups):
        c0 = g * group
        c1 = min(c0 + group, channels)
        if fused:
            _short_runs_forward(x, c0, c1, shift, weight, bias, eps, y, mean, var, invstd,
                                params, res, relu)
        else:
            n = np.zeros(c1 - c0)
            mu = np.zeros(c1 - c0)
            q = np.zeros(c1 - c0)
            _accumulate_rows(x, 0, outer, c0, c1, shift, n, mu, q)
            for c in range(c0, c1):
                _finish_channel(c, n[c - c0], mu[c - c0], q[c - c0], shift, weight, bias, eps,
                                mean, var, invstd, params)
            _affine_runs(x, 0, outer, c0, c1, params, y, res, relu)
            _store_fence()


@kernel()
def _affine_scalar(xf, yf, start, stop, channels, inner, params, resf, relu):
    for i in range(start, stop):
        c = (i // inner) % channels
        yf[i] = _ep(((xf[i] - params[c, 0]) - params[c, 1]) * params[c, 2] + params[c, 3], resf,
                    i, relu)


@kernel()
def _affine_span(xf, yf, start, stop, channels, inner, params, resf, relu):
    """Flat ``[start, stop)`` of the (outer, C, inner) runs, normalized as one stream of
    whole lines: a run's parameters switch within a line where two runs share it (runs
    of ``inner >= lanes`` values), so no line is written twice and every run boundary
    costs a compare, not a call with a scalar head and tail.  With the epilogue."""
    first, last = _stream_span(yf, start, stop)
    _affine_scalar(xf, yf, start, first, channels, inner, params, resf, relu)
    lanes = LINE_BYTES // yf.itemsize
    t = first // inner
    c = t % channels
    run_end = (t + 1) * inner
    i = first
    while i < last:
        hi, lo, scale, shift = params[c, 0], params[c, 1], params[c, 2], params[c, 3]
        whole = i + (min(run_end, last) - i) // lanes * lanes
        for k in range(i, whole, lanes):
            _line_affine(xf, k, yf, hi, lo, scale, shift, True, resf, relu)
        i = whole
        n = c + 1 if c + 1 < channels else 0
        if i < run_end and i < last:
            _line_affine_split(xf, i, yf, run_end - i, hi, lo, scale, shift, params[n, 0],
                               params[n, 1], params[n, 2], params[n, 3], resf, relu)
            i += lanes
        c = n
        run_end += inner
    _affine_scalar(xf, yf, max(first, last), stop, channels, inner, params, resf, relu)


@kernel(parallel=True)
def affine_channels(x, params, nblocks, y, res, relu):
    """``y = ((x - hi) - lo) * scale + shift`` per channel, ``params`` of shape (C, 4), with
    the epilogue (``+ res`` where it is an array, then ReLU where ``relu``).

    ``nblocks`` tasks, each a contiguous range of the (outer, C) runs.
    """
    outer, channels, inner = x.shape
    if _streams(y) and inner >= LINE_BYTES // y.itemsize:
        xf = x.reshape(x.size)
        yf = y.reshape(y.size)
        resf = _flat(res)
        for blk in prange(nblocks):
            _affine_span(xf, yf, blk * x.size // nblocks, (blk + 1) * x.size // nblocks,
                         channels, inner, params, resf, relu)
            _store_fence()
        return
    for blk in prange(nblocks):
        o0, c0, c1, r0, r1, o1, c2 = _block_runs(blk, nblocks, outer, channels)
        _affine_runs(x, o0, o0 + 1, c0, c1, params, y, res, relu)
        _affine_runs(x, r0, r1, 0, channels, params, y, res, relu)
        _affine_runs(x, o1, o1 + 1, 0, c2, params, y, res, relu)
        _store_fence()


@kernel(inline="always")
def _block_runs(blk, nblocks, outer, channels):
    """Task ``blk``'s contiguous share of the (outer, C) runs as three pieces, any of them
    empty: ``(o0, c0, c1)`` channels [c0, c1) of row o0, ``(r0, r1)`` whole rows [r0, r1),
    ``(o1, c2)`` channels [0, c2) of row o1."""
    runs = outer * channels
    t0 = blk * runs // nblocks
    t1 = (blk + 1) * runs // nblocks
    o0 = t0 // channels
    o1 = t1 // channels
    if o0 == o1:
        return o0, t0 - o0 * channels, t1 - o0 * channels, o0 + 1, o0 + 1, o1, 0
    return o0, t0 - o0 * channels, channels, o0 + 1, o1, o1, t1 - o1 * channels

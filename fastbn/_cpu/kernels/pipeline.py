"""The pipelined channel path (see ``pipes._pipelined_lines``).  A task owns a chain
of neighbouring channels [c0, c1): it reduces c0 alone, then for each channel c
writes c's output while reducing c + 1, and writes the last channel alone.  The
backward splits each channel into parts of rows that threads claim with atomic
flags.
"""

import numpy as np
from numba import prange

from ..._jit import kernel
from .numerics import REDUCE_MATH, _merge_piece
from .codegen import (
    LINE_BYTES, _claim, _flat, _grad, _load_acquire, _spin_pause, _store_fence, _store_release,
    _stream_span
)
from .tiles import PREFETCH_BYTES
from .pipes import _pipe_dev_sums_affine, _pipe_grad_sums_dx
from .channel import (
    _accumulate_rows, _affine_runs, _affine_stream, _dx_stream, _finish_channel, _first_values
)
from .channel_grad import _dx_params_of, _dx_runs


# Pipelined channel path (see ``_pipelined_lines``).  A task owns a chain of
# neighbouring channels [c0, c1): it reduces c0 alone, then for each channel c
# writes c's output while reducing c + 1 (row 0 of c + 1 first, on its own: a
# channel's first piece is exact two-pass), and writes the last channel alone.
# Rows are the runs ``x[o, c, :]``; ``nxt`` and ``cur`` are flat offsets of the
# runs of c + 1 and c in one row.

@kernel()
def _pipe_geometry(out, nxt, cur, inner, next_run):
    """Geometry of a pipelined run for the intrinsics: ``(first, last, nreduce, nwrite, pf,
    wrap, jump)``.  ``out[first:last]`` are the whole lines of ``out[cur:cur + inner]``
    (``nwrite`` of them); the run at ``nxt`` is reduced in ``nreduce`` whole lines from its
    start; prefetches run ahead in that stream and continue at flat offset ``next_run``."""
    first, last = _stream_span(out, cur, cur + inner)
    lanes = LINE_BYTES // out.itemsize
    ahead = PREFETCH_BYTES // out.itemsize
    return (first, last, inner // lanes, (last - first) // lanes, nxt + ahead, inner - ahead,
            next_run - (nxt + inner))


@kernel()
def _next_run(channels, inner, r0, r1, o, c):
    """Flat offset of the run read after the one of channel ``c + 1`` in row ``o`` of a
    pass over rows [r0, r1): the same channel's next row, or after its last row, row
    ``r0`` of channel ``c + 2``."""
    if o + 1 < r1:
        return ((o + 1) * channels + c + 1) * inner
    return (r0 * channels + c + 2) * inner


@kernel(fastmath=REDUCE_MATH)
def _flat_dev_sums(xf, lo, hi, center):
    s1 = 0.0
    s2 = 0.0
    for i in range(np.uint64(lo), np.uint64(hi)):
        d = np.float64(xf[i]) - center
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=REDUCE_MATH)
def _flat_grad_sums(gf, xf, yf, lo, hi, mean):
    s = 0.0
    sx = 0.0
    for i in range(np.uint64(lo), np.uint64(hi)):
        g = np.float64(_grad(gf, yf, i))
        s += g
        sx += g * (np.float64(xf[i]) - mean)
    return s, sx


@kernel()
def _pipelined_forward_row(xf, yf, nxt, cur, inner, next_run, center, params, c, acc, resf,
                           relu):
    """Deviation sums about ``center`` of the run at ``nxt``; the run at ``cur`` normalized
    with row ``c`` of ``params``, with the epilogue (``+ resf``, ReLU where ``relu``)."""
    first, last, nreduce, nwrite, pf, wrap, jump = _pipe_geometry(yf, nxt, cur, inner, next_run)
    hi, lo, scale, shift = params[c, 0], params[c, 1], params[c, 2], params[c, 3]
    acc[0] = 0.0
    acc[1] = 0.0
    _pipe_dev_sums_affine(xf, yf, nxt, first, nreduce, nwrite, pf, wrap, jump, center,
                          hi, lo, scale, shift, resf, relu, acc)
    t1, t2 = _flat_dev_sums(xf, nxt + nreduce * (LINE_BYTES // yf.itemsize), nxt + inner, center)
    _affine_stream(xf, yf, cur, first, hi, lo, scale, shift, resf, relu)
    _affine_stream(xf, yf, last, cur + inner, hi, lo, scale, shift, resf, relu)
    return acc[0] + t1, acc[1] + t2


@kernel()
def _pipelined_forward_chain(x, c0, c1, shift, weight, bias, eps, y, mean, var, invstd, params,
                             res, relu):
    outer, channels, inner = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    resf = _flat(res)
    n = np.zeros(1)
    mu = np.zeros(1)
    q = np.zeros(1)
    acc = np.zeros(2)
    _accumulate_rows(x, 0, outer, c0, c0 + 1, shift, n, mu, q)
    for c in range(c0, c1):
        _finish_channel(c, n[0], mu[0], q[0], shift, weight, bias, eps, mean, var, invstd,
                        params)
        if c + 1 == c1:
            _affine_runs(x, 0, outer, c, c + 1, params, y, res, relu)
            break
        n[0] = 0.0
        mu[0] = 0.0
        q[0] = 0.0
        _accumulate_rows(x, 0, 1, c + 1, c + 2, shift, n, mu, q)
        _affine_runs(x, 0, 1, c, c + 1, params, y, res, relu)
        for o in range(1, outer):
            cur = (o * channels + c) * inner
            s1, s2 = _pipelined_forward_row(xf, yf, cur + inner, cur, inner,
                                            _next_run(channels, inner, 0, outer, o, c),
                                            shift[c + 1] + mu[0], params, c, acc, resf, relu)
            _merge_piece(s1, s2, float(inner), 0, n, mu, q)


@kernel(parallel=True)
def pipelined_forward(x, ntasks, weight, bias, eps, y, mean, var, invstd, res, relu):
    """Training forward on the pipelined channel path, ``ntasks`` chains of channels, with
    the epilogue (``+ res`` where it is an array laid out like ``y``, then ReLU where
    ``relu``)."""
    channels = x.shape[1]
    shift = _first_values(x)
    params = np.empty((channels, 4), x.dtype)
    for t in prange(ntasks):
        _pipelined_forward_chain(x, t * channels // ntasks, (t + 1) * channels // ntasks, shift,
                                 weight, bias, eps, y, mean, var, invstd, params, res, relu)
        _store_fence()


@kernel()
def _pipelined_backward_row(gf, xf, df, nxt, cur, inner, next_run, mean, params, c, acc,
                            write, yf, rf):
    """``sum(g)``, ``sum(g * (x - mean))`` of the runs at ``nxt``; if ``write``, ``dx`` of
    the run at ``cur`` with row ``c`` of ``params``, in the same loop; ``g`` is ``dy``
    masked by ``yf > 0`` (``yf`` None: ``dy``), written into ``rf`` unless it is
    empty.  The sums are the same bits either way."""
    first, last, nreduce, nwrite, pf, wrap, jump = _pipe_geometry(df, nxt, cur, inner, next_run)
    if not write:
        nwrite = 0
    hi, lo, a, b, k = params[c, 0], params[c, 1], params[c, 2], params[c, 3], params[c, 4]
    acc[0] = 0.0
    acc[1] = 0.0
    _pipe_grad_sums_dx(gf, xf, yf, df, nxt, first, nreduce, nwrite, pf, wrap, jump, mean,
                       hi, lo, a, b, k, rf, acc)
    t1, t2 = _flat_grad_sums(gf, xf, yf, nxt + nreduce * (LINE_BYTES // df.itemsize),
                             nxt + inner, mean)
    if write:
        _dx_stream(gf, xf, df, cur, first, hi, lo, a, b, k, yf, rf)
        _dx_stream(gf, xf, df, last, cur + inner, hi, lo, a, b, k, yf, rf)
    return acc[0] + t1, acc[1] + t2


# Row parts.  The backward's chains are also split along ``outer``: with two
# parts, two threads share each channel of a chain, each reducing its half of
# channel c + 1 while it writes its half of c, so a thread keeps half as much in
# cache between the two reads of a channel.  (64, 256, 56, 56) float32: 2-6%
# faster, float64 10% (the traffic alone: 1.98x the copy against 2.10x).
# Writing c needs every part's sums of c.  The sums of a (channel, part) are a
# task of their own, claimed through a flag by whichever thread needs them
# first, so a thread only ever waits on sums being computed: parts queued on one
# thread (one Numba thread, more parts than threads, a busy TBB pool) get
# reduced by the part that runs first, and cannot deadlock.  A part's sums are
# the same bits whoever takes them, and a channel's are added in part order:
# the results do not depend on the schedule.
BACKWARD_ROW_PARTS = 2


@kernel()
def backward_chains(outer, channels, nthreads):
    """``(nchains, nparts)`` of the pipelined backward: chains of channels, each split
    into ``nparts`` blocks of rows, one task per (chain, part).

    The parts fix the order of a channel's sums, so their number follows the shape
    only; the chains do not change the bits (every channel's sums are its parts'
    whoever reduces them), so they follow the real thread count: the parts of a
    chain wait on each other, and run side by side only as tasks of their own.
    """
    nparts = min(BACKWARD_ROW_PARTS, outer)
    return max(1, min(nthreads // nparts, channels)), nparts


@kernel()
def _part_rows(outer, nparts, p):
    return p * outer // nparts, (p + 1) * outer // nparts


@kernel()
def _part_pass(gf, xf, df, shape, p, nparts, reduce_c, write_c, mean, params, acc, flags,
               part_sums, yf, rf):
    """Publish the sums of channel ``reduce_c`` over part ``p``'s rows (the caller claimed
    them); with ``write_c >= 0``, write ``dx`` of channel ``write_c`` over the same rows in
    the same loop."""
    outer, channels, inner = shape
    r0, r1 = _part_rows(outer, nparts, p)
    write = write_c >= 0
    s = 0.0
    sx = 0.0
    for o in range(r0, r1):
        nxt = (o * channels + reduce_c) * inner
        cur = (o * channels + write_c) * inner if write else nxt
        a, b = _pipelined_backward_row(gf, xf, df, nxt, cur, inner,
                                       _next_run(channels, inner, r0, r1, o, reduce_c - 1),
                                       mean[reduce_c], params, max(write_c, 0), acc, write, yf,
                                       rf)
        s += a
        sx += b
    part_sums[reduce_c, p, 0] = s
    part_sums[reduce_c, p, 1] = sx
    _store_release(flags, reduce_c * nparts + p, 2)


@kernel()
def _claimed_part_sums(gf, xf, df, shape, c, nparts, mean, params, acc, flags, part_sums, yf,
                       rf):
    """Channel ``c``'s sums once every part's are published; parts nobody has claimed
    are reduced here."""
    for q in range(nparts):
        i = c * nparts + q
        if _load_acquire(flags, i) == 0 and _claim(flags, i):
            _part_pass(gf, xf, df, shape, q, nparts, c, -1, mean, params, acc, flags,
                       part_sums, yf, rf)
        while _load_acquire(flags, i) != 2:
            _spin_pause()
    s = 0.0
    sx = 0.0
    for q in range(nparts):
        s += part_sums[c, q, 0]
        sx += part_sums[c, q, 1]
    return s, sx


@kernel()
def _pipelined_backward_chain(dy, x, c0, c1, p, nparts, mean, invstd, weight, dx, sum_dy,
                              sum_dy_xmu, params, flags, part_sums, y, dres):
    """Part ``p`` of the chain of channels [c0, c1): its rows of each channel written while
    its rows of the next are reduced."""
    outer, channels, inner = x.shape
    gf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    df = dx.reshape(dx.size)
    yf = _flat(y)
    rf = _flat(dres)
    n = float(outer * inner)
    r0, r1 = _part_rows(outer, nparts, p)
    acc = np.zeros(2)
    if _claim(flags, c0 * nparts + p):
        _part_pass(gf, xf, df, x.shape, p, nparts, c0, -1, mean, params, acc, flags, part_sums,
                   yf, rf)
    for c in range(c0, c1):
        s, sx = _claimed_part_sums(gf, xf, df, x.shape, c, nparts, mean, params, acc, flags,
                                   part_sums, yf, rf)
        if p == 0:
            sum_dy[c] = s
            sum_dy_xmu[c] = sx
        _dx_params_of(params, c, mean, invstd, weight, s, sx, n)
        i = (c + 1) * nparts + p
        if c + 1 < c1 and _load_acquire(flags, i) == 0 and _claim(flags, i):
            _part_pass(gf, xf, df, x.shape, p, nparts, c + 1, c, mean, params, acc, flags,
                       part_sums, yf, rf)
        else:
            _dx_runs(dy, x, r0, r1, c, c + 1, params, dx, y, dres)


@kernel(parallel=True)
def pipelined_backward(dy, x, mean, invstd, weight, nchains, nparts, dx, sum_dy, sum_dy_xmu, y,
                       dres):
    """Training backward on the pipelined channel path: ``nchains`` chains of channels,
    each in ``nparts`` parts of rows (``backward_chains``); ``dy`` masked by ``y > 0``
    (``y`` None: ``dy``), also written into ``dres`` unless it is empty."""
    channels = x.shape[1]
    flags = np.zeros(channels * nparts, np.int64)
    part_sums = np.full((channels, nparts, 2), np.nan)  # NaN until published
    params = np.empty((nchains * nparts, channels, 5), x.dtype)  # one per task: no sharing
    for t in prange(nchains * nparts):
        chain = t // nparts
        _pipelined_backward_chain(dy, x, chain * channels // nchains,
                                  (chain + 1) * channels // nchains, t - chain * nparts, nparts,
                                  mean, invstd, weight, dx, sum_dy, sum_dy_xmu, params[t],
                                  flags, part_sums, y, dres)
        _store_fence()

"""The channel path's backward: per-channel sums of ``dy`` and ``dy * (x - mean)``,
then ``dx = ((dy - b) - ((x - hi) - lo) * k) * a`` from rows ``(hi, lo, a, b, k)``
of a (C, 5) parameter array.
"""

import numpy as np
from numba import prange

from ..._jit import kernel
from .numerics import CHUNK, REDUCE_MATH
from .codegen import LINE_BYTES, _flat, _line_dx, _masked_value, _store_fence
from .tiles import PREFETCH_BYTES, _prefetch_line
from .pipes import _strided_grad_sums
from .channel import _batch_rows, _block_runs, _dx_stream, _dx_value, _group_part, _line_stores


@kernel(fastmath=REDUCE_MATH)
def _run_grad_sums(dy, x, y, o0, o1, c, i0, i1, mean):
    """``sum(g)`` and ``sum(g * (x - mean))`` over ``[o0:o1, c, i0:i1]`` (as
    ``_run_dev_sums``), ``g`` being ``dy`` masked by ``y > 0`` (``y`` None: ``dy``).
    Indexed (o, c, i), not flat: a flat index made this loop scalar."""
    s = 0.0
    sx = 0.0
    if y is None:
        for o in range(o0, o1):
            for i in range(np.uint64(i0), np.uint64(i1)):
                g = np.float64(dy[o, c, i])
                s += g
                sx += g * (np.float64(x[o, c, i]) - mean)
        return s, sx
    # the mask becomes a masked load of dy that waits for y's compare, which holds back
    # the hardware's run-ahead: blocks of PREFETCH_BYTES, the next one's dy prefetched
    channels, inner = dy.shape[1], dy.shape[2]
    dyf = dy.reshape(dy.size)
    block = PREFETCH_BYTES // dy.itemsize
    for o in range(o0, o1):
        t = (o * channels + c) * inner
        for b0 in range(np.uint64(i0), np.uint64(i1), block):
            for k in range(b0 + block, b0 + 2 * block, LINE_BYTES // dy.itemsize):
                _prefetch_line(dyf, t + k)
            for i in range(b0, min(b0 + block, np.uint64(i1))):
                g = np.float64(_masked_value(dy[o, c, i], y[o, c, i]))
                s += g
                sx += g * (np.float64(x[o, c, i]) - mean)
    return s, sx


@kernel()
def _rows_grad_sums(dy, x, y, o0, o1, c0, c1, mean, s, sx):
    """``s[c - c0] += sum(g)``, ``sx[c - c0] += sum(g * (x - mean[c]))`` over the runs
    [o0, o1) x [c0, c1), ``g`` being ``dy`` masked by ``y > 0`` (``y`` None: ``dy``).
    Short runs go channel by channel over batches of rows, their sums in vector
    registers across runs (``_strided_grad_sums``; a per-run reduction cost more than
    the run's lines); long runs one by one."""
    channels, inner = x.shape[1], x.shape[2]
    gf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    yf = _flat(y)
    if inner >= CHUNK:
        for o in range(o0, o1):
            for c in range(c0, c1):
                a, b = _run_grad_sums(dy, x, y, o, o + 1, c, 0, inner, mean[c])
                s[c - c0] += a
                sx[c - c0] += b
        return
    lanes = LINE_BYTES // x.itemsize
    whole = inner // lanes * lanes
    acc = np.empty(2)
    rows = _batch_rows(inner)
    for b0 in range(o0, o1, rows):
        b1 = min(b0 + rows, o1)
        for c in range(c0, c1):
            acc[0] = 0.0
            acc[1] = 0.0
            _strided_grad_sums(gf, xf, yf, (b0 * channels + c) * inner, b1 - b0,
                               channels * inner, inner // lanes, mean[c], acc)
            a, b = acc[0], acc[1]
            if whole < inner:
                t1, t2 = _run_grad_sums(dy, x, y, b0, b1, c, whole, inner, mean[c])
                a += t1
                b += t2
            s[c - c0] += a
            sx[c - c0] += b


@kernel()
def _dx_runs(dy, x, o0, o1, c0, c1, params, dx, y, dres):
    """Training-mode ``dx`` of the runs [o0, o1) x [c0, c1), row by row (see
    ``_affine_runs``), from ``dy`` masked by ``y > 0`` (``y`` None: ``dy``), which also
    goes into ``dres`` unless it is empty."""
    outer, channels, inner = x.shape
    stores = _line_stores(dx)
    gf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    df = dx.reshape(dx.size)
    yf = _flat(y)
    rf = _flat(dres)
    if stores == 0 or inner < LINE_BYTES // dx.itemsize:
        for o in range(o0, o1):
            for c in range(c0, c1):
                hi, lo, a, b, k = params[c, 0], params[c, 1], params[c, 2], params[c, 3], params[c, 4]
                t = (o * channels + c) * inner
                for i in range(np.uint64(t), np.uint64(t + inner)):
                    df[i] = _dx_value(gf, xf, yf, rf, i, hi, lo, a, b, k)
        return
    lanes = LINE_BYTES // dx.itemsize
    whole = inner // lanes * lanes
    for o in range(o0, o1):
        for c in range(c0, c1):
            start = (o * channels + c) * inner
            hi, lo, a, b, k = params[c, 0], params[c, 1], params[c, 2], params[c, 3], params[c, 4]
            if stores == 2:
                _dx_stream(gf, xf, df, start, start + inner, hi, lo, a, b, k, yf, rf)
                continue
            for i in range(start, start + whole, lanes):  # cached, as in _affine_runs
                _line_dx(gf, xf, i, df, hi, lo, a, b, k, False, yf, rf)
            for i in range(np.uint64(start + whole), np.uint64(start + inner)):
                df[i] = _dx_value(gf, xf, yf, rf, i, hi, lo, a, b, k)


@kernel(parallel=True)
def channel_grad_sums(dy, x, y, mean, group, nparts, sum_dy, sum_dy_xmu):
    """Per-(channel, part) ``sum(g)`` and ``sum(g * (x - mean))``, arrays (C, nparts), ``g``
    being ``dy`` masked by ``y > 0`` (``y`` None: ``dy``).

    ``mean`` is float64 and exact: the caller's mean, converted.
    """
    outer, channels, inner = x.shape
    for t in prange(-(-channels // group) * nparts):
        c0, c1, part, o0, o1 = _group_part(t, group, nparts, channels, outer)
        s = np.zeros(c1 - c0)
        sx = np.zeros(c1 - c0)
        _rows_grad_sums(dy, x, y, o0, o1, c0, c1, mean, s, sx)
        for c in range(c0, c1):
            sum_dy[c, part] = s[c - c0]
            sum_dy_xmu[c, part] = sx[c - c0]


@kernel()
def _dx_params_of(params, c, mean, invstd, weight, s, sx, n):
    """Row ``c`` of the backward parameters ``(hi, lo, a, b, k)`` in the working dtype, from
    channel ``c``'s ``sum(dy)`` ``s`` and ``sum(dy * (x - mean))`` ``sx``."""
    params[c, 0] = mean[c]
    params[c, 1] = mean[c] - np.float64(params[c, 0])
    params[c, 2] = weight[c] * invstd[c]
    params[c, 3] = s / n
    params[c, 4] = invstd[c] * invstd[c] * sx / n


@kernel()
def _dx_params(params, c, mean, invstd, weight, sum_dy, sum_dy_xmu, n):
    _dx_params_of(params, c, mean, invstd, weight, sum_dy[c], sum_dy_xmu[c], n)


@kernel(parallel=True)
def channel_backward(dy, x, mean, invstd, weight, group, dx, sum_dy, sum_dy_xmu, y, dres):
    """Training backward, fused: each group's sums, then its ``dx`` from cache.

    Writes ``dx`` and the float64 ``sum(g)``, ``sum(g * (x - mean))`` per channel, ``g``
    being ``dy`` masked by ``y > 0`` (``y`` None: ``dy``), and ``g`` into ``dres`` unless
    it is empty.
    """
    outer, channels, inner = x.shape
    n = float(outer * inner)
    ngroups = -(-channels // group)
    params = np.empty((channels, 5), x.dtype)
    for g in prange(ngroups):
        c0 = g * group
        c1 = min(c0 + group, channels)
        s = np.zeros(c1 - c0)
        sx = np.zeros(c1 - c0)
        _rows_grad_sums(dy, x, y, 0, outer, c0, c1, mean, s, sx)
        for c in range(c0, c1):
            sum_dy[c] = s[c - c0]
            sum_dy_xmu[c] = sx[c - c0]
            _dx_params(params, c, mean, invstd, weight, sum_dy, sum_dy_xmu, n)
        _dx_runs(dy, x, 0, outer, c0, c1, params, dx, y, dres)
        _store_fence()


@kernel(parallel=True)
def dx_channels(dy, x, params, nblocks, dx, y, dres):
    """``dx = ((g - b) - ((x - hi) - lo) * k) * a`` per channel, ``params`` (C, 5), ``g``
    being ``dy`` masked by ``y > 0`` (``y`` None: ``dy``), also written to ``dres`` unless
    it is empty.

    ``nblocks`` tasks, each a contiguous range of the (outer, C) runs.
    """
    outer, channels, inner = x.shape
    for blk in prange(nblocks):
        o0, c0, c1, r0, r1, o1, c2 = _block_runs(blk, nblocks, outer, channels)
        _dx_runs(dy, x, o0, o0 + 1, c0, c1, params, dx, y, dres)
        _dx_runs(dy, x, r0, r1, 0, channels, params, dx, y, dres)
        _dx_runs(dy, x, o1, o1 + 1, 0, c2, params, dx, y, dres)
        _store_fence()

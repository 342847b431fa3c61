"""The column path: ``x`` of shape (rows, W) reduced over rows, every column its own
accumulator (in vector registers for rows of up to 64 columns, in an L1-resident
array for wider rows).  This is the fast path when ``inner`` is short
(channels-last, (N, C)): the loop over W is contiguous and vectorizes.
Parameters are columns ``(hi, lo, scale, shift)`` (or the backward's five) of a
(4, W) array.
"""

import numpy as np
from numba import prange

from ..._jit import kernel
from .numerics import _merge_chunk, _two_sided_value
from .codegen import (
    LINE_BYTES, _ep, _flat, _grad, _line_affine_cols, _line_dx_cols, _line_two_sided_cols,
    _line_two_sided_exact, _masked_value, _put, _store_fence, _stream_span
)
from .tiles import (
    PREFETCH_BYTES, ROW_PREFETCH_BYTES, ROW_TILE_MAX_WIDTH, _prefetch_line, _tile_dev_sums_32,
    _tile_dev_sums_64, _tile_grad_sums_32, _tile_grad_sums_64
)
from .channel import _channel_stats, _first_values
from .plans import PLAN_THREADS, column_blocks


@kernel(inline="always")
def _prefetch_row_ahead(xf, r, width):
    """Prefetch the lines of row ``r`` of flat ``xf`` (rows, ``width``) shifted by the row
    prefetch distance (ROW_PREFETCH_BYTES)."""
    ahead = ROW_PREFETCH_BYTES[xf.itemsize // 8] // xf.itemsize
    for i in range(r * width + ahead, min((r + 1) * width + ahead, xf.size),
                   LINE_BYTES // xf.itemsize):
        _prefetch_line(xf, i)


# Row helpers: element-wise over rows [r0, r1) of x (rows, W), one call per chunk
# (a call per row costs more than a narrow row), unsigned column index so that
# the column loop vectorizes.  ``w``: a weight per row (``sample_weight``), or None
# for weight 1 (resolved at compile time; ``1.0 * d`` folds away, same bits).
@kernel()
def _row_weight(w, r):
    if w is None:
        return 1.0
    return w[r]


@kernel()
def _weight_sum(w, r0, r1):
    if w is None:
        return float(r1 - r0)
    total = 0.0
    for r in range(r0, r1):
        total += w[r]
    return total


@kernel()
def _rows_add_dev(x, w, r0, r1, shift, s1):
    for r in range(r0, r1):
        wr = _row_weight(w, r)
        for j in range(np.uint64(0), np.uint64(x.shape[1])):
            s1[j] += wr * (np.float64(x[r, j]) - shift[j])


@kernel()
def _rows_add_sqdev(x, w, r0, r1, shift, mu, q):
    for r in range(r0, r1):
        wr = _row_weight(w, r)
        for j in range(np.uint64(0), np.uint64(x.shape[1])):
            d = (np.float64(x[r, j]) - shift[j]) - mu[j]
            q[j] += wr * (d * d)


@kernel(fastmath={"contract"})
def _rows_add_dev_sums(x, w, r0, r1, shift, mu, s1, s2):
    width = x.shape[1]
    tiled = 0
    if width == 64:
        _tile_dev_sums_64(x, w, r0, r1, 0, shift, mu, s1, s2)
        tiled = 64
    elif width < ROW_TILE_MAX_WIDTH:
        tiled = width - width % 32
        for j in range(0, tiled, 32):
            _tile_dev_sums_32(x, w, r0, r1, j, shift, mu, s1, s2)
    if tiled == width:
        return
    # Deviations about center = shift + mu, rounded: one load per column instead of two
    # (wide rows: 8 against 10 loads per 8 values, and d * d fused into s2).  Any center
    # near the mean serves the merge (see _accumulate); this one is within eps * |mean|.
    center = shift + mu
    xf = x.reshape(x.size)
    for r in range(r0, r1):
        if tiled == 0:  # whole rows here; a tile pass before this one has read the chunk
            _prefetch_row_ahead(xf, r, width)
        wr = _row_weight(w, r)
        for j in range(np.uint64(tiled), np.uint64(width)):
            d = np.float64(x[r, j]) - center[j]
            wd = wr * d
            s1[j] += wd
            s2[j] += wd * d


# The first chunk of a block of unweighted rows takes its deviations about the mean of
# its first k = ceil(m / CENTER_ROWS_FRACTION) rows instead of its own mean (two passes).
# That centre c is within sqrt(M2 / k) of the chunk's mean (Cauchy-Schwarz),
# so the error of the deviation sums, eps * (M2 + m (mean - c)^2) (see _accumulate), is
# at most eps * (1 + m / k) * M2 = 65 eps * M2: the two-pass bound's order, for one pass
# through the register tiles instead of two through accumulator arrays (channels_last
# (32, 64, 28, 28): every block of the statistics is a single chunk).
CENTER_ROWS_FRACTION = 64


@kernel()
def _column_partials(x, w, r0, r1, shift, chunk_rows, mu, q):
    """Moments of rows [r0, r1) of ``x`` (rows, W) per column into ``mu``, ``q``, each row
    weighted by ``w`` (or 1 where ``w`` is None); returns the count (weight sum).

    Chunks of ``chunk_rows`` rows stay in cache.  The first chunk with weight is exact
    two-pass when rows are weighted, and otherwise takes deviations about the mean of its
    first rows (CENTER_ROWS_FRACTION); later ones take deviations about each column's
    running mean (see ``_accumulate``).  Every loop runs over contiguous columns.
    """
    width = x.shape[1]
    mu[:] = 0.0
    q[:] = 0.0
    s1 = np.zeros(width)
    s2 = np.zeros(width)
    n = 0.0
    for r in range(r0, r1, chunk_rows):
        re = min(r + chunk_rows, r1)
        m = _weight_sum(w, r, re)
        if m == 0.0:
            continue  # rows of weight 0 count for nothing
        if n == 0.0 and w is None:
            k = -(-(re - r) // CENTER_ROWS_FRACTION)  # rounded up: m / k <= 64
            _rows_add_dev(x, w, r, r + k, shift, mu)
            mu /= k
            s1[:] = 0.0
            s2[:] = 0.0
            _rows_add_dev_sums(x, w, r, re, shift, mu, s1, s2)
            _merge_chunk(s1, s2, m, 0.0, mu, q)
        elif n == 0.0:
            _rows_add_dev(x, w, r, re, shift, mu)
            mu /= m
            _rows_add_sqdev(x, w, r, re, shift, mu, q)
        else:
            s1[:] = 0.0
            s2[:] = 0.0
            _rows_add_dev_sums(x, w, r, re, shift, mu, s1, s2)
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
def column_forward(x, inner, nblocks, chunk_rows, normalize, weight, bias, eps, y, mean, var,
                   invstd, res, relu):
    """Statistics over rows of ``x`` (rows, C * inner), then (``normalize``) ``y``, in one call.

    Three phases: per-block column moments in parallel, a serial fold to
    channels (count, mean, var, invstd into the float64 outputs), and a
    parallel affine pass over rows, with the epilogue (``+ res`` where it is an array
    laid out like ``y``, then ReLU where ``relu``).
    """
    rows, width = x.shape
    channels = width // inner
    shift = _first_values(x.reshape(rows, channels, inner))
    count = np.empty(nblocks)
    mean_rel = np.empty((nblocks, width))
    m2 = np.empty((nblocks, width))
    shift_cols = _expand(shift, inner)
    for blk in prange(nblocks):
        count[blk] = _column_partials(x, None, blk * rows // nblocks,
                                      (blk + 1) * rows // nblocks,
                                      shift_cols, chunk_rows, mean_rel[blk], m2[blk])
    lanes = LINE_BYTES // x.itemsize
    params = np.zeros((4, width + lanes), x.dtype)
    for c in range(channels):
        n, mu, q = _fold_columns(count, mean_rel, m2, c, inner)
        hi, lo, inv = _channel_stats(c, n, mu, q, shift, eps, mean, var, invstd)
        for j in range(c * inner, (c + 1) * inner):
            params[0, j] = hi
            params[1, j] = (hi - np.float64(params[0, j])) + lo
            params[2, j] = inv * weight[c]
            params[3, j] = bias[c]
    _wrap_columns(params, width, lanes)
    if normalize:
        ntasks = column_blocks(rows, PLAN_THREADS)
        for t in prange(ntasks):
            _map_rows(x, t * rows // ntasks, (t + 1) * rows // ntasks, params, y, None, res,
                      relu)
            _store_fence()


@kernel(inline="always")
def _column_value(v, p, j, two_sided):
    """The column path's map of one value at column ``j`` of ``p``: the affine
    ``((v - hi) - lo) * scale + shift``, or, with ``two_sided`` not None, min-max scaling
    about both ends (``kernels.minmax``; the branch is resolved at compile time)."""
    if two_sided is None:
        return ((v - p[0, j]) - p[1, j]) * p[2, j] + p[3, j]
    return _two_sided_value(v, p[0, j], p[1, j], p[2, j], p[3, j], p[4, j], p[5, j], p[6, j])


@kernel()
def _map_rows(x, r0, r1, params, y, two_sided, res, relu):
    """Rows [r0, r1) of the column path, streamed as one span of lines (the map of
    ``_column_value``, then the epilogue: ``+ res`` where it is an array, ReLU where
    ``relu``; min-max scaling takes neither).

    ``params`` (k, W + lanes) holds each column's parameters and, after column
    W - 1, the first ``lanes`` columns again: a line that starts at column j reads
    parameters j .. j + lanes - 1 even when it wraps into the next row.  Small
    outputs (kept in cache) take ordinary vector stores, a line at a time (a loop over
    values left them scalar: 2-3 cycles a value); rows narrower than a line go value by
    value.
    """
    width = x.shape[1]
    lanes = LINE_BYTES // y.itemsize
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    resf = _flat(res)
    start = r0 * width
    stop = r1 * width
    first, last = _stream_span(yf, start, stop)
    stream = first != stop
    if width < lanes:
        if two_sided is not None:
            if two_sided:  # no residuals, the same ends everywhere: three loads per value
                f_low, f_high, zero = params[3, 0], params[4, 0], params[5, 0]
                for r in range(r0, r1):
                    for j in range(np.uint64(0), np.uint64(width)):
                        y[r, j] = _two_sided_value(x[r, j], params[0, j], params[1, j],
                                                  params[2, j], f_low, f_high, zero, zero)
                return
        for r in range(r0, r1):
            t = r * width
            for j in range(np.uint64(0), np.uint64(width)):
                yf[t + j] = _ep(_column_value(xf[t + j], params, j, two_sided), resf, t + j, relu)
        return
    if not stream:  # an output that stays in cache: whole lines from the start, any address
        first = start
        last = start + (stop - start) // lanes * lanes
    for i in range(start, first):
        yf[i] = _ep(_column_value(xf[i], params, (i - start) % width, two_sided), resf, i, relu)
    j = (first - start) % width if width > 0 else 0
    for i in range(first, last, lanes):
        if two_sided is None:
            _line_affine_cols(xf, i, yf, params, j, resf, relu, stream)
        elif two_sided:
            _line_two_sided_exact(xf, i, yf, params, j, resf, relu, stream)
        else:
            _line_two_sided_cols(xf, i, yf, params, j, resf, relu, stream)
        j += lanes
        if j >= width:
            j -= width
    for i in range(last, stop):
        yf[i] = _ep(_column_value(xf[i], params, (i - start) % width, two_sided), resf, i, relu)


@kernel(parallel=True)
def map_columns(x, params, inner, nblocks, y, two_sided, res, relu):
    """Per channel, ``y = ((x - hi) - lo) * scale + shift`` with ``params`` (C, 4), or
    with ``two_sided`` not None min-max scaling about both ends with ``params`` (C, 7)
    (``kernels.minmax``; ``two_sided`` true where every residual is 0), over
    rows of ``x`` (rows, C * inner), in ``nblocks`` tasks of contiguous rows; then the
    epilogue (``_map_rows``)."""
    rows, width = x.shape
    cols = _params_by_column(params, inner, width)
    for blk in prange(nblocks):
        _map_rows(x, blk * rows // nblocks, (blk + 1) * rows // nblocks, cols, y, two_sided,
                  res, relu)
        _store_fence()


@kernel()
def _rows_add_grad_sums(dy, x, y, r0, r1, mean, s, sx):
    """Per column, ``s += sum(g)``, ``sx += sum(g * (x - mean))`` over rows [r0, r1), ``g``
    being ``dy`` masked by ``y > 0`` (``y`` None: ``dy``)."""
    width = x.shape[1]
    tiled = 0
    if width == 64:
        _tile_grad_sums_64(dy, x, y, r0, r1, 0, mean, s, sx)
        tiled = 64
    elif width < ROW_TILE_MAX_WIDTH:
        tiled = width - width % 32
        for j in range(0, tiled, 32):
            _tile_grad_sums_32(dy, x, y, r0, r1, j, mean, s, sx)
    # indexed (r, j), not flat: LLVM vectorizes this loop over j only then (a flat index
    # made the column backward 5.7x slower)
    dyf = dy.reshape(dy.size)
    for r in range(r0, r1):
        if y is not None and tiled < width:
            # the mask becomes a masked load of dy that waits for y's compare, which holds
            # back the hardware's run-ahead: fetch dy's rows ahead
            _prefetch_row_ahead(dyf, r, width)
        for j in range(np.uint64(tiled), np.uint64(width)):
            if y is None:
                g = np.float64(dy[r, j])
            else:
                g = np.float64(_masked_value(dy[r, j], y[r, j]))
            s[j] += g
            sx[j] += g * (np.float64(x[r, j]) - mean[j])


@kernel(parallel=True)
def column_backward(dy, x, mean, invstd, weight, inner, nblocks, write_dx, dx, sum_dy,
                    sum_dy_xmu, y, dres):
    """Per-channel ``sum(g)``, ``sum(g * (x - mean))`` over rows of (rows, C * inner)
    arrays and (``write_dx``) the training-mode ``dx``, in one call; ``g`` is ``dy``
    masked by ``y > 0`` (``y`` None: ``dy``), also written to ``dres`` unless it is
    empty."""
    rows, width = x.shape
    channels = width // inner
    mean_cols = _expand(mean, inner)
    s = np.zeros((nblocks, width))
    sx = np.zeros((nblocks, width))
    for blk in prange(nblocks):
        _rows_add_grad_sums(dy, x, y, blk * rows // nblocks, (blk + 1) * rows // nblocks,
                            mean_cols, s[blk], sx[blk])
    n = float(rows * inner)
    lanes = LINE_BYTES // x.itemsize
    params = np.zeros((5, width + lanes), x.dtype)
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
    _wrap_columns(params, width, lanes)
    if write_dx:
        ntasks = column_blocks(rows, PLAN_THREADS)
        for t in prange(ntasks):
            _dx_rows(dy, x, t * rows // ntasks, (t + 1) * rows // ntasks, params, dx, y, dres)
            _store_fence()


@kernel(inline="always")
def _dx_column_value(gf, xf, yf, rf, i, params, j):
    """``dx`` at flat ``i`` (column ``j``) from the masked ``g``, also stored into ``rf``."""
    g = _grad(gf, yf, i)
    _put(rf, i, g)
    return ((g - params[3, j]) - ((xf[i] - params[0, j]) - params[1, j]) * params[4, j]) \
        * params[2, j]


@kernel()
def _dx_rows(dy, x, r0, r1, params, dx, y, dres):
    """Rows [r0, r1) of the column path's ``dx``, streamed as in ``_map_rows``;
    ``params`` (5, W + lanes) holds (hi, lo, a, b, k) per column, wrapped; ``dy`` masked
    by ``y > 0`` (``y`` None: ``dy``), and written into ``dres`` unless it is empty."""
    width = x.shape[1]
    lanes = LINE_BYTES // dx.itemsize
    gf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    df = dx.reshape(dx.size)
    yf = _flat(y)
    rf = _flat(dres)
    start = r0 * width
    stop = r1 * width
    first, last = _stream_span(df, start, stop)
    stream = first != stop
    if width < lanes:
        for r in range(r0, r1):
            t = r * width
            for j in range(np.uint64(0), np.uint64(width)):
                df[t + j] = _dx_column_value(gf, xf, yf, rf, t + j, params, j)
        return
    if not stream:  # as in _map_rows
        first = start
        last = start + (stop - start) // lanes * lanes
    for i in range(start, first):
        df[i] = _dx_column_value(gf, xf, yf, rf, i, params, (i - start) % width)
    j = (first - start) % width if width > 0 else 0
    ahead = PREFETCH_BYTES // dy.itemsize
    for i in range(first, last, lanes):
        if y is not None:
            _prefetch_line(gf, i + ahead)  # dy's masked load waits for y (as above)
        _line_dx_cols(gf, xf, i, df, params, j, yf, rf, stream)
        j += lanes
        if j >= width:
            j -= width
    for i in range(last, stop):
        df[i] = _dx_column_value(gf, xf, yf, rf, i, params, (i - start) % width)


@kernel()
def _params_by_column(params, inner, width):
    """Per-channel ``params`` (C, k) as columns (k, W + lanes) of a (rows, W = C * inner)
    view, the first ``lanes`` columns repeated after the last (``_wrap_columns``)."""
    lanes = LINE_BYTES // params.itemsize
    cols = np.zeros((params.shape[1], width + lanes), params.dtype)
    for j in range(width):
        for k in range(params.shape[1]):
            cols[k, j] = params[j // inner, k]
    _wrap_columns(cols, width, lanes)
    return cols


@kernel()
def _wrap_columns(params, width, lanes):
    """Copy the first ``lanes`` columns of ``params`` after column ``width - 1``."""
    for k in range(params.shape[0]):
        for j in range(min(lanes, width)):
            params[k, width + j] = params[k, j]


# dx from given sums (synchronized batch norm: the sums come from every rank).

@kernel(parallel=True)
def dx_columns(dy, x, params, inner, nblocks, dx):
    """``dx = ((dy - b) - ((x - hi) - lo) * k) * a`` over rows of (rows, C * inner) arrays,
    ``params`` (C, 5), in ``nblocks`` tasks of contiguous rows."""
    rows, width = x.shape
    cols = np.empty((5, width), x.dtype)
    for j in range(width):
        for k in range(5):
            cols[k, j] = params[j // inner, k]
    for blk in prange(nblocks):
        for r in range(blk * rows // nblocks, (blk + 1) * rows // nblocks):
            for j in range(np.uint64(0), np.uint64(width)):
                dx[r, j] = ((dy[r, j] - cols[3, j])
                            - ((x[r, j] - cols[0, j]) - cols[1, j]) * cols[4, j]) * cols[2, j]

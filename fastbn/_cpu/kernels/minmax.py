"""Min-max scaling about both ends of the data.

``y = ((x - lo) * scale + f0`` below the midpoint of the data's range and
``(x - hi) * scale + f1`` above it (``lo``/``hi`` the data's minimum/maximum,
``[f0, f1]`` the feature range): the minimum maps to exactly ``f0`` and the
maximum to exactly ``f1`` (``x - lo`` and ``x - hi`` are 0 there), and each half
is computed from the end it is near, so the output keeps its digits at both
ends.  A one-sided ``(x - lo) * scale + f0`` reaches ``f1`` only when the rounded
``(hi - lo) * scale`` happens to land on ``f1 - f0``.

Per-channel parameters are rows ``(c_low, c_high, g_low, g_high, mid, scale)`` in
the working dtype: a piece is ``(x - c) * scale + g``, ``c`` the end rounded to the
working dtype and ``g = f - (end - c) * scale`` (just ``f`` when the end is a value
of the working dtype, as the fitted data's are; otherwise the center's low part,
which the affine pass subtracts separately, is folded into the offset: one
subtraction less per value, which the column path's lines needed to keep pace).
A feature with no range (under ``ZERO_RANGE``) has ``mid = +inf`` and takes the
low piece everywhere.  The scalar code computes exactly what a vector line does.
"""

import numpy as np
from numba import prange

from ..._jit import kernel
from .codegen import LINE_BYTES, _line_two_sided, _store_fence, _stream_span
from .column import map_columns
from .plans import column_blocks, run_blocks


# scikit-learn's _handle_zeros_in_scale: a range under this is no range
ZERO_RANGE = 10 * np.finfo(np.float64).eps


@kernel(inline="always")
def _two_sided(v, p, c):
    """The scalar form of ``codegen._two_sided_expr`` with row ``c`` of ``params``: both
    pieces, then a select (no branch, so that the loops vectorize)."""
    low = (v - p[c, 0]) * p[c, 5] + p[c, 2]
    high = (v - p[c, 1]) * p[c, 5] + p[c, 3]
    return low if v < p[c, 4] else high


@kernel()
def _two_sided_run(xf, yf, start, stop, params, c):
    """``yf[start:stop]`` from ``xf`` with channel ``c``'s parameters; whole lines
    streamed where ``yf`` takes streaming stores."""
    first, last = _stream_span(yf, start, stop)
    for i in range(np.uint64(start), np.uint64(first)):
        yf[i] = _two_sided(xf[i], params, c)
    for i in range(first, last, LINE_BYTES // yf.itemsize):
        _line_two_sided(xf, i, yf, params, c)
    for i in range(np.uint64(last), np.uint64(stop)):
        yf[i] = _two_sided(xf[i], params, c)


@kernel(parallel=True)
def two_sided_channels(x, params, nblocks, y):
    """The two-sided map of ``x`` (outer, C, inner) per channel, ``params`` (C, 6), in
    ``nblocks`` tasks of contiguous runs."""
    outer, channels, inner = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    runs = outer * channels
    for blk in prange(nblocks):
        for t in range(blk * runs // nblocks, (blk + 1) * runs // nblocks):
            _two_sided_run(xf, yf, t * inner, (t + 1) * inner, params, t % channels)
        _store_fence()


@kernel()
def run_two_sided(x, lo, hi, scale, f0, f1, y, nthreads, min_run):
    """Min-max scaling of ``x`` (outer, C, inner) per channel about both ends: float64
    ``lo``, ``hi`` (the data's minimum and maximum), ``scale``; ``f0``, ``f1`` the
    feature range."""
    outer, channels, inner = x.shape
    params = np.empty((channels, 6), x.dtype)
    for c in range(channels):
        params[c, 0] = lo[c]
        params[c, 1] = hi[c]
        params[c, 5] = scale[c]
        s = np.float64(params[c, 5])
        params[c, 2] = f0 - (lo[c] - np.float64(params[c, 0])) * s
        params[c, 3] = f1 - (hi[c] - np.float64(params[c, 1])) * s
        params[c, 4] = np.inf
        # the midpoint, strictly above the minimum in the working dtype; none for a range
        # that scikit-learn takes as 0 (under 10 eps: scale for a range of 1, low end only)
        if hi[c] - lo[c] >= ZERO_RANGE:
            params[c, 4] = lo[c] + (hi[c] - lo[c]) / 2.0
            if params[c, 4] <= params[c, 0]:  # hi is lo's neighbour: its value splits them
                params[c, 4] = params[c, 1]
    if inner < min_run:
        map_columns(x.reshape(outer, channels * inner), params, inner,
                    column_blocks(outer, nthreads), y.reshape(outer, channels * inner), True)
    else:
        two_sided_channels(x, params, run_blocks(outer, channels, nthreads), y)

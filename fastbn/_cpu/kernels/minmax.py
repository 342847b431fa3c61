"""Min-max scaling about both ends of the data.

``y = (x - lo) * scale + f0`` where ``x`` is nearer the data's minimum ``lo`` and
``(x - hi) * scale + f1`` where it is nearer the maximum ``hi`` (``[f0, f1]`` the
feature range): the minimum maps to exactly ``f0`` and the maximum to exactly
``f1`` (``x - lo`` and ``x - hi`` are 0 there), and each half is computed from the
end it is near, so the output keeps its digits at both ends.  A one-sided
``(x - lo) * scale + f0`` reaches ``f1`` only when the rounded ``(hi - lo) * scale``
happens to land on ``f1 - f0``.  "Nearer" is decided on the two differences
themselves (``x - lo < hi - x``), so no midpoint is stored or loaded.

Per-channel parameters are rows ``(c_low, c_high, scale, f_low, f_high, r_low,
r_high)`` in the working dtype: a piece is ``((x - c) - r) * scale + f``, ``c`` the end
rounded to the working dtype and ``r`` what that rounding dropped.  The fitted data's
ends are values of the working dtype, so ``r`` is 0 (and subtracting it changes no
bit): the column path then skips it, and with the ends ``f`` broadcast from one column
it loads no more per line than the one-sided affine pass does.  Ends between values of
the working dtype (fitted on float64, transforming float32) keep their residuals, so
that the output stays within 2 of its ulp.  A feature with no range (under
``ZERO_RANGE``) has ``c_high = +inf`` and takes the low piece everywhere (+inf too:
``+inf - +inf`` is NaN, and NaN takes the low piece).  The scalar code
(``numerics._two_sided_value``) computes exactly what a vector line does.
"""

import numpy as np
from numba import prange

from ..._jit import kernel
from .codegen import LINE_BYTES, _line_two_sided, _store_fence, _stream_span
from .column import map_columns
from .numerics import _two_sided_value
from .plans import column_blocks, run_blocks


# scikit-learn's _handle_zeros_in_scale: a range under this is no range
ZERO_RANGE = 10 * np.finfo(np.float64).eps


@kernel(inline="always")
def _two_sided(v, p, c):
    """``numerics._two_sided_value`` with row ``c`` of ``params``."""
    return _two_sided_value(v, p[c, 0], p[c, 1], p[c, 2], p[c, 3], p[c, 4], p[c, 5], p[c, 6])


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
    """The two-sided map of ``x`` (outer, C, inner) per channel, ``params`` (C, 7), in
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
    params = np.empty((channels, 7), x.dtype)
    exact = True  # every end a value of the working dtype: no residual to subtract
    for c in range(channels):
        params[c, 0] = lo[c]
        params[c, 1] = hi[c]
        params[c, 2] = scale[c]
        params[c, 3] = f0
        params[c, 4] = f1
        params[c, 5] = lo[c] - np.float64(params[c, 0])
        params[c, 6] = hi[c] - np.float64(params[c, 1])
        # a range that scikit-learn takes as 0 (under 10 eps: scale for a range of 1) has
        # the low end only
        if not hi[c] - lo[c] >= ZERO_RANGE:
            params[c, 1] = np.inf
            params[c, 6] = 0.0
        exact = exact and params[c, 5] == 0.0 and params[c, 6] == 0.0
    if inner < min_run:
        map_columns(x.reshape(outer, channels * inner), params, inner,
                    column_blocks(outer, nthreads), y.reshape(outer, channels * inner), exact,
                    None, False)
    else:
        two_sided_channels(x, params, run_blocks(outer, channels, nthreads), y)

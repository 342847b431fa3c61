"""Numerics every path shares (docs/contract.md section 5): the error-free sum, the
inverse standard deviation and Chan's merge of partial statistics.

Statistics are accumulated in float64 relative to a per-channel shift (the
channel's first value) in L1-sized pieces (``CHUNK``): the first piece of a
channel is exact two-pass, later pieces take deviations about the running mean,
and pieces are combined with Chan's merge.  There is no ``E[x^2] - E[x]^2``
anywhere.
"""

import numpy as np

from ..._jit import kernel


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


@kernel(inline="always")
def _merged(n, mean, m2, s1, s2, m):
    """Chan's merge of ``m`` new values, given as deviation sums ``s1``, ``s2`` about
    the current ``mean`` of ``n`` values, into ``(mean, m2)``."""
    delta = s1 / m
    n_new = n + m
    return mean + delta * (m / n_new), m2 + (s2 - s1 * delta) + delta * delta * (n * m / n_new)


@kernel(inline="always")
def _merge_piece(s1, s2, m, j, n, mean_rel, m2):
    """Merge a piece of ``m`` values into accumulator ``j``."""
    mean_rel[j], m2[j] = _merged(n[j], mean_rel[j], m2[j], s1, s2, m)
    n[j] += m


@kernel()
def _merge_chunk(s1, s2, m, n, mu, q):
    """Merge a chunk of ``m`` rows (deviation sums about ``mu``) into ``n`` rows' ``mu``, ``q``."""
    for j in range(s1.shape[0]):
        mu[j], q[j] = _merged(n, mu[j], q[j], s1[j], s2[j], m)


@kernel()
def update_running(running_mean, running_var, mean, var, n, momentum):
    """PyTorch's update of the running statistics, in float64 whatever their dtype:
    ``rm = (1 - m) rm + m mean``, ``rv = (1 - m) rv + m var n / (n - 1)`` (``var`` the
    biased batch variance over ``n`` values).  An empty array is a statistic not kept.
    The host API and the C entry points both call this one."""
    for c in range(running_mean.shape[0]):
        running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * mean[c]
    for c in range(running_var.shape[0]):
        running_var[c] = ((1.0 - momentum) * np.float64(running_var[c])
                          + momentum * (var[c] * (n / (n - 1.0))))


@kernel(inline="always")
def _two_sided_value(v, c_low, c_high, scale, f_low, f_high, r_low, r_high):
    """Min-max scaling of one value about both ends (``kernels.minmax``): the scalar form
    of ``codegen._two_sided_expr``, the same operations, so the same bits (a residual of
    0 changes no bit).  Selects, not branches, so that loops over it vectorize."""
    d_low = v - c_low
    d_high = v - c_high
    below = not d_low >= -d_high
    centered = (d_low if below else d_high) - (r_low if below else r_high)
    return centered * scale + (f_low if below else f_high)

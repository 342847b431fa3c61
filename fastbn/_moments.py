"""Per-channel helpers shared by the API and every host backend (float64)."""

import numpy as np


def invstd(var, eps):
    """``1 / sqrt(var + eps)`` per channel of a 1-D ``var``, 0 where ``var + eps == 0``
    (docs/contract.md section 2), float64: the kernels' own rule
    (``fastbn._cpu.kernels.inference_scale``)."""
    from ._cpu.kernels import inference_scale

    var = np.ascontiguousarray(var, dtype=np.float64)
    return inference_scale(var, float(eps), np.ones(var.shape[0]))


def merge_moments(count, mean, m2, axis):
    """Chan's merge of partial (count, mean, M2) along ``axis`` (float64 arrays).

    ``n = sum(c)``, ``mean = sum(c * m) / n``, ``M2 = sum(M2) + sum(c * (m - mean)^2)``:
    every term is non-negative, so there is no cancellation.  Empty parts
    (count 0) contribute nothing; where every part is empty, mean and M2 are NaN.
    """
    count = np.asarray(count, dtype=np.float64)
    n = count.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = np.where(count > 0, count * np.where(count > 0, mean, 0.0), 0.0)
        mu = weighted.sum(axis=axis) / n
        dev = np.where(count > 0, mean - np.expand_dims(mu, axis), 0.0)
        q = np.where(count > 0, m2, 0.0).sum(axis=axis) + (count * dev * dev).sum(axis=axis)
    return n, mu, np.where(n > 0, q, np.nan)


def update_running_stats(running_mean, running_var, mean, var, n, momentum):
    """PyTorch's update: ``rm = (1 - m) rm + m mean``, ``rv = (1 - m) rv + m var n / (n - 1)``,
    in float64 (``fastbn._cpu.kernels.update_running``, which the C library runs too);
    a statistic that is None is not kept."""
    if running_mean is None and running_var is None:
        return  # the common call without running statistics: no kernel call to pay for
    from ._cpu.kernels import update_running

    stats = [np.empty(0) if r is None else r if r.dtype.isnative
             else r.astype(r.dtype.newbyteorder("="))  # the kernels take native order
             for r in (running_mean, running_var)]
    update_running(*stats, np.asarray(mean, dtype=np.float64),
                   np.asarray(var, dtype=np.float64), float(n), float(momentum))
    for given, updated in zip((running_mean, running_var), stats):
        if given is not None and given is not updated:
            given[...] = updated

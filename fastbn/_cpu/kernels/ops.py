"""Whole ops on (outer, C, inner) arrays, each choosing its path from the plans.  The
Python backend and the C entry points (``fastbn.capi``) both call these, so the
same shape takes the same path, with the same numerics, from either side.
"""

import numpy as np

from ..._jit import kernel
from .codegen import _rows_view
from .numerics import _invstd, _two_sum
from .plans import (
    PLAN_THREADS, channel_plan, chunk_rows, column_blocks, column_stat_blocks, pipelined, run_blocks
)
from .channel import _first_values, affine_channels, channel_forward, channel_moments
from .channel_grad import _dx_params, channel_backward, channel_grad_sums, dx_channels
from .column import column_backward, column_forward, dx_columns, map_columns
from .pipeline import backward_chains, pipelined_backward, pipelined_forward


@kernel()
def merged_channel_moments(x, hi, lo, m2):
    """Per-channel mean (``hi + lo``, float64) and M2 of ``x`` (outer, C, inner) on the
    channel path, parts merged with Chan's formula; returns the count per channel."""
    outer, channels, inner = x.shape
    group, nparts = channel_plan(outer, channels, inner, x.itemsize, PLAN_THREADS)
    shift = _first_values(x)
    count = np.empty((channels, nparts))
    mean_rel = np.empty((channels, nparts))
    part_m2 = np.empty((channels, nparts))
    channel_moments(x, shift, group, nparts, count, mean_rel, part_m2)
    for c in range(channels):
        n = 0.0
        mu = 0.0
        q = 0.0
        for p in range(nparts):
            m = count[c, p]
            if m > 0.0:
                delta = mean_rel[c, p] - mu
                n_new = n + m
                mu += delta * (m / n_new)
                q += part_m2[c, p] + delta * delta * (n * m / n_new)
                n = n_new
        hi[c], lo[c] = _two_sum(shift[c], mu)
        m2[c] = q
    return float(outer * inner)


@kernel()
def channel_moments_any_path(x, mean, m2, min_run):
    """Per-channel mean (float64) and M2 of ``x`` (outer, C, inner), ``outer * inner >= 1``,
    on the path its shape takes (the column path's M2 comes from its biased variance);
    returns the count per channel.  ``batch_stats`` from Python and from C."""
    outer, channels, inner = x.shape
    if inner < min_run:
        width = channels * inner
        x2 = x.reshape(outer, width)
        unused = np.zeros(channels)
        column_forward(x2, inner, column_stat_blocks(outer), chunk_rows(width), False,
                       unused, unused, 0.0, x2, mean, m2, np.empty(channels), None, False)
        n = float(outer * inner)
        for c in range(channels):
            m2[c] *= n
        return n
    hi = np.empty(channels)
    lo = np.empty(channels)
    n = merged_channel_moments(x, hi, lo, m2)
    for c in range(channels):
        mean[c] = hi[c] + lo[c]
    return n


@kernel()
def inference_scale(var, eps, weight):
    """``weight / sqrt(var + eps)`` per channel, 0 where ``var + eps == 0`` (float64)."""
    scale = np.empty(var.shape[0])
    for c in range(var.shape[0]):
        scale[c] = _invstd(var[c], eps) * weight[c]
    return scale


@kernel()
def run_affine(x, hi64, lo64, scale, shift, y, nthreads, min_run, res, relu):
    """``y = (x - (hi64 + lo64)) * scale + shift`` per channel; float64 parameters; then the
    epilogue: ``+ res`` where it is an array like ``x``, ReLU where ``relu``."""
    outer, channels, inner = x.shape
    params = np.empty((channels, 4), x.dtype)
    for c in range(channels):
        params[c, 0] = hi64[c]
        params[c, 1] = (hi64[c] - np.float64(params[c, 0])) + lo64[c]
        params[c, 2] = scale[c]
        params[c, 3] = shift[c]
    if inner < min_run:
        width = channels * inner
        map_columns(x.reshape(outer, width), params, inner, column_blocks(outer, nthreads),
                    y.reshape(outer, width), None, _rows_view(res, outer, width), relu)
    else:
        affine_channels(x, params, run_blocks(outer, channels, nthreads), y, res, relu)


@kernel()
def run_forward_train(x, weight, bias, eps, y, mean, var, invstd, nthreads, min_run, res, relu):
    """Training forward of ``x`` (outer, C, inner), ``outer * inner >= 1``: ``y`` and the
    float64 ``mean``, biased ``var`` and ``invstd`` per channel, fused where the plan allows;
    ``y`` with the epilogue (``+ res`` where it is an array like ``x``, then ReLU where
    ``relu``; contract section 6), in the same pass."""
    outer, channels, inner = x.shape
    if inner < min_run:
        width = channels * inner
        column_forward(x.reshape(outer, width), inner, column_stat_blocks(outer),
                       chunk_rows(width), True, weight, bias, eps, y.reshape(outer, width),
                       mean, var, invstd, _rows_view(res, outer, width), relu)
        return
    if pipelined(outer, channels, inner, x.itemsize, PLAN_THREADS, y):
        pipelined_forward(x, PLAN_THREADS, weight, bias, eps, y, mean, var, invstd, res, relu)
        return
    group, nparts = channel_plan(outer, channels, inner, x.itemsize, PLAN_THREADS)
    if nparts == 1:
        channel_forward(x, group, weight, bias, eps, y, mean, var, invstd, res, relu)
        return
    hi = np.empty(channels)
    lo = np.empty(channels)
    n = merged_channel_moments(x, hi, lo, var)
    scale = np.empty(channels)
    for c in range(channels):
        var[c] /= n
        invstd[c] = _invstd(var[c], eps)
        mean[c] = hi[c] + lo[c]
        scale[c] = invstd[c] * weight[c]
    run_affine(x, hi, lo, scale, bias, y, nthreads, min_run, res, relu)


@kernel()
def run_grad_sums(dy, x, mean, sum_dy, sum_dy_xmu, min_run, y):
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean))`` (float64), ``g`` being ``dy``
    masked by ``y > 0`` (``y`` None: ``dy``)."""
    outer, channels, inner = x.shape
    if inner < min_run:
        width = channels * inner
        ones = np.ones(channels)
        column_backward(dy.reshape(outer, width), x.reshape(outer, width), mean, ones, ones,
                        inner, column_stat_blocks(outer), False,
                        x.reshape(outer, width),
                        sum_dy, sum_dy_xmu, _rows_view(y, outer, width),
                        np.empty((0, 0), x.dtype))
        return
    group, nparts = channel_plan(outer, channels, inner, 2 * x.itemsize, PLAN_THREADS)
    s = np.empty((channels, nparts))
    sx = np.empty((channels, nparts))
    channel_grad_sums(dy, x, y, mean, group, nparts, s, sx)
    for c in range(channels):
        sum_dy[c] = s[c].sum()
        sum_dy_xmu[c] = sx[c].sum()


@kernel()
def run_backward_train(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, nthreads, min_run,
                       y, dres):
    """Training-mode ``dx`` and the float64 ``sum(g)``, ``sum(g * (x - mean))`` per
    channel, fused where the plan allows.  ``g`` is ``dy``, or with ``y`` (the forward's
    output, ReLU's backward; contract section 6) ``dy`` where ``y > 0`` and 0 elsewhere;
    ``g`` is also written to ``dres`` unless it is empty, in the same pass."""
    outer, channels, inner = x.shape
    if inner < min_run:
        width = channels * inner
        column_backward(dy.reshape(outer, width), x.reshape(outer, width), mean, invstd, weight,
                        inner, column_stat_blocks(outer), True,
                        dx.reshape(outer, width),
                        sum_dy, sum_dy_xmu, _rows_view(y, outer, width),
                        _rows_view(dres, outer, width))
        return
    if pipelined(outer, channels, inner, 2 * x.itemsize, PLAN_THREADS, dx):
        nchains, nparts = backward_chains(outer, channels, nthreads)
        pipelined_backward(dy, x, mean, invstd, weight, nchains, nparts, dx, sum_dy,
                           sum_dy_xmu, y, dres)
        return
    group, nparts = channel_plan(outer, channels, inner, 2 * x.itemsize, PLAN_THREADS)
    if nparts == 1:
        channel_backward(dy, x, mean, invstd, weight, group, dx, sum_dy, sum_dy_xmu, y, dres)
        return
    run_grad_sums(dy, x, mean, sum_dy, sum_dy_xmu, min_run, y)
    n = float(outer * inner)
    params = np.empty((channels, 5), x.dtype)
    for c in range(channels):
        _dx_params(params, c, mean, invstd, weight, sum_dy, sum_dy_xmu, n)
    dx_channels(dy, x, params, run_blocks(outer, channels, nthreads), dx, y, dres)


@kernel()
def run_dx(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, n, dx, nthreads, min_run):
    """The training-mode ``dx`` of (outer, C, inner) arrays for sums over ``n`` values
    per channel computed elsewhere (float64 per-channel inputs)."""
    outer, channels, inner = x.shape
    params = np.empty((channels, 5), x.dtype)
    for c in range(channels):
        _dx_params(params, c, mean, invstd, weight, sum_dy, sum_dy_xmu, n)
    if inner < min_run:
        width = channels * inner
        dx_columns(dy.reshape(outer, width), x.reshape(outer, width), params, inner,
                   column_blocks(outer, nthreads), dx.reshape(outer, width))
    else:
        dx_channels(dy, x, params, run_blocks(outer, channels, nthreads), dx, None, np.empty((0, 0, 0), dx.dtype))

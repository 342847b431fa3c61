"""Whole ops on (outer, C, inner) arrays, each choosing its path from the plans.  The
Python backend and the C entry points (``fastbn.capi``) both call these, so the
same shape takes the same path, with the same numerics, from either side.
"""

import numpy as np

from ..._jit import kernel
from .numerics import _invstd, _two_sum
from .plans import PLAN_THREADS, channel_plan, chunk_rows, column_blocks, pipelined, run_blocks
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
def inference_scale(var, eps, weight):
    """``weight / sqrt(var + eps)`` per channel, 0 where ``var + eps == 0`` (float64)."""
    scale = np.empty(var.shape[0])
    for c in range(var.shape[0]):
        scale[c] = _invstd(var[c], eps) * weight[c]
    return scale


@kernel()
def run_affine(x, hi64, lo64, scale, shift, y, nthreads, min_run):
    """``y = (x - (hi64 + lo64)) * scale + shift`` per channel; float64 parameters."""
    outer, channels, inner = x.shape
    params = np.empty((channels, 4), x.dtype)
    for c in range(channels):
        params[c, 0] = hi64[c]
        params[c, 1] = (hi64[c] - np.float64(params[c, 0])) + lo64[c]
        params[c, 2] = scale[c]
        params[c, 3] = shift[c]
    if inner < min_run:
        map_columns(x.reshape(outer, channels * inner), params, inner,
                    column_blocks(outer, nthreads), y.reshape(outer, channels * inner), None)
    else:
        affine_channels(x, params, run_blocks(outer, channels, nthreads), y)


@kernel()
def run_forward_train(x, weight, bias, eps, y, mean, var, invstd, nthreads, min_run):
    """Training forward of ``x`` (outer, C, inner), ``outer * inner >= 1``: ``y`` and the
    float64 ``mean``, biased ``var`` and ``invstd`` per channel, fused where the plan allows."""
    outer, channels, inner = x.shape
    if inner < min_run:
        width = channels * inner
        column_forward(x.reshape(outer, width), inner, column_blocks(outer, PLAN_THREADS),
                       chunk_rows(width), True, weight, bias, eps, y.reshape(outer, width),
                       mean, var, invstd)
        return
    if pipelined(outer, channels, inner, x.itemsize, PLAN_THREADS, y):
        pipelined_forward(x, PLAN_THREADS, weight, bias, eps, y, mean, var, invstd)
        return
    group, nparts = channel_plan(outer, channels, inner, x.itemsize, PLAN_THREADS)
    if nparts == 1:
        channel_forward(x, group, weight, bias, eps, y, mean, var, invstd)
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
    run_affine(x, hi, lo, scale, bias, y, nthreads, min_run)


@kernel()
def run_grad_sums(dy, x, mean, sum_dy, sum_dy_xmu, min_run):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` (float64)."""
    outer, channels, inner = x.shape
    if inner < min_run:
        width = channels * inner
        ones = np.ones(channels)
        column_backward(dy.reshape(outer, width), x.reshape(outer, width), mean, ones, ones,
                        inner, column_blocks(outer, PLAN_THREADS), False,
                        x.reshape(outer, width),
                        sum_dy, sum_dy_xmu)
        return
    group, nparts = channel_plan(outer, channels, inner, 2 * x.itemsize, PLAN_THREADS)
    s = np.empty((channels, nparts))
    sx = np.empty((channels, nparts))
    channel_grad_sums(dy, x, mean, group, nparts, s, sx)
    for c in range(channels):
        sum_dy[c] = s[c].sum()
        sum_dy_xmu[c] = sx[c].sum()


@kernel()
def run_backward_train(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, nthreads, min_run):
    """Training-mode ``dx`` and the float64 ``sum(dy)``, ``sum(dy * (x - mean))`` per
    channel, fused where the plan allows."""
    outer, channels, inner = x.shape
    if inner < min_run:
        width = channels * inner
        column_backward(dy.reshape(outer, width), x.reshape(outer, width), mean, invstd, weight,
                        inner, column_blocks(outer, PLAN_THREADS), True,
                        dx.reshape(outer, width),
                        sum_dy, sum_dy_xmu)
        return
    if pipelined(outer, channels, inner, 2 * x.itemsize, PLAN_THREADS, dx):
        nchains, nparts = backward_chains(outer, channels, nthreads)
        pipelined_backward(dy, x, mean, invstd, weight, nchains, nparts, dx, sum_dy,
                           sum_dy_xmu)
        return
    group, nparts = channel_plan(outer, channels, inner, 2 * x.itemsize, PLAN_THREADS)
    if nparts == 1:
        channel_backward(dy, x, mean, invstd, weight, group, dx, sum_dy, sum_dy_xmu)
        return
    run_grad_sums(dy, x, mean, sum_dy, sum_dy_xmu, min_run)
    n = float(outer * inner)
    params = np.empty((channels, 5), x.dtype)
    for c in range(channels):
        _dx_params(params, c, mean, invstd, weight, sum_dy, sum_dy_xmu, n)
    dx_channels(dy, x, params, run_blocks(outer, channels, nthreads), dx)


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
        dx_channels(dy, x, params, run_blocks(outer, channels, nthreads), dx)

"""Numba CUDA kernels (numba-cuda), the GPU twins of ``fastbn._cpu.kernels``.

Data are flat C-contiguous device arrays of the canonical (outer, C, inner)
layout, read and written in their own dtype (float16 computes in float32,
integers in float64: the working dtype).  Statistics follow docs/contract.md
section 5 as on the CPU: values relative to a per-channel shift (the channel's
first value), chunks of four values reduced two-pass in the working dtype and
merged into float64 (count, mean, M2) with Chan's formula, also between threads,
blocks and parts, so there is no ``E[x^2] - E[x]^2`` anywhere and no division
per value.  Normalization subtracts the mean as ``(x - hi) - lo``.  Index
arithmetic is unsigned (no negative-index code) and every kernel strides over
whatever its grid does not cover.

Block reductions go through shared memory with ``syncthreads`` (no warp
shuffles), so every kernel also runs under Numba's CUDA simulator, where the
test suite exercises them; no launch needs a grid-wide sync.  Results are the
same bits run to run: no atomics, a fixed reduction order.

Launches by ``fastbn._cuda.backend`` (bench/gpu_proxy.py counts them):

* training forward: ``fused_forward`` (one block a channel, its values held in
  shared memory: one read and one write of the data) for float32/float16
  channels of at most ``FUSED_MAX_VALUES`` values; otherwise ``plane_moments``
  (``inner >= PLANE_MIN``: threads along inner) or ``row_moments`` (shorter
  inner, channels-last: threads along C * inner), ``finish_forward`` (one thread
  a channel: mean, invstd, running statistics, the affine parameters) and the
  channel map ``affine``.
* inference: ``inference_params`` and ``affine``.
* backward: ``plane_grad_sums`` or ``row_grad_sums``, ``finish_backward``
  (dweight, dbias and the parameters of dx) and the channel map ``dx``.

With a fused epilogue (contract section 6) the same launches, with the residual
and the ReLU flag passed to ``fused_forward``, ``affine_epilogue`` in place of
``affine``, ReLU's mask ``y`` passed to the gradient sums and ``dx_epilogue``
(which also writes the residual's gradient) in place of ``dx``.
"""


import math

import numpy as np
from numba import cuda, types
from numba.extending import overload

U = np.uint64  # index arithmetic: unsigned, so no negative-index wraparound code
THREADS = 256          # threads per block of the reductions and element-wise kernels
FUSED_MAX_VALUES = 8192  # float32 values of one channel held in shared memory (32 KiB)


def as_work(value, like):
    """``value`` in the working dtype, the type of ``like`` (float32 or float64); under
    the simulator, plain Python."""
    return type(like)(value)


@overload(as_work, target="cuda")
def _as_work(value, like):
    if isinstance(like, types.Float) and like.bitwidth == 32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


# ----------------------------------------------------------------- device helpers

@cuda.jit(device=True)
def _chan(n, mean, m2, nb, meanb, m2b):
    """Chan's merge of (nb, meanb, m2b) into (n, mean, m2); returns the merged triple."""
    if nb == 0.0:
        return n, mean, m2
    if n == 0.0:
        return nb, meanb, m2b
    total = n + nb
    delta = meanb - mean
    return total, mean + delta * (nb / total), m2 + m2b + delta * delta * (n * nb / total)


@cuda.jit(device=True)
def _block_merge(sn, smean, sm2):
    """Tree-merge the per-thread triples in shared memory; thread 0 ends with the total."""
    t = cuda.threadIdx.x
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if t < stride:
            n, mean, m2 = _chan(sn[t], smean[t], sm2[t], sn[t + stride], smean[t + stride],
                                sm2[t + stride])
            sn[t] = n
            smean[t] = mean
            sm2[t] = m2
        cuda.syncthreads()
        stride //= 2


@cuda.jit(device=True)
def _block_moments(sn, smean, sm2, cnt, mu, q):
    """Merge every thread's (count, mean, M2); the block's total ends in element 0."""
    t = cuda.threadIdx.x
    sn[t] = cnt
    smean[t] = mu
    sm2[t] = q
    cuda.syncthreads()
    _block_merge(sn, smean, sm2)


@cuda.jit(device=True)
def _two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@cuda.jit(device=True)
def _block_sum2(sa, sb):
    """Tree-sum two shared arrays; thread 0 ends with the totals."""
    t = cuda.threadIdx.x
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if t < stride:
            sa[t] += sa[t + stride]
            sb[t] += sb[t + stride]
        cuda.syncthreads()
        stride //= 2


@cuda.jit(device=True)
def _invstd(var, eps):
    v = var + eps
    if v == 0.0:
        return 0.0
    return 1.0 / math.sqrt(v)


# ----------------------------------------------------------------- forward

CHUNK = 4
PLANE_MIN = 64


@cuda.jit(device=True, inline=True)
def _add_chunk(n, mean, m2, k, chunk_mean, chunk_m2):
    """Chan's merge of a chunk of ``k`` values (its mean and M2) into float64 (n, mean, M2)."""
    total = n + k
    r = k / total
    delta = np.float64(chunk_mean) - mean
    return total, mean + delta * r, m2 + np.float64(chunk_m2) + delta * delta * (n * r)


@cuda.jit(device=True, inline=True)
def _chunk4(d0, d1, d2, d3):
    """Mean (float64) and M2 (working dtype) of four values, two-pass.  The mean is
    summed in float64, so that values far from the shift (a feature whose first value
    is NaN has shift 0) keep their digits; the deviations from it are small, and their
    squares are summed in the working dtype."""
    m = ((np.float64(d0) + np.float64(d1)) + (np.float64(d2) + np.float64(d3))) * 0.25
    mw = as_work(m, d0)
    e0, e1, e2, e3 = d0 - mw, d1 - mw, d2 - mw, d3 - mw
    return m, (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)


@cuda.jit(device=True, inline=True)
def _strided_moments(xf, base, seg, t, step, shift, n, mean, m2):
    """Add values ``xf[base + j]`` for ``j = t, t + step, ... < seg`` to (n, mean, M2)."""
    j = t
    while j + U(3) * step < seg:
        k = base + j
        d0, d1 = xf[k] - shift, xf[k + step] - shift
        d2, d3 = xf[k + U(2) * step] - shift, xf[k + U(3) * step] - shift
        cm, cq = _chunk4(d0, d1, d2, d3)
        n, mean, m2 = _add_chunk(n, mean, m2, 4.0, cm, cq)
        j += U(4) * step
    while j < seg:
        n, mean, m2 = _add_chunk(n, mean, m2, 1.0, xf[base + j] - shift, 0.0)
        j += step
    return n, mean, m2


@cuda.jit(device=True, inline=True)
def _given(v, c, default):
    """``v[c]`` in float64, or ``default`` where ``v`` is empty (an argument not given)."""
    return np.float64(v[c]) if v.shape[0] else default


@cuda.jit(device=True, inline=True)
def _update_running(running_mean, running_var, c, mean, var, n, momentum):
    """``r = (1 - m) r + m s`` with the unbiased variance (each one kept, if any)."""
    if running_mean.shape[0]:
        running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * mean
    if running_var.shape[0]:
        running_var[c] = ((1.0 - momentum) * np.float64(running_var[c])
                          + momentum * (var * (n / (n - 1.0))))


@cuda.jit(device=True, inline=True)
def _advance(e, o, i, step, step_o, step_i, inner):
    """Value ``e`` of a channel, at plane ``o`` and offset ``i``, moved on by ``step``
    values (``step_o`` planes and ``step_i`` offsets): no division."""
    i += step_i
    o += step_o
    if i >= inner:
        i -= inner
        o += U(1)
    return e + step, o, i


@cuda.jit(device=True, inline=True)
def _relu_if(v, relu):
    """``v``, or 0 where ``relu`` and ``v < 0`` (NaN stays NaN, -0.0 stays -0.0), as the
    host kernels' ReLU."""
    if relu and v < as_work(0.0, v):
        return as_work(0.0, v)
    return v


@cuda.jit(device=True, inline=True)
def _grad_at(gf, yf, masked, k, like):
    """``dy[k]`` in the working dtype (the type of ``like``), 0 where ``masked`` and not
    ``y[k] > 0``: the gradient through ReLU (a NaN ``y`` stops it, as on the host)."""
    g = as_work(gf[k], like)
    if masked and not yf[k] > 0:
        g = as_work(0.0, like)
    return g


@cuda.jit
def fused_forward(xf, outer, channels, inner, weight, bias, eps, running_mean, running_var,
                  momentum, yf, mean, invstd, res, relu):
    """One block per channel, the channel's values in shared memory (n <= FUSED_MAX_VALUES),
    of flat (outer, C, inner) ``xf`` into ``yf``: one read and one write of the data, the
    statistics and running statistics as ``finish_forward``'s; the epilogue (``+ res``
    unless ``res`` is empty, then ReLU where ``relu``) as ``affine_epilogue``'s."""
    t = U(cuda.threadIdx.x)
    step = U(cuda.blockDim.x)
    inner = U(inner)
    n = U(outer) * inner
    # a thread's values e = t, t + step, ... sit at plane o, offset i: both advance by
    # constants (no division per value)
    step_o = step // inner
    step_i = step - step_o * inner
    plane = U(channels) * inner
    vals = cuda.shared.array(FUSED_MAX_VALUES, dtype=np.float32)
    shared_bias = cuda.shared.array(1, dtype=np.float64)
    sn = cuda.shared.array(THREADS, dtype=np.float64)
    smean = cuda.shared.array(THREADS, dtype=np.float64)
    sm2 = cuda.shared.array(THREADS, dtype=np.float64)
    for c in range(cuda.blockIdx.x, channels, cuda.gridDim.x):
        first = U(c) * inner
        e, o, i = t, t // inner, t - t // inner * inner
        while e < n:  # the channel into shared memory
            vals[e] = np.float32(xf[o * plane + first + i])
            e, o, i = _advance(e, o, i, step, step_o, step_i, inner)
        cuda.syncthreads()
        shift32 = vals[0]
        shift = np.float64(shift32)
        # its moments from there, in chunks as the two-pass kernels' (no division a value)
        cnt, mu, m2 = _strided_moments(vals, U(0), n, t, step, shift32, 0.0, 0.0, 0.0)
        _block_moments(sn, smean, sm2, cnt, mu, m2)
        if t == 0:
            var = sm2[0] / sn[0]
            inv = _invstd(var, eps)
            hi, lo = _two_sum(shift, smean[0])
            mean[c] = hi
            invstd[c] = inv
            _update_running(running_mean, running_var, c, hi, var, np.float64(n), momentum)
            sn[0] = hi
            smean[0] = lo
            sm2[0] = inv * _given(weight, c, 1.0)
            shared_bias[0] = _given(bias, c, 0.0)
        cuda.syncthreads()
        hi32 = np.float32(sn[0])
        lo32 = np.float32((sn[0] - np.float64(hi32)) + smean[0])
        scale = np.float32(sm2[0])
        b = np.float32(shared_bias[0])
        e, o, i = t, t // inner, t - t // inner * inner
        has_res = res.size > 0
        while e < n:
            at = o * plane + first + i
            v = ((vals[e] - hi32) - lo32) * scale + b
            if has_res:
                v += np.float32(res[at])
            yf[at] = _relu_if(v, relu)
            e, o, i = _advance(e, o, i, step, step_o, step_i, inner)
        cuda.syncthreads()  # every thread done with the shared values before the next channel


# Partial statistics.  A thread reads ``CHUNK`` values at once (independent loads),
# reduces them in the working dtype (two-pass: their mean, then the squares about it)
# and merges the chunk into its float64 (count, mean, M2) with Chan's formula: one
# float64 division per chunk, not per value.  Values are taken relative to the
# channel's first value (docs/contract.md section 5).  Two layouts:
#
# * planes (``inner >= PLANE_MIN``): grid (channel blocks, parts); a block walks its
#   part of a channel plane by plane, threads along ``inner`` (coalesced); one
#   partial per (channel, part), arrays (C, nparts).
# * rows (short ``inner``, channels-last): x as (outer, W = C * inner); 2-D blocks,
#   threads along the columns (coalesced) and rows; one partial per (column, part),
#   arrays (W, nparts) = (C, inner * nparts).
# Either way ``finish_*`` merges a channel's row of partials.

@cuda.jit(device=True)
def _finite_shift(xf, c, inner):
    """The channel's first value as the shift of its statistics, 0 if it is not finite."""
    s = np.float64(xf[U(c) * U(inner)])
    return s if math.isfinite(s) else 0.0


@cuda.jit(device=True, inline=True)
def _valid(v, zero):
    """``(v, 1.0)`` for a value, ``(zero, 0.0)`` for NaN."""
    return (v, 1.0) if v == v else (zero, 0.0)


@cuda.jit(device=True, inline=True)
def _strided_features(xf, base, seg, t, step, shift, n, mean, m2, lo, hi):
    """``_strided_moments`` with NaN left out, and the minimum and maximum (float64)."""
    zero = shift - shift
    j = t
    while j + U(3) * step < seg:
        k = base + j
        v0, v1 = as_work(xf[k], shift), as_work(xf[k + step], shift)
        v2, v3 = as_work(xf[k + U(2) * step], shift), as_work(xf[k + U(3) * step], shift)
        d0, w0 = _valid(v0 - shift, zero)
        d1, w1 = _valid(v1 - shift, zero)
        d2, w2 = _valid(v2 - shift, zero)
        d3, w3 = _valid(v3 - shift, zero)
        kept = (w0 + w1) + (w2 + w3)
        if kept > 0.0:  # as _chunk4, over the values kept
            cm = ((np.float64(d0) + np.float64(d1)) + (np.float64(d2) + np.float64(d3))) / kept
            cw = as_work(cm, shift)
            e0, e1, e2, e3 = (d0 - cw) * w0, (d1 - cw) * w1, (d2 - cw) * w2, (d3 - cw) * w3
            n, mean, m2 = _add_chunk(n, mean, m2, kept, cm,
                                     (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3))
            for v in (v0, v1, v2, v3):
                if v == v:
                    lo = min(lo, np.float64(v))
                    hi = max(hi, np.float64(v))
        j += U(4) * step
    while j < seg:
        v = as_work(xf[base + j], shift)
        if v == v:
            n, mean, m2 = _add_chunk(n, mean, m2, 1.0, v - shift, 0.0)
            lo = min(lo, np.float64(v))
            hi = max(hi, np.float64(v))
        j += step
    return n, mean, m2, lo, hi


@cuda.jit(device=True, inline=True)
def _block_part(outer, inner, nparts):
    """This thread's index, the block's threads and the block's part [lo, hi) of a
    channel's values (grid (channel blocks, nparts))."""
    n_values = U(outer) * U(inner)
    part, parts = U(cuda.blockIdx.y), U(nparts)
    return (U(cuda.threadIdx.x), U(cuda.blockDim.x), part * n_values // parts,
            (part + U(1)) * n_values // parts)


@cuda.jit(device=True, inline=True)
def _segment(e, o, i, hi_e, channels, inner, c):
    """The values of channel ``c``'s plane ``o`` from offset ``i`` (value ``e`` of the
    channel) up to the part's end ``hi_e``: their count and flat start."""
    return min(U(inner) - i, hi_e - e), (o * U(channels) + U(c)) * U(inner) + i


def _plane_stats(features):
    """A kernel over grid (channel blocks, nparts), threads along ``inner``: count, mean
    relative to the channel's shift and M2 of each part of each channel, arrays (C,
    nparts), of flat (outer, C, inner) data ``xf``; ``zero``: 0 in the working dtype.
    With ``features`` (data normalization) NaN is left out, the shift is 0 where the
    first value is not finite, and each part's minimum and maximum go to ``vmin`` and
    ``vmax`` (+inf / -inf where a part has no value); otherwise those are not written."""
    @cuda.jit
    def kernel(xf, outer, channels, inner, nparts, zero, count, mean_rel, m2, vmin, vmax):
        t, step, lo_e, hi_e = _block_part(outer, inner, nparts)
        sn = cuda.shared.array(THREADS, dtype=np.float64)
        smean = cuda.shared.array(THREADS, dtype=np.float64)
        sm2 = cuda.shared.array(THREADS, dtype=np.float64)
        smin = cuda.shared.array(THREADS, dtype=np.float64)
        smax = cuda.shared.array(THREADS, dtype=np.float64)
        for c in range(cuda.blockIdx.x, channels, cuda.gridDim.x):
            if features:
                shift = as_work(_finite_shift(xf, c, inner), zero)
            else:
                shift = as_work(xf[U(c) * U(inner)], zero)
            cnt, mu, q, lo, hi = 0.0, 0.0, 0.0, math.inf, -math.inf
            e, o, i = lo_e, lo_e // U(inner), lo_e % U(inner)
            while e < hi_e:  # plane by plane: no division per value
                seg, base = _segment(e, o, i, hi_e, channels, inner, c)
                if features:
                    cnt, mu, q, lo, hi = _strided_features(xf, base, seg, t, step, shift, cnt,
                                                           mu, q, lo, hi)
                else:
                    cnt, mu, q = _strided_moments(xf, base, seg, t, step, shift, cnt, mu, q)
                e += seg
                o += U(1)
                i = U(0)
            smin[t] = lo
            smax[t] = hi
            _block_moments(sn, smean, sm2, cnt, mu, q)  # synchronizes before merging
            if features:
                stride = step // U(2)
                while stride > 0:
                    if t < stride:
                        smin[t] = min(smin[t], smin[t + stride])
                        smax[t] = max(smax[t], smax[t + stride])
                    cuda.syncthreads()
                    stride //= U(2)
            if t == 0:
                p = cuda.blockIdx.y
                count[c, p] = sn[0]
                mean_rel[c, p] = smean[0]
                m2[c, p] = sm2[0]
                if features:
                    vmin[c, p] = smin[0]
                    vmax[c, p] = smax[0]
            cuda.syncthreads()
    return kernel


@cuda.jit(device=True, inline=True)
def _column_merge(sn, smean, sm2, tx, ty, bx, by):
    """Merge the (count, mean, M2) of the ``by`` rows of threads of each of the ``bx``
    columns in shared memory (index ``ty * bx + tx``); row 0 ends with the totals."""
    cuda.syncthreads()
    half = by // 2
    while half > 0:
        if ty < half:
            a = ty * bx + tx
            b = (ty + half) * bx + tx
            n, mean, m2 = _chan(sn[a], smean[a], sm2[a], sn[b], smean[b], sm2[b])
            sn[a] = n
            smean[a] = mean
            sm2[a] = m2
        cuda.syncthreads()
        half //= 2


@cuda.jit(device=True, inline=True)
def _row_block(channels, inner):
    """A row kernel's width ``C * inner``, thread and block indices along columns (x) and
    rows (y), and the rows between one thread's values."""
    by = U(cuda.blockDim.y)
    return (U(channels) * U(inner), U(cuda.threadIdx.x), U(cuda.threadIdx.y),
            U(cuda.blockDim.x), by, by * U(cuda.gridDim.y))


def _row_stats(features):
    """``_plane_stats`` for short ``inner`` (channels-last): 2-D blocks over (rows,
    columns) of the (outer, W = C * inner) view, threads along the columns (coalesced);
    one partial per (column, part), arrays (W, nparts) with nparts = gridDim.y."""
    @cuda.jit
    def kernel(xf, outer, channels, inner, zero, count, mean_rel, m2, vmin, vmax):
        width, tx, ty, bx, by, row_step = _row_block(channels, inner)
        sn = cuda.shared.array(THREADS, dtype=np.float64)
        smean = cuda.shared.array(THREADS, dtype=np.float64)
        sm2 = cuda.shared.array(THREADS, dtype=np.float64)
        smin = cuda.shared.array(THREADS, dtype=np.float64)
        smax = cuda.shared.array(THREADS, dtype=np.float64)
        rows = U(outer)
        for j0 in range(U(cuda.blockIdx.x) * bx, width, bx * U(cuda.gridDim.x)):
            j = j0 + tx
            cnt, mu, q, lo, hi = 0.0, 0.0, 0.0, math.inf, -math.inf
            if j < width:
                c = j // U(inner)
                r = U(cuda.blockIdx.y) * by + ty
                # rows r, r + row_step, ...: one column's values, width apart in memory
                base, seg, stride = j + r * width, (rows - min(r, rows)) * width, row_step * width
                if features:
                    shift = as_work(_finite_shift(xf, c, inner), zero)
                    cnt, mu, q, lo, hi = _strided_features(xf, base, seg, U(0), stride, shift,
                                                           cnt, mu, q, lo, hi)
                else:
                    shift = as_work(xf[c * U(inner)], zero)
                    cnt, mu, q = _strided_moments(xf, base, seg, U(0), stride, shift, cnt, mu, q)
            a = ty * bx + tx
            sn[a] = cnt
            smean[a] = mu
            sm2[a] = q
            smin[a] = lo
            smax[a] = hi
            _column_merge(sn, smean, sm2, tx, ty, bx, by)
            if features:
                half = by // U(2)
                while half > U(0):
                    if ty < half:
                        smin[a] = min(smin[a], smin[a + half * bx])
                        smax[a] = max(smax[a], smax[a + half * bx])
                    cuda.syncthreads()
                    half //= U(2)
            if ty == 0 and j < width:
                p = cuda.blockIdx.y
                count[j, p] = sn[tx]
                mean_rel[j, p] = smean[tx]
                m2[j, p] = sm2[tx]
                if features:
                    vmin[j, p] = smin[tx]
                    vmax[j, p] = smax[tx]
            cuda.syncthreads()
    return kernel


# the training statistics (NaN propagates) and those of data normalization
plane_moments = _plane_stats(False)
row_moments = _row_stats(False)
plane_features = _plane_stats(True)
row_features = _row_stats(True)


@cuda.jit(device=True)
def _merge_parts(count, mean_rel, m2, c):
    n = 0.0
    mu = 0.0
    q = 0.0
    for p in range(count.shape[1]):
        n, mu, q = _chan(n, mu, q, count[c, p], mean_rel[c, p], m2[c, p])
    return n, mu, q


@cuda.jit
def finish_forward(xf, inner, count, mean_rel, m2, weight, bias, eps, running_mean, running_var,
                   n_values, momentum, mean, invstd, params):
    """One thread per channel: merge the parts; mean and invstd (in their arrays' dtype),
    the running statistics updated (where kept: arrays of length C, else 0), and the
    affine parameters ``(hi, lo, scale, shift)``.  ``weight``/``bias``: length C, or 0
    for 1 and 0."""
    for c in range(cuda.grid(1), count.shape[0], cuda.gridsize(1)):
        n, mu, q = _merge_parts(count, mean_rel, m2, c)
        shift = np.float64(xf[c * inner])
        v = q / n
        inv = _invstd(v, eps)
        hi, lo = _two_sum(shift, mu)
        mean[c] = hi
        invstd[c] = inv
        _update_running(running_mean, running_var, c, hi, v, n_values, momentum)
        params[c, 0] = hi
        params[c, 1] = (hi - np.float64(params[c, 0])) + lo
        params[c, 2] = inv * _given(weight, c, 1.0)
        params[c, 3] = _given(bias, c, 0.0)


@cuda.jit
def finish_stats(xf, inner, count, mean_rel, m2, ddof, mean, var):
    """One thread per channel: merged mean and variance with ``ddof``."""
    for c in range(cuda.grid(1), count.shape[0], cuda.gridsize(1)):
        n, mu, q = _merge_parts(count, mean_rel, m2, c)
        mean[c] = np.float64(xf[c * inner]) + mu
        d = n - ddof
        if d > 0:
            var[c] = q / d
        elif q == 0.0:
            var[c] = math.nan  # 0 / 0, as np.var
        else:
            var[c] = math.inf


@cuda.jit
def inference_params(mean, var, weight, bias, eps, params):
    """One thread per channel: ``(hi, lo, scale, shift)`` from given statistics."""
    for c in range(cuda.grid(1), mean.shape[0], cuda.gridsize(1)):
        m = np.float64(mean[c])
        params[c, 0] = m
        params[c, 1] = m - np.float64(params[c, 0])
        params[c, 2] = _invstd(np.float64(var[c]), eps) * _given(weight, c, 1.0)
        params[c, 3] = _given(bias, c, 0.0)


# ----------------------------------------------------------------- backward

@cuda.jit(device=True, inline=True)
def _split(m, zero):
    """float64 ``m`` as ``hi + lo`` in the working dtype (the type of ``zero``)."""
    hi = as_work(m, zero)
    return hi, as_work(m - np.float64(hi), zero)


@cuda.jit(device=True, inline=True)
def _strided_grad_sums(gf, xf, yf, masked, base, seg, t, step, hi, lo, a, b):
    """Add ``g`` and ``g * (x - mean)`` of values ``base + j``, ``j = t, t + step, ... <
    seg``, to float64 sums ``a``, ``b``: four values at a time summed in the working
    dtype (``x - mean`` as ``(x - hi) - lo``); ``g`` is ``dy``, masked by ``y > 0``
    where ``masked`` (``_grad_at``)."""
    j = t
    while j + U(3) * step < seg:
        k = base + j
        k1, k2, k3 = k + step, k + U(2) * step, k + U(3) * step
        g0, g1 = _grad_at(gf, yf, masked, k, hi), _grad_at(gf, yf, masked, k1, hi)
        g2, g3 = _grad_at(gf, yf, masked, k2, hi), _grad_at(gf, yf, masked, k3, hi)
        v0, v1, v2, v3 = xf[k], xf[k1], xf[k2], xf[k3]
        a += np.float64((g0 + g1) + (g2 + g3))
        b += np.float64((g0 * ((v0 - hi) - lo) + g1 * ((v1 - hi) - lo))
                        + (g2 * ((v2 - hi) - lo) + g3 * ((v3 - hi) - lo)))
        j += U(4) * step
    while j < seg:
        g = _grad_at(gf, yf, masked, base + j, hi)
        a += np.float64(g)
        b += np.float64(g * ((xf[base + j] - hi) - lo))
        j += step
    return a, b


@cuda.jit
def plane_grad_sums(gf, xf, outer, channels, inner, mean, nparts, zero, s, sx, yf):
    """Grid (channel blocks, nparts), threads along ``inner``: ``sum(g)`` and
    ``sum(g * (x - mean))`` of each part of each channel, float64 arrays (C, nparts), of
    flat (outer, C, inner) ``dy`` and ``x``; ``g = dy`` where ``y > 0``, else 0, or plain
    ``dy`` when ``yf`` is empty (no ReLU)."""
    t, step, lo_e, hi_e = _block_part(outer, inner, nparts)
    masked = yf.size > 0
    sa = cuda.shared.array(THREADS, dtype=np.float64)
    sb = cuda.shared.array(THREADS, dtype=np.float64)
    for c in range(cuda.blockIdx.x, channels, cuda.gridDim.x):
        hi, lo = _split(mean[c], zero)
        a = 0.0
        b = 0.0
        e, o, i = lo_e, lo_e // U(inner), lo_e % U(inner)
        while e < hi_e:  # plane by plane: no division per value
            seg, base = _segment(e, o, i, hi_e, channels, inner, c)
            a, b = _strided_grad_sums(gf, xf, yf, masked, base, seg, t, step, hi, lo, a, b)
            e += seg
            o += U(1)
            i = U(0)
        sa[t] = a
        sb[t] = b
        cuda.syncthreads()
        _block_sum2(sa, sb)
        if t == 0:
            s[c, cuda.blockIdx.y] = sa[0]
            sx[c, cuda.blockIdx.y] = sb[0]
        cuda.syncthreads()


@cuda.jit
def row_grad_sums(gf, xf, outer, channels, inner, mean, zero, s, sx, yf):
    """``plane_grad_sums`` for short ``inner``: 2-D blocks over (rows, columns) of the
    (outer, W) view, one pair of sums per (column, part), arrays (W, nparts)."""
    width, tx, ty, bx, by, row_step = _row_block(channels, inner)
    masked = yf.size > 0
    sa = cuda.shared.array(THREADS, dtype=np.float64)
    sb = cuda.shared.array(THREADS, dtype=np.float64)
    rows = U(outer)
    for j0 in range(U(cuda.blockIdx.x) * bx, width, bx * U(cuda.gridDim.x)):
        j = j0 + tx
        a = 0.0
        b = 0.0
        if j < width:
            hi, lo = _split(mean[j // U(inner)], zero)
            r = U(cuda.blockIdx.y) * by + ty
            a, b = _strided_grad_sums(gf, xf, yf, masked, j + r * width,
                                      (rows - min(r, rows)) * width, U(0), row_step * width,
                                      hi, lo, a, b)
        sa[ty * bx + tx] = a
        sb[ty * bx + tx] = b
        cuda.syncthreads()
        half = by // U(2)
        while half > U(0):
            if ty < half:
                sa[ty * bx + tx] += sa[(ty + half) * bx + tx]
                sb[ty * bx + tx] += sb[(ty + half) * bx + tx]
            cuda.syncthreads()
            half //= U(2)
        if ty == 0 and j < width:
            s[j, cuda.blockIdx.y] = sa[tx]
            sx[j, cuda.blockIdx.y] = sb[tx]
        cuda.syncthreads()


@cuda.jit
def finish_backward(s, sx, mean, invstd, weight, n, dweight, dbias, params):
    """One thread per channel: ``dbias = sum(dy)``, ``dweight = sum(dy (x - mean)) invstd``
    (in their arrays' dtype) and ``(hi, lo, a, b, k)`` with
    ``dx = ((dy - b) - ((x - hi) - lo) * k) * a``."""
    for c in range(cuda.grid(1), s.shape[0], cuda.gridsize(1)):
        a = 0.0
        b = 0.0
        for p in range(s.shape[1]):
            a += s[c, p]
            b += sx[c, p]
        m = np.float64(mean[c])
        inv = np.float64(invstd[c])
        dbias[c] = a
        dweight[c] = b * inv
        params[c, 0] = m
        params[c, 1] = m - np.float64(params[c, 0])
        params[c, 2] = _given(weight, c, 1.0) * inv
        params[c, 3] = a / n
        params[c, 4] = inv * inv * b / n


# ----------------------------------------------------------------- channel maps

# Element-wise kernels over flat (outer, C, inner) data whose grid has a multiple of
# C * inner threads (or at least one per value: ``map_blocks``): a thread's values are
# then all in one channel, so it loads that channel's parameters once and its loop is
# a load, the arithmetic and a store (about 13 SASS instructions a value on sm_90,
# bench/gpu_proxy.py), four loads in flight.

@cuda.jit(device=True, inline=True)
def _map_begin(channels, inner):
    """A map thread's first flat index, the grid's stride and the thread's channel (fixed:
    ``map_blocks`` makes the stride a multiple of ``channels * inner``)."""
    k = U(cuda.grid(1))
    return k, U(cuda.gridsize(1)), (k // U(inner)) % U(channels)


def _channel_map(load, value, two_inputs=False):
    """A kernel ``(a, b, params, out, channels, inner)``: ``out[k] = value(a[k], b[k], p)``
    with ``p = load(params, c)`` for the channel ``c`` of flat index ``k``; ``b`` is
    neither read nor passed on (``value`` gets ``a[k]`` twice) unless ``two_inputs``."""
    @cuda.jit
    def kernel(a, b, params, out, channels, inner):
        n = U(a.size)
        k, step, c = _map_begin(channels, inner)
        p = load(params, c)  # a thread past the end reads a channel's parameters, writes nothing
        while k + U(3) * step < n:
            k1, k2, k3 = k + step, k + U(2) * step, k + U(3) * step
            a0, a1, a2, a3 = a[k], a[k1], a[k2], a[k3]
            if two_inputs:
                b0, b1, b2, b3 = b[k], b[k1], b[k2], b[k3]
            else:
                b0, b1, b2, b3 = a0, a1, a2, a3
            out[k] = value(a0, b0, p)
            out[k1] = value(a1, b1, p)
            out[k2] = value(a2, b2, p)
            out[k3] = value(a3, b3, p)
            k += U(4) * step
        while k < n:
            out[k] = value(a[k], b[k] if two_inputs else a[k], p)
            k += step
    return kernel


@cuda.jit(device=True, inline=True)
def _four(p, c):
    return p[c, 0], p[c, 1], p[c, 2], p[c, 3]


@cuda.jit(device=True, inline=True)
def _five(p, c):
    return p[c, 0], p[c, 1], p[c, 2], p[c, 3], p[c, 4]


@cuda.jit(device=True, inline=True)
def _seven(p, c):
    return p[c, 0], p[c, 1], p[c, 2], p[c, 3], p[c, 4], p[c, 5], p[c, 6]


@cuda.jit(device=True, inline=True)
def _affine_value(v, _, p):
    hi, lo, scale, shift = p
    return ((v - hi) - lo) * scale + shift


@cuda.jit(device=True, inline=True)
def _dx_value(g, v, p):
    hi, lo, a, b, k = p
    return ((g - b) - ((v - hi) - lo) * k) * a


@cuda.jit(device=True, inline=True)
def _two_sided_value(v, _, p):
    """Min-max scaling about both ends (``fastbn._cpu.kernels.minmax``)."""
    c_low, c_high, scale, f_low, f_high, r_low, r_high = p
    d_low = v - c_low
    d_high = v - c_high
    below = not d_low >= -d_high
    centered = (d_low if below else d_high) - (r_low if below else r_high)
    return centered * scale + (f_low if below else f_high)


# y = ((x - hi) - lo) * scale + shift per channel, params (C, 4)
affine = _channel_map(_four, _affine_value)
# the training-mode input gradient dx = ((dy - b) - ((x - hi) - lo) * k) * a, params (C, 5)
dx = _channel_map(_five, _dx_value, two_inputs=True)
# min-max scaling about both ends, params (C, 7) as the host's
two_sided = _channel_map(_seven, _two_sided_value)


# The channel maps with the fused epilogues (contract section 6).  An optional array
# is passed empty when not given, and the flags are uniform over the grid, so the
# branches cost no divergence.

@cuda.jit
def affine_epilogue(a, params, out, channels, inner, res, relu):
    """``affine``, then ``+ res`` (read in its own dtype; an empty ``res``: none), then
    ReLU where ``relu``: ``out = act(((a - hi) - lo) * scale + shift + res)``."""
    n = U(a.size)
    k, step, c = _map_begin(channels, inner)
    p = _four(params, c)  # a thread past the end reads a channel's parameters, writes nothing
    has_res = res.size > 0
    while k + step < n:
        k1 = k + step
        a0, a1 = a[k], a[k1]
        v0, v1 = _affine_value(a0, a0, p), _affine_value(a1, a1, p)
        if has_res:
            v0 += as_work(res[k], v0)
            v1 += as_work(res[k1], v1)
        out[k] = _relu_if(v0, relu)
        out[k1] = _relu_if(v1, relu)
        k += U(2) * step
    if k < n:
        v = _affine_value(a[k], a[k], p)
        if has_res:
            v += as_work(res[k], v)
        out[k] = _relu_if(v, relu)


@cuda.jit
def dx_epilogue(g, x, params, out, channels, inner, y, dres):
    """``dx`` through ReLU and into the residual: ``m = dy`` where ``y > 0``, else 0 (plain
    ``dy`` when ``y`` is empty); ``out = dx(m, x)``, and ``dres = m`` unless ``dres`` is
    empty."""
    n = U(x.size)
    k, step, c = _map_begin(channels, inner)
    p = _five(params, c)  # a thread past the end reads a channel's parameters, writes nothing
    masked = y.size > 0
    has_dres = dres.size > 0
    while k < n:
        m = _grad_at(g, y, masked, k, p[2])
        out[k] = _dx_value(m, x[k], p)
        if has_dres:
            dres[k] = m
        k += step


@cuda.jit
def cast(src, dst):
    """``dst = src`` with conversion, flat, grid-stride."""
    start, step = cuda.grid(1), cuda.gridsize(1)
    for k in range(start, src.shape[0], step):
        dst[k] = src[k]


@cuda.jit
def fill(dst, value):
    start, step = cuda.grid(1), cuda.gridsize(1)
    for k in range(start, dst.shape[0], step):
        dst[k] = value


# ----------------------------------------------------------------- data normalization

@cuda.jit
def standardize_params(xf, inner, count, mean_rel, m2, params):
    """One thread per channel: ``(hi, lo, 1 / scale, 0)`` with scikit-learn's scale
    (``sqrt(var)``, 1 for a feature within rounding of a constant)."""
    for c in range(cuda.grid(1), count.shape[0], cuda.gridsize(1)):
        n, mu, q = _merge_parts(count, mean_rel, m2, c)
        if n == 0.0:
            hi, lo, var = math.nan, 0.0, math.nan
        else:
            hi, lo = _two_sum(_finite_shift(xf, c, inner), mu)
            var = q / n
        eps = 2.220446049250313e-16
        mean = hi + lo
        scale = math.sqrt(var)
        if var <= n * eps * var + (n * mean * eps) ** 2:
            scale = 1.0
        params[c, 0] = hi
        params[c, 1] = (hi - np.float64(params[c, 0])) + lo
        params[c, 2] = 1.0 / scale
        params[c, 3] = 0.0


@cuda.jit
def minmax_params(vmin, vmax, low, high, params):
    """One thread per channel: the two-sided parameters (C, 7) of scikit-learn's
    MinMaxScaler (``two_sided``), as on the host."""
    for c in range(cuda.grid(1), vmin.shape[0], cuda.gridsize(1)):
        dmin = math.inf
        dmax = -math.inf
        for p in range(vmin.shape[1]):
            dmin = min(dmin, vmin[c, p])
            dmax = max(dmax, vmax[c, p])
        if dmin > dmax:  # no value in this channel
            dmin = math.nan
            dmax = math.nan
        data_range = dmax - dmin
        has_range = data_range >= 10 * 2.220446049250313e-16
        if data_range < 10 * 2.220446049250313e-16:
            data_range = 1.0
        params[c, 0] = dmin
        params[c, 1] = dmax
        params[c, 2] = (high - low) / data_range
        params[c, 3] = low
        params[c, 4] = high
        params[c, 5] = dmin - np.float64(params[c, 0])
        params[c, 6] = dmax - np.float64(params[c, 1])
        if not has_range:
            params[c, 1] = math.inf
            params[c, 6] = 0.0


@cuda.jit
def clip(y, low, high):
    """Clip flat ``y`` to [low, high] (NaN kept)."""
    for k in range(cuda.grid(1), y.shape[0], cuda.gridsize(1)):
        v = y[k]
        if v < low:
            y[k] = low
        elif v > high:
            y[k] = high

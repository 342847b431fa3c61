"""The benchmark's memory floors: the traffic of each kernel schedule with no
arithmetic (a parallel copy, read, ``a + b``; per channel group; pipelined).
Only ``fastbn bench`` and its tests use them: ``warmup()`` never compiles them
and the backend does not carry them.
"""

import math
import sys

import numpy as np
from numba import prange

from .._jit import kernel, serial_module
from .._layout import empty_at_line_offset
from . import backend, kernels
from .kernels.numerics import REDUCE_MATH
from .kernels.codegen import (
    LINE_BYTES, _flat, _line_add, _line_copy, _store_fence, _stream_span
)
from .kernels.pipes import _pipe_sum2_add, _pipe_sum_copy
from .kernels.pipeline import _next_run, _part_rows, _pipe_geometry


@kernel()
def _copy_span(src, dst, lo, hi):
    """``dst[lo:hi] = src[lo:hi]`` (flat), streaming the whole lines of a large ``dst``."""
    first, last = _stream_span(dst, lo, hi)
    for i in range(np.uint64(lo), np.uint64(first)):
        dst[i] = src[i]
    for i in range(first, last, LINE_BYTES // dst.itemsize):
        _line_copy(src, i, dst)
    for i in range(np.uint64(last), np.uint64(hi)):
        dst[i] = src[i]


@kernel()
def _add_span(a, b, out, lo, hi):
    """``out[lo:hi] = a[lo:hi] + b[lo:hi]`` (flat), streaming the whole lines of a large ``out``."""
    first, last = _stream_span(out, lo, hi)
    for i in range(np.uint64(lo), np.uint64(first)):
        out[i] = a[i] + b[i]
    for i in range(first, last, LINE_BYTES // out.itemsize):
        _line_add(a, b, i, out)
    for i in range(np.uint64(last), np.uint64(hi)):
        out[i] = a[i] + b[i]


@kernel(parallel=True)
def _parallel_copy(src, dst, nblocks):
    """Copy flat ``src`` into ``dst`` in ``nblocks`` parallel blocks with streaming stores:
    the memory floor, one read and one write of every byte."""
    n = src.shape[0]
    for blk in prange(nblocks):
        _copy_span(src, dst, blk * n // nblocks, (blk + 1) * n // nblocks)
        _store_fence()


@kernel(fastmath=REDUCE_MATH)
def _flat_sum(a, lo, hi):
    s = 0.0
    for i in range(np.uint64(lo), np.uint64(hi)):
        s += a[i]
    return s


@kernel(fastmath=REDUCE_MATH)
def _flat_sum2(a, b, lo, hi):
    s = 0.0
    for i in range(np.uint64(lo), np.uint64(hi)):
        s += a[i] + b[i]
    return s


@kernel(parallel=True)
def _parallel_read(src, nblocks):
    """Sum flat ``src`` in ``nblocks`` parallel blocks: the floor of a read-only pass."""
    n = src.shape[0]
    partial = np.zeros(nblocks)
    for blk in prange(nblocks):
        partial[blk] = _flat_sum(src, blk * n // nblocks, (blk + 1) * n // nblocks)
    return partial.sum()


@kernel(parallel=True)
def _parallel_add(a, b, out, nblocks):
    """``out = a + b`` (flat) with streaming stores: the floor of two reads and one write."""
    n = a.shape[0]
    for blk in prange(nblocks):
        _add_span(a, b, out, blk * n // nblocks, (blk + 1) * n // nblocks)
        _store_fence()


# Floors of the fused channel path: the same tasks (a group of channels each)
# and the same traffic (read the group, then read it again from cache and
# write), with no arithmetic.  No fused kernel on this schedule can beat them.

@kernel(parallel=True)
def _grouped_traffic(a, b, group, out):
    """Per group of channels of ``a`` (outer, C, inner): sum it, then copy it into ``out``
    from cache; with ``b`` (not None), sum ``a`` and ``b``, then ``out = a + b``.  Returns
    the sum."""
    outer, channels, inner = a.shape
    ngroups = -(-channels // group)
    af = a.reshape(a.size)
    bf = af if b is None else b.reshape(b.size)
    outf = out.reshape(out.size)
    sums = np.zeros(ngroups)
    for g in prange(ngroups):
        c0 = g * group
        c1 = min(c0 + group, channels)
        s = 0.0
        for o in range(outer):
            lo = (o * channels + c0) * inner
            hi = (o * channels + c1) * inner
            s += _flat_sum(af, lo, hi) if b is None else _flat_sum2(af, bf, lo, hi)
        sums[g] = s
        for o in range(outer):
            lo = (o * channels + c0) * inner
            hi = (o * channels + c1) * inner
            if b is None:
                _copy_span(af, outf, lo, hi)
            else:
                _add_span(af, bf, outf, lo, hi)
        _store_fence()
    return sums.sum()


# Floors of the pipelined path: its schedule and traffic, no arithmetic.  An optional
# operand typed None (a residual; ReLU's y and the dresidual it is copied to) compiles
# away.

@kernel()
def _copy_or_add_span(src, r, dst, lo, hi):
    """``dst[lo:hi] = src[lo:hi]``, plus ``r[lo:hi]`` where ``r`` is not None."""
    if r is None:
        _copy_span(src, dst, lo, hi)
    else:
        _add_span(src, r, dst, lo, hi)


@kernel()
def _pipelined_copy_chain(x, r, c0, c1, y, acc):
    outer, channels, inner = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    rf = _flat(r)
    for o in range(outer):
        acc[0] += _flat_sum(xf, (o * channels + c0) * inner, (o * channels + c0 + 1) * inner)
    for c in range(c0, c1 - 1):
        acc[0] += _flat_sum(xf, (c + 1) * inner, (c + 2) * inner)
        _copy_or_add_span(xf, rf, yf, c * inner, (c + 1) * inner)
        for o in range(1, outer):
            cur = (o * channels + c) * inner
            first, last, nreduce, nwrite, pf, wrap, jump = _pipe_geometry(
                yf, cur + inner, cur, inner, _next_run(channels, inner, 0, outer, o, c))
            _pipe_sum_copy(xf, yf, cur + inner, first, nreduce, nwrite, pf, wrap, jump, rf, acc)
            acc[0] += _flat_sum(xf, cur + inner + nreduce * (LINE_BYTES // yf.itemsize),
                                cur + 2 * inner)
            _copy_or_add_span(xf, rf, yf, cur, first)
            _copy_or_add_span(xf, rf, yf, last, cur + inner)
    for o in range(outer):
        _copy_or_add_span(xf, rf, yf, (o * channels + c1 - 1) * inner,
                          (o * channels + c1) * inner)


@kernel(parallel=True)
def _pipelined_read_copy(x, r, nchains, nparts, y):
    """The pipelined forward's traffic: ``y = x`` on its schedule (``r`` not None: ``y = x
    + r``, the forward with a residual), the next channel summed, over ``nchains`` chains
    of channels of ``nparts`` parts of rows each (the forward's schedule: one chain per
    thread, one part); returns the sum of ``x``."""
    outer, channels = x.shape[0], x.shape[1]
    sums = np.zeros((nchains * nparts, 2))
    for t in prange(nchains * nparts):
        chain = t // nparts
        r0, r1 = _part_rows(outer, nparts, t - chain * nparts)
        c0, c1 = chain * channels // nchains, (chain + 1) * channels // nchains
        if r is None:
            _pipelined_copy_chain(x[r0:r1], None, c0, c1, y[r0:r1], sums[t])
        else:
            _pipelined_copy_chain(x[r0:r1], r[r0:r1], c0, c1, y[r0:r1], sums[t])
        _store_fence()
    return sums[:, 0].sum()


@kernel()
def _flat_sums(a, b, c, lo, hi):
    """The sum of ``a + b`` over [lo, hi), plus that of ``c`` where it is not None."""
    s = _flat_sum2(a, b, lo, hi)
    if c is not None:
        s += _flat_sum(c, lo, hi)
    return s


@kernel()
def _add_spans(a, b, c, out, out_c, lo, hi):
    """``out[lo:hi] = a + b``, and ``out_c[lo:hi] = c`` where ``c`` is not None."""
    _add_span(a, b, out, lo, hi)
    if c is not None:
        _copy_span(c, out_c, lo, hi)


@kernel()
def _pipelined_add_chain(a, b, c, c0, c1, out, out_c, acc):
    outer, channels, inner = a.shape
    af = a.reshape(a.size)
    bf = b.reshape(b.size)
    of = out.reshape(out.size)
    cf = _flat(c)
    ocf = _flat(out_c)
    for o in range(outer):
        acc[0] += _flat_sums(af, bf, cf, (o * channels + c0) * inner,
                             (o * channels + c0 + 1) * inner)
    for ch in range(c0, c1 - 1):
        acc[0] += _flat_sums(af, bf, cf, (ch + 1) * inner, (ch + 2) * inner)
        _add_spans(af, bf, cf, of, ocf, ch * inner, (ch + 1) * inner)
        for o in range(1, outer):
            cur = (o * channels + ch) * inner
            first, last, nreduce, nwrite, pf, wrap, jump = _pipe_geometry(
                of, cur + inner, cur, inner, _next_run(channels, inner, 0, outer, o, ch))
            _pipe_sum2_add(af, bf, cf, of, cur + inner, first, nreduce, nwrite, pf, wrap, jump,
                           ocf, acc)
            acc[0] += _flat_sums(af, bf, cf, cur + inner + nreduce * (LINE_BYTES // of.itemsize),
                                 cur + 2 * inner)
            _add_spans(af, bf, cf, of, ocf, cur, first)
            _add_spans(af, bf, cf, of, ocf, last, cur + inner)
    for o in range(outer):
        _add_spans(af, bf, cf, of, ocf, (o * channels + c1 - 1) * inner,
                   (o * channels + c1) * inner)


@kernel(parallel=True)
def _pipelined_read2_add(a, b, c, nchains, nparts, out, out_c):
    """The pipelined backward's traffic: ``out = a + b`` on its schedule (``nchains``,
    ``nparts``: see ``backward_chains``), the next channel of both summed; with ``c`` (not
    None) also read and copied into ``out_c`` (the backward through ReLU: ``y`` read,
    ``dresidual`` written); returns the sum of the inputs."""
    outer, channels = a.shape[0], a.shape[1]
    sums = np.zeros((nchains * nparts, 2))
    for t in prange(nchains * nparts):
        chain = t // nparts
        r0, r1 = _part_rows(outer, nparts, t - chain * nparts)
        c0, c1 = chain * channels // nchains, (chain + 1) * channels // nchains
        if c is None:
            _pipelined_add_chain(a[r0:r1], b[r0:r1], None, c0, c1, out[r0:r1], None, sums[t])
        else:
            _pipelined_add_chain(a[r0:r1], b[r0:r1], c[r0:r1], c0, c1, out[r0:r1],
                                 out_c[r0:r1], sums[t])
        _store_fence()
    return sums.sum()


# ----------------------------------------------------------------- the floors, callable
# The parallel traffic of the benchmark's reference, on the backend's thread plan (its
# call guard: thread mask, workqueue lock); in a process whose thread pool a fork left
# unusable, the serial twins of these kernels.

_serial = None


def _kernels(call):
    global _serial
    if call.k is kernels:
        return sys.modules[__name__]
    if _serial is None:
        _serial = serial_module(sys.modules[__name__])
    return _serial


def _guard():
    return backend._Call(math.inf)


def copy(src, dst):
    """Parallel copy of ``src`` into ``dst`` (contiguous, same size): the memory floor."""
    with _guard() as call:
        _kernels(call)._parallel_copy(src.reshape(-1), dst.reshape(-1), call.n)


def read(src):
    """Parallel read-only pass over contiguous ``src`` (the floor of a statistics pass);
    returns the sum."""
    with _guard() as call:
        return _kernels(call)._parallel_read(src.reshape(-1), call.n)


def add(a, b, out):
    """Parallel ``out = a + b`` (contiguous): the floor of two reads and one write."""
    with _guard() as call:
        _kernels(call)._parallel_add(a.reshape(-1), b.reshape(-1), out.reshape(-1), call.n)


def grouped_read_copy(x3, y3, group=None):
    """The fused forward's traffic on its own schedule, no arithmetic: per group of
    ``group`` channels (default: the forward's plan) of contiguous ``x3`` (outer, C,
    inner), a read, then a copy from cache; returns the sum."""
    with _guard() as call:
        group = group or backend.channel_plan(x3.shape, x3.itemsize)[0]
        return _kernels(call)._grouped_traffic(x3, None, group, y3)


def grouped_read2_add(a3, b3, out3, group=None):
    """The fused backward's traffic, no arithmetic: per group (default: the backward's
    plan), read ``a3`` and ``b3``, then ``out3 = a3 + b3`` from cache; returns the sum of
    both."""
    with _guard() as call:
        group = group or backend.channel_plan(a3.shape, 2 * a3.itemsize)[0]
        return _kernels(call)._grouped_traffic(a3, b3, group, out3)


def pipelined_read_copy(x3, y3, r3=None):
    """The pipelined forward's traffic, no arithmetic: along each thread's chain of
    channels, copy channel c from cache while reading channel c + 1; with ``r3``, ``y3 =
    x3 + r3`` instead of the copy (the forward with a residual: the residual read once,
    as the write needs it)."""
    with _guard() as call:
        return _kernels(call)._pipelined_read_copy(x3, r3, backend.plan_chains(x3.shape[1]), 1,
                                                   y3)


def empty_aligned_like(like):
    """An uninitialized array like ``like`` at its offset within a cache line: two outputs
    written together with streaming stores (``dx`` and ``dresidual``) must be, as the
    backend arranges (``Output.align_like``)."""
    return empty_at_line_offset(like.shape, like.dtype, like, LINE_BYTES)


def _address(a):
    return a.__array_interface__["data"][0]


def pipelined_read2_add(a3, b3, out3, nchains=None, nparts=None, c3=None, out3_c=None):
    """The pipelined backward's traffic on its schedule (``nchains`` chains of channels,
    split into ``nparts`` parts of rows; default: the backward's plan), no arithmetic:
    ``out3 = a3 + b3`` for channel c from cache while reading channel c + 1 of both; with
    ``c3``, also read with them and copied into ``out3_c`` (the backward through ReLU with
    the residual's gradient: ``y`` read, ``dresidual`` written), which must lie at
    ``out3``'s offset within a cache line (``empty_aligned_like``)."""
    if (c3 is None) != (out3_c is None):
        raise ValueError("c3 and out3_c go together")
    if out3_c is not None and (_address(out3_c) - _address(out3)) % LINE_BYTES:
        raise ValueError("out3_c must lie at out3's offset within a cache line "
                         "(empty_aligned_like): both are written with streaming stores")
    with _guard() as call:
        if nchains is None:
            nchains, nparts = kernels.backward_chains(a3.shape[0], a3.shape[1], call.n)
        return _kernels(call)._pipelined_read2_add(a3, b3, c3, nchains, nparts, out3, out3_c)


def row_tiled_read_copy(x3, y3, nparts=None):
    """``pipelined_read_copy`` as one chain of all channels in ``nparts`` blocks of rows
    (default 4 per thread): the forward's traffic when a channel's re-read comes from a
    tile in L2."""
    with _guard() as call:
        return _kernels(call)._pipelined_read_copy(x3, None, 1, _row_parts(x3, nparts, call.n),
                                                   y3)


def row_tiled_read2_add(a3, b3, out3, nparts=None):
    """``pipelined_read2_add`` as one chain in ``nparts`` blocks of rows (default 4 per
    thread)."""
    with _guard() as call:
        return _kernels(call)._pipelined_read2_add(a3, b3, None, 1,
                                                  _row_parts(a3, nparts, call.n), out3, None)


def _row_parts(x3, nparts, nthreads):
    return max(1, min(x3.shape[0], nparts or 4 * nthreads))

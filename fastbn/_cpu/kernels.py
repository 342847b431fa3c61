"""Numba kernels for the CPU backend.

Every kernel works on C-contiguous arrays of one float dtype (float32 or
float64) in a canonical layout and knows nothing about axes:

* "channel" kernels take ``x`` of shape (outer, C, inner); a channel is
  ``x[:, c, :]``, a set of ``outer`` contiguous runs of ``inner`` values.  A
  task owns a group of neighbouring channels, whose runs are adjacent in memory
  (long streams for the prefetchers), and normalizes the group right after
  reducing it, while its data is still in cache.
* "column" kernels take ``x`` of shape (rows, W) and reduce over rows, with
  every column its own accumulator (in vector registers for rows of up to 64
  columns, in an L1-resident array for wider rows).  This is the fast path when ``inner`` is short (channels-last,
  (N, C)): the loop over W is contiguous and vectorizes.

Output passes write whole 64-byte lines with non-temporal stores (LLVM IR
intrinsics below: Numba has no vector types), except for outputs small enough
to stay in cache.  Everything Numba compiles lives in this one module on
purpose: the disk cache is keyed by this file's contents and would not notice
an edit to a helper imported from elsewhere.

Numerics (docs/contract.md section 5).  Statistics are accumulated in float64 relative
to a per-channel shift (the channel's first value) in L1-sized pieces: the
first piece of a channel is exact two-pass, later pieces take deviations about
the channel's running mean (see ``_accumulate``), and pieces are combined
with Chan's merge.  There is no ``E[x^2] - E[x]^2`` anywhere.
The normalization subtracts the mean as an unevaluated sum ``hi + lo`` of two
numbers of the working dtype, ``(x - hi) - lo``: with ``x`` near the mean,
``x - hi`` is exact (Sterbenz), so float32 data far from zero keep their full
precision even though the arithmetic is float32 and vectorizes 16 wide.

Per-channel parameters of an affine pass are rows ``(hi, lo, scale, shift)``
(channel kernels: shape (C, 4)) or columns (column kernels: shape (4, W)) in
the working dtype.  Backward parameters are ``(hi, lo, a, b, k)`` and give
``dx = ((dy - b) - ((x - hi) - lo) * k) * a``.
"""

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._jit import kernel

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


# Run helpers index x[o, c, i] directly (no slice objects: their set-up costs
# more than a short run) with an unsigned loop index: with a signed one LLVM
# cannot drop Numba's negative-index wraparound and falls back to gathers.
# ---------------------------------------------------------------------------
# Streaming stores.  The output of a pass is not read again soon, so each
# 64-byte line is written with a non-temporal vector store: no read-for-ownership
# of the destination, and no eviction of the input that is still to be re-read.
# Helpers write ``out[start:stop]`` (flat, C-contiguous) in three parts: scalar
# up to the first 64-byte boundary of ``out``, whole lines, a scalar tail.

LINE_BYTES = 64
# Outputs below this size are written with ordinary stores: they fit in cache.
STREAM_MIN_BYTES = 4 << 20


def _line_type(context, dtype):
    elt = context.get_value_type(dtype)
    return ir.VectorType(elt, LINE_BYTES // (dtype.bitwidth // 8))


def _item_pointer(context, builder, aryty, ary, index):
    arr = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, aryty, arr, [index], wraparound=False,
                                    boundscheck=False)


def _load_line(context, builder, aryty, ary, index, vty):
    ptr = _item_pointer(context, builder, aryty, ary, index)
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=aryty.dtype.bitwidth // 8)


def _splat(context, builder, value, fromty, dtype, vty):
    value = context.cast(builder, value, fromty, dtype)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.IntType(32)(0))
    mask = ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count)
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), mask)


def _store_line_nt(context, builder, aryty, ary, index, value):
    ptr = _item_pointer(context, builder, aryty, ary, index)
    store = builder.store(value, builder.bitcast(ptr, value.type.as_pointer()), align=LINE_BYTES)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))


def _store_line(context, builder, aryty, ary, index, value, stream):
    """Store a line: streamed (aligned, non-temporal) where the i1 ``stream`` is true, else
    an ordinary store at any item-aligned address, for an output that stays in cache.
    Callers pass a constant, which LLVM folds: no branch is left in their loops."""
    with builder.if_else(stream, likely=True) as (streamed, cached):
        with streamed:
            _store_line_nt(context, builder, aryty, ary, index, value)
        with cached:
            ptr = _item_pointer(context, builder, aryty, ary, index)
            builder.store(value, builder.bitcast(ptr, value.type.as_pointer()),
                          align=aryty.dtype.bitwidth // 8)


def _affine_expr(builder, v, hi, lo, scale, shift):
    return builder.fadd(builder.fmul(builder.fsub(builder.fsub(v, hi), lo), scale), shift)


def _dx_expr(builder, g, v, hi, lo, a, b, k):
    xc = builder.fsub(builder.fsub(v, hi), lo)
    return builder.fmul(builder.fsub(builder.fsub(g, b), builder.fmul(xc, k)), a)


def _column_params(context, builder, pty, params, j, count, vty):
    """Lines of rows 0..count-1 of ``params`` (k, W + lanes) starting at column ``j``."""
    parr = context.make_array(pty)(context, builder, params)
    lines = []
    for k in range(count):
        ptr = cgutils.get_item_pointer(context, builder, pty, parr,
                                       [context.get_constant(types.intp, k), j],
                                       wraparound=False, boundscheck=False)
        lines.append(builder.load(builder.bitcast(ptr, vty.as_pointer()),
                                  align=pty.dtype.bitwidth // 8))
    return lines


def _scalar_params(context, builder, sig, args, first, count, vty):
    dt = sig.args[0].dtype
    return [_splat(context, builder, args[n], sig.args[n], dt, vty)
            for n in range(first, first + count)]


@intrinsic
def _line_affine(typingctx, x, i, out, hi, lo, scale, shift, stream):
    """``out[i:i+L] = ((x[i:i+L] - hi) - lo) * scale + shift``, one line (``_store_line``)."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[0].dtype)
        v = _load_line(context, builder, sig.args[0], args[0], args[1], vty)
        r = _affine_expr(builder, v, *_scalar_params(context, builder, sig, args, 3, 4, vty))
        _store_line(context, builder, sig.args[2], args[2], args[1], r, args[7])
        return context.get_dummy_value()
    return types.void(x, types.intp, out, hi, lo, scale, shift, types.boolean), codegen


@intrinsic
def _line_affine_split(typingctx, x, i, out, split, hi0, lo0, scale0, shift0, hi1, lo1, scale1,
                       shift1):
    """``_line_affine`` for a line shared by two channels: its first ``split`` values take
    the first parameters, the others the second."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[0].dtype)
        v = _load_line(context, builder, sig.args[0], args[0], args[1], vty)
        first = _scalar_params(context, builder, sig, args, 4, 4, vty)
        second = _scalar_params(context, builder, sig, args, 8, 4, vty)
        ity = ir.IntType(64)
        lanes = ir.Constant(ir.VectorType(ity, vty.count), list(range(vty.count)))
        cut = _splat(context, builder, args[3], sig.args[3], types.int64,
                     ir.VectorType(ity, vty.count))
        mask = builder.icmp_signed("<", lanes, cut)
        params = [builder.select(mask, a, b) for a, b in zip(first, second)]
        _store_line_nt(context, builder, sig.args[2], args[2], args[1],
                       _affine_expr(builder, v, *params))
        return context.get_dummy_value()
    return types.void(x, types.intp, out, types.intp, hi0, lo0, scale0, shift0, hi1, lo1, scale1,
                      shift1), codegen


@intrinsic
def _line_affine_cols(typingctx, x, i, out, params, j):
    """Column form: parameters are rows of ``params`` (4, W) at column ``j``."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[0].dtype)
        v = _load_line(context, builder, sig.args[0], args[0], args[1], vty)
        p = _column_params(context, builder, sig.args[3], args[3], args[4], 4, vty)
        _store_line_nt(context, builder, sig.args[2], args[2], args[1], _affine_expr(builder, v, *p))
        return context.get_dummy_value()
    return types.void(x, types.intp, out, params, types.intp), codegen


@intrinsic
def _line_dx(typingctx, dy, x, i, out, hi, lo, a, b, k, stream):
    """``out[i:i+L] = ((dy - b) - ((x - hi) - lo) * k) * a``, one line (``_store_line``)."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[1].dtype)
        g = _load_line(context, builder, sig.args[0], args[0], args[2], vty)
        v = _load_line(context, builder, sig.args[1], args[1], args[2], vty)
        r = _dx_expr(builder, g, v, *_scalar_params(context, builder, sig, args, 4, 5, vty))
        _store_line(context, builder, sig.args[3], args[3], args[2], r, args[9])
        return context.get_dummy_value()
    return types.void(dy, x, types.intp, out, hi, lo, a, b, k, types.boolean), codegen


@intrinsic
def _line_dx_cols(typingctx, dy, x, i, out, params, j):
    """Column form of ``_line_dx``: parameters are rows of ``params`` (5, W) at column ``j``."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[1].dtype)
        g = _load_line(context, builder, sig.args[0], args[0], args[2], vty)
        v = _load_line(context, builder, sig.args[1], args[1], args[2], vty)
        p = _column_params(context, builder, sig.args[4], args[4], args[5], 5, vty)
        _store_line_nt(context, builder, sig.args[3], args[3], args[2], _dx_expr(builder, g, v, *p))
        return context.get_dummy_value()
    return types.void(dy, x, types.intp, out, params, types.intp), codegen


@intrinsic
def _line_copy(typingctx, src, i, dst):
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[0].dtype)
        v = _load_line(context, builder, sig.args[0], args[0], args[1], vty)
        _store_line_nt(context, builder, sig.args[2], args[2], args[1], v)
        return context.get_dummy_value()
    return types.void(src, types.intp, dst), codegen


@intrinsic
def _line_add(typingctx, a, b, i, out):
    """``out[i:i+L] = a[i:i+L] + b[i:i+L]``, one line, streamed."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[0].dtype)
        va = _load_line(context, builder, sig.args[0], args[0], args[2], vty)
        vb = _load_line(context, builder, sig.args[1], args[1], args[2], vty)
        _store_line_nt(context, builder, sig.args[3], args[3], args[2], builder.fadd(va, vb))
        return context.get_dummy_value()
    return types.void(a, b, types.intp, out), codegen


def _x86_call(builder, name):
    """Call the argument-less x86 intrinsic ``name``; whether the target is x86."""
    if "x86" not in builder.module.triple and "i686" not in builder.module.triple:
        return False
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), name)
    builder.call(fn, [])
    return True


@intrinsic
def _store_fence(typingctx):
    """Order this thread's streaming stores before whatever it does next (x86 ``sfence``)."""
    def codegen(context, builder, sig, args):
        if not _x86_call(builder, "llvm.x86.sse.sfence"):
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


# Hand-offs between the tasks of a row-split chain (``pipelined_backward``): a flag
# per (channel, part) of int64, 0 free, 1 claimed, 2 sums published.  Numba has no
# atomics on the CPU, so these are LLVM's, with the C++ memory model's orders.

def _flag_pointer(context, builder, sig, args):
    return _item_pointer(context, builder, sig.args[0], args[0], args[1])


@intrinsic
def _claim(typingctx, flags, i):
    """Atomically set ``flags[i]`` from 0 to 1; whether this call did it (acquire-release)."""
    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        res = builder.cmpxchg(_flag_pointer(context, builder, sig, args), i64(0), i64(1),
                              "acq_rel", "acquire")
        return builder.extract_value(res, 1)
    return types.boolean(flags, types.intp), codegen


@intrinsic
def _load_acquire(typingctx, flags, i):
    """``flags[i]``, ordered before every later load of this thread (acquire)."""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_flag_pointer(context, builder, sig, args), "acquire", 8)
    return types.int64(flags, types.intp), codegen


@intrinsic
def _store_release(typingctx, flags, i, value):
    """``flags[i] = value`` after every earlier store of this thread is visible (release)."""
    def codegen(context, builder, sig, args):
        value = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(value, _flag_pointer(context, builder, sig, args), "release", 8)
        return context.get_dummy_value()
    return types.void(flags, types.intp, value), codegen


@intrinsic
def _spin_pause(typingctx):
    """A spin-wait hint (x86 ``pause``; nothing elsewhere)."""
    def codegen(context, builder, sig, args):
        _x86_call(builder, "llvm.x86.sse2.pause")
        return context.get_dummy_value()
    return types.void(), codegen


@kernel()
def _streams(out):
    """Whether ``out`` is written with streaming stores: large, and aligned to its items."""
    return out.size * out.itemsize >= STREAM_MIN_BYTES and out.ctypes.data % out.itemsize == 0


@kernel()
def _stream_span(out, start, stop):
    """``(first, last)``: the whole 64-byte lines of ``out`` in [first, last) get streaming
    stores; none (``(stop, stop)``) when ``out`` is small enough to stay in cache, where
    the caller will read it back soonest, or not aligned to its item size."""
    size = out.itemsize
    addr = out.ctypes.data + start * size
    if not _streams(out):
        return stop, stop
    first = start + min(((LINE_BYTES - addr % LINE_BYTES) % LINE_BYTES) // size, stop - start)
    lanes = LINE_BYTES // size
    last = first + (stop - first) // lanes * lanes
    return first, last


# Column tiles.  Column statistics keep one accumulator per column; with
# accumulators in arrays every value costs a load and a store of each, so for
# narrow rows the hot reductions run on tiles of 32 or 64 columns whose
# accumulators live in vector registers for a whole chunk of rows (8 float64
# lanes per vector, several vectors for independent dependency chains).

TILE_LANES = 8


def _tile_loader(context, builder, aryty, ary, vty):
    """Load ``TILE_LANES`` values of a 2-D array at (r, j) as float64 lanes."""
    arr = context.make_array(aryty)(context, builder, ary)
    elt = context.get_value_type(aryty.dtype)
    src_ty = ir.VectorType(elt, TILE_LANES)

    def load(r, j):
        ptr = cgutils.get_item_pointer(context, builder, aryty, arr, [r, j], wraparound=False,
                                       boundscheck=False)
        v = builder.load(builder.bitcast(ptr, src_ty.as_pointer()),
                         align=aryty.dtype.bitwidth // 8)
        return v if aryty.dtype == types.float64 else builder.fpext(v, vty)
    return load


def _vector_at(context, builder, aryty, ary, j, vty):
    ptr = _item_pointer(context, builder, aryty, ary, j)
    return ptr, builder.bitcast(ptr, vty.as_pointer())


def _tile_columns(context, builder, j, vectors):
    return [builder.add(j, context.get_constant(types.intp, TILE_LANES * k))
            for k in range(vectors)]


def _add_accumulators(context, builder, sig, args, cols, accs, positions, vty):
    """``out[cols] += acc`` for each (accumulators, argument position) pair."""
    for k, c in enumerate(cols):
        for acc, pos in zip(accs, positions):
            _, p = _vector_at(context, builder, sig.args[pos], args[pos], c, vty)
            builder.store(builder.fadd(builder.load(p, align=8), builder.load(acc[k])), p, align=8)


def _tile_sums(context, builder, sig, args, vectors, first_row, column, per_column, step,
               prefetch=None):
    """Two sums per column over rows [args[first_row], args[first_row + 1]) of a tile of
    ``8 * vectors`` columns starting at ``args[column]``, in vector registers.

    ``per_column`` are argument positions of per-column arrays loaded once for the
    tile; ``step(r, k, c, columns)`` returns the two float64-vector terms of row ``r``
    for the tile's vector ``k`` (columns from ``c``).  The sums are added to the last
    two arguments.
    """
    vty = ir.VectorType(ir.DoubleType(), TILE_LANES)
    cols = _tile_columns(context, builder, args[column], vectors)
    loaded = [[builder.load(_vector_at(context, builder, sig.args[p], args[p], c, vty)[1],
                            align=8) for c in cols] for p in per_column]
    zero = ir.Constant(vty, [0.0] * TILE_LANES)
    acc1 = [cgutils.alloca_once_value(builder, zero) for _ in cols]
    acc2 = [cgutils.alloca_once_value(builder, zero) for _ in cols]
    r0, r1 = args[first_row], args[first_row + 1]
    with cgutils.for_range(builder, builder.sub(r1, r0)) as loop:
        r = builder.add(r0, loop.index)
        if prefetch is not None:
            prefetch(r)
        for k, c in enumerate(cols):
            a, b = step(r, k, c, [vecs[k] for vecs in loaded])
            builder.store(builder.fadd(builder.load(acc1[k]), a), acc1[k])
            builder.store(builder.fadd(builder.load(acc2[k]), b), acc2[k])
    n = len(sig.args)
    _add_accumulators(context, builder, sig, args, cols, (acc1, acc2), (n - 2, n - 1), vty)
    return context.get_dummy_value()


def _tile_prefetcher(context, builder, aryty, ary, j, vectors):
    """``prefetch(r)`` for ``_tile_sums``: the tile's lines in the row the row prefetch
    distance further (ROW_PREFETCH_BYTES; a whole-row tile reads rows in memory order)."""
    itemsize = aryty.dtype.bitwidth // 8
    row_bytes = TILE_LANES * vectors * itemsize
    ahead = context.get_constant(types.intp,
                                 max(1, ROW_PREFETCH_BYTES[itemsize // 8] // row_bytes))
    arr = context.make_array(aryty)(context, builder, ary)

    def prefetch(r):
        ptr = cgutils.get_item_pointer(context, builder, aryty, arr, [builder.add(r, ahead), j],
                                       wraparound=False, boundscheck=False)
        for k in range(max(1, row_bytes // LINE_BYTES)):
            _prefetch_address(builder, ptr, k * LINE_BYTES)
    return prefetch


def _make_tile_dev_sums(vectors):
    @intrinsic
    def tile_dev_sums(typingctx, x, w, r0, r1, j, shift, mu, s1, s2):
        """Columns [j, j + 8 * vectors) of ``x`` (rows, W), rows [r0, r1): with
        ``d = (x - shift) - mu`` and the row's weight ``w[r]`` (1 where ``w`` is None),
        add ``sum(w * d)`` to ``s1`` and ``sum(w * d * d)`` to ``s2``."""
        weighted = not isinstance(w, types.NoneType)

        def codegen(context, builder, sig, args):
            vty = ir.VectorType(ir.DoubleType(), TILE_LANES)
            load = _tile_loader(context, builder, sig.args[0], args[0], vty)
            if weighted:
                warr = context.make_array(sig.args[1])(context, builder, args[1])

            def step(r, k, c, columns):
                sh, mu_ = columns
                d = builder.fsub(builder.fsub(load(r, c), sh), mu_)
                if weighted:
                    ptr = cgutils.get_item_pointer(context, builder, sig.args[1], warr, [r],
                                                   wraparound=False, boundscheck=False)
                    wd = builder.fmul(_splat(context, builder, builder.load(ptr), types.float64,
                                             types.float64, vty), d)
                    return wd, builder.fmul(wd, d)
                return d, builder.fmul(d, d)
            return _tile_sums(context, builder, sig, args, vectors, 2, 4, (5, 6), step,
                              _tile_prefetcher(context, builder, sig.args[0], args[0], args[4],
                                               vectors))
        return (types.void(x, w, types.intp, types.intp, types.intp, shift, mu, s1, s2),
                codegen)
    return tile_dev_sums


def _make_tile_grad_sums(vectors):
    @intrinsic
    def tile_grad_sums(typingctx, dy, x, r0, r1, j, mean, s, sx):
        """Columns [j, j + 8 * vectors), rows [r0, r1): add ``sum(dy)`` to ``s`` and
        ``sum(dy * (x - mean))`` to ``sx``."""
        def codegen(context, builder, sig, args):
            vty = ir.VectorType(ir.DoubleType(), TILE_LANES)
            load_g = _tile_loader(context, builder, sig.args[0], args[0], vty)
            load_x = _tile_loader(context, builder, sig.args[1], args[1], vty)

            def step(r, k, c, columns):
                (mean_,) = columns
                g = load_g(r, c)
                return g, builder.fmul(g, builder.fsub(load_x(r, c), mean_))
            return _tile_sums(context, builder, sig, args, vectors, 2, 4, (5,), step)
        return types.void(dy, x, types.intp, types.intp, types.intp, mean, s, sx), codegen
    return tile_grad_sums


# Register tiles pay off when a tile spans a whole row: the rows of a chunk are
# then read in memory order.  A tile narrower than the row walks the chunk with
# a stride, which measured slower than plain row-by-row loops over accumulator
# arrays in L1 (ROW_TILE_MAX_WIDTH): wider rows take those.
ROW_TILE_MAX_WIDTH = 64
_tile_dev_sums_64 = _make_tile_dev_sums(8)
_tile_dev_sums_32 = _make_tile_dev_sums(4)
_tile_grad_sums_64 = _make_tile_grad_sums(8)
_tile_grad_sums_32 = _make_tile_grad_sums(4)


# Pipelined runs.  The fused channel path reduces channel c + 1 while it writes
# channel c: each line of the loop below reads the next channel's run (its
# first read, from memory) and normalizes the current channel's run from cache.
# A core then has memory reads and streaming writes in flight at once, as a
# copy does, instead of a read phase followed by a write phase (measured on the
# 2-core EPYC: 1.2-1.3x the copy for the traffic alone, against 1.4-1.5x for
# read-then-write of a group).  Software prefetches run PREFETCH_BYTES ahead in
# the next channel's stream, across the jump from one row's run to the next.

PREFETCH_BYTES = 4096


def _prefetch_address(builder, ptr, offset=0):
    """Prefetch the line ``offset`` bytes from ``ptr`` for reading, into every cache level."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
    address = builder.gep(builder.bitcast(ptr, i8p), [ir.IntType(64)(offset)])
    # read, keep in all cache levels, data
    builder.call(fn, [address, i32(0), i32(3), i32(1)])


def _prefetch(context, builder, aryty, ary, index):
    _prefetch_address(builder, _item_pointer(context, builder, aryty, ary, index))


@intrinsic
def _prefetch_line(typingctx, xf, i):
    """Prefetch the line holding flat ``xf[i]`` into every cache level (a hint: never
    faults, whatever ``i``)."""
    def codegen(context, builder, sig, args):
        _prefetch(context, builder, sig.args[0], args[0], args[1])
        return context.get_dummy_value()
    return types.void(xf, types.intp), codegen


# Column statistics read rows in memory order and prefetch, while reducing a row, the
# lines this many bytes further (float32, float64).  Wide rows: the loop's stores to its
# L1 accumulators hold back the hardware's own run-ahead (256-wide rows from memory:
# 1.14-1.17x a read pass in float32 and 1.3-1.5x in float64 without, 1.03-1.10x and
# 1.06-1.23x with).  64-wide register tiles: 1.04-1.10x a read without, 1.04-1.06x with
# (float64 0.97x).  Distances measured on the 2-core EPYC (Zen 5).  The backward's
# sums (two streams) came out slower with these prefetches and take none.
ROW_PREFETCH_BYTES = (8192, 4096)


def _fma(builder, a, b, c):
    """``a * b + c`` rounded once, for vectors too (llvmlite's ``fma`` takes scalars only)."""
    vty = a.type
    elt = vty.element if isinstance(vty, ir.VectorType) else vty
    bits = 64 if isinstance(elt, ir.DoubleType) else 32
    suffix = f"v{vty.count}f{bits}" if isinstance(vty, ir.VectorType) else f"f{bits}"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                        f"llvm.fma.{suffix}")
    return builder.call(fn, [a, b, c])


def _add_lane_sums(context, builder, accs, acc_ty, acc):
    """``acc[j] += sum of the lanes of vector accumulator j`` (float64)."""
    for j, a in enumerate(accs):
        vec = builder.load(a)
        # pairwise: log2(lanes) dependent adds, not lanes - 1 (a short run pays this per call)
        width = vec.type.count
        while width > 1:
            width //= 2
            lo_half = builder.shuffle_vector(vec, vec, ir.Constant(
                ir.VectorType(ir.IntType(32), width), list(range(width))))
            hi_half = builder.shuffle_vector(vec, vec, ir.Constant(
                ir.VectorType(ir.IntType(32), width), list(range(width, 2 * width))))
            vec = builder.fadd(lo_half, hi_half)
        total = builder.extract_element(vec, ir.IntType(32)(0))
        ptr = _item_pointer(context, builder, acc_ty, acc, context.get_constant(types.intp, j))
        builder.store(builder.fadd(builder.load(ptr), total), ptr)


def _pipelined_lines(context, builder, sig, args, ninputs, reduce, write):
    """Lines ``k`` of a pipelined run: ``reduce`` the inputs' lines at ``nxt + k`` (float64
    vectors) into two sums for ``k < nreduce``, ``write`` ``out[cur + k]`` from the inputs'
    lines at ``cur + k`` for ``k < nwrite <= nreduce``.

    Arguments: ``inputs..., out, nxt, cur, nreduce, nwrite, pf, wrap, jump, extras...,
    acc``; the line at ``nxt + k`` also prefetches the inputs at ``pf + k`` (plus ``jump``
    once ``k >= wrap``).  The two sums are added to ``acc[0]`` and ``acc[1]`` (float64).
    The reduced lines start at their run's start, whatever the output's alignment (which
    places the written lines), so the sums do not depend on where the output lies.
    """
    tys, vals = sig.args, args
    nxt, cur, nreduce, nwrite, pf, wrap, jump = vals[ninputs + 1:ninputs + 8]
    extras = list(range(ninputs + 8, len(vals) - 1))
    vty = _line_type(context, tys[0].dtype)
    lanes = vty.count
    dvty = ir.VectorType(ir.DoubleType(), lanes)
    intp = context.get_value_type(types.intp)
    zero = ir.Constant(dvty, [0.0] * lanes)
    accs = [cgutils.alloca_once_value(builder, zero) for _ in range(2)]
    with cgutils.for_range(builder, nreduce) as loop:
        k = builder.mul(loop.index, intp(lanes))
        ahead = builder.add(builder.add(pf, k),
                            builder.select(builder.icmp_signed("<", k, wrap), intp(0), jump))
        ahead_lines = []
        for n in range(ninputs):
            _prefetch(context, builder, tys[n], vals[n], ahead)
            ahead_lines.append(_load_f64_line(context, builder, tys[n], vals[n],
                                              builder.add(nxt, k), vty))
        for acc, term in zip(accs, reduce(ahead_lines, extras)):
            builder.store(builder.fadd(builder.load(acc), term), acc)
        with builder.if_then(builder.icmp_signed("<", loop.index, nwrite), likely=True):
            i = builder.add(cur, k)
            lines = [_load_line(context, builder, tys[n], vals[n], i, vty)
                     for n in range(ninputs)]
            _store_line_nt(context, builder, tys[ninputs], vals[ninputs], i,
                           write(lines, extras))
    _add_lane_sums(context, builder, accs, tys[-1], vals[-1])
    return context.get_dummy_value()


_PIPE_GEOMETRY = (types.intp,) * 7  # nxt, cur, nreduce, nwrite, pf, wrap, jump


@intrinsic
def _pipe_dev_sums_affine(typingctx, x, y, nxt, cur, nreduce, nwrite, pf, wrap, jump, center,
                          hi, lo, scale, shift, acc):
    """Pipelined forward run: ``d = x[nxt + k] - center`` adds ``sum(d)``, ``sum(d*d)``
    to ``acc``; ``y[cur + k] = ((x[cur + k] - hi) - lo) * scale + shift``, streamed."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[0].dtype)
        dvty = ir.VectorType(ir.DoubleType(), vty.count)

        def reduce(lines, extras):
            d = builder.fsub(lines[0], _splat(context, builder, args[extras[0]], types.float64,
                                              types.float64, dvty))
            return d, builder.fmul(d, d)

        def write(lines, extras):
            params = [_splat(context, builder, args[e], sig.args[e], sig.args[0].dtype, vty)
                      for e in extras[1:]]
            return _affine_expr(builder, lines[0], *params)
        return _pipelined_lines(context, builder, sig, args, 1, reduce, write)
    sig = types.void(x, y, *_PIPE_GEOMETRY, types.float64, hi, lo, scale, shift, acc)
    return sig, codegen


@intrinsic
def _pipe_grad_sums_dx(typingctx, dy, x, dx, nxt, cur, nreduce, nwrite, pf, wrap, jump, mean,
                       hi, lo, a, b, k, acc):
    """Pipelined backward run: adds ``sum(dy)`` and ``sum(dy * (x - mean))`` over the lines
    at ``nxt`` to ``acc``; ``dx[cur + k] = ((dy - b) - ((x - hi) - lo) * k) * a``, streamed."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[1].dtype)
        dvty = ir.VectorType(ir.DoubleType(), vty.count)

        def reduce(lines, extras):
            m = _splat(context, builder, args[extras[0]], types.float64, types.float64, dvty)
            return lines[0], builder.fmul(lines[0], builder.fsub(lines[1], m))

        def write(lines, extras):
            params = [_splat(context, builder, args[e], sig.args[e], sig.args[1].dtype, vty)
                      for e in extras[1:]]
            return _dx_expr(builder, lines[0], lines[1], *params)
        return _pipelined_lines(context, builder, sig, args, 2, reduce, write)
    sig = types.void(dy, x, dx, *_PIPE_GEOMETRY, types.float64, hi, lo, a, b, k, acc)
    return sig, codegen


@intrinsic
def _pipe_sum_copy(typingctx, x, y, nxt, cur, nreduce, nwrite, pf, wrap, jump, acc):
    """The pipelined forward's traffic alone: sum the lines at ``nxt``, copy those at ``cur``."""
    def codegen(context, builder, sig, args):
        return _pipelined_lines(context, builder, sig, args, 1,
                                lambda lines, extras: (lines[0], lines[0]),
                                lambda lines, extras: lines[0])
    return types.void(x, y, *_PIPE_GEOMETRY, acc), codegen


@intrinsic
def _pipe_sum2_add(typingctx, a, b, out, nxt, cur, nreduce, nwrite, pf, wrap, jump, acc):
    """The pipelined backward's traffic alone: sum two inputs at ``nxt``, add them at ``cur``."""
    def codegen(context, builder, sig, args):
        return _pipelined_lines(context, builder, sig, args, 2,
                                lambda lines, extras: (lines[0], lines[1]),
                                lambda lines, extras: builder.fadd(lines[0], lines[1]))
    return types.void(a, b, out, *_PIPE_GEOMETRY, acc), codegen


STRIDED_CHAINS = 4


def _strided_sums(context, builder, lanes, start, nruns, stride, nlines, terms, acc_ty, acc,
                  write=None):
    """Runs ``r < nruns`` at flat ``start + r * stride``, their first ``nlines`` whole
    lines: ``terms(i)`` gives float64 vectors ``(a, b, c)`` for the line at flat ``i``,
    and ``sum(a)``, ``sum(b * c)`` are added to ``acc[0]``, ``acc[1]``; ``write(offset)``,
    if given, runs for each line at ``offset = r * stride + k * lanes`` from the runs'
    start.  The sums stay in vector registers across runs, so a short run costs no
    horizontal reduction (a channel of 8x8 images is 64-value runs)."""
    dvty = ir.VectorType(ir.DoubleType(), lanes)
    intp = context.get_value_type(types.intp)
    zero = ir.Constant(dvty, [0.0] * lanes)
    # STRIDED_CHAINS independent pairs of sums (line k of a run into pair k % chains):
    # with one pair every line would wait for the previous line's adds.
    pairs = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)]
             for _ in range(STRIDED_CHAINS)]

    def line(offset, sums):
        a, b, c = terms(builder.add(start, offset))
        builder.store(builder.fadd(builder.load(sums[0]), a), sums[0])
        builder.store(_fma(builder, b, c, builder.load(sums[1])), sums[1])
        if write is not None:
            write(offset)

    step = intp(STRIDED_CHAINS * lanes)
    nblocks = builder.udiv(nlines, intp(STRIDED_CHAINS))
    rest = builder.sub(nlines, builder.mul(nblocks, intp(STRIDED_CHAINS)))
    with cgutils.for_range(builder, nruns) as runs:
        base = builder.mul(runs.index, stride)
        with cgutils.for_range(builder, nblocks) as block:
            i = builder.add(base, builder.mul(block.index, step))
            for k, sums in enumerate(pairs):
                line(builder.add(i, intp(k * lanes)), sums)
        tail = builder.add(base, builder.mul(nblocks, step))
        with cgutils.for_range(builder, rest) as k:
            line(builder.add(tail, builder.mul(k.index, intp(lanes))), pairs[0])
    accs = pairs[0]
    for sums in pairs[1:]:
        for a, b in zip(accs, sums):
            builder.store(builder.fadd(builder.load(a), builder.load(b)), a)
    _add_lane_sums(context, builder, accs, acc_ty, acc)


def _load_f64_line(context, builder, aryty, ary, index, vty):
    v = _load_line(context, builder, aryty, ary, index, vty)
    dvty = ir.VectorType(ir.DoubleType(), vty.count)
    return v if aryty.dtype == types.float64 else builder.fpext(v, dvty)


def _strided_lines(context, builder, xty, x, start, nruns, stride, nlines, center, acc_ty, acc,
                   write=None):
    """``_strided_sums`` of ``d = x - center``: ``sum(d)`` and ``sum(d*d)``."""
    vty = _line_type(context, xty.dtype)
    dvty = ir.VectorType(ir.DoubleType(), vty.count)
    c = _splat(context, builder, center, types.float64, types.float64, dvty)

    def terms(i):
        d = builder.fsub(_load_f64_line(context, builder, xty, x, i, vty), c)
        return d, d, d
    _strided_sums(context, builder, vty.count, start, nruns, stride, nlines, terms, acc_ty, acc,
                  write)


@intrinsic
def _strided_grad_sums(typingctx, gf, xf, start, nruns, stride, nlines, mean, acc):
    """Runs of flat ``gf`` (dy) and ``xf`` as in ``_strided_dev_sums``: ``sum(dy)`` and
    ``sum(dy * (x - mean))`` of their whole lines into ``acc``."""
    def codegen(context, builder, sig, args):
        gty, xty = sig.args[0], sig.args[1]
        vty = _line_type(context, xty.dtype)
        dvty = ir.VectorType(ir.DoubleType(), vty.count)
        m = _splat(context, builder, args[6], types.float64, types.float64, dvty)

        def terms(i):
            g = _load_f64_line(context, builder, gty, args[0], i, vty)
            return g, g, builder.fsub(_load_f64_line(context, builder, xty, args[1], i, vty), m)
        _strided_sums(context, builder, vty.count, *args[2:6], terms, sig.args[7], args[7])
        return context.get_dummy_value()
    return types.void(gf, xf, *_STRIDES, types.float64, acc), codegen


_STRIDES = (types.intp,) * 4  # start, nruns, stride, nlines


@intrinsic
def _strided_dev_sums(typingctx, xf, start, nruns, stride, nlines, center, acc):
    """``_strided_lines``: deviation sums of the runs' whole lines into ``acc``."""
    def codegen(context, builder, sig, args):
        _strided_lines(context, builder, sig.args[0], *args[:6], sig.args[6], args[6])
        return context.get_dummy_value()
    return types.void(xf, *_STRIDES, types.float64, acc), codegen


@intrinsic
def _strided_dev_sums_affine(typingctx, xf, start, nruns, stride, nlines, center, yf, wstart,
                             hi, lo, scale, shift, acc):
    """``_strided_dev_sums`` of the runs at ``start`` while the runs at ``wstart`` (same
    geometry) are normalized into ``yf`` with ordinary stores: the statistics of one channel
    and the output of the previous one in a single loop.  Both come from L2 for a batch that
    stays in cache; the reduction's float64 arithmetic then hides the write's traffic."""
    def codegen(context, builder, sig, args):
        xty, yty = sig.args[0], sig.args[6]
        vty = _line_type(context, xty.dtype)
        params = [_splat(context, builder, args[n], sig.args[n], xty.dtype, vty)
                  for n in range(8, 12)]
        cached = ir.Constant(ir.IntType(1), 0)

        def write(offset):
            i = builder.add(args[7], offset)
            v = _load_line(context, builder, xty, args[0], i, vty)
            _store_line(context, builder, yty, args[6], i, _affine_expr(builder, v, *params), cached)

        _strided_lines(context, builder, xty, *args[:6], sig.args[12], args[12], write)
        return context.get_dummy_value()
    return types.void(xf, *_STRIDES, types.float64, yf, types.intp, hi, lo, scale, shift,
                      acc), codegen


@kernel()
def _affine_stream(xf, yf, start, stop, hi, lo, scale, shift):
    """``yf[start:stop] = ((xf - hi) - lo) * scale + shift`` with streaming stores."""
    first, last = _stream_span(yf, start, stop)
    for i in range(np.uint64(start), np.uint64(first)):
        yf[i] = ((xf[i] - hi) - lo) * scale + shift
    for i in range(first, last, LINE_BYTES // yf.itemsize):
        _line_affine(xf, i, yf, hi, lo, scale, shift, True)
    for i in range(np.uint64(last), np.uint64(stop)):
        yf[i] = ((xf[i] - hi) - lo) * scale + shift


@kernel()
def _dx_stream(dyf, xf, outf, start, stop, hi, lo, a, b, k):
    """``outf[start:stop] = ((dy - b) - ((x - hi) - lo) * k) * a`` with streaming stores."""
    first, last = _stream_span(outf, start, stop)
    for i in range(np.uint64(start), np.uint64(first)):
        outf[i] = ((dyf[i] - b) - ((xf[i] - hi) - lo) * k) * a
    for i in range(first, last, LINE_BYTES // outf.itemsize):
        _line_dx(dyf, xf, i, outf, hi, lo, a, b, k, True)
    for i in range(np.uint64(last), np.uint64(stop)):
        outf[i] = ((dyf[i] - b) - ((xf[i] - hi) - lo) * k) * a


@kernel()
def _line_stores(out):
    """How ``out`` is written: 2 streamed lines, 1 cached lines (an item-aligned output
    below STREAM_MIN_BYTES), 0 scalar stores (runs shorter than a line, or misaligned)."""
    if _streams(out):
        return 2
    return 1 if out.ctypes.data % out.itemsize == 0 else 0


# Each helper covers x[o0:o1, c, i0:i1], runs of several rows in one call.
@kernel(fastmath=REDUCE_MATH)
def _run_sum(x, o0, o1, c, i0, i1, shift):
    s = 0.0
    for o in range(o0, o1):
        for i in range(np.uint64(i0), np.uint64(i1)):
            s += np.float64(x[o, c, i]) - shift
    return s


@kernel(fastmath=REDUCE_MATH)
def _run_sqdev(x, o0, o1, c, i0, i1, center):
    q = 0.0
    for o in range(o0, o1):
        for i in range(np.uint64(i0), np.uint64(i1)):
            d = np.float64(x[o, c, i]) - center
            q += d * d
    return q


@kernel(fastmath=REDUCE_MATH)
def _run_dev_sums(x, o0, o1, c, i0, i1, center):
    s1 = 0.0
    s2 = 0.0
    for o in range(o0, o1):
        for i in range(np.uint64(i0), np.uint64(i1)):
            d = np.float64(x[o, c, i]) - center
            s1 += d
            s2 += d * d
    return s1, s2


@kernel()
def _accumulate(x, o0, o1, i0, i1, c, shift, j, n, mean_rel, m2):
    """Merge the moments of ``x[o0:o1, c, i0:i1]`` (one piece) into accumulator ``j``.

    Means are relative to ``shift``.  A channel's first piece is exact two-pass.
    Every later piece takes its deviations about the channel's running mean
    ``center`` in one pass: ``s1 = sum(x - center)``, ``s2 = sum((x - center)^2)``,
    piece mean ``center + s1/m`` and piece M2 ``s2 - s1^2/m``.  This is the
    corrected two-pass algorithm with the first pass replaced by the running
    mean, not ``E[x^2] - E[x]^2``: ``s1^2/m <= s2``, and the rounding error of
    ``s2`` is eps times ``M2_piece + m (piece mean - center)^2``, both of which
    the channel's total M2 contains (Chan's merge adds the second), so the
    error relative to the final variance stays O(eps) whatever the offset.
    """
    m = float((o1 - o0) * (i1 - i0))
    if n[j] == 0.0:
        mk = _run_sum(x, o0, o1, c, i0, i1, shift) / m
        n[j] = m
        mean_rel[j] = mk
        m2[j] = _run_sqdev(x, o0, o1, c, i0, i1, shift + mk)
    else:
        s1, s2 = _run_dev_sums(x, o0, o1, c, i0, i1, shift + mean_rel[j])
        _merge_piece(s1, s2, m, j, n, mean_rel, m2)


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
def _accumulate_rows(x, o0, o1, c0, c1, shift, n, mean_rel, m2):
    """Moments of channels [c0, c1) over rows [o0, o1), in L1-sized pieces, into fresh
    (zero) accumulators.

    Long runs are cut into pieces of at most CHUNK values, a channel's first piece
    exact two-pass.  Short runs are batched, several rows to a piece, so that merges
    stay rare; each piece takes deviations about the channel's running mean, which
    starts as the mean of its first run (``_first_run_mean``).  The first piece then
    has the error bound of every later one (see ``_accumulate``) for one extra pass over
    a single run, not two.
    """
    inner = x.shape[2]
    if inner >= CHUNK:
        for o in range(o0, o1):
            for c in range(c0, c1):
                for i0 in range(0, inner, CHUNK):
                    _accumulate(x, o, o + 1, i0, min(i0 + CHUNK, inner), c, shift[c], c - c0,
                                n, mean_rel, m2)
    elif o1 > o0:
        # Channel by channel over a batch of rows, sums in registers across runs.  The
        # same operations per channel as _short_runs_moments, in batch-major order.
        xf = x.reshape(x.size)
        acc = np.empty(2)
        for c in range(c0, c1):
            mean_rel[c - c0] = _first_run_mean(x, xf, o0, c, shift, acc)
        rows = _batch_rows(inner)
        for b0 in range(o0, o1, rows):
            b1 = min(b0 + rows, o1)
            m = float((b1 - b0) * inner)
            for c in range(c0, c1):
                a1, a2 = _runs_dev_sums(x, xf, b0, b1, c, shift[c] + mean_rel[c - c0], acc)
                _merge_piece(a1, a2, m, c - c0, n, mean_rel, m2)


@kernel(inline="always")
def _batch_rows(inner):
    """Rows per piece of a channel of short runs: about CHUNK values."""
    return max(1, CHUNK // inner)


@kernel(inline="always")
def _first_run_mean(x, xf, o, c, shift, acc):
    """Mean of the run ``x[o, c, :]`` relative to ``shift[c]``: the first centre of a
    channel of short runs."""
    return _runs_dev_sums(x, xf, o, o + 1, c, shift[c], acc)[0] / x.shape[2]


@kernel()
def _short_runs_moments(x, xf, yf, o0, o1, c, shift, w, params, acc):
    """``(count, mean relative to shift[c], M2)`` of channel ``c`` of short runs over rows
    [o0, o1), exactly as ``_accumulate_rows`` computes them; where ``w >= 0`` channel ``w``
    is normalized into ``yf`` (an output that stays in cache) with row ``w`` of ``params``
    over the same rows, in the same loop (``_strided_dev_sums_affine``)."""
    channels, inner = x.shape[1], x.shape[2]
    lanes = LINE_BYTES // x.itemsize
    nlines = inner // lanes
    whole = nlines * lanes
    stride = channels * inner
    n, mu, q = 0.0, _first_run_mean(x, xf, o0, c, shift, acc), 0.0
    rows = _batch_rows(inner)
    for b0 in range(o0, o1, rows):
        b1 = min(b0 + rows, o1)
        center = shift[c] + mu
        acc[0] = 0.0
        acc[1] = 0.0
        start = (b0 * channels + c) * inner
        if w >= 0:
            hi, lo, scale, shift_w = params[w, 0], params[w, 1], params[w, 2], params[w, 3]
            _strided_dev_sums_affine(xf, start, b1 - b0, stride, nlines, center, yf,
                                     (b0 * channels + w) * inner, hi, lo, scale, shift_w, acc)
            for o in range(b0, b1):
                t = (o * channels + w) * inner
                for i in range(np.uint64(t + whole), np.uint64(t + inner)):
                    yf[i] = ((xf[i] - hi) - lo) * scale + shift_w
        else:
            _strided_dev_sums(xf, start, b1 - b0, stride, nlines, center, acc)
        a1, a2 = acc[0], acc[1]
        if whole < inner:
            t1, t2 = _run_dev_sums(x, b0, b1, c, whole, inner, center)
            a1 += t1
            a2 += t2
        m = float((b1 - b0) * inner)
        mu, q = _merged(n, mu, q, a1, a2, m)
        n += m
    return n, mu, q


@kernel()
def _short_runs_forward(x, c0, c1, shift, weight, bias, eps, y, mean, var, invstd, params):
    """Training forward of channels [c0, c1) of short runs into ``y`` that stays in cache:
    the statistics of channel c + 1 and the output of channel c in one loop."""
    outer = x.shape[0]
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    acc = np.empty(2)
    n, mu, q = _short_runs_moments(x, xf, yf, 0, outer, c0, shift, -1, params, acc)
    for c in range(c0, c1):
        _finish_channel(c, n, mu, q, shift, weight, bias, eps, mean, var, invstd, params)
        if c + 1 < c1:
            n, mu, q = _short_runs_moments(x, xf, yf, 0, outer, c + 1, shift, c, params, acc)
        else:
            _affine_runs(x, 0, outer, c, c + 1, params, y)


# The fused short-run forward pays off for float32 runs of at least this many bytes.
# Measured on the 2-core EPYC (32 channels per thread, A/B in one process): 0.3-2 us
# faster for runs of 128-512 values, but with runs of 4 lines it stalls whenever the
# output lies within a few hundred bytes of x modulo 4 KiB (the usual placement of two
# arrays of one size: NumPy puts both 16 bytes past a page boundary), and the row
# stride is a multiple of 4 KiB: a store that straddles into the next channel's first
# line aliases the next row's loads (16.5 vs 12 us for (32, 64, 64)).  float64 runs
# need no conversion for their statistics, and the fused loop measured 0.3-4 us slower.
FUSE_MIN_RUN_BYTES = 512


@kernel()
def _fuses_short_runs(x, y):
    """Whether the forward takes ``_short_runs_forward``: float32 runs of at least
    FUSE_MIN_RUN_BYTES but below CHUNK values, ``y`` written with ordinary vector stores
    (it stays in cache)."""
    inner = x.shape[2]
    return (x.itemsize == 4 and FUSE_MIN_RUN_BYTES <= inner * x.itemsize and inner < CHUNK
            and _line_stores(y) == 1)


@kernel(inline="always")
def _runs_dev_sums(x, xf, o0, o1, c, center, acc):
    """``sum(x - center)`` and ``sum((x - center)^2)`` over the runs ``x[o0:o1, c, :]``
    (``xf`` its flat view, ``acc`` scratch of 2): whole lines in vector registers, then
    the runs' scalar tails."""
    channels, inner = x.shape[1], x.shape[2]
    lanes = LINE_BYTES // x.itemsize
    whole = inner // lanes * lanes
    acc[0] = 0.0
    acc[1] = 0.0
    _strided_dev_sums(xf, (o0 * channels + c) * inner, o1 - o0, channels * inner,
                      inner // lanes, center, acc)
    a1, a2 = acc[0], acc[1]
    if whole < inner:
        t1, t2 = _run_dev_sums(x, o0, o1, c, whole, inner, center)
        a1 += t1
        a2 += t2
    return a1, a2


@kernel()
def _affine_runs(x, o0, o1, c0, c1, params, y):
    """Normalize the runs ``x[o, c, :]`` for o in [o0, o1), c in [c0, c1), row by row.

    Within a row the runs of neighbouring channels are adjacent, so reads and
    writes stream (channel by channel, runs ``C * inner`` apart alias in L1).
    The flat views are made once here, not per run: for short runs their set-up
    would cost more than the run.  Whole lines are written with streaming stores,
    or, for an output that stays in cache, ordinary vector stores (``_line_stores``).
    """
    outer, channels, inner = x.shape
    stores = _line_stores(y)
    if stores == 0 or inner < LINE_BYTES // y.itemsize:
        for o in range(o0, o1):
            for c in range(c0, c1):
                hi, lo, scale, shift = params[c, 0], params[c, 1], params[c, 2], params[c, 3]
                for i in range(np.uint64(0), np.uint64(inner)):
                    y[o, c, i] = ((x[o, c, i] - hi) - lo) * scale + shift
        return
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    lanes = LINE_BYTES // y.itemsize
    whole = inner // lanes * lanes
    for o in range(o0, o1):
        for c in range(c0, c1):
            start = (o * channels + c) * inner
            hi, lo, scale, shift = params[c, 0], params[c, 1], params[c, 2], params[c, 3]
            if stores == 2:
                _affine_stream(xf, yf, start, start + inner, hi, lo, scale, shift)
                continue
            # cached: whole lines from the run's start (inlined: a call per short run costs
            # as much as its lines), then a scalar tail
            for i in range(start, start + whole, lanes):
                _line_affine(xf, i, yf, hi, lo, scale, shift, False)
            for i in range(np.uint64(start + whole), np.uint64(start + inner)):
                yf[i] = ((xf[i] - hi) - lo) * scale + shift


@kernel()
def _first_values(x):
    """Each channel's first value of ``x`` (outer, C, inner), float64: the statistics' shift."""
    shift = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        shift[c] = x[0, c, 0]
    return shift


@kernel(parallel=True)
def channel_moments(x, shift, group, nparts, count, mean_rel, m2):
    """Per-(channel, part) count, mean relative to ``shift[c]`` and M2, arrays (C, nparts).

    One task per (group of channels, part of the ``outer`` axis): within a
    task, the runs of ``group`` neighbouring channels are contiguous in memory,
    so the hardware prefetchers see long streams instead of short hops.
    """
    outer, channels, inner = x.shape
    ngroups = -(-channels // group)
    for t in prange(ngroups * nparts):
        g = t // nparts
        part = t - g * nparts
        c0 = g * group
        c1 = min(c0 + group, channels)
        n = np.zeros(c1 - c0)
        mu = np.zeros(c1 - c0)
        q = np.zeros(c1 - c0)
        _accumulate_rows(x, part * outer // nparts, (part + 1) * outer // nparts, c0, c1,
                         shift, n, mu, q)
        for c in range(c0, c1):
            count[c, part] = n[c - c0]
            mean_rel[c, part] = mu[c - c0]
            m2[c, part] = q[c - c0]


@kernel(inline="always")
def _channel_stats(c, n, mu, q, shift, eps, mean, var, invstd):
    """Channel ``c``'s ``mean``, biased ``var`` and ``invstd`` from its count, mean relative
    to ``shift[c]`` and M2; returns ``(hi, lo, invstd)``, the mean as an unevaluated sum."""
    v = q / n
    inv = _invstd(v, eps)
    hi, lo = _two_sum(shift[c], mu)
    mean[c] = hi
    var[c] = v
    invstd[c] = inv
    return hi, lo, inv


@kernel(inline="always")
def _finish_channel(c, n, mu, q, shift, weight, bias, eps, mean, var, invstd, params):
    """``_channel_stats`` and channel ``c``'s affine parameters ``(hi, lo, scale, shift)``
    (row ``c`` of ``params``)."""
    hi, lo, inv = _channel_stats(c, n, mu, q, shift, eps, mean, var, invstd)
    params[c, 0] = hi
    params[c, 1] = (hi - np.float64(params[c, 0])) + lo
    params[c, 2] = inv * weight[c]
    params[c, 3] = bias[c]


@kernel(parallel=True)
def channel_forward(x, group, weight, bias, eps, y, mean, var, invstd):
    """Training forward, fused: each group of channels is reduced, then normalized from cache.

    Writes ``y`` and the float64 ``mean``, biased ``var`` and ``invstd`` per channel.
    """
    outer, channels, inner = x.shape
    shift = _first_values(x)
    ngroups = -(-channels // group)
    params = np.empty((channels, 4), x.dtype)
    fused = _fuses_short_runs(x, y)
    for g in prange(ngroups):
        c0 = g * group
        c1 = min(c0 + group, channels)
        if fused:
            _short_runs_forward(x, c0, c1, shift, weight, bias, eps, y, mean, var, invstd,
                                params)
        else:
            n = np.zeros(c1 - c0)
            mu = np.zeros(c1 - c0)
            q = np.zeros(c1 - c0)
            _accumulate_rows(x, 0, outer, c0, c1, shift, n, mu, q)
            for c in range(c0, c1):
                _finish_channel(c, n[c - c0], mu[c - c0], q[c - c0], shift, weight, bias, eps,
                                mean, var, invstd, params)
            _affine_runs(x, 0, outer, c0, c1, params, y)
            _store_fence()


@kernel()
def _affine_scalar(xf, yf, start, stop, channels, inner, params):
    for i in range(start, stop):
        c = (i // inner) % channels
        yf[i] = ((xf[i] - params[c, 0]) - params[c, 1]) * params[c, 2] + params[c, 3]


@kernel()
def _affine_span(xf, yf, start, stop, channels, inner, params):
    """Flat ``[start, stop)`` of the (outer, C, inner) runs, normalized as one stream of
    whole lines: a run's parameters switch within a line where two runs share it (runs
    of ``inner >= lanes`` values), so no line is written twice and every run boundary
    costs a compare, not a call with a scalar head and tail."""
    first, last = _stream_span(yf, start, stop)
    _affine_scalar(xf, yf, start, first, channels, inner, params)
    lanes = LINE_BYTES // yf.itemsize
    t = first // inner
    c = t % channels
    run_end = (t + 1) * inner
    i = first
    while i < last:
        hi, lo, scale, shift = params[c, 0], params[c, 1], params[c, 2], params[c, 3]
        whole = i + (min(run_end, last) - i) // lanes * lanes
        for k in range(i, whole, lanes):
            _line_affine(xf, k, yf, hi, lo, scale, shift, True)
        i = whole
        n = c + 1 if c + 1 < channels else 0
        if i < run_end and i < last:
            _line_affine_split(xf, i, yf, run_end - i, hi, lo, scale, shift, params[n, 0],
                               params[n, 1], params[n, 2], params[n, 3])
            i += lanes
        c = n
        run_end += inner
    _affine_scalar(xf, yf, max(first, last), stop, channels, inner, params)


@kernel(parallel=True)
def affine_channels(x, params, nblocks, y):
    """``y = ((x - hi) - lo) * scale + shift`` per channel, ``params`` of shape (C, 4).

    ``nblocks`` tasks, each a contiguous range of the (outer, C) runs.
    """
    outer, channels, inner = x.shape
    if _streams(y) and inner >= LINE_BYTES // y.itemsize:
        xf = x.reshape(x.size)
        yf = y.reshape(y.size)
        for blk in prange(nblocks):
            _affine_span(xf, yf, blk * x.size // nblocks, (blk + 1) * x.size // nblocks,
                         channels, inner, params)
            _store_fence()
        return
    for blk in prange(nblocks):
        o0, c0, c1, r0, r1, o1, c2 = _block_runs(blk, nblocks, outer, channels)
        _affine_runs(x, o0, o0 + 1, c0, c1, params, y)
        _affine_runs(x, r0, r1, 0, channels, params, y)
        _affine_runs(x, o1, o1 + 1, 0, c2, params, y)
        _store_fence()


@kernel(inline="always")
def _block_runs(blk, nblocks, outer, channels):
    """Task ``blk``'s contiguous share of the (outer, C) runs as three pieces, any of them
    empty: ``(o0, c0, c1)`` channels [c0, c1) of row o0, ``(r0, r1)`` whole rows [r0, r1),
    ``(o1, c2)`` channels [0, c2) of row o1."""
    runs = outer * channels
    t0 = blk * runs // nblocks
    t1 = (blk + 1) * runs // nblocks
    o0 = t0 // channels
    o1 = t1 // channels
    if o0 == o1:
        return o0, t0 - o0 * channels, t1 - o0 * channels, o0 + 1, o0 + 1, o1, 0
    return o0, t0 - o0 * channels, channels, o0 + 1, o1, o1, t1 - o1 * channels


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


@kernel()
def _merge_chunk(s1, s2, m, n, mu, q):
    """Merge a chunk of ``m`` rows (deviation sums about ``mu``) into ``n`` rows' ``mu``, ``q``."""
    for j in range(s1.shape[0]):
        mu[j], q[j] = _merged(n, mu[j], q[j], s1[j], s2[j], m)


@kernel()
def _column_partials(x, w, r0, r1, shift, chunk_rows, mu, q):
    """Moments of rows [r0, r1) of ``x`` (rows, W) per column into ``mu``, ``q``, each row
    weighted by ``w`` (or 1 where ``w`` is None); returns the count (weight sum).

    Chunks of ``chunk_rows`` rows stay in cache; the first chunk with weight is
    exact two-pass, later ones take deviations about each column's running mean
    (see ``_accumulate``).  Every loop runs over contiguous columns.
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
        if n == 0.0:
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
                   invstd):
    """Statistics over rows of ``x`` (rows, C * inner), then (``normalize``) ``y``, in one call.

    Three phases: per-block column moments in parallel, a serial fold to
    channels (count, mean, var, invstd into the float64 outputs), and a
    parallel affine pass over rows.
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
        for blk in prange(nblocks):
            _affine_rows(x, blk * rows // nblocks, (blk + 1) * rows // nblocks, params, y)
            _store_fence()


@kernel()
def _affine_rows(x, r0, r1, params, y):
    """Rows [r0, r1) of the column path, streamed as one span of lines.

    ``params`` (4, W + lanes) holds each column's (hi, lo, scale, shift) and,
    after column W - 1, the first ``lanes`` columns again: a line that starts at
    column j reads parameters j .. j + lanes - 1 even when it wraps into the
    next row.  Small outputs (kept in cache) and rows narrower than a line use
    ordinary stores, row by row.
    """
    width = x.shape[1]
    lanes = LINE_BYTES // y.itemsize
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    start = r0 * width
    stop = r1 * width
    first, last = _stream_span(yf, start, stop)
    if width < lanes or first == stop:
        for r in range(r0, r1):
            for j in range(np.uint64(0), np.uint64(width)):
                y[r, j] = ((x[r, j] - params[0, j]) - params[1, j]) * params[2, j] + params[3, j]
        return
    for i in range(start, first):
        j = (i - start) % width
        yf[i] = ((xf[i] - params[0, j]) - params[1, j]) * params[2, j] + params[3, j]
    j = (first - start) % width if width > 0 else 0
    for i in range(first, last, lanes):
        _line_affine_cols(xf, i, yf, params, j)
        j += lanes
        if j >= width:
            j -= width
    for i in range(last, stop):
        j = (i - start) % width
        yf[i] = ((xf[i] - params[0, j]) - params[1, j]) * params[2, j] + params[3, j]


@kernel(parallel=True)
def affine_columns(x, params, inner, nblocks, y):
    """``y = ((x - hi) - lo) * scale + shift`` per channel, ``params`` of shape (C, 4),
    over rows of ``x`` (rows, C * inner), in ``nblocks`` tasks of contiguous rows."""
    rows, width = x.shape
    lanes = LINE_BYTES // x.itemsize
    cols = np.zeros((4, width + lanes), x.dtype)
    for j in range(width):
        for k in range(4):
            cols[k, j] = params[j // inner, k]
    _wrap_columns(cols, width, lanes)
    for blk in prange(nblocks):
        _affine_rows(x, blk * rows // nblocks, (blk + 1) * rows // nblocks, cols, y)
        _store_fence()


@kernel(fastmath=REDUCE_MATH)
def _run_grad_sums(dy, x, o0, o1, c, i0, i1, mean):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` over ``[o0:o1, c, i0:i1]`` (as
    ``_run_dev_sums``)."""
    s = 0.0
    sx = 0.0
    for o in range(o0, o1):
        for i in range(np.uint64(i0), np.uint64(i1)):
            g = np.float64(dy[o, c, i])
            s += g
            sx += g * (np.float64(x[o, c, i]) - mean)
    return s, sx


@kernel()
def _rows_grad_sums(dy, x, o0, o1, c0, c1, mean, s, sx):
    """``s[c - c0] += sum(dy)``, ``sx[c - c0] += sum(dy * (x - mean[c]))`` over the runs
    [o0, o1) x [c0, c1).  Short runs go channel by channel over batches of rows, their
    sums in vector registers across runs (``_strided_grad_sums``; a per-run reduction
    cost more than the run's lines); long runs one by one."""
    channels, inner = x.shape[1], x.shape[2]
    if inner >= CHUNK:
        for o in range(o0, o1):
            for c in range(c0, c1):
                a, b = _run_grad_sums(dy, x, o, o + 1, c, 0, inner, mean[c])
                s[c - c0] += a
                sx[c - c0] += b
        return
    gf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    lanes = LINE_BYTES // x.itemsize
    whole = inner // lanes * lanes
    acc = np.empty(2)
    rows = _batch_rows(inner)
    for b0 in range(o0, o1, rows):
        b1 = min(b0 + rows, o1)
        for c in range(c0, c1):
            acc[0] = 0.0
            acc[1] = 0.0
            _strided_grad_sums(gf, xf, (b0 * channels + c) * inner, b1 - b0, channels * inner,
                               inner // lanes, mean[c], acc)
            a, b = acc[0], acc[1]
            if whole < inner:
                t1, t2 = _run_grad_sums(dy, x, b0, b1, c, whole, inner, mean[c])
                a += t1
                b += t2
            s[c - c0] += a
            sx[c - c0] += b


@kernel()
def _dx_runs(dy, x, o0, o1, c0, c1, params, dx):
    """Training-mode ``dx`` of the runs [o0, o1) x [c0, c1), row by row (see ``_affine_runs``)."""
    outer, channels, inner = x.shape
    stores = _line_stores(dx)
    if stores == 0 or inner < LINE_BYTES // dx.itemsize:
        for o in range(o0, o1):
            for c in range(c0, c1):
                hi, lo, a, b, k = params[c, 0], params[c, 1], params[c, 2], params[c, 3], params[c, 4]
                for i in range(np.uint64(0), np.uint64(inner)):
                    dx[o, c, i] = ((dy[o, c, i] - b) - ((x[o, c, i] - hi) - lo) * k) * a
        return
    gf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    df = dx.reshape(dx.size)
    lanes = LINE_BYTES // dx.itemsize
    whole = inner // lanes * lanes
    for o in range(o0, o1):
        for c in range(c0, c1):
            start = (o * channels + c) * inner
            hi, lo, a, b, k = params[c, 0], params[c, 1], params[c, 2], params[c, 3], params[c, 4]
            if stores == 2:
                _dx_stream(gf, xf, df, start, start + inner, hi, lo, a, b, k)
                continue
            for i in range(start, start + whole, lanes):  # cached, as in _affine_runs
                _line_dx(gf, xf, i, df, hi, lo, a, b, k, False)
            for i in range(np.uint64(start + whole), np.uint64(start + inner)):
                df[i] = ((gf[i] - b) - ((xf[i] - hi) - lo) * k) * a


@kernel(parallel=True)
def channel_grad_sums(dy, x, mean, group, nparts, sum_dy, sum_dy_xmu):
    """Per-(channel, part) ``sum(dy)`` and ``sum(dy * (x - mean))``, arrays (C, nparts).

    ``mean`` is float64 and exact: the caller's mean, converted.
    """
    outer, channels, inner = x.shape
    ngroups = -(-channels // group)
    for t in prange(ngroups * nparts):
        g = t // nparts
        part = t - g * nparts
        c0 = g * group
        c1 = min(c0 + group, channels)
        s = np.zeros(c1 - c0)
        sx = np.zeros(c1 - c0)
        _rows_grad_sums(dy, x, part * outer // nparts, (part + 1) * outer // nparts, c0, c1,
                        mean, s, sx)
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
def channel_backward(dy, x, mean, invstd, weight, group, dx, sum_dy, sum_dy_xmu):
    """Training backward, fused: each group's sums, then its ``dx`` from cache.

    Writes ``dx`` and the float64 ``sum(dy)``, ``sum(dy * (x - mean))`` per channel.
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
        _rows_grad_sums(dy, x, 0, outer, c0, c1, mean, s, sx)
        for c in range(c0, c1):
            sum_dy[c] = s[c - c0]
            sum_dy_xmu[c] = sx[c - c0]
            _dx_params(params, c, mean, invstd, weight, sum_dy, sum_dy_xmu, n)
        _dx_runs(dy, x, 0, outer, c0, c1, params, dx)
        _store_fence()


@kernel(parallel=True)
def dx_channels(dy, x, params, nblocks, dx):
    """``dx = ((dy - b) - ((x - hi) - lo) * k) * a`` per channel, ``params`` (C, 5).

    ``nblocks`` tasks, each a contiguous range of the (outer, C) runs.
    """
    outer, channels, inner = x.shape
    for blk in prange(nblocks):
        o0, c0, c1, r0, r1, o1, c2 = _block_runs(blk, nblocks, outer, channels)
        _dx_runs(dy, x, o0, o0 + 1, c0, c1, params, dx)
        _dx_runs(dy, x, r0, r1, 0, channels, params, dx)
        _dx_runs(dy, x, o1, o1 + 1, 0, c2, params, dx)
        _store_fence()


@kernel()
def _rows_add_grad_sums(dy, x, r0, r1, mean, s, sx):
    width = x.shape[1]
    tiled = 0
    if width == 64:
        _tile_grad_sums_64(dy, x, r0, r1, 0, mean, s, sx)
        tiled = 64
    elif width < ROW_TILE_MAX_WIDTH:
        tiled = width - width % 32
        for j in range(0, tiled, 32):
            _tile_grad_sums_32(dy, x, r0, r1, j, mean, s, sx)
    for r in range(r0, r1):
        for j in range(np.uint64(tiled), np.uint64(width)):
            g = np.float64(dy[r, j])
            s[j] += g
            sx[j] += g * (np.float64(x[r, j]) - mean[j])


@kernel(parallel=True)
def column_backward(dy, x, mean, invstd, weight, inner, nblocks, write_dx, dx, sum_dy,
                    sum_dy_xmu):
    """Per-channel ``sum(dy)``, ``sum(dy * (x - mean))`` over rows of (rows, C * inner)
    arrays and (``write_dx``) the training-mode ``dx``, in one call."""
    rows, width = x.shape
    channels = width // inner
    mean_cols = _expand(mean, inner)
    s = np.zeros((nblocks, width))
    sx = np.zeros((nblocks, width))
    for blk in prange(nblocks):
        _rows_add_grad_sums(dy, x, blk * rows // nblocks, (blk + 1) * rows // nblocks,
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
        for blk in prange(nblocks):
            _dx_rows(dy, x, blk * rows // nblocks, (blk + 1) * rows // nblocks, params, dx)
            _store_fence()


@kernel()
def _dx_rows(dy, x, r0, r1, params, dx):
    """Rows [r0, r1) of the column path's ``dx``, streamed as in ``_affine_rows``;
    ``params`` (5, W + lanes) holds (hi, lo, a, b, k) per column, wrapped."""
    width = x.shape[1]
    lanes = LINE_BYTES // dx.itemsize
    gf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    df = dx.reshape(dx.size)
    start = r0 * width
    stop = r1 * width
    first, last = _stream_span(df, start, stop)
    if width < lanes or first == stop:
        for r in range(r0, r1):
            for j in range(np.uint64(0), np.uint64(width)):
                dx[r, j] = ((dy[r, j] - params[3, j])
                            - ((x[r, j] - params[0, j]) - params[1, j]) * params[4, j]) * params[2, j]
        return
    for i in range(start, first):
        j = (i - start) % width
        df[i] = ((gf[i] - params[3, j]) - ((xf[i] - params[0, j]) - params[1, j]) * params[4, j]) \
            * params[2, j]
    j = (first - start) % width if width > 0 else 0
    for i in range(first, last, lanes):
        _line_dx_cols(gf, xf, i, df, params, j)
        j += lanes
        if j >= width:
            j -= width
    for i in range(last, stop):
        j = (i - start) % width
        df[i] = ((gf[i] - params[3, j]) - ((xf[i] - params[0, j]) - params[1, j]) * params[4, j]) \
            * params[2, j]


@kernel()
def _wrap_columns(params, width, lanes):
    """Copy the first ``lanes`` columns of ``params`` after column ``width - 1``."""
    for k in range(params.shape[0]):
        for j in range(min(lanes, width)):
            params[k, width + j] = params[k, j]


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
def parallel_copy(src, dst, nblocks):
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
def parallel_read(src, nblocks):
    """Sum flat ``src`` in ``nblocks`` parallel blocks: the floor of a read-only pass."""
    n = src.shape[0]
    partial = np.zeros(nblocks)
    for blk in prange(nblocks):
        partial[blk] = _flat_sum(src, blk * n // nblocks, (blk + 1) * n // nblocks)
    return partial.sum()


@kernel(parallel=True)
def parallel_add(a, b, out, nblocks):
    """``out = a + b`` (flat) with streaming stores: the floor of two reads and one write."""
    n = a.shape[0]
    for blk in prange(nblocks):
        _add_span(a, b, out, blk * n // nblocks, (blk + 1) * n // nblocks)
        _store_fence()


# Floors of the fused channel path: the same tasks (a group of channels each)
# and the same traffic (read the group, then read it again from cache and
# write), with no arithmetic.  No fused kernel on this schedule can beat them.

@kernel(parallel=True)
def grouped_read_copy(x, group, y):
    """Per group of channels of ``x`` (outer, C, inner): sum it, then copy it into ``y``."""
    outer, channels, inner = x.shape
    ngroups = -(-channels // group)
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    sums = np.zeros(ngroups)
    for g in prange(ngroups):
        c0 = g * group
        c1 = min(c0 + group, channels)
        s = 0.0
        for o in range(outer):
            s += _flat_sum(xf, (o * channels + c0) * inner, (o * channels + c1) * inner)
        sums[g] = s
        for o in range(outer):
            _copy_span(xf, yf, (o * channels + c0) * inner, (o * channels + c1) * inner)
        _store_fence()
    return sums.sum()


@kernel(parallel=True)
def grouped_read2_add(a, b, group, out):
    """Per group of channels: sum ``a`` and ``b``, then ``out = a + b`` from cache."""
    outer, channels, inner = a.shape
    ngroups = -(-channels // group)
    af = a.reshape(a.size)
    bf = b.reshape(b.size)
    outf = out.reshape(out.size)
    sums = np.zeros(ngroups)
    for g in prange(ngroups):
        c0 = g * group
        c1 = min(c0 + group, channels)
        s = 0.0
        for o in range(outer):
            lo = (o * channels + c0) * inner
            hi = (o * channels + c1) * inner
            s += _flat_sum2(af, bf, lo, hi)
        sums[g] = s
        for o in range(outer):
            _add_span(af, bf, outf, (o * channels + c0) * inner, (o * channels + c1) * inner)
        _store_fence()
    return sums.sum()


# ---------------------------------------------------------------------------
# Pipelined channel path (see ``_pipelined_lines``).  A task owns a chain of
# neighbouring channels [c0, c1): it reduces c0 alone, then for each channel c
# writes c's output while reducing c + 1 (row 0 of c + 1 first, on its own: a
# channel's first piece is exact two-pass), and writes the last channel alone.
# Rows are the runs ``x[o, c, :]``; ``nxt`` and ``cur`` are flat offsets of the
# runs of c + 1 and c in one row.

@kernel()
def _pipe_geometry(out, nxt, cur, inner, next_run):
    """Geometry of a pipelined run for the intrinsics: ``(first, last, nreduce, nwrite, pf,
    wrap, jump)``.  ``out[first:last]`` are the whole lines of ``out[cur:cur + inner]``
    (``nwrite`` of them); the run at ``nxt`` is reduced in ``nreduce`` whole lines from its
    start; prefetches run ahead in that stream and continue at flat offset ``next_run``."""
    first, last = _stream_span(out, cur, cur + inner)
    lanes = LINE_BYTES // out.itemsize
    ahead = PREFETCH_BYTES // out.itemsize
    return (first, last, inner // lanes, (last - first) // lanes, nxt + ahead, inner - ahead,
            next_run - (nxt + inner))


@kernel()
def _next_run(channels, inner, r0, r1, o, c):
    """Flat offset of the run read after the one of channel ``c + 1`` in row ``o`` of a
    pass over rows [r0, r1): the same channel's next row, or after its last row, row
    ``r0`` of channel ``c + 2``."""
    if o + 1 < r1:
        return ((o + 1) * channels + c + 1) * inner
    return (r0 * channels + c + 2) * inner


@kernel(fastmath=REDUCE_MATH)
def _flat_dev_sums(xf, lo, hi, center):
    s1 = 0.0
    s2 = 0.0
    for i in range(np.uint64(lo), np.uint64(hi)):
        d = np.float64(xf[i]) - center
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=REDUCE_MATH)
def _flat_grad_sums(gf, xf, lo, hi, mean):
    s = 0.0
    sx = 0.0
    for i in range(np.uint64(lo), np.uint64(hi)):
        g = np.float64(gf[i])
        s += g
        sx += g * (np.float64(xf[i]) - mean)
    return s, sx


@kernel()
def _pipelined_forward_row(xf, yf, nxt, cur, inner, next_run, center, params, c, acc):
    """Deviation sums about ``center`` of the run at ``nxt``; the run at ``cur`` normalized
    with row ``c`` of ``params``."""
    first, last, nreduce, nwrite, pf, wrap, jump = _pipe_geometry(yf, nxt, cur, inner, next_run)
    hi, lo, scale, shift = params[c, 0], params[c, 1], params[c, 2], params[c, 3]
    acc[0] = 0.0
    acc[1] = 0.0
    _pipe_dev_sums_affine(xf, yf, nxt, first, nreduce, nwrite, pf, wrap, jump, center,
                          hi, lo, scale, shift, acc)
    t1, t2 = _flat_dev_sums(xf, nxt + nreduce * (LINE_BYTES // yf.itemsize), nxt + inner, center)
    _affine_stream(xf, yf, cur, first, hi, lo, scale, shift)
    _affine_stream(xf, yf, last, cur + inner, hi, lo, scale, shift)
    return acc[0] + t1, acc[1] + t2


@kernel()
def _pipelined_forward_chain(x, c0, c1, shift, weight, bias, eps, y, mean, var, invstd, params):
    outer, channels, inner = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    n = np.zeros(1)
    mu = np.zeros(1)
    q = np.zeros(1)
    acc = np.zeros(2)
    _accumulate_rows(x, 0, outer, c0, c0 + 1, shift, n, mu, q)
    for c in range(c0, c1):
        _finish_channel(c, n[0], mu[0], q[0], shift, weight, bias, eps, mean, var, invstd,
                        params)
        if c + 1 == c1:
            _affine_runs(x, 0, outer, c, c + 1, params, y)
            break
        n[0] = 0.0
        mu[0] = 0.0
        q[0] = 0.0
        _accumulate_rows(x, 0, 1, c + 1, c + 2, shift, n, mu, q)
        _affine_runs(x, 0, 1, c, c + 1, params, y)
        for o in range(1, outer):
            cur = (o * channels + c) * inner
            s1, s2 = _pipelined_forward_row(xf, yf, cur + inner, cur, inner,
                                            _next_run(channels, inner, 0, outer, o, c),
                                            shift[c + 1] + mu[0], params, c, acc)
            _merge_piece(s1, s2, float(inner), 0, n, mu, q)


@kernel(parallel=True)
def pipelined_forward(x, ntasks, weight, bias, eps, y, mean, var, invstd):
    """Training forward on the pipelined channel path, ``ntasks`` chains of channels."""
    channels = x.shape[1]
    shift = _first_values(x)
    params = np.empty((channels, 4), x.dtype)
    for t in prange(ntasks):
        _pipelined_forward_chain(x, t * channels // ntasks, (t + 1) * channels // ntasks, shift,
                                 weight, bias, eps, y, mean, var, invstd, params)
        _store_fence()


@kernel()
def _pipelined_backward_row(gf, xf, df, nxt, cur, inner, next_run, mean, params, c, acc,
                            write):
    """``sum(dy)``, ``sum(dy * (x - mean))`` of the runs at ``nxt``; if ``write``, ``dx`` of
    the run at ``cur`` with row ``c`` of ``params``, in the same loop.  The sums are the
    same bits either way."""
    first, last, nreduce, nwrite, pf, wrap, jump = _pipe_geometry(df, nxt, cur, inner, next_run)
    if not write:
        nwrite = 0
    hi, lo, a, b, k = params[c, 0], params[c, 1], params[c, 2], params[c, 3], params[c, 4]
    acc[0] = 0.0
    acc[1] = 0.0
    _pipe_grad_sums_dx(gf, xf, df, nxt, first, nreduce, nwrite, pf, wrap, jump, mean,
                       hi, lo, a, b, k, acc)
    t1, t2 = _flat_grad_sums(gf, xf, nxt + nreduce * (LINE_BYTES // df.itemsize), nxt + inner,
                             mean)
    if write:
        _dx_stream(gf, xf, df, cur, first, hi, lo, a, b, k)
        _dx_stream(gf, xf, df, last, cur + inner, hi, lo, a, b, k)
    return acc[0] + t1, acc[1] + t2


# Row parts.  The backward's chains are also split along ``outer``: with two
# parts, two threads share each channel of a chain, each reducing its half of
# channel c + 1 while it writes its half of c, so a thread keeps half as much in
# cache between the two reads of a channel.  (64, 256, 56, 56) float32: 2-6%
# faster, float64 10% (the traffic alone: 1.98x the copy against 2.10x).
# Writing c needs every part's sums of c.  The sums of a (channel, part) are a
# task of their own, claimed through a flag by whichever thread needs them
# first, so a thread only ever waits on sums being computed: parts queued on one
# thread (one Numba thread, more parts than threads, a busy TBB pool) get
# reduced by the part that runs first, and cannot deadlock.  A part's sums are
# the same bits whoever takes them, and a channel's are added in part order:
# the results do not depend on the schedule.
BACKWARD_ROW_PARTS = 2


@kernel()
def backward_chains(outer, channels, nthreads):
    """``(nchains, nparts)`` of the pipelined backward: chains of channels, each split
    into ``nparts`` blocks of rows, one task per (chain, part).

    The parts fix the order of a channel's sums, so their number follows the shape
    only; the chains do not change the bits (every channel's sums are its parts'
    whoever reduces them), so they follow the real thread count: the parts of a
    chain wait on each other, and run side by side only as tasks of their own.
    """
    nparts = min(BACKWARD_ROW_PARTS, outer)
    return max(1, min(nthreads // nparts, channels)), nparts


@kernel()
def _part_rows(outer, nparts, p):
    return p * outer // nparts, (p + 1) * outer // nparts


@kernel()
def _part_pass(gf, xf, df, shape, p, nparts, reduce_c, write_c, mean, params, acc, flags,
               part_sums):
    """Publish the sums of channel ``reduce_c`` over part ``p``'s rows (the caller claimed
    them); with ``write_c >= 0``, write ``dx`` of channel ``write_c`` over the same rows in
    the same loop."""
    outer, channels, inner = shape
    r0, r1 = _part_rows(outer, nparts, p)
    write = write_c >= 0
    s = 0.0
    sx = 0.0
    for o in range(r0, r1):
        nxt = (o * channels + reduce_c) * inner
        cur = (o * channels + write_c) * inner if write else nxt
        a, b = _pipelined_backward_row(gf, xf, df, nxt, cur, inner,
                                       _next_run(channels, inner, r0, r1, o, reduce_c - 1),
                                       mean[reduce_c], params, max(write_c, 0), acc, write)
        s += a
        sx += b
    part_sums[reduce_c, p, 0] = s
    part_sums[reduce_c, p, 1] = sx
    _store_release(flags, reduce_c * nparts + p, 2)


@kernel()
def _claimed_part_sums(gf, xf, df, shape, c, nparts, mean, params, acc, flags, part_sums):
    """Channel ``c``'s sums once every part's are published; parts nobody has claimed
    are reduced here."""
    for q in range(nparts):
        i = c * nparts + q
        if _load_acquire(flags, i) == 0 and _claim(flags, i):
            _part_pass(gf, xf, df, shape, q, nparts, c, -1, mean, params, acc, flags,
                       part_sums)
        while _load_acquire(flags, i) != 2:
            _spin_pause()
    s = 0.0
    sx = 0.0
    for q in range(nparts):
        s += part_sums[c, q, 0]
        sx += part_sums[c, q, 1]
    return s, sx


@kernel()
def _pipelined_backward_chain(dy, x, c0, c1, p, nparts, mean, invstd, weight, dx, sum_dy,
                              sum_dy_xmu, params, flags, part_sums):
    """Part ``p`` of the chain of channels [c0, c1): its rows of each channel written while
    its rows of the next are reduced."""
    outer, channels, inner = x.shape
    gf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    df = dx.reshape(dx.size)
    n = float(outer * inner)
    r0, r1 = _part_rows(outer, nparts, p)
    acc = np.zeros(2)
    if _claim(flags, c0 * nparts + p):
        _part_pass(gf, xf, df, x.shape, p, nparts, c0, -1, mean, params, acc, flags, part_sums)
    for c in range(c0, c1):
        s, sx = _claimed_part_sums(gf, xf, df, x.shape, c, nparts, mean, params, acc, flags,
                                   part_sums)
        if p == 0:
            sum_dy[c] = s
            sum_dy_xmu[c] = sx
        _dx_params_of(params, c, mean, invstd, weight, s, sx, n)
        i = (c + 1) * nparts + p
        if c + 1 < c1 and _load_acquire(flags, i) == 0 and _claim(flags, i):
            _part_pass(gf, xf, df, x.shape, p, nparts, c + 1, c, mean, params, acc, flags,
                       part_sums)
        else:
            _dx_runs(dy, x, r0, r1, c, c + 1, params, dx)


@kernel(parallel=True)
def pipelined_backward(dy, x, mean, invstd, weight, nchains, nparts, dx, sum_dy, sum_dy_xmu):
    """Training backward on the pipelined channel path: ``nchains`` chains of channels,
    each in ``nparts`` parts of rows (``backward_chains``)."""
    channels = x.shape[1]
    flags = np.zeros(channels * nparts, np.int64)
    part_sums = np.full((channels, nparts, 2), np.nan)  # NaN until published
    params = np.empty((nchains * nparts, channels, 5), x.dtype)  # one per task: no sharing
    for t in prange(nchains * nparts):
        chain = t // nparts
        _pipelined_backward_chain(dy, x, chain * channels // nchains,
                                  (chain + 1) * channels // nchains, t - chain * nparts, nparts,
                                  mean, invstd, weight, dx, sum_dy, sum_dy_xmu, params[t],
                                  flags, part_sums)
        _store_fence()


# Floors of the pipelined path: its schedule and traffic, no arithmetic.

@kernel()
def _pipelined_copy_chain(x, c0, c1, y, acc):
    outer, channels, inner = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    for o in range(outer):
        acc[0] += _flat_sum(xf, (o * channels + c0) * inner, (o * channels + c0 + 1) * inner)
    for c in range(c0, c1 - 1):
        acc[0] += _flat_sum(xf, (c + 1) * inner, (c + 2) * inner)
        _copy_span(xf, yf, c * inner, (c + 1) * inner)
        for o in range(1, outer):
            cur = (o * channels + c) * inner
            first, last, nreduce, nwrite, pf, wrap, jump = _pipe_geometry(
                yf, cur + inner, cur, inner, _next_run(channels, inner, 0, outer, o, c))
            _pipe_sum_copy(xf, yf, cur + inner, first, nreduce, nwrite, pf, wrap, jump, acc)
            acc[0] += _flat_sum(xf, cur + inner + nreduce * (LINE_BYTES // yf.itemsize),
                                cur + 2 * inner)
            _copy_span(xf, yf, cur, first)
            _copy_span(xf, yf, last, cur + inner)
    for o in range(outer):
        _copy_span(xf, yf, (o * channels + c1 - 1) * inner, (o * channels + c1) * inner)


@kernel(parallel=True)
def pipelined_read_copy(x, nchains, nparts, y):
    """The pipelined forward's traffic: ``y = x`` on its schedule, the next channel summed,
    over ``nchains`` chains of channels of ``nparts`` parts of rows each (the forward's
    schedule: one chain per thread, one part); returns the sum of ``x``."""
    outer, channels = x.shape[0], x.shape[1]
    sums = np.zeros((nchains * nparts, 2))
    for t in prange(nchains * nparts):
        chain = t // nparts
        r0, r1 = _part_rows(outer, nparts, t - chain * nparts)
        _pipelined_copy_chain(x[r0:r1], chain * channels // nchains,
                              (chain + 1) * channels // nchains, y[r0:r1], sums[t])
        _store_fence()
    return sums[:, 0].sum()


@kernel()
def _pipelined_add_chain(a, b, c0, c1, out, acc):
    outer, channels, inner = a.shape
    af = a.reshape(a.size)
    bf = b.reshape(b.size)
    of = out.reshape(out.size)
    for o in range(outer):
        acc[0] += _flat_sum2(af, bf, (o * channels + c0) * inner, (o * channels + c0 + 1) * inner)
    for c in range(c0, c1 - 1):
        acc[0] += _flat_sum2(af, bf, (c + 1) * inner, (c + 2) * inner)
        _add_span(af, bf, of, c * inner, (c + 1) * inner)
        for o in range(1, outer):
            cur = (o * channels + c) * inner
            first, last, nreduce, nwrite, pf, wrap, jump = _pipe_geometry(
                of, cur + inner, cur, inner, _next_run(channels, inner, 0, outer, o, c))
            _pipe_sum2_add(af, bf, of, cur + inner, first, nreduce, nwrite, pf, wrap, jump, acc)
            acc[0] += _flat_sum2(af, bf, cur + inner + nreduce * (LINE_BYTES // of.itemsize),
                                 cur + 2 * inner)
            _add_span(af, bf, of, cur, first)
            _add_span(af, bf, of, last, cur + inner)
    for o in range(outer):
        _add_span(af, bf, of, (o * channels + c1 - 1) * inner, (o * channels + c1) * inner)


@kernel(parallel=True)
def pipelined_read2_add(a, b, nchains, nparts, out):
    """The pipelined backward's traffic: ``out = a + b`` on its schedule (``nchains``,
    ``nparts``: see ``backward_chains``), the next channel of both summed; returns the
    sum of ``a`` and ``b``."""
    outer, channels = a.shape[0], a.shape[1]
    sums = np.zeros((nchains * nparts, 2))
    for t in prange(nchains * nparts):
        chain = t // nparts
        r0, r1 = _part_rows(outer, nparts, t - chain * nparts)
        _pipelined_add_chain(a[r0:r1], b[r0:r1], chain * channels // nchains,
                             (chain + 1) * channels // nchains, out[r0:r1], sums[t])
        _store_fence()
    return sums.sum()


# ---------------------------------------------------------------------------
# Plans: one whole op on (outer, C, inner) arrays, choosing the kernel path.
# The Python backend and the C entry points (fastbn.capi) both call these, so
# the same shape takes the same path, with the same numerics, from either side.

# Channel path: a group of neighbouring channels is read as one long stream, then
# re-read from cache to normalize; keep a group within this many bytes of input.
# The reductions' plans (channels per task, parts per channel, chains, blocks of
# rows) are made for this many threads whatever the real count, so that results have
# the same bits under any thread count or limit (a part or block boundary changes
# the order of a sum); the tasks are spread over the threads there are.  Element-wise
# passes are planned for the real count.
PLAN_THREADS = 16
GROUP_BYTES = 8 << 20
MAX_GROUP = 16
# Below this many values, a part of a channel is not worth its own task.
MIN_PART_VALUES = 16384
# Column path: values per chunk of rows (statistics are merged once per chunk;
# the first chunk is read twice, from L2).
CHUNK_VALUES = 131072


@kernel()
def channel_plan(outer, channels, inner, bytes_per_value, nthreads):
    """``(group, nparts)`` for the channel path: channels per task, parts per channel.

    Fused (``nparts == 1``) when there are enough groups to keep every thread
    busy; otherwise channels are also split along ``outer`` and normalized in a
    second pass.
    """
    channel_bytes = max(1, outer * inner * bytes_per_value)
    group = max(1, min(MAX_GROUP, channels // (2 * nthreads), GROUP_BYTES // channel_bytes))
    ngroups = -(-channels // group)
    if ngroups >= 2 * nthreads or nthreads == 1 or ngroups == 0:
        return group, 1
    nparts = min(-(-2 * nthreads // ngroups), outer, max(1, outer * inner // MIN_PART_VALUES))
    return group, max(1, nparts)


# Pipelined channel path: runs of at least this many bytes (a shorter run costs
# more in set-up than the overlap gains), two channels per thread within GROUP_BYTES.
PIPE_MIN_RUN_BYTES = 2048


@kernel()
def pipelined(outer, channels, inner, bytes_per_value, nthreads, out):
    """Whether the fused channel path runs pipelined (``pipelined_forward/backward``, one
    chain of at least two channels per thread) rather than by groups."""
    channel_bytes = outer * inner * bytes_per_value
    return (channels >= 2 * nthreads and outer >= 2
            and inner * out.itemsize >= PIPE_MIN_RUN_BYTES
            and 2 * channel_bytes <= GROUP_BYTES and _streams(out))


@kernel()
def column_blocks(rows, nthreads):
    return max(1, min(nthreads, rows))


# Feature statistics (scalers): blocks of rows whose count follows the data's size, never
# the thread count, so that the bits do not depend on it; each block's partial statistics
# take (blocks, width) arrays, kept under FEATURE_PARTS_VALUES values.
FEATURE_BLOCK_VALUES = 1 << 18
FEATURE_PARTS_VALUES = 1 << 20


@kernel()
def feature_blocks(rows, width):
    by_size = rows * width // FEATURE_BLOCK_VALUES
    return max(1, min(rows, by_size, FEATURE_PARTS_VALUES // max(width, 1)))


@kernel()
def chunk_rows(width):
    return max(4, CHUNK_VALUES // max(width, 1))


@kernel()
def run_blocks(outer, channels, nthreads):
    """Tasks for an element-wise pass over the (outer, C) runs: a few per thread."""
    return max(1, min(4 * nthreads, outer * channels))


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
        affine_columns(x.reshape(outer, channels * inner), params, inner,
                       column_blocks(outer, nthreads), y.reshape(outer, channels * inner))
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


# ---------------------------------------------------------------------------
# Feature statistics for data normalization (fastbn.standardize, the scalers):
# per column of a (rows, W) view, NaN ignored (scikit-learn's semantics), with
# each column's count, mean (relative to ``shift``), M2, min and max.  Chunks of
# rows stay in cache and are reduced exactly in two passes, then merged with
# Chan's formula, so the result does not depend on the offset of the data.

# Branch-free (selects) so that the column loops vectorize; NaN fails every comparison.
# ``w``: a weight per row (``sample_weight``), or None for weight 1 (the branch on it is
# resolved at compile time; a weight of 1 gives the unweighted sums' bits).

@kernel()
def _weight_of(v, wr):
    return wr if v == v else 0.0


@kernel()
def _weighted_dev(v, wr, shift):
    return wr * (v - shift) if v == v else 0.0


@kernel()
def _weighted_sq(v, wr, d):
    return wr * (d * d) if v == v else 0.0


@kernel()
def _four_weights(w, r):
    return _row_weight(w, r), _row_weight(w, r + 1), _row_weight(w, r + 2), _row_weight(w, r + 3)


@kernel()
def _four_values(x, r, j):
    """Column ``j`` of rows r .. r + 3, as float64."""
    return (np.float64(x[r, j]), np.float64(x[r + 1, j]), np.float64(x[r + 2, j]),
            np.float64(x[r + 3, j]))


# The chunk loops take four rows per update of the per-column accumulators (a quarter of
# their loads and stores, which bound a row-at-a-time loop), summed pairwise; the last
# rows of a chunk one at a time.  Chunks start at fixed rows, so the order is fixed too.

@kernel()
def _chunk_counts_sums(x, w, r0, r1, shift, c, s):
    width = np.uint64(x.shape[1])
    r = r0
    while r + 4 <= r1:
        w0, w1, w2, w3 = _four_weights(w, r)
        for j in range(np.uint64(0), width):
            a0, a1, a2, a3 = _four_values(x, r, j)
            sh = shift[j]
            c[j] += ((_weight_of(a0, w0) + _weight_of(a1, w1))
                     + (_weight_of(a2, w2) + _weight_of(a3, w3)))
            s[j] += ((_weighted_dev(a0, w0, sh) + _weighted_dev(a1, w1, sh))
                     + (_weighted_dev(a2, w2, sh) + _weighted_dev(a3, w3, sh)))
        r += 4
    for rr in range(r, r1):
        wr = _row_weight(w, rr)
        for j in range(np.uint64(0), width):
            v = np.float64(x[rr, j])
            c[j] += _weight_of(v, wr)
            s[j] += _weighted_dev(v, wr, shift[j])


@kernel()
def _chunk_m2_min_max(x, w, r0, r1, shift, mu, q, vmin, vmax):
    # NaN fails every comparison, so it never becomes a minimum or a maximum
    width = np.uint64(x.shape[1])
    r = r0
    while r + 4 <= r1:
        w0, w1, w2, w3 = _four_weights(w, r)
        for j in range(np.uint64(0), width):
            a0, a1, a2, a3 = _four_values(x, r, j)
            sh, m = shift[j], mu[j]
            q[j] += ((_weighted_sq(a0, w0, (a0 - sh) - m) + _weighted_sq(a1, w1, (a1 - sh) - m))
                     + (_weighted_sq(a2, w2, (a2 - sh) - m)
                        + _weighted_sq(a3, w3, (a3 - sh) - m)))
            lo, hi = vmin[j], vmax[j]
            lo = a0 if a0 < lo else lo
            lo = a1 if a1 < lo else lo
            lo = a2 if a2 < lo else lo
            lo = a3 if a3 < lo else lo
            hi = a0 if a0 > hi else hi
            hi = a1 if a1 > hi else hi
            hi = a2 if a2 > hi else hi
            hi = a3 if a3 > hi else hi
            vmin[j], vmax[j] = lo, hi
        r += 4
    for rr in range(r, r1):
        wr = _row_weight(w, rr)
        for j in range(np.uint64(0), width):
            v = np.float64(x[rr, j])
            q[j] += _weighted_sq(v, wr, (v - shift[j]) - mu[j])
            vmin[j] = v if v < vmin[j] else vmin[j]
            vmax[j] = v if v > vmax[j] else vmax[j]


@kernel()
def _feature_block(x, w, r0, r1, chunk_rows, shift, count, mean_rel, m2, vmin, vmax):
    """Statistics of rows [r0, r1) of ``x`` (rows, W) into the (W,) arrays given."""
    width = x.shape[1]
    c = np.zeros(width)
    s = np.zeros(width)
    mu = np.zeros(width)
    q = np.zeros(width)
    count[:] = 0.0
    mean_rel[:] = 0.0
    m2[:] = 0.0
    vmin[:] = np.inf
    vmax[:] = -np.inf
    for a in range(r0, r1, chunk_rows):
        b = min(a + chunk_rows, r1)
        c[:] = 0.0
        s[:] = 0.0
        q[:] = 0.0
        _chunk_counts_sums(x, w, a, b, shift, c, s)
        for j in range(width):
            mu[j] = s[j] / c[j] if c[j] > 0.0 else 0.0
        _chunk_m2_min_max(x, w, a, b, shift, mu, q, vmin, vmax)
        for j in range(width):  # Chan's merge of the chunk into the block
            if c[j] > 0.0:
                n = count[j]
                total = n + c[j]
                delta = mu[j] - mean_rel[j]
                mean_rel[j] += delta * (c[j] / total)
                m2[j] += q[j] + delta * delta * (n * c[j] / total)
                count[j] = total


@kernel(parallel=True)
def feature_moments(x, w, nblocks, chunk_rows, shift, count, mean_rel, m2, vmin, vmax):
    """Per-(block of rows, column) statistics of ``x`` (rows, W) with NaN ignored, each
    row weighted by ``w`` (rows,) float64, or by 1 when ``w`` is None: arrays (nblocks,
    W) of the count (weight sum), mean relative to ``shift``, M2, min and max (min/max
    are +inf/-inf where a block has no value)."""
    rows = x.shape[0]
    for blk in prange(nblocks):
        _feature_block(x, w, blk * rows // nblocks, (blk + 1) * rows // nblocks, chunk_rows,
                       shift, count[blk], mean_rel[blk], m2[blk], vmin[blk], vmax[blk])


@kernel(parallel=True)
def column_moments(x, w, nblocks, chunk_rows, shift, count, mean_rel, m2):
    """Per-(block of rows, column) moments of ``x`` (rows, W) without NaN, each row
    weighted by ``w`` (rows,) float64, or by 1 when ``w`` is None: ``count`` (nblocks,)
    the weight sums, ``mean_rel`` (relative to ``shift``) and ``m2`` (nblocks, W).  The
    column path's register tiles: several times faster than ``feature_moments``, whose
    NaN handling data without NaN do not need."""
    rows = x.shape[0]
    for blk in prange(nblocks):
        count[blk] = _column_partials(x, w, blk * rows // nblocks, (blk + 1) * rows // nblocks,
                                      shift, chunk_rows, mean_rel[blk], m2[blk])


# ---------------------------------------------------------------------------
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

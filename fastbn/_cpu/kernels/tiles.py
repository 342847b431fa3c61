"""Register tiles for the column path, and software prefetch.

Column statistics keep one accumulator per column; for narrow rows the hot
reductions run on tiles of 32 or 64 columns whose accumulators live in vector
registers for a whole chunk of rows.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .codegen import LINE_BYTES, _item_pointer, _splat


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
    def tile_grad_sums(typingctx, dy, x, y, r0, r1, j, mean, s, sx):
        """Columns [j, j + 8 * vectors), rows [r0, r1): add ``sum(g)`` to ``s`` and
        ``sum(g * (x - mean))`` to ``sx``, ``g`` being ``dy`` where ``y > 0`` and 0
        elsewhere (``y`` None: ``dy``)."""
        masked = not isinstance(y, (types.NoneType, types.Omitted))

        def codegen(context, builder, sig, args):
            vty = ir.VectorType(ir.DoubleType(), TILE_LANES)
            load_g = _tile_loader(context, builder, sig.args[0], args[0], vty)
            load_x = _tile_loader(context, builder, sig.args[1], args[1], vty)
            if masked:
                load_y = _tile_loader(context, builder, sig.args[2], args[2], vty)
            zero = ir.Constant(vty, None)

            def step(r, k, c, columns):
                (mean_,) = columns
                g = load_g(r, c)
                if masked:
                    g = builder.select(builder.fcmp_ordered(">", load_y(r, c), zero), g, zero)
                return g, builder.fmul(g, builder.fsub(load_x(r, c), mean_))
            return _tile_sums(context, builder, sig, args, vectors, 3, 5, (6,), step)
        return types.void(dy, x, y, types.intp, types.intp, types.intp, mean, s, sx), codegen
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

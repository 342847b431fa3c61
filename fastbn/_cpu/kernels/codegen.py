"""LLVM IR code generation that Numba has no syntax for: whole 64-byte lines loaded
and stored as vectors (non-temporal where the output is large), store fences,
and the atomic flags of the pipelined backward.

An output pass writes ``out[start:stop]`` (flat, C-contiguous) in three parts:
scalar up to the first 64-byte boundary of ``out``, whole lines, a scalar tail.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..._jit import kernel
from ..._machine import stream_min_bytes


# Streaming stores.  The output of a pass is not read again soon, so each
# 64-byte line is written with a non-temporal vector store: no read-for-ownership
# of the destination, and no eviction of the input that is still to be re-read.
# Helpers write ``out[start:stop]`` (flat, C-contiguous) in three parts: scalar
# up to the first 64-byte boundary of ``out``, whole lines, a scalar tail.

LINE_BYTES = 64


# Outputs below this size are written with ordinary stores: they fit in cache, where the
# next step reads them (half the last-level cache; ``fastbn._machine``).  Compiled in, so
# ``_cache.code_digest`` covers its value.
STREAM_MIN_BYTES = stream_min_bytes()


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


def _two_sided_expr(builder, v, c_low, c_high, scale, f_low, f_high, r_low=None, r_high=None):
    """``((v - c) - r) * scale + f`` with the center, residual and end of the end ``v`` is
    nearer: the low end's unless ``v - c_low >= c_high - v`` (so NaN, and +inf against a
    high center of +inf, take the low end); no residual subtracted when none is given
    (``kernels.minmax``)."""
    d_low = builder.fsub(v, c_low)
    d_high = builder.fsub(v, c_high)
    below = builder.fcmp_unordered("<", d_low, builder.fneg(d_high))
    centered = builder.select(below, d_low, d_high)
    if r_low is not None:
        centered = builder.fsub(centered, builder.select(below, r_low, r_high))
    return builder.fadd(builder.fmul(centered, scale), builder.select(below, f_low, f_high))


def _dx_expr(builder, g, v, hi, lo, a, b, k):
    xc = builder.fsub(builder.fsub(v, hi), lo)
    return builder.fmul(builder.fsub(builder.fsub(g, b), builder.fmul(xc, k)), a)


# Fused epilogues (contract section 6).  The forward's output ``r`` becomes
# ``relu(r + residual)``: the residual an array laid out like the output (its line is
# loaded at the output's index) or None, resolved at compile time, and ReLU a run-time
# flag.  The backward's ``dy`` becomes the masked ``g = dy where y > 0, else 0``, ``y``
# the forward's output or None (no activation), and ``g`` is also stored into
# ``dresidual`` unless that array is empty (a run-time test, so that writing it or not
# is one compiled kernel: every variant compiled costs CI and first-use time).

def _is_none(ty):
    return isinstance(ty, (types.NoneType, types.Omitted))


def _relu_expr(builder, r, relu):
    """``r`` with its negative values set to 0 where the i1 ``relu`` is true; NaN stays."""
    zero = ir.Constant(r.type, None)
    clipped = builder.select(builder.fcmp_ordered("<", r, zero), zero, r)
    return builder.select(relu, clipped, r)


def _epilogue(context, builder, sig, args, r, index, res_pos, relu_pos, vty):
    """The forward's epilogue of line ``r`` written at ``index``: ``+ residual`` (argument
    ``res_pos``, None: nothing), then ReLU where argument ``relu_pos`` is true."""
    if not _is_none(sig.args[res_pos]):
        r = builder.fadd(r, _load_line(context, builder, sig.args[res_pos], args[res_pos], index,
                                       vty))
    return _relu_expr(builder, r, args[relu_pos])


def _masked(builder, g, yline):
    """``g`` where ``y > 0``, else 0 (the gradient through ReLU; NaN ``y`` stops it)."""
    return builder.select(builder.fcmp_ordered(">", yline, ir.Constant(yline.type, None)), g,
                          ir.Constant(g.type, None))


def _masked_grad_line(context, builder, sig, args, g, index, y_pos, vty):
    """Line ``g`` of ``dy`` at ``index`` masked by the line of argument ``y_pos`` (None:
    unmasked)."""
    if _is_none(sig.args[y_pos]):
        return g
    return _masked(builder, g, _load_line(context, builder, sig.args[y_pos], args[y_pos], index,
                                          vty))


def _nonempty(context, builder, aryty, ary):
    """i1: whether the array ``ary`` has any element."""
    arr = context.make_array(aryty)(context, builder, ary)
    return builder.icmp_signed("!=", arr.nitems, ir.Constant(arr.nitems.type, 0))


@intrinsic
def _relu_if(typingctx, v, relu):
    """Scalar ``v``, or 0 where ``v < 0`` and ``relu``; NaN stays NaN."""
    def codegen(context, builder, sig, args):
        return _relu_expr(builder, args[0], args[1])
    return v(v, types.boolean), codegen


@intrinsic
def _masked_value(typingctx, g, y):
    """Scalar ``g`` where ``y > 0``, else 0."""
    def codegen(context, builder, sig, args):
        yv = context.cast(builder, args[1], sig.args[1], sig.args[0])
        return _masked(builder, args[0], yv)
    return g(g, y), codegen


def _column_params(context, builder, pty, params, j, rows, vty, shared=()):
    """Lines of ``rows`` (row numbers) of ``params`` (k, W + lanes) starting at column
    ``j``; a row in ``shared`` is the same in every column: its column 0, broadcast."""
    dt = pty.dtype
    parr = context.make_array(pty)(context, builder, params)
    lines = []
    for k in rows:
        column = context.get_constant(types.intp, 0) if k in shared else j
        ptr = cgutils.get_item_pointer(context, builder, pty, parr,
                                       [context.get_constant(types.intp, k), column],
                                       wraparound=False, boundscheck=False)
        if k in shared:
            lines.append(_splat(context, builder, builder.load(ptr), dt, dt, vty))
        else:
            lines.append(builder.load(builder.bitcast(ptr, vty.as_pointer()),
                                      align=dt.bitwidth // 8))
    return lines


def _scalar_params(context, builder, sig, args, first, count, vty):
    dt = sig.args[0].dtype
    return [_splat(context, builder, args[n], sig.args[n], dt, vty)
            for n in range(first, first + count)]


@intrinsic
def _line_affine(typingctx, x, i, out, hi, lo, scale, shift, stream, res, relu):
    """``out[i:i+L] = ((x[i:i+L] - hi) - lo) * scale + shift``, one line (``_store_line``),
    with the epilogue (``_epilogue``: ``res`` None or an array like ``out``)."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[0].dtype)
        v = _load_line(context, builder, sig.args[0], args[0], args[1], vty)
        r = _affine_expr(builder, v, *_scalar_params(context, builder, sig, args, 3, 4, vty))
        r = _epilogue(context, builder, sig, args, r, args[1], 8, 9, vty)
        _store_line(context, builder, sig.args[2], args[2], args[1], r, args[7])
        return context.get_dummy_value()
    return types.void(x, types.intp, out, hi, lo, scale, shift, types.boolean, res,
                      types.boolean), codegen


@intrinsic
def _line_affine_split(typingctx, x, i, out, split, hi0, lo0, scale0, shift0, hi1, lo1, scale1,
                       shift1, res, relu):
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
        r = _epilogue(context, builder, sig, args, _affine_expr(builder, v, *params), args[1],
                      12, 13, vty)
        _store_line_nt(context, builder, sig.args[2], args[2], args[1], r)
        return context.get_dummy_value()
    return types.void(x, types.intp, out, types.intp, hi0, lo0, scale0, shift0, hi1, lo1, scale1,
                      shift1, res, types.boolean), codegen


def _make_line_cols(rows, expr, shared=()):
    """An intrinsic ``(x, i, out, params, j, res, relu, stream)``: ``out[i:i+L] =
    expr(x[i:i+L], *p)`` with the epilogue (``_epilogue``), ``p`` the lines of ``rows``
    (row numbers) of ``params`` (k, W + lanes) at column ``j`` (the column path's
    parameters), stored as ``_store_line`` does (streamed where ``stream``, else an
    ordinary store at any address, for an output that stays in cache).  Rows in
    ``shared`` are the same in every column: their column 0 is read once and broadcast,
    a load less per line each (loads, not arithmetic, bound these passes)."""
    @intrinsic
    def line_cols(typingctx, x, i, out, params, j, res, relu, stream):
        def codegen(context, builder, sig, args):
            vty = _line_type(context, sig.args[0].dtype)
            v = _load_line(context, builder, sig.args[0], args[0], args[1], vty)
            p = _column_params(context, builder, sig.args[3], args[3], args[4], rows, vty, shared)
            r = _epilogue(context, builder, sig, args, expr(builder, v, *p), args[1], 5, 6, vty)
            _store_line(context, builder, sig.args[2], args[2], args[1], r, args[7])
            return context.get_dummy_value()
        return types.void(x, types.intp, out, params, types.intp, res, types.boolean,
                          types.boolean), codegen
    return line_cols


_line_affine_cols = _make_line_cols(range(4), _affine_expr)  # (hi, lo, scale, shift)
# rows (c_low, c_high, scale, f_low, f_high, r_low, r_high), the ends f the same in every
# column (kernels.minmax); without residuals where every one is 0
_line_two_sided_cols = _make_line_cols(range(7), _two_sided_expr, shared=(3, 4))
_line_two_sided_exact = _make_line_cols(range(5), _two_sided_expr, shared=(3, 4))


@intrinsic
def _line_two_sided(typingctx, x, i, out, params, c):
    """``out[i:i+L]`` = the two-sided affine map of ``x[i:i+L]`` with row ``c`` of
    ``params`` (C, 7) (``_two_sided_expr``; streamed store)."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[0].dtype)
        v = _load_line(context, builder, sig.args[0], args[0], args[1], vty)
        pty, dt = sig.args[3], sig.args[3].dtype
        parr = context.make_array(pty)(context, builder, args[3])
        p = []
        for k in range(7):
            ptr = cgutils.get_item_pointer(context, builder, pty, parr,
                                           [args[4], context.get_constant(types.intp, k)],
                                           wraparound=False, boundscheck=False)
            p.append(_splat(context, builder, builder.load(ptr), dt, dt, vty))
        _store_line_nt(context, builder, sig.args[2], args[2], args[1],
                       _two_sided_expr(builder, v, *p))
        return context.get_dummy_value()
    return types.void(x, types.intp, out, params, types.intp), codegen


@intrinsic
def _line_dx(typingctx, dy, x, i, out, hi, lo, a, b, k, stream, y, dres):
    """``out[i:i+L] = ((g - b) - ((x - hi) - lo) * k) * a``, one line (``_store_line``),
    ``g`` the line of ``dy`` masked by ``y`` (None: ``dy``); ``g`` also into ``dres``
    unless it is empty."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[1].dtype)
        g = _load_line(context, builder, sig.args[0], args[0], args[2], vty)
        g = _masked_grad_line(context, builder, sig, args, g, args[2], 10, vty)
        v = _load_line(context, builder, sig.args[1], args[1], args[2], vty)
        r = _dx_expr(builder, g, v, *_scalar_params(context, builder, sig, args, 4, 5, vty))
        _store_line(context, builder, sig.args[3], args[3], args[2], r, args[9])
        with builder.if_then(_nonempty(context, builder, sig.args[11], args[11])):
            _store_line(context, builder, sig.args[11], args[11], args[2], g, args[9])
        return context.get_dummy_value()
    return types.void(dy, x, types.intp, out, hi, lo, a, b, k, types.boolean, y, dres), codegen


@intrinsic
def _line_dx_cols(typingctx, dy, x, i, out, params, j, y, dres, stream):
    """Column form of ``_line_dx``: parameters are rows of ``params`` (5, W) at column
    ``j``; stored as ``_store_line`` does (streamed where ``stream``)."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[1].dtype)
        g = _load_line(context, builder, sig.args[0], args[0], args[2], vty)
        g = _masked_grad_line(context, builder, sig, args, g, args[2], 6, vty)
        v = _load_line(context, builder, sig.args[1], args[1], args[2], vty)
        p = _column_params(context, builder, sig.args[4], args[4], args[5], range(5), vty)
        _store_line(context, builder, sig.args[3], args[3], args[2], _dx_expr(builder, g, v, *p),
                    args[8])
        with builder.if_then(_nonempty(context, builder, sig.args[7], args[7])):
            _store_line(context, builder, sig.args[7], args[7], args[2], g, args[8])
        return context.get_dummy_value()
    return types.void(dy, x, types.intp, out, params, types.intp, y, dres,
                      types.boolean), codegen


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


# Views of the epilogues' optional arrays, and scalar forms for the heads and tails of
# runs.  ``_flat`` and ``_rows_view`` are intrinsics typed by their argument: a kernel's
# ``if a is None`` folds only for an argument typed None, so a helper returning None or
# a view would be typed Optional; and an ``overload`` cached on its own segfaulted when
# a kernel calling it was loaded from the cache in a new process.

def _none_codegen(context, builder, sig, args):
    return context.get_dummy_value()


@intrinsic
def _flat(typingctx, a):
    """``a`` (C-contiguous) as a flat view, or None."""
    if _is_none(a):
        return types.none(a), _none_codegen

    def codegen(context, builder, sig, args):
        return context.compile_internal(builder, lambda a: a.reshape(a.size), sig, args)
    return a.copy(ndim=1, layout="C")(a), codegen


def _rows_of(a, rows, width):
    if a.size == 0:
        return a.reshape(0, 0)
    return a.reshape(rows, width)


@intrinsic
def _rows_view(typingctx, a, rows, width):
    """``a`` (C-contiguous) as a (rows, width) view (an empty array: an empty view), or
    None."""
    if _is_none(a):
        return types.none(a, rows, width), _none_codegen

    def codegen(context, builder, sig, args):
        return context.compile_internal(builder, _rows_of, sig, args)
    return a.copy(ndim=2, layout="C")(a, rows, width), codegen


@kernel()
def _ep(v, resf, i, relu):
    """The forward's epilogue of ``v`` written at flat ``i``: ``relu(v + resf[i])``."""
    if resf is not None:
        v = v + resf[i]
    return _relu_if(v, relu)


@kernel()
def _grad(gf, yf, i):
    """``gf[i]`` masked by ``yf[i] > 0`` (``yf`` None: unmasked)."""
    if yf is None:
        return gf[i]
    return _masked_value(gf[i], yf[i])


@kernel()
def _put(af, i, v):
    """``af[i] = v`` unless ``af`` is empty."""
    if af.size != 0:
        af[i] = v

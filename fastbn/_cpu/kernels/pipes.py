"""Code generation for the pipelined and strided loops: a line of the next channel is
reduced while a line of the current one is written (``_pipelined_lines``), and
runs spaced by a stride are reduced in several independent chains.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .codegen import (
    _affine_expr, _dx_expr, _epilogue, _is_none, _item_pointer, _line_type, _load_line, _masked,
    _masked_grad_line, _nonempty, _splat, _store_line, _store_line_nt
)
from .tiles import PREFETCH_BYTES, _prefetch


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
    once ``k >= wrap``).  An input typed None is skipped (its line is None).  The two sums
    are added to ``acc[0]`` and ``acc[1]`` (float64).  ``write(lines, extras, i)`` returns
    the line stored at flat ``i``.  The reduced lines start at their run's start, whatever
    the output's alignment (which places the written lines), so the sums do not depend on
    where the output lies.
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
            if _is_none(tys[n]):
                ahead_lines.append(None)
                continue
            _prefetch(context, builder, tys[n], vals[n], ahead)
            ahead_lines.append(_load_f64_line(context, builder, tys[n], vals[n],
                                              builder.add(nxt, k), vty))
        for acc, term in zip(accs, reduce(ahead_lines, extras)):
            builder.store(builder.fadd(builder.load(acc), term), acc)
        with builder.if_then(builder.icmp_signed("<", loop.index, nwrite), likely=True):
            i = builder.add(cur, k)
            lines = [None if _is_none(tys[n]) else _load_line(context, builder, tys[n], vals[n],
                                                                i, vty)
                     for n in range(ninputs)]
            _store_line_nt(context, builder, tys[ninputs], vals[ninputs], i,
                           write(lines, extras, i))
    _add_lane_sums(context, builder, accs, tys[-1], vals[-1])
    return context.get_dummy_value()


_PIPE_GEOMETRY = (types.intp,) * 7  # nxt, cur, nreduce, nwrite, pf, wrap, jump


def _prefetch_operand(context, builder, aryty, ary, i):
    """Prefetch ``ary`` (None: nothing) ``PREFETCH_BYTES`` ahead of flat ``i``: a residual
    is the write's only stream from memory, which the next channel's prefetches do not
    cover."""
    if _is_none(aryty):
        return
    ahead = context.get_constant(types.intp, PREFETCH_BYTES // (aryty.dtype.bitwidth // 8))
    _prefetch(context, builder, aryty, ary, builder.add(i, ahead))


@intrinsic
def _pipe_dev_sums_affine(typingctx, x, y, nxt, cur, nreduce, nwrite, pf, wrap, jump, center,
                          hi, lo, scale, shift, res, relu, acc):
    """Pipelined forward run: ``d = x[nxt + k] - center`` adds ``sum(d)``, ``sum(d*d)``
    to ``acc``; ``y[cur + k] = ((x[cur + k] - hi) - lo) * scale + shift`` with the epilogue
    (``codegen._epilogue``), streamed."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[0].dtype)
        dvty = ir.VectorType(ir.DoubleType(), vty.count)

        def reduce(lines, extras):
            d = builder.fsub(lines[0], _splat(context, builder, args[extras[0]], types.float64,
                                              types.float64, dvty))
            return d, builder.fmul(d, d)

        def write(lines, extras, i):
            params = [_splat(context, builder, args[e], sig.args[e], sig.args[0].dtype, vty)
                      for e in extras[1:5]]
            _prefetch_operand(context, builder, sig.args[extras[5]], args[extras[5]], i)
            return _epilogue(context, builder, sig, args, _affine_expr(builder, lines[0], *params),
                             i, extras[5], extras[6], vty)
        return _pipelined_lines(context, builder, sig, args, 1, reduce, write)
    sig = types.void(x, y, *_PIPE_GEOMETRY, types.float64, hi, lo, scale, shift, res,
                     types.boolean, acc)
    return sig, codegen


@intrinsic
def _pipe_grad_sums_dx(typingctx, dy, x, y, dx, nxt, cur, nreduce, nwrite, pf, wrap, jump, mean,
                       hi, lo, a, b, k, dres, acc):
    """Pipelined backward run: adds ``sum(g)`` and ``sum(g * (x - mean))`` over the lines
    at ``nxt`` to ``acc``; ``dx[cur + k] = ((g - b) - ((x - hi) - lo) * k) * a``, streamed,
    ``g`` the line of ``dy`` masked by ``y > 0`` (``y`` None: ``dy``), and ``g`` into
    ``dres`` unless it is empty."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[1].dtype)
        dvty = ir.VectorType(ir.DoubleType(), vty.count)

        def grad(lines):
            return lines[0] if lines[2] is None else _masked(builder, lines[0], lines[2])

        def reduce(lines, extras):
            m = _splat(context, builder, args[extras[0]], types.float64, types.float64, dvty)
            g = grad(lines)
            return g, builder.fmul(g, builder.fsub(lines[1], m))

        def write(lines, extras, i):
            params = [_splat(context, builder, args[e], sig.args[e], sig.args[1].dtype, vty)
                      for e in extras[1:6]]
            g = grad(lines)
            dres = extras[6]
            with builder.if_then(_nonempty(context, builder, sig.args[dres], args[dres])):
                _store_line_nt(context, builder, sig.args[dres], args[dres], i, g)
            return _dx_expr(builder, g, lines[1], *params)
        return _pipelined_lines(context, builder, sig, args, 3, reduce, write)
    sig = types.void(dy, x, y, dx, *_PIPE_GEOMETRY, types.float64, hi, lo, a, b, k, dres, acc)
    return sig, codegen


@intrinsic
def _pipe_sum_copy(typingctx, x, y, nxt, cur, nreduce, nwrite, pf, wrap, jump, r, acc):
    """The pipelined forward's traffic alone: sum the lines at ``nxt``, copy those at ``cur``
    (``r`` not None: ``y = x + r`` there, ``r`` prefetched as the fused forward does)."""
    def codegen(context, builder, sig, args):
        vty = _line_type(context, sig.args[0].dtype)

        def write(lines, extras, i):
            rty, rv = sig.args[extras[0]], args[extras[0]]
            if _is_none(rty):
                return lines[0]
            _prefetch_operand(context, builder, rty, rv, i)
            return builder.fadd(lines[0], _load_line(context, builder, rty, rv, i, vty))
        return _pipelined_lines(context, builder, sig, args, 1,
                                lambda lines, extras: (lines[0], lines[0]), write)
    return types.void(x, y, *_PIPE_GEOMETRY, r, acc), codegen


@intrinsic
def _pipe_sum2_add(typingctx, a, b, c, out, nxt, cur, nreduce, nwrite, pf, wrap, jump, out_c,
                   acc):
    """The pipelined backward's traffic alone: sum two inputs at ``nxt``, add them at ``cur``;
    a third input ``c`` (not None) is also summed at ``nxt`` and copied into ``out_c`` at
    ``cur`` (ReLU's ``y`` read, ``dresidual`` written)."""
    def codegen(context, builder, sig, args):
        def reduce(lines, extras):
            first = lines[0] if lines[2] is None else builder.fadd(lines[0], lines[2])
            return first, lines[1]

        def write(lines, extras, i):
            if lines[2] is not None:
                _store_line_nt(context, builder, sig.args[extras[0]], args[extras[0]], i,
                               lines[2])
            return builder.fadd(lines[0], lines[1])
        return _pipelined_lines(context, builder, sig, args, 3, reduce, write)
    return types.void(a, b, c, out, *_PIPE_GEOMETRY, out_c, acc), codegen


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
def _strided_grad_sums(typingctx, gf, xf, yf, start, nruns, stride, nlines, mean, acc):
    """Runs of flat ``gf`` (dy) and ``xf`` as in ``_strided_dev_sums``: ``sum(g)`` and
    ``sum(g * (x - mean))`` of their whole lines into ``acc``, ``g`` the line of ``dy``
    masked by ``yf > 0`` (``yf`` None: ``dy``)."""
    def codegen(context, builder, sig, args):
        gty, xty = sig.args[0], sig.args[1]
        vty = _line_type(context, xty.dtype)
        dvty = ir.VectorType(ir.DoubleType(), vty.count)
        m = _splat(context, builder, args[7], types.float64, types.float64, dvty)

        def terms(i):
            g = _load_line(context, builder, gty, args[0], i, vty)
            g = _masked_grad_line(context, builder, sig, args, g, i, 2, vty)
            if xty.dtype != types.float64:
                g = builder.fpext(g, dvty)
            return g, g, builder.fsub(_load_f64_line(context, builder, xty, args[1], i, vty), m)
        _strided_sums(context, builder, vty.count, *args[3:7], terms, sig.args[8], args[8])
        return context.get_dummy_value()
    return types.void(gf, xf, yf, *_STRIDES, types.float64, acc), codegen


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
                             hi, lo, scale, shift, res, relu, acc):
    """``_strided_dev_sums`` of the runs at ``start`` while the runs at ``wstart`` (same
    geometry) are normalized into ``yf`` with ordinary stores, with the epilogue
    (``codegen._epilogue``): the statistics of one channel and the output of the previous
    one in a single loop.  Both come from L2 for a batch that stays in cache; the
    reduction's float64 arithmetic then hides the write's traffic."""
    def codegen(context, builder, sig, args):
        xty, yty = sig.args[0], sig.args[6]
        vty = _line_type(context, xty.dtype)
        params = [_splat(context, builder, args[n], sig.args[n], xty.dtype, vty)
                  for n in range(8, 12)]
        cached = ir.Constant(ir.IntType(1), 0)

        def write(offset):
            i = builder.add(args[7], offset)
            v = _load_line(context, builder, xty, args[0], i, vty)
            r = _epilogue(context, builder, sig, args, _affine_expr(builder, v, *params), i, 12,
                          13, vty)
            _store_line(context, builder, yty, args[6], i, r, cached)

        _strided_lines(context, builder, xty, *args[:6], sig.args[14], args[14], write)
        return context.get_dummy_value()
    return types.void(xf, *_STRIDES, types.float64, yf, types.intp, hi, lo, scale, shift, res,
                      types.boolean, acc), codegen

"""Canonical (outer, C, inner) views of arrays with any shape, axis and strides.

Statistics reduce over every axis but the channel axis, so the order and
direction of the other axes do not matter: a Fortran-ordered, transposed or
reversed array is still one contiguous block once those axes are permuted and
flipped.  ``Layout`` finds that permutation for an input and applies the same
one to every array of the same call (dy, out), so kernels only ever see
C-contiguous (outer, C, inner) arrays.  Anything that cannot be viewed that way
is copied once, in an order close to its memory order.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    index: tuple  # slices that reverse the non-channel axes with negative strides
    order: tuple  # axis permutation applied after ``index``
    tshape: tuple  # shape after the permutation
    shape3: tuple  # (outer, C, inner)

    @classmethod
    def of(cls, a, axis):
        """The layout that makes ``a`` (or arrays laid out like it) contiguous."""
        if a.flags.c_contiguous:
            return _identity_layout(a.shape, axis)
        index = tuple(
            slice(None, None, -1) if (d != axis and a.strides[d] < 0) else slice(None)
            for d in range(a.ndim)
        )
        strides = a[index].strides
        # Largest stride first; ties (size-1 axes) keep their position.
        order = tuple(sorted(range(a.ndim),
                             key=lambda d: (-abs(strides[d]) if a.shape[d] > 1 else 0, d)))
        tshape = tuple(a.shape[d] for d in order)
        pos = order.index(axis)
        outer = math.prod(tshape[:pos])
        inner = math.prod(tshape[pos + 1:])
        return cls(index, order, tshape, (outer, a.shape[axis], inner))

    def transformed(self, a):
        return a[self.index].transpose(self.order)

    def untransformed(self, t):
        return t.transpose(np.argsort(self.order))[self.index]

    def view3(self, a):
        """A C-contiguous (outer, C, inner) view of ``a``, or None if that needs a copy."""
        t = self.transformed(a)
        return t.reshape(self.shape3) if t.flags.c_contiguous else None

    def work3(self, a, dtype):
        """``a`` as a C-contiguous (outer, C, inner) array of ``dtype``: a view when possible."""
        if a.dtype == dtype:
            v = self.view3(a)
            if v is not None:
                return v
        return np.ascontiguousarray(self.transformed(a), dtype=dtype).reshape(self.shape3)

    def new(self, dtype):
        """A fresh (3-D work view, caller-facing array) pair laid out like the input."""
        t = np.empty(self.tshape, dtype=dtype)
        return t.reshape(self.shape3), self.untransformed(t)


@functools.lru_cache(maxsize=256)
def _identity_layout(shape, axis):
    """The layout of a C-contiguous array: no permutation, no flips (cached by shape)."""
    ndim = len(shape)
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1:])
    return Layout((slice(None),) * ndim, tuple(range(ndim)), tuple(shape),
                  (outer, shape[axis], inner))


class Output:
    """Where a kernel writes, and how the result reaches the caller.

    ``y3`` is the C-contiguous (outer, C, inner) array the kernel fills;
    ``result`` is what the API returns (``out`` itself when given).  When
    ``out`` cannot be viewed like the input, has another dtype (float16 is
    computed in float32) or overlaps an input at other positions, the kernel
    writes a temporary that ``finish()`` copies into ``result``.
    """

    def __init__(self, layout, out, out_dtype, work_dtype, inputs3):
        self._layout = layout
        self._copy_to = None
        if out is None and out_dtype == work_dtype:
            self.y3, self.result = layout.new(work_dtype)
            return
        if out is None:
            _, self.result = layout.new(out_dtype)
        else:
            self.result = out
            if out.dtype == work_dtype:
                v = layout.view3(out)
                if v is not None and not any(_overlaps_elsewhere(v, a) for a in inputs3):
                    self.y3 = v
                    return
        self.y3 = np.empty(layout.shape3, dtype=work_dtype)
        self._copy_to = layout.transformed(self.result)

    def align_like(self, other3, line=64):
        """Make ``y3`` lie at ``other3``'s offset within a cache line (through a temporary
        when it does not): a kernel writing both with streaming stores splits them into the
        same whole lines."""
        if (_address(self.y3) - _address(other3)) % line == 0:
            return
        y3 = empty_at_line_offset(self.y3.shape, self.y3.dtype, other3, line)
        if self._copy_to is None:
            self._copy_to = self._layout.transformed(self.result)
        self.y3 = y3

    def finish(self):
        if self._copy_to is not None:
            np.copyto(self._copy_to, self.y3.reshape(self._copy_to.shape), casting="unsafe")
        return self.result


def _address(a):
    return a.__array_interface__["data"][0]


def empty_at_line_offset(shape, dtype, other, line=64):
    """An uninitialized array that starts at ``other``'s offset within a ``line``-byte cache
    line (two outputs written together with streaming stores then split into the same
    whole lines).  ``fastbn.capi._entries._aligned_like`` is its nopython twin."""
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    raw = np.empty(size + line // dtype.itemsize, dtype=dtype)
    start = (_address(other) - _address(raw)) % line // dtype.itemsize
    return raw[start:start + size].reshape(shape)


def _overlaps_elsewhere(y3, a3):
    """True if writing ``y3`` element-wise could clobber an element of ``a3`` not yet read."""
    if not np.may_share_memory(y3, a3):
        return False
    return y3.__array_interface__["data"][0] != a3.__array_interface__["data"][0]

"""The host backend under ``NUMBA_DISABLE_JIT=1``: the same operations in plain NumPy.

People debug Numba code with the JIT disabled, but fastbn's kernels are built on LLVM
intrinsics (vector lines, non-temporal stores, atomics) that have no pure-Python form.
With the JIT off, every host call comes here instead: float64 two-pass statistics and
NumPy arithmetic, the same results within docs/contract.md section 5, slowly.
"""

import numpy as np

from .. import _moments
from .calls import HostCalls


def _columns(a, axis):
    """``a`` as float64 (values, C): the channel axis last, every other axis flattened."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    return a.reshape(-1, a.shape[-1])


def _per_channel_view(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def _epilogue(y, residual, relu):
    """Contract section 6: ``relu(y + residual)`` (float64; NaN stays NaN)."""
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    if relu:
        y = np.where(y < 0, 0.0, y)
    return y


def _masked_grad(dy, y):
    g = np.asarray(dy, dtype=np.float64)
    if y is None:
        return g
    return np.where(np.asarray(y, dtype=np.float64) > 0, g, 0.0)


def _result(values, like, out, out_dtype):
    """``values`` (float64, ``like``'s shape) written into ``out`` or a new array laid out
    like ``like``."""
    dest = out if out is not None else np.empty_like(like, dtype=out_dtype)
    np.copyto(dest, values, casting="unsafe")
    return dest


class NumPyBackend(HostCalls):
    name = "numpy"
    device = False

    # ----------------------------------------------------------------- statistics
    def moments(self, x, axis, dtype):
        cols = _columns(x, axis)
        n = float(cols.shape[0])
        mean = cols.mean(axis=0)
        m2 = ((cols - mean) ** 2).sum(axis=0)
        return n, mean, m2

    def feature_stats(self, x, axis, dtype, min_max=True):
        cols = _columns(x, axis)
        ok = ~np.isnan(cols)
        count = ok.sum(axis=0).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(ok, cols, 0.0).sum(axis=0) / count
            m2 = np.where(ok, (cols - mean) ** 2, 0.0).sum(axis=0)
        mean = np.where(count > 0, mean, np.nan)
        m2 = np.where(count > 0, m2, np.nan)
        if not min_max:
            return count, mean, m2, None, None
        with np.errstate(invalid="ignore"):
            vmin = np.where(count > 0, np.nanmin(np.where(ok, cols, np.inf), axis=0, initial=np.inf),
                            np.nan)
            vmax = np.where(count > 0, np.nanmax(np.where(ok, cols, -np.inf), axis=0,
                                                 initial=-np.inf), np.nan)
        return count, mean, m2, vmin, vmax

    def weighted_feature_stats(self, x2, weights, dtype):
        cols = np.asarray(x2, dtype=np.float64)
        ok = ~np.isnan(cols)
        w = np.where(ok, np.asarray(weights, dtype=np.float64)[:, None], 0.0)
        count = w.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(ok, w * cols, 0.0).sum(axis=0) / count
            m2 = np.where(ok, w * (cols - mean) ** 2, 0.0).sum(axis=0)
        return count, np.where(count > 0, mean, np.nan), np.where(count > 0, m2, np.nan)

    # ----------------------------------------------------------------- forward
    def forward_train(self, x, axis, weight, bias, eps, out, out_dtype, residual=None,
                      relu=False):
        n, mean, m2 = self.moments(x, axis, out_dtype)
        var = m2 / n
        inv = _moments.invstd(var, eps)
        scale = inv * weight
        y = _epilogue(self._affine_values(x, axis, mean, scale, bias), residual, relu)
        return _result(y, x, out, out_dtype), mean, var, inv

    def forward_train_contiguous(self, x, axis, weight, bias, eps, out):
        return self.forward_train(x, axis, weight, bias, eps, out, x.dtype)

    def inference_scale(self, var, eps, weight):
        return _moments.invstd(var, eps) * np.asarray(weight, dtype=np.float64)

    def inference_contiguous(self, x, axis, mean, var, weight, bias, eps, out):
        return self.affine(x, axis, mean, self.inference_scale(var, eps, weight), bias, out,
                           x.dtype)

    def _affine_values(self, x, axis, mean, scale, shift):
        nd = np.ndim(x)
        x64 = np.asarray(x, dtype=np.float64)
        return ((x64 - _per_channel_view(mean, nd, axis)) * _per_channel_view(scale, nd, axis)
                + _per_channel_view(shift, nd, axis))

    def affine(self, x, axis, mean, scale, shift, out, out_dtype, residual=None, relu=False):
        y = _epilogue(self._affine_values(x, axis, mean, scale, shift), residual, relu)
        return _result(y, x, out, out_dtype)

    def minmax(self, x, axis, lo, hi, scale, f0, f1, out, out_dtype):
        nd = np.ndim(x)
        x64 = np.asarray(x, dtype=np.float64)
        lo, hi, scale = (_per_channel_view(v, nd, axis) for v in (lo, hi, scale))
        with np.errstate(invalid="ignore"):
            below = (x64 < lo + (hi - lo) / 2) | ~(hi > lo)
        y = np.where(below, (x64 - lo) * scale + f0, (x64 - hi) * scale + f1)
        return _result(y, x, out, out_dtype)

    # ----------------------------------------------------------------- backward
    def grad_sums(self, dy, x, axis, mean, dtype):
        g, xc = _columns(dy, axis), _columns(x, axis)
        return g.sum(axis=0), (g * (xc - mean)).sum(axis=0)

    def dx_from_sums(self, dy, x, axis, mean, invstd, weight, sum_dy, sum_dy_xmu, n, out,
                     out_dtype):
        nd = np.ndim(x)
        view = lambda v: _per_channel_view(v, nd, axis)  # noqa: E731
        x64, g = np.asarray(x, dtype=np.float64), np.asarray(dy, dtype=np.float64)
        inv = np.asarray(invstd, dtype=np.float64)
        dx = view(weight * inv) * (g - view(sum_dy / n)
                                   - (x64 - view(mean)) * view(inv * inv * sum_dy_xmu / n))
        return _result(dx, x, out, out_dtype)

    def backward_train(self, dy, x, axis, mean, invstd, weight, out, out_dtype, y=None,
                       residual_grad=False, residual_out=None):
        g = _masked_grad(dy, y)
        s, sx = self.grad_sums(g, x, axis, mean, out_dtype)
        n = float(_columns(x, axis).shape[0])
        dres = _result(g, x, residual_out, out_dtype) if residual_grad else None
        return (self.dx_from_sums(g, x, axis, mean, invstd, weight, s, sx, n, out, out_dtype),
                s, sx, dres)

    def backward_train_contiguous(self, dy, x, axis, mean, invstd, weight, out):
        return self.backward_train(dy, x, axis, mean, invstd, weight, out, x.dtype)[:3]

    # ----------------------------------------------------------------- the rest
    def compile_kernels(self, dtype, serial=False):
        """Nothing to compile with the JIT disabled."""


backend = NumPyBackend()

"""Outputs over the streaming threshold (4 MiB) take the non-temporal vector-store path.

Every other test uses small arrays, which are written with ordinary stores, so
these check the line-by-line path against the reference: both kernel families,
every op, float32 and float64, aligned and misaligned outputs, in place.
"""

import numpy as np
import pytest

import fastbn
import reference as ref
from fastbn._cpu import kernels

CASES = [
    ((8, 16, 96, 96), 1, np.float32),    # channel path, 4.7 MB
    ((4, 16, 96, 96), 1, np.float64),    # channel path, 4.7 MB
    ((12_000, 100), -1, np.float32),     # column path, rows not whole lines
    ((6_000, 100), -1, np.float64),
    ((6_000, 16, 16), 1, np.float32),    # column path, inner 16: whole lines
]
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def misaligned_like(x):
    """An output array whose data starts one element past a 64-byte boundary."""
    buf = np.empty(x.size + 16, dtype=x.dtype)
    offset = (-buf.ctypes.data % 64) // x.itemsize + 1
    return buf[offset:offset + x.size].reshape(x.shape)


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{np.dtype(c[2]).name}")
def case(request, rng):
    shape, axis, dtype = request.param
    assert np.prod(shape) * np.dtype(dtype).itemsize >= kernels.STREAM_MIN_BYTES
    x = (3.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy, axis


@pytest.mark.parametrize("where", ["new", "misaligned", "in-place"])
def test_forward_inference_backward_streamed(case, where, rng):
    x, dy, axis = case
    tol = TOL[x.dtype.type]
    c = x.shape[axis]
    w, b = rng.uniform(0.5, 2, c), rng.normal(size=c)
    y_ref, mean_ref, var_ref, inv_ref = ref.forward(x, w, b, axis=axis)
    _, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis)
    dx_ref = ref.backward(dy, x, mean, invstd, w, axis=axis)[0]
    inf_ref = ref.inference(x, mean_ref, var_ref, w, b, axis=axis)

    def out_for(a):
        if where == "new":
            return None
        if where == "misaligned":
            return misaligned_like(a)
        return a.copy()

    xin = x.copy() if where == "in-place" else x
    out = xin if where == "in-place" else out_for(x)
    y, _, _ = fastbn.batch_norm_forward(xin, w, b, axis=axis, out=out)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=tol * 4)

    xin = x.copy() if where == "in-place" else x
    out = xin if where == "in-place" else out_for(x)
    y = fastbn.batch_norm_inference(xin, mean_ref, var_ref, w, b, axis=axis, out=out)
    np.testing.assert_allclose(y, inf_ref, rtol=0, atol=tol * 4)

    g = dy.copy() if where == "in-place" else dy
    out = g if where == "in-place" else out_for(dy)
    dx, _, _ = fastbn.batch_norm_backward(g, x, mean, invstd, w, axis=axis, out=out)
    scale = max(1.0, float(np.abs(dx_ref).max()))
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=tol * 4 * scale)

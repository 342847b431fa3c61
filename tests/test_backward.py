"""Backward against the reference, and against finite differences of the forward."""

import numpy as np
import pytest

import fastbn
import reference as ref
from helpers import LAYOUTS, make, tol_key, with_layout

ATOL = {np.float16: 1e-2, np.float32: 1e-5, np.float64: 1e-12}


def check_backward(dy, x, weight=None, axis=1, **kwargs):
    _, mean, invstd = fastbn.batch_norm_forward(x, weight, axis=axis)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, **kwargs)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, weight, axis=axis)
    key = tol_key(np.result_type(np.asarray(x).dtype, np.asarray(dy).dtype))
    scale = max(1.0, float(np.max(np.abs(dx_ref))))
    assert dx.dtype == key and dx.shape == np.shape(x)
    np.testing.assert_allclose(dx.astype(np.float64), dx_ref, rtol=1e-3 if key == np.float16 else 0,
                               atol=ATOL[key] * scale)
    sums = np.abs(ref._moved(dy, axis % np.ndim(x))).sum(axis=0).astype(np.float64)
    stats_tol = 1e-12 if key == np.float64 else 1e-5
    np.testing.assert_array_less(np.abs(dbias - db_ref), stats_tol * (sums + 1))
    np.testing.assert_array_less(np.abs(dweight - dw_ref), stats_tol * (sums + 1) * 4)
    return dx, dweight, dbias


@pytest.mark.parametrize("shape,axis", [
    ((5, 3, 9, 8), 1), ((37, 5), 1), ((4, 6, 5), -1), ((3, 4, 2, 5, 7), 2),
    ((16, 32, 80), 1), ((4, 2, 64, 72), 1), ((3000, 24), 1), ((10, 3, 4097), 1),
    # channel path, sums over short runs in registers: whole lines, tails, several
    # batches of rows, and channels split in parts along the batch
    ((32, 12, 64), 1), ((9, 5, 67), 1), ((150, 3, 128), 1), ((200, 2, 96), 1),
])
@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
def test_backward_matches_reference(rng, shape, axis, dtype, kernel_plan):
    x = make(rng, shape, dtype, offset=2.0)
    dy = make(rng, shape, dtype, offset=0.3)
    check_backward(dy, x, rng.uniform(0.5, 2, shape[axis]), axis=axis)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_layouts(rng, layout):
    x = with_layout(make(rng, (6, 5, 7, 3), np.float32), layout, 1)
    dy = with_layout(make(rng, (6, 5, 7, 3), np.float32), layout, 1)
    check_backward(dy, x, axis=1)


def test_backward_without_weight_and_out(rng):
    x = make(rng, (8, 4, 10), np.float64)
    dy = make(rng, (8, 4, 10), np.float64)
    out = np.empty_like(x)
    dx, _, _ = check_backward(dy, x, out=out)
    assert dx is out


@pytest.mark.parametrize("target", ["dy", "x"])
def test_backward_in_place(rng, target, kernel_plan):
    x = make(rng, (8, 4, 100), np.float32)
    dy = make(rng, (8, 4, 100), np.float32)
    _, mean, invstd = fastbn.batch_norm_forward(x)
    expected = ref.backward(dy, x, mean, invstd)[0]
    out = dy if target == "dy" else x
    fastbn.batch_norm_backward(dy, x, mean, invstd, out=out)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_backward_finite_differences(rng):
    """dL/dx, dL/dweight, dL/dbias of L = sum(g * y) by central differences (float64)."""
    shape, axis = (4, 3, 5), 1
    x = rng.normal(1.0, 2.0, shape)
    w = rng.uniform(0.5, 2, 3)
    b = rng.normal(size=3)
    g = rng.normal(size=shape)

    def loss(x_, w_=w, b_=b):
        return float(np.sum(g * fastbn.batch_norm_forward(x_, w_, b_, axis=axis, eps=1e-3)[0]))

    _, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, eps=1e-3)
    dx, dw, db = fastbn.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
    h = 1e-6
    num_dx = np.zeros_like(x)
    for idx in np.ndindex(shape):
        e = np.zeros_like(x)
        e[idx] = h
        num_dx[idx] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, num_dx, rtol=1e-6, atol=1e-7)
    for c in range(3):
        e = np.zeros(3)
        e[c] = h
        np.testing.assert_allclose(dw[c], (loss(x, w + e) - loss(x, w - e)) / (2 * h), rtol=1e-6)
        np.testing.assert_allclose(db[c], (loss(x, w, b + e) - loss(x, w, b - e)) / (2 * h), rtol=1e-6)


def test_backward_constant_channel_with_eps_zero_gives_zero_dx(rng):
    x = make(rng, (6, 2, 5), np.float64)
    x[:, 1] = 3.0
    dy = make(rng, (6, 2, 5), np.float64)
    _, mean, invstd = fastbn.batch_norm_forward(x, eps=0.0)
    assert invstd[1] == 0.0
    dx, dw, _ = fastbn.batch_norm_backward(dy, x, mean, invstd)
    assert np.all(dx[:, 1] == 0.0) and dw[1] == 0.0
    assert np.all(np.isfinite(dx))

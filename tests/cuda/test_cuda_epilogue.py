"""The fused epilogues (contract section 6) on device arrays: residual add and ReLU after
the training forward and inference, ReLU's mask and the residual's gradient in the
backward, against the float64 reference that composes the unfused steps (as
tests/test_epilogue.py does on the host).

Shapes reach every CUDA path: the one-block-per-channel forward (float32 and float16
channels of at most ``FUSED_MAX`` values), the two-pass forward in planes and in rows
(channels-last, 2-D), and both layouts of the gradient sums.

Host values come from the float64 reference only (no host kernel compiles: the GPU
check's dry run has a cold cache), and the dtypes other than float32 take the full
epilogue only (the simulator runs every GPU thread as a Python thread).
"""

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import host
from helpers import assert_output, make
from test_cuda_api import SHAPES

DTYPES = (np.float16, np.float32, np.float64)


def _inputs(rng, shape, dtype, axis):
    c = shape[axis]
    return (make(rng, shape, dtype, offset=3.0), make(rng, shape, dtype),
            rng.uniform(0.5, 2.0, c), rng.normal(size=c))


FORWARD_CASES = [(dtype, True, "relu") for dtype in DTYPES] + [
    (np.float32, False, "relu"), (np.float32, True, None)]


def _forward_ref(x, w, b, axis, residual=None, activation=None):
    """The composed reference's ``y`` in ``x``'s dtype, and the batch statistics."""
    y0, mean, _, inv = ref.forward(x, w, b, axis=axis)
    return np.ascontiguousarray(ref.epilogue(y0, residual, activation), dtype=x.dtype), mean, inv


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype,residual_given,activation", FORWARD_CASES)
def test_forward_with_epilogue(rng, dev, shape, axis, dtype, residual_given, activation):
    x, residual, w, b = _inputs(rng, shape, dtype, axis)
    res = dev(residual) if residual_given else None
    y, mean, invstd = fastbn.batch_norm_forward(dev(x), dev(w), dev(b), axis=axis, residual=res,
                                                activation=activation)
    y0 = ref.forward(x, w, b, axis=axis)[0]
    expected = ref.epilogue(y0, residual if residual_given else None, activation)
    assert_output(host(y), expected, dtype, scale=4.0)
    # the statistics are x's alone: the plain forward's, bit for bit
    _, mean_plain, inv_plain = fastbn.batch_norm_forward(dev(x), dev(w), dev(b), axis=axis)
    np.testing.assert_array_equal(host(mean), host(mean_plain))
    np.testing.assert_array_equal(host(invstd), host(inv_plain))
    if activation == "relu":
        assert (host(y) >= 0).all()


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_with_epilogue(rng, dev, shape, axis, dtype):
    x, residual, w, b = _inputs(rng, shape, dtype, axis)
    c = shape[axis]
    rm, rv = rng.normal(size=c) + 3.0, rng.uniform(0.5, 2.0, c)
    y = fastbn.batch_norm_inference(dev(x), dev(rm), dev(rv), dev(w), dev(b), axis=axis,
                                    residual=dev(residual), activation="relu")
    expected = ref.epilogue(ref.inference(x, rm, rv, w, b, axis=axis), residual, "relu")
    assert_output(host(y), expected, dtype, scale=4.0)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype,activation", [(dtype, "relu") for dtype in DTYPES]
                         + [(np.float32, None)])
def test_backward_through_epilogue(rng, dev, shape, axis, dtype, activation):
    x, residual, w, b = _inputs(rng, shape, dtype, axis)
    y, mean, invstd = _forward_ref(x, w, b, axis, residual, activation)
    dy = make(rng, shape, dtype)
    dx, dw, db, dres = fastbn.batch_norm_backward(
        dev(dy), dev(x), dev(mean), dev(invstd), dev(w), axis=axis, activation=activation,
        y=dev(y), residual_grad=True)
    edx, edw, edb, eres = ref.backward_through(dy, x, mean, invstd, w, axis, y, activation)
    n = x.size // shape[axis]
    assert_output(host(dx), edx, dtype, scale=8.0)
    tol = {np.float16: 2e-2, np.float32: 1e-4, np.float64: 1e-10}[dtype]
    np.testing.assert_allclose(host(dw), edw, rtol=tol, atol=tol * np.sqrt(n))
    np.testing.assert_allclose(host(db), edb, rtol=tol, atol=tol * np.sqrt(n))
    assert host(dres).dtype == host(dx).dtype
    np.testing.assert_array_equal(host(dres).astype(np.float64), eres)
    # without residual_grad: three outputs, the same dx
    dx3, dw3, _ = fastbn.batch_norm_backward(dev(dy), dev(x), dev(mean), dev(invstd), dev(w),
                                             axis=axis, activation=activation, y=dev(y))
    np.testing.assert_array_equal(host(dx3), host(dx))
    np.testing.assert_array_equal(host(dw3), host(dw))


def test_mask_stops_the_gradient_at_exactly_zero_and_nan(dev):
    rng = np.random.default_rng(3)
    x = make(rng, (4, 3, 5), np.float32)
    y, mean, invstd = _forward_ref(x, None, None, 1, activation="relu")
    y[0, 0, 0] = np.float32(-0.0)
    y[1, 1, 1] = np.nan
    zeros = ~(y > 0)
    assert zeros.mean() > 0.3
    *_, dres = fastbn.batch_norm_backward(dev(np.ones_like(x)), dev(x), dev(mean), dev(invstd),
                                          activation="relu", y=dev(y), residual_grad=True)
    dres = host(dres)
    assert (dres[zeros] == 0).all() and (dres[~zeros] == 1).all()


@pytest.mark.parametrize("res_dtype", [np.float16, np.float64])
def test_residual_in_another_dtype_and_nan(rng, dev, res_dtype):
    x = make(rng, (4, 3, 5), np.float32, offset=1.0)
    residual = make(rng, x.shape, res_dtype)
    residual[1, 2, 3] = np.nan
    y, mean, _ = fastbn.batch_norm_forward(dev(x), residual=dev(residual), activation="relu")
    y = host(y)
    assert y.dtype == np.float32 and np.isnan(y[1, 2, 3]) and np.isnan(y).sum() == 1
    assert np.isfinite(host(mean)).all()
    assert_output(y, ref.epilogue(ref.forward(x)[0], residual, "relu"), np.float32, scale=4.0)


def test_residual_laid_out_unlike_x_is_refused_clearly(rng, dev):
    x = make(rng, (4, 3, 5), np.float32)
    residual = dev(np.ascontiguousarray(make(rng, (5, 3, 4), np.float32))).transpose((2, 1, 0))
    out = dev(np.full(x.shape, 7.0, np.float32))
    with pytest.raises(ValueError, match="residual must be laid out like x"):
        fastbn.batch_norm_forward(dev(x), residual=residual, out=out)
    assert (host(out) == 7.0).all()


def test_in_place_forms(rng, dev):
    x, residual, w, b = _inputs(rng, (4, 3, 5), np.float32, 1)
    expected = _forward_ref(x, w, b, 1, residual, "relu")
    r = dev(residual)
    y, mean, invstd = fastbn.batch_norm_forward(dev(x), dev(w), dev(b), residual=r,
                                                activation="relu", out=r)
    assert y is r
    np.testing.assert_allclose(host(r), expected[0], atol=1e-5)
    dy = make(rng, x.shape, np.float32)
    want = ref.backward_through(dy, x, expected[1], expected[2], w, 1, expected[0], "relu")
    for into in ("out", "residual_out"):
        g = dev(dy)
        result = fastbn.batch_norm_backward(g, dev(x), dev(expected[1]), dev(expected[2]),
                                            dev(w), activation="relu", y=dev(expected[0]),
                                            residual_grad=True, **{into: g})
        assert result[0 if into == "out" else 3] is g
        np.testing.assert_allclose(host(result[0]), want[0], atol=1e-4)
        np.testing.assert_array_equal(host(result[3]), want[3].astype(np.float32))


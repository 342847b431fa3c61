"""Fused epilogues (contract section 6): residual add and ReLU after batch normalization,
forward, inference and backward, against a float64 reference that composes the unfused
steps, on every kernel path."""

import numpy as np
import pytest

import fastbn
import reference as ref
from helpers import FLOAT_DTYPES, assert_output, make, with_layout

# (shape, axis) per kernel path of the CPU backend, float32 sizes:
PATHS = {
    "column": ((6, 5, 4, 24), -1),  # channels-last: channel runs of one value
    "table": ((300, 24), 1),  # (N, C): the column path with C columns
    "grouped": ((4, 6, 9, 11), 1),  # NCHW, short runs, groups of channels
    "short-runs": ((16, 40, 12, 12), 1),  # float32 runs of 144: the fused short-run loop
    "parts": ((6, 2, 96, 96), 1),  # two channels split over rows, then an affine pass
    "pipelined": ((4, 40, 96, 96), 1),  # > 4 MB: chains of channels, streamed output
}
# outputs over 4 MB on paths that otherwise write small outputs with ordinary stores
STREAMED = {
    "parts-streamed": ((48, 2, 112, 112), 1),  # lines shared by two runs, streamed
    "column-streamed": ((64, 32, 32, 24), -1),  # whole lines of columns, streamed
}


def _inputs(rng, shape, dtype, axis):
    c = shape[axis]
    x = make(rng, shape, dtype, offset=3.0)
    residual = make(rng, shape, dtype)
    w, b = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    return x, residual, w, b


def _relu_zero_lines(x, y):
    """Assert the ReLU output has exact zeros where its pre-activation is negative."""
    assert np.all(y >= 0) or np.isnan(y).any()


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("residual_given, activation", [(True, "relu"), (False, "relu"),
                                                       (True, None)])
def test_forward_with_epilogue_matches_composed_reference(rng, path, dtype, residual_given,
                                                          activation):
    shape, axis = PATHS[path]
    x, residual, w, b = _inputs(rng, shape, dtype, axis)
    res = residual if residual_given else None
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, residual=res,
                                                activation=activation)
    y0, mean0, _, inv0 = ref.forward(x, w, b, axis=axis)
    expected = ref.epilogue(y0, res, activation)
    assert_output(y, expected, dtype, scale=4.0)
    # statistics are those of x alone, bit for bit the plain forward's
    _, mean_plain, inv_plain = fastbn.batch_norm_forward(x, w, b, axis=axis)
    np.testing.assert_array_equal(mean, mean_plain)
    np.testing.assert_array_equal(invstd, inv_plain)
    if activation == "relu":
        assert (y >= 0).all()


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_epilogue_is_plain_output_then_add_then_relu_bit_for_bit(rng, path, dtype):
    """The fused add and ReLU round like the separate NumPy steps in the working dtype."""
    shape, axis = PATHS[path]
    x, residual, w, b = _inputs(rng, shape, dtype, axis)
    y_plain, _, _ = fastbn.batch_norm_forward(x, w, b, axis=axis)
    y, _, _ = fastbn.batch_norm_forward(x, w, b, axis=axis, residual=residual,
                                        activation="relu")
    np.testing.assert_array_equal(y, np.maximum(y_plain + residual, 0))


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_inference_with_epilogue(rng, path, dtype):
    shape, axis = PATHS[path]
    x, residual, w, b = _inputs(rng, shape, dtype, axis)
    c = shape[axis]
    rm, rv = rng.normal(size=c) + 3.0, rng.uniform(0.5, 2.0, c)
    y = fastbn.batch_norm_inference(x, rm, rv, w, b, axis=axis, residual=residual,
                                    activation="relu")
    expected = ref.epilogue(ref.inference(x, rm, rv, w, b, axis=axis), residual, "relu")
    assert_output(y, expected, dtype, scale=4.0)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("activation", ["relu", None])
def test_backward_through_epilogue_matches_chain_rule(rng, path, dtype, activation):
    shape, axis = PATHS[path]
    x, residual, w, b = _inputs(rng, shape, dtype, axis)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, residual=residual,
                                                activation=activation)
    dy = make(rng, shape, dtype)
    dx, dw, db, dres = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                  activation=activation, y=y,
                                                  residual_grad=True)
    edx, edw, edb, eres = ref.backward_through(dy, x, mean, invstd, w, axis, y, activation)
    n = x.size // shape[axis]
    assert_output(dx, edx, dtype, scale=8.0)
    tol = {np.float16: 2e-2, np.float32: 1e-4, np.float64: 1e-10}[dtype]
    np.testing.assert_allclose(dw, edw, rtol=tol, atol=tol * np.sqrt(n))
    np.testing.assert_allclose(db, edb, rtol=tol, atol=tol * np.sqrt(n))
    assert dres.dtype == dx.dtype and dres.shape == x.shape
    np.testing.assert_array_equal(dres.astype(np.float64), eres)
    # the three-output form gives the same dx
    dx3, dw3, db3 = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                               activation=activation, y=y)
    np.testing.assert_array_equal(dx3, dx)
    np.testing.assert_array_equal(dw3, dw)


@pytest.mark.parametrize("path", ["column", "pipelined", "grouped"])
def test_relu_mask_stops_the_gradient_at_exactly_zero(path):
    """Where y is exactly 0 (ReLU clipped it, or it landed on 0) no gradient flows."""
    shape, axis = PATHS[path]
    rng = np.random.default_rng(3)
    x = make(rng, shape, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, activation="relu")
    zeros = y == 0
    assert zeros.mean() > 0.3
    dy = np.ones_like(x)
    *_, dres = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, activation="relu",
                                          y=y, residual_grad=True)
    assert (dres[zeros] == 0).all() and (dres[~zeros] == 1).all()
    y_signed_zero = np.where(zeros, np.float32(-0.0), y)
    *_, dres2 = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, activation="relu",
                                           y=y_signed_zero, residual_grad=True)
    np.testing.assert_array_equal(dres2, dres)


@pytest.mark.parametrize("layout", ["fortran", "reversed", "strided", "transposed"])
@pytest.mark.parametrize("res_dtype", [np.float16, np.float32, np.float64])
def test_residual_with_other_strides_and_dtype(rng, layout, res_dtype):
    shape, axis = (5, 6, 7, 8), 1
    x = make(rng, shape, np.float32, offset=1.0)
    residual = with_layout(make(rng, shape, res_dtype), layout, axis)
    y, _, _ = fastbn.batch_norm_forward(x, axis=axis, residual=residual, activation="relu")
    assert y.dtype == np.float32
    y0 = ref.forward(x, axis=axis)[0]
    assert_output(y, ref.epilogue(y0, residual, "relu"), np.float32, scale=4.0)


def test_in_place_forms(rng):
    shape, axis = (4, 8, 10, 12), 1
    x, residual, w, b = _inputs(rng, shape, np.float32, axis)
    expected, _, _ = fastbn.batch_norm_forward(x, w, b, residual=residual, activation="relu")
    r = residual.copy()
    y, _, _ = fastbn.batch_norm_forward(x, w, b, residual=r, activation="relu", out=r)
    assert y is r
    np.testing.assert_array_equal(r, expected)
    xc = x.copy()
    y, mean, invstd = fastbn.batch_norm_forward(xc, w, b, residual=residual, activation="relu",
                                                out=xc)
    assert y is xc
    np.testing.assert_array_equal(xc, expected)
    # backward: dx into dy, then dresidual into dy
    dy = make(rng, shape, np.float32)
    want = fastbn.batch_norm_backward(dy, x, mean, invstd, w, activation="relu", y=expected,
                                      residual_grad=True)
    for into in ("out", "residual_out"):
        g = dy.copy()
        dx, _, _, dres = fastbn.batch_norm_backward(g, x, mean, invstd, w, activation="relu",
                                                    y=expected, residual_grad=True, **{into: g})
        assert (dx if into == "out" else dres) is g
        np.testing.assert_array_equal(dx, want[0])
        np.testing.assert_array_equal(dres, want[3])


def test_nan_in_the_residual_stays_in_its_values(rng):
    shape, axis = (4, 8, 10, 12), 1
    x, residual, _, _ = _inputs(rng, shape, np.float32, axis)
    residual[1, 2, 3, 4] = np.nan
    y, mean, _ = fastbn.batch_norm_forward(x, axis=axis, residual=residual, activation="relu")
    assert np.isnan(y[1, 2, 3, 4]) and np.isnan(y).sum() == 1
    assert np.isfinite(mean).all()  # statistics are x's alone


def test_bad_arguments_leave_everything_untouched(rng):
    shape, axis = (4, 8, 10, 12), 1
    x, residual, w, b = _inputs(rng, shape, np.float32, axis)
    rm, rv = np.zeros(8), np.ones(8)
    out = np.full_like(x, 7.0)
    dy = np.ones_like(x)
    snapshot = [a.copy() for a in (x, residual, rm, rv, out, dy)]
    bad = [
        (ValueError, "activation", lambda: fastbn.batch_norm_forward(
            x, residual=residual, activation="gelu", running_mean=rm, running_var=rv, out=out)),
        (ValueError, "residual", lambda: fastbn.batch_norm_forward(
            x, residual=residual[:2], running_mean=rm, running_var=rv, out=out)),
        (TypeError, "residual", lambda: fastbn.batch_norm_forward(
            x, residual=residual.astype(complex), running_mean=rm, running_var=rv, out=out)),
        (ValueError, "activation", lambda: fastbn.batch_norm_inference(
            x, rm, rv, activation="tanh", out=out)),
        (ValueError, "needs y", lambda: fastbn.batch_norm_backward(
            dy, x, rm, rv, activation="relu", out=out)),
        (ValueError, "y", lambda: fastbn.batch_norm_backward(
            dy, x, rm, rv, activation="relu", y=x[:1], out=out)),
        (ValueError, "residual_out", lambda: fastbn.batch_norm_backward(
            dy, x, rm, rv, residual_out=out)),
        (ValueError, "different", lambda: fastbn.batch_norm_backward(
            dy, x, rm, rv, out=out, residual_grad=True, residual_out=out)),
        (ValueError, "residual_out", lambda: fastbn.batch_norm_backward(
            dy, x, rm, rv, residual_grad=True, residual_out=out[:, :4])),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
        for a, s in zip((x, residual, rm, rv, out, dy), snapshot):
            np.testing.assert_array_equal(a, s)


def test_bits_do_not_depend_on_thread_count(rng):
    shape, axis = PATHS["pipelined"]
    x, residual, w, b = _inputs(rng, shape, np.float32, axis)
    dy = make(rng, shape, np.float32)
    results = []
    for n in (1, 2):
        with fastbn.threads(n):
            y, mean, invstd = fastbn.batch_norm_forward(x, w, b, residual=residual,
                                                        activation="relu")
            grads = fastbn.batch_norm_backward(dy, x, mean, invstd, w, activation="relu", y=y,
                                               residual_grad=True)
        results.append((y, mean, invstd) + tuple(grads))
    for a, b_ in zip(*results):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("path", ["column", "grouped"])
def test_finite_differences_of_the_fused_backward(path):
    """The fused backward is the gradient of the fused forward: a loss sum(c * y) moved
    along random directions of x and of the residual, central differences, float64."""
    shape, axis = PATHS[path]
    rng = np.random.default_rng(7)
    x = rng.normal(size=shape)
    residual = rng.normal(size=shape)
    c = x.shape[axis]
    w, b = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    coef = rng.normal(size=shape)

    def loss(xv, rv):
        y, _, _ = fastbn.batch_norm_forward(xv, w, b, axis=axis, residual=rv, activation="relu")
        return float((coef * y).sum())

    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, residual=residual,
                                                activation="relu")
    dx, dw, db, dres = fastbn.batch_norm_backward(coef, x, mean, invstd, w, axis=axis,
                                                  activation="relu", y=y, residual_grad=True)
    h = 1e-6
    for _ in range(3):
        u = rng.normal(size=shape)
        fd_x = (loss(x + h * u, residual) - loss(x - h * u, residual)) / (2 * h)
        fd_r = (loss(x, residual + h * u) - loss(x, residual - h * u)) / (2 * h)
        np.testing.assert_allclose((dx * u).sum(), fd_x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose((dres * u).sum(), fd_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_module_with_relu_and_residual_matches_torch(training):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x = rng.normal(1.0, 2.0, (4, 3, 5, 6)).astype(np.float64)
    shortcut = rng.normal(size=x.shape)
    dy = rng.normal(size=x.shape)
    bn = fastbn.BatchNorm(3, activation="relu", dtype=np.float64)
    tbn = torch.nn.BatchNorm2d(3).double()
    tbn.weight.data = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64)
    bn.weight[...] = [0.5, 1.5, 2.0]
    if not training:
        bn(x)  # one training step moves the running statistics away from (0, 1)
        with torch.no_grad():
            tbn(torch.from_numpy(x))
        bn.eval()
        tbn.eval()
    y = bn(x, residual=shortcut)
    dx = bn.backward(dy)
    tx = torch.from_numpy(x).requires_grad_()
    tr = torch.from_numpy(shortcut).requires_grad_()
    ty = torch.relu(tbn(tx) + tr)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), atol=1e-11)
    np.testing.assert_allclose(bn.grad_residual, tr.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, tbn.weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(bn.grad_bias, tbn.bias.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(bn.running_mean, tbn.running_mean.numpy(), rtol=1e-12)


def test_module_without_residual_has_no_residual_gradient():
    bn = fastbn.BatchNorm(3, activation="relu")
    x = np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32)
    y = bn(x)
    assert (y >= 0).all()
    bn.backward(np.ones_like(y))
    assert bn.grad_residual is None
    assert "activation='relu'" in repr(bn)
    with pytest.raises(ValueError, match="activation"):
        fastbn.BatchNorm(3, activation="sigmoid")


@pytest.mark.parametrize("path", sorted(STREAMED))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_outputs_with_epilogue(rng, path, dtype):
    shape, axis = STREAMED[path]
    x, residual, w, b = _inputs(rng, shape, dtype, axis)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, residual=residual,
                                                activation="relu")
    y_plain, _, _ = fastbn.batch_norm_forward(x, w, b, axis=axis)
    np.testing.assert_array_equal(y, np.maximum(y_plain + residual, 0))
    assert_output(y, ref.epilogue(ref.forward(x, w, b, axis=axis)[0], residual, "relu"), dtype,
                  scale=4.0)
    dy = make(rng, shape, dtype)
    dx, dw, db, dres = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                  activation="relu", y=y, residual_grad=True)
    edx, edw, edb, eres = ref.backward_through(dy, x, mean, invstd, w, axis, y, "relu")
    assert_output(dx, edx, dtype, scale=8.0)
    np.testing.assert_array_equal(dres.astype(np.float64), eres)


@pytest.mark.parametrize("path", ["pipelined", "column-streamed"])
def test_residual_out_at_another_line_offset_than_out(rng, path):
    """dresidual and dx are written with the same streaming stores: a residual_out whose
    offset within a cache line differs from out's goes through an aligned temporary and
    still receives exactly the gradient."""
    shape, axis = {**PATHS, **STREAMED}[path]
    x, residual, w, b = _inputs(rng, shape, np.float32, axis)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, axis=axis, residual=residual,
                                                activation="relu")
    dy = make(rng, shape, np.float32)
    want = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, activation="relu",
                                      y=y, residual_grad=True)
    out = np.empty_like(x)
    raw = np.empty(x.size + 1, np.float32)
    shifted = raw[1:] if (raw[1:].ctypes.data - out.ctypes.data) % 64 else raw[:-1]
    residual_out = shifted.reshape(shape)
    assert (residual_out.ctypes.data - out.ctypes.data) % 64
    dx, dw, _, dres = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                 activation="relu", y=y, residual_grad=True,
                                                 out=out, residual_out=residual_out)
    assert dx is out and dres is residual_out
    np.testing.assert_array_equal(dx, want[0])
    np.testing.assert_array_equal(dres, want[3])
    np.testing.assert_array_equal(dw, want[1])

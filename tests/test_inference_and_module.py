"""Inference, the torch-like functional wrapper, running statistics and the BatchNorm layer."""

import numpy as np
import pytest

import fastbn
import reference as ref
from helpers import LAYOUTS, assert_output, make, with_layout


@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64, np.int64))
@pytest.mark.parametrize("shape,axis", [((5, 3, 9, 8), 1), ((37, 5), -1), ((2, 3, 100), 1),
                                        ((4, 5, 6), 0)])
def test_inference_matches_reference(rng, dtype, shape, axis, kernel_plan):
    x = make(rng, shape, dtype, offset=4.0)
    c = shape[axis]
    rm, rv = rng.normal(4.0, 1.0, c), rng.uniform(0.5, 2.0, c)
    w, b = rng.uniform(0.5, 2, c), rng.normal(size=c)
    y = fastbn.batch_norm_inference(x, rm, rv, w, b, axis=axis, eps=1e-3)
    assert_output(y, ref.inference(x, rm, rv, w, b, axis=axis, eps=1e-3), dtype, scale=2.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_layouts_and_out(rng, layout):
    x = with_layout(make(rng, (6, 4, 5, 7), np.float32), layout, 1)
    rm, rv = np.zeros(4, np.float32), np.full(4, 2.0, np.float32)
    out = with_layout(np.empty(x.shape, np.float32), layout, 1)
    y = fastbn.batch_norm_inference(x, rm, rv, out=out)
    assert y is out
    assert_output(out, ref.inference(x, rm, rv), np.float32)


def test_inference_keeps_precision_far_from_zero(rng):
    """float32 running mean 1e4 std away: the compensated subtraction keeps 1e-5."""
    x = make(rng, (64, 8, 70), np.float32, offset=1e4)
    _, mean, var = fastbn.batch_stats(x, axis=1)
    y = fastbn.batch_norm_inference(x, mean.astype(np.float64), var, eps=0.0)
    assert_output(y, ref.inference(x, mean.astype(np.float64), var, eps=0.0), np.float32)


def test_inference_empty_batch_gives_empty_output():
    x = np.empty((0, 3, 4), np.float32)
    y = fastbn.batch_norm_inference(x, np.zeros(3), np.ones(3))
    assert y.shape == (0, 3, 4) and y.dtype == np.float32


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("stat_dtype", (np.float32, np.float64))
def test_running_stats_update(rng, momentum, stat_dtype):
    x = make(rng, (6, 3, 4, 5), np.float32, offset=2.0)
    rm = rng.normal(size=3).astype(stat_dtype)
    rv = rng.uniform(0.5, 2, 3).astype(stat_dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=momentum)
    n, mean, var = ref.stats(x, 1)
    rm_ref, rv_ref = ref.running_update(rm0, rv0, mean, var, n, momentum)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-6)
    assert rm.dtype == stat_dtype
    if momentum == 0.0:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)


def test_functional_batch_norm_training_and_eval(rng):
    x = make(rng, (8, 3, 5), np.float64, offset=1.0)
    rm, rv = np.zeros(3), np.ones(3)
    y = fastbn.batch_norm(x, rm, rv, training=True, momentum=0.5)
    np.testing.assert_allclose(y, ref.forward(x)[0], atol=1e-12)
    n, mean, var = ref.stats(x, 1)
    np.testing.assert_allclose(rm, 0.5 * mean, atol=1e-12)
    y_eval = fastbn.batch_norm(x, rm, rv, training=False)
    np.testing.assert_allclose(y_eval, ref.inference(x, rm, rv), atol=1e-12)
    with pytest.raises(ValueError, match="running_mean"):
        fastbn.batch_norm(x, None, None, training=False)
    # Training without running statistics is allowed, as in torch.
    np.testing.assert_allclose(fastbn.batch_norm(x, None, None, training=True),
                               ref.forward(x)[0], atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_running_statistics_over_batches(rng, momentum):
    bn = fastbn.BatchNorm(4, momentum=momentum, dtype=np.float64)
    rm, rv = np.zeros(4), np.ones(4)
    for k in range(1, 4):
        x = make(rng, (5 + k, 4, 3), np.float64, offset=k)
        bn(x)
        n, mean, var = ref.stats(x, 1)
        factor = 1.0 / k if momentum is None else momentum
        rm, rv = ref.running_update(rm, rv, mean, var, n, factor)
        assert int(bn.num_batches_tracked) == k
    np.testing.assert_allclose(bn.running_mean, rm, atol=1e-12)
    np.testing.assert_allclose(bn.running_var, rv, atol=1e-12)


def test_module_eval_uses_running_stats_and_never_updates(rng, kernel_plan):
    bn = fastbn.BatchNorm(3, axis=-1)
    bn(make(rng, (20, 3), np.float32, offset=3.0))
    bn.eval()
    assert not bn.training
    state = bn.state_dict()
    x = make(rng, (7, 3), np.float32)
    y = bn(x)
    assert_output(y, ref.inference(x, bn.running_mean, bn.running_var, axis=-1), np.float32)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    # Eval backward: the statistics are constants.
    dy = make(rng, (7, 3), np.float32)
    dx = bn.backward(dy)
    inv = 1 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    np.testing.assert_allclose(dx, dy * inv, atol=1e-6)
    xhat = (x - bn.running_mean.astype(np.float64)) * inv
    np.testing.assert_allclose(bn.grad_weight, (dy * xhat).sum(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.grad_bias, dy.sum(axis=0), rtol=1e-5, atol=1e-5)


def test_module_train_backward_sets_grads(rng):
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    bn.weight[:] = [0.5, 1.0, 2.0]
    x = make(rng, (6, 3, 4), np.float64)
    dy = make(rng, (6, 3, 4), np.float64)
    bn(x)
    dx = bn.backward(dy)
    _, mean, _, inv = ref.forward(x, eps=bn.eps)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, inv, bn.weight)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, dw_ref, atol=1e-12)
    np.testing.assert_allclose(bn.grad_bias, db_ref, atol=1e-12)


def test_module_without_tracking_uses_batch_stats_in_eval(rng):
    bn = fastbn.BatchNorm(3, track_running_stats=False).eval()
    assert bn.running_mean is None and bn.num_batches_tracked is None
    x = make(rng, (9, 3, 4), np.float32, offset=5.0)
    assert_output(bn(x), ref.forward(x)[0], np.float32)
    assert set(bn.state_dict()) == {"weight", "bias"}


def test_module_without_affine(rng):
    bn = fastbn.BatchNorm(3, affine=False)
    assert bn.weight is None and bn.bias is None
    x = make(rng, (9, 3), np.float32)
    assert_output(bn(x), ref.forward(x)[0], np.float32)
    bn.backward(np.ones_like(x))
    assert bn.grad_weight is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


def test_state_dict_round_trip_and_errors(rng):
    a = fastbn.BatchNorm(4)
    a(make(rng, (10, 4, 3), np.float32))
    b = fastbn.BatchNorm(4)
    assert b.load_state_dict(a.state_dict()) == ([], [])
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value)
    before = b.state_dict()
    bad = dict(a.state_dict(), running_var=np.ones(5, np.float32))
    with pytest.raises(ValueError, match="running_var"):
        b.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="missing keys.*bias"):
        b.load_state_dict({"weight": np.ones(4)})
    for key, value in b.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_module_error_leaves_state_untouched(rng):
    bn = fastbn.BatchNorm(3)
    bn(make(rng, (6, 3), np.float32))
    before = bn.state_dict()
    with pytest.raises(ValueError):
        bn(np.ones((1, 3), np.float32))  # one value per channel
    with pytest.raises(ValueError):
        bn(np.ones((6, 4), np.float32))  # wrong channel count
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_module_backward_before_forward():
    with pytest.raises(RuntimeError, match="forward"):
        fastbn.BatchNorm(2).backward(np.ones((3, 2)))

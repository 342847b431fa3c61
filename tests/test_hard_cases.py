"""The numerically hard inputs of docs/contract.md sections 1 and 5."""

import numpy as np
import pytest

import fastbn
import reference as ref
from helpers import assert_output, assert_stats, check_forward, make

# Shapes that exercise the fused channel path, the split channel path and the column path.
PATH_SHAPES = [((16, 8, 70), 1), ((4, 2, 64, 72), 1), ((2000, 6), 1), ((30, 5, 5, 16), -1),
               ((5000, 64), -1), ((1100, 260), -1)]  # column path over several chunks of rows


@pytest.mark.parametrize("shape,axis", PATH_SHAPES)
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("sign", (1.0, -1.0))
def test_offset_of_1e4_standard_deviations(rng, shape, axis, dtype, sign, kernel_plan):
    std = 0.37
    x = make(rng, shape, dtype, offset=sign * 1e4 * std, scale=std)
    y, mean, invstd = check_forward(x, axis=axis, eps=0.0)
    _, mean_ref, var_ref = ref.stats(x, axis)
    var = 1.0 / invstd.astype(np.float64) ** 2
    assert_stats(var, var_ref, dtype, 0.0)
    # backward at the same offset
    dy = make(rng, shape, dtype)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    dx_ref = ref.backward(dy, x, mean, invstd, axis=axis)[0]
    np.testing.assert_allclose(dx, dx_ref, atol=(1e-5 if dtype == np.float32 else 1e-12) / std * 4)


@pytest.mark.parametrize("shape,axis", PATH_SHAPES)
def test_float64_offset_reaches_1e12(rng, shape, axis, kernel_plan):
    x = make(rng, shape, np.float64, offset=1e4, scale=1.0)
    y, _, _ = fastbn.batch_norm_forward(x, axis=axis, eps=0.0)
    np.testing.assert_allclose(y, ref.forward(x, axis=axis, eps=0.0)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,axis", PATH_SHAPES)
@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
def test_constant_channel_with_eps_zero(rng, shape, axis, dtype, kernel_plan):
    x = make(rng, shape, dtype)
    idx = [slice(None)] * len(shape)
    idx[axis] = 1
    x[tuple(idx)] = 7.25
    c = shape[axis]
    bias = np.arange(c, dtype=np.float64)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, bias, axis=axis, eps=0.0)
    assert invstd[1] == 0.0
    assert mean[1] == 7.25
    assert np.all(y[tuple(idx)] == 1.0)  # output = bias
    n, m, var = fastbn.batch_stats(x, axis=axis)
    assert var[1] == 0.0
    # with eps > 0 the channel normalizes to exactly zero
    y, _, invstd = fastbn.batch_norm_forward(x, axis=axis, eps=1e-5)
    assert np.all(y[tuple(idx)] == 0.0) and invstd[1] == pytest.approx(1 / np.sqrt(1e-5), rel=1e-6)


@pytest.mark.parametrize("shape,axis", PATH_SHAPES)
@pytest.mark.parametrize("bad", (np.nan, np.inf))
def test_nan_and_inf_stay_in_their_channel(rng, shape, axis, bad, kernel_plan):
    x = make(rng, shape, np.float32)
    idx = [0] * len(shape)
    idx[axis] = 1
    x[tuple(idx)] = bad
    rm, rv = np.zeros(shape[axis], np.float32), np.ones(shape[axis], np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, running_mean=rm, running_var=rv)
    sel = [slice(None)] * len(shape)
    sel[axis] = 1
    assert not np.isfinite(mean[1]) or not np.isfinite(invstd[1]) or np.isnan(invstd[1])
    assert np.isnan(y[tuple(sel)]).any()
    assert not np.isfinite(rm[1]) and not np.isfinite(rv[1])
    keep = np.ones(shape[axis], bool)
    keep[1] = False
    y_ref, mean_ref, _, _ = ref.forward(np.nan_to_num(x, nan=0.0, posinf=0.0), axis=axis)
    others = [slice(None)] * len(shape)
    others[axis] = keep
    assert np.all(np.isfinite(y[tuple(others)])) and np.all(np.isfinite(rm[keep]))
    np.testing.assert_allclose(y[tuple(others)], y_ref[tuple(others)], atol=1e-5)
    np.testing.assert_allclose(mean[keep], mean_ref[keep], rtol=1e-5, atol=1e-6)
    dy = make(rng, shape, np.float32)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    assert np.all(np.isfinite(dx[tuple(others)])) and np.all(np.isfinite(dw[keep]))


def test_float16_near_max_and_long_channels(rng):
    # Values up to 6e4 (float16 max 65504) and channels of more than 65,504 values.
    x = rng.uniform(5.9e4, 6.0e4, (70000, 2)).astype(np.float16)
    x[:, 1] = rng.uniform(-6e4, 6e4, 70000).astype(np.float16)
    y, mean, invstd = fastbn.batch_norm_forward(x)
    assert y.dtype == np.float16 and mean.dtype == np.float32
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(mean)) and np.all(np.isfinite(invstd))
    y_ref, mean_ref, var_ref, _ = ref.forward(x)
    assert_output(y, y_ref, np.float16)
    assert_stats(mean, mean_ref, np.float16, np.sqrt(var_ref))
    n, m, var = fastbn.batch_stats(x)
    assert np.all(np.isfinite(var))
    dx, dw, db = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw)) and np.all(np.isfinite(db))
    # NCHW float16 with more than 65,504 values per channel
    x4 = rng.normal(3e4, 1e4, (20, 2, 60, 60)).clip(-6e4, 6e4).astype(np.float16)
    check_forward(x4)


@pytest.mark.parametrize("shape,axis", [((1, 4), 1), ((1, 3, 1, 1), 1), ((5,), 0), ((2, 1, 1), 0)])
def test_one_value_per_channel_in_training(shape, axis):
    x = np.ones(shape, np.float32)
    rm, rv = np.zeros(shape[axis], np.float32), np.ones(shape[axis], np.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fastbn.batch_norm_forward(x, axis=axis, running_mean=rm, running_var=rv)
    assert np.all(rm == 0) and np.all(rv == 1)
    # inference is fine
    assert fastbn.batch_norm_inference(x, rm, rv, axis=axis).shape == shape


def test_two_values_per_channel_is_enough(rng):
    check_forward(make(rng, (2, 3), np.float32))


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (4, 3, 0)])
def test_empty_batch(shape):
    x = np.empty(shape, np.float32)
    with pytest.raises(ValueError, match="empty batch"):
        fastbn.batch_norm_forward(x)
    with pytest.raises(ValueError, match="empty batch"):
        fastbn.batch_norm_backward(x, x, np.zeros(3), np.ones(3))
    y = fastbn.batch_norm_inference(x, np.zeros(3), np.ones(3))
    assert y.shape == shape
    with pytest.warns(RuntimeWarning):
        n, mean, var = fastbn.batch_stats(x)
    assert n == 0 and np.isnan(mean).all()


def test_zero_channels():
    x = np.empty((4, 0, 5), np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x)
    assert y.shape == x.shape and mean.shape == (0,) and invstd.shape == (0,)


def test_huge_and_tiny_magnitudes(rng):
    for scale in (1e-30, 1e30):
        x = make(rng, (10, 3, 70), np.float64, scale=scale)
        check_forward(x, eps=0.0)
    x = make(rng, (10, 3, 70), np.float32, scale=1e18)
    check_forward(x, eps=0.0)


def test_sorted_channel_far_first_value(rng, kernel_plan):
    """The shift is the channel's first value: an outlier there must not hurt."""
    x = np.sort(make(rng, (8000, 2), np.float32, offset=0.0), axis=0)
    x[0] = -3e3
    check_forward(x)
    check_forward(np.ascontiguousarray(x.T.reshape(2, 8000, 1).transpose(1, 0, 2)))


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_column_path_centre_rows_far_from_the_mean(rng, dtype, kernel_plan):
    """The column path centres each block's first chunk on the mean of its first rows:
    rows there far from the rest (a sorted batch, outliers at the start of every block)
    must not cost accuracy beyond section 5's bounds."""
    std = 0.37
    x = make(rng, (5000, 64), dtype, offset=1e4 * std, scale=std)
    x[::312][:, :32] = dtype(-3e3)  # the first row of each of the 16 blocks, half the columns
    y, mean, invstd = check_forward(x, axis=-1, eps=0.0)
    _, _, var_ref = ref.stats(x, -1)
    assert_stats(1.0 / invstd.astype(np.float64) ** 2, var_ref, dtype, 0.0)
    xs = np.sort(x, axis=0)  # every block's first rows are its smallest values
    y, mean, invstd = check_forward(xs, axis=-1, eps=0.0)
    _, _, var_ref = ref.stats(xs, -1)
    assert_stats(1.0 / invstd.astype(np.float64) ** 2, var_ref, dtype, 0.0)

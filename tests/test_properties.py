"""Hypothesis sweeps over shapes, axes, dtypes and strides against the reference."""

import contextlib
from unittest import mock

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import fastbn
import reference as ref
from helpers import OUTPUT_ATOL, assert_output, assert_stats, out_dtype


def plan(force_column_path):
    """Optionally send every shape down the column path (the default plan picks by run length)."""
    if not force_column_path:
        return contextlib.nullcontext()
    from fastbn._cpu import backend

    return mock.patch.object(backend, "MIN_RUN", 1 << 62)


@st.composite
def arrays(draw, min_values_per_channel=1):
    ndim = draw(st.integers(1, 5))
    shape = draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.uint16]))
    # A random view: steps (negative = reversed) and an axis permutation.
    steps = draw(st.lists(st.sampled_from([1, 1, 2, -1, -2]), min_size=ndim, max_size=ndim))
    perm = draw(st.permutations(range(ndim)))
    seed = draw(st.integers(0, 2**32 - 1))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e3]))
    rng = np.random.default_rng(seed)
    big_shape = [abs(s) * n for s, n in zip(steps, shape)]
    base = offset + rng.standard_normal(big_shape)
    if np.dtype(dtype).kind in "iu":
        base = np.abs(base) * 10
    base = base.astype(dtype).transpose(perm)
    index = tuple(slice(None, None, steps[p]) for p in perm)
    x = base[index]
    return x, axis


@given(arrays(), st.booleans())
def test_forward_or_error_matches_reference(case, force_column_path):
    with plan(force_column_path):
        check_forward_or_error(case)


def check_forward_or_error(case):
    x, axis = case
    n = x.size // x.shape[axis]
    if n < 2:
        try:
            fastbn.batch_norm_forward(x, axis=axis)
        except ValueError as exc:
            assert "more than 1 value" in str(exc) or "empty" in str(exc)
        else:
            raise AssertionError("training with one value per channel must raise")
        return
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
    y_ref, mean_ref, var_ref, inv_ref = ref.forward(x, axis=axis)
    assert_output(y, y_ref, x.dtype)
    assert_stats(mean, mean_ref, x.dtype, np.sqrt(var_ref))
    assert_stats(invstd, inv_ref, x.dtype, 0.0)


@given(arrays(), st.booleans())
def test_inference_and_stats_match_reference(case, force_column_path):
    with plan(force_column_path):
        check_inference_and_stats(case)


def check_inference_and_stats(case):
    x, axis = case
    c = x.shape[axis]
    rng = np.random.default_rng(c)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2, c)
    y = fastbn.batch_norm_inference(x, rm, rv, axis=axis)
    assert_output(y, ref.inference(x, rm, rv, axis=axis), x.dtype, scale=2.0)
    n, mean, var = fastbn.batch_stats(x, axis=axis)
    _, mean_ref, var_ref = ref.stats(x, axis)
    assert n == x.size // c
    assert_stats(mean, mean_ref, x.dtype, np.sqrt(var_ref))
    assert_stats(var, var_ref, x.dtype, 0.0)


@given(arrays(), st.booleans())
def test_backward_matches_reference(case, force_column_path):
    with plan(force_column_path):
        check_backward(case)


def check_backward(case):
    x, axis = case
    if x.size // x.shape[axis] < 2:
        return
    rng = np.random.default_rng(x.size)
    dy = rng.standard_normal(x.shape).astype(out_dtype(x.dtype))
    _, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, axis=axis)
    key = out_dtype(x.dtype).type
    scale = max(1.0, float(np.max(np.abs(dx_ref))))
    tol = 1e-2 if key == np.float16 else OUTPUT_ATOL[key]
    np.testing.assert_allclose(dx.astype(np.float64), dx_ref, atol=tol * scale,
                               rtol=1e-3 if key == np.float16 else 0)

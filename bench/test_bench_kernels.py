"""pytest-benchmark cases for every public kernel, from the same table as ``python -m fastbn bench``.

``pytest bench/`` times them at full size.  The normal test run passes
``--benchmark-disable`` (pyproject.toml): each case then runs once, at its
``--quick`` size, as a smoke test.
"""

import numpy as np
import pytest

import fastbn
from fastbn._bench import CASES, EPS, Inputs, case_shape


@pytest.fixture(params=[(name, dtype) for name in CASES for dtype in ("float32", "float64")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def inputs(request):
    name, dtype = request.param
    quick = request.config.getoption("benchmark_disable", False)
    shape, axis = case_shape(name, "quick" if quick else "full")
    return Inputs(shape, axis, dtype)


def test_forward(benchmark, inputs):
    a = inputs
    y, mean, _ = benchmark(fastbn.batch_norm_forward, a.x, a.weight, a.bias, axis=a.axis,
                           eps=EPS, out=a.out)
    assert y is a.out and np.all(np.isfinite(mean))


def test_inference(benchmark, inputs):
    a = inputs
    y = benchmark(fastbn.batch_norm_inference, a.x, a.mean, a.running_var, a.weight, a.bias,
                  axis=a.axis, eps=EPS, out=a.out)
    assert y is a.out


def test_backward(benchmark, inputs):
    a = inputs
    dx, _, _ = benchmark(fastbn.batch_norm_backward, a.dy, a.x, a.mean, a.invstd, a.weight,
                         axis=a.axis, out=a.out)
    assert dx is a.out


def test_batch_stats(benchmark, inputs):
    a = inputs
    n, mean, var = benchmark(fastbn.batch_stats, a.x, axis=a.axis)
    assert n == a.x.size // a.x.shape[a.axis] and np.all(var > 0)


def test_standardize(benchmark, inputs):
    a = inputs
    y = benchmark(fastbn.standardize, a.x, axis=a.axis, out=a.out)
    assert y is a.out and np.all(np.isfinite(y))


def test_minmax_scale(benchmark, inputs):
    a = inputs
    y = benchmark(fastbn.minmax_scale, a.x, axis=a.axis, out=a.out)
    assert y is a.out and float(y.min()) >= -1e-6 and float(y.max()) <= 1 + 1e-6

"""pytest-benchmark cases for the public kernels.

``pytest bench/`` times them; the normal test run passes ``--benchmark-disable``
(see pyproject.toml), so each case runs once as a smoke test.  The printed,
interleaved comparison against the memory floor and peers is
``python -m fastbn bench``.
"""

import numpy as np
import pytest

import fastbn

CASES = {
    "nchw-small": ((32, 64, 8, 8), 1),
    "nchw": ((16, 64, 28, 28), 1),
    "channels-last": ((16, 28, 28, 64), -1),
    "2d": ((100_000, 64), -1),
}


@pytest.fixture(params=sorted(CASES), ids=str)
def case(request):
    shape, axis = CASES[request.param]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32) + np.float32(3)
    dy = rng.standard_normal(shape, dtype=np.float32)
    return x, dy, axis


def test_forward(benchmark, case):
    x, _, axis = case
    out = np.empty_like(x)
    y, mean, _ = benchmark(fastbn.batch_norm_forward, x, axis=axis, out=out)
    assert y is out and np.all(np.isfinite(mean))


def test_inference(benchmark, case):
    x, _, axis = case
    c = x.shape[axis]
    out = np.empty_like(x)
    y = benchmark(fastbn.batch_norm_inference, x, np.zeros(c), np.ones(c), axis=axis, out=out)
    assert y is out


def test_backward(benchmark, case):
    x, dy, axis = case
    _, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
    out = np.empty_like(x)
    dx, dw, db = benchmark(fastbn.batch_norm_backward, dy, x, mean, invstd, axis=axis, out=out)
    assert dx is out


def test_batch_stats(benchmark, case):
    x, _, axis = case
    n, mean, var = benchmark(fastbn.batch_stats, x, axis=axis)
    assert n == x.size // x.shape[axis]

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
    ((3, 8, 70_001), 1, np.float32),     # pipelined channel path, runs not whole lines
    ((2, 6, 50_001), 1, np.float64),
]
# Cases that must take the pipelined channel path (forward and backward).
# the pipelined path needs two channels per chain of the plan (kernels.PLAN_THREADS)
PIPELINED = [((8, 32, 9216), 4), ((4, 32, 9216), 8), ((3, 32, 70_001), 4), ((2, 33, 50_001), 8)]
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


@pytest.mark.parametrize("shape3, itemsize", PIPELINED)
def test_pipelined_path_is_taken(shape3, itemsize):
    """The channel-path cases above exercise the pipelined kernels, not only the grouped ones."""
    out = np.empty(int(np.prod(shape3)), dtype=f"f{itemsize}")
    assert kernels.pipelined(*shape3, itemsize, kernels.PLAN_THREADS, out)
    assert kernels.pipelined(*shape3, 2 * itemsize, kernels.PLAN_THREADS, out)
    small = out[:1024]  # not streamed
    assert not kernels.pipelined(*shape3, itemsize, kernels.PLAN_THREADS, small)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pipelined_hard_cases(dtype, rng):
    """Large offset, a constant channel and a NaN on the pipelined path: statistics as
    exact as the reference's, NaN confined to its channel, the constant channel 0."""
    shape = (3, 32, 70_001)
    x = (1e4 + rng.standard_normal(shape)).astype(dtype)
    x[:, 2, :] = dtype(7.5)
    x[1, 5, 123] = np.nan
    assert kernels.pipelined(*shape, x.itemsize, kernels.PLAN_THREADS, np.empty_like(x))
    y, mean, invstd = fastbn.batch_norm_forward(x)
    y_ref, mean_ref, var_ref, inv_ref = ref.forward(x, np.ones(32), np.zeros(32), axis=1)
    ok = np.arange(32) != 5
    np.testing.assert_allclose(mean[ok], mean_ref[ok], rtol=1e-12 if dtype == np.float64 else 1e-7)
    np.testing.assert_allclose(invstd[ok], inv_ref[ok], rtol=1e-9 if dtype == np.float64 else 1e-5)
    assert np.isnan(mean[5]) and np.isnan(invstd[5]) and np.isnan(y[:, 5]).all()
    assert np.all(y[:, 2] == 0)
    np.testing.assert_allclose(y[:, ok], y_ref[:, ok], rtol=0, atol=TOL[dtype] * 4)
    dy = rng.standard_normal(shape).astype(dtype)
    dx = fastbn.batch_norm_backward(dy, x, mean, invstd)[0]
    assert np.isnan(dx[:, 5]).all() and np.isfinite(dx[:, ok]).all()


@pytest.mark.parametrize("shape3, itemsize", PIPELINED)
def test_results_do_not_depend_on_the_outputs_address(shape3, itemsize, rng):
    """Streaming stores place the written lines by the output's alignment; the statistics
    must not follow: the same input gives the same bits wherever ``out`` lies."""
    dtype = np.dtype(f"f{itemsize}")
    x = (5.0 + rng.standard_normal(shape3)).astype(dtype)
    dy = rng.standard_normal(shape3).astype(dtype)
    first = fastbn.batch_norm_forward(x)
    back = fastbn.batch_norm_backward(dy, x, first[1], first[2])
    for shift in range(1, 64 // itemsize, 3):
        buf = np.empty(x.size + 2 * 64 // itemsize, dtype)
        base = (-buf.ctypes.data % 64) // itemsize
        out = buf[base + shift:base + shift + x.size].reshape(shape3)
        for a, b in zip(fastbn.batch_norm_forward(x, out=out), first):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(fastbn.batch_norm_backward(dy, x, first[1], first[2], out=out), back):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape3, itemsize", PIPELINED[:2])
def test_pipelined_backward_in_place_into_x(shape3, itemsize, rng):
    dtype = np.dtype(f"f{itemsize}")
    x = (5.0 + rng.standard_normal(shape3)).astype(dtype)
    dy = rng.standard_normal(shape3).astype(dtype)
    _, mean, invstd = fastbn.batch_norm_forward(x)
    want = fastbn.batch_norm_backward(dy, x, mean, invstd)
    xx = x.copy()
    got = fastbn.batch_norm_backward(dy, xx, mean, invstd, out=xx)
    assert got[0] is xx
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


# (nchains, nparts) schedules of the pipelined backward: more parts than threads, a
# part with no rows (5 parts of 4 rows), chains of two channels; on one thread every
# part after the first finds its sums already taken by the part that ran first.
SCHEDULES = [(1, 1), (1, 2), (2, 2), (1, 3), (4, 1), (1, 5)]


@pytest.mark.parametrize("shape3, itemsize", [((5, 8, 9216), 4), ((4, 8, 4100), 8)])
def test_pipelined_backward_schedules(shape3, itemsize, rng):
    """Every schedule gives the reference's dx and sums, NaN kept to its channel, whoever
    reduces which part; a schedule gives the same bits on one thread or two, every time."""
    import numba

    dtype = np.dtype(f"f{itemsize}")
    x = (5.0 + rng.standard_normal(shape3)).astype(dtype)
    dy = rng.standard_normal(shape3).astype(dtype)
    x[2, 3, 17] = np.nan
    mean = x.mean(axis=(0, 2), dtype=np.float64)
    invstd = 1.0 / np.sqrt(x.var(axis=(0, 2), dtype=np.float64) + 1e-5)
    weight = rng.uniform(0.5, 2, shape3[1])
    dx_ref, _, db_ref = ref.backward(dy, x, mean, invstd, weight, axis=1)
    dxmu_ref = (dy.astype(np.float64) * (x - mean[:, None])).sum(axis=(0, 2))
    ok = np.arange(shape3[1]) != 3
    scale = float(np.abs(dx_ref[:, ok]).max())
    previous = numba.get_num_threads()
    try:
        for nchains, nparts in SCHEDULES:
            results = []
            for threads in (2, 1, 2):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                dx = np.full_like(x, np.nan)
                sums = np.full(shape3[1], np.nan), np.full(shape3[1], np.nan)
                kernels.pipelined_backward(dy, x, mean, invstd, weight, nchains, nparts, dx,
                                           *sums, None, np.empty((0, 0, 0), dtype))
                results.append((dx, *sums))
            dx, sum_dy, sum_dy_xmu = results[0]
            assert np.isnan(dx[:, 3]).all() and np.isnan(sum_dy_xmu[3])
            np.testing.assert_allclose(dx[:, ok], dx_ref[:, ok], rtol=0,
                                       atol=TOL[dtype.type] * 4 * scale)
            np.testing.assert_allclose(sum_dy, db_ref, rtol=1e-12, atol=1e-9)
            np.testing.assert_allclose(sum_dy_xmu[ok], dxmu_ref[ok], rtol=1e-12, atol=1e-9)
            for other in results[1:]:
                for a, b in zip(other, results[0]):
                    np.testing.assert_array_equal(a, b, err_msg=f"{nchains}x{nparts}")
    finally:
        numba.set_num_threads(previous)

"""The functional API on device arrays, against the same float64 reference as the CPU.

Tiny shapes: under the simulator every GPU thread is a Python thread.  The
shapes reach both forward paths: the fused one-block-per-channel kernel
(float32 channels of at most ``backend.FUSED_MAX`` values) and the partial
moments + affine kernels (larger channels, float64), in planes and in rows.
"""

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import SIMULATOR, host
from helpers import assert_output, assert_stats, make

# (shape, axis): fused path, two-pass path in planes (n > backend.FUSED_MAX: 8192 on a
# GPU, 64 under the simulator), channels-last, 2-D (the last two in rows)
SHAPES = [((4, 3, 5), 1), ((3, 2, 70) if SIMULATOR else (3, 2, 3000), 1), ((6, 4, 3), -1),
          ((40, 5), 1)]
DTYPES = (np.float16, np.float32, np.float64, np.int32)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(rng, dev, shape, axis, dtype):
    x = make(rng, shape, dtype, offset=3.0, scale=2.0)
    c = shape[axis]
    w, b = rng.uniform(0.5, 2, c), rng.normal(size=c)
    y, mean, invstd = fastbn.batch_norm_forward(dev(x), dev(w), dev(b), axis=axis)
    y_ref, mean_ref, var_ref, inv_ref = ref.forward(x, w, b, axis=axis)
    assert_output(host(y), y_ref, x.dtype, scale=2.0)
    assert_stats(host(mean), mean_ref, x.dtype, np.sqrt(var_ref))
    assert_stats(host(invstd), inv_ref, x.dtype, 0.0)
    cpu = fastbn.batch_norm_forward(x, w, b, axis=axis)
    assert host(y).dtype == cpu[0].dtype and host(mean).dtype == cpu[1].dtype


@pytest.mark.parametrize("shape,axis", SHAPES[:2])
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_offset_of_1e4_standard_deviations(rng, dev, shape, axis, dtype):
    std = 0.37
    x = make(rng, shape, dtype, offset=1e4 * std, scale=std)
    y, mean, invstd = fastbn.batch_norm_forward(dev(x), axis=axis, eps=0.0)
    y_ref, mean_ref, var_ref, _ = ref.forward(x, axis=axis, eps=0.0)
    np.testing.assert_allclose(host(y), y_ref, atol=1e-5 if dtype == np.float32 else 1e-12)
    var = 1.0 / host(invstd).astype(np.float64) ** 2
    assert_stats(var, var_ref, dtype, 0.0)


def test_running_statistics_and_out_in_place(rng, dev):
    x = make(rng, (5, 3, 7), np.float32, offset=1.0)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm_d, rv_d, x_d = dev(rm), dev(rv), dev(x)
    y, mean, invstd = fastbn.batch_norm_forward(x_d, running_mean=rm_d, running_var=rv_d,
                                                momentum=0.3, out=x_d)
    assert y is x_d
    rm_ref, rv_ref = rm.copy(), rv.copy()
    y_ref = fastbn.batch_norm_forward(x, running_mean=rm_ref, running_var=rv_ref, momentum=0.3)[0]
    np.testing.assert_allclose(host(x_d), y_ref, atol=1e-6)
    np.testing.assert_allclose(host(rm_d), rm_ref, rtol=1e-6)
    np.testing.assert_allclose(host(rv_d), rv_ref, rtol=1e-6)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
def test_backward_matches_reference(rng, dev, shape, axis, dtype):
    x = make(rng, shape, dtype, offset=2.0)
    dy = make(rng, shape, dtype)
    c = shape[axis]
    w = rng.uniform(0.5, 2, c)
    _, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
    dx, dw, db = fastbn.batch_norm_backward(dev(dy), dev(x), dev(mean), dev(invstd), dev(w),
                                            axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, w, axis=axis)
    assert_output(host(dx), dx_ref, dtype, scale=4.0)
    tol = dict(rtol=1e-3, atol=1e-2) if dtype != np.float64 else dict(rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(host(dw), dw_ref, **tol)
    np.testing.assert_allclose(host(db), db_ref, **tol)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
def test_inference_matches_reference(rng, dev, shape, axis, dtype):
    x = make(rng, shape, dtype, offset=1.0)
    c = shape[axis]
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2, c)
    w, b = rng.uniform(0.5, 2, c), rng.normal(size=c)
    y = fastbn.batch_norm_inference(dev(x), dev(rm), dev(rv), dev(w), dev(b), axis=axis)
    assert_output(host(y), ref.inference(x, rm, rv, w, b, axis=axis), dtype, scale=4.0)
    y2 = fastbn.batch_norm(dev(x), dev(rm), dev(rv), dev(w), dev(b), training=False, axis=axis)
    np.testing.assert_array_equal(host(y2), host(y))


@pytest.mark.parametrize("ddof", [0, 1])
def test_batch_stats(rng, dev, ddof):
    x = make(rng, (6, 3, 11), np.float64, offset=50.0)
    n, mean, var = fastbn.batch_stats(dev(x), ddof=ddof)
    n_ref, mean_ref, var_ref = ref.stats(x, 1, ddof)
    assert n == n_ref
    np.testing.assert_allclose(host(mean), mean_ref, rtol=1e-13)
    np.testing.assert_allclose(host(var), var_ref, rtol=1e-12)


def test_constant_channel_and_nan_stay_in_their_channel(dev):
    x = np.ones((4, 3, 6), np.float32)
    x[:, 1] = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    x[2, 2, 3] = np.nan
    b = np.array([0.5, 0.0, 0.0])
    y, mean, invstd = fastbn.batch_norm_forward(dev(x), None, dev(b), eps=0.0)
    y, invstd = host(y), host(invstd)
    assert invstd[0] == 0.0 and np.all(y[:, 0] == 0.5)         # constant channel: bias
    assert np.all(np.isfinite(y[:, 1]))                         # its neighbour is untouched
    assert np.all(np.isnan(y[:, 2])) and np.isnan(host(mean)[2])


def test_mixing_host_and_device_raises_before_writing(rng, dev):
    x = make(rng, (4, 3, 5), np.float32)
    with pytest.raises(TypeError, match="cannot mix"):
        fastbn.batch_norm_forward(dev(x), np.ones(3))
    with pytest.raises(TypeError, match="cannot mix"):
        fastbn.batch_norm_inference(x, dev(np.zeros(3)), dev(np.ones(3)))


def test_bad_arguments_write_nothing(rng, dev):
    x = make(rng, (4, 3, 5), np.float32)
    out = dev(np.full(x.shape, 7.0, np.float32))
    rm = dev(np.zeros(3, np.float32))
    for kwargs, error in [(dict(weight=dev(np.ones(4))), ValueError),
                          (dict(eps=-1.0), ValueError),
                          (dict(momentum=2.0), ValueError),
                          (dict(running_var=dev(np.ones(2, np.float32))), ValueError),
                          (dict(axis=5), np.exceptions.AxisError)]:
        with pytest.raises(error):
            fastbn.batch_norm_forward(dev(x), running_mean=rm, out=out, **kwargs)
        assert np.all(host(out) == 7.0) and np.all(host(rm) == 0.0)
    with pytest.raises(ValueError, match="more than 1 value"):
        fastbn.batch_norm_forward(dev(np.ones((1, 3), np.float32)), running_mean=rm)
    with pytest.raises(ValueError, match="out must have dtype"):
        fastbn.batch_norm_forward(dev(x), out=dev(np.empty(x.shape, np.float64)))


def _device_view(x, layout):
    """``x`` (host) as a device view in ``layout``.  Under the simulator: Numba views.  On
    a GPU: CuPy views, or torch ones (torch has no negative strides), since a GPU's
    Numba can neither transpose a 4-D array nor copy negative strides to the host."""
    if SIMULATOR:
        from numba import cuda

        dev = cuda.to_device
        if layout == "channels-last":
            return dev(np.ascontiguousarray(np.moveaxis(x, 1, -1))).transpose((0, 3, 1, 2))
        if layout == "reversed":
            return dev(np.ascontiguousarray(x[::-1, :, ::-1]))[::-1, :, ::-1]
        return dev(np.ascontiguousarray(x.transpose(3, 2, 1, 0))).transpose((3, 2, 1, 0))
    try:
        import cupy
    except ImportError:
        torch = pytest.importorskip("torch", reason="views on a GPU need CuPy or torch")
        if layout == "reversed":
            pytest.skip("torch has no negative strides (and CuPy is absent)")
        if layout == "channels-last":
            return torch.as_tensor(x, device="cuda").contiguous(memory_format=torch.channels_last)
        return torch.as_tensor(np.ascontiguousarray(x.transpose(3, 2, 1, 0)),
                               device="cuda").permute(3, 2, 1, 0)
    if layout == "channels-last":
        return cupy.asarray(np.ascontiguousarray(np.moveaxis(x, 1, -1))).transpose(0, 3, 1, 2)
    if layout == "reversed":
        return cupy.asarray(np.ascontiguousarray(x[::-1, :, ::-1]))[::-1, :, ::-1]
    return cupy.asarray(np.ascontiguousarray(x.transpose(3, 2, 1, 0))).transpose(3, 2, 1, 0)


def _byte_strides(a):
    if type(a).__module__.startswith("torch"):
        return tuple(s * a.element_size() for s in a.stride())
    return tuple(a.strides)


@pytest.mark.parametrize("layout", ["channels-last", "reversed", "transposed"])
def test_permuted_and_reversed_device_arrays_need_no_copy(rng, layout):
    """A torch channels-last tensor and other permuted or reversed views work as on the
    CPU: the result has the input's shape and memory order."""
    x = make(rng, (4, 3, 5, 2), np.float32, offset=2.0)
    xd = _device_view(x, layout)
    np.testing.assert_array_equal(host(xd), x)
    y, mean, invstd = fastbn.batch_norm_forward(xd)
    y_ref, mean_ref, _, _ = ref.forward(x)
    np.testing.assert_allclose(host(y), y_ref, atol=1e-5)
    assert _byte_strides(y) == _byte_strides(xd)
    dx, _, _ = fastbn.batch_norm_backward(xd, xd, mean, invstd)  # dy laid out like x
    dx_ref = ref.backward(x, x, host(mean), host(invstd))[0]
    np.testing.assert_allclose(host(dx), dx_ref, atol=1e-4)
    assert _byte_strides(dx) == _byte_strides(xd)


def test_device_arrays_with_gaps_are_refused_clearly(rng, dev):
    x = dev(make(rng, (4, 6), np.float32))
    with pytest.raises(ValueError, match="gaps"):
        fastbn.batch_norm_forward(x[:, ::2])


@pytest.mark.gpu
@pytest.mark.parametrize("library", ["cupy", "torch"])
def test_results_keep_the_input_array_type(rng, library):
    lib = pytest.importorskip(library)
    x = make(rng, (8, 4, 33), np.float32, offset=2.0)
    xd = lib.asarray(x) if library == "cupy" else lib.as_tensor(x, device="cuda")
    y, mean, invstd = fastbn.batch_norm_forward(xd)
    assert type(y) is type(xd) and type(mean) is type(xd)
    np.testing.assert_allclose(host(y), fastbn.batch_norm_forward(x)[0], atol=1e-5)


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("shape,axis", [((300, 5), -1), ((4, 3, 7), 1)])
def test_standardize_and_minmax_on_device(rng, dev, dtype, shape, axis):
    x = make(rng, shape, np.float64, offset=1e4 * 0.37, scale=0.37)
    xm = np.moveaxis(x, axis, -1)
    xm[..., 1] = 5.0                       # a constant feature
    xm.reshape(-1, shape[axis])[::7, 2] = np.nan
    x = x.astype(dtype)
    tol = dict(atol=2e-5) if dtype == np.float32 else dict(atol=1e-10)
    y = host(fastbn.standardize(dev(x), axis=axis))
    np.testing.assert_allclose(y, fastbn.standardize(x, axis=axis), **tol)
    for rng_ in [(0.0, 1.0), (-1.0, 2.0)]:
        y = host(fastbn.minmax_scale(dev(x), axis=axis, feature_range=rng_))
        np.testing.assert_allclose(y, fastbn.minmax_scale(x, axis=axis, feature_range=rng_), **tol)
    out = dev(np.zeros_like(x))
    assert fastbn.standardize(dev(x), axis=axis, out=out) is out


def test_more_channels_than_one_launch_covers(rng, dev):
    """Every kernel strides over what it is given: 40 channels are more than the
    per-channel kernels' threads (32 under the simulator; about a million on a GPU)
    and than the block-per-channel kernels' blocks (8 under the simulator; 65,535 on
    a GPU)."""
    from fastbn._cuda import backend

    c = 40
    if SIMULATOR:  # on a GPU the caps are far above: the test then checks plain results
        assert c > backend.MAX_BLOCKS * backend.THREADS and c > backend.MAX_CHANNEL_BLOCKS
    x = make(rng, (2, c), np.float64, offset=3.0)
    x[:, -1] = [1.0, 4.0]
    n, mean, var = fastbn.batch_stats(dev(x), axis=1)
    np.testing.assert_allclose(host(mean), x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(host(var), x.var(0), rtol=1e-12)
    w, b = rng.uniform(0.5, 2, c), rng.normal(size=c)
    rm, rv = dev(np.zeros(c)), dev(np.ones(c))
    y, m, inv = fastbn.batch_norm_forward(dev(x), dev(w), dev(b), running_mean=rm,
                                          running_var=rv)
    y_ref, _, var_ref, inv_ref = ref.forward(x, w, b, axis=1)
    np.testing.assert_allclose(host(y), y_ref, atol=1e-12)
    np.testing.assert_allclose(host(inv), inv_ref, rtol=1e-12)
    np.testing.assert_allclose(host(rv), 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-12)
    dx, dw, db = fastbn.batch_norm_backward(dev(x), dev(x), m, inv, dev(w))
    dx_ref, dw_ref, db_ref = ref.backward(x, x, host(m), host(inv), w, axis=1)
    np.testing.assert_allclose(host(dx), dx_ref, atol=1e-9)
    np.testing.assert_allclose(host(db), db_ref, rtol=1e-12)
    y = fastbn.batch_norm_inference(dev(x), rm, rv, dev(w), dev(b))
    y_ref = ref.inference(x, host(rm), host(rv), w, b, axis=1)
    np.testing.assert_allclose(host(y), y_ref, atol=1e-12)
    x32 = x[:, :].astype(np.float32)  # the fused one-block-per-channel forward
    y, _, _ = fastbn.batch_norm_forward(dev(x32))
    np.testing.assert_allclose(host(y), ref.forward(x32, axis=1)[0], atol=1e-5)
    for fn in (fastbn.standardize, fastbn.minmax_scale):
        np.testing.assert_allclose(host(fn(dev(x), axis=1)), fn(x, axis=1), atol=1e-12)


@pytest.mark.parametrize("shape,axis", SHAPES[1:3])
def test_the_same_bits_run_to_run(rng, dev, shape, axis):
    """No atomics and a fixed reduction order: a call repeated gives the same bits (on a
    GPU, where blocks really run in any order)."""
    x, dy = make(rng, shape, np.float32, offset=3.0), make(rng, shape, np.float32)
    xd, dyd = dev(x), dev(dy)
    first = fastbn.batch_norm_forward(xd, axis=axis)
    grads = fastbn.batch_norm_backward(dyd, xd, first[1], first[2], axis=axis)
    for _ in range(2):
        again = fastbn.batch_norm_forward(xd, axis=axis)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(host(a), host(b))
        for a, b in zip(grads, fastbn.batch_norm_backward(dyd, xd, first[1], first[2],
                                                          axis=axis)):
            np.testing.assert_array_equal(host(a), host(b))

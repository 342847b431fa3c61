"""Tolerances, input builders and layout variants shared by the tests."""

import numpy as np

import reference as ref

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
# docs/contract.md section 5: absolute error on unit-variance output, relative on statistics.
OUTPUT_ATOL = {np.float16: 4e-3, np.float32: 1e-5, np.float64: 1e-12}
OUTPUT_RTOL = {np.float16: 1e-3, np.float32: 2.4e-7, np.float64: 4.5e-16}
STATS_RTOL = {np.float16: 1e-5, np.float32: 1e-5, np.float64: 1e-12}
LAYOUTS = ("c", "fortran", "reversed", "strided", "transposed")


def out_dtype(dtype):
    return np.dtype(dtype) if np.dtype(dtype).kind == "f" else np.dtype(np.float64)


def tol_key(dtype):
    return out_dtype(dtype).type


def make(rng, shape, dtype, offset=0.0, scale=1.0):
    """Random normal data, cast to ``dtype`` (integers: small spread)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 20, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) > 0.5
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def with_layout(a, layout, axis):
    """The values of ``a`` in memory laid out as ``layout`` (same shape, same values)."""
    if layout == "c":
        return np.ascontiguousarray(a)
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "reversed":
        flipped = np.ascontiguousarray(a[(slice(None, None, -1),) * a.ndim])
        return flipped[(slice(None, None, -1),) * a.ndim]
    if layout == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if layout == "transposed":
        t = np.ascontiguousarray(np.moveaxis(a, axis % a.ndim, 0))
        return np.moveaxis(t, 0, axis % a.ndim)
    raise ValueError(layout)


def assert_output(actual, expected, dtype, scale=1.0):
    dtype = tol_key(dtype)
    assert actual.dtype == dtype
    atol = OUTPUT_ATOL[dtype] * scale
    rtol = OUTPUT_RTOL[dtype]  # rounding of the output itself, for outputs far from unit size
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol, atol=atol)


def assert_stats(actual, expected, dtype, scale):
    """Relative to the magnitude, absolute relative to the channel's spread ``scale``."""
    rtol = STATS_RTOL[tol_key(dtype)]
    actual = actual.astype(np.float64)
    bound = rtol * (np.abs(expected) + np.asarray(scale))
    err = np.abs(actual - expected)
    bad = ~((err <= bound) | (np.isnan(actual) & np.isnan(expected)) | (actual == expected))
    assert not bad.any(), (
        f"statistics differ at {np.flatnonzero(bad)}: {actual[bad]} vs {expected[bad]} "
        f"(error {err[bad]}, bound {np.broadcast_to(bound, err.shape)[bad]})")


def check_forward(x, weight=None, bias=None, axis=1, eps=1e-5, **kwargs):
    """Run fastbn's forward and compare every output with the reference."""
    import fastbn

    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, axis=axis, eps=eps, **kwargs)
    y_ref, mean_ref, var_ref, inv_ref = ref.forward(x, weight, bias, axis=axis, eps=eps)
    assert y.shape == np.shape(x)
    wscale = 1.0 if weight is None else max(1.0, float(np.max(np.abs(weight))))
    assert_output(y, y_ref, np.asarray(x).dtype, scale=wscale)
    stats = ref.stats(x, axis)[2]
    assert_stats(mean, mean_ref, np.asarray(x).dtype, np.sqrt(stats))
    assert_stats(invstd, inv_ref, np.asarray(x).dtype, 0.0)
    expected_stats_dtype = np.float64 if out_dtype(np.asarray(x).dtype) == np.float64 else np.float32
    assert mean.dtype == expected_stats_dtype and invstd.dtype == expected_stats_dtype
    return y, mean, invstd

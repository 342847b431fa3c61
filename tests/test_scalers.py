"""Data normalization (docs/contract.md section 3) against scikit-learn, the float64 oracle here."""

import numpy as np
import pytest

import fastbn

sklearn_pre = pytest.importorskip("sklearn.preprocessing")


def _data(rng, shape=(600, 7), dtype=np.float64, nan=True):
    """Offsets of 1e4 standard deviations, a constant feature, NaNs in two features."""
    std = 0.37
    x = rng.normal(1e4 * std, std, shape)
    x[:, 2] = 5.0                      # constant
    x[:, -1] = rng.normal(-3.0, 2.0, shape[0])
    if nan:
        x[::50, 1] = np.nan
        x[3, -2] = np.nan
    return x.astype(dtype)


def _sk64(cls, x, **kw):
    """scikit-learn fitted in float64 (its float32 transform rounds more than ours)."""
    return cls(**kw).fit(x.astype(np.float64))


def _roundtrip_tol(dtype):
    # a float32 round trip rounds twice at the scale of the data (values near 0 included)
    return dict(rtol=1e-6, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-9) if dtype == np.float64 else dict(rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_standard_scaler_matches_sklearn(rng, dtype):
    x = _data(rng, dtype=dtype)
    ours = fastbn.StandardScaler().fit(x)
    ref = _sk64(sklearn_pre.StandardScaler, x)
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-13)
    np.testing.assert_allclose(ours.var_, ref.var_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.scale_, ref.scale_, rtol=1e-9)
    assert ours.scale_[2] == 1.0                       # constant feature
    np.testing.assert_array_equal(ours.n_samples_seen_, ref.n_samples_seen_)
    y = ours.transform(x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref.transform(x.astype(np.float64)), **_tol(dtype))
    assert np.isnan(y[::50, 1]).all() and np.isnan(y[3, -2])  # NaN kept
    np.testing.assert_allclose(ours.inverse_transform(y), x, **_roundtrip_tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("feature_range,clip", [((0.0, 1.0), False), ((-2.0, 3.0), True)])
def test_minmax_scaler_matches_sklearn(rng, dtype, feature_range, clip):
    x = _data(rng, dtype=dtype)
    ours = fastbn.MinMaxScaler(feature_range, clip=clip).fit(x)
    ref = _sk64(sklearn_pre.MinMaxScaler, x, feature_range=feature_range, clip=clip)
    for name in ("data_min_", "data_max_", "data_range_", "scale_", "min_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), rtol=1e-12)
    assert ours.n_samples_seen_ == ref.n_samples_seen_
    x2 = x * dtype(1.5)  # outside the fitted range: clip matters
    np.testing.assert_allclose(ours.transform(x2), ref.transform(x2.astype(np.float64)),
                               rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
    y = ours.transform(x)
    np.testing.assert_allclose(ours.inverse_transform(y), x, **_roundtrip_tol(dtype))


@pytest.mark.parametrize("cls", [fastbn.StandardScaler, fastbn.MinMaxScaler])
def test_partial_fit_over_uneven_chunks_equals_fit(rng, cls):
    x = _data(rng, (300, 5))
    whole = cls().fit(x)
    parts = cls()
    bounds = [0, 1, 2, 9, 10, 11, 150, 151, 299, 300]  # 1-row chunks included
    for a, b in zip(bounds[:-1], bounds[1:]):
        parts.partial_fit(x[a:b])
    names = (["mean_", "var_", "scale_"] if cls is fastbn.StandardScaler
             else ["data_min_", "data_max_", "scale_", "min_"])
    for name in names:
        np.testing.assert_allclose(getattr(parts, name), getattr(whole, name), rtol=1e-12)
    np.testing.assert_array_equal(parts.n_samples_seen_, whole.n_samples_seen_)


def test_any_feature_axis_and_float16_and_integers(rng):
    x = rng.normal(5.0, 2.0, (4, 3, 6, 5))
    ref = sklearn_pre.StandardScaler().fit(np.moveaxis(x, 1, -1).reshape(-1, 3))
    ours = fastbn.StandardScaler(axis=1).fit(x)
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-13)
    np.testing.assert_allclose(ours.var_, ref.var_, rtol=1e-12)
    y = ours.transform(x)
    expected = np.moveaxis(ref.transform(np.moveaxis(x, 1, -1).reshape(-1, 3))
                           .reshape(4, 6, 5, 3), -1, 1)
    np.testing.assert_allclose(y, expected, atol=1e-12)
    h = x.astype(np.float16)
    assert fastbn.standardize(h, axis=1).dtype == np.float16
    i = (x * 10).astype(np.int32)
    yi = fastbn.minmax_scale(i, axis=1)
    assert yi.dtype == np.float64
    np.testing.assert_allclose([yi.min(), yi.max()], [0.0, 1.0], atol=1e-15)


def test_functions_match_sklearn_functions(rng):
    x = _data(rng, (200, 6))
    np.testing.assert_allclose(fastbn.standardize(x), sklearn_pre.scale(x), atol=1e-9)
    np.testing.assert_allclose(fastbn.minmax_scale(x, feature_range=(-1, 1)),
                               sklearn_pre.minmax_scale(x, feature_range=(-1, 1)), atol=1e-12)


def test_out_in_place_and_input_untouched(rng):
    x = _data(rng, (100, 4), nan=False)
    copy = x.copy()
    y = fastbn.standardize(x)
    np.testing.assert_array_equal(x, copy)
    out = np.empty_like(x)
    assert fastbn.standardize(x, out=out) is out
    np.testing.assert_array_equal(out, y)
    assert fastbn.minmax_scale(x, out=x) is x
    np.testing.assert_allclose(x, sklearn_pre.minmax_scale(copy), atol=1e-12)


def test_bad_arguments(rng):
    x = _data(rng, (50, 3), nan=False)
    # constructor arguments are stored as given and checked by fit, as in scikit-learn
    with pytest.raises(ValueError, match="Minimum of desired feature range"):
        fastbn.MinMaxScaler((1.0, 1.0)).fit(x)
    with pytest.raises(ValueError, match="feature_range"):
        fastbn.MinMaxScaler("ab").fit(x)
    with pytest.raises(ValueError, match="not fitted"):
        fastbn.StandardScaler().transform(x)
    sc = fastbn.StandardScaler().fit(x)
    with pytest.raises(ValueError, match="features"):
        sc.transform(x[:, :2])
    with pytest.raises(ValueError, match="features"):
        sc.partial_fit(x[:, :2])
    out = np.full((50, 3), 7.0)
    with pytest.raises(ValueError, match="out must have shape"):
        fastbn.standardize(x, out=out[:, :2])
    with pytest.raises(TypeError, match="dtype"):
        fastbn.standardize(x.astype(complex))
    with pytest.raises(np.exceptions.AxisError):
        fastbn.standardize(x, axis=3)
    assert np.all(out == 7.0)


def test_all_nan_feature_and_no_mean_no_std(rng):
    x = _data(rng, (40, 3), nan=False)
    x[:, 1] = np.nan
    sc = fastbn.StandardScaler().fit(x)
    assert np.isnan(sc.mean_[1]) and np.isnan(sc.var_[1])
    assert list(sc.n_samples_seen_) == [40, 0, 40]
    plain = fastbn.StandardScaler(with_mean=False, with_std=False).fit(x)
    assert plain.mean_ is None and plain.var_ is None and plain.scale_ is None
    np.testing.assert_array_equal(plain.transform(x), x)
    centered = fastbn.StandardScaler(with_std=False).fit(x)
    assert centered.scale_ is None and centered.var_ is None
    np.testing.assert_allclose(np.mean(centered.transform(x)[:, [0, 2]], axis=0), 0, atol=1e-9)


@pytest.mark.parametrize("cls", [fastbn.StandardScaler, fastbn.MinMaxScaler])
def test_a_bad_fit_or_partial_fit_leaves_the_fitted_state_alone(rng, cls):
    x = _data(rng, (60, 4), nan=False)
    sc = cls().fit(x)
    before = sc.to_dict()
    for bad in (x.astype(complex), np.ones(())):
        with pytest.raises((TypeError, ValueError)):
            sc.fit(bad)
        with pytest.raises((TypeError, ValueError)):
            sc.partial_fit(bad)
    with pytest.raises(ValueError, match="features"):
        sc.partial_fit(x[:, :3])
    assert sc.to_dict() == before


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("feature_axis", [1, 0], ids=["column-path", "channel-path"])
def test_minmax_vector_lines_give_the_scalar_bits(rng, dtype, feature_axis):
    """Outputs of 4 MiB and more take the vector line code (streaming stores, lines that
    wrap from one row into the next); a small slice takes the scalar loops: the same
    bits, and both ends exact.  Odd sizes give every head and tail."""
    x = (50.0 + rng.standard_normal((20011, 61))).astype(dtype)
    x[7, :] = np.nan  # NaN kept, in both pieces' code
    if feature_axis == 0:
        x = np.ascontiguousarray(x.T)
    sc = fastbn.MinMaxScaler(axis=feature_axis).fit(x)
    y = sc.transform(x)
    assert y.nbytes >= 4 << 20
    part = (slice(0, 50), slice(None)) if feature_axis == 1 else (slice(None), slice(0, 50))
    np.testing.assert_array_equal(sc.transform(x[part]), y[part])
    other = 1 - feature_axis
    lo, hi = np.nanargmin(x, axis=other), np.nanargmax(x, axis=other)
    first = (lambda i: y[i, np.arange(61)]) if feature_axis == 1 else (lambda i: y[np.arange(61), i])
    np.testing.assert_array_equal(first(lo), 0.0)
    np.testing.assert_array_equal(first(hi), 1.0)
    assert np.isnan(y[7] if feature_axis == 1 else y[:, 7]).all()


@pytest.mark.parametrize("feature_axis", [1, 0], ids=["column-path", "channel-path"])
def test_minmax_ends_between_float32_values_keep_per_feature_offsets(rng, feature_axis):
    """Fitted on float64 data, transforming float32: the fitted ends are no float32
    values, so each feature carries its own offsets (the column path's per-column
    loads, not the shared ones).  Vector lines and scalar loops give the same bits,
    and every output is within 2 ulp (its own) of the float64 map of the float32 input."""
    x64 = 1e3 + 3.0 * rng.standard_normal((20011, 61))
    x64 = x64 if feature_axis == 1 else np.ascontiguousarray(x64.T)
    sc = fastbn.MinMaxScaler(axis=feature_axis).fit(x64)
    assert np.any(sc.data_min_.astype(np.float32) != sc.data_min_)
    x = x64.astype(np.float32)
    y = sc.transform(x)
    assert y.dtype == np.float32 and y.nbytes >= 4 << 20
    part = (slice(0, 50), slice(None)) if feature_axis == 1 else (slice(None), slice(0, 50))
    np.testing.assert_array_equal(sc.transform(x[part]), y[part])
    shape = (1, -1) if feature_axis == 1 else (-1, 1)
    lo, hi = sc.data_min_.reshape(shape), sc.data_max_.reshape(shape)
    ref = (x.astype(np.float64) - lo) / (hi - lo)
    unit = np.spacing(np.abs(y)).astype(np.float64)  # ulp of the output
    assert (np.abs(y - ref) / unit).max() <= 2.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minmax_constant_feature_keeps_infinities_and_nan(dtype):
    """A feature without range scales by 1 about its minimum, as scikit-learn's
    ``x * scale_ + min_`` does: +inf, -inf and NaN come through as themselves, in the
    vector lines (a wide slab) and in the scalar loops alike."""
    for rows in (5, 70000):
        x = np.full((rows, 24), 7.0, dtype)
        x[:, 12:] = np.linspace(0.0, 1.0, rows, dtype=dtype)[:, None]
        sc = fastbn.MinMaxScaler((-1.0, 1.0)).fit(x)
        x[1, [0, 12]], x[2, [1, 13]], x[3, [2, 14]] = np.inf, -np.inf, np.nan
        y = sc.transform(x)
        np.testing.assert_array_equal(y[1:4, 0:3].diagonal(), [np.inf, -np.inf, np.nan])
        np.testing.assert_array_equal(y[1:4, 12:15].diagonal(), [np.inf, -np.inf, np.nan])
        np.testing.assert_array_equal(y[0, :12], -1.0)
        np.testing.assert_array_equal(y[rows - 1, 12:], 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("feature_range", [(0.0, 1.0), (-1.0, 1.0), (2.0, 5.0)])
def test_minmax_far_from_zero_keeps_its_digits(rng, dtype, feature_range):
    """Data at 1e3 with std 3: the minimum maps to exactly feature_range[0] (x * scale_ +
    min_ gave -3.8e-6 in float32) and the maximum to exactly feature_range[1] (a
    one-sided (x - min) * scale + low missed it for 6% of features), every output within
    2 ulp (of the range's end where the output nears 0 through a shift)."""
    x = (1e3 + 3.0 * rng.standard_normal((3000, 64))).astype(dtype)
    low, high = feature_range
    y = fastbn.MinMaxScaler(feature_range).fit(x).transform(x)
    cols = np.arange(x.shape[1])
    np.testing.assert_array_equal(y[x.argmin(0), cols], dtype(low))
    np.testing.assert_array_equal(y[x.argmax(0), cols], dtype(high))
    xd = x.astype(np.float64)
    lo, hi = xd.min(0), xd.max(0)
    ref = (xd - lo) / (hi - lo) * (high - low) + low
    unit = np.spacing(np.maximum(np.abs(ref), 0.0 if low == 0 else max(-low, high)).astype(dtype))
    assert (np.abs(y - ref) / unit.astype(np.float64)).max() <= 2.0
    np.testing.assert_array_equal(fastbn.minmax_scale(x, feature_range=feature_range), y)

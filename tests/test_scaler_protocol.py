"""fastbn's own scalers as a scikit-learn user meets them (issue 17, items 0, 1 and 3-6).

Cases follow scikit-learn's ``sklearn/preprocessing/tests/test_data.py`` for
StandardScaler, MinMaxScaler, ``scale`` and ``minmax_scale``, written here for
fastbn's classes, which duck-type the estimator protocol without importing
scikit-learn; scikit-learn is the oracle.
"""

import pickle

import numpy as np
import pytest

import fastbn

sk_pre = pytest.importorskip("sklearn.preprocessing")
sk_base = pytest.importorskip("sklearn.base")
sp = pytest.importorskip("scipy.sparse")

SCALERS = [fastbn.StandardScaler, fastbn.MinMaxScaler]


def _x(rng, shape=(300, 5), offset=0.0):
    x = rng.normal(offset, 2.0, shape)
    x[:, 0] *= 1000.0  # a feature in other units
    return x


# ----------------------------------------------------------------------- item 0: y is never out


@pytest.mark.parametrize("cls", SCALERS)
def test_pipeline_fit_leaves_y_alone(rng, cls):
    """A Pipeline passes y as fit_transform's second argument: it must never be written."""
    pytest.importorskip("sklearn.linear_model")
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline

    x = _x(rng)
    y = rng.normal(size=x.shape)  # a y of x's shape, which `out` would have accepted
    y_before = y.copy()
    model = make_pipeline(cls(), LinearRegression()).fit(x, y)
    np.testing.assert_array_equal(y, y_before)
    assert model.predict(x).shape == y.shape
    sc = cls()
    result = sc.fit_transform(x, y)
    np.testing.assert_array_equal(y, y_before)
    assert result is not y


@pytest.mark.parametrize("cls", SCALERS)
def test_out_is_keyword_only_everywhere(rng, cls):
    x = _x(rng)
    sc = cls().fit(x)
    dest = np.empty_like(x)
    for method in (sc.transform, sc.inverse_transform):
        with pytest.raises(TypeError):
            method(x, dest)
        assert method(x, out=dest) is dest
    with pytest.raises(TypeError):
        fastbn.standardize(x, -1)
    with pytest.raises(TypeError):
        fastbn.minmax_scale(x, -1)


# ----------------------------------------------------------------------- item 1: the protocol


def test_get_params_set_params_and_clone():
    sc = fastbn.StandardScaler(with_mean=False)
    assert sc.get_params() == {"axis": -1, "with_mean": False, "with_std": True}
    assert sc.set_params(with_std=False) is sc and sc.with_std is False
    with pytest.raises(ValueError, match="Invalid parameter 'copy'"):
        sc.set_params(copy=True)
    mm = fastbn.MinMaxScaler((2, 1), clip=True)  # stored as given: checked by fit
    twin = sk_base.clone(mm)
    assert type(twin) is fastbn.MinMaxScaler and twin.get_params() == mm.get_params()
    assert twin is not mm and twin.feature_range == (2, 1)
    with pytest.raises(ValueError, match="Minimum of desired feature range"):
        twin.fit(np.ones((3, 2)))
    assert repr(fastbn.StandardScaler(with_mean=False)) == "StandardScaler(with_mean=False)"


@pytest.mark.parametrize("cls", SCALERS)
def test_unfitted_raises_not_fitted_error(cls):
    sc = cls()
    assert not hasattr(sc, "n_features_in_")
    for call in (lambda: sc.transform(np.ones((2, 2))),
                 lambda: sc.inverse_transform(np.ones((2, 2))), sc.to_dict):
        with pytest.raises(fastbn.NotFittedError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, AttributeError)


def test_grid_search_and_cross_val_score():
    pytest.importorskip("sklearn.linear_model")
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import Pipeline

    x, y = load_breast_cancer(return_X_y=True)
    pipe = Pipeline([("scale", fastbn.StandardScaler()),
                     ("clf", LogisticRegression(max_iter=2000))])
    search = GridSearchCV(pipe, {"scale__with_std": [True, False], "clf__C": [0.1, 1.0]},
                          cv=3).fit(x, y)
    assert search.best_params_["scale__with_std"] is True  # unscaled features train worse
    theirs = Pipeline([("scale", sk_pre.StandardScaler()),
                       ("clf", LogisticRegression(max_iter=2000))])
    np.testing.assert_allclose(cross_val_score(pipe, x, y, cv=3),
                               cross_val_score(theirs, x, y, cv=3), atol=1e-12)


@pytest.mark.parametrize("bad", [dict(with_mean="yes"), dict(with_std=None), dict(axis="0")])
def test_bad_parameters_raise_in_fit_not_in_init(rng, bad):
    sc = fastbn.StandardScaler(**bad)
    with pytest.raises((ValueError, TypeError)):
        sc.fit(_x(rng))
    assert not hasattr(sc, "mean_") or sc.mean_ is None


def test_pickle_round_trip(rng):
    x = _x(rng)
    for sc in (fastbn.StandardScaler().fit(x), fastbn.MinMaxScaler().fit(x)):
        twin = pickle.loads(pickle.dumps(sc))
        np.testing.assert_array_equal(twin.transform(x), sc.transform(x))


# ----------------------------------------------------------------------- item 3: sample_weight


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sample_weight_matches_sklearn(rng, dtype):
    x = _x(rng, (400, 6), offset=1e4).astype(dtype)
    x[::37, 2] = np.nan
    w = rng.uniform(0.0, 3.0, x.shape[0])
    ours = fastbn.StandardScaler().fit(x, sample_weight=w)
    theirs = sk_pre.StandardScaler().fit(x.astype(np.float64), sample_weight=w)
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-9)
    np.testing.assert_allclose(ours.n_samples_seen_, theirs.n_samples_seen_, rtol=1e-12)
    assert ours.n_samples_seen_.dtype == np.float64  # weight sums, per feature (NaN)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [64, 40, 100])  # a 64-column tile, 32 + a rest, rows
def test_sample_weight_column_kernel(rng, dtype, width):
    """Data without NaN take the column path's register tiles with a weight per row:
    several chunks of rows, the first ones of weight 0, a large offset."""
    x = _x(rng, (9000, width), offset=1e4).astype(dtype)
    w = rng.uniform(0.0, 3.0, x.shape[0])
    w[:5000] = 0.0  # whole chunks of weight 0 before the first one that counts
    ours = fastbn.StandardScaler().fit(x, sample_weight=w)
    xd = x.astype(np.float64)
    mean = (w @ xd) / w.sum()
    var = (w @ (xd - mean) ** 2) / w.sum()
    np.testing.assert_allclose(ours.mean_, mean, rtol=1e-13)
    np.testing.assert_allclose(ours.var_, var, rtol=1e-10)
    x[4, 3] = np.nan  # NaN: the NaN-aware kernel, the same statistics elsewhere
    nan_aware = fastbn.StandardScaler().fit(x, sample_weight=w)
    assert not np.isnan(nan_aware.mean_[3])  # the NaN is ignored (and its row weighs 0)
    np.testing.assert_allclose(nan_aware.mean_, mean, rtol=1e-13)
    np.testing.assert_allclose(nan_aware.var_, var, rtol=1e-10)


def test_integer_weights_equal_repeated_samples(rng):
    x = _x(rng, (60, 4), offset=50.0)
    w = rng.integers(0, 4, x.shape[0])
    weighted = fastbn.StandardScaler().fit(x, sample_weight=w)
    repeated = fastbn.StandardScaler().fit(np.repeat(x, w, axis=0))
    np.testing.assert_allclose(weighted.mean_, repeated.mean_, rtol=1e-13)
    np.testing.assert_allclose(weighted.var_, repeated.var_, rtol=1e-11)
    assert weighted.n_samples_seen_ == float(w.sum())


def test_weighted_partial_fit_over_chunks_equals_fit(rng):
    x = _x(rng, (1000, 3), offset=-7e3)
    w = rng.uniform(0.1, 2.0, x.shape[0])
    whole = fastbn.StandardScaler().fit(x, sample_weight=w)
    chunked = fastbn.StandardScaler()
    for a, b in [(0, 1), (1, 333), (333, 334), (334, 1000)]:
        chunked.partial_fit(x[a:b], sample_weight=w[a:b])
    np.testing.assert_allclose(chunked.mean_, whole.mean_, rtol=1e-13)
    np.testing.assert_allclose(chunked.var_, whole.var_, rtol=1e-11)
    # a scalar weight is every sample's
    np.testing.assert_allclose(fastbn.StandardScaler().fit(x, sample_weight=2.5).var_,
                               fastbn.StandardScaler().fit(x).var_, rtol=1e-12)


@pytest.mark.parametrize("cls", SCALERS)
def test_feature_axis_beyond_two_dimensions(rng, cls):
    x = rng.normal(3.0, 1.5, (5, 6, 4))  # features on the last of three axes
    ours = cls(axis=2).fit(x)
    theirs = getattr(sk_pre, cls.__name__)().fit(x.reshape(-1, 4))
    np.testing.assert_allclose(ours.transform(x).reshape(-1, 4), theirs.transform(x.reshape(-1, 4)),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(np.exceptions.AxisError):
        cls(axis=3).fit(x)


def test_weights_on_any_feature_axis(rng):
    x = rng.normal(3.0, 1.5, (5, 4, 6))  # features on axis 1: samples are (5, 6)
    w = rng.uniform(0.0, 2.0, (5, 6))
    ours = fastbn.StandardScaler(axis=1).fit(x, sample_weight=w)
    flat = np.moveaxis(x, 1, -1).reshape(-1, 4)
    theirs = sk_pre.StandardScaler().fit(flat, sample_weight=w.reshape(-1))
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-12)


@pytest.mark.parametrize("weights,error", [
    (np.ones(7), ValueError), (np.ones((10, 1)), ValueError), (-np.ones(10), ValueError),
    (np.full(10, np.nan), ValueError), (np.zeros(10), ValueError),
    (np.array(["a"] * 10), TypeError)])
def test_bad_weights_raise_and_leave_state(rng, weights, error):
    x = _x(rng, (10, 3))
    sc = fastbn.StandardScaler().fit(x)
    mean = sc.mean_.copy()
    with pytest.raises(error):
        sc.partial_fit(x, sample_weight=weights)
    np.testing.assert_array_equal(sc.mean_, mean)
    assert sc.n_samples_seen_ == 10


def test_minmax_scaler_takes_no_weights(rng):
    with pytest.raises(TypeError):
        fastbn.MinMaxScaler().fit(_x(rng), sample_weight=np.ones(300))


# ----------------------------------------------------------------------- item 4: scipy.sparse


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_scaling_matches_sklearn_and_keeps_sparsity(rng, fmt, weighted):
    dense = sp.random(200, 7, density=0.3, format="csr", random_state=1).toarray() * 50
    dense[5, 3] = np.nan
    x = sp.csr_matrix(dense).asformat(fmt)
    w = rng.uniform(0.2, 2.0, 200) if weighted else None
    ours = fastbn.StandardScaler(with_mean=False).fit(x, sample_weight=w)
    theirs = sk_pre.StandardScaler(with_mean=False).fit(x.tocsr(), sample_weight=w)
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-12)
    # the same statistics as the dense data
    np.testing.assert_allclose(
        ours.var_, fastbn.StandardScaler().fit(dense, sample_weight=w).var_, rtol=1e-12)
    y = ours.transform(x)
    assert sp.issparse(y) and y.format == ("csc" if fmt == "csc" else "csr")
    assert y.nnz == x.tocsr().nnz
    np.testing.assert_allclose(y.toarray(), theirs.transform(x.tocsr()).toarray(), rtol=1e-12)
    np.testing.assert_allclose(ours.inverse_transform(y).toarray(), dense, rtol=1e-12)
    np.testing.assert_allclose(x.toarray(), dense)  # input untouched


def test_sparse_partial_fit_equals_fit_and_errors(rng):
    x = sp.random(300, 5, density=0.2, format="csr", random_state=2) * 3
    chunked = fastbn.StandardScaler(with_mean=False)
    for a in range(0, 300, 70):
        chunked.partial_fit(x[a:a + 70])
    whole = fastbn.StandardScaler(with_mean=False).fit(x)
    np.testing.assert_allclose(chunked.var_, whole.var_, rtol=1e-12)
    with pytest.raises(ValueError, match="Cannot center sparse matrices"):
        fastbn.StandardScaler().fit(x)
    with pytest.raises(ValueError, match="Cannot center sparse matrices"):
        fastbn.standardize(x)
    with pytest.raises(TypeError, match="sparse"):
        fastbn.MinMaxScaler().fit(x)
    with pytest.raises(TypeError, match="out="):
        whole.transform(x, out=np.empty((300, 5)))
    y = fastbn.standardize(x, with_mean=False)
    np.testing.assert_allclose(y.toarray(), sk_pre.scale(x, with_mean=False).toarray(),
                               rtol=1e-12)
    ints = sp.csr_matrix(np.arange(12).reshape(6, 2))
    assert fastbn.standardize(ints, with_mean=False).dtype == np.float64


def test_sparse_input_does_not_import_scipy_for_dense_work():
    import subprocess
    import sys

    code = ("import sys, numpy as np, fastbn; fastbn.StandardScaler().fit(np.ones((3, 2)));"
            "fastbn.standardize(np.ones(4)); print('scipy.sparse' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------------- item 5: 1-D input


def test_one_dimensional_input_is_one_feature_in_the_functions(rng):
    v = np.array([1.0, 3.0, 5.0, 0.0])
    np.testing.assert_allclose(fastbn.standardize(v), sk_pre.scale(v), rtol=1e-14)
    assert np.std(fastbn.standardize(v)) == pytest.approx(1.0)
    long = rng.normal(size=30)
    np.testing.assert_allclose(fastbn.minmax_scale(long), sk_pre.minmax_scale(long), atol=1e-15)
    np.testing.assert_allclose(fastbn.standardize([1, 2, 3]), sk_pre.scale([1.0, 2.0, 3.0]))
    out = np.empty(30)
    assert fastbn.minmax_scale(long, out=out) is out
    assert fastbn.standardize(long, axis=0).shape == (30,)


@pytest.mark.parametrize("cls", SCALERS)
def test_estimators_refuse_one_dimensional_input(rng, cls):
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array instead"):
        cls().fit(np.arange(5.0))
    sc = cls().fit(_x(rng))
    with pytest.raises(ValueError, match="reshape"):
        sc.transform(np.arange(5.0))


# ----------------------------------------------------------------------- item 6: details


def test_n_samples_seen_types(rng):
    x = _x(rng, (50, 3))
    assert type(fastbn.StandardScaler().fit(x).n_samples_seen_) is int
    x[[1, 4], 1] = np.nan
    seen = fastbn.StandardScaler().fit(x).n_samples_seen_
    np.testing.assert_array_equal(seen, [50, 48, 50])
    assert seen.dtype == np.int64
    np.testing.assert_array_equal(seen, sk_pre.StandardScaler().fit(x).n_samples_seen_)
    assert type(fastbn.MinMaxScaler().fit(x).n_samples_seen_) is int


@pytest.mark.parametrize("cls", SCALERS)
def test_partial_fit_after_fit_continues_and_fit_restarts(rng, cls):
    x = _x(rng, (90, 4))
    sc = cls().fit(x[:30])
    sc.partial_fit(x[30:])
    whole = cls().fit(x)
    np.testing.assert_allclose(sc.transform(x), whole.transform(x), rtol=1e-12, atol=1e-12)
    assert sc.n_samples_seen_ == 90
    sc.fit(x[:10])
    assert sc.n_samples_seen_ == 10


@pytest.mark.parametrize("with_mean,with_std", [(False, True), (True, False), (False, False)])
def test_with_mean_with_std_as_sklearn(rng, with_mean, with_std):
    x = _x(rng, (80, 4), offset=3.0)
    ours = fastbn.StandardScaler(with_mean=with_mean, with_std=with_std).fit(x)
    theirs = sk_pre.StandardScaler(with_mean=with_mean, with_std=with_std).fit(x)
    for name in ("mean_", "var_", "scale_"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-12)
    y = ours.transform(x)
    np.testing.assert_allclose(y, theirs.transform(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.inverse_transform(y), x, rtol=1e-12)
    if not with_mean and not with_std:
        np.testing.assert_array_equal(y, x)  # the identity


def test_near_constant_and_constant_features(rng):
    # a constant feature within rounding (log(1e-5) repeated) scales by 1, not by ~1e-16
    x = np.column_stack([np.full(8, np.log(1e-5)), np.arange(8.0), np.full(8, 1e100)])
    ours = fastbn.StandardScaler().fit(x)
    theirs = sk_pre.StandardScaler().fit(x)
    np.testing.assert_array_equal(ours.scale_, theirs.scale_)
    np.testing.assert_allclose(ours.transform(x), theirs.transform(x), atol=1e-12)
    assert np.all(ours.transform(x)[:, [0, 2]] == 0.0)
    # weighted: a constant feature stays constant
    w = rng.uniform(0.1, 1.0, 8)
    assert fastbn.StandardScaler().fit(x, sample_weight=w).scale_[0] == 1.0


def test_float16_large_values_do_not_overflow(rng):
    x = rng.uniform(5, 10, (20_000, 1)).astype(np.float16) * np.float16(6000)
    y = fastbn.StandardScaler().fit_transform(x)
    assert y.dtype == np.float16 and np.all(np.isfinite(y))
    assert np.max(np.abs(y)) < 5


def test_minmax_zero_range_clip_and_inverse(rng):
    x = np.array([[0.0, 1.0, 5.0], [0.5, 1.0, 6.0], [-1.0, 1.0, 7.0]])
    ours = fastbn.MinMaxScaler(feature_range=(-2, 3), clip=True).fit(x)
    theirs = sk_pre.MinMaxScaler(feature_range=(-2, 3), clip=True).fit(x)
    test = np.array([[10.0, 1.0, -4.0]])
    np.testing.assert_allclose(ours.transform(test), theirs.transform(test))
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(x)), x, atol=1e-15)
    for name in ("data_min_", "data_max_", "data_range_", "scale_", "min_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name))


def test_to_dict_round_trip_of_a_weighted_fit(rng):
    x = _x(rng, (40, 3))
    sc = fastbn.StandardScaler().fit(x, sample_weight=rng.uniform(0.5, 1.5, 40))
    twin = fastbn.StandardScaler.from_dict(sc.to_dict())
    np.testing.assert_array_equal(twin.var_, sc.var_)
    assert twin.n_samples_seen_ == sc.n_samples_seen_

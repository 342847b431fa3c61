"""``fastbn.sklearn``: true scikit-learn estimators computed by fastbn (issue 17, item 2)."""

import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn import preprocessing as sk_pre  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402

import fastbn  # noqa: E402
from fastbn import sklearn as fsk  # noqa: E402

ESTIMATORS = [fsk.StandardScaler, fsk.MinMaxScaler]


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_check_estimator_passes(cls):
    results = check_estimator(cls(), on_fail=None)
    failed = [(r["check_name"], repr(r["exception"])) for r in results
              if r["status"] == "failed"]
    assert not failed
    assert sum(r["status"] == "passed" for r in results) > 40


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_the_kernels_do_the_work(rng, cls, monkeypatch):
    """Fits go through fastbn's scalers, not scikit-learn's NumPy code."""
    calls = []
    original = fastbn.scalers._Scaler._statistics

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fastbn.scalers._Scaler, "_statistics", counting)
    x = rng.normal(size=(50, 3))
    cls().fit_transform(x)
    assert calls == [cls.__name__]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_sklearn_with_weights_nan_and_chunks(rng, dtype):
    x = rng.normal(1e3, 3.0, (500, 6)).astype(dtype)
    x[::41, 2] = np.nan
    w = rng.uniform(0.0, 2.0, 500)
    ours, theirs = fsk.StandardScaler(), sk_pre.StandardScaler()
    for a in range(0, 500, 128):
        ours.partial_fit(x[a:a + 128], sample_weight=w[a:a + 128])
        theirs.partial_fit(x[a:a + 128].astype(np.float64), sample_weight=w[a:a + 128])
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-8)
    # weight sums in the input's dtype, as scikit-learn keeps them
    assert ours.n_samples_seen_.dtype == dtype
    np.testing.assert_allclose(ours.n_samples_seen_, theirs.n_samples_seen_, rtol=1e-6)
    y = ours.transform(x)
    assert y.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, theirs.transform(x.astype(np.float64)), rtol=tol, atol=tol)


def test_copy_false_transforms_in_place(rng):
    x = rng.normal(size=(40, 3))
    sc = fsk.StandardScaler(copy=False).fit(x)
    expected = sk_pre.StandardScaler().fit(x).transform(x)
    assert sc.transform(x) is x
    np.testing.assert_allclose(x, expected, rtol=1e-12)
    frozen = rng.normal(size=(40, 3))
    frozen.flags.writeable = False
    assert sc.transform(frozen) is not frozen  # a read-only input gets a new array


def test_feature_names_and_pandas_output(rng):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(rng.normal(size=(30, 3)), columns=["a", "b", "c"])
    for cls in ESTIMATORS:
        sc = cls().set_output(transform="pandas").fit(frame)
        assert list(sc.feature_names_in_) == ["a", "b", "c"]
        assert list(sc.get_feature_names_out()) == ["a", "b", "c"]
        out = sc.transform(frame)
        assert isinstance(out, pd.DataFrame) and list(out.columns) == ["a", "b", "c"]
        ref = getattr(sk_pre, cls.__name__)().fit(frame).transform(frame)
        np.testing.assert_allclose(out.to_numpy(), ref, rtol=1e-12, atol=1e-12)


def test_pipeline_with_grid_search_as_in_the_readme():
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    x, y = load_breast_cancer(return_X_y=True)
    pipe = make_pipeline(fsk.StandardScaler(), LogisticRegression(max_iter=2000))
    search = GridSearchCV(pipe, {"logisticregression__C": [0.1, 1.0, 10.0]}, cv=3).fit(x, y)
    assert search.best_score_ > 0.95


def test_n_samples_seen_stays_a_weight_sum_after_an_unweighted_chunk(rng):
    """A weighted chunk, then an unweighted one: the unweighted samples weigh 1 each.
    (scikit-learn 1.9 truncates the earlier weight sum to an integer here: 2.5 -> 2.)"""
    x = rng.normal(size=(30, 2))
    w = np.r_[np.full(10, 0.25), np.ones(20)]
    ours = fsk.StandardScaler().partial_fit(x[:10], sample_weight=w[:10])
    ours.partial_fit(x[10:])
    whole = sk_pre.StandardScaler().fit(x, sample_weight=w)
    assert ours.n_samples_seen_ == whole.n_samples_seen_ == 22.5
    np.testing.assert_allclose(ours.mean_, whole.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.var_, whole.var_, rtol=1e-12)


def test_minmax_clip_follows_parameters_set_after_fit(rng):
    x = rng.normal(size=(40, 3))
    test = x * 3.0
    ours = fsk.MinMaxScaler().fit(x).set_params(clip=True, feature_range=(0, 2))
    theirs = sk_pre.MinMaxScaler().fit(x).set_params(clip=True, feature_range=(0, 2))
    np.testing.assert_allclose(ours.transform(test), theirs.transform(test), rtol=1e-12)

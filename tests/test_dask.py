"""fastbn.dask against the in-memory API on uneven chunkings, then on a real local cluster."""

import numpy as np
import pytest

import fastbn

da = pytest.importorskip("dask.array", reason="dask is not installed (extra fastbn[dask])")
import dask  # noqa: E402

import fastbn.dask as fd  # noqa: E402


def _uneven(x, chunks):
    return da.from_array(x, chunks=chunks)


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture
def x3(rng):
    x = rng.normal(1e4 * 0.37, 0.37, (61, 5, 9))
    x[3, 2, 4] = np.nan
    x[:, 1, :] = 2.0  # constant feature
    return x


CHUNKINGS = [((20, 41), (2, 3), (4, 5)), ((1, 30, 30), 5, 9), ((61,), (1, 1, 3), (9,))]


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_standardize_and_minmax_match_in_memory(x3, chunks, dtype):
    x = x3.astype(dtype)
    d = _uneven(x, chunks)
    tol = dict(atol=1e-5) if dtype == np.float32 else dict(atol=1e-10)
    y = fd.standardize(d, axis=1)
    assert isinstance(y, da.Array)  # lazy
    np.testing.assert_allclose(y.compute(), fastbn.standardize(x, axis=1), **tol)
    np.testing.assert_allclose(fd.minmax_scale(d, axis=1, feature_range=(-1, 2)).compute(),
                               fastbn.minmax_scale(x, axis=1, feature_range=(-1, 2)), **tol)


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_batch_norm_forward_and_stats_match_in_memory(rng, chunks):
    x = rng.normal(3.0, 2.0, (61, 5, 9))
    w, b = rng.uniform(0.5, 2, 5), rng.normal(size=5)
    d = _uneven(x, chunks)
    y, mean, invstd = fd.batch_norm_forward(d, w, b, axis=1)
    y1, mean1, invstd1 = fastbn.batch_norm_forward(x, w, b, axis=1)
    np.testing.assert_allclose(y.compute(), y1, atol=1e-12)
    np.testing.assert_allclose(mean.compute(), mean1, rtol=1e-13)
    np.testing.assert_allclose(invstd.compute(), invstd1, rtol=1e-12)
    n, m, var = fd.batch_stats(d, axis=1, ddof=1)
    n1, m1, var1 = fastbn.batch_stats(x, axis=1, ddof=1)
    assert n == n1
    np.testing.assert_allclose(var.compute(), var1, rtol=1e-12)


def test_scalers_take_dask_arrays(x3):
    d = _uneven(x3, CHUNKINGS[0])
    sc = fastbn.StandardScaler(axis=1).fit(d)
    ref = fastbn.StandardScaler(axis=1).fit(x3)
    np.testing.assert_allclose(sc.mean_, ref.mean_, rtol=1e-13)
    np.testing.assert_allclose(sc.var_, ref.var_, rtol=1e-10)
    np.testing.assert_array_equal(sc.n_samples_seen_, ref.n_samples_seen_)
    y = sc.transform(d)
    assert isinstance(y, da.Array)
    np.testing.assert_allclose(y.compute(), ref.transform(x3), atol=1e-9)
    parts = fastbn.MinMaxScaler(axis=1, clip=True)
    for a, b in [(0, 1), (1, 30), (30, 61)]:
        parts.partial_fit(_uneven(x3[a:b], (7, 2, 4)))
    whole = fastbn.MinMaxScaler(axis=1, clip=True).fit(x3)
    np.testing.assert_allclose(parts.scale_, whole.scale_, rtol=1e-12)
    np.testing.assert_allclose(parts.transform(d * 2).compute(), whole.transform(x3 * 2),
                               atol=1e-12)
    with pytest.raises(ValueError, match="out="):
        sc.transform(d, out=np.empty(x3.shape))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_local_cluster_workers_use_the_disk_cache(x3):
    distributed = pytest.importorskip("distributed")
    d = _uneven(x3, CHUNKINGS[0])
    expected = fastbn.standardize(x3, axis=1)
    # compile (or load) every kernel the tasks use in this process first
    np.testing.assert_allclose(fd.standardize(d, axis=1).compute(), expected, atol=1e-9)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                  memory_limit="1GiB") as cluster, \
            distributed.Client(cluster) as client:
        with dask.config.set(scheduler=client.get):
            y = fd.standardize(d, axis=1).compute()
        np.testing.assert_allclose(y, expected, atol=1e-9)
        reports = client.run(fd.kernel_cache_report)
    assert len(reports) == 2
    worked = [r for r in reports.values() if r]
    assert worked, "no worker ran a kernel"
    for report in worked:
        assert all(misses == 0 for _, misses in report.values()), report

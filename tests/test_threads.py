"""Several Python threads calling at once get the same results as one at a time."""

import threading

import numpy as np

import fastbn


def test_eight_threads_at_once(rng):
    # the last two are over the streaming-store threshold (4 MiB)
    shapes = [(8, 16, 80), (4, 2, 64, 72), (500, 12), (6, 5, 5, 20), (8, 16, 96, 96),
              (12_000, 100)]
    axes = [1, 1, 1, -1, 1, -1]
    cases = []
    for k in range(8):
        shape, axis = shapes[k % len(shapes)], axes[k % len(shapes)]
        x = rng.normal(k, 1 + k, shape).astype(np.float32 if k % 2 else np.float64)
        dy = rng.normal(size=shape).astype(x.dtype)
        cases.append((x, dy, axis))

    def run(x, dy, axis):
        y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
        dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
        return y, mean, invstd, dx, dw, db

    expected = [run(*case) for case in cases]
    results = [[] for _ in cases]
    errors = []
    barrier = threading.Barrier(len(cases))

    def worker(k):
        try:
            barrier.wait()
            for _ in range(5):
                results[k].append(run(*cases[k]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k, runs in enumerate(results):
        assert len(runs) == 5
        for got in runs:
            for a, b in zip(got, expected[k]):
                np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- fastbn's thread count

import pytest  # noqa: E402

from fastbn._cpu import backend  # noqa: E402

# fused groups, grouped channels, the column path (small and large), channels in parts of
# rows (few channels), the pipelined path (streamed output): each plan's bits
SHAPES = [((8, 16, 8, 8), 1), ((64, 8, 2048), 1), ((4, 64, 40, 40), 1), ((20000, 12), -1),
          ((6, 5, 5, 20), -1), ((256, 2, 4096), 1), ((8, 32, 4096), 1), ((200_000, 12), -1)]


def _every_op(x, axis, dy):
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    inf = fastbn.batch_norm_inference(x, mean, 1.0 / invstd.astype(np.float64) ** 2, axis=axis)
    count, m, v = fastbn.batch_stats(x, axis=axis)
    z = fastbn.standardize(x, axis=axis)
    return y, mean, invstd, dx, dw, db, inf, m, v, z


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_one_thread_small_path_and_limits_give_the_same_bits(rng, shape, axis, dtype,
                                                             monkeypatch):
    """Calls below the serial threshold run on one thread: the bits must not change
    whichever way a call runs (threshold, fastbn's limit, Numba's count).  float64
    results show what float32 outputs round away (float64 statistics included)."""
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    monkeypatch.setattr(backend, "SERIAL_MAX_BYTES", 0)
    parallel = _every_op(x, axis, dy)
    monkeypatch.setattr(backend, "SERIAL_MAX_BYTES", 1 << 62)
    one_thread = _every_op(x, axis, dy)
    monkeypatch.setattr(backend, "SERIAL_MAX_BYTES", 0)
    with fastbn.threads(1):
        limited = _every_op(x, axis, dy)
    for a, b, c in zip(parallel, one_thread, limited):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


SERIAL_TWINS = """
import zlib
import numpy as np
from fastbn._cpu import backend, kernels
twins = backend.serial_kernels()
assert twins.run_forward_train is not kernels.run_forward_train
rng = np.random.default_rng(zlib.crc32(b"test_serial_twins_give_the_same_bits"))
for shape in [(4, 3, 70), (300, 6, 1), (64, 2, 4096), (8, 4, 512)]:
    x = rng.normal(2.0, 3.0, shape)
    dy = rng.normal(size=shape)
    c = shape[1]
    w, b = rng.uniform(0.5, 2, c), rng.normal(size=c)
    results = []
    for k in (kernels, twins):
        y, dx = np.empty_like(x), np.empty_like(x)
        stats = [np.empty(c) for _ in range(5)]
        k.run_forward_train(x, w, b, 1e-5, y, *stats[:3], 1, backend.MIN_RUN, None, False)
        k.run_backward_train(dy, x, stats[0], stats[2], w, dx, *stats[3:], 1, backend.MIN_RUN,
                             None, np.empty((0, 0, 0), x.dtype))
        results.append([y, dx] + stats)
    for a, t in zip(*results):
        assert np.array_equal(a, t), shape
print("same bits")
"""


def test_serial_twins_give_the_same_bits(tmp_path):
    """The serial twins (forked children of a GNU OpenMP process) are the same source
    compiled without ``parallel``: same plans for one thread, same bits.

    Compiled alike, in one process with its own cache.  Known issue (reported, not
    fixed): a reduction compiled with ``reassoc`` can be vectorized differently
    depending on what was compiled or loaded from the disk cache before it (a constant
    argument specializes it; a callee compiled in the same process can be inlined), so a
    kernel loaded from a cache written by another process may differ from a freshly
    compiled twin in the last bits (dx of (64, 2, 4096) float64 by 4e-14 relative)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", SERIAL_TWINS], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same bits" in proc.stdout


def test_set_num_threads_and_threads_context():
    import numba

    cap = numba.config.NUMBA_NUM_THREADS
    assert fastbn.get_num_threads() == min(cap, numba.get_num_threads())
    try:
        fastbn.set_num_threads(1)
        assert fastbn.get_num_threads() == 1
        with fastbn.threads(2):
            assert fastbn.get_num_threads() == min(2, numba.get_num_threads())
            with fastbn.threads(1):
                assert fastbn.get_num_threads() == 1
        assert fastbn.get_num_threads() == 1
    finally:
        fastbn.set_num_threads(None)
    assert fastbn.get_num_threads() == numba.get_num_threads()
    # the limit applies to the calling thread's calls without touching Numba's own count
    with fastbn.threads(1):
        fastbn.batch_norm_forward(np.ones((64, 64, 32, 32), np.float32))
    assert numba.get_num_threads() == min(cap, numba.get_num_threads())
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            fastbn.set_num_threads(bad)
        with pytest.raises(ValueError, match="n must be a positive integer"):
            with fastbn.threads(bad):
                pass


def test_other_libraries_thread_settings_are_left_alone():
    """After fastbn's calls, PyTorch and NumPy's BLAS keep the thread counts they were given."""
    import subprocess
    import sys

    code = """
import numpy as np
try:
    import torch
except ImportError:
    torch = None
import fastbn
if torch is not None:
    torch.set_num_threads(1)
x = np.random.default_rng(0).normal(size=(32, 64, 32, 32)).astype(np.float32)
for _ in range(3):
    y, m, s = fastbn.batch_norm_forward(x)
    fastbn.batch_norm_backward(y, x, m, s)
if torch is not None:
    assert torch.get_num_threads() == 1, torch.get_num_threads()
    bn = torch.nn.BatchNorm2d(64)
    bn(torch.from_numpy(x))
    assert torch.get_num_threads() == 1, torch.get_num_threads()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_threadpoolctl_sees_and_limits_fastbn():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    fastbn.batch_norm_forward(np.ones((64, 64, 32, 32), np.float32))  # the pool is loaded
    info = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "fastbn"]
    assert len(info) == 1 and info[0]["num_threads"] == fastbn.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="fastbn"):
        assert fastbn.get_num_threads() == 1
    assert fastbn.get_num_threads() == info[0]["num_threads"]
    fastbn.set_num_threads(None)


@pytest.mark.parametrize("shape", [(100_000, 8), (3000, 5), (7, 3)])
def test_scaler_statistics_give_the_same_bits_for_any_thread_count(rng, shape, monkeypatch):
    """The NaN-aware and the weighted feature statistics split rows by the data's size,
    not by the thread count."""
    x = rng.normal(1e3, 3.0, shape)
    x[1, 1] = np.nan  # the NaN-aware kernel
    w = rng.uniform(0.0, 2.0, shape[0])

    def fits():
        a = fastbn.StandardScaler().fit(x)
        b = fastbn.StandardScaler().fit(x, sample_weight=w)
        c = fastbn.MinMaxScaler().fit(x)
        return a.mean_, a.var_, b.mean_, b.var_, c.data_min_, c.data_max_

    monkeypatch.setattr(backend, "SERIAL_MAX_BYTES", 0)
    parallel = fits()
    with fastbn.threads(1):
        one = fits()
    for a, b in zip(parallel, one):
        np.testing.assert_array_equal(a, b)


ANY_THREAD_COUNT = """
import numpy as np, fastbn
from fastbn._cpu import backend
backend.SERIAL_MAX_BYTES = 0
rng = np.random.default_rng(5)
for shape, axis in SHAPES:
    x = rng.normal(3.0, 2.0, shape)
    dy = rng.normal(size=shape)
    w = rng.uniform(0.0, 2.0, x.size // shape[axis])
    def every_op():
        y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
        dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
        s = fastbn.StandardScaler(axis=axis).fit(x, sample_weight=w.reshape(
            shape[:axis % x.ndim] + shape[axis % x.ndim + 1:]))
        return (y, mean, invstd, dx, dw, db, fastbn.batch_stats(x, axis=axis)[2],
                fastbn.standardize(x, axis=axis), s.mean_, s.var_)
    many = every_op()
    with fastbn.threads(1):
        one = every_op()
    for a, b in zip(many, one):
        assert np.array_equal(a, b, equal_nan=True), (shape, axis)
print("same bits")
"""


@pytest.mark.parametrize("nthreads", [3, 8])
def test_same_bits_for_more_threads_than_cores(nthreads):
    """The plans are made for ``kernels.PLAN_THREADS`` whatever Numba's count: a process
    with more threads than this machine has cores gets one thread's bits."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_NUM_THREADS=str(nthreads))
    code = f"SHAPES = {SHAPES!r}\n" + ANY_THREAD_COUNT
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same bits" in proc.stdout

"""fastbn in processes that fork: after a call, while another thread is inside a call,
through multiprocessing's 'fork' pools, under every threading layer Numba can load.

Each case runs in a fresh interpreter with the layer chosen by NUMBA_THREADING_LAYER,
and every wait is bounded: a child that hangs fails the test instead of stalling CI.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

TIMEOUT = 300  # a fresh interpreter may compile kernels the first time


def _layer_loads(layer):
    code = ("import fastbn._jit, numba.np.ufunc.parallel as p; p._launch_threads(); "
            "import numba; print(numba.threading_layer())")
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    return proc.returncode == 0 and proc.stdout.strip() == layer


LAYERS = [pytest.param(layer, marks=pytest.mark.skipif(not _layer_loads(layer),
                                                       reason=f"Numba's {layer} layer does "
                                                              "not load here"))
          for layer in ("tbb", "omp", "workqueue")]


def _run(body, layer=None, timeout=TIMEOUT):
    env = dict(os.environ)
    if layer:
        env["NUMBA_THREADING_LAYER"] = layer
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


PRELUDE = """
import os, signal, sys, threading, time
import numpy as np
import fastbn

rng = np.random.default_rng(0)
small = rng.normal(3.0, 2.0, (8, 16, 8, 8)).astype(np.float32)      # runs on one thread
large = rng.normal(3.0, 2.0, (32, 64, 16, 16)).astype(np.float32)   # runs in parallel


def check(x):
    y, mean, invstd = fastbn.batch_norm_forward(x)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(axis=(0, 2, 3), keepdims=True)) / x64.std(axis=(0, 2, 3), keepdims=True)
    assert np.abs(y - ref).max() < 1e-4, np.abs(y - ref).max()
    dx, dw, db = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    assert np.abs(dx).max() < 1e-3
    return True


def wait(pid, seconds=120):
    # waitpid with a deadline: a hung child is killed and reported
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise SystemExit(f"child {pid} hung")


def fork_and_check(*arrays):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if all(check(a) for a in arrays) else 3
        finally:
            os._exit(code)
    status = wait(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
        f"child died: signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
        else f"child exit {os.WEXITSTATUS(status)}")
"""


@pytest.mark.parametrize("layer", LAYERS)
def test_fork_after_use(layer):
    """The issue's repro: a call, then fork(), then calls in the child (small and parallel)."""
    out = _run("""
        check(small); check(large)
        import numba
        layer = numba.threading_layer()
        fork_and_check(small, large)
        fork_and_check(large)          # twice: a child of a parent that forked before
        check(large)                   # and the parent goes on
        print("layer", layer)
    """, layer)
    assert f"layer {layer}" in out


@pytest.mark.parametrize("layer", LAYERS)
def test_multiprocessing_fork_pool(layer):
    out = _run("""
        import multiprocessing as mp
        check(large)
        def work(seed):
            x = np.random.default_rng(seed).normal(5.0, 2.0, (32, 64, 16, 16)).astype(np.float32)
            y, mean, invstd = fastbn.batch_norm_forward(x)
            return float(np.abs(y.mean(axis=(0, 2, 3))).max())
        with mp.get_context("fork").Pool(2) as pool:
            result = pool.map_async(work, range(4))
            values = result.get(timeout=120)
        assert max(values) < 1e-4, values
        print("pool ok")
    """, layer)
    assert "pool ok" in out


def test_default_layer_is_fork_and_thread_safe():
    """With nothing set, fastbn runs on TBB when the tbb package is installed."""
    pytest.importorskip("numba")
    if not _layer_loads("tbb"):
        pytest.skip("TBB does not load here")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    code = textwrap.dedent(PRELUDE) + "check(large)\nimport numba\nprint(numba.threading_layer())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "tbb"


@pytest.mark.parametrize("layer", LAYERS)
def test_fork_while_another_thread_is_inside_a_call(layer):
    """A thread keeps calling fastbn (holding its locks part of the time) while the main
    thread forks: every child must compute, none may deadlock on a lock it inherited."""
    _run("""
        check(large)
        stop = threading.Event()
        def busy():
            while not stop.is_set():
                fastbn.batch_norm_forward(large)
                fastbn.batch_norm_forward(small)
        t = threading.Thread(target=busy, daemon=True)
        t.start()
        try:
            for _ in range(12):
                fork_and_check(small, large)
                time.sleep(0.01)
        finally:
            stop.set()
            t.join(60)
        print("ok")
    """, layer)


def test_serial_twins_run_in_a_forked_omp_child():
    """Under GNU OpenMP a forked child never enters the pool: it takes the serial twins."""
    if not _layer_loads("omp"):
        pytest.skip("no OpenMP layer")
    _run("""
        check(large)
        from fastbn._cpu import backend
        pid = os.fork()
        if pid == 0:
            from fastbn import _threads
            ok = _threads.pool_unusable() and backend._Call(1 << 30).k is backend.serial_kernels()
            os._exit(0 if ok and check(large) else 4)
        assert os.WEXITSTATUS(wait(pid)) == 0
    """, "omp")

import os
import zlib
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

# Outputs from 4 MiB up take streaming stores in the tests on every machine (the default
# follows the machine's cache, fastbn._machine): their inputs are sized for both kinds
# of store.  Child processes inherit it, and with it the kernels this run compiled.
os.environ.setdefault("FASTBN_STREAM_MIN_BYTES", str(4 << 20))

settings.register_profile(
    "default", deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "ci", deadline=None, max_examples=150, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci" if os.environ.get("CI") else "default")


def _cuda_runs_here():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return True
    try:
        from numba import cuda
    except ImportError:
        return False
    return cuda.is_available()


# tests/cuda runs on a GPU, or under the simulator (tests/test_cuda_simulator.py
# starts that run); elsewhere it is not collected at all.
collect_ignore = [] if _cuda_runs_here() else ["cuda"]


@pytest.fixture
def rng(request):
    # A fixed seed per test, so a failure reproduces.
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture(params=["default-plan", "column-path-always"])
def kernel_plan(request, monkeypatch):
    """Run a test with the backend's default plan, and again with every shape sent
    down the column path, so both kernel families see every shape."""
    if request.param == "column-path-always":
        from fastbn._cpu import backend

        monkeypatch.setattr(backend, "MIN_RUN", 1 << 62)
    return request.param

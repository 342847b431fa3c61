"""CUDA tests: on a GPU, or on the CPU under Numba's simulator.

Run them with ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda`` (the
variable must be set before numba is imported, hence a separate process:
``tests/test_cuda_simulator.py`` does exactly that inside the normal test
run), or plainly on a machine with an NVIDIA GPU.  Without either, they skip.
Tests marked ``gpu`` need a real device (CuPy/torch interop, large shapes).
"""

import os
import zlib
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _cuda_usable():
    try:
        from numba import cuda
    except ImportError:
        return False
    return SIMULATOR or cuda.is_available()


USABLE = _cuda_usable()


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        if not USABLE:
            item.add_marker(pytest.mark.skip(
                reason="no CUDA device and NUMBA_ENABLE_CUDASIM unset (see tests/cuda/conftest.py)"))
        elif SIMULATOR and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a real GPU"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a real NVIDIA GPU, not the simulator")


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture
def dev():
    """Host -> device copy helper."""
    from numba import cuda

    return cuda.to_device


def host(a):
    """A device result back on the host (Numba, CuPy or torch)."""
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    if type(a).__module__.startswith("torch"):
        return a.cpu().numpy()
    return np.asarray(a)

"""Every CUDA kernel compiles for a real GPU (PTX for sm_80), no GPU needed.

The simulator runs kernels as Python, so it cannot catch what only the CUDA
compiler rejects (typing, float16 conversions, shared arrays).  This compiles
each kernel with the argument types the backend launches it with.  It needs
NVVM and NVRTC (the CUDA toolkit, or the nvidia-cuda-nvrtc wheel of the test
extra) and skips, saying why, when they are missing.
"""

import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
from fastbn._cuda.signatures import compile_ptx as _compile, launch_signatures  # noqa: E402


def _signatures():
    return launch_signatures()


@pytest.fixture(scope="module")
def compile_ptx():
    def run(name, args):
        return _compile(name, args, cc=(8, 0))

    try:
        run(*_signatures()[-1])  # fill: the simplest
    except Exception as exc:  # no NVVM / NVRTC on this machine
        if "not found" in str(exc).lower() or "Failure finding" in str(exc) or \
                type(exc).__name__ in ("NvvmSupportError", "DynamicLibNotFoundError",
                                       "CudaSupportError"):
            pytest.skip(f"no CUDA compiler libraries here: {type(exc).__name__}: {exc}"[:300])
        raise
    return run


def test_every_kernel_has_a_launch_signature():
    from numba.cuda.dispatcher import CUDADispatcher

    from fastbn._cuda import kernels

    defined = {name for name, obj in vars(kernels).items()
               if isinstance(obj, CUDADispatcher) and not obj.targetoptions.get("device")}
    assert defined == {name for name, _ in _signatures()}


@pytest.mark.parametrize("name,args", _signatures(),
                         ids=[f"{n}-{'-'.join(str(a) for a in s)}"[:90] for n, s in _signatures()])
def test_kernel_compiles_to_ptx(compile_ptx, name, args):
    assert ".entry" in compile_ptx(name, args)

"""Every CUDA kernel compiles for a real GPU (PTX for sm_80), no GPU needed.

The simulator runs kernels as Python, so it cannot catch what only the CUDA
compiler rejects (typing, float16 conversions, shared arrays).  This compiles
each kernel with the argument types the backend launches it with.  It needs
NVVM and NVRTC (the CUDA toolkit, or the nvidia-cuda-nvrtc wheel of the test
extra) and skips, saying why, when they are missing.
"""

import types as pytypes

import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
from numba import types  # noqa: E402


def _arr(dtype, ndim):
    return types.Array(dtype, ndim, "C")


F16, F32, F64, I32, I64 = types.float16, types.float32, types.float64, types.int32, types.int64


def _signatures():
    """(kernel name, argument types) for every launch in fastbn._cuda.backend."""
    sigs = []
    for wd in (F32, F64):
        x3, p2 = _arr(wd, 3), _arr(wd, 2)
        v, m = _arr(F64, 1), _arr(F64, 2)
        sigs += [
            ("partial_moments", (x3, I64, m, m, m)),
            ("finish_forward", (x3, m, m, m, v, v, F64, v, v, v, p2)),
            ("finish_stats", (x3, m, m, m, F64, v, v)),
            ("inference_params", (v, v, v, v, F64, p2)),
            ("affine", (x3, p2, x3)),
            ("partial_grad_sums", (x3, x3, v, I64, m, m)),
            ("finish_backward", (m, m, v, v, v, F64, v, v, p2)),
            ("dx", (x3, x3, p2, x3)),
            ("partial_feature_stats", (x3, I64, m, m, m, m, m)),
            ("standardize_params", (x3, m, m, m, p2)),
            ("minmax_params", (m, m, F64, F64, p2)),
            ("clip", (_arr(wd, 1), F64, F64)),
        ]
        for running in (F32, F64):
            r = _arr(running, 1)
            sigs.append(("update_running", (r, r, v, v, F64, F64)))
    sigs.append(("fused_forward", (_arr(F32, 3), _arr(F64, 1), _arr(F64, 1), F64, _arr(F32, 3),
                                   _arr(F64, 1), _arr(F64, 1), _arr(F64, 1))))
    for src, dst in [(F16, F32), (I32, F64), (F64, F32), (F32, F16), (F64, F64), (F32, F64),
                     (I64, F64), (types.boolean, F64), (F16, F64)]:
        sigs.append(("cast", (_arr(src, 1), _arr(dst, 1))))
    sigs += [("fill", (_arr(F64, 1), F64)), ("multiply", (_arr(F64, 1),) * 3)]
    return sigs


@pytest.fixture(scope="module")
def compile_ptx():
    import numba.cuda.dispatcher as dispatcher

    # Device functions ask the current device for its compute capability; there is none.
    original = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(8, 0))
    try:
        from fastbn._cuda import kernels

        def run(name, args):
            return cuda.compile_ptx(getattr(kernels, name).py_func, args, cc=(8, 0))

        try:
            run("fill", (_arr(F64, 1), F64))
        except Exception as exc:  # no NVVM / NVRTC on this machine
            if "not found" in str(exc).lower() or "Failure finding" in str(exc) or \
                    type(exc).__name__ in ("NvvmSupportError", "DynamicLibNotFoundError",
                                           "CudaSupportError"):
                pytest.skip(f"no CUDA compiler libraries here: {type(exc).__name__}: {exc}"[:300])
            raise
        yield run
    finally:
        dispatcher.get_current_device = original


@pytest.mark.parametrize("name,args", _signatures(),
                         ids=[f"{n}-{'-'.join(str(a) for a in s)}"[:90] for n, s in _signatures()])
def test_kernel_compiles_to_ptx(compile_ptx, name, args):
    ptx, _ = compile_ptx(name, args)
    assert ".entry" in ptx

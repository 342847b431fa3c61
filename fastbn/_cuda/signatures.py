"""The argument types of every kernel launch in ``fastbn._cuda.backend``, and a PTX
compiler for them that needs no GPU (NVVM and NVRTC only).

``tests/test_cuda_ptx.py`` compiles every entry (what only the CUDA compiler
rejects: typing, float16 conversions, shared arrays), and ``bench/gpu_proxy.py``
assembles the streaming kernels for sm_90 to count their machine instructions.
"""

import types as pytypes

from numba import cuda, types


def _arr(dtype, ndim):
    return types.Array(dtype, ndim, "C")


F16, F32, F64, I32, I64 = types.float16, types.float32, types.float64, types.int32, types.int64


def launch_signatures():
    """(kernel name, argument types) for every launch in fastbn._cuda.backend: the data in
    each dtype the kernels read directly (float16 into float32 arithmetic, integers
    into float64), per-channel vectors float64 or empty."""
    sigs = []
    v, m = _arr(F64, 1), _arr(F64, 2)
    for wd, data in ((F32, (F16, F32)), (F64, (F64, I32))):
        p2 = _arr(wd, 2)
        out = _arr(F16 if data[0] == F16 else wd, 1)
        for dt in data:
            x1 = _arr(dt, 1)
            sigs += [
                ("plane_moments", (x1, I64, I64, I64, I64, wd, m, m, m, v, v)),
                ("row_moments", (x1, I64, I64, I64, wd, m, m, m, v, v)),
                ("finish_forward", (x1, I64, m, m, m, v, v, F64, v, v, F64, F64, v, v, p2)),
                ("finish_stats", (x1, I64, m, m, m, F64, v, v)),
                ("affine", (x1, x1, p2, out if dt == F16 else _arr(wd, 1), I64, I64)),
                ("plane_grad_sums", (x1, x1, I64, I64, I64, v, I64, wd, m, m, v)),
                ("row_grad_sums", (x1, x1, I64, I64, I64, v, wd, m, m, v)),
                ("dx", (x1, x1, p2, out if dt == F16 else _arr(wd, 1), I64, I64)),
                # the fused epilogues: a residual, ReLU's mask y and dresidual of the data's
                # dtype, or an empty float64 array (not given)
                ("plane_grad_sums", (x1, x1, I64, I64, I64, v, I64, wd, m, m, x1)),
                ("row_grad_sums", (x1, x1, I64, I64, I64, v, wd, m, m, x1)),
                ("affine_epilogue", (x1, p2, out if dt == F16 else _arr(wd, 1), I64, I64, x1,
                                     types.boolean)),
                ("affine_epilogue", (x1, p2, out if dt == F16 else _arr(wd, 1), I64, I64, v,
                                     types.boolean)),
                ("dx_epilogue", (x1, x1, p2, out if dt == F16 else _arr(wd, 1), I64, I64, x1,
                                 out if dt == F16 else _arr(wd, 1))),
                ("dx_epilogue", (x1, x1, p2, out if dt == F16 else _arr(wd, 1), I64, I64, v, v)),
                ("plane_features", (x1, I64, I64, I64, I64, wd, m, m, m, m, m)),
                ("row_features", (x1, I64, I64, I64, wd, m, m, m, m, m)),
                ("standardize_params", (x1, I64, m, m, m, p2)),
                ("two_sided", (x1, x1, p2, out if dt == F16 else _arr(wd, 1), I64, I64)),
            ]
        sigs += [
            ("inference_params", (v, v, v, v, F64, p2)),
            ("finish_backward", (m, m, v, v, v, F64, v, v, p2)),
            ("minmax_params", (m, m, F64, F64, p2)),
            ("clip", (_arr(wd, 1), F64, F64)),
        ]
    for dt in (F16, F32):
        x1 = _arr(dt, 1)
        for res in (v, x1):
            sigs.append(("fused_forward", (x1, I64, I64, I64, v, v, F64, v, v, F64, x1, v, v,
                                           res, types.boolean)))
    sigs.append(("fused_forward", (_arr(F32, 1), I64, I64, I64, _arr(F32, 1), _arr(F32, 1), F64,
                                   _arr(F32, 1), _arr(F32, 1), F64, _arr(F32, 1),
                                   _arr(F32, 1), _arr(F32, 1), v, types.boolean)))
    sigs.append(("cast", (_arr(types.boolean, 1), _arr(F64, 1))))  # boolean data only
    sigs += [("fill", (_arr(F64, 1), F64))]
    return sigs


def compile_ptx(name, args, cc=(8, 0)):
    """PTX of kernel ``name`` of ``fastbn._cuda.kernels`` for ``args``, compute capability
    ``cc``; no GPU needed (device functions ask the current device for its compute
    capability: there is none, so the answer is ``cc``)."""
    import numba.cuda.dispatcher as dispatcher

    from . import kernels

    original = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=cc)
    try:
        ptx, _ = cuda.compile_ptx(getattr(kernels, name).py_func, args, cc=cc)
    finally:
        dispatcher.get_current_device = original
    return ptx

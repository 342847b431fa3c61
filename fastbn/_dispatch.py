"""Choose the backend that computes a call from the arrays it is given.

Host arrays go to the CPU backend.  Device arrays (``__cuda_array_interface__``:
Numba device arrays, CuPy arrays, PyTorch CUDA tensors) go to the CUDA backend
(``fastbn._cuda``, imported only then: it needs numba-cuda).  The CPU backend
takes validated NumPy arrays from ``fastbn.api``; the CUDA backend (``device``
true) takes the call's arguments as given and validates them on its side.
"""


import numpy as np


def _is_device_array(a):
    if a is None or type(a) is np.ndarray:
        return False
    # Numba's simulated device arrays have no __cuda_array_interface__
    return hasattr(a, "__cuda_array_interface__") or type(a).__module__.startswith("numba.cuda")


_host = None


def host_backend():
    """The CPU backend (its kernels module loads on first use); its plain NumPy stand-in
    under ``NUMBA_DISABLE_JIT=1``, where the kernels' LLVM intrinsics cannot run."""
    global _host
    if _host is None:
        import numba

        if numba.config.DISABLE_JIT:
            from ._cpu.numpy_backend import backend
        else:
            from ._cpu.backend import backend
        _host = backend
    return _host


def backend_for(**arrays):
    """The backend for these arrays; ``TypeError`` when host and device arrays are mixed."""
    device = [name for name, a in arrays.items() if _is_device_array(a)]
    if not device:
        return host_backend()
    host = [name for name, a in arrays.items() if a is not None and not _is_device_array(a)]
    if host:
        raise TypeError(
            f"cannot mix device arrays ({', '.join(device)}) with host arrays ({', '.join(host)})"
        )
    try:
        from ._cuda.backend import backend
    except ImportError as exc:
        raise TypeError(
            f"{device[0]} is a CUDA device array, but the CUDA backend cannot load ({exc}); "
            "install fastbn[cuda] (numba-cuda)"
        ) from exc
    return backend

"""Choose the backend that computes a call from the arrays it is given.

Host arrays go to the CPU backend.  Arrays exposing ``__cuda_array_interface__``
will go to a CUDA backend: it plugs in here, behind the same methods, without
any change to ``fastbn.api``.
"""


import numpy as np


def _is_device_array(a):
    return a is not None and type(a) is not np.ndarray and hasattr(a, "__cuda_array_interface__")


def backend_for(**arrays):
    """The backend for these arrays; ``TypeError`` when host and device arrays are mixed."""
    device = [name for name, a in arrays.items() if _is_device_array(a)]
    if not device:
        from ._cpu.backend import backend

        return backend
    host = [name for name, a in arrays.items() if a is not None and not _is_device_array(a)]
    if host:
        raise TypeError(
            f"cannot mix device arrays ({', '.join(device)}) with host arrays ({', '.join(host)})"
        )
    raise TypeError(
        f"{device[0]} is a CUDA device array, but this build of fastbn has no CUDA backend"
    )

"""The CUDA backend (numba-cuda): kernels in ``kernels.py``, the device API in ``backend.py``.

Nothing here is imported by ``import fastbn``; ``fastbn._dispatch`` loads the
backend the first time a call receives device arrays.
"""

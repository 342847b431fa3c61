"""Numba ``njit`` with an on-disk cache that can never break ``import fastbn``.

Numba looks for a cache directory in this order: ``NUMBA_CACHE_DIR`` (always
honoured), the package's ``__pycache__``, then the user's cache directory.  When
none of them is writable (a read-only install under a read-only home), Numba
refuses to decorate the function; we then fall back to a per-user directory in
the system temporary directory, and as a last resort compile without a cache.
"""

import os
import tempfile
import warnings

import numba
from numba.core.cpu_options import ParallelOptions

_NO_LOCATOR = "no locator available"


def fallback_cache_dir():
    """Directory used when neither the package nor the user cache is writable."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"fastbn-numba-cache-{uid}")


# ``parallel=True`` for a kernel means its ``prange`` loops and nothing else.  Numba
# would also turn every top-level NumPy call of a parallel function (``np.zeros``,
# ``a.sum()``) into a parallel region of its own: a thread launch each, 2.5 us, for
# a few bytes of work (the column kernels' parameter arrays; a floor's ``np.zeros``
# and ``.sum()``).  An options object, not a dict: Numba pops the dict's keys.
PRANGE_ONLY = ParallelOptions({"prange": True, "comprehension": False, "reduction": False,
                               "inplace_binop": False, "setitem": False, "numpy": False,
                               "stencil": False, "fusion": False})


def kernel(**options):
    """``numba.njit(cache=True, nogil=True, error_model="numpy", **options)`` that degrades
    instead of failing.

    The NumPy error model (a float division by zero gives inf or NaN, as in NumPy) leaves
    no exception path in the kernels.  With Python's, every helper that can divide has one,
    and Numba then cannot prune the reference-count updates of the arrays passed to it: an
    atomic increment and decrement per array per call, 70 ns per channel in a statistics
    loop.  No kernel relies on the exception.
    """
    options = {"cache": True, "nogil": True, "error_model": "numpy", **options}
    if options.get("parallel") is True:
        options["parallel"] = PRANGE_ONLY

    def decorate(func):
        try:
            return numba.njit(**options)(func)
        except RuntimeError as exc:
            if _NO_LOCATOR not in str(exc):
                raise
        if not numba.config.CACHE_DIR:
            numba.config.CACHE_DIR = fallback_cache_dir()
            try:
                return numba.njit(**options)(func)
            except RuntimeError as exc:
                if _NO_LOCATOR not in str(exc):
                    raise
        warnings.warn(
            f"fastbn: no writable Numba cache directory for {func.__qualname__}; "
            "kernels will be recompiled in every process (set NUMBA_CACHE_DIR)",
            RuntimeWarning,
            stacklevel=2,
        )
        return numba.njit(**{**options, "cache": False})(func)

    return decorate

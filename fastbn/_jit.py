"""Numba ``njit`` with an on-disk cache that can never break ``import fastbn``, and the
serial twins of the parallel kernels.

Kernels are cached in ``<root>/kernels-<digest>`` (``fastbn._cache.DigestLocator``):
root is ``NUMBA_CACHE_DIR`` when set (always honoured), else fastbn's private
directory in the user's cache home, and the digest covers every source compiled
code depends on.  When that directory cannot be used, Numba's own locators apply
(the package's ``__pycache__``, the user's cache directory); when none of them is
writable (a read-only install under a read-only home), Numba refuses to decorate
the function, and we compile without a cache.
"""

import types

import numba
from numba.core.cpu_options import ParallelOptions

from . import _cache, _threads

_threads.preload_tbb()  # before Numba picks its threading layer
_cache.install_locator()  # before any kernel is decorated

_NO_LOCATOR = "no locator available"


# ``parallel=True`` for a kernel means its ``prange`` loops and nothing else.  Numba
# would also turn every top-level NumPy call of a parallel function (``np.zeros``,
# ``a.sum()``) into a parallel region of its own: a thread launch each, 2.5 us, for
# a few bytes of work (the column kernels' parameter arrays; a floor's ``np.zeros``
# and ``.sum()``).  An options object, not a dict: Numba pops the dict's keys.
PRANGE_ONLY = ParallelOptions({"prange": True, "comprehension": False, "reduction": False,
                               "inplace_binop": False, "setitem": False, "numpy": False,
                               "stencil": False, "fusion": False})

# id(dispatcher) -> (dispatcher, Python function, options as written), for ``serial_module``
_SOURCES = {}


def kernel(**options):
    """``numba.njit(cache=True, nogil=True, error_model="numpy", **options)`` that degrades
    instead of failing.

    The NumPy error model (a float division by zero gives inf or NaN, as in NumPy) leaves
    no exception path in the kernels.  With Python's, every helper that can divide has one,
    and Numba then cannot prune the reference-count updates of the arrays passed to it: an
    atomic increment and decrement per array per call, 70 ns per channel in a statistics
    loop.  No kernel relies on the exception.
    """
    def decorate(func):
        dispatcher = _njit(func, options)
        _SOURCES[id(dispatcher)] = (dispatcher, func, options)
        return dispatcher

    return decorate


def _njit(func, options):
    options = {"cache": True, "nogil": True, "error_model": "numpy", **options}
    _cache.mark(func)
    if options.get("parallel") is True:
        options["parallel"] = PRANGE_ONLY
    try:
        return _cache.guard(numba.njit(**options)(func))
    except RuntimeError as exc:
        if _NO_LOCATOR not in str(exc):
            raise
    _cache.warn_once("no-cache", "fastbn: no writable private Numba cache directory; "
                     "kernels will be recompiled in every process (set NUMBA_CACHE_DIR)")
    return numba.njit(**{**options, "cache": False})(func)


def kernels_defined():
    """``(module.qualname, dispatcher)`` of every kernel ``kernel()`` has decorated so far
    (not the serial twins)."""
    return [(f"{func.__module__}.{func.__qualname__}", dispatcher)
            for dispatcher, func, _ in list(_SOURCES.values())]


SERIAL_PREFIX = "serial."


def serial_module(module):
    """A copy of ``module`` whose kernels run on the calling thread.

    Every kernel of ``module`` is compiled again from the same function without
    ``parallel`` (a ``prange`` is then a ``range``), and every kernel calls the
    twins of the kernels it calls, so no call through the copy ever enters Numba's
    threading layer: no thread launch for a few kilobytes, and no use of a thread
    pool that a ``fork()`` left behind (GNU OpenMP's).  The same source gives the
    same arithmetic, in the same order for a plan given one thread.  The twins are
    cached on disk under their own names (``serial.<name>``) next to the originals.
    """
    twin = types.ModuleType(module.__name__ + "_serial", module.__doc__)
    namespace = twin.__dict__
    namespace.update(vars(module))
    for name, value in vars(module).items():
        source = _SOURCES.get(id(value))
        if source is None or source[0] is not value:
            continue
        _, func, options = source
        copy = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__,
                                  func.__closure__)
        copy.__kwdefaults__ = func.__kwdefaults__
        copy.__qualname__ = SERIAL_PREFIX + func.__qualname__
        copy.__module__ = func.__module__
        copy.__doc__ = func.__doc__
        namespace[name] = _njit(copy, {k: v for k, v in options.items() if k != "parallel"})
    return twin

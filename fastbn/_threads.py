"""fastbn's threads: the threading layer, the thread count, and life after ``fork()``.

Numba runs parallel kernels on one of three threading layers.  fastbn prefers
TBB (the ``tbb`` package, a dependency where it has wheels): it is safe for
threads and for ``fork()``, its workers sleep instead of spinning against
NumPy's BLAS threads, and it leaves OpenMP, and so PyTorch's OpenMP settings,
alone.  Installed from PyPI into a virtual environment, ``libtbb.so.12`` lies in
the environment's ``lib/``, which the dynamic loader does not search: it is
loaded here, before Numba picks a layer, and Numba's default order then finds
it.  ``NUMBA_THREADING_LAYER`` still decides when set.

Under any layer, work below ``SERIAL_MAX_BYTES`` runs on the calling thread
(Numba's thread mask set to 1 for the call), and every call in a process forked
from one that used GNU OpenMP, whose thread pool does not survive a ``fork()``
(Numba kills a child that enters it), takes the kernels' serial twins
(``fastbn._jit.serial_module``), which never enter the threading layer.
"""

import contextlib
import ctypes
import os
import sys
import threading
import time

# Numba is imported on first use, not with ``import fastbn`` (0.4 s).
_PARALLEL = "numba.np.ufunc.parallel"


def _parallel():
    """Numba's parallel runtime module (imported here on first use)."""
    module = sys.modules.get(_PARALLEL)
    if module is None:
        import numba.np.ufunc.parallel as module
    return module

# Measured on 2 cores (README, "Processes, threads and caches"): below this many bytes of
# input a call is faster on the calling thread than split across threads.
SERIAL_MAX_BYTES = 128 << 10

_TBB = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}


def _tbb_wanted():
    layer = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
    return layer in ("", "default", "tbb", "safe", "threadsafe", "forksafe")


def preload_tbb():
    """Load the TBB runtime of this Python environment, so that Numba's TBB layer loads.

    Returns the path loaded, or None (TBB not installed, or another layer was asked for).
    """
    name = _TBB.get(sys.platform)
    if name is None or not _tbb_wanted() or _parallel()._is_initialized:
        return None
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        libdir = ("Library", "bin") if sys.platform == "win32" else ("lib",)
        path = os.path.join(prefix, *libdir, name)
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            except OSError:
                return None
            return path
    return None


class _State(threading.local):
    limit = None  # this thread's ``threads(n)`` override


_state = _State()
_process = {"limit": None, "pool_unusable": False}


def layer():
    """The threading layer Numba loaded, or None before the first parallel call."""
    parallel = sys.modules.get(_PARALLEL)
    if parallel is None or not parallel._is_initialized:
        return None
    try:
        return parallel.threading_layer()
    except ValueError:
        return None


def numba_threads():
    """``numba.get_num_threads()`` without its two lock acquisitions per call (half a
    microsecond of a 20 us call), and without starting Numba's threads to ask."""
    parallel = _parallel()
    if not parallel._is_initialized:
        return parallel.config.NUMBA_NUM_THREADS  # and no pool started just to ask
    n = parallel._get_num_threads()
    return n if n > 0 else parallel.get_num_threads()


def set_mask(n):
    """Numba's thread count for parallel regions started by the calling thread."""
    parallel = _parallel()
    if parallel._is_initialized:
        parallel._set_num_threads(n)
    else:
        parallel.set_num_threads(n)


def limit():
    """fastbn's own limit for the calling thread (``threads(n)``, else ``set_num_threads``)."""
    n = _state.limit
    return _process["limit"] if n is None else n


def pool_unusable():
    """True in a process forked from one whose GNU OpenMP pool ran: only serial kernels here."""
    return _process["pool_unusable"]


def set_num_threads(n):
    """Use at most ``n`` threads in fastbn's kernels, in every thread of this process.

    ``n=None`` lifts the limit (Numba's thread count, ``NUMBA_NUM_THREADS``).  With
    ``n == 1`` every call runs on the calling thread and wakes no worker.  Other
    libraries' settings (NumPy's BLAS, PyTorch) are not touched.
    """
    _process["limit"] = _check(n)


def get_num_threads():
    """The number of threads a large fastbn call uses now, from the calling thread."""
    return limited(numba_threads())


def limited(full):
    """``full`` (Numba's count) under fastbn's limit for the calling thread."""
    cap = limit()
    return full if cap is None or cap >= full else cap


def threads(n):
    """Within the block, fastbn calls made by this thread use at most ``n`` threads.

    Examples
    --------
    >>> import fastbn, numpy as np
    >>> with fastbn.threads(1):       # e.g. inside a DataLoader worker
    ...     y, mean, invstd = fastbn.batch_norm_forward(np.ones((4, 3, 8)))
    """
    return _Limit(_check(n))


class _Limit(contextlib.ContextDecorator):
    """``threads(n)``'s context manager: a class, not a generator, because fastbn.torch
    enters one on every call, right after a convolution, where each Python operation
    costs several times what it costs in a loop."""

    def __init__(self, n):
        self._n = n
        self._previous = None

    def _recreate_cm(self):  # as a decorator: a fresh one per call (recursion, threads)
        return _Limit(self._n)

    def __enter__(self):
        self._previous = _state.limit
        _state.limit = self._n
        return self

    def __exit__(self, *exc):
        _state.limit = self._previous
        return False


def _check(n):
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    return n


# One entry per parallel call in progress (list appends and pops are atomic under the GIL).
_inflight = []


def enter_parallel():
    _inflight.append(None)


def exit_parallel():
    _inflight.pop()


def _before_fork():
    """Wait (the GIL released) until no thread of this process is inside a parallel
    kernel: TBB can then shut its workers down for the fork, and no child inherits a
    thread pool in the middle of a region.  New calls need the GIL, which the forking
    thread keeps from here to the fork."""
    while _inflight:
        time.sleep(0.0002)


_fork_hooks = []


def at_fork_in_child(hook):
    """Run ``hook()`` in the child after every ``fork()`` (locks held by other threads of
    the parent are reset this way)."""
    _fork_hooks.append(hook)


def _after_fork_in_child():
    if layer() == "omp":
        _process["pool_unusable"] = True
    for hook in _fork_hooks:
        hook()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def register_with_threadpoolctl():
    """Make fastbn's thread count visible to, and settable by, ``threadpoolctl`` (and so
    scikit-learn's ``threadpool_limits``), as the library of Numba's threading layer once
    it is loaded: ``threadpool_info()`` lists it with ``user_api == "fastbn"``."""
    try:
        import threadpoolctl
    except ImportError:
        return

    class FastbnController(threadpoolctl.LibController):
        user_api = "fastbn"
        internal_api = "numba"
        filename_prefixes = ("tbbpool", "omppool", "workqueue")

        def get_num_threads(self):
            return get_num_threads()

        def set_num_threads(self, num_threads):
            set_num_threads(int(num_threads))

        def get_version(self):
            import numba

            return numba.__version__

        def set_additional_attributes(self):
            self.threading_layer = layer()

    threadpoolctl.register(FastbnController)

"""The one line fastbn prints on stderr before it compiles kernels.

Compiling happens on first use only (the machine code is cached on disk, and later
processes load it in well under a second), but a first use waits tens of seconds, so
it says so: ``fastbn: compiling kernels for float32 (first use only, ...)``, once per
process, when Numba actually compiles a fastbn function (its ``numba:compile`` event,
which a disk-cache hit never fires).  The dtype named is that of the first array the
outermost compiled call takes: the helpers it compiles, and the per-channel float64
vectors, would name others.  The C library prints it only when
``FASTBN_COMPILE_NOTICE=1``: C programs own their stderr.
"""

import sys
import threading

from numba.core import event

# a first training forward of one dtype on an empty cache, 2 cores (README: 59.9 s)
ABOUT_SECONDS = 60

_lock = threading.Lock()
_state = {"enabled": True, "installed": False, "announced": False}
_depth = threading.local()


def set_enabled(flag):
    """Print the notice (True, the Python API's default) or not (the C library's)."""
    _state["enabled"] = bool(flag)


class _CompileNotice(event.Listener):
    def on_start(self, ev):
        outermost = getattr(_depth, "n", 0) == 0
        _depth.n = getattr(_depth, "n", 0) + 1
        data = ev.data or {}
        fn = getattr(data.get("dispatcher"), "py_func", None)
        if not outermost or not getattr(fn, "__module__", "").startswith("fastbn."):
            return
        dtype = next((str(a.dtype) for a in data.get("args", ()) if hasattr(a, "dtype")), "")
        with _lock:
            if _state["announced"]:
                return
            _state["announced"] = True
        if _state["enabled"]:
            print(f"fastbn: compiling kernels{' for ' + dtype if dtype else ''} (first use "
                  f"only, about {ABOUT_SECONDS} s; cached on disk for later runs)",
                  file=sys.stderr, flush=True)

    def on_end(self, ev):
        _depth.n = max(0, getattr(_depth, "n", 1) - 1)


def install():
    """Listen to Numba's compile events (once per process)."""
    with _lock:
        if not _state["installed"]:
            event.register("numba:compile", _CompileNotice())
            _state["installed"] = True

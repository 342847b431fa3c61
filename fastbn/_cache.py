"""Where compiled kernels are cached, and the rules that keep that cache trustworthy.

Numba's cache files are pickles: whoever can write a cache directory can run code
in every process that loads from it.  So a directory is used only if it belongs
to the user and no one else can write to it (``is_private``); fastbn's own
fallback lives in the user's cache home, created ``0700``, never in a shared
temporary directory whose name anyone could claim first.  A corrupt cache entry
(a truncated file after a full disk or a killed process: Numba then raises
``EOFError`` or ``UnpicklingError`` on every call, numba#10434) is dropped and
recompiled, with one warning.
"""

import glob
import os
import stat
import threading
import warnings

from numba.core import caching, config

_warned = set()
_warn_lock = threading.Lock()


def warn_once(key, message):
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def is_private(path):
    """True if ``path`` is a directory owned by this user that no one else can write to."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return False
    return not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def user_cache_home():
    """``$XDG_CACHE_HOME``, else ``~/.cache`` (None when neither can be told)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base and os.path.isabs(base):
        return base
    home = os.path.expanduser("~")
    return os.path.join(home, ".cache") if os.path.isabs(home) else None


def private_cache_dir(name="fastbn"):
    """``<user cache home>/fastbn``, created ``0700``; None (with a warning) when it cannot be
    created or is not private (another owner, or writable by others)."""
    home = user_cache_home()
    if home is None:
        return None
    path = os.path.join(home, name)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return None
    if not is_private(path):
        warn_once(path, f"fastbn: not using the cache directory {path}: it is not owned by "
                        "this user or others can write to it; kernels are not cached on disk")
        return None
    return path


class _GuardMixin:
    """Numba's function (or cfunc) cache, minus the two ways a cache directory can hurt: one that is not
    private is not used, and an entry that fails to load is removed and recompiled."""

    def load_overload(self, sig, target_context):
        if not self._private():
            return None
        try:
            return super().load_overload(sig, target_context)
        except Exception as exc:  # a corrupt pickle can raise almost anything
            self._drop(exc)
            return None

    def save_overload(self, sig, data):
        if not self._private():
            return
        try:
            super().save_overload(sig, data)
        except OSError:
            raise
        except Exception as exc:  # the index it updates was corrupt
            self._drop(exc)
            super().save_overload(sig, data)

    def _private(self):
        path = self._cache_path
        root = config.CACHE_DIR  # NUMBA_CACHE_DIR: Numba creates the leaf inside it
        dirs = [path] + ([root] if root and path.startswith(os.path.join(root, "")) else [])
        if all(not os.path.exists(d) or is_private(d) for d in dirs):
            return True
        warn_once(path, f"fastbn: not using the Numba cache directory {path}: it is not owned "
                        "by this user or others can write to it; kernels are compiled in memory")
        return False

    def _drop(self, exc):
        index = self._cache_file._index_path
        for path in [index] + glob.glob(glob.escape(index[:-len(".nbi")]) + ".*.nbc"):
            try:
                os.unlink(path)
            except OSError:
                pass
        warn_once(("corrupt", self._cache_path),
                  f"fastbn: dropped a corrupt Numba cache entry in {self._cache_path} "
                  f"({type(exc).__name__}: {exc}); recompiling")


_guarded_classes = {}


def guard(dispatcher):
    """Give ``dispatcher`` (``njit`` or ``cfunc`` with ``cache=True``) the guarded cache;
    returns it."""
    cache = getattr(dispatcher, "_cache", None)  # a plain function under NUMBA_DISABLE_JIT
    cls = type(cache)
    if isinstance(cache, caching.Cache) and not isinstance(cache, _GuardMixin):
        if cls not in _guarded_classes:
            _guarded_classes[cls] = type("Guarded" + cls.__name__, (_GuardMixin, cls), {})
        cache.__class__ = _guarded_classes[cls]
    return dispatcher

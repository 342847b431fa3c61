"""Where compiled kernels are cached, and the rules that keep that cache trustworthy.

Numba's cache files are pickles: whoever can write a cache directory can run code
in every process that loads from it.  So a directory is used only if it belongs
to the user and no one else can write to it (``is_private``); fastbn's own
fallback lives in the user's cache home, created ``0700``, never in a shared
temporary directory whose name anyone could claim first.  A corrupt cache entry
(a truncated file after a full disk or a killed process: Numba then raises
``EOFError`` or ``UnpicklingError`` on every call, numba#10434) is dropped and
recompiled, with one warning.  Processes that compile the same functions at once
(spawned workers, MPI ranks, on an empty cache) take turns on each entry's file lock
(``entry_lock``): Numba's save is not atomic across processes (numba#4807).
"""

import contextlib
import glob
import hashlib
import os
import shutil
import stat
import sys
import threading
import warnings

try:
    import fcntl
except ImportError:  # no POSIX locks (Windows): Numba's own behaviour
    fcntl = None

import llvmlite
import numba
from numba.core import caching, config

from ._machine import stream_min_bytes

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


# Everything compiled code depends on besides the function's own file.  Numba stamps a
# cache entry with the defining file only, so an edit to a helper in another kernel
# module, to the decorator's options (``_jit.py``) or to a plan constant compiled into the
# C entry points would otherwise leave stale machine code.  Every fastbn function is
# cached under one directory named by a digest of all of these.
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_DIGESTED = ("_jit.py", "_cache.py", os.path.join("_cpu", "kernels"),
             os.path.join("_cpu", "floors.py"), os.path.join("capi", "_entries.py"))
KERNEL_CACHE_PREFIX = "kernels-"
_digest = None


def code_digest():
    """sha256 (16 hex digits) of the kernels' sources, the benchmark floors, ``_jit.py``,
    ``_cache.py``, the C entry points, the Python, Numba and llvmlite versions, and the
    streaming-store threshold (``_machine.stream_min_bytes``)."""
    global _digest
    if _digest is None:
        h = hashlib.sha256()
        for name in _DIGESTED:
            path = os.path.join(_PACKAGE, name)
            files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".py")]
                     if os.path.isdir(path) else [path])
            for f in files:
                h.update(os.path.relpath(f, _PACKAGE).encode() + b"\0")
                with open(f, "rb") as fh:
                    h.update(fh.read())
        h.update(f"{sys.version_info[:2]} {numba.__version__} {llvmlite.__version__}".encode())
        h.update(f"stream {stream_min_bytes()}".encode())  # compiled in (kernels.codegen)
        _digest = h.hexdigest()[:16]
    return _digest


_kernel_dirs = {}


def kernel_cache_dir():
    """``<root>/kernels-<code_digest()>``, created ``0700``, where every compiled fastbn
    function is cached: root is ``NUMBA_CACHE_DIR`` when set, else fastbn's private
    directory in the user's cache home.  None when that cannot be used privately."""
    key = config.CACHE_DIR
    if key not in _kernel_dirs:
        _kernel_dirs[key] = _make_kernel_cache_dir()
    return _kernel_dirs[key]


def _make_kernel_cache_dir():
    root = config.CACHE_DIR or private_cache_dir()
    if not root:
        return None
    path = os.path.join(root, KERNEL_CACHE_PREFIX + code_digest())
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return None
    if not (is_private(path) and os.access(path, os.W_OK)):
        return None
    return path


def prune_kernel_caches():
    """Remove the cache directories of other versions of the code next to this one's
    (``kernels-<other digest>``, owned by this user); returns the paths removed."""
    current = kernel_cache_dir()
    if current is None:
        return []
    root = os.path.dirname(current)
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if (name.startswith(KERNEL_CACHE_PREFIX) and path != current and not os.path.islink(path)
                and os.path.isdir(path) and is_private(path)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# set on a function that fastbn compiles (``_jit.kernel``, the C entry points)
MARK = "_fastbn_digest_cache"


def mark(func):
    """Have ``func`` cached by ``DigestLocator`` when Numba compiles it; returns it."""
    setattr(func, MARK, True)
    return func


class DigestLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Numba's cache locator for the functions fastbn compiles (``mark``):
    ``kernel_cache_dir()``, then the function's directory within the package
    (``_cpu/kernels``, ``capi``).  Other code, and fastbn's when no private directory
    can be used, falls through to Numba's locators."""

    def __init__(self, py_func, py_file, path):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = path

    def get_cache_path(self):
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        source = os.path.abspath(py_file)
        if not getattr(py_func, MARK, False) or not os.path.exists(source):
            return None
        root = kernel_cache_dir()
        if root is None:
            return None
        if source.startswith(os.path.join(_PACKAGE, "")):
            sub = os.path.relpath(os.path.dirname(source), _PACKAGE)
        else:  # a kernel made with fastbn's decorator elsewhere (the tests' own)
            sub = os.path.join("external", cls.get_suitable_cache_subpath(source))
        self = cls(py_func, source, os.path.join(root, sub))
        try:
            self.ensure_cache_path()
        except OSError:
            return None
        return self


def install_locator():
    """Put ``DigestLocator`` first in Numba's list (once)."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # renamed in Numba 0.61
    classes = impl._locator_classes
    if DigestLocator not in classes:
        classes.insert(0, DigestLocator)


@contextlib.contextmanager
def entry_lock(path, exclusive):
    """A POSIX record lock on ``path`` (created ``0600``), shared or exclusive, between
    processes.

    Numba saves an entry as its index, then a data file named by the index's count
    (``<name>.<n>.nbc``): two processes saving two signatures at once can both pick
    ``n``, and the index then names one function's machine code for the other, which
    segfaults every later process that loads it.  Saves hold the entry's lock
    exclusively, loads shared.  ``lockf``, not ``flock``: a record lock belongs to the
    process and a ``fork()`` child does not inherit it, so a child forked while another
    thread saves cannot hold the lock forever.  Where no lock file can be opened (a
    read-only directory, which nothing is saved to either), or on a system without
    ``fcntl``, the entry is used unlocked, as Numba does.
    """
    fd = -1
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError:
            fd = -1
    try:
        if fd >= 0:
            fcntl.lockf(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


class _GuardMixin:
    """Numba's function (or cfunc) cache, minus the ways a cache directory can hurt: one that
    is not private is not used, an entry that fails to load is removed and recompiled, and
    processes saving one entry at once take turns (``entry_lock``)."""

    def load_overload(self, sig, target_context):
        if not self._private():
            return None
        with entry_lock(self._lock_path(), exclusive=False):
            try:
                return super().load_overload(sig, target_context)
            except Exception as exc:  # a corrupt pickle can raise almost anything
                self._drop(exc)
                return None

    def save_overload(self, sig, data):
        if not self._private():
            return
        with entry_lock(self._lock_path(), exclusive=True):
            try:
                super().save_overload(sig, data)
            except OSError:
                raise
            except Exception as exc:  # the index it updates was corrupt
                self._drop(exc)
                super().save_overload(sig, data)

    def _lock_path(self):
        return self._cache_file._index_path[:-len(".nbi")] + ".lock"

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

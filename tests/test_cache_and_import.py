"""JIT cost and robustness: the disk cache, read-only installs, imports without cffi or CUDA.

Each test runs a fresh interpreter on a small input.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import fastbn

PACKAGE_DIR = pathlib.Path(fastbn.__file__).parent

PROBE = r"""
import sys
import numpy as np
import fastbn
from fastbn._cpu import kernels
x = np.random.default_rng(0).normal(3.0, 2.0, (6, 4, 70)).astype(np.float32)
y, mean, invstd = fastbn.batch_norm_forward(x)
ref = (x - x.mean(axis=(0, 2), keepdims=True, dtype=np.float64)) / x.std(axis=(0, 2), keepdims=True, dtype=np.float64)
assert abs(y - ref).max() < 1e-4, abs(y - ref).max()
dispatchers = [f for f in vars(kernels).values() if hasattr(f, "stats")]
hits = sum(sum(f.stats.cache_hits.values()) for f in dispatchers)
misses = sum(sum(f.stats.cache_misses.values()) for f in dispatchers)
print("hits", hits, "misses", misses)
print("file", fastbn.__file__)
print("cuda_imported", "numba.cuda" in sys.modules, "cffi_imported", sys.modules.get("cffi") is not None)
"""


def run_probe(env_updates, code=PROBE, pythonpath=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(env_updates)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    # cwd matters: "python -c" puts it first on sys.path, ahead of PYTHONPATH.
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def counts(out):
    words = out.split()
    return int(words[words.index("hits") + 1]), int(words[words.index("misses") + 1])


def cache_files(directory):
    return [p for p in pathlib.Path(directory).rglob("*") if p.suffix in (".nbi", ".nbc")]


def test_numba_cache_dir_is_honoured_and_reused(tmp_path):
    cache = tmp_path / "numba-cache"
    out1, err1 = run_probe({"NUMBA_CACHE_DIR": str(cache)})
    assert counts(out1)[1] >= 1  # compiled ...
    # ... having said so once on stderr (fastbn._notice) ...
    assert err1.count("fastbn: compiling kernels for float32 (first use only, about ") == 1
    # under the digest-named directory, by module (fastbn._cache.DigestLocator)
    assert any(p.parent.relative_to(cache).parts[1:] == ("_cpu", "kernels")
               and p.parent.relative_to(cache).parts[0].startswith("kernels-")
               for p in cache_files(cache))
    out2, err2 = run_probe({"NUMBA_CACHE_DIR": str(cache)})
    hits, misses = counts(out2)
    assert hits >= 1 and misses == 0  # ... and loaded from disk by the next process
    assert "fastbn: compiling" not in err2


def test_compile_notice_once_per_process_for_the_outermost_call(capsys, monkeypatch):
    """The notice fires on Numba's compile event for fastbn functions only, once per
    process, naming the dtype of the outermost compiled call (not of the helpers it
    compiles); the C library's runtime turns it off unless FASTBN_COMPILE_NOTICE=1."""
    from types import SimpleNamespace

    from numba.core import event, types

    from fastbn import _notice
    from fastbn._cpu.kernels import numerics
    from fastbn.capi import _build

    monkeypatch.setitem(_notice._state, "announced", False)
    listener = _notice._CompileNotice()

    def compile_event(fn, dtype, status=event.EventStatus.START):
        return event.Event("numba:compile", status,
                           data={"dispatcher": SimpleNamespace(py_func=fn),
                                 "args": (types.Array(dtype, 1, "C"),)})

    ours = numerics.update_running.py_func
    listener.on_start(compile_event(os.path.join, types.float64))  # not fastbn's
    listener.on_end(compile_event(os.path.join, types.float64, event.EventStatus.END))
    listener.on_start(compile_event(ours, types.float32))  # outermost
    listener.on_start(compile_event(ours, types.float64))  # a helper it compiles
    listener.on_end(compile_event(ours, types.float64, event.EventStatus.END))
    listener.on_end(compile_event(ours, types.float32, event.EventStatus.END))
    listener.on_start(compile_event(ours, types.float64))  # a later call: said already
    listener.on_end(compile_event(ours, types.float64, event.EventStatus.END))
    err = capsys.readouterr().err
    assert err.count("fastbn: compiling") == 1 and "kernels for float32 (first use" in err
    monkeypatch.setitem(_notice._state, "announced", False)
    monkeypatch.setitem(_notice._state, "enabled", False)
    listener.on_start(compile_event(ours, types.float32))
    listener.on_end(compile_event(ours, types.float32, event.EventStatus.END))
    assert capsys.readouterr().err == ""
    assert '_notice.set_enabled(os.environ.get("FASTBN_COMPILE_NOTICE") == "1")' in \
        _build.INIT_CODE


def _read_only_install(tmp_path):
    """A copy of the package that nobody can write to (no __pycache__ possible)."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE_DIR, site / "fastbn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for pkg in (site / "fastbn").rglob("*"):
        if pkg.is_dir():
            (pkg / "__pycache__").write_text("a file where Numba wants a directory")
    (site / "fastbn" / "__pycache__").write_text("not a directory")
    for p in sorted(site.rglob("*"), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)
    return site


def _writable_again(site):
    for p in site.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def test_read_only_install_caches_in_the_users_cache_home(tmp_path):
    """No writable __pycache__ and no writable Numba user cache: fastbn's own directory in
    $XDG_CACHE_HOME, created 0700; never a shared temporary directory."""
    site = _read_only_install(tmp_path)
    xdg, tmpdir = tmp_path / "xdg", tmp_path / "tmp"
    xdg.mkdir()
    tmpdir.mkdir()
    # Numba's own user-wide cache ($XDG_CACHE_HOME/numba) would serve; made unusable here
    (xdg / "numba").write_text("not a directory")
    env = {"XDG_CACHE_HOME": str(xdg), "HOME": "/dev/null/nohome", "TMPDIR": str(tmpdir),
           "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        out, _ = run_probe(env, pythonpath=site, cwd=tmpdir)
        assert counts(out)[1] >= 1
        assert str(site) in out
        assert cache_files(xdg / "fastbn"), "no cache in the user's cache home"
        assert (xdg / "fastbn").stat().st_mode & 0o777 == 0o700
        assert not cache_files(tmpdir)
        out2, _ = run_probe(env, pythonpath=site, cwd=tmpdir)
        hits, misses = counts(out2)
        assert hits >= 1 and misses == 0
    finally:
        _writable_again(site)


# The cache rules live in fastbn._jit / fastbn._cache, which every kernel goes through:
# these tests use one small kernel made with the same decorator, which compiles in a
# second where fastbn's own kernels take a minute.
TINY_MODULE = """
from fastbn._jit import kernel

@kernel()
def total(x):
    s = 0.0
    for v in x:
        s += v
    return s
"""

TINY_PROBE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import tiny
assert tiny.total(np.arange(5.0)) == 10.0
print("hits", sum(tiny.total.stats.cache_hits.values()),
      "misses", sum(tiny.total.stats.cache_misses.values()))
"""


def run_tiny(env_updates, module_dir, read_only=False):
    module_dir.mkdir(exist_ok=True)
    (module_dir / "tiny.py").write_text(TINY_MODULE)
    if read_only:  # no __pycache__ next to the module
        (module_dir / "__pycache__").write_text("not a directory")
        module_dir.chmod(0o555)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(env_updates)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        proc = subprocess.run([sys.executable, "-c", TINY_PROBE, str(module_dir)], env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        module_dir.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


@pytest.mark.parametrize("planted", ["world-writable", "other-owner"])
def test_a_cache_directory_someone_else_controls_is_refused(tmp_path, planted):
    """Numba unpickles its cache files: a directory another user owns or can write to
    must never be read or written.  The kernels then compile in memory, with a warning."""
    if planted == "other-owner" and os.geteuid() != 0:
        pytest.skip("only root can create a directory owned by another user")
    xdg = tmp_path / "xdg"
    (xdg / "fastbn").mkdir(parents=True)
    (xdg / "numba").write_text("not a directory")  # Numba's own user cache: unusable
    if planted == "world-writable":
        (xdg / "fastbn").chmod(0o777)
    else:
        os.chown(xdg / "fastbn", 4242, 4242)
    env = {"XDG_CACHE_HOME": str(xdg), "HOME": "/dev/null/nohome"}
    for _ in range(2):
        out, err = run_tiny(env, tmp_path / "mod", read_only=True)
        assert counts(out) == (0, 1)
        assert "not using the cache directory" in err
    assert not cache_files(xdg), "a planted directory was used"
    # the same directory, private to this user: used
    (xdg / "fastbn").chmod(0o700)
    os.chown(xdg / "fastbn", os.geteuid(), os.getegid())
    run_tiny(env, tmp_path / "mod", read_only=True)
    out, err = run_tiny(env, tmp_path / "mod", read_only=True)
    assert counts(out) == (1, 0) and cache_files(xdg / "fastbn")


def test_a_shared_numba_cache_dir_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out, err = run_tiny({"NUMBA_CACHE_DIR": str(shared)}, tmp_path / "mod")
    assert "not using the Numba cache directory" in err
    assert counts(out) == (0, 1) and not cache_files(shared)


def test_a_corrupt_cache_entry_is_dropped_and_recompiled(tmp_path):
    """numba#10434: a truncated cache file made every call raise until it was deleted."""
    cache = tmp_path / "numba-cache"
    env = {"NUMBA_CACHE_DIR": str(cache)}
    for victim in (".nbi", ".nbc"):
        run_tiny(env, tmp_path / "mod")
        files = [p for p in cache_files(cache) if p.suffix == victim]
        assert files
        for p in files:
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])
        out, err = run_tiny(env, tmp_path / "mod")
        assert counts(out) == (0, 1)
        assert err.count("dropped a corrupt Numba cache entry") == 1, err
        out, err = run_tiny(env, tmp_path / "mod")
        assert counts(out) == (1, 0) and "corrupt" not in err


def test_import_needs_neither_cffi_nor_cuda(tmp_path):
    blocker = "import sys\nsys.modules['cffi'] = None\n"  # 'import cffi' now raises ImportError
    out, _ = run_probe({"NUMBA_CACHE_DIR": str(tmp_path)}, code=blocker + PROBE)
    assert "cuda_imported False" in out
    assert "cffi_imported False" in out


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc")
def test_warmup_compiles_every_path(tmp_path):
    code = ("import fastbn, numpy as np\n"
            "fastbn.warmup((np.float32,))\n"
            "from fastbn._cpu import kernels\n"
            "names = [n for n in dir(kernels) if not n.startswith('_') and hasattr(getattr(kernels, n), 'signatures')]\n"
            "missing = [n for n in names if not getattr(kernels, n).signatures]\n"
            "print('missing', missing)\n"
            "import sys\n"
            "print('floors', 'fastbn._cpu.floors' in sys.modules)\n")
    out, _ = run_probe({"NUMBA_CACHE_DIR": str(tmp_path)}, code=code)
    assert "missing []" in out
    assert "floors False" in out  # the benchmark's floors are neither imported nor compiled


EDIT_PROBE = r"""
import ctypes, os
import numpy as np
import fastbn
from fastbn import _cache, _jit
from fastbn.capi import _entries
x = np.full((4, 3, 40), 3.0)
y = fastbn.batch_norm_inference(x, np.zeros(3), np.full(3, 4.0), eps=0.0)
from numba import types
entry = _entries._compile(_entries._forward_infer, _entries._signatures(types.float64)["forward_infer"],
                          _entries.cache_dir() is not None)
yc = np.empty_like(x)
ptr = lambda a: a.ctypes.data_as(ctypes.POINTER(ctypes.c_double))
assert entry.ctypes(4, 3, 40, ptr(x), ptr(np.zeros(3)), ptr(np.full(3, 4.0)), None, None, 0.0,
                    ptr(yc), None, 0, 1) == 0
hits = sum(sum(f.stats.cache_hits.values()) for _, f in _jit.kernels_defined())
misses = sum(sum(f.stats.cache_misses.values()) for _, f in _jit.kernels_defined())
print("y", float(y[0, 0, 0]), "c", float(yc[0, 0, 0]), "c_hits", entry.cache_hits,
      "hits", hits, "misses", misses)
print("dir", os.path.basename(_cache.kernel_cache_dir()))
print("pruned", len(_cache.prune_kernel_caches()))
"""


def test_an_edit_to_any_kernel_source_is_never_served_stale(tmp_path):
    """Numba stamps a cache entry with its own file only; fastbn caches all compiled code
    (kernels and C entry points) in one directory named by a digest of every source it
    depends on.  In a copy of the package, a helper of one kernel module (``_invstd``,
    which ``ops.inference_scale`` and the C entry point call) is edited, then a plan
    constant that the C entry points compile in: each fresh process compiles the new
    code instead of loading the old, for the Python API and the C ABI alike."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE_DIR, site / "fastbn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def probe():
        out, _ = run_probe(env, code=EDIT_PROBE, pythonpath=site, cwd=tmp_path)
        words = out.split()
        return {k: words[words.index(k) + 1]
                for k in ("y", "c", "c_hits", "hits", "misses", "dir", "pruned")}

    def edit(relpath, old, new):
        path = site / "fastbn" / relpath
        text = path.read_text()
        assert text.count(old) == 1
        path.write_text(text.replace(old, new))

    first = probe()
    assert float(first["y"]) == float(first["c"]) == 1.5
    again = probe()  # the same code: loaded from disk
    assert again["dir"] == first["dir"] and again["misses"] == "0" and again["c_hits"] == "1"
    edit("_cpu/kernels/numerics.py", "    return 1.0 / np.sqrt(v)\n", "    return 2.0 / np.sqrt(v)\n")
    second = probe()
    assert float(second["y"]) == float(second["c"]) == 3.0  # the helper's new code
    assert second["dir"] != first["dir"] and second["pruned"] == "1"
    edit("_cpu/kernels/plans.py", "\nMIN_RUN = 64\n", "\nMIN_RUN = 32\n")
    third = probe()
    assert third["dir"] not in (first["dir"], second["dir"])
    assert third["c_hits"] == "0" and int(third["misses"]) > 0  # compiled, not loaded
    assert float(third["y"]) == float(third["c"]) == 3.0
    assert [p.name for p in (tmp_path / "cache").glob("kernels-*")] == [third["dir"]]


LOCK_PROBE = r"""
import glob, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from numba.core import caching
import tiny

CHECK = '''
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except OSError:
    print("held")
'''
seen = []
real = caching.IndexDataCacheFile._save_data

def save_data(self, name, data):
    locks = glob.glob(os.path.join(self._cache_path, "*.lock"))
    for path in locks:  # another process tries the entry's lock while this one saves
        seen.append(subprocess.run([sys.executable, "-c", CHECK, path], capture_output=True,
                                   text=True, timeout=60).stdout.strip())
    return real(self, name, data)

caching.IndexDataCacheFile._save_data = save_data
assert tiny.total(np.arange(5.0)) == 10.0
caching.IndexDataCacheFile._save_data = real
after = [subprocess.run([sys.executable, "-c", CHECK, p], capture_output=True, text=True,
                        timeout=60).stdout.strip()
         for p in glob.glob(os.path.join(os.environ["NUMBA_CACHE_DIR"], "**", "*.lock"),
                            recursive=True)]
print("during", seen, "after", after)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX record locks")
def test_a_save_holds_the_entrys_lock_against_other_processes(tmp_path):
    """numba#4807: two processes saving one function's signatures at once can leave an index
    that names one signature's machine code for the other (a segfault in every later process).
    fastbn's saves hold a lock on the entry that other processes wait for, and let it go."""
    module_dir = tmp_path / "mod"
    module_dir.mkdir()
    (module_dir / "tiny.py").write_text(TINY_MODULE)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOCK_PROBE, str(module_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "during ['held'] after ['free']" in proc.stdout, proc.stdout
    out, _ = run_tiny({"NUMBA_CACHE_DIR": str(tmp_path / "cache")}, module_dir)
    assert counts(out) == (1, 0)  # the locked save left a loadable entry

"""JIT cost and robustness: the disk cache, read-only installs, imports without cffi or CUDA.

Each test runs a fresh interpreter (fork + exec, safe with GNU OpenMP) on a small input.
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
    out1, _ = run_probe({"NUMBA_CACHE_DIR": str(cache)})
    assert counts(out1)[1] >= 1  # compiled ...
    assert any(p.name.startswith("kernels.") for p in cache_files(cache))
    out2, _ = run_probe({"NUMBA_CACHE_DIR": str(cache)})
    hits, misses = counts(out2)
    assert hits >= 1 and misses == 0  # ... and loaded from disk by the next process


def test_read_only_install_falls_back_to_a_temporary_cache(tmp_path):
    """No writable __pycache__ and no writable user cache: import still works and caches."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE_DIR, site / "fastbn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for pkg in (site / "fastbn").rglob("*"):
        if pkg.is_dir():
            (pkg / "__pycache__").write_text("a file where Numba wants a directory")
    (site / "fastbn" / "__pycache__").write_text("not a directory")
    for p in sorted(site.rglob("*"), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"XDG_CACHE_HOME": "/dev/null/not-a-directory", "HOME": "/dev/null/nohome",
           "TMPDIR": str(tmpdir), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        out, _ = run_probe(env, pythonpath=site, cwd=tmpdir)
        assert counts(out)[1] >= 1
        assert str(site) in out
        assert cache_files(tmpdir / f"fastbn-numba-cache-{os.getuid()}"), "no fallback cache"
        out2, _ = run_probe(env, pythonpath=site, cwd=tmpdir)
        hits, misses = counts(out2)
        assert hits >= 1 and misses == 0
    finally:
        for p in site.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)


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
            "missing = [n for n in names if n != 'parallel_copy' and not getattr(kernels, n).signatures]\n"
            "print('missing', missing)\n")
    out, _ = run_probe({"NUMBA_CACHE_DIR": str(tmp_path)}, code=code)
    assert "missing []" in out

"""The C ABI end to end: build libfastbn.so, compile C programs with ``cc``, run them,
and compare what C gets with the Python API on the same data."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastbn
import reference as ref
from fastbn import capi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "native", "examples")
CC = shutil.which("cc") or shutil.which("gcc")

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc) on this machine")

# (outer, C, inner): NCHW-like (channel path), NHWC-like (column path), few channels
# over a long batch (the channel path split in parts, merged)
SHAPES = {"nchw": (4, 5, 70), "nhwc": (300, 6, 1), "parts": (64, 2, 4096)}
ALL, NONE = 31, 0


def _compile(src, out, libdir, extra=()):
    cmd = capi.compile_line(libdir, src).split() + ["-o", out, *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The library, its header and the two example programs, built once."""
    d = tmp_path_factory.mktemp("capi")
    lib = capi.build(str(d))
    assert os.path.exists(lib) and os.path.exists(d / "fastbn.h")
    return {
        "dir": d,
        "check": _compile(os.path.join(EXAMPLES, "capi_check.c"), str(d / "capi_check"), str(d),
                          ["-lm", "-pthread"]),
        "normalize": _compile(os.path.join(EXAMPLES, "normalize.c"), str(d / "normalize"),
                              str(d)),
    }


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def _run(args, env=None, timeout=600, cwd=None):
    return subprocess.run(args, capture_output=True, text=True, env=env or _env(),
                          timeout=timeout, cwd=cwd)


def test_header_is_the_cdef_source():
    decls = capi.header_declarations()
    for name in ("fastbn_version", "fastbn_last_error", "fastbn_forward_train_f32",
                 "fastbn_forward_train_f64", "fastbn_forward_infer_f32", "fastbn_forward_infer_f64",
                 "fastbn_backward_f32", "fastbn_backward_f64", "fastbn_forward_train_ex_f32",
                 "fastbn_forward_train_ex_f64", "fastbn_forward_infer_ex_f32",
                 "fastbn_forward_infer_ex_f64", "fastbn_backward_ex_f32", "fastbn_backward_ex_f64",
                 "fastbn_batch_stats_f32", "fastbn_batch_stats_f64"):
        assert name + "(" in decls
    from fastbn.capi._build import header_version_string

    assert header_version_string() == fastbn.__version__
    assert "FASTBN_API" not in decls and "#define FASTBN_ERR_INIT 2" in decls


def test_example_program_runs_with_the_readme_link_line(built, tmp_path):
    """Linked with the line ``python -m fastbn.capi build`` prints (absolute paths, an
    absolute run path), the program runs from any directory."""
    result = _run([built["normalize"]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"fastbn {fastbn.__version__}\n")
    lines = [line for line in result.stdout.splitlines() if line.startswith("channel")]
    assert len(lines) == 3 and all("var 1.0000" in line or "var 0.9999" in line for line in lines)
    assert "one value per channel: code 1 (" in result.stdout


def _write(d, name, a):
    np.ascontiguousarray(a).tofile(d / f"{name}.bin")


def _read(d, name, dtype, shape):
    return np.fromfile(d / f"{name}.bin", dtype=dtype).reshape(shape)


@pytest.mark.parametrize("mask", [ALL, NONE], ids=["all-pointers", "optional-NULL"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_c_matches_python(built, tmp_path, layout, dtype, mask):
    shape = SHAPES[layout]
    c = shape[1]
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 3 + 1e3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = rng.uniform(0.5, 2, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    res = rng.standard_normal(shape).astype(dtype)
    for name, a in dict(x=x, dy=dy, w=w, b=b, rm=rm, rv=rv, res=res).items():
        _write(tmp_path, name, a)
    suffix = "f32" if dtype == np.float32 else "f64"
    result = _run([built["check"], "run", suffix, *map(str, shape), str(mask), str(tmp_path)])
    assert result.returncode == 0, result.stderr

    eps, momentum = float(dtype(1e-5)), float(dtype(0.1))  # what C passed, exactly
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    weight, bias = (w, b) if mask & 1 else (None, None)
    rm_py, rv_py = rm.copy(), rv.copy()
    y, mean, invstd = fastbn.batch_norm_forward(
        x, weight, bias, axis=1, eps=eps, momentum=momentum,
        running_mean=rm_py if mask & 4 else None, running_var=rv_py if mask & 4 else None)
    got = lambda name, shp=shape: _read(tmp_path, name, dtype, shp)  # noqa: E731
    np.testing.assert_allclose(got("y"), y, **tol)
    np.testing.assert_array_equal(got("y_inplace"), got("y"))
    if mask & 8:
        np.testing.assert_allclose(got("mean", (c,)), mean, **tol)
        np.testing.assert_allclose(got("invstd", (c,)), invstd, **tol)
    np.testing.assert_allclose(got("rm_out", (c,)), rm_py, **tol)  # untouched when NULL
    np.testing.assert_allclose(got("rv_out", (c,)), rv_py, **tol)

    y_inf = fastbn.batch_norm_inference(x, rm, rv, weight, bias, axis=1, eps=eps)
    np.testing.assert_allclose(got("y_infer"), y_inf, **tol)
    np.testing.assert_array_equal(got("y_infer_inplace"), got("y_infer"))

    # the backward was given the statistics of a forward with the same arguments
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=1)
    np.testing.assert_allclose(got("dx"), dx, **tol)
    if mask & 16:
        np.testing.assert_allclose(got("dw", (c,)), dw, rtol=tol["rtol"], atol=tol["atol"] * 100)
        np.testing.assert_allclose(got("db", (c,)), db, rtol=tol["rtol"], atol=tol["atol"] * 100)

    # the fused epilogues (contract section 6): the _ex functions against the Python API
    y_ex, mean_ex, inv_ex = fastbn.batch_norm_forward(x, weight, bias, axis=1, eps=eps,
                                                      residual=res, activation="relu")
    np.testing.assert_allclose(got("y_ex"), y_ex, **tol)
    y_inf_ex = fastbn.batch_norm_inference(x, rm, rv, weight, bias, axis=1, eps=eps,
                                           residual=res, activation="relu")
    np.testing.assert_allclose(got("y_infer_ex"), y_inf_ex, **tol)
    dx_ex, dw_ex, db_ex, dres_ex = fastbn.batch_norm_backward(
        dy, x, mean_ex, inv_ex, weight, axis=1, activation="relu", y=got("y_ex"),
        residual_grad=True)
    np.testing.assert_allclose(got("dx_ex"), dx_ex, **tol)
    np.testing.assert_array_equal(got("dres_ex"), dres_ex)
    if mask & 16:
        np.testing.assert_allclose(got("dw_ex", (c,)), dw_ex, rtol=tol["rtol"],
                                   atol=tol["atol"] * 100)
        np.testing.assert_allclose(got("db_ex", (c,)), db_ex, rtol=tol["rtol"],
                                   atol=tol["atol"] * 100)
    # the statistics alone, in double, against the float64 reference (contract section 5)
    _, ref_mean, ref_var = ref.stats(x, axis=1)
    stats_tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(_read(tmp_path, "stats_mean", np.float64, (c,)), ref_mean,
                               rtol=stats_tol)
    np.testing.assert_allclose(_read(tmp_path, "stats_var", np.float64, (c,)), ref_var,
                               rtol=stats_tol)


def test_every_bad_argument_is_refused_without_writing(built):
    result = _run([built["check"], "errors"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "37 invalid calls checked, 0 failures" in result.stdout


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_four_threads_at_once(built, layer):
    # workqueue aborts the process on concurrent parallel regions unless calls are serialized
    env = _env() if layer == "default" else _env(NUMBA_THREADING_LAYER="workqueue")
    result = _run([built["check"], "threads"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 threads x 25 forward+backward, 0 failures" in result.stdout


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_fork_after_use_and_during_a_call(built, layer):
    """A C program that used fastbn forks: its children compute the same bits, also when
    another thread was inside a call (holding the library's lock) at the fork."""
    env = _env() if layer == "default" else _env(NUMBA_THREADING_LAYER="workqueue")
    result = _run([built["check"], "fork"], env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fork: 15 children, 0 failures" in result.stdout


def test_python_api_and_c_library_in_one_process_share_one_lock(built):
    """Under the workqueue layer (not thread-safe) a process that calls the C library and
    the Python API from several threads at once must not abort: one lock serves both."""
    code = f"""
import ctypes, threading
import numpy as np
import fastbn
lib = ctypes.CDLL({str(built["dir"] / "libfastbn.so")!r})
f = lib.fastbn_forward_train_f32
f.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_float] * 2 + [ctypes.c_void_p] * 5
x = np.random.default_rng(0).normal(size=(64, 16, 512)).astype(np.float32)
expected, mean, invstd = fastbn.batch_norm_forward(x)
errors = []
def c_calls():
    y = np.empty_like(x)
    for _ in range(20):
        rc = f(64, 16, 512, x.ctypes.data, None, None, 1e-5, 0.1, None, None, y.ctypes.data, None, None)
        if rc != 0 or not np.allclose(y, expected, atol=1e-5):
            errors.append(("c", rc))
def py_calls():
    for _ in range(20):
        y, _, _ = fastbn.batch_norm_forward(x)
        if not np.array_equal(y, expected):
            errors.append("py")
threads = [threading.Thread(target=t) for t in (c_calls, py_calls, c_calls, py_calls)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
import numba
print("ok", numba.threading_layer())
"""
    result = _run([sys.executable, "-c", code], env=_env(NUMBA_THREADING_LAYER="workqueue"),
                  timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok workqueue" in result.stdout


def test_runtime_that_cannot_start_returns_init_error_from_every_call(built, tmp_path):
    # A fastbn that cannot be imported, first on the embedded interpreter's path.
    broken = tmp_path / "fastbn"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('deliberately broken')\n")
    result = _run([built["check"], "init-failure"], env=_env(PYTHONPATH=str(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "could not import fastbn" in result.stdout
    assert "deliberately broken" in result.stderr  # the traceback, for whoever reads stderr


def test_overhead_and_first_call(built):
    result = _run([built["check"], "overhead"])
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    assert "per call" in result.stdout and "first call" in result.stdout


def test_build_command_prints_the_link_line(tmp_path, capsys):
    from fastbn.capi.__main__ import main

    assert main(["build", "--outdir", str(tmp_path)]) == 0  # entry points cached already
    printed = capsys.readouterr().out
    assert f"-I{tmp_path} -L{tmp_path} -lfastbn -Wl,-rpath,{tmp_path}" in printed
    assert (tmp_path / "libfastbn.so").exists() and (tmp_path / "fastbn.h").exists()


def _pinned_only():
    """The cache directory and the tests' streaming threshold (conftest), nothing else."""
    keep = ("NUMBA_CACHE_DIR", "FASTBN_STREAM_MIN_BYTES")
    return {k: os.environ[k] for k in keep if os.environ.get(k)}


def test_library_runs_without_this_process_environment(built):
    """No variable set by the caller (not even PATH or HOME) but the kernels' cache
    directory and the tests' streaming threshold, which select the kernels compiled."""
    result = subprocess.run([built["normalize"]], capture_output=True, text=True,
                            env=_pinned_only(), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "channel 2:" in result.stdout


def test_python_executable_is_baked_in(built):
    data = (built["dir"] / "libfastbn.so").read_bytes()
    assert os.path.abspath(sys.executable).encode() in data


def test_capi_benchmark_script_runs(built):
    script = os.path.join(ROOT, "bench", "capi_bench.py")
    result = _run([sys.executable, script, "--quick", "--repeats", "3"])
    assert result.returncode == 0, result.stderr
    assert "per call" in result.stdout and "C / Python" in result.stdout

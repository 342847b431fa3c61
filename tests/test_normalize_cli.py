"""``python -m fastbn normalize`` end to end: results, statistics files, errors, atomic
output under interruption, and memory bounded by the chunk size, not the file size."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastbn

CMD = [sys.executable, "-m", "fastbn", "normalize"]


def _run(*args, **kw):
    return subprocess.run(CMD + [str(a) for a in args], capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture
def data(tmp_path, rng):
    x = rng.normal(1e3, 3.0, (5000, 12)).astype(np.float32)
    x[7, 3] = np.nan
    path = tmp_path / "in.npy"
    np.save(path, x)
    return path, x


@pytest.mark.parametrize("method", ["standard", "minmax"])
def test_matches_the_in_memory_api(tmp_path, data, method):
    path, x = data
    out = tmp_path / "out.npy"
    result = _run(path, out, "--method", method, "--chunk-mb", "0.05")  # many chunks
    assert result.returncode == 0, result.stderr
    y = np.load(out)
    expected = fastbn.standardize(x) if method == "standard" else fastbn.minmax_scale(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


@pytest.mark.parametrize("axis,shape", [(1, (40, 3, 7)), (0, (5, 30, 4)), (-1, (300,))])
def test_other_feature_axes(tmp_path, rng, axis, shape):
    x = rng.normal(5.0, 2.0, shape)
    np.save(tmp_path / "in.npy", x)
    result = _run(tmp_path / "in.npy", tmp_path / "out.npy", "--axis", axis, "--method", "minmax",
                  "--feature-range", -1, 1, "--chunk-mb", "0.001")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"),
                               fastbn.minmax_scale(x, axis=axis, feature_range=(-1, 1)),
                               atol=1e-12)


def test_save_stats_then_reuse_them(tmp_path, data, rng):
    path, x = data
    stats = tmp_path / "stats.json"
    assert _run(path, tmp_path / "a.npy", "--save-stats", stats).returncode == 0
    other = rng.normal(1e3, 3.0, (300, 12)).astype(np.float32)
    np.save(tmp_path / "b.npy", other)
    result = _run(tmp_path / "b.npy", tmp_path / "b_out.npy", "--stats", stats)
    assert result.returncode == 0, result.stderr
    fitted = fastbn.StandardScaler().fit(x)
    np.testing.assert_allclose(np.load(tmp_path / "b_out.npy"), fitted.transform(other),
                               rtol=1e-6, atol=1e-6)
    assert json.loads(stats.read_text())["scaler"] == "StandardScaler"


@pytest.mark.parametrize("case", ["missing", "not-npy", "complex", "axis", "stats-mismatch",
                                  "fortran", "range"])
def test_errors_are_one_line_exit_2_and_leave_out_alone(tmp_path, data, case):
    path, x = data
    out = tmp_path / "out.npy"
    out.write_bytes(b"previous result")
    args = [path, out]
    if case == "missing":
        args = [tmp_path / "nope.npy", out]
    elif case == "not-npy":
        (tmp_path / "text.npy").write_text("hello")
        args = [tmp_path / "text.npy", out]
    elif case == "complex":
        np.save(tmp_path / "c.npy", np.ones((4, 2), complex))
        args = [tmp_path / "c.npy", out]
    elif case == "axis":
        args += ["--axis", 4]
    elif case == "stats-mismatch":
        np.save(tmp_path / "narrow.npy", x[:, :5])
        assert _run(tmp_path / "narrow.npy", tmp_path / "n.npy",
                    "--save-stats", tmp_path / "s.json").returncode == 0
        args += ["--stats", tmp_path / "s.json"]
    elif case == "fortran":
        np.save(tmp_path / "f.npy", np.asfortranarray(x))
        args = [tmp_path / "f.npy", out]
    elif case == "range":
        args += ["--method", "minmax", "--feature-range", 1, 0]
    result = _run(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastbn normalize: error:"), result.stderr
    assert out.read_bytes() == b"previous result"
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_leaves_no_partial_output(tmp_path, rng, sig):
    x = rng.normal(0, 1, (400_000, 32)).astype(np.float32)  # 51 MB, 0.05 MB chunks: slow enough
    np.save(tmp_path / "in.npy", x)
    out = tmp_path / "out.npy"
    proc = subprocess.Popen(CMD + [str(tmp_path / "in.npy"), str(out), "--chunk-mb", "0.05"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in os.listdir(tmp_path) if ".partial-" in p]:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert not out.exists()
    if sig != signal.SIGKILL:  # a killed process cannot clean up; the rest do
        assert proc.returncode == 130
        assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_memory_stays_at_a_few_chunks(tmp_path, rng):
    """Peak RSS grows with the chunk, not with the file (here 8x the chunk budget x 8)."""
    probe = ("import resource, subprocess, sys\n"
             "subprocess.run(sys.argv[1:], check=True)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")

    def peak_kib(path):
        r = subprocess.run([sys.executable, "-c", probe] + CMD +
                           [str(path), str(tmp_path / "o.npy"), "--chunk-mb", "4"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip())

    small = tmp_path / "small.npy"
    np.save(small, rng.normal(size=(1000, 64)).astype(np.float32))
    big = tmp_path / "big.npy"
    rows = 1_000_000  # 256 MB of float32, written without holding it in memory
    with open(big, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (rows, 64)})
        block = rng.normal(size=(50_000, 64)).astype(np.float32)
        for _ in range(rows // 50_000):
            block.tofile(f)
    growth_mib = (peak_kib(big) - peak_kib(small)) / 1024
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.0f} MiB for a 256 MB file"


def test_out_of_core_benchmark_runs(capsys):
    import fastbn.__main__ as cli

    assert cli.main(["bench", "--out-of-core", "0.01", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "reading it twice and writing it once" in printed and "ratio" in printed

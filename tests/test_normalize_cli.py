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


def _run(*args, timeout=600, **kw):
    return subprocess.run(CMD + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, **kw)


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
    summary = result.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"fastbn normalize: {out}: 5,000 rows x "
                                                       f"12 features, {method}, ")
    assert " GB/s (read 2x, written once); statistics not saved" in summary[0]
    quiet = _run(path, out, "--method", method, "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
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
        assert proc.returncode == 128 + sig
        assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    else:  # ... and the next run removes what it left
        assert [p for p in os.listdir(tmp_path) if ".partial-" in p]
        np.save(tmp_path / "small.npy", x[:100])
        assert _run(tmp_path / "small.npy", out).returncode == 0
        assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_a_partial_of_a_live_process_is_left_alone(tmp_path, data):
    path, x = data
    out = tmp_path / "out.npy"
    live = tmp_path / f".out.npy.partial-{os.getpid()}-abc"
    dead = tmp_path / ".out.npy.partial-999999999-abc"
    live.write_bytes(b"x")
    dead.write_bytes(b"x")
    assert _run(path, out).returncode == 0
    assert live.exists() and not dead.exists()


def test_a_planted_symlink_is_never_followed(tmp_path, data):
    """The temporary file's name is random and created exclusively: symbolic links planted
    under every name the old scheme would have used do not redirect the output."""
    path, x = data
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.npy"
    for pid in range(os.getpid(), os.getpid() + 2000):
        os.symlink(victim, tmp_path / f".out.npy.partial-{pid}")
    result = _run(path, out)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "precious"
    np.testing.assert_allclose(np.load(out), fastbn.standardize(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target", ["in", "out"])
def test_save_stats_never_overwrites_in_or_out(tmp_path, data, target):
    path, x = data
    out = tmp_path / "out.npy"
    out.write_bytes(b"previous result")
    before = path.read_bytes()
    stats = path if target == "in" else out
    result = _run(path, out, "--save-stats", stats)
    assert result.returncode == 2 and "--save-stats" in result.stderr
    assert path.read_bytes() == before and out.read_bytes() == b"previous result"


def test_a_fifo_as_input_fails_at_once(tmp_path):
    fifo = tmp_path / "in.npy"
    os.mkfifo(fifo)
    start = time.monotonic()
    result = _run(fifo, tmp_path / "out.npy", timeout=30)
    assert time.monotonic() - start < 25
    assert result.returncode == 2 and "not a regular file" in result.stderr


def test_a_failing_save_stats_fails_before_the_work(tmp_path, data):
    path, x = data
    out = tmp_path / "out.npy"
    result = _run(path, out, "--save-stats", tmp_path / "missing-dir" / "s.json")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not out.exists()


def test_big_endian_and_empty_inputs(tmp_path, rng):
    x = rng.normal(5.0, 2.0, (50, 4))
    np.save(tmp_path / "be.npy", x.astype(">f4"))
    assert _run(tmp_path / "be.npy", tmp_path / "o.npy").returncode == 0
    y = np.load(tmp_path / "o.npy")
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, fastbn.standardize(x.astype(np.float32)), atol=1e-6)
    # (0, 8) along axis 0: no features, an empty output; along axis -1: 0 samples, an error
    np.save(tmp_path / "e.npy", np.empty((0, 8), np.float32))
    result = _run(tmp_path / "e.npy", tmp_path / "e_out.npy", "--axis", 0)
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "e_out.npy").shape == (0, 8)
    result = _run(tmp_path / "e.npy", tmp_path / "e_out2.npy")
    assert result.returncode == 2 and "0 samples" in result.stderr


def _npy_with_header(path, header_text):
    header = header_text.encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)


@pytest.mark.parametrize("case", [
    "negative-shape", "short-file", "out-dir-missing", "out-is-dir", "out-dir-read-only",
    "chunk-inf", "chunk-nan", "stats-list", "stats-null", "stats-number", "stats-deep",
    "stats-minmax-without-min", "in-dir", "file-size-limit"])
def test_every_failure_is_one_line_and_exit_2(tmp_path, data, case):
    path, x = data
    out = tmp_path / "out.npy"
    args = [path, out]
    kw = {}
    if case == "negative-shape":
        _npy_with_header(tmp_path / "neg.npy",
                         "{'descr': '<f4', 'fortran_order': False, 'shape': (-3, 4), }")
        args = [tmp_path / "neg.npy", out]
    elif case == "short-file":
        np.save(tmp_path / "short.npy", x)
        data_bytes = (tmp_path / "short.npy").read_bytes()
        (tmp_path / "short.npy").write_bytes(data_bytes[:-100])
        args = [tmp_path / "short.npy", out]
    elif case == "out-dir-missing":
        args = [path, tmp_path / "nope" / "out.npy"]
    elif case == "out-is-dir":
        (tmp_path / "d").mkdir()
        args = [path, tmp_path / "d"]
    elif case == "out-dir-read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only directories")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        args = [path, tmp_path / "ro" / "out.npy"]
    elif case in ("chunk-inf", "chunk-nan"):
        args += ["--chunk-mb", case[6:]]
    elif case.startswith("stats-"):
        content = {"stats-list": "[1, 2]", "stats-null": "null", "stats-number": "3",
                   "stats-deep": "[" * 100000 + "]" * 100000}.get(case)
        method = []
        if case == "stats-minmax-without-min":
            fitted = fastbn.MinMaxScaler().fit(x).to_dict()
            del fitted["min"]
            content = json.dumps(fitted)
            method = ["--method", "minmax"]
        (tmp_path / "s.json").write_text(content)
        args += ["--stats", tmp_path / "s.json"] + method
    elif case == "in-dir":
        args = [tmp_path, out]
    elif case == "file-size-limit":
        import resource

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        kw["preexec_fn"] = limit
        args += ["--quiet"]  # the error line alone (the progress bar goes to stderr too)
    result = _run(*args, **kw)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastbn normalize: error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_disk_full_is_one_line_and_exit_2(tmp_path, data):
    """/dev/full fails every write with ENOSPC: OUT's directory stands in for a full disk
    through a file size limit is covered above; here the stats file hits a full device."""
    path, x = data
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    import fastbn._normalize_cli as cli

    class Args:
        input, output, method, axis, chunk_mb = str(path), str(tmp_path / "o.npy"), "standard", -1, 64.0
        feature_range, clip, save_stats, stats, quiet = (0.0, 1.0), False, None, None, True

    original = cli.AtomicNpyWriter.write

    def full(self, chunk):
        raise OSError(28, "No space left on device", self.temp)
    cli.AtomicNpyWriter.write = full
    try:
        assert cli.main(Args()) == 2
    finally:
        cli.AtomicNpyWriter.write = original
    assert not (tmp_path / "o.npy").exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_memory_stays_at_a_few_chunks(tmp_path, rng):
    """Peak RSS grows with the chunk, not with the file (here 8x the chunk budget x 8)."""
    probe = ("import resource, subprocess, sys\n"
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
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

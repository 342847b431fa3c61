"""The command line runs end to end (quick shapes)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import fastbn.__main__ as cli


def test_bench_prints_tables_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    cli.main(["bench", "--quick", "--case", "small", "channels-last", "--dtype", "float32",
              "--repeats", "3", "--no-peers", "--json", str(path)])
    captured = capsys.readouterr()
    printed = captured.out
    assert "memory floor: parallel copy" in printed and "fastbn forward (out=)" in printed
    assert "peak traced allocation" in printed
    assert "peers: skipped (--no-peers)" in printed
    # columns defined once, spread in every table, a verdict and a machine line at the end
    assert printed.count("How to read the tables") == 1 and printed.count("IQR %") == 3
    assert "Verdict" in printed and printed.rstrip().splitlines()[-2].startswith("Machine: ")
    assert "[1/2] small" in captured.err and "[2/2] channels-last" in captured.err
    data = json.loads(path.read_text())
    assert [r["case"] for r in data["results"]] == ["small", "channels-last"]
    names = {row["contender"] for r in data["results"] for row in r["rows"]}
    assert {"fastbn forward (out=)", "fastbn backward (out=)", "fastbn inference (out=)",
            "fastbn standardize (out=)", "NumPy naive forward"} <= names
    assert "fastbn batch_stats" not in names  # only --full times every op
    assert all(row["median_ms"] > 0 and row["iqr_pct"] >= 0
               for r in data["results"] for row in r["rows"])
    assert len(data["bandwidth_probes"]) == 2 and data["bandwidth_probes"][0]["GB/s"] > 0
    assert isinstance(data["noise"]["noisy"], bool)
    # no temporary of the input's size beyond the output
    for r in data["results"]:
        if r["case"] != "small":
            assert r["memory"]["forward"] < 0.05 and r["memory"]["backward"] < 0.05


def _record_runs(monkeypatch):
    """Replace the timing with a record of what would be timed."""
    from fastbn import _bench

    runs = []

    def fake_run_case(name, dtype, size, repeats, naive, peers, ops):
        runs.append((name, np.dtype(dtype).name, size, tuple(ops)))
        shape, axis = _bench.case_shape(name, size)
        row = {"op": "floor", "contender": _bench.FLOOR, "median_ms": 1.0, "iqr_pct": 1.0,
               "GB/s": 10.0, "x_floor": 1.0, "x_pattern_floor": float("nan"),
               "pattern_floor": None, "x_fastbn": float("nan")}
        return {"case": name, "shape": list(shape), "axis": axis, "dtype": np.dtype(dtype).name,
                "bytes": 1 << 26, "cache_resident": False, "calls_per_sample": 1,
                "repeats": repeats, "rows": [row], "memory": {}}

    monkeypatch.setattr(_bench, "run_case", fake_run_case)
    monkeypatch.setattr(_bench, "probe_bandwidth", lambda nbytes: {"bytes": nbytes, "GB/s": 10.0, "iqr_pct": 1.0})
    return runs


def test_bench_default_times_the_deciding_cases_in_float32(monkeypatch, capsys):
    from fastbn import _bench

    runs = _record_runs(monkeypatch)
    cli.main(["bench", "--no-peers"])
    assert runs == [(name, "float32", "default", _bench.DEFAULT_OPS)
                    for name in ("nchw", "channels-last", "small")]
    assert {"forward", "inference", "backward", "standardize"} <= set(_bench.DEFAULT_OPS)
    # the default size keeps the run's arrays (x, dy, out, a copy's target, peers'
    # outputs and NumPy's temporaries) well inside 1.5 GB
    for name in _bench.DEFAULT_CASES:
        shape, _ = _bench.case_shape(name, "default")
        assert 4 * np.prod(shape) <= 64e6
    assert "Machine: quiet" in capsys.readouterr().out


def test_bench_full_keeps_the_complete_run(monkeypatch, capsys):
    from fastbn import _bench

    runs = _record_runs(monkeypatch)
    cli.main(["bench", "--full", "--no-peers"])
    assert runs == [(name, dtype, "full", _bench.ALL_OPS)
                    for name in _bench.CASES for dtype in ("float32", "float64")]
    assert _bench.case_shape("nchw", "full") == ((64, 256, 56, 56), 1)


def test_bench_float64_with_plot(tmp_path, capsys):
    import pytest

    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    cli.main(["bench", "--quick", "--case", "2d", "--dtype", "float64", "--repeats", "3",
              "--no-peers", "--no-naive", "--plot", str(png)])
    assert "float64" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_small_calls_idle_and_busy(tmp_path, capsys):
    path = tmp_path / "small.json"
    cli.main(["bench", "--small-calls", "--repeats", "1", "--json", str(path)])
    printed = capsys.readouterr().out
    assert "small calls" in printed and "MLP step (64, 256) [threads(1)]" in printed
    data = json.loads(path.read_text())["small_calls"]
    assert all(t["idle"] > 0 and t["busy"] > 0 for t in data.values())


def test_console_script_lists_every_subcommand():
    script = os.path.join(os.path.dirname(sys.executable), "fastbn")
    if not os.path.exists(script):
        pytest.skip("fastbn is not installed as a console script here")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fastbn ")
    for name in ("bench", "floors", "normalize", "startup", "warmup"):
        assert name in result.stdout


def test_bench_names_each_peer_or_why_it_is_missing(monkeypatch):
    from fastbn import _bench

    line = _bench.peers_line()
    assert line.startswith("peers: ") and "PyTorch" in line and "scikit-learn" in line
    monkeypatch.setattr(_bench, "_torch", lambda: None)
    assert "PyTorch: not installed, its rows skipped" in _bench.peers_line()


def test_cpu_load_sees_other_processes_busy():
    from fastbn import _bench

    load = _bench.CpuLoad().start()
    if load.result() is None:
        pytest.skip("no /proc/stat here")
    load.start()
    with _bench.busy_cores(seconds=30):
        time.sleep(1.5)
        busy = load.result()
    assert busy["others"] > 0.5, busy

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
    from fastbn import _bench

    assert [r["case"] for r in data["results"]] == ["small", "channels-last"]
    names = {row["contender"] for r in data["results"] for row in r["rows"]}
    assert {"fastbn forward (out=)", "fastbn backward (out=)", "fastbn inference (out=)",
            "fastbn standardize (out=)", "NumPy naive forward"} <= names
    assert "fastbn batch_stats" not in names  # only --full times every op
    # the fused epilogues, and the same computed unfused with NumPy
    assert {_bench.FUSED_FORWARD, _bench.FUSED_INFERENCE, _bench.FUSED_BACKWARD,
            "fastbn forward + relu, fused (out=)",
            "fastbn forward, then np.add + np.maximum (out=)",
            "np.multiply(dy, y > 0), then fastbn backward (out=)"} <= names
    patterns = {row["pattern_floor"] for r in data["results"] for row in r["rows"]
                if row["contender"] == _bench.FUSED_FORWARD}
    assert patterns <= {_bench.READ_ADD, _bench.ADD_RESIDUAL} and patterns
    assert all(row["median_ms"] > 0 and row["iqr_pct"] >= 0
               for r in data["results"] for row in r["rows"])
    assert len(data["bandwidth_probes"]) == 2 and data["bandwidth_probes"][0]["GB/s"] > 0
    assert isinstance(data["noise"]["noisy"], bool)
    # no temporary of the input's size beyond the output
    for r in data["results"]:
        if r["case"] != "small":
            for op in ("forward", "backward", "fused forward", "fused inference",
                       "fused backward"):
                assert r["memory"][op] < 0.05, (op, r["memory"])


def test_bench_op_selects_ops_and_refuses_unknown_ones(monkeypatch, capsys):
    runs = _record_runs(monkeypatch)
    cli.main(["bench", "--no-peers", "--case", "nchw", "--op", "fused forward", "forward"])
    assert [ops for *_, ops in runs] == [("fused forward", "forward")]
    with pytest.raises(SystemExit, match="unknown --op 'relu'"):
        cli.main(["bench", "--no-peers", "--op", "relu"])


def test_bench_fused_rows_against_pytorch():
    """PyTorch's unfused bn -> add -> relu runs as a contender (it is checked against
    fastbn's fused output before timing), and its backward gives fastbn's gradients."""
    torch = pytest.importorskip("torch")
    from fastbn import _bench

    result = _bench.run_case("channels-last", np.float32, size="quick", repeats=1, naive=False,
                             peers=True, ops=_bench.FUSED_OPS)
    names = {row["contender"] for row in result["rows"]}
    assert {"torch native_batch_norm.out + add_ + relu_", "torch F.relu(F.batch_norm + r)",
            "torch F.relu(F.batch_norm (eval) + r)",
            "torch threshold_backward + native_batch_norm_backward"} <= names
    a = _bench.Inputs(*_bench.case_shape("nchw", "quick"), np.float32).with_epilogues()
    (dx_t, _, _), g = _bench.torch_contenders(torch, a)["fused backward"][
        "torch threshold_backward + native_batch_norm_backward"]()
    _bench.fused_contenders(a)["fused backward"][_bench.FUSED_BACKWARD]()
    np.testing.assert_allclose(a.out, dx_t.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(a.dres, g.numpy())


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
    for name in ("bench", "floors", "normalize", "startup", "warmup", "demo"):
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

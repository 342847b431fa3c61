"""The command line runs end to end (quick shapes)."""

import json
import os
import subprocess
import sys

import pytest

import fastbn.__main__ as cli


def test_bench_prints_tables_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    cli.main(["bench", "--quick", "--case", "small", "channels-last", "--dtype", "float32",
              "--repeats", "3", "--no-peers", "--json", str(path)])
    printed = capsys.readouterr().out
    assert "memory floor: parallel copy" in printed and "fastbn forward (out=)" in printed
    assert "peak traced allocation" in printed
    assert "peers: skipped (--no-peers)" in printed
    data = json.loads(path.read_text())
    assert [r["case"] for r in data["results"]] == ["small", "channels-last"]
    names = {row["contender"] for r in data["results"] for row in r["rows"]}
    assert {"fastbn forward (out=)", "fastbn backward (out=)", "fastbn inference (out=)",
            "fastbn batch_stats", "NumPy naive forward"} <= names
    assert all(row["median_ms"] > 0 for r in data["results"] for row in r["rows"])
    # no temporary of the input's size beyond the output
    for r in data["results"]:
        if r["case"] != "small":
            assert r["memory"]["forward"] < 0.05 and r["memory"]["backward"] < 0.05


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

"""The command line runs end to end (tiny shapes)."""

import json

import fastbn.__main__ as cli


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    cli.main(["bench", "--shape", "4,8,16,16", "--repeats", "3", "--no-peers",
              "--json", str(path)])
    printed = capsys.readouterr().out
    assert "memory floor: parallel copy" in printed and "fastbn forward (out=)" in printed
    rows = json.loads(path.read_text())["rows"]
    names = {r["contender"] for r in rows}
    assert {"fastbn forward (out=)", "fastbn backward (out=)", "naive NumPy forward"} <= names
    assert all(r["median_ms"] > 0 for r in rows)


def test_bench_channels_last_float64(capsys):
    cli.main(["bench", "--shape", "8,6,6,16", "--axis", "-1", "--dtype", "float64",
              "--repeats", "3", "--no-peers"])
    assert "float64" in capsys.readouterr().out

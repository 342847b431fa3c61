"""``python -m fastbn bench --torch`` on a tiny case: every contender runs and the tables
come out (the timings themselves are the benchmark's business, not the tests')."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastbn.torch")

from fastbn import _bench_torch  # noqa: E402


def test_tiny_resnet_case_and_tables():
    lines = []
    r = _bench_torch.run_case(torch, "resnet18", 32, "channels_last", batch=2, repeats=1,
                              log=lambda *a, **k: lines.append(a[0]))
    assert set(r["train_s"]) == {"torch", "fastbn convert", "fastbn optimize"}
    assert set(r["infer_s"]) == {"torch", "fastbn convert", "fastbn optimize",
                                 "torch fx conv-bn folding", "torch.jit.freeze"}
    assert all(v > 0 for v in r["train_s"].values())
    assert 0 < r["epilogue_share"] < 1
    assert set(r["epilogue_ms"]) <= set(_bench_torch.EPILOGUE_OPS)
    assert r["fallbacks"] == {}
    table = _bench_torch.format_results([r])
    assert "| resnet18 | 2x32² | channels_last |" in table
    assert len(lines) == 2


def test_target_speedup():
    assert _bench_torch.target_speedup(0.25) == pytest.approx(1 / (1 - 0.175))
    assert _bench_torch.target_speedup(0.0) == 1.0

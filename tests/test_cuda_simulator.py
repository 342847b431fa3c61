"""The CUDA backend's suite (tests/cuda) under Numba's CUDA simulator, from the normal run,
through the GPU check's dry run (``bench/gpu_dry_run.sh``).

The simulator must be switched on before numba is imported, so the suite runs
in its own process.  Also: host work never imports the CUDA target.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_passes_under_the_simulator(tmp_path):
    """``bench/gpu_check.sh`` as a lent GPU will run it, in a venv holding only what the
    device image holds, under the simulator: the smoke step, tests/cuda (the CUDA
    suite) and the benchmark, each checked against a float64 reference."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (extra fastbn[cuda])")
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_dry_run.sh"),
                             str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=1800)
    if result.returncode and not os.environ.get("CI") and "pip" in result.stderr and (
            "connection" in result.stderr.lower() or "no matching distribution" in
            result.stderr.lower()):
        pytest.skip("no package index to make the image venv from (CI has one)")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    tests = (tmp_path / "gpu_tests.txt").read_text()
    assert " passed" in tests and " failed" not in tests and " error" not in tests
    assert "smoke test passed" in (tmp_path / "smoke.txt").read_text()
    bench = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert bench["simulator"] and len(bench["rows"]) == 4
    assert all(row["checked"] for row in bench["rows"])


def test_host_calls_never_import_cuda():
    code = ("import sys, numpy as np, fastbn\n"
            "x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)\n"
            "y, m, s = fastbn.batch_norm_forward(x)\n"
            "fastbn.batch_norm_backward(x, x, m, s)\n"
            "fastbn.batch_norm_inference(x, m, s)\n"
            "fastbn.batch_stats(x)\n"
            "print(sorted(n for n in sys.modules if n.startswith('numba.cuda') or 'fastbn._cuda' in n))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_calls_launch_three_kernels_and_allocate_only_their_outputs(tmp_path):
    """``bench/gpu_proxy.py`` under the simulator: a training forward or backward is at
    most three launches, inference two, with or without the fused epilogues, and a call
    allocates only its outputs (three, one for inference, four for the backward that
    returns the residual's gradient); the modelled DRAM traffic of float16 is float32's
    in proportion (no converted copies)."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (extra fastbn[cuda])")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import gpu_proxy
    finally:
        sys.path.pop(0)
    counts = gpu_proxy.launches()
    assert "failed" not in counts, counts.get("failed")
    outputs = {"inference": 1, "fused-inference": 1, "fused-backward": 4}
    for name, r in counts.items():
        op = name.split()[0]
        assert r["launches"] <= (2 if op.endswith("inference") else 3), (name, r)
        assert r["allocations"] == outputs.get(op, 3), (name, r)
    for case in ("fused", "planes", "rows (channels-last)"):
        for op in ("forward", "backward", "inference", "fused-forward", "fused-backward",
                   "fused-inference"):
            assert (counts[f"{op} {case} float16"]["x_copy"]
                    == counts[f"{op} {case} float32"]["x_copy"])

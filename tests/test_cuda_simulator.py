"""The CUDA backend's suite (tests/cuda) under Numba's CUDA simulator, from the normal run.

The simulator must be switched on before numba is imported, so the suite runs
in its own process.  Also: host work never imports the CUDA target.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_suite_passes_under_the_simulator():
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (extra fastbn[cuda])")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         os.path.join(ROOT, "tests", "cuda")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


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

"""Start-up cost: a fresh process's first result with a cold and with a warm Numba cache."""

import os
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import time
t0 = time.perf_counter()
import numpy as np
import fastbn
t_import = time.perf_counter() - t0
x = np.random.default_rng(0).standard_normal((8, 16, 8, 8)).astype(np.float32)
y, mean, invstd = fastbn.batch_norm_forward(x)
t_first = time.perf_counter() - t0
t1 = time.perf_counter()
{extra}
t_extra = time.perf_counter() - t1
print(t_import, t_first, t_extra)
"""


def _run_child(cache_dir, extra="pass"):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD.format(extra=extra)], env=env,
                         capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    t_import, t_first, t_extra = map(float, out.split())
    return {"process_wall_s": wall, "import_s": t_import, "first_result_s": t_first,
            "warmup_s": t_extra}


def measure():
    """Cold compile, then warm-cache start-up, each in a fresh process (fresh cache dir)."""
    with tempfile.TemporaryDirectory(prefix="fastbn-startup-") as cache:
        cold = _run_child(cache, extra="fastbn.warmup()")
        warm = _run_child(cache)
    return {"cold": cold, "warm": warm}


def format_report(result):
    cold, warm = result["cold"], result["warm"]
    return "\n".join([
        "fresh process, empty Numba cache (cold):",
        f"  import fastbn {cold['import_s']:.3f} s; first forward on (8, 16, 8, 8) float32 "
        f"{cold['first_result_s']:.2f} s after import start; "
        f"then warmup() of all common signatures {cold['warmup_s']:.1f} s",
        "fresh process, warm Numba cache:",
        f"  import fastbn {warm['import_s']:.3f} s; first result {warm['first_result_s']:.3f} s "
        f"after import start; whole process {warm['process_wall_s']:.3f} s",
    ])

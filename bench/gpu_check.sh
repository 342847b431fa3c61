#!/usr/bin/env bash
# The GPU check, for the first minutes of a lent NVIDIA GPU (README, "GPU"):
#   bash bench/gpu_check.sh OUTDIR [gpu_bench.py options]
# Needs only what the device image holds: python3 with numpy, numba, numba-cuda and
# pytest (CuPy and a CUDA torch are used where present; no cffi, hypothesis,
# pytest-benchmark or network).  fastbn is taken from this checkout through
# PYTHONPATH, nothing is installed, and everything is written under OUTDIR:
#   smoke.txt        versions, cuda.detect(), one trivial kernel (30 s at most)
#   gpu_tests.txt    tests/cuda on the device
#   gpu_bench.txt/.json   the benchmark (fastbn against cuDNN and a device copy)
# The whole run stays under 8 minutes.  `bench/gpu_dry_run.sh` runs this script under
# Numba's CUDA simulator in a venv holding just those packages (CI does, every run).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: bash bench/gpu_check.sh OUTDIR [gpu_bench.py options]}"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export NUMBA_CACHE_DIR="$out/numba-cache"
cd "$root"

timeout 30 "$python" - > "$out/smoke.txt" 2>&1 <<'EOF'
import platform, sys
import numba, numpy
from numba import cuda
print("python", platform.python_version(), "numpy", numpy.__version__, "numba", numba.__version__)
try:
    import numba_cuda
    print("numba-cuda", getattr(numba_cuda, "__version__", "?"))
except ImportError:
    print("numba-cuda: not installed (numba's own CUDA target)")
for name in ("cupy", "torch", "cffi"):
    try:
        mod = __import__(name)
        print(name, mod.__version__)
    except ImportError:
        print(name, "absent")
cuda.detect()

@cuda.jit
def add_one(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] += 1.0

a = cuda.to_device(numpy.zeros(64))
add_one[1, 64](a)
assert (a.copy_to_host() == 1.0).all(), "a trivial kernel gave a wrong result"
import fastbn
print("fastbn", fastbn.__version__, "from", fastbn.__file__, "- smoke test passed")
EOF
smoke=$?
cat "$out/smoke.txt"
if [ $smoke -ne 0 ]; then
    echo "smoke test failed (exit $smoke): see $out/smoke.txt"
    exit 1
fi

# tests/cuda alone: its conftest needs only numpy and pytest (--confcutdir keeps
# tests/conftest.py, which wants hypothesis, out); no pytest-benchmark options; the
# low-occupancy warning of small test grids is no error here
timeout "${GPU_CHECK_TEST_TIMEOUT:-300}" "$python" -m pytest -q -p no:cacheprovider -o addopts= \
    --confcutdir=tests/cuda -W "ignore:Grid size" tests/cuda 2>&1 | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}

timeout 150 "$python" bench/gpu_bench.py --json "$out/gpu_bench.json" "$@" 2>&1 \
    | tee "$out/gpu_bench.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench" | tee "$out/summary.txt"
exit $(( tests != 0 || bench != 0 ))

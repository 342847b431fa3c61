#!/usr/bin/env bash
# Dry run of the GPU check (bench/gpu_check.sh) on a machine without a GPU: a fresh
# venv holding only what the device image holds (numpy, numba, numba-cuda, pytest: no
# cffi, hypothesis, pytest-benchmark, tbb), then the check under Numba's CUDA
# simulator, with no package installed after the venv is made.  CI runs it.
#   bash bench/gpu_dry_run.sh [OUTDIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$(mktemp -d)}"
venv="$(mktemp -d)/image-venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q numpy numba "numba-cuda>=0.20" pytest
for absent in cffi hypothesis pytest_benchmark tbb; do
    if "$venv/bin/python3" -c "import $absent" 2>/dev/null; then
        echo "the image venv holds $absent: the dry run would prove less than it says"
        exit 1
    fi
done
export PIP_NO_INDEX=1  # nothing more from the network
# the simulator runs every GPU thread as a Python thread: its tests take minutes, not seconds
NUMBA_ENABLE_CUDASIM=1 GPU_CHECK_TEST_TIMEOUT=1200 PYTHON="$venv/bin/python3" bash "$root/bench/gpu_check.sh" "$out"
echo "dry run of the GPU check passed; results in $out"
rm -rf "$(dirname "$venv")"

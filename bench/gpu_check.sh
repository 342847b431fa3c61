#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU (issue 5): the CUDA test suite on the
# real device, then the benchmark against cuDNN and a device copy.
#   bash bench/gpu_check.sh [OUTDIR]      (writes OUTDIR/gpu_tests.txt, gpu_bench.json)
set -uo pipefail
out="${1:-gpu-results}"
shift || true
mkdir -p "$out"
python=${PYTHON:-python}
unset NUMBA_ENABLE_CUDASIM
"$python" -c "import numba, numpy; print('numba', numba.__version__, 'numpy', numpy.__version__)"
"$python" -m pytest -q -p no:cacheprovider tests/cuda 2>&1 | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}
"$python" bench/gpu_bench.py --json "$out/gpu_bench.json" "$@" 2>&1 | tee "$out/gpu_bench.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench"
exit $(( tests != 0 || bench != 0 ))

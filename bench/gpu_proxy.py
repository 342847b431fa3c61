"""Proxy measures of the CUDA backend that need no GPU.

    python bench/gpu_proxy.py [--json FILE]

1. Machine code: each streaming kernel compiled for sm_90 (Numba -> PTX, then
   ``ptxas``; SASS read with ``nvdisasm``): registers per thread and SASS
   instructions per element, counted statically in the kernel's main innermost
   loop that touches memory, every path of it (the loop's instructions divided by
   the elements it handles: its stores for a map, its loads of the data for a
   reduction).
2. Launches and device allocations per call, counted under Numba's CUDA
   simulator (a subprocess with ``NUMBA_ENABLE_CUDASIM=1``).
3. A DRAM model: bytes per element that the call's streaming launches move, taking
   every array of the data's size passed to one as read or written once from DRAM
   (no L2 reuse), against a copy (read + write of the input).

Tools are found on ``PATH`` or in the NVIDIA wheels (``nvidia-cuda-nvcc``,
``nvidia-cuda-nvdisasm``); a step whose tools are missing says so and is skipped.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (kernel, dtype of the data, kind, loads of the data per element)
STREAMING = [
    ("affine", "float32", "map", 1),
    ("dx", "float32", "map", 2),
    ("two_sided", "float32", "map", 1),
    ("plane_moments", "float32", "reduce", 1),
    ("row_moments", "float32", "reduce", 1),
    ("plane_grad_sums", "float32", "reduce", 2),
    ("row_grad_sums", "float32", "reduce", 2),
    ("plane_features", "float32", "reduce", 1),
    ("row_features", "float32", "reduce", 1),
    ("fused_forward", "float32", "reduce", 1),
    # the fused epilogues: with the residual, and with ReLU's mask and dresidual
    ("affine_epilogue", "float32", "map", 2),
    ("dx_epilogue", "float32", "map", 3),
]


def _tool(name):
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cu13/bin", "cu12/bin", "cuda_nvcc/bin", "cuda_nvdisasm/bin"):
            path = os.path.join(base, sub, name)
            if os.path.exists(path):
                return path
    return None


def _signature(name, dtype):
    from fastbn._cuda.signatures import launch_signatures

    for n, args in launch_signatures():
        if n == name and str(args[0].dtype) == dtype:
            return args
    raise KeyError(name)


def innermost_memory_loop(sass):
    """The SASS lines of the kernel's main innermost loop: of the loops (a backward branch
    to a label) that hold a global load or store and no such loop inside them, the
    longest (LLVM also emits short versions of a loop for degenerate cases, such as
    one channel, whose addresses do not move)."""
    lines = sass.splitlines()
    labels = {}
    for n, line in enumerate(lines):
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = n
    loops = []
    for n, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), n + 1) < n:
            first = labels[m.group(1)]
            if any(re.search(r"\b(LDG|STG)", b) for b in lines[first:n + 1]):
                loops.append((first, n))
    innermost = [(a, b) for a, b in loops
                 if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    if not innermost:
        return []
    a, b = max(innermost, key=lambda loop: loop[1] - loop[0])
    return lines[a:b + 1]


def _instructions(body):
    return [b for b in body if re.match(r"^\s*/\*[0-9a-f]{4,}\*/", b)]


def machine_code(workdir):
    """Registers and SASS instructions per element of each streaming kernel."""
    ptxas, nvdisasm = _tool("ptxas"), _tool("nvdisasm")
    if not (ptxas and nvdisasm):
        return {"skipped": f"ptxas {ptxas or 'missing'}, nvdisasm {nvdisasm or 'missing'}"}
    from fastbn._cuda.signatures import compile_ptx

    rows = {}
    for name, dtype, kind, loads in STREAMING:
        ptx = compile_ptx(name, _signature(name, dtype), cc=(9, 0))
        src = os.path.join(workdir, f"{name}.ptx")
        cubin = os.path.join(workdir, f"{name}.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        built = subprocess.run([ptxas, "-arch=sm_90", "-O3", "-v", "-o", cubin, src],
                               capture_output=True, text=True, check=True)
        registers = int(re.search(r"Used (\d+) registers", built.stderr).group(1))
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
        body = _instructions(innermost_memory_loop(sass))
        stores = sum(1 for b in body if "STG" in b)
        data_loads = sum(1 for b in body if "LDG" in b)
        # a map's elements are its stores; a reduction's its loads of the data (every load
        # in a reduction's loop is of the data)
        elements = stores if kind == "map" else max(1, data_loads // loads)
        rows[f"{name} ({dtype})"] = {
            "registers": registers, "loop_instructions": len(body),
            "elements_per_iteration": elements,
            "instructions_per_element": round(len(body) / max(elements, 1), 1),
            "total_instructions": len(_instructions(sass.splitlines())),
        }
    return rows


_COUNT = r"""
import json, sys
import numpy as np
from numba import cuda
import fastbn
from fastbn._cuda import backend, kernels

log = []
size = {"data": 0}  # arrays of the data's size are the data (per-channel vectors are shorter)
STREAMING = {"plane_moments", "row_moments", "plane_grad_sums", "row_grad_sums", "affine", "dx",
             "affine_epilogue", "dx_epilogue",
             "two_sided", "fused_forward", "plane_features", "row_features", "cast", "clip",
             "partial_moments", "partial_grad_sums"}


class Counted:
    def __init__(self, name, kernel):
        self.name, self.kernel = name, kernel

    def __getitem__(self, config):
        launch = self.kernel[config]

        def run(*args):
            nbytes = 0
            if self.name in STREAMING:  # the others read a value or two per channel
                nbytes = sum(a.nbytes for a in args if hasattr(a, "nbytes") and a.size >= size["data"])
            log.append(("launch", self.name, nbytes))
            return launch(*args)
        return run


for name in dir(kernels):
    obj = getattr(kernels, name)
    if hasattr(obj, "py_func") and not name.startswith("_"):
        setattr(kernels, name, Counted(name, obj))
for name in ("device_array", "device_array_like", "to_device", "pinned_array"):
    real = getattr(cuda, name)
    setattr(cuda, name, (lambda real, name: lambda *a, **k: (log.append(("alloc", name, 0)),
                                                            real(*a, **k))[1])(real, name))

rng = np.random.default_rng(0)
results = {}
# the fused forward takes channels of at most backend.FUSED_MAX values (64 under the
# simulator, 8192 on a GPU); planes: inner >= kernels.PLANE_MIN; rows: channels-last
cases = {"fused": ((4, 3, 10), 1), "planes": ((2, 3, 4200), 1),
         "rows (channels-last)": ((200, 6, 7, 3), -1)}
for case, (shape, axis) in cases.items():
    for dtype in ("float32", "float16"):
        x = cuda.to_device((3 + rng.standard_normal(shape)).astype(dtype))
        c = shape[axis]
        w, b = cuda.to_device(np.ones(c)), cuda.to_device(np.zeros(c))
        rm, rv = cuda.to_device(np.zeros(c)), cuda.to_device(np.ones(c))
        fastbn.batch_norm_forward(x, w, b, axis=axis)  # compile, outside the count
        y, mean, inv = fastbn.batch_norm_forward(x, w, b, axis=axis)
        fastbn.batch_norm_backward(x, x, mean, inv, w, axis=axis)
        r = cuda.to_device(rng.standard_normal(shape).astype(dtype))
        calls = {
            "forward": lambda: fastbn.batch_norm_forward(x, w, b, running_mean=rm,
                                                         running_var=rv, axis=axis),
            "backward": lambda: fastbn.batch_norm_backward(x, x, mean, inv, w, axis=axis),
            "inference": lambda: fastbn.batch_norm_inference(x, rm, rv, w, b, axis=axis),
            # the fused epilogues (contract section 6): the same launches
            "fused-forward": lambda: fastbn.batch_norm_forward(
                x, w, b, running_mean=rm, running_var=rv, axis=axis, residual=r,
                activation="relu"),
            "fused-backward": lambda: fastbn.batch_norm_backward(
                x, x, mean, inv, w, axis=axis, activation="relu", y=y, residual_grad=True),
            "fused-inference": lambda: fastbn.batch_norm_inference(
                x, rm, rv, w, b, axis=axis, residual=r, activation="relu"),
        }
        n = int(np.prod(shape))
        size["data"] = n
        for op, call in calls.items():
            del log[:]
            call()
            moved = sum(e[2] for e in log if e[0] == "launch")
            results[f"{op} {case} {dtype}"] = {
                "launches": sum(1 for e in log if e[0] == "launch"),
                "allocations": sum(1 for e in log if e[0] == "alloc"),
                "dram_bytes_per_element": round(moved / n, 2),
                "x_copy": round(moved / (2 * n * np.dtype(dtype).itemsize), 2),
            }
print(json.dumps(results))
"""


def launches():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", _COUNT], capture_output=True, text=True,
                         env=env, timeout=900)
    if run.returncode:
        return {"failed": run.stderr[-2000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as workdir:
        code = machine_code(workdir)
    print("SASS (sm_90), innermost memory loop")
    if "skipped" in code:
        print("  skipped:", code["skipped"])
    else:
        print(f"  {'kernel':<32} {'regs':>5} {'instr/elem':>11} {'loop':>5} {'elems':>6}")
        for name, r in code.items():
            print(f"  {name:<32} {r['registers']:>5} {r['instructions_per_element']:>11} "
                  f"{r['loop_instructions']:>5} {r['elements_per_iteration']:>6}")
    counts = launches()
    print("\nper call, under the simulator: launches, allocations, DRAM model")
    if "failed" in counts:
        print(counts["failed"])
    else:
        print(f"  {'call':<40} {'launches':>8} {'allocs':>7} {'B/elem':>7} {'x copy':>7}")
        for name, r in counts.items():
            print(f"  {name:<40} {r['launches']:>8} {r['allocations']:>7} "
                  f"{r['dram_bytes_per_element']:>7} {r['x_copy']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sass_sm90": code, "per_call": counts}, f, indent=2)
    return 0 if "failed" not in counts else 1


if __name__ == "__main__":
    sys.exit(main())

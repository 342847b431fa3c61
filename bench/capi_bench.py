"""C ABI costs: per-call overhead and first-call latency from C, throughput against Python.

    python bench/capi_bench.py [--quick] [--repeats N]

Builds libfastbn.so and native/examples/capi_check.c into a temporary
directory, runs ``capi_check overhead`` (a fresh process: the first call there
starts Python and loads the cached kernels), then times the NCHW training
forward through the C ABI (loaded here with ctypes; the call releases the GIL
and goes straight to compiled code) interleaved with the Python API on the
same arrays.
"""

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import fastbn
from fastbn import capi
from fastbn._bench import time_interleaved

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "native",
                        "examples")


def build(tmp):
    capi.build(tmp)
    exe = os.path.join(tmp, "capi_check")
    cmd = capi.compile_line(tmp, os.path.join(EXAMPLES, "capi_check.c")).split()
    subprocess.run(cmd + ["-o", exe, "-lm", "-pthread"], check=True)
    return os.path.join(tmp, "libfastbn.so"), exe


def c_forward(lib):
    f = lib.fastbn_forward_train_f32
    p = ctypes.c_void_p
    f.argtypes = [ctypes.c_int64] * 3 + [p, p, p, ctypes.c_float, ctypes.c_float] + [p] * 5
    f.restype = ctypes.c_int
    return f


def throughput(lib, shape, repeats):
    outer, channels, inner = shape[0], shape[1], int(np.prod(shape[2:]))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32) + 3.0
    y_c, y_py = np.empty_like(x), np.empty_like(x)
    mean, invstd = np.empty(channels, np.float32), np.empty(channels, np.float32)
    forward = c_forward(lib)
    ptr = lambda a: a.ctypes.data  # noqa: E731

    def from_c():
        rc = forward(outer, channels, inner, ptr(x), None, None, 1e-5, 0.1, None, None,
                     ptr(y_c), ptr(mean), ptr(invstd))
        assert rc == 0

    def from_python():
        fastbn.batch_norm_forward(x, axis=1, eps=1e-5, out=y_py)

    medians, _ = time_interleaved({"C ABI": from_c, "Python API": from_python}, repeats=repeats)
    np.testing.assert_allclose(y_c, y_py, rtol=1e-6, atol=1e-6)
    return medians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small NCHW shape")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    if shutil.which("cc") is None:
        print("no C compiler (cc): nothing to measure")
        return 0
    shape = (8, 32, 28, 28) if args.quick else (64, 256, 56, 56)
    tmp = tempfile.mkdtemp(prefix="fastbn-capi-bench-")
    try:
        libpath, exe = build(tmp)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([exe, "overhead"], capture_output=True, text=True, env=env)
        print(out.stdout.strip() or out.stderr)
        lib = ctypes.CDLL(libpath)
        medians = throughput(lib, shape, args.repeats)
        c, py = medians["C ABI"], medians["Python API"]
        print(f"training forward {shape} float32, preallocated output, median of "
              f"{args.repeats} interleaved: C ABI {c * 1e3:.3f} ms, Python API {py * 1e3:.3f} ms, "
              f"C / Python {c / py:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

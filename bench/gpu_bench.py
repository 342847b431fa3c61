"""fastbn's CUDA backend against cuDNN (torch.nn.functional.batch_norm) and a device copy.

    python3 bench/gpu_bench.py [--repeats N] [--json FILE] [--quick]

For NCHW (64, 256, 56, 56) and channels-last (the same tensor in NHWC memory),
float32 and float16, training forward and backward: fresh random inputs per case,
warm-up, then CUDA-event timings of every contender interleaved (order rotated
each repeat), medians.  Before each timed fastbn call its output is poisoned with
NaN, and after the loop the output is checked against a float64 reference.  The
floor is a device-to-device copy of the same bytes.  PyTorch runs in float32
weights for the float16 rows too: cuDNN's batch norm takes half data only with
float32 weights (with half weights PyTorch falls back to its own kernels).

Without a CUDA build of PyTorch the data are Numba device arrays and only fastbn
and the copy are timed; under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``,
the dry run of ``bench/gpu_check.sh``) the shapes are tiny and the times
meaningless, but every step and check runs.
Targets (issue 19): forward <= 1.3x the copy and >= 1.2x faster than cuDNN, backward
<= 1.8x the copy.
"""

import argparse
import json
import os
import statistics
import sys

import numpy as np

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _torch_cuda():
    if SIMULATOR:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


class _Timed:
    def timer(self):
        """Start timing on the device; the returned function stops and gives the ms."""
        start, end = self.event(), self.event()
        start.record()

        def stop():
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return stop


class _Numba(_Timed):
    """Numba device arrays and events (no PyTorch)."""

    name = "numba"

    def __init__(self):
        from numba import cuda

        self.cuda = cuda

    def device(self, a):
        return self.cuda.to_device(np.ascontiguousarray(a))

    def host(self, a):
        return a.copy_to_host()

    def empty_like(self, a):
        return self.cuda.device_array_like(a)

    def copy(self, dst, src):
        dst.copy_to_device(src)

    def poison(self, a):
        a.copy_to_device(np.full(a.shape, np.nan, a.dtype))

    def event(self):
        return self.cuda.event()

    def synchronize(self):
        self.cuda.synchronize()


class _Torch(_Timed):
    """torch CUDA tensors and events."""

    name = "torch"

    def __init__(self, torch):
        self.torch = torch

    def device(self, a):
        return self.torch.as_tensor(np.ascontiguousarray(a), device="cuda")

    def host(self, a):
        return a.cpu().numpy()

    def empty_like(self, a):
        return self.torch.empty_like(a)

    def copy(self, dst, src):
        dst.copy_(src)

    def poison(self, a):
        a.fill_(float("nan"))

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def synchronize(self):
        self.torch.cuda.synchronize()


def _reference(x, dy, w, b, axis):
    """float64 training forward and backward of (N, ..., C, ...) data along ``axis``."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    red = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    mean = x.mean(red, keepdims=True)
    inv = 1.0 / np.sqrt(x.var(red, keepdims=True) + 1e-5)
    xhat = (x - mean) * inv
    y = xhat * w.reshape(shape) + b.reshape(shape)
    g = dy * w.reshape(shape)
    dx = inv * (g - g.mean(red, keepdims=True) - xhat * (g * xhat).mean(red, keepdims=True))
    return y, dx


def _torch_contenders(torch, x, dy, w, b, axis):
    import torch.nn.functional as F

    to_torch = (lambda t: t.permute(0, 3, 1, 2)) if axis == -1 else (lambda t: t)
    xt, dyt = to_torch(x), to_torch(dy)
    wt, bt = w.float(), b.float()  # float32 weights: cuDNN's half batch norm needs them
    xg = xt.detach().clone().requires_grad_(True)
    yg = F.batch_norm(xg, None, None, wt, bt, training=True)
    return {
        "torch forward": lambda: F.batch_norm(xt, None, None, wt, bt, training=True),
        "torch backward": lambda: torch.autograd.grad(yg, xg, dyt, retain_graph=True),
    }


def run_case(lib, torch, shape, layout, dtype, repeats, seed):
    import fastbn

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    axis = 1
    if layout == "channels-last":  # NHWC memory; fastbn sees it as (N, H, W, C), axis -1
        x, dy, axis = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy(), -1
    c = x.shape[axis]
    w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    xd, dyd, wd, bd = lib.device(x), lib.device(dy), lib.device(w), lib.device(b)
    y, dx, copy_dst = lib.empty_like(xd), lib.empty_like(xd), lib.empty_like(xd)
    _, mean, invstd = fastbn.batch_norm_forward(xd, wd, bd, axis=axis, out=y)
    contenders = {
        "copy (floor)": lambda: lib.copy(copy_dst, xd),
        "fastbn forward": lambda: fastbn.batch_norm_forward(xd, wd, bd, axis=axis, out=y),
        "fastbn backward": lambda: fastbn.batch_norm_backward(dyd, xd, mean, invstd, wd,
                                                              axis=axis, out=dx),
    }
    if torch is not None:
        contenders.update(_torch_contenders(torch, xd, dyd, wd, bd, axis))
    poison = {"fastbn forward": y, "fastbn backward": dx}
    for fn in contenders.values():
        for _ in range(2):
            fn()
    lib.synchronize()
    times = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name in poison:
                lib.poison(poison[name])
            stop = lib.timer()
            contenders[name]()
            times[name].append(stop())
    med = {n: statistics.median(t) for n, t in times.items()}
    y_ref, dx_ref = _reference(x, dy, w, b, axis)
    err_y = float(np.abs(lib.host(y).astype(np.float64) - y_ref).max())
    err_dx = float(np.abs(lib.host(dx).astype(np.float64) - dx_ref).max())
    tol = 2e-2 if dtype == np.float16 else 1e-4
    row = {"layout": layout, "dtype": np.dtype(dtype).name, "shape": list(shape),
           "arrays": lib.name, "ms": med, "max_error_y": err_y, "max_error_dx": err_dx,
           "checked": bool(err_y < tol and err_dx < tol * 10)}
    floor = med["copy (floor)"]
    if floor > 0:
        row["forward_x_copy"] = med["fastbn forward"] / floor
        row["backward_x_copy"] = med["fastbn backward"] / floor
        if torch is not None:
            row["forward_torch_over_fastbn"] = med["torch forward"] / med["fastbn forward"]
            row["backward_torch_over_fastbn"] = med["torch backward"] / med["fastbn backward"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3 if SIMULATOR else 21)
    parser.add_argument("--json", default="gpu_bench.json")
    parser.add_argument("--quick", action="store_true", help="(8, 64, 28, 28) instead")
    args = parser.parse_args(argv)
    torch = _torch_cuda()
    if SIMULATOR:
        shape = (2, 3, 4, 4)
    else:
        shape = (8, 64, 28, 28) if args.quick else (64, 256, 56, 56)
    from numba import cuda

    if not (SIMULATOR or cuda.is_available()):
        print("no CUDA device: nothing to measure")
        return 0
    lib = _Torch(torch) if torch is not None else _Numba()
    if torch is not None:
        device = torch.cuda.get_device_name()
    else:
        device = str(getattr(cuda.get_current_device(), "name", "CUDA simulator"))
    print(f"device: {device}; arrays: {lib.name}"
          + (f", torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}" if torch else
             " (no CUDA torch: no cuDNN row)") + (" [simulator: times meaningless]" if SIMULATOR else ""))
    rows = []
    for layout in ("nchw", "channels-last"):
        for dtype in (np.float32, np.float16):
            row = run_case(lib, torch, shape, layout, dtype, args.repeats, len(rows) + 1)
            rows.append(row)
            floor = row["ms"]["copy (floor)"]
            print(f"\n{layout} {row['dtype']} {shape}: median of {args.repeats} (CUDA events)")
            for name, ms in row["ms"].items():
                ratio = f"{ms / floor:6.2f}x copy" if floor > 0 else ""
                print(f"  {name:<18} {ms:8.3f} ms  {ratio}")
            print(f"  errors y {row['max_error_y']:.1e}, dx {row['max_error_dx']:.1e} "
                  f"({'ok' if row['checked'] else 'WRONG'})")
    with open(args.json, "w") as f:
        json.dump({"device": device, "simulator": SIMULATOR, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.json}")
    return 0 if all(r["checked"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

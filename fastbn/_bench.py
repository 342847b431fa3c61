"""``python -m fastbn bench``: fastbn against the memory floor and its peers, in one process.

Every contender of a case runs in the same process, interleaved: each repeat
runs all of them once, in an order rotated from one repeat to the next, after
untimed warm-up calls; the table gives medians and ratios.  The memory floor is
a parallel copy of the same array on all Numba threads: one read and one write
of every byte, the least any normalization can do.
"""

import os
import platform
import statistics
import time

import numba
import numpy as np

from . import api
from ._cpu.backend import backend as cpu

DEFAULT_SHAPE = (64, 256, 56, 56)
QUICK_SHAPE = (16, 64, 28, 28)


def machine_info():
    cpu_model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu_model,
        "logical_cpus": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
    try:
        info["threading_layer"] = numba.threading_layer()
    except ValueError:
        info["threading_layer"] = "not yet chosen"
    torch = _torch()
    if torch is not None:
        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    return info


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def time_interleaved(contenders, repeats=11, warmup=2):
    """Median seconds per contender; order rotated every repeat, warm-up untimed."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, times


def _naive_forward(x, w, b, eps, axis):
    red = tuple(d for d in range(x.ndim) if d != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    mean = x.mean(axis=red)
    var = x.var(axis=red)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * w.reshape(shape) \
        + b.reshape(shape)


def _naive_backward(dy, x, mean, invstd, w, axis):
    red = tuple(d for d in range(x.ndim) if d != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    n = x.size // x.shape[axis]
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    dbias = dy.sum(axis=red)
    dweight = (dy * xhat).sum(axis=red)
    return (w * invstd).reshape(shape) * (dy - dbias.reshape(shape) / n
                                          - xhat * dweight.reshape(shape) / n)


def _torch_contenders(torch, x, dy, w, b, eps, axis, y_ref, dx_ref):
    """PyTorch CPU contenders (NCHW only: torch's channel axis is 1), checked before timing."""
    if axis != 1:
        return {}, {}
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    tw, tb = torch.from_numpy(w.astype(x.dtype)), torch.from_numpy(b.astype(x.dtype))
    ty = torch.empty_like(tx)
    c = x.shape[1]
    save_mean = torch.empty(c, dtype=tx.dtype)
    save_invstd = torch.empty(c, dtype=tx.dtype)
    native = torch.ops.aten.native_batch_norm

    def forward():
        native.out(tx, tw, tb, None, None, True, 0.1, eps, out=ty, save_mean=save_mean,
                   save_invstd=save_invstd)

    def backward():
        return torch.ops.aten.native_batch_norm_backward(
            tdy, tx, tw, None, None, save_mean, save_invstd, True, eps, [True, True, True])

    forward()
    dx = backward()[0]
    atol = 1e-3 if x.dtype == np.float32 else 1e-9
    ok = (np.allclose(ty.numpy(), y_ref, atol=atol) and np.allclose(dx.numpy(), dx_ref, atol=atol))
    if not ok:
        raise RuntimeError("PyTorch's results disagree with fastbn's; not timing them")
    return {"torch native_batch_norm.out": forward}, {"torch native_batch_norm_backward": backward}


def run_case(shape=DEFAULT_SHAPE, dtype=np.float32, axis=1, repeats=11, naive=True,
             peers=True):
    """Time one case; returns a list of rows (dicts) for the forward and backward tables."""
    rng = np.random.default_rng(0)
    dtype = np.dtype(dtype)
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    x += dtype.type(3.0)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    c = shape[axis]
    w = rng.uniform(0.5, 2.0, c)
    b = rng.standard_normal(c)
    eps = 1e-5
    y = np.empty_like(x)
    dx = np.empty_like(x)
    dst = np.empty_like(x)
    _, mean, invstd = api.batch_norm_forward(x, w, b, axis=axis, eps=eps, out=y)
    api.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, out=dx)

    floor = {"memory floor: parallel copy": lambda: cpu.copy(x, dst)}
    forward = {
        "fastbn forward (out=)": lambda: api.batch_norm_forward(x, w, b, axis=axis, eps=eps, out=y),
        "fastbn forward (allocating)": lambda: api.batch_norm_forward(x, w, b, axis=axis, eps=eps),
        "fastbn inference (out=)": lambda: api.batch_norm_inference(
            x, mean, 1.0 / invstd.astype(np.float64) ** 2 - eps, w, b, axis=axis, eps=eps, out=y),
    }
    backward = {
        "fastbn backward (out=)": lambda: api.batch_norm_backward(dy, x, mean, invstd, w,
                                                                  axis=axis, out=dx),
    }
    if naive:
        forward["naive NumPy forward"] = lambda: _naive_forward(x, w, b, eps, axis)
        backward["naive NumPy backward"] = lambda: _naive_backward(
            dy, x, mean.astype(np.float64), invstd.astype(np.float64), w, axis)
    torch = _torch() if peers else None
    if torch is not None:
        tf, tb = _torch_contenders(torch, x, dy, w, b, eps, axis, y, dx)
        forward.update(tf)
        backward.update(tb)
    medians, _ = time_interleaved({**floor, **forward, **backward}, repeats=repeats)
    floor_s = medians["memory floor: parallel copy"]
    baseline = {**{name: "fastbn forward (out=)" for name in forward},
                **{name: "fastbn backward (out=)" for name in backward}}
    rows = []
    for name, sec in medians.items():
        arrays_touched = 3 if name in backward else 2  # read x (and dy), write the output
        rows.append({
            "case": f"{shape} {dtype.name} axis={axis}",
            "contender": name,
            "median_ms": sec * 1e3,
            "GB/s": arrays_touched * x.nbytes / sec / 1e9,
            "x floor": sec / floor_s,
            "x fastbn": sec / medians[baseline[name]] if name in baseline else float("nan"),
        })
    return rows


def format_table(rows):
    width = max(len(r["contender"]) for r in rows)
    lines = [f"{'contender':<{width}}  {'median ms':>10}  {'GB/s':>7}  {'/ floor':>8}  "
             f"{'/ fastbn':>8}"]
    for r in rows:
        lines.append(f"{r['contender']:<{width}}  {r['median_ms']:10.2f}  {r['GB/s']:7.1f}  "
                     f"{r['x floor']:8.2f}  {r['x fastbn']:8.2f}")
    return "\n".join(lines)

"""``python -m fastbn bench``: fastbn against the memory floor and its peers, in one process.

One table, ``CASES``, drives this command and the pytest-benchmark cases in
``bench/``.  Every contender of a case runs in the same process, interleaved:
each repeat runs all of them once, in an order rotated from one repeat to the
next, after untimed warm-up calls; tables give medians and ratios.  The memory
floor is a parallel copy of the same array on all Numba threads: one read and
one write of every byte, the least a normalization can do.
"""

import math
import os
import platform
import statistics
import time
import tracemalloc

import numba
import numpy as np

from . import api, preprocessing
from ._machine import last_level_cache_bytes
from ._cpu import floors as traffic
from ._cpu import kernels
from ._cpu.backend import pipelined, plan_chains

# name: {size: (shape, channel axis)}.  "full" is ``--full``'s size (arrays of 205 MB
# in float32), "default" the size the plain command times (51 MB in float32: well above
# the last-level cache, and a run that stays within 1.5 GB), "quick" ``--quick``'s.
CASES = {
    "nchw": {"full": ((64, 256, 56, 56), 1), "default": ((32, 128, 56, 56), 1),
             "quick": ((8, 64, 28, 28), 1)},
    "nchw-batch256": {"full": ((256, 64, 32, 32), 1), "default": ((256, 48, 32, 32), 1),
                      "quick": ((32, 32, 16, 16), 1)},
    "channels-last": {"full": ((64, 56, 56, 256), -1), "default": ((32, 56, 56, 128), -1),
                      "quick": ((8, 28, 28, 64), -1)},
    "2d": {"full": ((1_000_000, 64), -1), "default": ((200_000, 64), -1),
           "quick": ((100_000, 64), -1)},
    "small": {"full": ((32, 64, 8, 8), 1), "default": ((32, 64, 8, 8), 1),
              "quick": ((32, 64, 8, 8), 1)},
}
SIZES = ("full", "default", "quick")
# what the plain command times: the cases and ops a user decides on, in float32
DEFAULT_CASES = ("nchw", "channels-last", "small")
# the fused epilogues (contract section 6): ResNet's bn -> add -> relu and its backward
FUSED_OPS = ("fused forward", "fused inference", "fused backward")
DEFAULT_OPS = ("forward", "inference", "backward") + FUSED_OPS + ("standardize", "scaler")
ALL_OPS = DEFAULT_OPS + ("stats", "scaler (weighted)")
FLOOR = "memory floor: parallel copy"
READ = "floor: parallel read"
READ_COPY = "floor: read + copy"
READ_NEW_COPY = "floor: read + copy into a new array"
ADD = "floor: a + b (2 reads, 1 write)"
READ2_ADD = "floor: read x, dy + (x + dy)"
GROUPED_READ_COPY = "floor: per channel group, read + copy from cache"
GROUPED_READ2_ADD = "floor: per channel group, read x, dy + (x + dy) from cache"
PIPELINED_READ_COPY = "floor: pipelined, read channel c+1 + copy c from cache"
PIPELINED_READ2_ADD = "floor: pipelined, read x, dy of c+1 + (x + dy) of c from cache"
READ_ADD = "floor: read x, then x + residual"
ADD_RESIDUAL = "floor: x + residual (read x, residual, write y)"
READ3_ADD_COPY = "floor: read x, dy, y, then x + dy and a copy of y"
ADD_COPY = "floor: x + dy and a copy of y (read x, dy, y, write dx, dresidual)"
PIPELINED_READ_ADD = "floor: pipelined, read x of c+1 + (x + residual) of c"
PIPELINED_READ3_ADD_COPY = ("floor: pipelined, read x, dy, y of c+1 + (x + dy), copy of y, "
                            "of c")
EPS = 1e-5


def case_shape(name, size="full"):
    """``(shape, channel axis)`` of case ``name`` at ``size`` (one of ``SIZES``)."""
    return CASES[name][size]


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
    llc = last_level_cache_bytes()
    if llc:
        info["last_level_cache"] = f"{llc >> 20} MiB"
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


def peers_line(peers=True):
    """One line naming each peer the tables compare against, or why its columns are
    missing (a peer not installed is never silently absent)."""
    if not peers:
        return "peers: skipped (--no-peers)"
    parts = []
    torch = _torch()
    parts.append(f"PyTorch {torch.__version__}" if torch is not None else
                 "PyTorch: not installed, its rows skipped (pip install torch; the CPU build "
                 "is enough)")
    try:
        import sklearn
    except ImportError:
        parts.append("scikit-learn: not installed, its rows skipped (pip install scikit-learn)")
    else:
        parts.append(f"scikit-learn {sklearn.__version__}")
    return "peers: " + "; ".join(parts)


# A call slower than this is timed without the untimed call before each sample.
SLOW_CALL_S = 0.05


def time_interleaved(contenders, repeats=11, warmup=2, calls=1):
    """Median seconds per call of each contender, and every sample; order rotated every
    repeat, warm-up untimed.

    A sample times ``calls`` back-to-back calls (tiny cases: a single call of a few
    microseconds is mostly timer noise) right after one untimed call of the same
    contender, so that each is timed from its own state, not the previous contender's:
    its caches, and no other runtime's threads spinning on the two cores (PyTorch's
    OpenMP threads spin on after a call, and Numba's after a fastbn call: a 2.4 ms fastbn
    inference took 2.8 ms right after ``native_batch_norm.out``).  A contender whose
    first call takes over ``SLOW_CALL_S`` (the naive NumPy peers, 40-100x fastbn) gets
    neither the second warm-up nor the untimed calls: that state is noise next to its
    time, and those calls were a third of the default run.
    """
    names = list(contenders)
    slow = set()
    for _ in range(warmup):
        for name in names:
            if name not in slow:
                t0 = time.perf_counter()
                contenders[name]()
                if time.perf_counter() - t0 > SLOW_CALL_S:
                    slow.add(name)
    times = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = contenders[name]
            if name not in slow:
                fn()  # untimed: the sample starts from this contender's own state
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}, times


# Inputs below this size are timed CALLS_PER_SAMPLE calls at a time.
CACHE_RESIDENT_BYTES = 4 << 20
CALLS_PER_SAMPLE = 20


def calls_per_sample(a):
    return CALLS_PER_SAMPLE if a.x.nbytes < CACHE_RESIDENT_BYTES else 1


class Inputs:
    """The arrays of one case, allocated once and reused by every contender."""

    def __init__(self, shape, axis, dtype, seed=0):
        rng = np.random.default_rng(seed)
        self.shape, self.axis, self.dtype = tuple(shape), axis, np.dtype(dtype)
        self.x = rng.standard_normal(shape, dtype=np.float32).astype(self.dtype, copy=False)
        self.x += self.dtype.type(3.0)
        self.dy = rng.standard_normal(shape, dtype=np.float32).astype(self.dtype, copy=False)
        c = shape[axis]
        self.weight = rng.uniform(0.5, 2.0, c)
        self.bias = rng.standard_normal(c)
        self.out = np.empty_like(self.x)
        self.copy_dst = np.empty_like(self.x)
        _, self.mean, self.invstd = api.batch_norm_forward(
            self.x, self.weight, self.bias, axis=axis, eps=EPS, out=self.out)
        self.running_var = 1.0 / self.invstd.astype(np.float64) ** 2 - EPS
        self.red = tuple(d for d in range(self.x.ndim) if d != axis % self.x.ndim)
        bshape = [1] * self.x.ndim
        bshape[axis] = -1
        self.bshape = bshape
        ax = axis % self.x.ndim
        self.shape3 = (math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:]))
        self.residual = None

    def with_epilogues(self):
        """Also the fused epilogues' arrays: a residual, the forward's output through
        residual and ReLU (``y``, the backward's mask) and a ``dresidual`` buffer."""
        if self.residual is None:
            rng = np.random.default_rng(1)
            self.residual = rng.standard_normal(self.shape, dtype=np.float32).astype(
                self.dtype, copy=False)
            self.y = api.batch_norm_forward(self.x, self.weight, self.bias, axis=self.axis,
                                            eps=EPS, residual=self.residual,
                                            activation="relu")[0]
            # at out's offset within a cache line, as the fused backward needs to write
            # both with streaming stores (else it writes dresidual through a temporary)
            self.dres = traffic.empty_aligned_like(self.out)
        return self


def uses_column_path(shape, axis):
    from ._cpu.backend import MIN_RUN

    return math.prod(shape[axis % len(shape) + 1:]) < MIN_RUN


def fused_channel_path(a):
    from ._cpu.backend import channel_plan

    return channel_plan(a.shape3, a.x.itemsize)[1] == 1


def pattern_floors(a):
    """Floors of the memory traffic each op must do on this case's kernel path.

    The fused channel path reads each channel once and re-reads it from cache:
    pipelined (channel c written while c + 1 is read) or by groups (read a
    group, then write it); its floors run that schedule with no arithmetic.  The column
    path must read its input twice (statistics of a channel need every row
    before the first output).  Each floor runs the same traffic with nothing
    else: read-only passes, a copy (read + write), ``a + b`` (two reads + one
    write), all parallel with streaming stores.
    """
    if uses_column_path(a.shape, a.axis):
        forward = (READ_COPY, lambda: (traffic.read(a.x), traffic.copy(a.x, a.copy_dst)))
        backward = (READ2_ADD, lambda: (traffic.read(a.x), traffic.read(a.dy),
                                        traffic.add(a.x, a.dy, a.copy_dst)))
    elif not fused_channel_path(a):
        forward = (FLOOR, None)
        backward = (ADD, lambda: traffic.add(a.x, a.dy, a.copy_dst))
    else:
        x3, dy3, dst3 = (v.reshape(a.shape3) for v in (a.x, a.dy, a.copy_dst))
        forward = (GROUPED_READ_COPY, lambda: traffic.grouped_read_copy(x3, dst3))
        backward = (GROUPED_READ2_ADD, lambda: traffic.grouped_read2_add(x3, dy3, dst3))
        if pipelined(a.shape3, a.x.itemsize, dst3):
            forward = (PIPELINED_READ_COPY, lambda: traffic.pipelined_read_copy(x3, dst3))
        if pipelined(a.shape3, 2 * a.x.itemsize, dst3):
            backward = (PIPELINED_READ2_ADD,
                        lambda: traffic.pipelined_read2_add(x3, dy3, dst3))
    floors = {"forward": forward, "inference": (FLOOR, None), "backward": backward,
              "stats": (READ, lambda: traffic.read(a.x))}
    floors.update(epilogue_floors(a))
    if feature_last(a):  # a statistics pass, then a transform pass
        floors["standardize"] = (READ_COPY,
                                 lambda: (traffic.read(a.x), traffic.copy(a.x, a.copy_dst)))
        # scikit-learn's fit_transform returns a new array: its pages are faulted in
        # (and zeroed by the kernel) as they are first written
        floors["scaler"] = (READ_NEW_COPY,
                            lambda: (traffic.read(a.x), traffic.copy(a.x, np.empty_like(a.x))))
    return floors


def epilogue_floors(a):
    """Pattern floors of the fused epilogues (``pattern_floors``), with the residual, ReLU's
    ``y`` and ``dresidual`` added to each op's traffic.

    The forward with a residual reads ``x`` for the statistics, then ``x`` and the
    residual for the output, and writes it: on the pipelined channel path the second
    read of ``x`` comes from cache and the residual is read from memory as the write
    needs it (its schedule); on the column path a read, then ``x + residual``; elsewhere
    ``x + residual`` alone, as for inference (read ``x`` and the residual, write ``y``).
    The backward through ReLU with the residual's gradient also reads ``y`` wherever it
    reads ``dy`` and writes ``dresidual`` with ``dx``: pipelined, the backward's floor
    with ``y`` read and copied; on the column path reads of ``x``, ``dy`` and ``y``,
    then ``x + dy`` and a copy of ``y``; elsewhere the latter alone.
    """
    def add_residual():
        traffic.add(a.x, a.residual, a.copy_dst)

    def add_copy():
        traffic.add(a.x, a.dy, a.copy_dst)
        traffic.copy(a.y, a.dres)

    inference = (ADD_RESIDUAL, add_residual)
    if uses_column_path(a.shape, a.axis):
        return {"fused forward": (READ_ADD, lambda: (traffic.read(a.x), add_residual())),
                "fused inference": inference,
                "fused backward": (READ3_ADD_COPY, lambda: (
                    traffic.read(a.x), traffic.read(a.dy), traffic.read(a.y), add_copy()))}
    floors = {"fused forward": (ADD_RESIDUAL, add_residual), "fused inference": inference,
              "fused backward": (ADD_COPY, add_copy)}
    x3, dst3 = a.x.reshape(a.shape3), a.copy_dst.reshape(a.shape3)
    if fused_channel_path(a) and pipelined(a.shape3, a.x.itemsize, dst3):
        floors["fused forward"] = (PIPELINED_READ_ADD, lambda: traffic.pipelined_read_copy(
            x3, dst3, a.residual.reshape(a.shape3)))
    if fused_channel_path(a) and pipelined(a.shape3, 2 * a.x.itemsize, dst3):
        floors["fused backward"] = (PIPELINED_READ3_ADD_COPY, lambda: traffic.pipelined_read2_add(
            x3, a.dy.reshape(a.shape3), dst3, c3=a.y.reshape(a.shape3),
            out3_c=a.dres.reshape(a.shape3)))
    return floors


def feature_last(a):
    """Cases in scikit-learn's (samples, features) layout also time ``standardize``."""
    return a.axis % a.x.ndim == a.x.ndim - 1


def sklearn_contenders(a):
    """scikit-learn's StandardScaler against fastbn.sklearn's on the same data reshaped to
    (samples, features), without and with ``sample_weight``."""
    try:
        from sklearn.preprocessing import StandardScaler

        from . import sklearn as fastbn_sklearn
    except ImportError:
        return {}
    if not feature_last(a):
        return {}
    x2 = a.x.reshape(-1, a.x.shape[-1])
    w = np.random.default_rng(0).uniform(0.0, 2.0, x2.shape[0])
    ours = fastbn_sklearn.StandardScaler
    return {
        "scaler": {
            SCALER: lambda: ours().fit_transform(x2),
            "sklearn StandardScaler().fit_transform": lambda: StandardScaler().fit_transform(x2),
        },
        "scaler (weighted)": {
            WEIGHTED_SCALER: lambda: ours().fit_transform(x2, sample_weight=w),
            "sklearn StandardScaler().fit_transform(sample_weight)":
                lambda: StandardScaler().fit_transform(x2, sample_weight=w),
        },
    }


SCALER = "fastbn.sklearn StandardScaler().fit_transform"
WEIGHTED_SCALER = "fastbn.sklearn StandardScaler().fit_transform(sample_weight)"


def fastbn_contenders(a, ops=ALL_OPS):
    """op -> {name: callable} for fastbn's calls of ``ops`` and the floors they need."""
    floors = {FLOOR: lambda: traffic.copy(a.x, a.copy_dst)}
    for op, (name, fn) in pattern_floors(a).items():
        if fn is not None and op in ops:
            floors[name] = fn
    calls = {
        "forward": {
            "fastbn forward (out=)": lambda: api.batch_norm_forward(
                a.x, a.weight, a.bias, axis=a.axis, eps=EPS, out=a.out),
            "fastbn forward (allocating)": lambda: api.batch_norm_forward(
                a.x, a.weight, a.bias, axis=a.axis, eps=EPS),
            "fastbn forward + relu, fused (out=)": lambda: api.batch_norm_forward(
                a.x, a.weight, a.bias, axis=a.axis, eps=EPS, activation="relu", out=a.out),
        },
        "inference": {
            "fastbn inference (out=)": lambda: api.batch_norm_inference(
                a.x, a.mean, a.running_var, a.weight, a.bias, axis=a.axis, eps=EPS, out=a.out),
        },
        "backward": {
            "fastbn backward (out=)": lambda: api.batch_norm_backward(
                a.dy, a.x, a.mean, a.invstd, a.weight, axis=a.axis, out=a.out),
        },
        **fused_contenders(a, ops),
        "stats": {"fastbn batch_stats": lambda: api.batch_stats(a.x, axis=a.axis)},
        **({"standardize": {"fastbn standardize (out=)": lambda: preprocessing.standardize(
            a.x, axis=a.axis, out=a.out)}} if feature_last(a) else {}),
    }
    return {"floor": floors, **{op: c for op, c in calls.items() if op in ops}}


def fused_contenders(a, ops=FUSED_OPS):
    """fastbn's fused epilogues, and the same computed unfused: fastbn's plain call, then
    NumPy's ``add`` and ``maximum`` (or, backward, the ReLU mask multiply) with ``out=``."""
    if not any(op in FUSED_OPS for op in ops):
        return {}
    a.with_epilogues()

    def forward_unfused():
        api.batch_norm_forward(a.x, a.weight, a.bias, axis=a.axis, eps=EPS, out=a.out)
        np.add(a.out, a.residual, out=a.out)
        np.maximum(a.out, 0, out=a.out)

    def inference_unfused():
        api.batch_norm_inference(a.x, a.mean, a.running_var, a.weight, a.bias, axis=a.axis,
                                 eps=EPS, out=a.out)
        np.add(a.out, a.residual, out=a.out)
        np.maximum(a.out, 0, out=a.out)

    def backward_unfused():
        np.multiply(a.dy, a.y > 0, out=a.dres)
        api.batch_norm_backward(a.dres, a.x, a.mean, a.invstd, a.weight, axis=a.axis,
                                out=a.out)

    return {
        "fused forward": {
            FUSED_FORWARD: lambda: api.batch_norm_forward(
                a.x, a.weight, a.bias, axis=a.axis, eps=EPS, residual=a.residual,
                activation="relu", out=a.out),
            "fastbn forward, then np.add + np.maximum (out=)": forward_unfused,
        },
        "fused inference": {
            FUSED_INFERENCE: lambda: api.batch_norm_inference(
                a.x, a.mean, a.running_var, a.weight, a.bias, axis=a.axis, eps=EPS,
                residual=a.residual, activation="relu", out=a.out),
            "fastbn inference, then np.add + np.maximum (out=)": inference_unfused,
        },
        "fused backward": {
            FUSED_BACKWARD: lambda: api.batch_norm_backward(
                a.dy, a.x, a.mean, a.invstd, a.weight, axis=a.axis, activation="relu", y=a.y,
                residual_grad=True, out=a.out, residual_out=a.dres),
            "np.multiply(dy, y > 0), then fastbn backward (out=)": backward_unfused,
        },
    }


FUSED_FORWARD = "fastbn forward + add + relu, fused (out=)"
FUSED_INFERENCE = "fastbn inference + add + relu, fused (out=)"
FUSED_BACKWARD = "fastbn backward through relu + dresidual, fused (out=)"


def numpy_contenders(a):
    """Naive NumPy: what one writes without fastbn (three passes and temporaries), with
    the weights in the input's dtype as a NumPy user would hold them."""
    weight = a.weight.astype(a.dtype).reshape(a.bshape)
    bias = a.bias.astype(a.dtype).reshape(a.bshape)
    mean = a.mean.astype(a.dtype).reshape(a.bshape)
    inv = a.invstd.astype(a.dtype).reshape(a.bshape)

    def forward():
        mean = a.x.mean(axis=a.red, keepdims=True)
        var = a.x.var(axis=a.red, keepdims=True)
        return (a.x - mean) / np.sqrt(var + EPS) * weight + bias

    def backward():
        n = a.x.size // a.x.shape[a.axis]
        xhat = (a.x - mean) * inv
        dbias = a.dy.sum(axis=a.red, keepdims=True)
        dweight = (a.dy * xhat).sum(axis=a.red, keepdims=True)
        return weight * inv * (a.dy - dbias / n - xhat * dweight / n)

    return {
        "forward": {"NumPy naive forward": forward},
        "backward": {"NumPy naive backward": backward},
        "stats": {"NumPy mean + var": lambda: (a.x.mean(axis=a.red), a.x.var(axis=a.red))},
    }


def torch_contenders(torch, a):
    """PyTorch CPU peers, channel axis moved to dim 1 as a view, checked before timing."""
    axis = a.axis % a.x.ndim
    tx, tdy = (_channels_at_dim1(torch.from_numpy(v), axis) for v in (a.x, a.dy))
    c = a.x.shape[axis]
    tw = torch.from_numpy(a.weight.astype(a.dtype))
    tb = torch.from_numpy(a.bias.astype(a.dtype))
    ty = torch.empty_like(tx)
    save_mean = torch.empty(c, dtype=tx.dtype)
    save_invstd = torch.empty(c, dtype=tx.dtype)
    rm = torch.from_numpy(a.mean.astype(a.dtype))
    rv = torch.from_numpy(a.running_var.astype(a.dtype))
    native = torch.ops.aten.native_batch_norm
    dims = [0] + list(range(2, tx.dim()))

    def forward_out():
        native.out(tx, tw, tb, None, None, True, 0.1, EPS, out=ty, save_mean=save_mean,
                   save_invstd=save_invstd)

    def backward():
        return torch.ops.aten.native_batch_norm_backward(
            tdy, tx, tw, None, None, save_mean, save_invstd, True, EPS, [True, True, True])

    epilogues = {}
    if a.residual is not None:
        epilogues = _torch_epilogue_contenders(torch, a, tx, tdy, tw, tb, rm, rv, ty,
                                               save_mean, save_invstd, axis)
    forward_out()
    y_ok = np.allclose(ty.numpy() if axis == 1 else _unpermute(ty, axis), a.out, atol=1e-3)
    if not y_ok:
        raise RuntimeError("PyTorch's forward disagrees with fastbn's; not timing it")
    return {
        "forward": {
            "torch F.batch_norm": lambda: torch.nn.functional.batch_norm(
                tx, None, None, tw, tb, training=True, eps=EPS),
            "torch native_batch_norm.out": forward_out,
        },
        "inference": {"torch F.batch_norm (eval)": lambda: torch.nn.functional.batch_norm(
            tx, rm, rv, tw, tb, training=False, eps=EPS)},
        "backward": {"torch native_batch_norm_backward": backward},
        "stats": {"torch var_mean": lambda: torch.var_mean(tx, dim=dims, correction=0)},
        **epilogues,
    }


def _torch_epilogue_contenders(torch, a, tx, tdy, tw, tb, rm, rv, ty, save_mean, save_invstd,
                               axis):
    """PyTorch's unfused bn -> add -> relu: the in-place sequence a careful user writes
    (``native_batch_norm.out``, ``add_``, ``relu_``), the functional one
    (``F.batch_norm(...) + r``, then ``relu``), and autograd's backward
    (``threshold_backward``, whose result is also the residual's gradient, then
    ``native_batch_norm_backward``)."""
    tr, t_y = (_channels_at_dim1(torch.from_numpy(v), axis) for v in (a.residual, a.y))
    native = torch.ops.aten.native_batch_norm
    F = torch.nn.functional

    def forward_inplace():
        native.out(tx, tw, tb, None, None, True, 0.1, EPS, out=ty, save_mean=save_mean,
                   save_invstd=save_invstd)
        ty.add_(tr)
        ty.relu_()

    def backward():
        g = torch.ops.aten.threshold_backward(tdy, t_y, 0)
        return torch.ops.aten.native_batch_norm_backward(
            g, tx, tw, None, None, save_mean, save_invstd, True, EPS, [True, True, True]), g

    forward_inplace()
    got = ty.numpy() if axis == 1 else _unpermute(ty, axis)
    if not np.allclose(got, a.y, atol=1e-3):
        raise RuntimeError("PyTorch's bn + add + relu disagrees with fastbn's; not timing it")
    return {
        "fused forward": {
            "torch native_batch_norm.out + add_ + relu_": forward_inplace,
            "torch F.relu(F.batch_norm + r)": lambda: F.relu(
                F.batch_norm(tx, None, None, tw, tb, training=True, eps=EPS) + tr),
        },
        "fused inference": {"torch F.relu(F.batch_norm (eval) + r)": lambda: F.relu(
            F.batch_norm(tx, rm, rv, tw, tb, training=False, eps=EPS) + tr)},
        "fused backward": {"torch threshold_backward + native_batch_norm_backward": backward},
    }


def _channels_at_dim1(t, axis):
    """Tensor ``t`` with its channel axis ``axis`` moved to dim 1, as a view (PyTorch's
    layout for batch norm)."""
    if axis == 1:
        return t
    return t.permute(0, axis, *[d for d in range(1, t.dim()) if d != axis])


def _unpermute(t, axis):
    arr = t.numpy()
    return np.moveaxis(arr, 1, axis)


BYTES_MOVED = {"floor": 2, "forward": 2, "inference": 2, "backward": 3, "stats": 1,
               "standardize": 2, "scaler": 2, "scaler (weighted)": 2, "fused forward": 3,
               "fused inference": 3, "fused backward": 5}  # x sizes
BASELINE = {"forward": "fastbn forward (out=)", "inference": "fastbn inference (out=)",
            "backward": "fastbn backward (out=)", "stats": "fastbn batch_stats",
            "fused forward": FUSED_FORWARD, "fused inference": FUSED_INFERENCE,
            "fused backward": FUSED_BACKWARD,
            "standardize": "fastbn standardize (out=)", "scaler": SCALER,
            "scaler (weighted)": WEIGHTED_SCALER}


def peak_memory(a, ops=ALL_OPS):
    """Peak traced allocation (NumPy's allocations) per fastbn call, in input sizes."""
    groups = fastbn_contenders(a, ops)
    calls = {op: next(iter(c.values())) for op, c in groups.items() if op != "floor"}
    if "forward" in groups:
        calls["forward (allocating)"] = groups["forward"]["fastbn forward (allocating)"]
    result = {}
    for name, call in calls.items():
        tracemalloc.start()
        call()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result[name] = peak / a.x.nbytes
    return result


def probe_bandwidth(nbytes=64 << 20, repeats=11):
    """The machine's memory bandwidth now: GB/s of the parallel copy floor of ``nbytes``
    of float32 (the run's largest case, so a case's own copy floor should match it), and
    the spread of its samples.  Measured at the start and at the end of a run."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    medians, samples = time_interleaved({"copy": lambda: traffic.copy(src, dst)},
                                        repeats=repeats)
    return {"bytes": src.nbytes, "GB/s": 2 * src.nbytes / medians["copy"] / 1e9,
            "iqr_pct": spread_pct(samples["copy"])}


class CpuLoad:
    """CPU time other processes took (and the hypervisor stole) while this process ran.

    Reads ``/proc/stat`` (Linux; elsewhere ``result()`` is None) at ``start()`` and at
    ``result()``: busy time of all CPUs, less this process's own, as a fraction of all
    CPUs' wall time.
    """

    def start(self):
        self._t0 = self._sample()
        return self

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        own = os.times()
        fields += [0] * (8 - len(fields))
        idle, steal = fields[3] + fields[4], fields[7]
        return time.monotonic(), sum(fields) - idle - steal, steal, own.user + own.system

    def result(self):
        t1 = self._sample()
        if self._t0 is None or t1 is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        wall = (t1[0] - self._t0[0]) * (os.cpu_count() or 1)
        if wall <= 0:
            return None
        busy = (t1[1] - self._t0[1]) / hz - (t1[3] - self._t0[3])
        return {"others": max(0.0, busy / wall), "steal": (t1[2] - self._t0[2]) / hz / wall}


def spread_pct(samples):
    """Interquartile range of ``samples`` as a percent of their median."""
    q1, median, q3 = np.percentile(samples, [25, 50, 75])
    return 100.0 * (q3 - q1) / median


def run_case(name, dtype=np.float32, size="full", repeats=11, naive=True, peers=True,
             ops=ALL_OPS):
    """Time ``ops`` of one case; returns ``{"case", "shape", "dtype", "rows", "memory", ...}``.

    Each row is one contender: its median, spread (IQR as a percent of the median) and
    ratios to the copy floor, to its op's pattern floor (fastbn rows) and to fastbn's
    call of the same op.
    """
    shape, axis = case_shape(name, size)
    a = Inputs(shape, axis, dtype)
    groups = fastbn_contenders(a, ops)
    extra = []
    if naive:
        extra.append(numpy_contenders(a))
    torch = _torch() if peers else None
    if torch is not None:
        extra.append(torch_contenders(torch, a))
    if peers:
        extra.append(sklearn_contenders(a))
    for contenders in extra:
        for op, c in contenders.items():
            if op in ops:
                groups.setdefault(op, {}).update(c)
    flat = {name_: fn for c in groups.values() for name_, fn in c.items()}
    calls = calls_per_sample(a)
    medians, samples = time_interleaved(flat, repeats=repeats, calls=calls)
    floor_s = medians[FLOOR]
    patterns = {op: name_ for op, (name_, _) in pattern_floors(a).items()}
    if "scaler" in patterns:
        patterns["scaler (weighted)"] = patterns["scaler"]
    rows = []
    for op, contenders in groups.items():
        for contender in contenders:
            sec = medians[contender]
            base = BASELINE.get(op)
            pattern = patterns.get(op)
            ours = contender.startswith("fastbn")
            rows.append({
                "op": op,
                "contender": contender,
                "median_ms": sec * 1e3,
                "iqr_pct": spread_pct(samples[contender]),
                "GB/s": BYTES_MOVED[op] * a.x.nbytes / sec / 1e9,
                "x_floor": sec / floor_s,
                "x_pattern_floor": sec / medians[pattern] if pattern and ours else float("nan"),
                "pattern_floor": pattern if ours else None,
                "x_fastbn": sec / medians[base] if base else float("nan"),
            })
    return {"case": name, "shape": list(shape), "axis": axis, "dtype": np.dtype(dtype).name,
            "bytes": a.x.nbytes, "llc_bytes": last_level_cache_bytes(), "cache_resident": a.x.nbytes < CACHE_RESIDENT_BYTES,
            "calls_per_sample": calls, "repeats": repeats, "rows": rows,
            "memory": peak_memory(a, ops)}


def plot(results, path):
    """Bar chart of time / copy floor per case and contender (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']}\n{r['dtype']}" for r in results]
    contenders = []
    for r in results:
        for row in r["rows"]:
            if row["op"] != "floor" and row["contender"] not in contenders:
                contenders.append(row["contender"])
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(results)), 6))
    width = 0.8 / max(1, len(contenders))
    for k, contender in enumerate(contenders):
        values = []
        for r in results:
            match = [row["x_floor"] for row in r["rows"] if row["contender"] == contender]
            values.append(match[0] if match else np.nan)
        ax.bar(np.arange(len(results)) + k * width, values, width, label=contender,
               color=plt.cm.tab20(k % 20))
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log")
    ax.set_ylabel("time / memory floor (parallel copy), log scale")
    ax.set_xticks(np.arange(len(results)) + 0.4 - width / 2)
    ax.set_xticklabels(labels)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("fastbn vs the memory floor and peers (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def floor_sweep(name="nchw", dtype=np.float32, quick=False, repeats=11):
    """The fused channel path's floors, pipelined and over group sizes, against the copy
    and fastbn.

    Answers "could another schedule get under a target?": each row is the
    fastest possible kernel on that schedule (the traffic and nothing else).
    Returns ``[(contender, median seconds, time / copy)]``.
    """
    shape, axis = case_shape(name, "quick" if quick else "full")
    a = Inputs(shape, axis, dtype)
    x3, dy3, dst3 = (v.reshape(a.shape3) for v in (a.x, a.dy, a.copy_dst))
    channel_bytes = a.shape3[0] * a.shape3[2] * a.x.itemsize
    fns = dict(fastbn_contenders(a)["floor"])
    fns.update({
        "fastbn forward (out=)": fastbn_contenders(a)["forward"]["fastbn forward (out=)"],
        "fastbn backward (out=)": fastbn_contenders(a)["backward"]["fastbn backward (out=)"],
    })
    nthreads = numba.get_num_threads()
    fns["read + copy, pipelined"] = lambda: traffic.pipelined_read_copy(x3, dst3)
    fns["read x, dy + add, pipelined, a chain of channels per planned thread"] = (
        lambda: traffic.pipelined_read2_add(x3, dy3, dst3, plan_chains(a.shape3[1]), 1))
    nchains, nparts = kernels.backward_chains(a.shape3[0], a.shape3[1], nthreads)
    fns[f"read x, dy + add, pipelined, {nchains} chain(s) of {nparts} row parts (backward)"] = (
        lambda: traffic.pipelined_read2_add(x3, dy3, dst3))
    # one chain of all channels in row parts: one per thread (half a channel each on two
    # threads, the row-split forward that was tried), or small tiles that fit in L2
    for per_thread in (1, 4, 16):
        parts = min(a.shape3[0], per_thread * nthreads)
        kib = -(-a.shape3[0] // parts) * a.shape3[2] * a.x.itemsize / 1024
        fns[f"read + copy, pipelined over tiles of {kib:.0f} KiB per channel"] = (
            lambda p=parts: traffic.row_tiled_read_copy(x3, dst3, p))
        fns[f"read x, dy + add, pipelined over tiles of {kib:.0f} KiB per channel"] = (
            lambda p=parts: traffic.row_tiled_read2_add(x3, dy3, dst3, p))
    for group in sorted({max(1, min(a.shape3[1], (mb << 20) // channel_bytes))
                         for mb in (1, 2, 4, 8, 16)}):
        mib = group * channel_bytes / 2**20
        fns[f"read + copy, groups of {group} channels ({mib:.1f} MiB)"] = (
            lambda g=group: traffic.grouped_read_copy(x3, dst3, g))
        fns[f"read x, dy + add, groups of {group} ({2 * mib:.1f} MiB)"] = (
            lambda g=group: traffic.grouped_read2_add(x3, dy3, dst3, g))
    medians, _ = time_interleaved(fns, repeats=repeats)
    return [(n, s, s / medians[FLOOR]) for n, s in medians.items()]


def out_of_core(gb=2.0, chunk_mb=64.0, repeats=3, directory=None):
    """``python -m fastbn normalize`` on a (rows, 64) float32 file of ``gb`` GB, against
    reading the file twice and writing it once with plain chunked file I/O.

    Interleaved repeats, medians; the file is on the local disk and, on a machine
    with enough memory, in the page cache (both contenders see the same cache).
    Returns ``{"bytes", "normalize_s", "io_floor_s", "ratio"}``.
    """
    import argparse
    import shutil
    import tempfile

    from . import _normalize_cli

    tmp = tempfile.mkdtemp(prefix="fastbn-oocore-", dir=directory)
    try:
        src, dst, io_dst = (os.path.join(tmp, n) for n in ("in.npy", "out.npy", "io.npy"))
        width = 64
        rows = int(gb * 1e9) // (4 * width)
        block = np.random.default_rng(0).standard_normal((1 << 16, width), dtype=np.float32)
        with open(src, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (rows, width)})
            for start in range(0, rows, block.shape[0]):
                block[:min(block.shape[0], rows - start)].tofile(f)
        chunk = int(chunk_mb * (1 << 20))

        def io_floor():
            for _ in range(2):
                with open(src, "rb") as f:
                    while f.read(chunk):
                        pass
            with open(src, "rb") as f, open(io_dst, "wb") as g:
                while True:
                    data = f.read(chunk)
                    if not data:
                        break
                    g.write(data)
                g.flush()
                os.fsync(g.fileno())

        args = argparse.Namespace(input=src, output=dst, method="standard", axis=-1,
                                  chunk_mb=chunk_mb, feature_range=(0.0, 1.0), clip=False,
                                  save_stats=None, stats=None, quiet=True)

        def normalize():
            assert _normalize_cli.run(args) == 0

        medians, _ = time_interleaved({"normalize": normalize, "read twice + write": io_floor},
                                      repeats=repeats, warmup=1)
        return {"bytes": os.path.getsize(src), "normalize_s": medians["normalize"],
                "io_floor_s": medians["read twice + write"],
                "ratio": medians["normalize"] / medians["read twice + write"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# Small calls, on an idle machine and on one whose cores are all busy

_BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


class busy_cores:
    """Context manager: one spinning process per core (a shared machine's neighbours)."""

    def __init__(self, seconds=600):
        self.seconds = seconds
        self.procs = []

    def __enter__(self):
        import subprocess
        import sys

        for _ in range(os.cpu_count() or 1):
            self.procs.append(subprocess.Popen([sys.executable, "-c",
                                                _BUSY.format(seconds=self.seconds)]))
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        return False


def small_call_contenders():
    """Small calls as pipelines make them, each with fastbn's default threads and with
    ``fastbn.threads(1)``: the benchmark's small forward, a tiny one, ``standardize`` of a
    (256, 24) batch, and one step of a NumPy MLP layer ((64, 256) matmul, batch norm
    forward and backward), where NumPy's BLAS threads and fastbn's meet."""
    import fastbn

    rng = np.random.default_rng(0)
    small = rng.normal(size=(32, 64, 8, 8)).astype(np.float32)
    tiny = rng.normal(size=(8, 16, 8, 8)).astype(np.float32)
    table = rng.normal(size=(256, 24))
    h = rng.normal(size=(64, 256)).astype(np.float32)
    w = (rng.normal(size=(256, 256)) / 16).astype(np.float32)
    out_small, out_tiny = np.empty_like(small), np.empty_like(tiny)

    def mlp_step():
        z = h @ w
        y, mean, invstd = fastbn.batch_norm_forward(z, axis=-1)
        dz, dw, db = fastbn.batch_norm_backward(y, z, mean, invstd, axis=-1)
        return dz @ w.T

    ops = {
        "forward (32, 64, 8, 8)": lambda: fastbn.batch_norm_forward(small, out=out_small),
        "forward (8, 16, 8, 8)": lambda: fastbn.batch_norm_forward(tiny, out=out_tiny),
        "standardize (256, 24)": lambda: fastbn.standardize(table),
        "MLP step (64, 256)": mlp_step,
    }

    def one_thread(fn):
        def run():
            with fastbn.threads(1):
                return fn()
        return run

    contenders = {}
    for name, fn in ops.items():
        contenders[name] = fn
        contenders[name + " [threads(1)]"] = one_thread(fn)
    torch = _torch()
    if torch is not None:
        t = torch.from_numpy(small)
        contenders["F.batch_norm (32, 64, 8, 8)"] = lambda: torch.nn.functional.batch_norm(
            t, None, None, training=True)
    return contenders


def small_calls(repeats=11, busy=True):
    """``{name: {"idle": s, "busy": s}}`` per small call (medians of interleaved samples of
    20 calls); ``busy`` with every core kept busy by another process."""
    contenders = small_call_contenders()
    result = {name: {} for name in contenders}
    medians, _ = time_interleaved(contenders, repeats=repeats, calls=CALLS_PER_SAMPLE)
    for name, sec in medians.items():
        result[name]["idle"] = sec
    if busy:
        with busy_cores():
            medians, _ = time_interleaved(contenders, repeats=repeats, calls=CALLS_PER_SAMPLE)
        for name, sec in medians.items():
            result[name]["busy"] = sec
    return result


def format_small_calls(result):
    lines = ["small calls (us per call, median; busy: one spinning process per core)",
             f"  {'call':<42} {'idle':>9} {'busy':>9}"]
    for name, t in result.items():
        busy = f"{t['busy'] * 1e6:9.1f}" if "busy" in t else f"{'-':>9}"
        lines.append(f"  {name:<42} {t['idle'] * 1e6:9.1f} {busy}")
    return "\n".join(lines)

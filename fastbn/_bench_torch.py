"""``python -m fastbn bench --torch``: fastbn.torch on whole models, against PyTorch.

ResNet-18/50 on the CPU: one training step (forward, cross-entropy, backward, SGD) and one
inference pass, PyTorch as is against ``fastbn.torch.convert`` and ``fastbn.torch.optimize``
(and, for inference, PyTorch's own best: ``torch.fx`` conv-bn folding and
``torch.jit.freeze``), interleaved, medians.  ``torch.profiler`` gives the share of
PyTorch's step spent in batch norm, ReLU and add, and the step speed-up that recovering 70%
of it would give; two bounds timed in the same rounds (``_bench_torch_floor``: a bare
copy of the bytes in place of every fastbn call, and the step without batch norm) say how
much of that time any replacement could really save.
"""

import copy
import statistics
import time

MODELS = ("resnet18", "resnet50")
SIZES = (112, 224)
LAYOUTS = ("contiguous", "channels_last")
# the operators whose time fastbn replaces (forward, backward, and the unfused epilogue)
EPILOGUE_OPS = ("aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::relu",
                "aten::relu_", "aten::threshold_backward", "aten::add", "aten::add_")


def _seeded(torch, name):
    from .examples.resnet import resnet

    torch.manual_seed(0)
    model, source = resnet(name)
    return model, source


def _minor_faults():
    """The process's minor page faults so far, or None where the OS does not count them."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _interleaved(contenders, repeats):
    """``(medians, samples, faults)``: the median and every time (s) of ``contenders``
    (name -> callable), timed round-robin, and the median of each call's minor page
    faults (None where the OS does not count them)."""
    for f in contenders.values():  # warm: allocator, compilation, caches
        f()
    times = {k: [] for k in contenders}
    faults = {k: [] for k in contenders}
    for _ in range(repeats):
        for k, f in contenders.items():
            f0 = _minor_faults()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            if f0 is not None:
                faults[k].append(_minor_faults() - f0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    fault_medians = {k: (int(statistics.median(v)) if v else None) for k, v in faults.items()}
    return medians, times, fault_medians


def _in_optimizer(event):
    """Whether a profiler event ran inside ``Optimizer.step`` (SGD's own ``add_``)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return True
        parent = parent.cpu_parent
    return False


def epilogue_share(torch, step):
    """Share of ``step``'s operator self time (torch.profiler, CPU) in batch norm, ReLU and
    add, and that time per operator (ms).  The optimizer's own ``add_`` (SGD's update) is
    not counted: no batch norm library takes it away."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    ours = {}
    for e in prof.events():
        if e.name in EPILOGUE_OPS and not _in_optimizer(e):
            ours[e.name] = ours.get(e.name, 0.0) + e.self_cpu_time_total / 1e3
    return sum(ours.values()) * 1e3 / total, ours


def _train_step(torch, model, x, target, lr=0.01):
    """One step (forward, backward, SGD with momentum) as a callable that returns the
    loss."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    F = torch.nn.functional

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _inference(torch, model, x):
    def run():
        with torch.inference_mode():
            model(x)

    return run


def _torch_best_inference(torch, model, x):
    """PyTorch's own inference optimizations: fx conv-bn folding and jit freezing."""
    from torch.fx.experimental.optimization import fuse

    out = {"torch fx conv-bn folding": fuse(copy.deepcopy(model))}
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(model), x, check_trace=False)
    out["torch.jit.freeze"] = torch.jit.freeze(traced)
    return out


def run_case(torch, name, size, layout, *, batch=32, repeats=5, compiled=False, log=print):
    """Train and inference timings of one (model, size, layout)."""
    import fastbn.torch as fbt

    from ._bench_torch_floor import bound_models

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    base, source = _seeded(torch, name)
    base = base.to(memory_format=fmt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,), generator=g)
    models = {"torch": base, "fastbn convert": fbt.convert(copy.deepcopy(base)),
              "fastbn optimize": fbt.optimize(copy.deepcopy(base))}
    bounds = bound_models(torch, base)
    models.update(bounds)
    if compiled:
        models["torch.compile(torch)"] = torch.compile(copy.deepcopy(base))
        models["torch.compile(fastbn optimize)"] = torch.compile(
            fbt.optimize(copy.deepcopy(base)))
    # The bounds' gradients are not a batch norm's, and training on them diverges within a
    # few steps; NaN activations then made PyTorch's max pool 3x faster.  At lr 0 SGD does
    # the same work and the weights, so the data, stay as they start.
    losses = {}
    steps = {k: _keeping_loss(losses, k, _train_step(torch, m, x, target,
                                                     lr=0.0 if k in bounds else 0.01))
             for k, m in models.items()}
    fbt.reset_stats()
    train, train_all, train_faults = _interleaved(steps, repeats)
    nonfinite = sorted(k for k, v in losses.items() if not bool(torch.isfinite(v)))
    if nonfinite:
        log(f"  warning: non-finite loss in {', '.join(nonfinite)}: their times are not "
            "comparable", flush=True)
    fallbacks = fbt.stats()["fallback"]
    share, per_op = epilogue_share(torch, steps["torch"])
    log(f"  {name} {size}x{size} {layout}: train step medians "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in train.items()), flush=True)

    for m in models.values():
        m.eval()
    infer_models = {"torch": base, "fastbn convert": models["fastbn convert"],
                    "fastbn optimize": fbt.optimize(copy.deepcopy(base).eval())}
    infer_models.update(_torch_best_inference(torch, base, x))
    if compiled:
        infer_models["torch.compile(torch)"] = torch.compile(copy.deepcopy(base))
        infer_models["torch.compile(fastbn optimize)"] = torch.compile(
            fbt.optimize(copy.deepcopy(base).eval()))
    runs = {k: _inference(torch, m, x) for k, m in infer_models.items()}
    infer, infer_all, infer_faults = _interleaved(runs, repeats)
    log(f"  {name} {size}x{size} {layout}: inference medians "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in infer.items()), flush=True)
    return {"model": name, "source": source, "size": size, "layout": layout, "batch": batch,
            "train_s": train, "train_all_s": train_all, "train_faults": train_faults,
            "infer_s": infer, "infer_all_s": infer_all, "infer_faults": infer_faults,
            "epilogue_share": share, "epilogue_ms": per_op,
            "fallbacks": fallbacks, "train_nonfinite": nonfinite}


def _keeping_loss(losses, name, step):
    """``step`` that also leaves its loss in ``losses[name]``."""
    def run():
        losses[name] = step()
    return run


def target_speedup(share, recovered=0.7):
    """The step speed-up when ``recovered`` of a ``share`` of the step disappears."""
    return 1.0 / (1.0 - recovered * share)


def format_results(results):
    """Markdown tables: the training step and inference."""
    lines = ["Training step (forward, loss, backward, SGD), median ms, speed-ups over PyTorch "
             "in brackets. 'share' is PyTorch's step time in batch norm, ReLU and add "
             "(torch.profiler), 'target' the speed-up that recovering 70% of it gives; "
             "'copy floor' replaces every fastbn call with one parallel pass over the bytes "
             "it must touch, 'no BN' removes batch norm and ReLU (bounds on any batch norm "
             "library).", "",
             "| model | input | layout | torch | convert | optimize | copy floor | no BN | "
             "share | target | met | floor meets it |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["train_s"]
        goal = target_speedup(r["epilogue_share"])
        bad = r.get("train_nonfinite", ())
        cells = [f"{t[k] * 1e3:.0f} ({t['torch'] / t[k]:.2f}x)" + (" NaN loss" if k in bad else "")
                 for k in ("fastbn convert", "fastbn optimize", "copy floor",
                           "without batch norm")]
        yes = lambda k: "yes" if t["torch"] / t[k] >= goal else "no"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['batch']}x{r['size']}² | {r['layout']} | "
            f"{t['torch'] * 1e3:.0f} | " + " | ".join(cells) + " | "
            f"{r['epilogue_share']:.1%} | {goal:.2f}x | {yes('fastbn optimize')} | "
            f"{yes('copy floor')} |")
    counted = [r for r in results if r.get("train_faults", {}).get("torch") is not None]
    if counted:
        lines += ["", "Minor page faults per training step, median, thousands: the kernel "
                  "zeroing fresh pages of activations that the allocator took from the OS "
                  "(glibc's MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ keep them).", "",
                  "| model | input | layout | torch | convert | optimize | copy floor | no BN |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in counted:
            f = r["train_faults"]
            lines.append(
                f"| {r['model']} | {r['batch']}x{r['size']}² | {r['layout']} | "
                + " | ".join(f"{f[k] / 1e3:.1f}" for k in (
                    "torch", "fastbn convert", "fastbn optimize", "copy floor",
                    "without batch norm")) + " |")
    lines += ["", "Inference (eval mode, inference_mode), median ms; optimize folds batch norm "
              "into the convolutions.", "",
              "| model | input | layout | torch | torch fx folding | torch.jit.freeze | "
              "convert | optimize | optimize vs PyTorch's best |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["infer_s"]
        best = min(t["torch fx conv-bn folding"], t["torch.jit.freeze"])
        lines.append(
            f"| {r['model']} | {r['batch']}x{r['size']}² | {r['layout']} | "
            f"{t['torch'] * 1e3:.0f} | {t['torch fx conv-bn folding'] * 1e3:.0f} | "
            f"{t['torch.jit.freeze'] * 1e3:.0f} | {t['fastbn convert'] * 1e3:.0f} | "
            f"{t['fastbn optimize'] * 1e3:.0f} | {best / t['fastbn optimize']:.2f}x |")
    compiled = [r for r in results if "torch.compile(torch)" in r["train_s"]]
    if compiled:
        lines += ["", "torch.compile (default backend), median ms", "",
                  "| model | input | layout | train: compile(torch) | compile(optimize) | "
                  "inference: compile(torch) | compile(optimize) |", "|---|---|---|---|---|---|---|"]
        for r in compiled:
            t, i = r["train_s"], r["infer_s"]
            lines.append(
                f"| {r['model']} | {r['batch']}x{r['size']}² | {r['layout']} | "
                f"{t['torch.compile(torch)'] * 1e3:.0f} | "
                f"{t['torch.compile(fastbn optimize)'] * 1e3:.0f} | "
                f"{i['torch.compile(torch)'] * 1e3:.0f} | "
                f"{i['torch.compile(fastbn optimize)'] * 1e3:.0f} |")
    fell = {k: v for r in results for k, v in r["fallbacks"].items()}
    lines += ["", "fastbn.torch fallbacks to PyTorch's kernel during the timed steps: "
              + (", ".join(f"{k} {v}" for k, v in fell.items()) if fell else "none")]
    return "\n".join(lines)


def run(models=MODELS, sizes=SIZES, layouts=LAYOUTS, *, batch=32, repeats=5, compiled=False,
        log=print):
    """Every (model, size, layout) case; returns the list of :func:`run_case` results."""
    import torch

    log(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"batch {batch}, float32, {repeats} interleaved repeats", flush=True)
    return [run_case(torch, m, s, layout, batch=batch, repeats=repeats, compiled=compiled,
                     log=log)
            for m in models for s in sizes for layout in layouts]

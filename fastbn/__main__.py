"""Command line: ``fastbn`` (or ``python -m fastbn``) ``bench | floors | normalize |
startup | warmup | demo``; ``python -m fastbn.capi build`` builds the C library."""

import argparse
import json
import math
import os
import sys
import time

import numpy as np


def _bench_torch(args):
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("fastbn bench --torch needs PyTorch: pip install 'fastbn[torch]'")
    from . import _bench, _bench_torch

    print("machine: " + ", ".join(f"{k}={v}" for k, v in _bench.machine_info().items()))
    t0 = time.perf_counter()
    results = _bench_torch.run(args.model or _bench_torch.MODELS,
                               args.size or _bench_torch.SIZES,
                               args.layout or _bench_torch.LAYOUTS, batch=args.batch,
                               repeats=args.repeats or (2 if args.quick else 5),
                               compiled=args.compile)
    print()
    print(_bench_torch.format_results(results))
    print(f"\ntook {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _bench.machine_info(), "torch": results}, f, indent=2)


def _bench(args):
    from . import _bench

    if args.torch:
        return _bench_torch(args)
    if args.out_of_core:
        r = _bench.out_of_core(gb=args.out_of_core, repeats=args.repeats or 3)
        print(f"out-of-core standardize of a {r['bytes'] / 1e9:.2f} GB float32 file (64 features, "
              f"64 MiB chunks): {r['normalize_s']:.2f} s; reading it twice and writing it once: "
              f"{r['io_floor_s']:.2f} s; ratio {r['ratio']:.2f}")
        return
    repeats = args.repeats or (5 if args.quick else 11)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in _bench.machine_info().items()))
    if args.small_calls:
        result = _bench.small_calls(repeats=repeats, busy=True)
        print(_bench.format_small_calls(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": _bench.machine_info(), "small_calls": result}, f, indent=2)
        return
    from . import _bench_report as report

    size = "quick" if args.quick else "full" if args.full else "default"
    cases = args.case or (list(_bench.CASES) if args.full else list(_bench.DEFAULT_CASES))
    dtypes = args.dtype or (["float32", "float64"] if args.full else ["float32"])
    unknown = [op for op in args.op or () if op not in _bench.ALL_OPS]
    if unknown:
        sys.exit(f"fastbn bench: unknown --op {', '.join(map(repr, unknown))}; the ops are "
                 + ", ".join(map(repr, _bench.ALL_OPS)))
    ops = tuple(args.op) if args.op else _bench.ALL_OPS if args.full else _bench.DEFAULT_OPS
    print(_bench.peers_line(not args.no_peers))
    print(report.LEGEND, flush=True)
    t0 = time.perf_counter()
    load = _bench.CpuLoad().start()

    def progress(text):
        print(f"fastbn bench: {text} ({time.perf_counter() - t0:.0f} s so far)", file=sys.stderr,
              flush=True)

    runs = [(name, dtype) for name in cases for dtype in dtypes]
    probe_bytes = max((math.prod(_bench.case_shape(name, size)[0]) * np.dtype(dtype).itemsize
                       for name, dtype in runs), default=64 << 20)
    probe_bytes = max(probe_bytes, _bench.CACHE_RESIDENT_BYTES)
    progress("memory bandwidth at the start")
    probes = [_bench.probe_bandwidth(probe_bytes)]
    results = []
    for k, (name, dtype) in enumerate(runs, 1):
        shape, _ = _bench.case_shape(name, size)
        progress(f"[{k}/{len(runs)}] {name} {shape} {dtype}, {repeats} repeats")
        result = _bench.run_case(name, np.dtype(dtype), size=size, repeats=repeats,
                                 naive=not args.no_naive, peers=not args.no_peers, ops=ops)
        print()
        print(report.format_case(result), flush=True)
        results.append(result)
    progress("memory bandwidth at the end")
    probes.append(_bench.probe_bandwidth(probe_bytes))
    cpu = load.result()
    info = _bench.machine_info()
    print(f"\nthreading layer: {info['threading_layer']}; run took "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("\n".join(report.verdict_lines(results)))
    noisy, reasons, facts = report.noise_assessment(results, probes, cpu)
    print(report.noise_line(results, probes, cpu))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "repeats": repeats, "size": size, "results": results,
                       "bandwidth_probes": probes, "cpu_load": cpu,
                       "noise": {"noisy": noisy, "reasons": reasons, "facts": facts}},
                      f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        _bench.plot(results, args.plot)
        print(f"wrote {args.plot}")


def _floors(args):
    from . import _bench

    print("machine: " + ", ".join(f"{k}={v}" for k, v in _bench.machine_info().items()))
    for dtype in args.dtype:
        rows = _bench.floor_sweep(args.case, np.dtype(dtype), quick=args.quick,
                                  repeats=args.repeats)
        print(f"\n{args.case} {dtype}: floors of the fused channel path by group size "
              f"(median of {args.repeats} interleaved repeats)")
        width = max(len(n) for n, _, _ in rows)
        for name, sec, ratio in rows:
            print(f"  {name:<{width}}  {sec * 1e3:9.3f} ms  {ratio:5.2f}x copy")


def _startup(args):
    from . import _startup

    result = _startup.measure()
    print(_startup.format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _demo(args):
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        sys.exit(f"fastbn demo needs scikit-learn and matplotlib ({exc}): "
                 "pip install 'fastbn[demo]'")
    from .examples import demo

    print(f"fastbn demo ({'--quick' if args.quick else 'full run'}): writing {args.out}/",
          flush=True)
    results = demo.run(args.out, quick=args.quick)
    print("\n".join(demo.summary_lines(results)))
    print(f"took {results['seconds']:.0f} s; numbers in {os.path.join(args.out, 'demo.json')}, "
          f"figures in {args.out}/ (summary.png and one per experiment)")


def _warmup(args):
    import fastbn

    print(f"compiled or loaded the kernels in {fastbn.warmup():.2f} s")


def main(argv=None):
    console = os.path.basename(sys.argv[0]) == "fastbn"  # the console script, not -m
    parser = argparse.ArgumentParser(prog="fastbn" if console else "python -m fastbn",
                                     description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time fastbn against a memory copy, NumPy, scikit-learn "
                                     "and PyTorch, and say whether the machine was quiet")
    b.add_argument("--case", nargs="+", choices=["nchw", "nchw-batch256", "channels-last", "2d",
                                                 "small"],
                   help="cases to run (default: nchw, channels-last, small; --full: all)")
    b.add_argument("--dtype", nargs="+", choices=["float32", "float64"],
                   help="default float32; --full: float32 and float64")
    b.add_argument("--full", action="store_true",
                   help="the complete run: every case at full size (205 MB arrays), float32 "
                        "and float64, every op (about 20 minutes, 6 GB of memory)")
    b.add_argument("--op", nargs="+", metavar="OP",
                   help="ops to time, of: forward, inference, backward, 'fused forward', "
                        "'fused inference', 'fused backward', standardize, scaler, stats, "
                        "'scaler (weighted)' (default: all but the last two; --full: all)")
    b.add_argument("--repeats", type=int, help="timed repeats per contender (default 11)")
    b.add_argument("--quick", action="store_true",
                   help="smaller shapes and 5 repeats: seconds once compiled")
    b.add_argument("--no-naive", action="store_true", help="skip the naive NumPy contenders")
    b.add_argument("--no-peers", action="store_true", help="skip PyTorch even if installed")
    b.add_argument("--json", help="also write the numbers to this file")
    b.add_argument("--plot", help="also draw a bar chart into this PNG (needs matplotlib)")
    b.add_argument("--out-of-core", type=float, metavar="GB", nargs="?", const=2.0,
                   help="only time `normalize` on a file of GB gigabytes (default 2) against "
                        "reading it twice and writing it once")
    b.add_argument("--small-calls", action="store_true",
                   help="only time small calls, on an idle machine and with every core busy")
    b.add_argument("--torch", action="store_true",
                   help="fastbn.torch on ResNet-18/50: training steps and inference against "
                        "PyTorch as is and its own folding (needs fastbn[torch]; about 15 "
                        "minutes on 2 cores)")
    b.add_argument("--model", nargs="+", choices=["resnet18", "resnet34", "resnet50"],
                   help="with --torch: models (default resnet18 resnet50)")
    b.add_argument("--size", nargs="+", type=int, help="with --torch: input sizes (default "
                                                        "112 224)")
    b.add_argument("--layout", nargs="+", choices=["contiguous", "channels_last"],
                   help="with --torch: memory formats (default both)")
    b.add_argument("--batch", type=int, default=32, help="with --torch: batch size (32)")
    b.add_argument("--compile", action="store_true",
                   help="with --torch: also torch.compile PyTorch's model and optimize's")
    b.set_defaults(func=_bench)
    f = sub.add_parser("floors", help="floors of the fused channel schedule by group size")
    f.add_argument("--case", default="nchw", choices=["nchw", "nchw-batch256", "small"])
    f.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    f.add_argument("--repeats", type=int, default=11)
    f.add_argument("--quick", action="store_true")
    f.set_defaults(func=_floors)
    from . import _normalize_cli

    _normalize_cli.add_parser(sub)
    s = sub.add_parser("startup", help="cold compile and warm-cache start-up times")
    s.add_argument("--json")
    s.set_defaults(func=_startup)
    d = sub.add_parser("demo", help="measure what normalization does on scikit-learn's bundled "
                                    "data sets and draw it (needs fastbn[demo])")
    d.add_argument("--out", default="fastbn-demo", help="directory for demo.json and the PNGs "
                                                        "(default: fastbn-demo)")
    d.add_argument("--quick", action="store_true",
                   help="fewer seeds, epochs and rates: under a minute")
    d.set_defaults(func=_demo)
    w = sub.add_parser("warmup", help="compile the common kernel signatures now")
    w.set_defaults(func=_warmup)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())

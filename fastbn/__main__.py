"""Command line: ``fastbn`` (or ``python -m fastbn``) ``bench | floors | normalize |
startup | warmup``; ``python -m fastbn.capi build`` builds the C library."""

import argparse
import json
import os
import sys

import numpy as np


def _bench(args):
    from . import _bench

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
    print(_bench.peers_line(not args.no_peers))
    cases = args.case or list(_bench.CASES)
    results = []
    for name in cases:
        for dtype in args.dtype:
            result = _bench.run_case(name, np.dtype(dtype), quick=args.quick, repeats=repeats,
                                     naive=not args.no_naive, peers=not args.no_peers)
            print()
            print(_bench.format_case(result, repeats), flush=True)
            results.append(result)
    info = _bench.machine_info()
    print(f"\nthreading layer: {info['threading_layer']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "repeats": repeats, "results": results}, f, indent=2)
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


def _warmup(args):
    import fastbn

    print(f"compiled or loaded the kernels in {fastbn.warmup():.2f} s")


def main(argv=None):
    console = os.path.basename(sys.argv[0]) == "fastbn"  # the console script, not -m
    parser = argparse.ArgumentParser(prog="fastbn" if console else "python -m fastbn",
                                     description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time fastbn against a memory copy, NumPy and PyTorch")
    b.add_argument("--case", nargs="+", choices=["nchw", "nchw-batch256", "channels-last", "2d",
                                                 "small"],
                   help="cases to run (default: all)")
    b.add_argument("--dtype", nargs="+", default=["float32", "float64"],
                   choices=["float32", "float64"])
    b.add_argument("--repeats", type=int, help="timed repeats per contender (default 11)")
    b.add_argument("--quick", action="store_true",
                   help="smaller shapes and 5 repeats: under a minute")
    b.add_argument("--no-naive", action="store_true", help="skip the naive NumPy contenders")
    b.add_argument("--no-peers", action="store_true", help="skip PyTorch even if installed")
    b.add_argument("--json", help="also write the numbers to this file")
    b.add_argument("--plot", help="also draw a bar chart into this PNG (needs matplotlib)")
    b.add_argument("--out-of-core", type=float, metavar="GB", nargs="?", const=2.0,
                   help="only time `normalize` on a file of GB gigabytes (default 2) against "
                        "reading it twice and writing it once")
    b.add_argument("--small-calls", action="store_true",
                   help="only time small calls, on an idle machine and with every core busy")
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
    w = sub.add_parser("warmup", help="compile the common kernel signatures now")
    w.set_defaults(func=_warmup)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())

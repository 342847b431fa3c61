"""Command line: ``python -m fastbn bench | startup | warmup``."""

import argparse
import json
import sys

import numpy as np


def _shape(text):
    return tuple(int(s) for s in text.replace("x", ",").split(",") if s)


def _bench(args):
    from . import _bench

    shape = args.shape or (_bench.QUICK_SHAPE if args.quick else _bench.DEFAULT_SHAPE)
    repeats = args.repeats or (5 if args.quick else 11)
    info = _bench.machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    all_rows = []
    for dtype in args.dtype:
        rows = _bench.run_case(shape, np.dtype(dtype), axis=args.axis, repeats=repeats,
                               naive=not args.no_naive, peers=not args.no_peers)
        print(f"\ntraining forward / inference / backward, {shape} {dtype}, axis={args.axis}, "
              f"median of {repeats} interleaved repeats")
        print(_bench.format_table(rows))
        all_rows += rows
    # Threading layer is known now that kernels have run.
    print(f"\nthreading layer: {_bench.machine_info()['threading_layer']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _bench.machine_info(), "rows": all_rows}, f, indent=2)
        print(f"wrote {args.json}")


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
    parser = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time fastbn against a memory copy, NumPy and PyTorch")
    b.add_argument("--shape", type=_shape, help="e.g. 64,256,56,56 (default: that one)")
    b.add_argument("--axis", type=int, default=1)
    b.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    b.add_argument("--repeats", type=int, help="timed repeats per contender (default 11)")
    b.add_argument("--quick", action="store_true", help="a small shape and 5 repeats")
    b.add_argument("--no-naive", action="store_true", help="skip the naive NumPy contender")
    b.add_argument("--no-peers", action="store_true", help="skip PyTorch even if installed")
    b.add_argument("--json", help="also write the numbers to this file")
    b.set_defaults(func=_bench)
    s = sub.add_parser("startup", help="cold compile and warm-cache start-up times")
    s.add_argument("--json")
    s.set_defaults(func=_startup)
    w = sub.add_parser("warmup", help="compile the common kernel signatures now")
    w.set_defaults(func=_warmup)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fastbn.capi build --outdir DIR``: build libfastbn.so and copy fastbn.h."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.capi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build DIR/libfastbn.so and DIR/fastbn.h")
    b.add_argument("--outdir", required=True, help="directory for libfastbn.so and fastbn.h")
    b.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    b.add_argument("--no-precompile", action="store_true",
                   help="do not compile the kernels now (the first C call will, once)")
    args = parser.parse_args(argv)
    try:
        import cffi  # noqa: F401
    except ImportError:
        print("fastbn.capi: building the C library needs cffi (pip install cffi)", file=sys.stderr)
        return 2
    from ._build import build, compile_line

    lib = build(args.outdir, verbose=args.verbose)
    print(f"built {lib}")
    if not args.no_precompile:
        import time

        from ._entries import compile_entries

        t0 = time.perf_counter()
        compile_entries()
        print(f"compiled (or found in the Numba cache) the C entry points in "
              f"{time.perf_counter() - t0:.1f} s")
    print("compile and link a program with:")
    print(f"  {compile_line(args.outdir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

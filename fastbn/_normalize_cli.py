"""``python -m fastbn normalize``: standardize or min-max scale a .npy file larger than memory.

Two streaming passes over the input (statistics, then transform), in chunks
of rows along axis 0 read with plain file reads (a memory map would keep
every page it touched resident), so memory stays at a few chunks whatever the
file size.  The output is written to a temporary file next to OUT and renamed
into place at the end: an interrupted run never leaves a half-written OUT, and
an OUT that existed survives a failed run.  When the feature axis is 0 every
chunk holds whole features, and one pass does both.
"""

import json
import os
import signal
import sys

import numpy as np

from . import _validate as v
from .scalers import MinMaxScaler, StandardScaler


class UsageError(Exception):
    """A bad command line or input file: one line on stderr, exit code 2."""


class NpyReader:
    """A C-ordered .npy file read in chunks of rows (axis 0), without a memory map."""

    def __init__(self, path):
        if not os.path.exists(path):
            raise UsageError(f"{path}: no such file")
        self.path = path
        self._file = open(path, "rb")
        try:
            version = np.lib.format.read_magic(self._file)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            self.shape, fortran, self.dtype = reader(self._file)
        except ValueError as exc:
            self._file.close()
            raise UsageError(f"{path}: not a .npy file ({exc})") from None
        if fortran and len(self.shape) > 1:
            self._file.close()
            raise UsageError(f"{path}: Fortran-ordered .npy files are not supported; "
                             "save the array in C order")
        if self.dtype.kind not in "biuf":
            self._file.close()
            raise UsageError(f"{path}: cannot normalize dtype {self.dtype} "
                             "(floating, integer or bool data only)")
        if len(self.shape) == 0:
            self._file.close()
            raise UsageError(f"{path}: a 0-d array has no feature axis")
        self.data_offset = self._file.tell()
        self.row_items = int(np.prod(self.shape[1:], dtype=np.int64))

    def rows_per_chunk(self, chunk_bytes):
        return max(1, chunk_bytes // max(1, self.row_items * self.dtype.itemsize))

    def chunks(self, rows):
        """Yield ``(first_row, array)`` for consecutive chunks of ``rows`` rows."""
        self._file.seek(self.data_offset)
        for start in range(0, self.shape[0], rows):
            n = min(rows, self.shape[0] - start)
            a = np.fromfile(self._file, dtype=self.dtype, count=n * self.row_items)
            if a.size != n * self.row_items:
                raise UsageError(f"{self.path}: file is shorter than its header says")
            yield start, a.reshape((n,) + tuple(self.shape[1:]))

    def close(self):
        self._file.close()


class AtomicNpyWriter:
    """Write a .npy file to a temporary name, renamed to ``path`` only by ``commit()``."""

    def __init__(self, path, shape, dtype):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        self.temp = os.path.join(directory, f".{os.path.basename(path)}.partial-{os.getpid()}")
        self._file = open(self.temp, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": tuple(shape)}
        try:
            np.lib.format.write_array_header_1_0(self._file, header)
        except ValueError:
            np.lib.format.write_array_header_2_0(self._file, header)

    def write(self, chunk):
        np.ascontiguousarray(chunk).tofile(self._file)

    def commit(self):
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp, self.path)

    def abort(self):
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self.temp):
            os.remove(self.temp)


def _progress(total, desc, quiet=False):
    if quiet:
        return _PlainProgress(total, desc, quiet=True)
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, leave=False)


class _PlainProgress:
    """A progress line on stderr when tqdm is not installed."""

    def __init__(self, total, desc, quiet=False):
        self.total, self.desc, self.done, self._last = max(total, 1), desc, 0, -1
        self.quiet = quiet

    def update(self, n):
        self.done += n
        if self.quiet:
            return
        pct = 100 * self.done // self.total
        if pct // 10 != self._last // 10:
            print(f"{self.desc}: {pct}%", file=sys.stderr)
            self._last = pct

    def close(self):
        pass


def _make_scaler(args, axis):
    if args.method == "standard":
        return StandardScaler(axis=axis)
    return MinMaxScaler(tuple(args.feature_range), axis=axis, clip=args.clip)


def _load_stats(path, args, axis, n_features):
    try:
        with open(path) as f:
            state = json.load(f)
        cls = StandardScaler if args.method == "standard" else MinMaxScaler
        scaler = cls.from_dict(state)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: cannot use these statistics ({exc})") from None
    if scaler.n_features_in_ != n_features:
        raise UsageError(f"{path}: statistics for {scaler.n_features_in_} features, but the input "
                         f"has {n_features} along axis {axis}")
    scaler.axis = axis
    return scaler


def _sliced(scaler, start, stop):
    """The fitted scaler restricted to features [start, stop) (axis 0 streaming)."""
    state = scaler.to_dict()
    for key in ("count", "mean", "m2", "min", "max"):
        if state[key] is not None:
            state[key] = state[key][start:stop]
    return type(scaler).from_dict(state)


def run(args):
    reader = NpyReader(args.input)
    try:
        ndim = len(reader.shape)
        try:
            axis = v.channel_axis(args.axis, ndim)
        except (TypeError, np.exceptions.AxisError):
            raise UsageError(f"--axis {args.axis} is out of range for an array of "
                             f"{ndim} dimensions {tuple(reader.shape)}") from None
        n_features = reader.shape[axis]
        out_dtype = v.output_dtype(reader.dtype)
        rows = reader.rows_per_chunk(int(args.chunk_mb * (1 << 20)))
        given = _load_stats(args.stats, args, axis, n_features) if args.stats else None
        writer = AtomicNpyWriter(args.output, reader.shape, out_dtype)
        try:
            scaler = _normalize(reader, writer, args, axis, rows, given)
            if args.save_stats:
                state = scaler.to_dict()
                state["params"]["axis"] = args.axis
                with open(args.save_stats, "w") as f:
                    json.dump(state, f)
            _check_stop()
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    finally:
        reader.close()
    return 0


def _normalize(reader, writer, args, axis, rows, given):
    total = reader.shape[0]
    if axis == 0:  # each chunk holds whole features: fit and transform it in one pass
        bar = _progress(total, "normalize", args.quiet)
        states = []
        for start, chunk in reader.chunks(rows):
            scaler = (_sliced(given, start, start + len(chunk)) if given
                      else _make_scaler(args, 0).fit(chunk))
            writer.write(scaler.transform(chunk))
            states.append(scaler.to_dict())
            bar.update(len(chunk))
            _check_stop()
        bar.close()
        merged = states[0]
        for s in states[1:]:
            for key in ("count", "mean", "m2", "min", "max"):
                if merged[key] is not None:
                    merged[key] = merged[key] + s[key]
        return type(given or _make_scaler(args, 0)).from_dict(merged)
    scaler = given
    if scaler is None:
        scaler = _make_scaler(args, axis)
        bar = _progress(total, "statistics", args.quiet)
        for _, chunk in reader.chunks(rows):
            scaler.partial_fit(chunk)
            bar.update(len(chunk))
            _check_stop()
        bar.close()
    bar = _progress(total, "transform", args.quiet)
    for _, chunk in reader.chunks(rows):
        writer.write(scaler.transform(chunk))
        bar.update(len(chunk))
        _check_stop()
    bar.close()
    return scaler


def add_parser(sub):
    p = sub.add_parser("normalize", help="standardize or min-max scale a .npy file, out of core",
                       description=__doc__.splitlines()[0])
    p.add_argument("input", metavar="IN.npy")
    p.add_argument("output", metavar="OUT.npy")
    p.add_argument("--method", choices=["standard", "minmax"], default="standard")
    p.add_argument("--axis", type=int, default=-1, help="the feature axis (default -1)")
    p.add_argument("--chunk-mb", type=float, default=64.0,
                   help="input read per chunk, in MiB (default 64)")
    p.add_argument("--feature-range", type=float, nargs=2, default=(0.0, 1.0),
                   metavar=("MIN", "MAX"), help="minmax: the target range (default 0 1)")
    p.add_argument("--clip", action="store_true", help="minmax: clip to the feature range")
    p.add_argument("--save-stats", metavar="FILE.json", help="write the fitted statistics here")
    p.add_argument("--stats", metavar="FILE.json",
                   help="use these statistics (from --save-stats) instead of fitting")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def main(args):
    if args.chunk_mb <= 0:
        print("fastbn normalize: error: --chunk-mb must be > 0", file=sys.stderr)
        return 2
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _Stop.requested = False
    for sig in previous:
        signal.signal(sig, _request_stop)
    try:
        return run(args)
    except UsageError as exc:
        print(f"fastbn normalize: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. a feature range with min >= max
        print(f"fastbn normalize: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastbn normalize: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# SIGINT and SIGTERM only set a flag, checked between chunks and before the output is
# committed: a KeyboardInterrupt raised straight from the handler can land in a
# finalizer, where Python prints and swallows it, and the run would go on to commit.
class _Stop:
    requested = False


def _request_stop(signum, frame):
    _Stop.requested = True


def _check_stop():
    if _Stop.requested:
        raise KeyboardInterrupt

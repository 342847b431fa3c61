"""``python -m fastbn normalize``: standardize or min-max scale a .npy file larger than memory.

Two streaming passes over the input (statistics, then transform), in chunks
of rows along axis 0 read with plain file reads (a memory map would keep
every page it touched resident), so memory stays at a few chunks whatever the
file size.  The output is written to a temporary file next to OUT and renamed
into place at the end: an interrupted run never leaves a half-written OUT, and
an OUT that existed survives a failed run.  When the feature axis is 0 every
chunk holds whole features, and one pass does both.
"""

import errno
import json
import math
import os
import signal
import stat
import sys
import tempfile
import time

import numpy as np

from . import _validate as v
from .scalers import MinMaxScaler, StandardScaler


class UsageError(Exception):
    """A bad command line or input file: one line on stderr, exit code 2."""


class NpyReader:
    """A C-ordered .npy file read in chunks of rows (axis 0), without a memory map."""

    def __init__(self, path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file") from None
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            # a pipe could block open() forever, and cannot be read twice
            raise UsageError(f"{path}: not a regular file (a pipe or a device); normalize "
                             "reads its input twice: save it to a file first")
        self.path = path
        self._file = open(path, "rb")
        try:
            self._read_header(st.st_size)
        except BaseException:
            self._file.close()
            raise

    def _read_header(self, size):
        path = self.path
        try:
            version = np.lib.format.read_magic(self._file)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            self.shape, fortran, self.dtype = reader(self._file)
        except (ValueError, SyntaxError, TypeError) as exc:
            raise UsageError(f"{path}: not a .npy file ({exc})") from None
        if any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise UsageError(f"{path}: its header has an invalid shape {self.shape}")
        if fortran and len(self.shape) > 1:
            raise UsageError(f"{path}: Fortran-ordered .npy files are not supported; "
                             "save the array in C order")
        if self.dtype.kind not in "biuf":
            raise UsageError(f"{path}: cannot normalize dtype {self.dtype} "
                             "(floating, integer or bool data only)")
        if len(self.shape) == 0:
            raise UsageError(f"{path}: a 0-d array has no feature axis")
        self.data_offset = self._file.tell()
        self.row_items = math.prod(self.shape[1:])
        expected = self.data_offset + math.prod(self.shape) * self.dtype.itemsize
        if size != expected:
            raise UsageError(f"{path}: the file has {size} bytes, its header says {expected}")

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


PARTIAL = ".partial-"


def _partial_prefix(path):
    return f".{os.path.basename(path)}{PARTIAL}"


class _FileNextTo:
    """A new temporary file next to ``path``, renamed to ``path`` only by ``commit()``.

    It is created with ``O_CREAT | O_EXCL`` under a random name (``tempfile.mkstemp``):
    a file or symbolic link planted in the directory is never followed or overwritten.
    Its name carries the writer's process id, so a later run removes what a killed run
    left (``remove_stale_partials``).
    """

    def __init__(self, path, mode):
        self.path = path
        fd, self.temp = tempfile.mkstemp(prefix=f"{_partial_prefix(path)}{os.getpid()}-",
                                         dir=os.path.dirname(os.path.abspath(path)))
        self._file = os.fdopen(fd, mode)

    def close(self):
        """Flush the data to disk and close the file (before ``commit()``)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def commit(self):
        self.close()
        os.replace(self.temp, self.path)

    def abort(self):
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:  # the buffered tail could not be written either (disk full)
                pass
        try:
            os.remove(self.temp)
        except FileNotFoundError:
            pass


class AtomicNpyWriter(_FileNextTo):
    """A .npy file written to a temporary file next to ``path`` (``_FileNextTo``)."""

    def __init__(self, path, shape, dtype):
        super().__init__(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": tuple(shape)}
        try:
            np.lib.format.write_array_header_1_0(self._file, header)
        except ValueError:
            np.lib.format.write_array_header_2_0(self._file, header)

    def write(self, chunk):
        np.ascontiguousarray(chunk).tofile(self._file)


def remove_stale_partials(path):
    """Remove this user's temporary files of ``path`` left by runs that are no longer alive
    (SIGKILL, a power cut).  Returns the paths removed."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _partial_prefix(path)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        full = os.path.join(directory, name)
        try:
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.remove(full)
                removed.append(full)
        except OSError:
            pass
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        scaler = StandardScaler(axis=axis)
    else:
        scaler = MinMaxScaler(tuple(args.feature_range), axis=axis, clip=args.clip)
    scaler._check_params()  # before any output or progress bar
    return scaler


def _load_stats(path, args, axis, n_features):
    try:
        with open(path) as f:
            state = json.load(f)
        cls = StandardScaler if args.method == "standard" else MinMaxScaler
        scaler = cls.from_dict(state)
    except RecursionError:
        raise UsageError(f"{path}: cannot use these statistics (nested too deeply)") from None
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


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _check_output_path(path, name):
    if os.path.isdir(path):
        raise UsageError(f"{path}: {name} is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{path}: {name}'s directory does not exist")


class _StatsWriter(_FileNextTo):
    """``--save-stats``: created before the work starts (so that a path that cannot be
    written fails in a second, not after the whole run), written and renamed at the end."""

    def __init__(self, path):
        super().__init__(path, "w")

    def write(self, state):
        json.dump(state, self._file)
        self.close()


def run(args):
    for path, name in ((args.output, "OUT"),) + (((args.save_stats, "--save-stats"),)
                                                 if args.save_stats else ()):
        _check_output_path(path, name)
    if args.save_stats and (_same_file(args.save_stats, args.input)
                            or _same_file(args.save_stats, args.output)):
        raise UsageError(f"--save-stats {args.save_stats} is IN or OUT: it would overwrite it")
    started = time.perf_counter()
    reader = NpyReader(args.input)
    writer = stats_writer = None
    try:
        ndim = len(reader.shape)
        out_shape = tuple(reader.shape)
        try:
            axis = v.channel_axis(args.axis, ndim)
        except (TypeError, np.exceptions.AxisError):
            raise UsageError(f"--axis {args.axis} is out of range for an array of "
                             f"{ndim} dimensions {tuple(reader.shape)}") from None
        if ndim == 1:  # one feature, as fastbn.standardize and minmax_scale take 1-D input
            reader.shape, axis = out_shape + (1,), 1
        n_features = reader.shape[axis]
        if v.channel_count(reader.shape, axis) == 0 and n_features and not args.stats:
            raise UsageError(f"{args.input}: 0 samples along the axes other than {axis} "
                             f"(shape {tuple(reader.shape)}): nothing to fit")
        out_dtype = v.output_dtype(reader.dtype)
        rows = reader.rows_per_chunk(int(args.chunk_mb * (1 << 20)))
        given = _load_stats(args.stats, args, axis, n_features) if args.stats else None
        for path in (args.output, args.save_stats):
            if path:
                remove_stale_partials(path)
        if args.save_stats:
            stats_writer = _StatsWriter(args.save_stats)
        writer = AtomicNpyWriter(args.output, out_shape, out_dtype)
        scaler = _normalize(reader, writer, args, axis, rows, given)
        if stats_writer:
            state = scaler.to_dict()
            state["params"]["axis"] = args.axis
            stats_writer.write(state)
        _check_stop()
        writer.commit()
        if stats_writer:
            stats_writer.commit()
        if not args.quiet:
            print(_summary(args, reader, out_dtype, axis, n_features, given,
                           time.perf_counter() - started))
    except BaseException:
        for w in (writer, stats_writer):
            if w is not None:
                w.abort()
        raise
    finally:
        reader.close()
    return 0


def _summary(args, reader, out_dtype, axis, n_features, given, seconds):
    """The one line a successful run prints: what was done, how fast, and where the
    statistics went."""
    items = math.prod(reader.shape)
    reads = 1 if axis == 0 or given is not None else 2  # a fitting pass, then the transform
    moved = items * (reads * reader.dtype.itemsize + np.dtype(out_dtype).itemsize)
    if given is not None:
        stats = f"statistics from {args.stats}"
    elif args.save_stats:
        stats = f"statistics saved to {args.save_stats}"
    else:
        stats = "statistics not saved (--save-stats FILE.json keeps them)"
    rate = f"{moved / seconds / 1e9:.2f} GB/s" if seconds > 0 else "- GB/s"
    return (f"fastbn normalize: {args.output}: {reader.shape[0]:,} rows x {n_features:,} "
            f"features, {args.method}, {seconds:.2f} s, {rate} (read {reads}x, written "
            f"once); {stats}")


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
        if not states:  # no features: an empty output
            return given or _make_scaler(args, 0).fit(np.empty(reader.shape, reader.dtype))
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
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no summary line")
    p.set_defaults(func=main)
    return p


_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                 if hasattr(signal, name))


def main(args):
    if not (math.isfinite(args.chunk_mb) and args.chunk_mb > 0):
        print(f"fastbn normalize: error: --chunk-mb must be a finite number > 0, got "
              f"{args.chunk_mb}", file=sys.stderr)
        return 2
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    _Stop.signum = None
    for sig in previous:
        signal.signal(sig, _request_stop)
    # past `ulimit -f` a write then fails with EFBIG instead of killing the process
    xfsz = getattr(signal, "SIGXFSZ", None)
    previous_xfsz = signal.signal(xfsz, signal.SIG_IGN) if xfsz is not None else None
    try:
        return run(args)
    except UsageError as exc:
        return _error(exc)
    except ValueError as exc:  # e.g. a feature range with min >= max
        return _error(exc)
    except OSError as exc:
        return _error(_os_error(exc))
    except _Stopped as stop:
        print(f"fastbn normalize: interrupted by {signal.Signals(stop.signum).name}; no output "
              "written", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("fastbn normalize: interrupted; no output written", file=sys.stderr)
        return 130
    except MemoryError:
        return _error("out of memory: try a smaller --chunk-mb")
    except Exception as exc:  # never a traceback: one line and exit 2
        return _error(f"{type(exc).__name__}: {exc}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if xfsz is not None:
            signal.signal(xfsz, previous_xfsz)


def _error(message):
    print(f"fastbn normalize: error: {message}", file=sys.stderr)
    return 2


def _os_error(exc):
    reasons = {errno.ENOSPC: "no space left on the device",
               errno.EFBIG: "file too large (a file size limit, ulimit -f)",
               errno.EDQUOT: "disk quota exceeded"}
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    return f"{exc.filename}: {reason}" if exc.filename else reason


# SIGINT, SIGTERM and SIGHUP only set a flag, checked between chunks and before the output
# is committed: an exception raised straight from the handler can land in a finalizer,
# where Python prints and swallows it, and the run would go on to commit.  No call here
# blocks for long (the input is a regular file), so a run stops within a chunk.
class _Stop:
    signum = None


class _Stopped(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _request_stop(signum, frame):
    _Stop.signum = signum


def _check_stop():
    if _Stop.signum is not None:
        raise _Stopped(_Stop.signum)

"""What fastbn's kernels take from the machine they run on: the last-level cache size,
and from it the size above which outputs are written with streaming stores.

Imports nothing heavy: ``_cache`` digests the threshold (it is compiled into the
kernels), before Numba is imported.
"""

import os

STREAM_ENV = "FASTBN_STREAM_MIN_BYTES"
STREAM_FLOOR = 4 << 20
STREAM_CEILING = 64 << 20


def last_level_cache_bytes():
    """Size of the largest CPU cache (Linux sysfs), or None where it cannot be read."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            continue
    return max(sizes, default=None)


def stream_min_bytes():
    """Outputs of at least this many bytes are written with non-temporal stores.

    Below it an output is likely to be read again from cache (the next layer of a
    network, the caller's next step), so it is stored through the cache; above it the
    output would evict the cache anyway, and a streaming store saves the
    read-for-ownership.  Half the last-level cache, within [4 MiB, 64 MiB]; 4 MiB where
    the cache size cannot be read.  ``FASTBN_STREAM_MIN_BYTES`` (bytes) overrides it
    (the tests pin it, so that their inputs exercise both kinds of store anywhere).
    """
    text = os.environ.get(STREAM_ENV, "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{STREAM_ENV} must be a positive number of bytes, got {text!r}")
        return value
    llc = last_level_cache_bytes()
    if not llc:
        return STREAM_FLOOR
    return min(STREAM_CEILING, max(STREAM_FLOOR, llc // 2))

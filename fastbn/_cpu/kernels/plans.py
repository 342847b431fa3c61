"""The plans' constants and the small kernels that size tasks: channels per group,
parts per channel, blocks of rows, whether the pipelined path applies, and
``MIN_RUN``, the run length below which a channel is reduced row-wise.

Reductions are planned for ``PLAN_THREADS`` whatever the real thread count, so
that results have the same bits under any thread count or limit (a part or block
boundary changes the order of a sum); the tasks are spread over the threads there
are.  Element-wise passes are planned for the real count.
"""

from ..._jit import kernel
from .codegen import _streams

# A channel whose contiguous runs are shorter than this is reduced row-wise over a
# (rows, C * inner) view instead: short runs defeat vectorization.  The backend passes
# its copy (``backend.MIN_RUN``, which tests lower to force a path) on every call; the
# C entry points compile this value in.
MIN_RUN = 64

PLAN_THREADS = 16

# Channel path: a group of neighbouring channels is read as one long stream, then
# re-read from cache to normalize; keep a group within this many bytes of input,
# and this many channels.
GROUP_BYTES = 8 << 20
MAX_GROUP = 16


# Below this many values, a part of a channel is not worth its own task.
MIN_PART_VALUES = 16384


# Column path: values per chunk of rows (statistics are merged once per chunk;
# the first chunk is read twice, from L2).
CHUNK_VALUES = 131072


@kernel()
def channel_plan(outer, channels, inner, bytes_per_value, nthreads):
    """``(group, nparts)`` for the channel path: channels per task, parts per channel.

    Fused (``nparts == 1``) when there are enough groups to keep every thread
    busy; otherwise channels are also split along ``outer`` and normalized in a
    second pass.
    """
    channel_bytes = max(1, outer * inner * bytes_per_value)
    group = max(1, min(MAX_GROUP, channels // (2 * nthreads), GROUP_BYTES // channel_bytes))
    ngroups = -(-channels // group)
    if ngroups >= 2 * nthreads or nthreads == 1 or ngroups == 0:
        return group, 1
    nparts = min(-(-2 * nthreads // ngroups), outer, max(1, outer * inner // MIN_PART_VALUES))
    return group, max(1, nparts)


# Pipelined channel path: runs of at least this many bytes (a shorter run costs
# more in set-up than the overlap gains), two channels per thread within GROUP_BYTES.
PIPE_MIN_RUN_BYTES = 2048


@kernel()
def pipelined(outer, channels, inner, bytes_per_value, nthreads, out):
    """Whether the fused channel path runs pipelined (``pipelined_forward/backward``, one
    chain of at least two channels per thread) rather than by groups."""
    channel_bytes = outer * inner * bytes_per_value
    return (channels >= 2 * nthreads and outer >= 2
            and inner * out.itemsize >= PIPE_MIN_RUN_BYTES
            and 2 * channel_bytes <= GROUP_BYTES and _streams(out))


@kernel()
def column_blocks(rows, nthreads):
    """Tasks of contiguous rows for an element-wise pass of the column path."""
    return max(1, min(nthreads, rows))


# Column path reductions: each block of rows keeps float64 partials per column (two, and
# two more while it reduces), as many bytes as 8 rows of float32 values; a block of
# fewer rows than this spends more on its partials than on its values.  Few-row inputs
# (contiguous (32, 256, 7, 7): 32 rows of 12544 columns) measured 2-3x slower in
# 16 blocks of 2 rows than in one block.
COLUMN_BLOCK_ROWS = 32


@kernel()
def column_stat_blocks(rows):
    """Blocks of rows for the column path's reductions: PLAN_THREADS, fewer where a block
    would have under COLUMN_BLOCK_ROWS rows (the shape's alone, never the thread count)."""
    return max(1, min(PLAN_THREADS, rows // COLUMN_BLOCK_ROWS))


# Feature statistics (scalers): blocks of rows whose count follows the data's size, never
# the thread count, so that the bits do not depend on it; each block's partial statistics
# take (blocks, width) arrays, kept under FEATURE_PARTS_VALUES values.
FEATURE_BLOCK_VALUES = 1 << 18


FEATURE_PARTS_VALUES = 1 << 20


@kernel()
def feature_blocks(rows, width):
    by_size = rows * width // FEATURE_BLOCK_VALUES
    return max(1, min(rows, by_size, FEATURE_PARTS_VALUES // max(width, 1)))


@kernel()
def chunk_rows(width):
    return max(4, CHUNK_VALUES // max(width, 1))


@kernel()
def run_blocks(outer, channels, nthreads):
    """Tasks for an element-wise pass over the (outer, C) runs: a few per thread."""
    return max(1, min(4 * nthreads, outer * channels))

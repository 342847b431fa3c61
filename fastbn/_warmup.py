"""Ahead-of-time compilation of the common kernel signatures."""

import time

import numpy as np


def warmup(dtypes=(np.float32, np.float64)):
    """Compile, or load from Numba's disk cache, every CPU kernel for ``dtypes``.

    Runs every kernel once on a tiny input (channel and column paths, fused and
    split, forward, inference and backward), then the public API once.
    The first call in a fresh environment compiles (tens of seconds); later
    processes load the cached machine code in well under a second.  The cache
    directories of other versions of fastbn's code (``kernels-<digest>`` next to
    this version's, see ``fastbn._cache``) are removed.

    Parameters
    ----------
    dtypes : sequence of dtypes, default (float32, float64)
        float16 uses the float32 kernels.

    Returns
    -------
    float
        Seconds spent.
    """
    from . import _cache, api
    from ._dispatch import host_backend

    backend = host_backend()

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        backend.compile_kernels(dtype)
        x = rng.standard_normal((4, 3, 64)).astype(dtype)
        y, mean, invstd = api.batch_norm_forward(x)
        api.batch_norm_backward(y, x, mean, invstd)
    _cache.prune_kernel_caches()
    return time.perf_counter() - start

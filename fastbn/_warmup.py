"""Ahead-of-time compilation of the common kernel signatures."""

import time

import numpy as np


def warmup(dtypes=(np.float32, np.float64)):
    """Compile, or load from Numba's disk cache, every CPU kernel for ``dtypes``.

    Runs each code path once on a tiny input: the channel path (fused and split
    in parts), the column path (channels-last, (N, C)), inference and backward.
    The first call in a fresh environment compiles (tens of seconds); later
    processes load the cached machine code in well under a second.

    Parameters
    ----------
    dtypes : sequence of dtypes, default (float32, float64)
        float16 uses the float32 kernels.

    Returns
    -------
    float
        Seconds spent.
    """
    from . import api

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        for shape, axis in (((2, 16, 64), 1), ((4, 1, 4096), 1), ((8, 3), 1), ((2, 4, 4, 3), -1)):
            x = rng.standard_normal(shape).astype(dtype)
            y, mean, invstd = api.batch_norm_forward(x, axis=axis)
            api.batch_norm_backward(y, x, mean, invstd, axis=axis)
            api.batch_norm_inference(x, mean, 1.0 / invstd**2, axis=axis)
    return time.perf_counter() - start

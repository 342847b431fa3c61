"""Run under ``mpirun -n K``: sync batch norm against single-process batch norm on the
concatenated batch (forward, running statistics, backward).  Prints "rank R ok"."""

import sys

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.distributed import MPICommunicator, sync_batch_norm_backward, sync_batch_norm_forward


def check(comm, shape, axis, dtype, splits):
    """Every rank builds the same global batch, takes its slice along axis 0."""
    rng = np.random.default_rng(42)
    x = rng.normal(1e3, 3.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    c = shape[axis]
    w, b = rng.uniform(0.5, 2, c), rng.normal(size=c)
    bounds = np.concatenate([[0], np.cumsum(splits)])
    lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y, mean, invstd = sync_batch_norm_forward(x[lo:hi], w, b, comm=comm, axis=axis,
                                              running_mean=rm, running_var=rv, momentum=0.3)
    rm1, rv1 = np.zeros(c, dtype), np.ones(c, dtype)
    y1, mean1, invstd1 = fastbn.batch_norm_forward(x, w, b, axis=axis, running_mean=rm1,
                                                   running_var=rv1, momentum=0.3)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, y1[lo:hi], **tol)
    np.testing.assert_allclose(mean, mean1, rtol=1e-12 if dtype == np.float64 else 1e-6)
    np.testing.assert_allclose(invstd, invstd1, **tol)
    np.testing.assert_allclose(rm, rm1, **tol)
    np.testing.assert_allclose(rv, rv1, **tol)
    dx, dw, db = sync_batch_norm_backward(dy[lo:hi], x[lo:hi], mean, invstd, w, comm=comm,
                                          axis=axis)
    dx1, dw1, db1 = fastbn.batch_norm_backward(dy, x, mean1, invstd1, w, axis=axis)
    np.testing.assert_allclose(dx, dx1[lo:hi], **tol)
    gtol = dict(rtol=1e-4, atol=1e-3) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(dw, dw1, **gtol)
    np.testing.assert_allclose(db, db1, **gtol)


def main():
    comm = MPICommunicator(MPI.COMM_WORLD)
    k = comm.size
    # unequal slices; with 3 ranks the middle one is empty
    uneven = {2: [7, 13], 3: [9, 0, 11]}[k]
    for dtype in (np.float32, np.float64):
        check(comm, (20, 5, 70), 1, dtype, uneven)         # NCHW-like, channel path
        check(comm, (20, 6), -1, dtype, uneven)            # (N, C), column path
        check(comm, (20, 3, 4, 5), 1, dtype, uneven)       # short runs
    # a global batch of one value per channel fails on every rank
    try:
        sync_batch_norm_forward(np.ones((1 if comm.rank == 0 else 0, 3)), comm=comm)
    except ValueError as exc:
        assert "more than 1 value" in str(exc)
    else:
        raise AssertionError("a 1-value global batch was accepted")
    # ranks with different channel counts: the same ValueError on every rank, and the
    # running statistics untouched
    channels = 4 if comm.rank == 0 else 5
    rm = np.zeros(channels)
    for call in (lambda: sync_batch_norm_forward(np.ones((6, channels)), comm=comm,
                                                  running_mean=rm),
                 lambda: sync_batch_norm_backward(np.ones((6, channels)), np.ones((6, channels)),
                                                  np.zeros(channels), np.ones(channels),
                                                  comm=comm)):
        try:
            call()
        except ValueError as exc:
            assert "ranks disagree on the number of channels: rank 0: 4, rank 1: 5" in str(exc), exc
        else:
            raise AssertionError("ranks with different channel counts were accepted")
    assert not rm.any()
    print(f"rank {comm.rank} ok", flush=True)


if __name__ == "__main__":
    sys.exit(main())

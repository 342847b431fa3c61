"""Synchronized batch norm over MPI against one process on the whole batch.

    mpirun -n 2 python bench/sync_bn_bench.py [--batch 64] [--repeats 7]

Every rank takes an equal slice of an NCHW (batch, 64, 56, 56) float32 batch
and runs the synchronized forward and backward; rank 0 then times plain
fastbn on the whole batch alone (with all its threads).  Medians.
"""

import argparse
import statistics
import time

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.distributed import MPICommunicator, sync_batch_norm_backward, sync_batch_norm_forward


def _median(fn, repeats, comm=None):
    times = []
    for _ in range(repeats + 1):
        if comm is not None:
            comm.Barrier()
        t0 = time.perf_counter()
        fn()
        if comm is not None:
            comm.Barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    comm = MPICommunicator(world)
    shape = (args.batch, 64, 56, 56)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    dy = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    lo, hi = comm.rank * args.batch // comm.size, (comm.rank + 1) * args.batch // comm.size
    xs, dys = x[lo:hi].copy(), dy[lo:hi].copy()
    y, dx = np.empty_like(xs), np.empty_like(xs)

    def step():
        _, mean, invstd = sync_batch_norm_forward(xs, comm=comm, out=y)
        sync_batch_norm_backward(dys, xs, mean, invstd, comm=comm, out=dx)

    sync = _median(step, args.repeats, world)
    if comm.rank == 0:
        yy, dxx = np.empty_like(x), np.empty_like(x)

        def single():
            _, mean, invstd = fastbn.batch_norm_forward(x, out=yy)
            fastbn.batch_norm_backward(dy, x, mean, invstd, out=dxx)

        alone = _median(single, args.repeats)
        print(f"{comm.size} ranks, NCHW {shape} float32, forward + backward: "
              f"synchronized {sync * 1e3:.1f} ms per step; one process on the whole batch "
              f"{alone * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()

"""Synchronized batch normalization across data-parallel workers (PyTorch's SyncBatchNorm).

Each rank holds a slice of the global batch.  The forward gathers every rank's
per-channel ``(count, mean, M2)`` (float64, from fastbn's kernels) and merges
them with Chan's formula, so every rank normalizes with the statistics of the
whole batch, whatever the split (unequal batches and empty ranks included);
the backward all-reduces ``(sum(dy), sum(dy * (x - mean)))`` and the count.
The result on each rank equals single-process batch norm on the concatenated
batch, restricted to that rank's slice.

Communication goes through a small interface, :class:`Communicator`
(``allgather`` and ``allreduce_sum`` of float64 arrays); :class:`MPICommunicator`
(mpi4py, extra ``fastbn[mpi]``) is the reference backend and
:class:`SingleProcess` the trivial one.
"""

import numpy as np

from . import _moments
from . import _validate as v
from ._dispatch import backend_for

__all__ = ["Communicator", "MPICommunicator", "SingleProcess", "sync_batch_norm_forward",
           "sync_batch_norm_backward"]


class Communicator:
    """What synchronized batch norm needs from a group of ``size`` processes.

    Subclass it for another transport (NCCL, Gloo, a Dask actor, ...): every rank
    must call the same methods in the same order, with arrays of the same shape.
    """

    rank = 0
    size = 1

    def allgather(self, local):
        """Every rank's ``local`` (float64 1-D array), stacked: shape ``(size, len(local))``."""
        raise NotImplementedError

    def allreduce_sum(self, local):
        """The element-wise sum of every rank's ``local`` (float64 1-D array)."""
        raise NotImplementedError


class SingleProcess(Communicator):
    """A group of one: sync batch norm is then plain batch norm."""

    def allgather(self, local):
        return np.asarray(local, dtype=np.float64)[None, :]

    def allreduce_sum(self, local):
        return np.array(local, dtype=np.float64)


class MPICommunicator(Communicator):
    """An MPI communicator through mpi4py (``comm`` defaults to ``MPI.COMM_WORLD``)."""

    def __init__(self, comm=None):
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allgather(self, local):
        local = np.ascontiguousarray(local, dtype=np.float64)
        result = np.empty((self.size, local.size))
        self.comm.Allgather(local, result)
        return result

    def allreduce_sum(self, local):
        local = np.ascontiguousarray(local, dtype=np.float64)
        result = np.empty_like(local)
        self.comm.Allreduce(local, result)  # MPI.SUM is the default op
        return result


def _local_moments(backend, xa, ax, channels):
    """This rank's (count, mean, M2) per channel, float64; zeros for an empty slice."""
    n = v.channel_count(xa.shape, ax)
    if n == 0 or channels == 0:
        return 0.0, np.zeros(channels), np.zeros(channels)
    count, mean, m2 = backend.moments(xa, ax, v.output_dtype(xa.dtype))
    return float(count), mean, m2


def sync_batch_norm_forward(x, weight=None, bias=None, *, comm, axis=1, eps=1e-5,
                            running_mean=None, running_var=None, momentum=0.1, out=None):
    """Training-mode batch norm with statistics over every rank's batch.

    Parameters are those of :func:`fastbn.batch_norm_forward`, plus ``comm``, a
    :class:`Communicator`.  Every rank must call it with the same channels and
    arguments.  Returns ``(y, mean, invstd)`` of the global batch (``y`` for
    this rank's slice); running statistics are updated with the global mean and
    unbiased variance.  A global batch of fewer than 2 values per channel raises
    ``ValueError`` on every rank.
    """
    backend = _host_backend(x=x, weight=weight, bias=bias, running_mean=running_mean,
                            running_var=running_var, out=out)
    a = v.forward_args(x, weight, bias, axis, eps, running_mean, running_var, momentum, out)
    xa, ax, channels = a.x, a.axis, a.channels

    _agree_on_channels(comm, channels)
    n, mean, m2 = _local_moments(backend, xa, ax, channels)
    gathered = comm.allgather(np.concatenate([[n], mean, m2]))
    counts = gathered[:, :1]
    total, mean, m2 = _moments.merge_moments(np.broadcast_to(counts, (comm.size, channels)),
                                             gathered[:, 1:1 + channels],
                                             gathered[:, 1 + channels:], axis=0)
    total = float(total[0]) if channels else float(counts.sum())
    v.require_global_batch(total)
    var = m2 / total
    invstd = _moments.invstd(var, a.eps)
    if xa.size:
        y = backend.affine(xa, ax, mean, invstd * a.weight, a.bias, a.out, a.out_dtype)
    else:
        y = a.out if a.out is not None else np.empty(xa.shape, a.out_dtype)
    _moments.update_running_stats(a.running_mean, a.running_var, mean, var, total, a.momentum)
    return y, mean.astype(a.stats_dtype), invstd.astype(a.stats_dtype)


def sync_batch_norm_backward(dy, x, mean, invstd, weight=None, *, comm, axis=1, out=None):
    """Gradients of :func:`sync_batch_norm_forward`.

    ``mean`` and ``invstd`` are the global ones the forward returned.  Returns
    ``(dx, dweight, dbias)``: ``dx`` for this rank's slice, and the weight and
    bias gradients of the global batch (the sum over ranks), the same on
    every rank.
    """
    backend = _host_backend(dy=dy, x=x, mean=mean, invstd=invstd, weight=weight, out=out)
    a = v.backward_args(dy, x, mean, invstd, weight, axis, out)
    dya, xa, ax, channels, mu, inv = a.dy, a.x, a.axis, a.channels, a.mean, a.invstd

    _agree_on_channels(comm, channels)
    n = v.channel_count(xa.shape, ax)
    if n and channels:
        sum_dy, sum_dy_xmu = backend.grad_sums(dya, xa, ax, mu, a.out_dtype)
    else:
        sum_dy, sum_dy_xmu = np.zeros(channels), np.zeros(channels)
    reduced = comm.allreduce_sum(np.concatenate([[float(n)], sum_dy, sum_dy_xmu]))
    total = reduced[0]
    sum_dy, sum_dy_xmu = reduced[1:1 + channels], reduced[1 + channels:]
    v.require_global_batch(total)
    dx = backend.dx_from_sums(dya, xa, ax, mu, inv, a.weight, sum_dy, sum_dy_xmu, total, a.out,
                              a.out_dtype)
    return dx, (sum_dy_xmu * inv).astype(a.stats_dtype), sum_dy.astype(a.stats_dtype)


def _agree_on_channels(comm, channels):
    """Exchange every rank's channel count (one value each, so the exchange itself cannot
    mismatch) and raise the same ``ValueError`` on every rank when they differ: exchanging
    statistics of different lengths truncates on one rank and reads garbage on another."""
    counts = comm.allgather(np.array([channels], dtype=np.float64))[:, 0].astype(np.int64)
    if np.any(counts != counts[0]):
        raise ValueError("ranks disagree on the number of channels: "
                         f"{', '.join(f'rank {r}: {c}' for r, c in enumerate(counts))}")


def _host_backend(**arrays):
    backend = backend_for(**arrays)
    if backend.device:
        raise TypeError("synchronized batch norm computes on the host: pass NumPy arrays "
                        "(use a CUDA-aware communicator with the CUDA functions instead)")
    return backend

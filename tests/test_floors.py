"""The benchmark's floors do the work they stand for: a floor that skipped its
traffic would flatter every ratio in the tables."""

import numpy as np
import pytest

import fastbn.__main__ as cli
from fastbn._cpu import floors

# (outer, C, inner): a small case and one whose outputs take the streaming stores
SHAPES = [(3, 5, 7), (4, 16, 40_000), (3, 8, 70_001)]


@pytest.fixture(params=SHAPES, ids=["small", "streamed", "streamed-unaligned-runs"])
def arrays(request):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(request.param, dtype=np.float32)
    dy = rng.standard_normal(request.param, dtype=np.float32)
    return x, dy, np.full_like(x, np.nan)


def test_flat_floors(arrays):
    x, dy, dst = arrays
    floors.copy(x, dst)
    np.testing.assert_array_equal(dst, x)
    floors.add(x, dy, dst)
    np.testing.assert_array_equal(dst, x + dy)
    assert floors.read(x) == pytest.approx(x.sum(dtype=np.float64), rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("schedule", ["grouped", "pipelined", "row_tiled"])
def test_channel_path_floors(arrays, schedule):
    x, dy, dst = arrays
    total = getattr(floors, f"{schedule}_read_copy")(x, dst)
    np.testing.assert_array_equal(dst, x)
    assert total == pytest.approx(x.sum(dtype=np.float64), rel=1e-9, abs=1e-6)
    dst[...] = np.nan
    total = getattr(floors, f"{schedule}_read2_add")(x, dy, dst)
    np.testing.assert_array_equal(dst, x + dy)
    # x + dy is added in float32 before the float64 sum
    expected = x.sum(dtype=np.float64) + dy.sum(dtype=np.float64)
    size = np.abs(x).sum(dtype=np.float64) + np.abs(dy).sum(dtype=np.float64)
    assert total == pytest.approx(expected, rel=0, abs=1e-6 * size)


def test_floors_command(capsys):
    cli.main(["floors", "--quick", "--case", "small", "--repeats", "3"])
    printed = capsys.readouterr().out
    assert "memory floor: parallel copy" in printed
    assert "read + copy, groups of" in printed and "fastbn backward (out=)" in printed
    assert "pipelined over tiles of" in printed


def test_pipelined_floors_with_the_epilogues_operands(arrays):
    """The fused epilogues' pipelined floors: ``y = x + residual`` (the forward with a
    residual), and ``x + dy`` with ``y`` read and copied (the backward through ReLU that
    writes ``dresidual``)."""
    x, dy, dst = arrays
    residual = np.cos(x)
    total = floors.pipelined_read_copy(x, dst, residual)
    np.testing.assert_array_equal(dst, x + residual)
    assert total == pytest.approx(x.sum(dtype=np.float64), rel=1e-9, abs=1e-6)
    y, dres = np.sin(x), floors.empty_aligned_like(dst)
    dres[...] = np.nan
    dst[...] = np.nan
    total = floors.pipelined_read2_add(x, dy, dst, c3=y, out3_c=dres)
    np.testing.assert_array_equal(dst, x + dy)
    np.testing.assert_array_equal(dres, y)
    expected = sum(a.sum(dtype=np.float64) for a in (x, dy, y))
    size = sum(np.abs(a).sum(dtype=np.float64) for a in (x, dy, y))
    assert total == pytest.approx(expected, rel=0, abs=1e-6 * size)
    misaligned = np.empty(x.size + 1, x.dtype)
    misaligned = misaligned[1:] if (misaligned.ctypes.data - dst.ctypes.data) % 64 == 0 \
        else misaligned[:-1]
    with pytest.raises(ValueError, match="offset within a cache line"):
        floors.pipelined_read2_add(x, dy, dst, c3=y, out3_c=misaligned.reshape(x.shape))

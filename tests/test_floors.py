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

"""Training-mode forward against the float64 reference, over layouts, axes and dtypes."""

import numpy as np
import pytest

import fastbn
import reference as ref
from helpers import LAYOUTS, assert_output, assert_stats, check_forward, make, with_layout

SHAPES = {2: (37, 5), 3: (6, 4, 70), 4: (5, 3, 9, 8), 5: (3, 4, 2, 5, 7)}
DTYPES = (np.float16, np.float32, np.float64, np.int32)


@pytest.mark.parametrize("ndim", sorted(SHAPES))
@pytest.mark.parametrize("axis", [1, -1, "middle"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_matches_reference(rng, ndim, axis, dtype, layout, kernel_plan):
    shape = SHAPES[ndim]
    if axis == "middle":
        axis = ndim // 2
    x = with_layout(make(rng, shape, dtype, offset=3.0, scale=2.0), layout, axis)
    channels = shape[axis]
    weight = rng.uniform(0.5, 2.0, channels)
    bias = rng.normal(size=channels)
    check_forward(x, weight, bias, axis=axis)


@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_optional_affine(rng, dtype, with_weight, with_bias):
    x = make(rng, (8, 6, 5, 5), dtype)
    w = rng.uniform(0.5, 2, 6).astype(np.float32) if with_weight else None
    b = rng.normal(size=6).astype(np.float32) if with_bias else None
    check_forward(x, w, b)


@pytest.mark.parametrize("shape,axis", [
    ((16, 32, 80), 1),      # channel path, one task per channel: fused normalization
    ((4, 2, 64, 72), 1),    # few channels: channels split in parts, then one affine pass
    ((1, 1, 30000), 1),     # a single channel in a single run
    ((3000, 24), 1),        # (N, C): column path
    ((20, 7, 7, 40), -1),   # channels-last: column path
    ((50, 6, 9), 1),        # short runs (inner 9): column path
    ((10, 3, 4097), 1),     # runs just over a chunk
    ((32, 12, 64), 1),      # short runs of whole lines, output in cache: by groups
    ((9, 5, 67), 1),        # ... with a scalar tail per run
    ((32, 12, 128), 1),     # float32 runs of 512 bytes: fused short-run path
    ((9, 5, 131), 1),       # ... with a scalar tail per run
    ((150, 3, 128), 1),     # ... over several batches of rows (merged)
    # column path over several chunks of rows (statistics merged between chunks),
    # each accumulator shape: a 64-column register tile, 32-column tiles plus
    # leftover columns, rows wider than a tile, and rows narrower than one
    ((5000, 64), -1),
    ((7000, 40), -1),
    ((1100, 260), -1),
    ((50000, 3), -1),
])
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_forward_every_kernel_path(rng, shape, axis, dtype, kernel_plan):
    x = make(rng, shape, dtype, offset=-2.0, scale=0.5)
    channels = shape[axis]
    check_forward(x, rng.uniform(0.5, 2, channels), rng.normal(size=channels), axis=axis)


@pytest.mark.parametrize("threads", [1, 2])
def test_forward_independent_of_thread_count(rng, threads):
    import numba

    x = make(rng, (4, 3, 64, 80), np.float32, offset=5.0)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        check_forward(x)
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
@pytest.mark.parametrize("layout", ("c", "fortran", "strided"))
def test_out_argument_is_filled_and_returned(rng, dtype, layout):
    x = make(rng, (6, 4, 9, 9), dtype)
    out = with_layout(np.full(x.shape, np.nan, dtype=dtype), layout, 1)
    y, mean, invstd = fastbn.batch_norm_forward(x, out=out)
    assert y is out
    assert_output(out, ref.forward(x)[0], dtype)


@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
@pytest.mark.parametrize("shape,axis", [((6, 4, 9, 9), 1), ((40, 5), -1), ((2, 3, 100), 1)])
def test_in_place(rng, dtype, shape, axis, kernel_plan):
    x = make(rng, shape, dtype, offset=1.0)
    expected = ref.forward(x, axis=axis)[0]
    y, _, _ = fastbn.batch_norm_forward(x, axis=axis, out=x)
    assert y is x
    assert_output(x, expected, dtype)


def test_out_overlapping_input_elsewhere(rng):
    base = make(rng, (2, 8, 3, 40), np.float32)
    x = base[0]
    expected = ref.forward(x, axis=0)[0]
    out = base[1:].reshape(x.shape)  # overlaps nothing of x but shares the buffer
    fastbn.batch_norm_forward(x, axis=0, out=out)
    assert_output(out, expected, np.float32)
    # Reversed view of the same memory as out: must not read what it already wrote.
    x2 = make(rng, (8, 3, 40), np.float32)
    expected2 = ref.forward(x2, axis=0)[0][::-1]
    fastbn.batch_norm_forward(x2, axis=0, out=x2[::-1])
    assert_output(x2, expected2, np.float32)


def test_result_is_laid_out_like_input(rng):
    x = np.asfortranarray(make(rng, (5, 4, 6, 7), np.float32))
    y, _, _ = fastbn.batch_norm_forward(x)
    assert y.flags.f_contiguous


def test_integer_and_bool_input_promoted(rng):
    xi = rng.integers(-5, 5, (10, 3, 4)).astype(np.int64)
    y, mean, invstd = check_forward(xi)
    assert y.dtype == np.float64 and mean.dtype == np.float64
    xb = rng.random((10, 3)) > 0.3
    xb[0], xb[1] = True, False  # no constant channel
    check_forward(xb)


def test_array_like_input():
    x = [[1.0, 2.0], [3.0, 5.0], [4.0, 0.5]]
    y, mean, _ = fastbn.batch_norm_forward(x)
    np.testing.assert_allclose(mean, np.mean(x, axis=0))
    np.testing.assert_allclose(y, ref.forward(np.array(x))[0], atol=1e-12)


@pytest.mark.parametrize("shape", [(32, 12, 64), (150, 3, 40), (9, 5, 67), (32, 12, 128),
                                   (150, 3, 128), (9, 5, 131)])
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_forward_statistics_are_batch_stats_bit_for_bit(rng, shape, dtype):
    """The fused short-run forward and the statistics kernel take the same sums in the
    same order: a training step and a separate batch_stats call agree exactly."""
    x = make(rng, shape, dtype, offset=1e3, scale=0.1)
    _, mean, invstd = fastbn.batch_norm_forward(x, eps=0.0)
    _, stats_mean, stats_var = fastbn.batch_stats(x)
    np.testing.assert_array_equal(mean, stats_mean.astype(mean.dtype))
    if dtype == np.float64:  # float32 statistics are rounded before they are returned
        np.testing.assert_array_equal(invstd, 1.0 / np.sqrt(stats_var))


def test_batch_stats_matches_numpy(rng, kernel_plan):
    for dtype in (np.float32, np.float64, np.int16):
        x = make(rng, (7, 5, 11), dtype)
        for ddof in (0, 1):
            n, mean, var = fastbn.batch_stats(x, axis=1, ddof=ddof)
            assert n == 77 and isinstance(n, int)
            _, mean_ref, var_ref = ref.stats(x, 1, ddof)
            assert_stats(mean, mean_ref, x.dtype, np.sqrt(var_ref))
            assert_stats(var, var_ref, x.dtype, 0.0)


def test_batch_stats_channels_last_and_wide(rng):
    x = make(rng, (64, 3, 3, 33), np.float32, offset=100.0)
    n, mean, var = fastbn.batch_stats(x, axis=-1)
    _, mean_ref, var_ref = ref.stats(x, -1)
    assert n == 64 * 9
    assert_stats(mean, mean_ref, np.float32, np.sqrt(var_ref))
    assert_stats(var, var_ref, np.float32, 0.0)


def test_batch_stats_ddof_beyond_count_is_inf_or_nan_like_numpy():
    x = np.array([[1.0, 2.0], [3.0, 2.0]])
    with pytest.warns(RuntimeWarning):
        _, _, var = fastbn.batch_stats(x, axis=1, ddof=2)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(var, np.var(x, axis=0, ddof=2))

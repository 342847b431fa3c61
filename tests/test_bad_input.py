"""Inputs real pipelines pass: read-only arrays (memory maps, frombuffer, broadcast_to),
non-native byte order, parameters that alias the output, ndarray subclasses, empty fits,
and a state_dict that is bad in its last key.  Each gives the right result or a clear
error that names the argument, and nothing is modified when it raises."""

import numpy as np
import pytest

import fastbn
from fastbn.distributed import SingleProcess, sync_batch_norm_backward, sync_batch_norm_forward


def _read_only(a):
    a = np.array(a)
    a.setflags(write=False)
    return a


def _calls(x, dy, w, b, rm, rv):
    """Every public function that only reads its array arguments, as (name, thunk)."""
    def forward():
        return fastbn.batch_norm_forward(x, w, b)

    def backward():
        y, mean, invstd = fastbn.batch_norm_forward(np.array(x), w, b)
        return fastbn.batch_norm_backward(dy, x, _read_only(mean), _read_only(invstd), w)

    def module():
        bn = fastbn.BatchNorm(x.shape[1])
        y = bn(x)
        return y, bn.backward(dy), bn.grad_weight, bn.grad_bias

    def module_eval():
        bn = fastbn.BatchNorm(x.shape[1]).eval()
        return bn(x), bn.backward(dy)

    def scaler(cls):
        def run():
            sc = cls(axis=1)
            a = sc.fit(x).transform(x)
            sc2 = cls(axis=1).partial_fit(x).partial_fit(x)
            return a, sc.fit_transform(x), sc.inverse_transform(x), sc2.transform(x)
        return run

    comm = SingleProcess()

    def sync():
        y, mean, invstd = sync_batch_norm_forward(x, w, b, comm=comm)
        return y, sync_batch_norm_backward(dy, x, _read_only(mean), _read_only(invstd), w,
                                           comm=comm)

    return [
        ("batch_stats", lambda: fastbn.batch_stats(x)),
        ("batch_stats_last", lambda: fastbn.batch_stats(x, axis=-1)),
        ("batch_norm_forward", forward),
        ("batch_norm_backward", backward),
        ("batch_norm_inference", lambda: fastbn.batch_norm_inference(x, rm, rv, w, b)),
        ("batch_norm", lambda: fastbn.batch_norm(x, rm, rv, w, b)),
        ("BatchNorm", module),
        ("BatchNorm.eval", module_eval),
        ("standardize", lambda: fastbn.standardize(x, axis=1)),
        ("standardize_last", lambda: fastbn.standardize(x)),
        ("minmax_scale", lambda: fastbn.minmax_scale(x, axis=1)),
        ("StandardScaler", scaler(fastbn.StandardScaler)),
        ("MinMaxScaler", scaler(fastbn.MinMaxScaler)),
        ("sync_batch_norm", sync),
    ]


def _flatten(result):
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in _flatten(r)]
    return [np.asarray(result)]


def _arguments(rng, shape=(6, 4, 9, 9)):
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    c = shape[1]
    w, b = rng.uniform(0.5, 2.0, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    rm, rv = rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    return x, dy, w, b, rm, rv


@pytest.mark.parametrize("kind", ["setflags", "memmap", "frombuffer", "broadcast_to"])
def test_every_function_accepts_read_only_inputs(rng, tmp_path, kind):
    args = _arguments(rng)
    expected = {name: _flatten(call()) for name, call in _calls(*args)}
    x, dy, w, b, rm, rv = args
    if kind == "setflags":
        ro = [_read_only(a) for a in args]
    elif kind == "memmap":
        ro = []
        for k, a in enumerate(args):
            np.save(tmp_path / f"{k}.npy", a)
            ro.append(np.load(tmp_path / f"{k}.npy", mmap_mode="r"))
    elif kind == "frombuffer":
        ro = [np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape) for a in args]
    else:  # a broadcast x (every sample the same): read-only, zero strides
        x = np.broadcast_to(x[:1], x.shape)
        args = (x, dy, w, b, rm, rv)
        expected = {name: _flatten(call()) for name, call in _calls(np.array(x), *args[1:])}
        ro = [x] + [_read_only(a) for a in args[1:]]
    assert not any(a.flags.writeable for a in ro)
    before = [np.array(a) for a in ro]
    for name, call in _calls(*ro):
        got = _flatten(call())
        assert len(got) == len(expected[name])
        for g, e in zip(got, expected[name]):
            np.testing.assert_array_equal(g, e, err_msg=name)
    for a, b0 in zip(ro, before):
        np.testing.assert_array_equal(a, b0)


@pytest.mark.parametrize("dtype", [">f2", ">f4", ">f8", ">i4", "<f4"])
def test_non_native_byte_order_is_computed_in_native_order(rng, dtype):
    x = rng.normal(5.0, 2.0, (5, 3, 40))
    xs = x.astype(dtype)
    native = xs.astype(np.dtype(dtype).newbyteorder("="))
    y, mean, invstd = fastbn.batch_norm_forward(xs)
    y0, mean0, invstd0 = fastbn.batch_norm_forward(native)
    assert y.dtype == y0.dtype and y.dtype.isnative
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(mean, mean0)
    z = fastbn.standardize(xs, axis=1)
    np.testing.assert_array_equal(z, fastbn.standardize(native, axis=1))
    assert z.dtype.isnative
    n, m, v = fastbn.batch_stats(xs)
    np.testing.assert_array_equal(m, fastbn.batch_stats(native)[1])
    # running statistics in big-endian arrays are updated in place, correctly
    rm, rv = np.zeros(3, ">f4"), np.ones(3, ">f4")
    fastbn.batch_norm_forward(xs, running_mean=rm, running_var=rv, momentum=1.0)
    np.testing.assert_allclose(rm, native.astype(np.float64).mean(axis=(0, 2)), rtol=1e-5)


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_aliasing_the_output_are_read_before_it_is_written(rng, which, dtype):
    x = rng.normal(2.0, 3.0, (16, 8, 64)).astype(dtype)
    w, b = rng.uniform(0.5, 2, 8).astype(dtype), rng.normal(size=8).astype(dtype)
    expected, _, _ = fastbn.batch_norm_forward(x, w, b)
    out = np.array(x)  # the parameter lives inside out (and, with out=x, inside x)
    flat = out.reshape(-1)
    if which == "weight":
        flat[:8] = w
        got, _, _ = fastbn.batch_norm_forward(x, flat[:8], b, out=out)
    else:
        flat[100:108] = b
        got, _, _ = fastbn.batch_norm_forward(x, w, flat[100:108], out=out)
    np.testing.assert_array_equal(got, expected)
    # in place: x is out, and the weight lies in x
    x2 = np.array(x)
    x2.reshape(-1)[:8] = w
    expected2, _, _ = fastbn.batch_norm_forward(np.array(x2), np.array(x2.reshape(-1)[:8]), b)
    got2, _, _ = fastbn.batch_norm_forward(x2, x2.reshape(-1)[:8], b, out=x2)
    np.testing.assert_array_equal(got2, expected2)
    # inference and backward too
    rm, rv = rng.normal(size=8).astype(dtype), rng.uniform(0.5, 2, 8).astype(dtype)
    exp_inf = fastbn.batch_norm_inference(x, rm, rv, w, b)
    out = np.array(x)
    out.reshape(-1)[:8] = rv
    np.testing.assert_array_equal(
        fastbn.batch_norm_inference(x, rm, out.reshape(-1)[:8], w, b, out=out), exp_inf)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b)
    exp_dx = fastbn.batch_norm_backward(y, x, mean, invstd, w)[0]
    dy = np.array(y)
    dy.reshape(-1)[:8] = invstd
    exp_dx = fastbn.batch_norm_backward(np.array(dy), x, mean, invstd, w)[0]
    got_dx = fastbn.batch_norm_backward(dy, x, mean, dy.reshape(-1)[:8], w, out=dy)[0]
    np.testing.assert_array_equal(got_dx, exp_dx)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_out_matrix_or_masked_array_is_a_clear_error():
    x = np.random.default_rng(0).normal(size=(6, 3))
    for out in (np.asmatrix(np.empty((6, 3))), np.ma.masked_array(np.empty((6, 3)))):
        with pytest.raises(TypeError, match="out must be a numpy.ndarray"):
            fastbn.batch_norm_forward(x, out=out)
        with pytest.raises(TypeError, match="out must be a numpy.ndarray"):
            fastbn.standardize(x, out=out)


@pytest.mark.parametrize("fit", ["fit", "partial_fit", "fit_transform"])
@pytest.mark.parametrize("cls", [fastbn.StandardScaler, fastbn.MinMaxScaler])
def test_an_empty_fit_raises_and_an_empty_transform_is_empty(cls, fit):
    empty = np.empty((0, 4), np.float32)
    with pytest.raises(ValueError, match="x has 0 samples"):
        getattr(cls(), fit)(empty)
    sc = cls().fit(np.random.default_rng(0).normal(size=(10, 4)))
    state = sc.to_dict()
    with pytest.raises(ValueError, match="x has 0 samples"):
        getattr(sc, fit)(empty)
    assert sc.to_dict() == state  # the failed fit changed nothing
    for method in ("transform", "inverse_transform"):
        y = getattr(sc, method)(empty)
        assert y.shape == (0, 4) and y.dtype == np.float32


@pytest.mark.parametrize("func", [fastbn.standardize, fastbn.minmax_scale])
def test_one_call_normalization_of_nothing_is_a_clear_error(func):
    with pytest.raises(ValueError, match="x has 0 samples"):
        func(np.empty((0, 3)))
    assert func(np.empty((5, 0))).shape == (5, 0)


def test_load_state_dict_checks_every_value_before_writing_any():
    bn = fastbn.BatchNorm(3)
    bn(np.random.default_rng(0).normal(size=(8, 3, 4)).astype(np.float32))
    before = bn.state_dict()
    good = {k: np.array(v) + 1 for k, v in before.items()}
    for key, bad in [("num_batches_tracked", np.array("x")),
                     ("running_var", np.array(["a", "b", "c"])),
                     ("num_batches_tracked", np.array(1.5)),
                     ("running_var", np.ones(4))]:
        state = dict(good)
        state[key] = bad
        with pytest.raises((TypeError, ValueError), match=key):
            bn.load_state_dict(state)
        after = bn.state_dict()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k])
    bn.load_state_dict(good)
    np.testing.assert_array_equal(bn.running_mean, good["running_mean"])

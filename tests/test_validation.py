"""Bad arguments raise a clear error naming the argument, and nothing is modified."""

import numpy as np
import pytest

import fastbn
from helpers import make

C = 3


@pytest.fixture
def state(rng):
    x = make(rng, (6, C, 5), np.float32)
    return {
        "x": x,
        "dy": make(rng, (6, C, 5), np.float32),
        "out": np.full(x.shape, -123.0, np.float32),
        "running_mean": np.full(C, 0.5, np.float32),
        "running_var": np.full(C, 2.0, np.float32),
    }


def snapshot(state):
    return {k: v.copy() for k, v in state.items()}


def assert_untouched(state, before):
    for key, value in state.items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"{key} was modified")


FORWARD_ERRORS = [
    (dict(weight=np.ones(C + 1)), ValueError, "weight"),
    (dict(bias=np.ones((C, 1))), ValueError, "bias"),
    (dict(weight=np.ones(C, complex)), TypeError, "weight"),
    (dict(axis=3), np.exceptions.AxisError, "axis"),
    (dict(axis=-4), np.exceptions.AxisError, "axis"),
    (dict(axis=1.0), TypeError, "axis"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(momentum=float("nan")), ValueError, "momentum"),
    (dict(momentum=None), TypeError, "momentum"),
    (dict(eps=-1e-5), ValueError, "eps"),
    (dict(eps="1e-5"), TypeError, "eps"),
    (dict(out_shape=(6, C, 4)), ValueError, "out"),
    (dict(out_dtype=np.float64), ValueError, "out"),
    (dict(out_readonly=True), ValueError, "out"),
    (dict(running_mean_shape=C + 1), ValueError, "running_mean"),
    (dict(running_var_dtype=np.float16), ValueError, "running_var"),
    (dict(running_mean_list=True), TypeError, "running_mean"),
]


@pytest.mark.parametrize("change,error,name", FORWARD_ERRORS)
def test_forward_rejects_bad_arguments_and_writes_nothing(state, change, error, name):
    before = snapshot(state)
    kwargs = dict(running_mean=state["running_mean"], running_var=state["running_var"],
                  out=state["out"])
    change = dict(change)
    if "out_shape" in change:
        kwargs["out"] = np.zeros(change.pop("out_shape"), np.float32)
    if "out_dtype" in change:
        kwargs["out"] = np.zeros(state["x"].shape, change.pop("out_dtype"))
    if change.pop("out_readonly", False):
        kwargs["out"] = np.zeros(state["x"].shape, np.float32)
        kwargs["out"].flags.writeable = False
    if "running_mean_shape" in change:
        kwargs["running_mean"] = np.zeros(change.pop("running_mean_shape"), np.float32)
    if "running_var_dtype" in change:
        kwargs["running_var"] = np.ones(C, change.pop("running_var_dtype"))
    if change.pop("running_mean_list", False):
        kwargs["running_mean"] = [0.0] * C
    kwargs.update(change)
    with pytest.raises(error, match=name):
        fastbn.batch_norm_forward(state["x"], **kwargs)
    assert_untouched(state, before)


@pytest.mark.parametrize("dtype", [np.complex64, object, "U3", "datetime64[s]", np.longdouble])
def test_unsupported_dtypes_raise_type_error(dtype):
    x = np.zeros((4, 3), dtype=dtype)
    for call in (lambda: fastbn.batch_norm_forward(x),
                 lambda: fastbn.batch_norm_inference(x, np.zeros(3), np.ones(3)),
                 lambda: fastbn.batch_stats(x)):
        with pytest.raises(TypeError, match="dtype"):
            call()


def test_zero_dimensional_input():
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        fastbn.batch_norm_forward(np.float32(3.0))


def test_backward_rejects_bad_arguments(state):
    x, dy = state["x"], state["dy"]
    _, mean, invstd = fastbn.batch_norm_forward(x)
    before = snapshot(state)
    out = state["out"]
    with pytest.raises(ValueError, match="dy and x"):
        fastbn.batch_norm_backward(dy[:, :, :4], x, mean, invstd, out=out)
    with pytest.raises(ValueError, match="mean"):
        fastbn.batch_norm_backward(dy, x, mean[:2], invstd, out=out)
    with pytest.raises(ValueError, match="invstd"):
        fastbn.batch_norm_backward(dy, x, mean, None, out=out)
    with pytest.raises(ValueError, match="out"):
        fastbn.batch_norm_backward(dy, x, mean, invstd, out=out.astype(np.float64))
    with pytest.raises(np.exceptions.AxisError):
        fastbn.batch_norm_backward(dy, x, mean, invstd, axis=5, out=out)
    assert_untouched(state, before)


def test_inference_rejects_bad_arguments(state):
    before = snapshot(state)
    x, out = state["x"], state["out"]
    with pytest.raises(ValueError, match="running_var"):
        fastbn.batch_norm_inference(x, np.zeros(C), np.ones(C + 1), out=out)
    with pytest.raises(ValueError, match="eps"):
        fastbn.batch_norm_inference(x, np.zeros(C), np.ones(C), eps=-1.0, out=out)
    with pytest.raises(ValueError, match="running_mean"):
        fastbn.batch_norm_inference(x, None, np.ones(C), out=out)
    assert_untouched(state, before)


def test_batch_stats_rejects_bad_ddof():
    for ddof in (-1, 1.5, True):
        with pytest.raises(ValueError, match="ddof"):
            fastbn.batch_stats(np.ones((3, 2)), ddof=ddof)


def test_module_rejects_bad_construction():
    with pytest.raises(ValueError, match="num_features"):
        fastbn.BatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        fastbn.BatchNorm(3, momentum=2.0)
    with pytest.raises(ValueError, match="dtype"):
        fastbn.BatchNorm(3, dtype=np.int32)


def test_device_arrays_are_refused_on_a_host_build():
    class FakeDevice:
        __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4", "data": (0, False),
                                    "version": 3}
        shape = (4, 3)

    with pytest.raises(TypeError, match="mix"):
        fastbn.batch_norm_forward(FakeDevice(), weight=np.ones(3))


ALL_CALLS = {
    "forward": lambda a: fastbn.batch_norm_forward(a["x"], a["w"], a["b"]),
    "forward_running": lambda a: fastbn.batch_norm_forward(a["x"], running_mean=a["rm"].copy(),
                                                           running_var=a["rv"].copy()),
    "backward": lambda a: fastbn.batch_norm_backward(a["dy"], a["x"], a["rm"], a["rv"], a["w"]),
    "inference": lambda a: fastbn.batch_norm_inference(a["x"], a["rm"], a["rv"], a["w"], a["b"]),
    "batch_norm": lambda a: fastbn.batch_norm(a["x"], a["rm"].copy(), a["rv"].copy(), a["w"],
                                              a["b"], training=True),
    "batch_stats": lambda a: fastbn.batch_stats(a["x"]),
    "module": lambda a: fastbn.BatchNorm(C)(a["x"]),
}


@pytest.mark.parametrize("name", sorted(ALL_CALLS))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, C, 5), (6, C, 80), (50, C)])
def test_inputs_are_never_modified(rng, name, dtype, shape):
    args = {
        "x": make(rng, shape, dtype), "dy": make(rng, shape, dtype),
        "w": rng.uniform(0.5, 2, C), "b": rng.normal(size=C),
        "rm": rng.normal(size=C).astype(np.float32), "rv": rng.uniform(0.5, 2, C).astype(np.float32),
    }
    before = {k: v.copy() for k, v in args.items()}
    ALL_CALLS[name](args)
    for key, value in args.items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"{name} modified {key}")


@pytest.mark.parametrize("momentum", [1.5, float("nan"), None, "0.1"])
def test_bad_momentum_raises_without_running_stats(state, momentum):
    """The O(1) common-call path must not skip a check the general path makes."""
    with pytest.raises((ValueError, TypeError), match="momentum"):
        fastbn.batch_norm_forward(state["x"], momentum=momentum)


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), -0.0 - 1e-300])
def test_bad_eps_raises_on_the_common_path(state, eps):
    with pytest.raises(ValueError, match="eps"):
        fastbn.batch_norm_forward(state["x"], eps=eps)


def _general_path_variants(x, w, b):
    """Calls equal to (x, w, b) that the O(1) path must leave to the general one."""
    xf = np.asfortranarray(x)
    return {
        "fortran x": dict(x=xf),
        "list weight": dict(weight=list(w)),
        "float16 bias": dict(bias=b.astype(np.float16)),
        "numpy eps": dict(eps=np.float64(1e-5)),
        "int axis as numpy": dict(axis=np.int64(1)),
    }


def _common_path_variants(w, b):
    """Calls the O(1) path takes, converting the vectors itself."""
    return {"float32 bias": dict(bias=b.astype(np.float32)),
            "strided weight": dict(weight=np.repeat(w, 2)[::2])}


def test_common_path_matches_general_path(state, rng):
    from fastbn import _validate

    x = state["x"]
    w, b = rng.uniform(0.5, 2, C), rng.normal(size=C)
    base = dict(x=x, weight=w, bias=b, eps=1e-5, axis=1)
    assert _validate.plain_forward_args(x, w, b, 1, 1e-5, None, None, 0.1, None) == (1, C, 30)
    y0, m0, i0 = fastbn.batch_norm_forward(**base)
    b = b.astype(np.float16).astype(np.float64)  # exact in every variant
    base["bias"] = b
    y0, m0, i0 = fastbn.batch_norm_forward(**base)
    variants = {**_general_path_variants(x, w, b), **_common_path_variants(w, b)}
    for label, change in variants.items():
        kw = {**base, **change}
        args = (kw["x"], kw["weight"], kw["bias"], kw["axis"], kw["eps"], None, None, 0.1, None)
        plain = _validate.plain_forward_args(*args)
        assert (plain is None) == (label in _general_path_variants(x, w, b)), label
        y, m, i = fastbn.batch_norm_forward(**kw)
        np.testing.assert_allclose(y, y0, rtol=0, atol=1e-6, err_msg=label)
        np.testing.assert_allclose(m, m0, rtol=1e-7, err_msg=label)
        np.testing.assert_allclose(i, i0, rtol=1e-6, err_msg=label)
    # an out= that overlaps x at other positions goes through a temporary
    buf = np.concatenate([x.ravel(), x.ravel()[:5]])
    xs, out = buf[5:].reshape(x.shape), buf[:-5].reshape(x.shape)
    assert _validate.plain_forward_args(xs, w, b, 1, 1e-5, None, None, 0.1, out) is None
    expected = fastbn.batch_norm_forward(xs.copy(), w, b)[0]
    np.testing.assert_array_equal(fastbn.batch_norm_forward(xs, w, b, out=out)[0], expected)


def test_common_inference_and_backward_match_general_path(state, rng):
    """The O(1) paths of inference and backward against the general ones (forced with
    Fortran-ordered copies, which only the general path takes)."""
    from fastbn import _validate

    x, dy = state["x"], state["dy"]
    w, b = rng.uniform(0.5, 2, C), rng.normal(size=C)
    rm, rv = rng.normal(size=C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    assert _validate.plain_inference_args(x, rm, rv, w, b, 1, 1e-5, None) == (1, C)
    xf, dyf = np.asfortranarray(x), np.asfortranarray(dy)
    assert _validate.plain_inference_args(xf, rm, rv, w, b, 1, 1e-5, None) is None
    np.testing.assert_allclose(fastbn.batch_norm_inference(x, rm, rv, w, b),
                               fastbn.batch_norm_inference(xf, rm, rv, w, b), rtol=0, atol=1e-6)
    _, mean, invstd = fastbn.batch_norm_forward(x, w, b)
    assert _validate.plain_backward_args(dy, x, mean, invstd, w, 1, None) == (1, C)
    assert _validate.plain_backward_args(dyf, x, mean, invstd, w, 1, None) is None
    assert _validate.plain_backward_args(dy, x.astype(np.float64), mean, invstd, w, 1, None) is None
    for got, want in zip(fastbn.batch_norm_backward(dy, x, mean, invstd, w),
                         fastbn.batch_norm_backward(dyf, xf, mean, invstd, w)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # in place into dy, and into x, as the general path allows
    for target in ("dy", "x"):
        d, xx = dy.copy(), x.copy()
        out = d if target == "dy" else xx
        dx = fastbn.batch_norm_backward(d, xx, mean, invstd, w, out=out)[0]
        np.testing.assert_allclose(dx, fastbn.batch_norm_backward(dy, x, mean, invstd, w)[0],
                                   rtol=1e-6, atol=1e-6)
    # running variance 0 with eps 0 gives scale 0, not a division warning
    with np.errstate(all="raise"):
        y = fastbn.batch_norm_inference(x, rm, np.zeros(C, np.float32), eps=0.0)
    assert np.all(y == 0)

"""fold_batch_norm (contract section 6): a layer with folded weights equals the layer
followed by inference batch normalization."""

import numpy as np
import pytest

import fastbn

TOL = {np.float32: 1e-5, np.float64: 1e-12}


def conv2d(x, w, b=None):
    """Valid 2-D cross-correlation, NCHW input, OIHW weight, in float64."""
    win = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), w.shape[2:], axis=(2, 3))
    y = np.einsum("nchwij,ocij->nohw", win, w.astype(np.float64))
    return y if b is None else y + np.asarray(b, np.float64)[None, :, None, None]


def bn_inference(z, mean, var, gamma, beta, eps, axis):
    shape = [1] * z.ndim
    shape[axis] = -1
    r = lambda a: np.asarray(a, np.float64).reshape(shape)  # noqa: E731
    return (z - r(mean)) / np.sqrt(r(var) + eps) * r(gamma) + r(beta)


def _stats(rng, c):
    return (rng.normal(size=c), rng.uniform(0.2, 3.0, c), rng.uniform(0.5, 2.0, c),
            rng.normal(size=c))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_folded_conv_equals_conv_then_batch_norm(dtype, with_bias):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 9, 8)).astype(dtype)
    w = (rng.normal(size=(5, 3, 3, 3)) / 3).astype(dtype)
    b = rng.normal(size=5).astype(dtype) if with_bias else None
    mean, var, gamma, beta = _stats(rng, 5)
    expected = bn_inference(conv2d(x, w, b), mean, var, gamma, beta, 1e-5, 1)
    w2, b2 = fastbn.fold_batch_norm(w, b, mean, var, gamma, beta, eps=1e-5, axis=0)
    assert w2.dtype == dtype and b2.dtype == dtype and w2.shape == w.shape and b2.shape == (5,)
    np.testing.assert_allclose(conv2d(x, w2, b2), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_folded_linear_equals_linear_then_batch_norm(dtype, layout, with_bias):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 6)).astype(dtype)
    w = (rng.normal(size=(4, 6)) / 2).astype(dtype)  # (out, in), PyTorch's Linear
    b = rng.normal(size=4).astype(dtype) if with_bias else None
    mean, var, gamma, beta = _stats(rng, 4)
    z = x.astype(np.float64) @ w.astype(np.float64).T + (0 if b is None else b.astype(np.float64))
    expected = bn_inference(z, mean, var, gamma, beta, 1e-3, 1)
    if layout == "out_in":
        w2, b2 = fastbn.fold_batch_norm(w, b, mean, var, gamma, beta, eps=1e-3, axis=0)
        got = x.astype(np.float64) @ w2.astype(np.float64).T
    else:  # NumPy's x @ W with W (in, out)
        wt = np.ascontiguousarray(w.T)
        w2, b2 = fastbn.fold_batch_norm(wt, b, mean, var, gamma, beta, eps=1e-3, axis=-1)
        assert w2.shape == wt.shape
        got = x.astype(np.float64) @ w2.astype(np.float64)
    np.testing.assert_allclose(got + b2, expected, rtol=TOL[dtype], atol=TOL[dtype])


def test_defaults_and_inputs_untouched():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 2, 1, 1))
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    before = [a.copy() for a in (w, mean, var)]
    w2, b2 = fastbn.fold_batch_norm(w, None, mean, var)
    for a, b in zip((w, mean, var), before):
        np.testing.assert_array_equal(a, b)
    s = 1 / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(w2, w * s[:, None, None, None], rtol=1e-15)
    np.testing.assert_allclose(b2, -mean * s, rtol=1e-15)
    # eps 0 and variance 0: scale 0, as batch_norm_inference gives bias
    w3, b3 = fastbn.fold_batch_norm(w, None, mean, np.zeros(3), None, np.ones(3), eps=0.0)
    assert not w3.any() and (b3 == 1.0).all()


def test_matches_torch_fuse_conv_bn_eval():
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, bias=True).double().eval()
    bn = torch.nn.BatchNorm2d(4).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 2.0)
    bn.bias.data.normal_()
    fused = fuse_conv_bn_eval(conv, bn)
    w2, b2 = fastbn.fold_batch_norm(conv.weight.detach().numpy(), conv.bias.detach().numpy(),
                                    bn.running_mean.numpy(), bn.running_var.numpy(),
                                    bn.weight.detach().numpy(), bn.bias.detach().numpy(),
                                    eps=bn.eps)
    np.testing.assert_allclose(w2, fused.weight.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(b2, fused.bias.detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda w, m, v: fastbn.fold_batch_norm(w, None, m[:2], v), "running_mean"),
    (lambda w, m, v: fastbn.fold_batch_norm(w, np.ones(4), m, v), "bias"),
    (lambda w, m, v: fastbn.fold_batch_norm(w, None, m, v, gamma=np.ones(2)), "gamma"),
    (lambda w, m, v: fastbn.fold_batch_norm(w, None, m, v, axis=2), "axis"),
    (lambda w, m, v: fastbn.fold_batch_norm(w, None, m, v, eps=-1.0), "eps"),
    (lambda w, m, v: fastbn.fold_batch_norm(w, None, m, -v, eps=0.0), "running_var"),
    (lambda w, m, v: fastbn.fold_batch_norm(w.astype(complex), None, m, v), "weight"),
])
def test_bad_arguments_name_themselves(call, match):
    w = np.ones((3, 2))
    with pytest.raises((ValueError, TypeError), match=match):
        call(w, np.zeros(3), np.ones(3))

"""Parity with PyTorch's batch norm where torch is installed (never required)."""

import numpy as np
import pytest

import fastbn

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("shape", [(8, 3), (6, 4, 10), (4, 5, 6, 7), (2, 3, 4, 5, 6)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_backward_and_running_stats_match_torch(rng, shape, dtype):
    x = rng.normal(2.0, 3.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    c = shape[1]
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.normal(size=c).astype(dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    trm, trv = torch.zeros(c, dtype=torch.from_numpy(x).dtype), torch.ones(c, dtype=torch.from_numpy(x).dtype)

    tx = torch.from_numpy(x.copy()).requires_grad_()
    tw = torch.from_numpy(w.copy()).requires_grad_()
    tb = torch.from_numpy(b.copy()).requires_grad_()
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.3, eps=1e-4)
    ty.backward(torch.from_numpy(dy))

    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, eps=1e-4, running_mean=rm,
                                                running_var=rv, momentum=0.3)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    np.testing.assert_allclose(rm, trm.numpy(), **tol)
    np.testing.assert_allclose(rv, trv.numpy(), **tol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    np.testing.assert_allclose(dw, tw.grad.numpy(), **tol)
    np.testing.assert_allclose(db, tb.grad.numpy(), **tol)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_module_matches_torch_batchnorm2d(rng, momentum, affine, track):
    tbn = torch.nn.BatchNorm2d(3, momentum=momentum, affine=affine, track_running_stats=track)
    bn = fastbn.BatchNorm(3, momentum=momentum, affine=affine, track_running_stats=track)
    bn.load_state_dict(tbn.state_dict())  # torch tensors load directly
    for k in range(3):
        x = rng.normal(k, 1 + k, (4, 3, 5, 5)).astype(np.float32)
        ty = tbn(torch.from_numpy(x))
        np.testing.assert_allclose(bn(x), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    tbn.eval()
    bn.eval()
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(bn(x), tbn(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)
    theirs = {k: v.numpy() for k, v in tbn.state_dict().items()}
    ours = bn.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_eval_backward_matches_torch(rng):
    tbn = torch.nn.BatchNorm2d(3)
    tbn.running_mean.uniform_(-1, 1)
    tbn.running_var.uniform_(0.5, 2)
    tbn.weight.data.uniform_(0.5, 2)
    tbn.eval()
    bn = fastbn.BatchNorm(3)
    bn.load_state_dict(tbn.state_dict())
    bn.eval()
    x = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    tbn(tx).backward(torch.from_numpy(dy))
    bn(x)
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.grad_weight, tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.grad_bias, tbn.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the module's PyTorch parts


def _trained_pair(rng, **kw):
    tbn = torch.nn.BatchNorm2d(3, **kw)
    bn = fastbn.BatchNorm(3, **kw)
    for k in range(2):
        x = rng.normal(k, 2.0, (4, 3, 5, 5)).astype(np.float32)
        tbn(torch.from_numpy(x))
        bn(x)
    return tbn, bn


def test_reset_running_stats_and_parameters_as_torch(rng):
    tbn, bn = _trained_pair(rng)
    with torch.no_grad():
        tbn.weight.mul_(3.0)
        tbn.bias.add_(1.0)
    bn.load_state_dict(tbn.state_dict())
    tbn.reset_running_stats()
    bn.reset_running_stats()
    for key, value in tbn.state_dict().items():
        np.testing.assert_array_equal(bn.state_dict()[key], value.numpy())
    assert bn.weight[0] == 3.0  # parameters untouched
    tbn.reset_parameters()
    bn.reset_parameters()
    for key, value in tbn.state_dict().items():
        np.testing.assert_array_equal(bn.state_dict()[key], value.numpy())


def test_bias_false_as_torch(rng):
    tbn = torch.nn.BatchNorm2d(3, bias=False)
    bn = fastbn.BatchNorm(3, bias=False)
    assert set(bn.state_dict()) == set(tbn.state_dict())
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 2.0)
    bn.load_state_dict(tbn.state_dict())
    x = rng.normal(1.0, 2.0, (4, 3, 5, 5)).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_()
    ty = tbn(tx)
    np.testing.assert_allclose(bn(x), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    dy = rng.normal(size=x.shape).astype(np.float32)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(bn.backward(dy), tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.grad_weight, tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    assert bn.grad_bias is None and bn.bias is None


def test_load_state_dict_strict_false_reports_keys_as_torch(rng):
    tbn, bn = _trained_pair(rng)
    partial = {k: v for k, v in tbn.state_dict().items() if k != "running_var"}
    partial["extra"] = torch.zeros(1)
    theirs = torch.nn.BatchNorm2d(3).load_state_dict(partial, strict=False)
    ours = fastbn.BatchNorm(3).load_state_dict(partial, strict=False)
    assert list(ours.missing_keys) == list(theirs.missing_keys) == ["running_var"]
    assert list(ours.unexpected_keys) == list(theirs.unexpected_keys) == ["extra"]
    with pytest.raises(RuntimeError, match="running_var"):
        torch.nn.BatchNorm2d(3).load_state_dict(partial)
    fresh = fastbn.BatchNorm(3)
    with pytest.raises(RuntimeError, match="running_var"):
        fresh.load_state_dict(partial)
    assert fresh.running_mean[0] == 0.0  # nothing loaded


def test_checkpoint_without_num_batches_tracked_loads(rng):
    tbn, _ = _trained_pair(rng)
    old = {k: v for k, v in tbn.state_dict().items() if k != "num_batches_tracked"}
    theirs = torch.nn.BatchNorm2d(3)
    assert not theirs.load_state_dict(old).missing_keys
    bn = fastbn.BatchNorm(3)
    result = bn.load_state_dict(old)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert int(bn.num_batches_tracked) == int(theirs.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.running_var, tbn.running_var.numpy())


def test_positional_constructor_order_is_torchs():
    bn = fastbn.BatchNorm(3, 1e-3, None, False, False)
    tbn = torch.nn.BatchNorm2d(3, 1e-3, None, False, False)
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (
        tbn.eps, tbn.momentum, tbn.affine, tbn.track_running_stats)
    assert bn.weight is None and bn.running_mean is None


def test_track_running_stats_switched_off_after_construction(rng):
    """PyTorch keeps normalizing with the existing buffers in eval, and stops updating them."""
    tbn, bn = _trained_pair(rng)
    tbn.track_running_stats = False
    bn.track_running_stats = False
    x = rng.normal(5.0, 3.0, (4, 3, 5, 5)).astype(np.float32)
    before = bn.running_mean.copy()
    np.testing.assert_allclose(bn(x), tbn(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)  # training: batch statistics, no update
    np.testing.assert_array_equal(bn.running_mean, before)
    np.testing.assert_array_equal(tbn.running_mean.numpy(), before)
    tbn.eval()
    bn.eval()
    ours = bn(x)
    np.testing.assert_allclose(ours, tbn(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)
    batch = fastbn.batch_norm_forward(x)[0]
    assert np.abs(ours - batch).max() > 0.1  # not the batch statistics

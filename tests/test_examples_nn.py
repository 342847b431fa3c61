"""The demo's NumPy network layers (fastbn.examples.nn): gradients against finite
differences, with fastbn.BatchNorm (fused ReLU) and without."""

import numpy as np
import pytest

from fastbn.examples.nn import MLP, softmax_cross_entropy, sgd_step


def _loss(model, x, y):
    return softmax_cross_entropy(model.forward(x), y)[0]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_gradients_match_finite_differences(batch_norm):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 5))
    y = rng.integers(0, 3, 16)
    model = MLP([5, 7, 6, 3], np.random.default_rng(1), batch_norm=batch_norm,
                dtype=np.float64)
    logits = model.forward(x)
    _, dlogits = softmax_cross_entropy(logits, y)
    dx = model.backward(dlogits)
    checked = 0
    for p, g in model.params():
        flat, gflat = p.reshape(-1), g.reshape(-1)
        for k in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            old = flat[k]
            flat[k] = old + 1e-6
            up = _loss(model, x, y)
            flat[k] = old - 1e-6
            down = _loss(model, x, y)
            flat[k] = old
            assert (up - down) / 2e-6 == pytest.approx(gflat[k], rel=1e-5, abs=1e-8)
            checked += 1
    assert checked >= 4 * (6 if batch_norm else 5)  # weights (and BN's scale and shift)
    # the input gradient too
    for k in range(3):
        i, j = divmod(int(rng.integers(0, x.size)), x.shape[1])
        xp, xm = x.copy(), x.copy()
        xp[i, j] += 1e-6
        xm[i, j] -= 1e-6
        fd = (_loss(model, xp, y) - _loss(model, xm, y)) / 2e-6
        assert fd == pytest.approx(dx[i, j], rel=1e-5, abs=1e-8)


def test_sgd_lowers_the_loss_and_batch_norm_runs_through_fastbn():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 10)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    model = MLP([10, 16, 2], np.random.default_rng(0), batch_norm=True)
    bn = model.layers[1].bn
    first = None
    for _ in range(30):
        loss, dlogits = softmax_cross_entropy(model.forward(x), y)
        first = loss if first is None else first
        model.backward(dlogits)
        sgd_step(model.params(), 0.1)
    assert loss < 0.5 * first
    assert bn.activation == "relu" and int(bn.num_batches_tracked) == 30
    assert np.all(model.layers[1].forward(x @ model.layers[0].weight) >= 0)

"""fastbn.torch's BatchNorm modules, convert() and optimize() against PyTorch's modules."""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
fbt = pytest.importorskip("fastbn.torch")
from fastbn.examples.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

nn = torch.nn


def _assert_state_equal(ours, theirs, **tol):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol)


SHAPES = {1: [(6, 4), (5, 4, 7)], 2: [(4, 4, 5, 6)], 3: [(3, 4, 3, 4, 5)]}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_module_matches_torch_through_train_eval_train(dim, momentum, affine, track):
    torch.manual_seed(dim)
    theirs = getattr(nn, f"BatchNorm{dim}d")(4, momentum=momentum, affine=affine,
                                             track_running_stats=track).double()
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 2)
            theirs.bias.normal_()
    ours = getattr(fbt, f"BatchNorm{dim}d")(4, momentum=momentum, affine=affine,
                                            track_running_stats=track).double()
    assert isinstance(ours, type(theirs))
    ours.load_state_dict(theirs.state_dict())
    for mode in ("train", "train", "eval", "train"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        for shape in SHAPES[dim]:
            x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
            y_ours, y_theirs = ours(x), theirs(x)
            torch.testing.assert_close(y_ours, y_theirs)
            dy = torch.randn(shape, dtype=torch.float64)
            params = [x] + list(theirs.parameters())
            g_ours = torch.autograd.grad(y_ours, [x] + list(ours.parameters()), dy)
            g_theirs = torch.autograd.grad(y_theirs, params, dy)
            for a, b in zip(g_ours, g_theirs):
                torch.testing.assert_close(a, b)
    _assert_state_equal(ours, theirs)
    if track:
        assert int(ours.num_batches_tracked) == len(SHAPES[dim]) * 3


def test_module_channels_last_float32_and_reset():
    torch.manual_seed(0)
    theirs = nn.BatchNorm2d(8)
    ours = fbt.convert(copy.deepcopy(theirs))
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last) * 3 + 5
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    assert ours(x).is_contiguous(memory_format=torch.channels_last)
    ours.reset_running_stats()
    assert int(ours.num_batches_tracked) == 0 and float(ours.running_var.sum()) == 8


def test_refused_input_changes_no_state():
    bn = fbt.BatchNorm1d(3)
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(torch.randn(1, 3))
    _assert_state_equal_dict(bn.state_dict(), before)


def _assert_state_equal_dict(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_to_dtype_and_sync_batchnorm_conversion():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    fbt.convert(model)
    assert type(model[1]) is fbt.BatchNorm2d
    model.to(torch.float64)
    assert model[1].running_mean.dtype == torch.float64
    model(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced[1]) is nn.SyncBatchNorm
    _assert_state_equal_dict(synced[1].state_dict(), model[1].state_dict())


def test_convert_keeps_parameters_buffers_mode_and_optimizer():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4),
                          nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2)))
    model.eval()
    params = {id(p) for p in model.parameters()}
    buffers = {id(b) for b in model.buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fbt.convert(model) is model
    assert type(model[1]) is fbt.BatchNorm1d and type(model[2][1]) is fbt.BatchNorm3d
    assert {id(p) for p in model.parameters()} == params
    assert {id(b) for b in model.buffers()} == buffers
    assert not model[1].training
    model.train()
    loss = model[1](model[0](torch.randn(8, 5))).square().sum()
    loss.backward()
    before = model[1].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[1].weight)
    bare = fbt.convert(nn.BatchNorm2d(3))
    assert type(bare) is fbt.BatchNorm2d


def _pair(model, seed=0):
    torch.manual_seed(seed)
    for m in model.modules():  # non-trivial affine parameters and statistics
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model, copy.deepcopy(model)


def _bn_count(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("channels_last", [False, True])
def test_optimize_resnet_training_step_matches_torch(block, channels_last):
    """ResNet-18's definition (and a Bottleneck ResNet), trained a step through optimize:
    loss, every gradient and every running statistic as PyTorch's, in float64."""
    layers = [2, 2, 2, 2] if block is BasicBlock else [1, 1, 1, 1]
    theirs, ours = _pair(ResNet(block, layers, num_classes=10).double())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    theirs.to(memory_format=fmt), ours.to(memory_format=fmt)
    fbt.reset_stats()
    ours = fbt.optimize(ours)
    code = ours.code
    assert code.count("activation = 'relu'") == (17 if block is BasicBlock else 13)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (4,))
    losses = []
    for model in (ours, theirs):
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    named = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-8, atol=1e-10)
    _assert_state_equal(ours, theirs, rtol=1e-10, atol=1e-12)
    s = fbt.stats()
    assert s["fallback"] == {}
    n_bn = _bn_count(theirs)
    assert s["fastbn"] == {"train": n_bn, "backward": n_bn}


def test_optimize_resnet_eval_folds_and_matches_torch():
    theirs, ours = _pair(ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10))
    theirs.eval(), ours.eval()
    original_conv = ours.conv1.weight.detach().clone()
    folded = fbt.optimize(ours)
    assert _bn_count(folded) == 0  # every batch norm follows a convolution
    assert torch.equal(ours.conv1.weight, original_conv)  # the model passed in is untouched
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), theirs(x), rtol=1e-4, atol=1e-4)
        fused = fbt.optimize(copy.deepcopy(ours), fold=False)
        torch.testing.assert_close(fused(x), theirs(x), rtol=1e-4, atol=1e-5)
    assert _bn_count(fused) == _bn_count(theirs)


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_optimize_eval_adds_and_clips_in_place_after_folding(block):
    """Folded, a ResNet block ends in conv -> add -> relu; fx traces ``out += identity``
    out of place, and optimize writes it back into the convolution's fresh output:
    the shortcut is left as it was, NaN stays NaN, and gradients (eval mode, no
    inference_mode) are PyTorch's."""
    layers = [2, 2, 2, 2] if block is BasicBlock else [1, 1, 1, 1]
    theirs, ours = _pair(ResNet(block, layers, num_classes=10).double())
    theirs.eval(), ours.eval()
    folded = fbt.optimize(ours)
    assert folded.code.count("add_relu_(") == sum(layers)
    assert " + " not in folded.code and "operator.add" not in folded.code
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x[0, 0, 5, 5] = float("nan")
    with torch.no_grad():
        y_ours, y_theirs = folded(x), theirs(x)
    assert torch.equal(y_ours.isnan(), y_theirs.isnan()) and y_ours.isnan().any()
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-12, equal_nan=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(m(x).square().sum(), x)[0] for m in (folded, theirs)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)


def test_add_relu_in_place_only_where_it_gives_the_same_result():
    from fastbn.torch.optimize import add_relu_

    out = torch.tensor([[-1.0, 2.0, float("nan")]] * 3)
    other = torch.tensor([[0.5, -3.0, 1.0]] * 3)
    keep = other.clone()
    expected = torch.relu(out + other)
    y = add_relu_(out, other)
    assert y.data_ptr() == out.data_ptr() and torch.equal(other, keep)
    torch.testing.assert_close(y, expected, equal_nan=True)
    # a shortcut that would broadcast the output or promote its dtype: out of place
    small, row = torch.randn(1, 3), torch.randn(3, 3)
    y = add_relu_(small, row)
    assert y.shape == (3, 3) and small.shape == (1, 3)
    torch.testing.assert_close(y, torch.relu(small + row))
    single, double = torch.randn(3), torch.randn(3, dtype=torch.float64)
    y = add_relu_(single, double)
    assert y.dtype == torch.float64 and y.data_ptr() != single.data_ptr()


def test_optimize_eval_keeps_the_add_of_a_convolution_read_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            h = self.conv(x)
            return torch.relu(h + x), h

    torch.manual_seed(0)
    theirs = Twice().eval()
    ours = fbt.optimize(copy.deepcopy(theirs))
    assert "add_relu_" not in ours.code
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x)):
            torch.testing.assert_close(a, b)


def test_optimize_trained_model_can_switch_to_eval():
    theirs, ours = _pair(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).double())
    ours = fbt.optimize(ours)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ours(x), theirs(x)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: fx cannot trace it
            return torch.relu(self.bn(x))
        return self.bn(x)


def test_optimize_falls_back_to_conversion_when_tracing_fails():
    model = _Untraceable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fbt.optimize(model)
    assert out is model and type(model.bn) is fbt.BatchNorm1d
    assert any("does not trace" in str(w.message) for w in caught)
    model(torch.randn(4, 3))


class _SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h)) + h)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("prepare", ["convert", "optimize"])
def test_torch_compile_runs_fastbn_operators_without_graph_breaks(prepare):
    """torch.compile (CPU, default backend) of a small conv net: one graph, fastbn's
    operators called in the compiled forward and backward, PyTorch's results."""
    torch.manual_seed(0)
    theirs = _SmallConvNet()
    ours = getattr(fbt, prepare)(copy.deepcopy(theirs))
    x = torch.randn(4, 3, 8, 8)
    explained = torch._dynamo.explain(copy.deepcopy(ours))(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(ours)
    fbt.reset_stats()
    for _ in range(2):  # running statistics carried from step to step
        y_ours, y_theirs = compiled(x), theirs(x)
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-5)
        y_ours.square().sum().backward()
        y_theirs.square().sum().backward()
    assert fbt.stats()["fastbn"] == {"train": 4, "backward": 4}
    named = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-4, atol=1e-5)
    _assert_state_equal(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_optimize_does_not_fold_a_convolution_used_twice():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    torch.manual_seed(0)
    theirs = Shared().eval()
    with torch.no_grad():
        theirs.bn.running_mean.uniform_(-1, 1)
        theirs.bn.running_var.uniform_(0.5, 2)
    ours = fbt.optimize(copy.deepcopy(theirs))
    assert _bn_count(ours) == 1
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_gradient_of_a_sum_reaches_fastbn():
    """``y.sum().backward()`` hands the backward an expanded gradient (zero strides)."""
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    fbt.reset_stats()
    fbt.batch_norm_act(x, None, None, training=True).sum().backward()
    xr = x.detach().clone().requires_grad_()
    torch.relu(F_batch_norm(xr)).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    assert fbt.stats()["fastbn"] == {"train": 1, "backward": 1}


def F_batch_norm(x):
    return nn.functional.batch_norm(x, None, None, training=True)

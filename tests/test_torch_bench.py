"""``python -m fastbn bench --torch`` on a tiny case: every contender runs and the tables
come out (the timings themselves are the benchmark's business, not the tests')."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastbn.torch")

from fastbn import _bench_torch  # noqa: E402


def test_tiny_resnet_case_and_tables():
    lines = []
    r = _bench_torch.run_case(torch, "resnet18", 32, "channels_last", batch=2, repeats=2,
                              log=lambda *a, **k: lines.append(a[0]))
    assert set(r["train_s"]) == {"torch", "fastbn convert", "fastbn optimize", "copy floor",
                                 "without batch norm"}
    assert set(r["infer_s"]) == {"torch", "fastbn convert", "fastbn optimize",
                                 "torch fx conv-bn folding", "torch.jit.freeze"}
    assert all(v > 0 for v in r["train_s"].values())
    assert 0 < r["epilogue_share"] < 1
    assert set(r["epilogue_ms"]) <= set(_bench_torch.EPILOGUE_OPS)
    assert r["fallbacks"] == {}
    # every contender's data stays finite: the bounds, trained on gradients that are not a
    # batch norm's, diverged to NaN within two steps, and NaN changed PyTorch's speed
    assert r["train_nonfinite"] == []
    table = _bench_torch.format_results([r])
    assert "| resnet18 | 2x32² | channels_last |" in table
    assert len(lines) == 2
    if _bench_torch._minor_faults() is not None:
        assert set(r["train_faults"]) == set(r["train_s"])
        assert all(isinstance(v, int) and v >= 0 for v in r["train_faults"].values())
        assert "Minor page faults per training step" in table


def test_fault_counts_are_per_call_medians(monkeypatch):
    counter = iter(range(0, 10 ** 6, 1))
    grows = {"a": 0, "b": 0}

    def faults():
        return next(counter) + 1000 * (grows["a"] + 7 * grows["b"])

    monkeypatch.setattr(_bench_torch, "_minor_faults", faults)

    def call(k):
        def f():
            grows[k] += 1
        return f

    _, times, faults_median = _bench_torch._interleaved({"a": call("a"), "b": call("b")}, 3)
    assert [len(v) for v in times.values()] == [3, 3]
    # each call of "a" adds 1000 faults and "b" 7000, plus one counter step per reading
    assert faults_median == {"a": 1001, "b": 7001}
    monkeypatch.setattr(_bench_torch, "_minor_faults", lambda: None)
    assert _bench_torch._interleaved({"a": call("a")}, 2)[2] == {"a": None}


def test_target_speedup():
    assert _bench_torch.target_speedup(0.25) == pytest.approx(1 / (1 - 0.175))
    assert _bench_torch.target_speedup(0.0) == 1.0


def test_bound_models_replace_every_batch_norm_and_keep_the_graph():
    from fastbn._bench_torch_floor import bound_models

    base, _ = _bench_torch._seeded(torch, "resnet18")
    x = torch.randn(2, 3, 32, 32)
    bounds = bound_models(torch, base)
    assert set(bounds) == {"copy floor", "without batch norm"}
    convs = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)]
    for name, model in bounds.items():
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                       for m in model.modules()), name
        model(x).sum().backward()
        graded = {n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Conv2d) and m.weight.grad is not None}
        assert graded == set(convs), name  # the backward still reaches every convolution
    assert all(p.grad is None for p in base.parameters())  # the model passed in is untouched


@pytest.mark.parametrize("relu", [False, True])
def test_copy_floor_pass_touches_what_a_fused_batch_norm_must(relu):
    from fastbn._bench_torch_floor import _floor_function

    floor = _floor_function(torch)
    act = torch.relu if relu else (lambda t: t)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y = floor.apply(x, res, relu)
    assert torch.equal(y, act(x + res))  # what follows sees ReLU's zeros, as after fastbn
    assert bool((y == 0).any()) == relu
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy + x.detach() * y.detach())
    assert torch.equal(res.grad, x.grad)
    x.grad = None
    y = floor.apply(x, None, relu)
    assert torch.equal(y, act(x)) and y.data_ptr() != x.data_ptr()  # a copy: the bytes written
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy + x.detach() * y.detach())

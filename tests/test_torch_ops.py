"""fastbn.torch's operators and functions against PyTorch's own batch norm (CONTRACT 7)."""

import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fbt = pytest.importorskip("fastbn.torch")

F = torch.nn.functional

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _close(a, b, dtype, **kw):
    torch.testing.assert_close(a, b, check_dtype=True, **(kw or TOL[dtype]))


def _reference(x, rm, rv, w, b, training, momentum, eps, residual, activation):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if activation == "relu" else y


def _leaves(seed, shape, dtype, affine, residual, channels_last):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=dtype) * 3 + 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    x.requires_grad_()
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, generator=g, dtype=dtype).requires_grad_() if affine else None
    r = torch.randn(shape, generator=g, dtype=dtype).requires_grad_() if residual else None
    return x, w, b, r


CASES = [((8, 3), False), ((6, 4, 10), False), ((4, 5, 6, 7), False), ((4, 5, 6, 7), True),
         ((2, 3, 4, 5, 6), False), ((2, 3, 4, 5, 6), True)]


@pytest.mark.parametrize("shape,channels_last", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine,residual,activation",
                         [(True, False, None), (False, False, None), (True, False, "relu"),
                          (True, True, "relu"), (False, True, None)])
def test_outputs_gradients_and_running_stats_match_torch(shape, channels_last, dtype, training,
                                                         affine, residual, activation):
    x, w, b, r = _leaves(len(shape), shape, dtype, affine, residual, channels_last)
    c = shape[1]
    ours_rm, ours_rv = torch.linspace(-1, 1, c, dtype=dtype), torch.linspace(0.5, 2, c,
                                                                              dtype=dtype)
    theirs_rm, theirs_rv = ours_rm.clone(), ours_rv.clone()
    y = fbt.batch_norm_act(x, ours_rm, ours_rv, w, b, training, 0.3, 1e-4, residual=r,
                           activation=activation)
    ref = _reference(x, theirs_rm, theirs_rv, w, b, training, 0.3, 1e-4, r, activation)
    _close(y, ref, dtype)
    assert y.is_contiguous(memory_format=torch.channels_last) == (
        channels_last and x.dim() == 4)
    _close(ours_rm, theirs_rm, dtype)
    _close(ours_rv, theirs_rv, dtype)
    leaves = [t for t in (x, w, b, r) if t is not None]
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    for ours, theirs in zip(torch.autograd.grad(y, leaves, dy),
                            torch.autograd.grad(ref, leaves, dy)):
        _close(ours, theirs, dtype)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,activation", [(False, None), (True, "relu")])
def test_gradcheck_float64(training, residual, activation):
    x, w, b, r = _leaves(3, (3, 2, 4, 3), torch.float64, True, residual, False)
    rm, rv = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor(
        [2.0, 0.5], dtype=torch.float64)

    def f(x, w, b, *r):
        return fbt.batch_norm_act(x, None if training else rm, None if training else rv, w, b,
                                  training, 0.1, 1e-5, residual=r[0] if r else None,
                                  activation=activation)

    assert torch.autograd.gradcheck(f, (x, w, b) + ((r,) if residual else ()))
    assert torch.autograd.gradgradcheck(f, (x, w, b) + ((r,) if residual else ()))


def test_batch_norm_is_functional_batch_norm(rng):
    x = torch.from_numpy(rng.normal(1, 2, (5, 4, 3)).astype(np.float32))
    rm, rv = torch.zeros(4), torch.ones(4)
    rm2, rv2 = rm.clone(), rv.clone()
    _close(fbt.batch_norm(x, rm, rv, training=True), F.batch_norm(x, rm2, rv2, training=True),
           torch.float32)
    _close(rm, rm2, torch.float32)
    _close(fbt.batch_norm(x, rm, rv), F.batch_norm(x, rm2, rv2), torch.float32)


def test_fallback_for_bfloat16_is_counted_and_correct():
    x = torch.randn(4, 3, 5, 5).to(torch.bfloat16).requires_grad_()
    rm, rv = torch.zeros(3), torch.ones(3)
    fbt.reset_stats()
    y = fbt.batch_norm_act(x, rm, rv, None, None, True, 0.1, 1e-5, activation="relu")
    ref = torch.relu(F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True))
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    s = fbt.stats()
    assert s["fallback"] == {"train": 1, "backward": 1}
    assert s["fallback_reasons"] == {"dtype torch.bfloat16": 2}
    assert s["fastbn"] == {}
    assert rm.abs().sum() > 0  # running statistics updated on the fallback too


@pytest.mark.parametrize("case", ["negative-bit input", "negative-bit weight",
                                  "float64 running stats on float32"])
def test_the_short_road_refuses_what_the_checks_refuse(case):
    """The operators try fastbn's short road to the kernels before any other check
    (fastbn.torch._host), so it must refuse what they refuse: a negative-bit view (whose
    ``numpy()`` is not its values) or a bfloat16 parameter goes to PyTorch's kernel,
    counted; running statistics of another float dtype than the input run on fastbn."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 3, 5, 6, generator=g) * 2 + 1
    w0, b0 = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    rm, rv = torch.zeros(3), torch.ones(3)
    x, w, b = x0, w0, b0
    expect = {"fallback": {"train": 1, "backward": 1}}
    if case == "negative-bit input":
        x = torch._neg_view(-x0)
        expect["fallback_reasons"] = {"not a plain strided tensor": 2}
    elif case == "negative-bit weight":
        w = torch._neg_view(-w0)
        expect["fallback_reasons"] = {"not a plain strided tensor": 2}
    else:
        rm, rv = rm.double(), rv.double()
        expect = {"fastbn": {"train": 1, "backward": 1}}
    assert x.is_neg() == (case == "negative-bit input")
    xl = x.detach().clone() if case != "negative-bit input" else x
    xl.requires_grad_()
    rm2, rv2 = torch.zeros(3), torch.ones(3)
    fbt.reset_stats()
    y = fbt.batch_norm_act(xl, rm, rv, w, b, True, 0.1, 1e-5, activation="relu")
    dy = torch.randn(y.shape, generator=g)
    (gx,) = torch.autograd.grad(y, xl, dy)
    s = fbt.stats()
    for kind, counts in expect.items():
        assert s[kind] == counts
    xr = x0.clone().requires_grad_()
    ref = torch.relu(F.batch_norm(xr, rm2, rv2, w0, b0, True, 0.1, 1e-5))
    (ex,) = torch.autograd.grad(ref, xr, dy)
    torch.testing.assert_close(y, ref.detach(), **TOL[torch.float32])
    torch.testing.assert_close(gx, ex, **TOL[torch.float32])
    torch.testing.assert_close(rm.float(), rm2, **TOL[torch.float32])


def test_half_running_statistics_fall_back():
    x = torch.randn(4, 3, 5).half()
    rm, rv = torch.zeros(3).half(), torch.ones(3).half()
    fbt.reset_stats()
    fbt.batch_norm(x, rm, rv, training=True)
    assert fbt.stats()["fallback_reasons"] == {"running statistics of dtype torch.float16": 1}


def test_float16_input_with_float32_parameters_runs_on_fastbn():
    x = (torch.randn(4, 3, 6, 6) * 100 + 1000).half()
    rm, rv = torch.zeros(3), torch.ones(3)
    fbt.reset_stats()
    y = fbt.batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), training=True)
    assert fbt.stats()["fastbn"] == {"train": 1}
    ref = F.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(y.double(), ref, atol=2e-3, rtol=1e-3)


def test_bad_arguments_raise_and_change_nothing():
    x = torch.randn(1, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fbt.batch_norm(x, rm, rv, training=True)
    with pytest.raises(ValueError, match="activation"):
        fbt.batch_norm_act(torch.randn(4, 3), rm, rv, activation="gelu")
    with pytest.raises(ValueError, match="residual"):
        fbt.batch_norm_act(torch.randn(4, 3), rm, rv, residual=torch.randn(4, 2))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def _kernel_modules():
    """The kernels' module and its serial twins (fastbn.torch's small calls run those)."""
    from fastbn._cpu import backend, kernels
    return kernels, backend.serial_kernels()


def _spy_kernel(monkeypatch, name, record):
    """Call ``record(args, kwargs)`` on every call of kernel plan ``name``, parallel or
    serial."""
    for module in _kernel_modules():
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            record(args, kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


def _record_arrays(monkeypatch, name):
    """The arrays of every call of kernel plan ``name``."""
    seen = []
    _spy_kernel(monkeypatch, name, lambda args, kwargs: seen.append(
        [a for a in list(args) + list(kwargs.values()) if isinstance(a, np.ndarray)]))
    return seen


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_no_copies_of_activations(monkeypatch, fmt):
    """The kernels see the tensors' own memory, write into tensors PyTorch allocated, and
    NumPy allocates nothing of activation size."""
    shape = (8, 16, 32, 32)
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    r = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
    rm, rv = torch.zeros(16), torch.ones(16)
    fwd = _record_arrays(monkeypatch, "run_forward_train")
    bwd = _record_arrays(monkeypatch, "run_backward_train")
    fbt.batch_norm_act(x, rm, rv, w, b, True, residual=r).sum().backward()  # compiled
    fwd.clear(), bwd.clear()
    tracemalloc.start()
    y = fbt.batch_norm_act(x, rm, rv, w, b, True, residual=r)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    gx, gr = torch.autograd.grad(y, (x, r), dy)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.numel() * 4 / 16, f"NumPy allocated {peak} bytes"
    address = lambda a: a.__array_interface__["data"][0]  # noqa: E731
    big = lambda arrays: sorted(address(a) for a in arrays if a.size == x.numel())  # noqa: E731
    assert big(fwd[0]) == sorted([x.data_ptr(), r.data_ptr(), y.data_ptr()])
    assert big(bwd[0]) == sorted([dy.data_ptr(), x.data_ptr(), y.data_ptr(), gx.data_ptr(),
                                  gr.data_ptr()])
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


def test_same_bits_for_any_thread_count():
    import fastbn

    x = (torch.randn(16, 8, 24, 24) * 5 + 3).contiguous(memory_format=torch.channels_last)
    r = torch.randn(16, 8, 24, 24)
    w, b = torch.rand(8) + 0.5, torch.randn(8)

    def run():
        xx = x.clone().requires_grad_()
        rr = r.clone().requires_grad_()
        rm, rv = torch.zeros(8), torch.ones(8)
        y = fbt.batch_norm_act(xx, rm, rv, w, b, True, residual=rr)
        gx, gr = torch.autograd.grad(y, (xx, rr), torch.ones_like(y))
        return [y, gx, gr, rm, rv]

    with fastbn.threads(1):
        serial = run()
    for a, b_ in zip(serial, run()):
        assert torch.equal(a, b_)


def test_forked_workers_after_use_in_the_parent():
    """A multiprocessing 'fork' pool (a DataLoader's workers) after the parent ran
    fastbn's operators: the children compute the same bits, and nothing hangs."""
    import multiprocessing

    x = torch.randn(8, 4, 6, 6)
    expected = fbt.batch_norm(x, None, None, training=True)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map_async(_child_batch_norm, [x.numpy()] * 2).get(timeout=300)
    for y in results:
        assert torch.equal(torch.from_numpy(y), expected)


def _child_batch_norm(x):
    return fbt.batch_norm(torch.from_numpy(x), None, None, training=True).numpy()


def test_kernels_use_at_most_torchs_thread_count(monkeypatch):
    import fastbn

    seen = []  # the cap in force around each kernel call
    _spy_kernel(monkeypatch, "run_forward_train",
                lambda args, kwargs: seen.append(fastbn._threads.limit()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what a DataLoader worker runs with
        fbt.batch_norm(torch.randn(8, 3, 4), None, None, training=True)
    finally:
        torch.set_num_threads(before)
    fbt.batch_norm(torch.randn(8, 3, 4), None, None, training=True)
    assert seen == [1, max(1, before)]


def _all_results(x, r, w, b, relu):
    """Training forward (outputs, running statistics), backward (every gradient) and
    inference of the operators on leaves like ``x``, ``r``, ``w``, ``b``."""
    xx, rr = x.clone().requires_grad_(), None if r is None else r.clone().requires_grad_()
    ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
    c = x.shape[1]
    rm, rv = torch.linspace(-1, 1, c, dtype=x.dtype), torch.linspace(0.5, 2, c, dtype=x.dtype)
    act = "relu" if relu else None
    y = fbt.batch_norm_act(xx, rm, rv, ww, bb, True, 0.3, 1e-4, residual=rr, activation=act)
    leaves = [t for t in (xx, rr, ww, bb) if t is not None]
    grads = torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=torch.Generator()
                                                       .manual_seed(3), dtype=y.dtype)
                                .contiguous(memory_format=_format_of(y)))
    inf = fbt.batch_norm_act(x, rm, rv, w, b, False, eps=1e-4, residual=r, activation=act)
    return [y, rm, rv, *grads, inf]


def _format_of(t):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@pytest.mark.parametrize("shape,channels_last", [((8, 3), False), ((6, 4, 10), False),
                                                 ((4, 5, 6, 7), False), ((4, 5, 6, 7), True),
                                                 ((16, 40, 3, 3), True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("residual,relu", [(False, False), (True, True), (False, True)])
def test_the_short_road_gives_the_general_apis_bits(monkeypatch, shape, channels_last, dtype,
                                                    residual, relu):
    """CPU tensors of float32/64, contiguous or channels_last, go straight to the kernels'
    plans (fastbn.torch._host), never through fastbn's NumPy API; forced through that API
    instead, every output, gradient and running statistic has the same bits."""
    import fastbn
    from fastbn.torch import _host

    x, w, b, r = _leaves(7, shape, dtype, True, residual, channels_last)
    x, w, b = x.detach(), w.detach(), b.detach()
    r = None if r is None else r.detach().contiguous(memory_format=_format_of(x))

    def refuse(*args, **kwargs):
        raise AssertionError("the general API was called")

    with monkeypatch.context() as m:
        for name in ("batch_norm_forward", "batch_norm_backward", "batch_norm_inference"):
            m.setattr(fastbn, name, refuse)
        short = _all_results(x, r, w, b, relu)
    with monkeypatch.context() as m:
        for name in ("forward_train", "backward_train", "inference"):
            m.setattr(_host, name, lambda *args, **kwargs: None)
        general = _all_results(x, r, w, b, relu)
    assert len(short) == len(general)
    for a, b_ in zip(short, general):
        assert a.dtype == b_.dtype and a.stride() == b_.stride()
        assert torch.equal(a, b_)


@pytest.mark.parametrize("case", ["float16", "strided", "residual-other-layout",
                                  "grad-other-layout"])
def test_what_the_short_road_does_not_take_goes_through_the_api(monkeypatch, case):
    import fastbn

    calls = []
    for name in ("batch_norm_forward", "batch_norm_backward"):
        real = getattr(fastbn, name)
        monkeypatch.setattr(fastbn, name, lambda *a, _real=real, _name=name, **k:
                            calls.append(_name) or _real(*a, **k))
    base = torch.randn(6, 4, 5, 8, dtype=torch.float64) * 2 + 1
    rbase = torch.randn(6, 4, 5, 8, dtype=torch.float64)
    x, r = base, rbase
    dy = torch.randn_like(base)
    if case == "float16":
        x, r, dy = x.half(), r.half(), dy.half()
    elif case == "strided":
        x, r, dy = x[..., ::2], r[..., ::2], dy[..., ::2]
        assert not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    elif case == "residual-other-layout":
        r = r.contiguous(memory_format=torch.channels_last)
    else:
        dy = dy.contiguous(memory_format=torch.channels_last)
    if case == "strided":  # a clone would be contiguous: slice the leaves themselves
        xl, rl = base.clone().requires_grad_(), rbase.clone().requires_grad_()
        xx, rr = xl[..., ::2], rl[..., ::2]
    else:
        xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = fbt.batch_norm_act(xx, None, None, None, None, True, residual=rr)
    gx, gr = torch.autograd.grad(y, (xx, rr), dy)
    tol = TOL.get(x.dtype, dict(rtol=1e-2, atol=1e-2))
    xr, rr2 = x.double().requires_grad_(), r.double().requires_grad_()
    ref = torch.relu(F.batch_norm(xr, None, None, None, None, True) + rr2)
    ex, er = torch.autograd.grad(ref, (xr, rr2), dy.double())
    _close(y.double(), ref.detach(), torch.float64, **tol)
    _close(gx.double(), ex, torch.float64, **tol)
    _close(gr.double(), er, torch.float64, **tol)
    expected = {"float16": ["batch_norm_forward", "batch_norm_backward"],
                "strided": ["batch_norm_forward", "batch_norm_backward"],
                "residual-other-layout": ["batch_norm_forward"],
                "grad-other-layout": ["batch_norm_backward"]}[case]
    assert calls == expected


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual,relu", [(False, False), (True, True)])
def test_eager_calls_and_the_registered_operators_give_the_same_bits(channels_last, residual,
                                                                      relu):
    """Eager calls on plain CPU tensors skip the operators' dispatch (an autograd.Function
    on the same implementation); under a dispatch mode, as under torch.compile, fx or
    fake tensors, the registered operators run: same outputs, gradients and running
    statistics, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    x, w, b, r = _leaves(11, (6, 5, 4, 3), torch.float32, True, residual, channels_last)
    x, w, b = x.detach(), w.detach(), b.detach()
    r = None if r is None else r.detach()
    eager = _all_results(x, r, w, b, relu)
    with Seen() as seen:
        registered = _all_results(x, r, w, b, relu)
    assert {"fastbn.batch_norm_train.default", "fastbn.batch_norm_backward.default",
            "fastbn.batch_norm_infer.default"} <= seen.ops
    for a, b_ in zip(eager, registered):
        assert torch.equal(a, b_)


def test_small_calls_run_the_serial_twins_and_large_ones_the_threads(monkeypatch):
    """Below fastbn.torch._host.SERIAL_MAX_BYTES a call runs on the calling thread, outside
    the threading layer (PyTorch's own workers hold the other cores right after a
    convolution); above it, on fastbn's threads.  Same bits either way."""
    from fastbn.torch import _host

    kernels, serial = _kernel_modules()
    ran = []
    for module, tag in ((kernels, "parallel"), (serial, "serial")):
        real = module.run_forward_train
        monkeypatch.setattr(module, "run_forward_train",
                            lambda *a, _real=real, _tag=tag, **k: ran.append(_tag) or _real(*a, **k))
    # channels_last: the column path, under SERIAL_MAX_BYTES
    x = (torch.randn(8, 16, 12, 12) * 2 + 1).contiguous(memory_format=torch.channels_last)
    small = fbt.batch_norm(x, None, None, training=True)
    monkeypatch.setattr(_host, "CHANNEL_SERIAL_MAX_BYTES", 0)  # not this path's threshold
    assert torch.equal(fbt.batch_norm(x, None, None, training=True), small)
    monkeypatch.setattr(_host, "SERIAL_MAX_BYTES", 0)
    large = fbt.batch_norm(x, None, None, training=True)
    assert ran == ["serial", "serial", "parallel"]
    assert torch.equal(small, large)
    # contiguous runs of 144 values: the channel path, under CHANNEL_SERIAL_MAX_BYTES
    ran.clear()
    x = x.contiguous()
    monkeypatch.setattr(_host, "SERIAL_MAX_BYTES", 8 << 20)
    monkeypatch.setattr(_host, "CHANNEL_SERIAL_MAX_BYTES", 2 << 20)
    small = fbt.batch_norm(x, None, None, training=True)
    monkeypatch.setattr(_host, "CHANNEL_SERIAL_MAX_BYTES", 0)
    large = fbt.batch_norm(x, None, None, training=True)
    assert ran == ["serial", "parallel"]
    assert torch.equal(small, large)

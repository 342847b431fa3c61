"""Every launch of a call goes to the caller's stream, and results are ordered on it.

Under the simulator streams run nothing concurrently, so what can be checked there
is where each launch and allocation goes; the races themselves are checked on a
GPU (``gpu`` tests: a side stream kept busy before it writes the input, so that
work on any other stream would read the input too early).
"""

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import host
from helpers import make


@pytest.fixture
def launches(monkeypatch):
    """The stream of every kernel launch in fastbn._cuda.kernels, in order."""
    from fastbn._cuda import kernels

    seen = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, config):
            seen.append(config[2] if len(config) > 2 else None)
            return self.kernel[config]

    for name in dir(kernels):
        obj = getattr(kernels, name)
        if hasattr(obj, "py_func") and not name.startswith("_"):
            monkeypatch.setattr(kernels, name, Recorded(obj))
    return seen


def _on_stream(a, stream):
    from numba import cuda

    d = cuda.device_array(a.shape, a.dtype, stream=stream)
    d.copy_to_device(a, stream=stream)
    return d


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_launch_goes_to_the_stream_of_x(rng, launches, dtype):
    from numba import cuda

    stream = cuda.stream()
    x = make(rng, (6, 3, 5), dtype, offset=2.0)
    xd = _on_stream(x, stream)
    w = _on_stream(rng.uniform(0.5, 2.0, 3), stream)
    y, mean, invstd = fastbn.batch_norm_forward(xd, w)
    dx, dw, db = fastbn.batch_norm_backward(xd, xd, mean, invstd, w)
    fastbn.batch_norm_inference(xd, mean, invstd, w)
    fastbn.batch_stats(xd)
    fastbn.standardize(xd, axis=1)
    fastbn.minmax_scale(xd, axis=1)
    assert launches and all(s is stream for s in launches)
    for result in (y, mean, invstd, dx, dw, db):
        assert result.stream is stream
    stream.synchronize()
    np.testing.assert_allclose(host(y).astype(np.float64), ref.forward(x, host(w))[0],
                               atol=5e-3 if dtype == np.float16 else 1e-5)


def _busy(stream_ptr, milliseconds):
    """Keep the stream with handle ``stream_ptr`` busy for about ``milliseconds``."""
    from numba import cuda

    @cuda.jit
    def spin(n):
        for _ in range(n):
            cuda.nanosleep(1000)

    spin[1, 1, cuda.external_stream(stream_ptr)](milliseconds * 1000)


@pytest.mark.gpu
def test_torch_side_stream_orders_the_call():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA build of torch")
    x = make(np.random.default_rng(1), (64, 32, 33), np.float32, offset=2.0)
    src = torch.as_tensor(x, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        _busy(side.cuda_stream, 50)
        xt = src * 1.0                                   # written on side, 50 ms late
        y, mean, invstd = fastbn.batch_norm_forward(xt)  # must read it on side
        dx, _, _ = fastbn.batch_norm_backward(xt, xt, mean, invstd)
        y_after, dx_after = y.clone(), dx.clone()
    side.synchronize()
    np.testing.assert_allclose(y_after.cpu().numpy(), ref.forward(x)[0], atol=1e-5)
    np.testing.assert_allclose(dx_after.cpu().numpy(),
                               ref.backward(x, x, mean.cpu().numpy(), invstd.cpu().numpy())[0],
                               atol=1e-4)


@pytest.mark.gpu
def test_cupy_stream_orders_the_call():
    cupy = pytest.importorskip("cupy")
    x = make(np.random.default_rng(2), (64, 32, 33), np.float32, offset=2.0)
    src = cupy.asarray(x)
    with cupy.cuda.Stream(non_blocking=True) as side:
        _busy(side.ptr, 50)
        xc = src * 1.0
        y, _, _ = fastbn.batch_norm_forward(xc)
        y_after = y.copy()
    side.synchronize()
    np.testing.assert_allclose(cupy.asnumpy(y_after), ref.forward(x)[0], atol=1e-5)

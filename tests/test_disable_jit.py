"""``NUMBA_DISABLE_JIT=1`` (people debug with it): the Python API still works, in plain
NumPy, with the same results within docs/contract.md section 5."""

import os
import subprocess
import sys

CODE = r"""
import numba, numpy as np
assert numba.config.DISABLE_JIT
import fastbn
from fastbn._dispatch import host_backend
assert host_backend().name == "numpy"
rng = np.random.default_rng(0)
for shape, axis in [((6, 4, 9, 9), 1), ((50, 7), -1)]:
    x = rng.normal(1e3, 3.0, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    c = shape[axis]
    x64 = np.moveaxis(x.astype(np.float64), axis, -1)
    mean = x64.reshape(-1, c).mean(0)
    var = x64.reshape(-1, c).var(0)
    ref = np.moveaxis((x64 - mean) / np.sqrt(var + 1e-5), -1, axis)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, m, inv = fastbn.batch_norm_forward(x, axis=axis, running_mean=rm, running_var=rv)
    assert y.dtype == np.float32 and np.abs(y - ref).max() < 1e-5, np.abs(y - ref).max()
    dx, dw, db = fastbn.batch_norm_backward(dy, x, m, inv, axis=axis)
    assert np.isfinite(dx).all() and abs(db.sum() - dy.sum()) < 1e-2
    yi = fastbn.batch_norm_inference(x, m, 1 / inv.astype(np.float64) ** 2 - 1e-5, axis=axis)
    assert np.abs(yi - ref).max() < 1e-3
    n, m2, v2 = fastbn.batch_stats(x, axis=axis)
    assert np.allclose(m2, mean, rtol=1e-6) and np.allclose(v2, var, rtol=1e-5)
    z = fastbn.standardize(x, axis=axis)
    assert np.abs(z - np.moveaxis((x64 - mean) / np.sqrt(var), -1, axis)).max() < 1e-4
    mm = fastbn.minmax_scale(x, axis=axis)
    assert mm.min() == 0 and abs(mm.max() - 1) < 1e-6
    bn = fastbn.BatchNorm(c, axis=axis)
    bn(x); bn.backward(dy)
    assert bn.grad_weight.shape == (c,)
w = rng.uniform(0.0, 2.0, 50)
xw = rng.normal(1e3, 3.0, (50, 3))
xw[4, 1] = np.nan
sc = fastbn.StandardScaler().fit(xw, sample_weight=w)
ok = ~np.isnan(xw)
wm = (np.where(ok, xw, 0) * w[:, None]).sum(0) / (ok * w[:, None]).sum(0)
wv = (np.where(ok, (xw - wm) ** 2, 0) * w[:, None]).sum(0) / (ok * w[:, None]).sum(0)
assert np.allclose(sc.mean_, wm, rtol=1e-12) and np.allclose(sc.var_, wv, rtol=1e-9)
fastbn.warmup()
print("ok")
"""


def test_the_api_works_with_the_jit_disabled():
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    proc = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout

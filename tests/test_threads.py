"""Several Python threads calling at once get the same results as one at a time."""

import threading

import numpy as np

import fastbn


def test_eight_threads_at_once(rng):
    # the last two are over the streaming-store threshold (4 MiB)
    shapes = [(8, 16, 80), (4, 2, 64, 72), (500, 12), (6, 5, 5, 20), (8, 16, 96, 96),
              (12_000, 100)]
    axes = [1, 1, 1, -1, 1, -1]
    cases = []
    for k in range(8):
        shape, axis = shapes[k % len(shapes)], axes[k % len(shapes)]
        x = rng.normal(k, 1 + k, shape).astype(np.float32 if k % 2 else np.float64)
        dy = rng.normal(size=shape).astype(x.dtype)
        cases.append((x, dy, axis))

    def run(x, dy, axis):
        y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
        dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
        return y, mean, invstd, dx, dw, db

    expected = [run(*case) for case in cases]
    results = [[] for _ in cases]
    errors = []
    barrier = threading.Barrier(len(cases))

    def worker(k):
        try:
            barrier.wait()
            for _ in range(5):
                results[k].append(run(*cases[k]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k, runs in enumerate(results):
        assert len(runs) == 5
        for got in runs:
            for a, b in zip(got, expected[k]):
                np.testing.assert_array_equal(a, b)

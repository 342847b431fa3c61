"""``python -m fastbn demo``: the quick run writes its numbers and figures, and the
experiments' code measures what it says (on fixed seeds)."""

import json

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo's data sets come with scikit-learn")

from fastbn.examples import demo  # noqa: E402
from fastbn.examples.nn import MLP  # noqa: E402


def test_quick_demo_writes_numbers_and_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import fastbn.__main__ as cli

    cli.main(["demo", "--quick", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    results = json.loads((tmp_path / "demo.json").read_text())
    for name in demo.EXPERIMENTS:
        assert results[name]["holds"] in (True, False, None)
        assert results[name]["verdict"] and name in out
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    runs = demo._runs(demo.SETTINGS["quick"])
    assert f"] {runs}/{runs} " in err  # the progress bar counted every training run
    # spreads over seeds are recorded, not just means
    knn = results["units"]["knn_test_accuracy"]["StandardScaler"]
    assert len(knn["runs"]) == demo.SETTINGS["quick"]["seeds"] and knn["std"] >= 0


def test_batch_norm_trains_at_a_rate_where_the_plain_network_diverges():
    xtr, ytr, xte, yte = demo._digits(seed=0)
    hist = {}
    for bn in (False, True):
        model = MLP([64, 64, 64, 10], np.random.default_rng(0), batch_norm=bn)
        hist[bn] = demo.train(model, xtr, ytr, xte, yte, lr=3.0, epochs=3, seed=0)
    plain, normalized = hist[False], hist[True]
    assert plain["diverged"] or plain["train_acc"][-1] < 0.3
    assert not normalized["diverged"] and normalized["test_acc"][-1] > 0.85


def test_rescaled_feature_dominates_distances_until_scaled():
    r = demo.units({"seeds": 1, "epochs": 2}, demo.Progress(3, stream=open("/dev/null", "w")))
    share = r["rescaled_feature_share_of_distance_variance"]
    assert share["raw (alcohol x1000)"]["mean"] > 0.5
    assert share["StandardScaler"]["mean"] == pytest.approx(1 / 13, rel=1e-6)
    assert (r["knn_test_accuracy"]["StandardScaler"]["mean"]
            > r["knn_test_accuracy"]["raw (alcohol x1000)"]["mean"])

"""``python -m fastbn demo``: what normalization does, measured on data sets that
scikit-learn ships (no download), with NumPy networks (``fastbn.examples.nn``) whose
batch normalization is ``fastbn.BatchNorm`` and whose input scaling is fastbn's scalers.

One experiment per claim of the textbook story; each returns its numbers and a verdict
that the numbers decide (``holds``: True, False, or None where the run cannot tell),
and draws a figure.  ``run`` writes them all: ``DIR/demo.json``, one PNG per experiment
and ``DIR/summary.png``.  Fixed seeds: the same command gives the same numbers on the
same machine.
"""

import json
import math
import os
import sys
import time

import numpy as np

from .. import MinMaxScaler, StandardScaler
from .nn import MLP, sgd_step, softmax_cross_entropy

# sizes of each experiment: --quick (CI, under a minute) and the full run
SETTINGS = {
    "quick": {"seeds": 2, "epochs": 6, "lrs": [0.01, 0.1, 1.0, 3.0], "depth": 16,
              "depth_epochs": 3, "reg_epochs": 15},
    "full": {"seeds": 5, "epochs": 30, "lrs": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "depth": 24,
             "depth_epochs": 15, "reg_epochs": 100},
}
BATCH = 64
TRAINS = 0.8  # a run "trains" when its final training accuracy reaches this
TARGET = 0.9  # test accuracy counted in epochs-to-target


# ----------------------------------------------------------------- data and training

def _split(x, y, seed, train_fraction=0.7):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    cut = int(train_fraction * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _digits(seed, train_fraction=0.7):
    from sklearn.datasets import load_digits

    data = load_digits()
    xtr, ytr, xte, yte = _split(data.data.astype(np.float32), data.target, seed,
                                train_fraction)
    scaler = StandardScaler().fit(xtr)
    return scaler.transform(xtr), ytr, scaler.transform(xte), yte


def accuracy(model, x, y):
    model.eval()
    pred = model.forward(x).argmax(axis=1)
    model.train()
    return float((pred == y).mean())


def train(model, xtr, ytr, xte, yte, lr, epochs, seed, on_epoch=None):
    """Plain SGD with mini-batches of ``BATCH``, shuffled by ``seed``.  Returns the history
    (per epoch: training loss, training and test accuracy) and whether it diverged (a
    non-finite loss stops the run)."""
    rng = np.random.default_rng(seed + 1000)
    hist = {"loss": [], "train_acc": [], "test_acc": [], "diverged": False}
    n = len(ytr)
    for epoch in range(epochs):
        order = rng.permutation(n)
        losses = []
        for start in range(0, n - BATCH + 1, BATCH):  # whole batches only
            idx = order[start:start + BATCH]
            with np.errstate(all="ignore"):
                logits = model.forward(xtr[idx])
                loss, dlogits = softmax_cross_entropy(logits, ytr[idx])
            if not np.isfinite(loss) or not np.all(np.isfinite(dlogits)):
                hist["diverged"] = True
                break
            losses.append(loss)
            with np.errstate(all="ignore"):
                model.backward(dlogits)
            sgd_step(model.params(), lr)
            if on_epoch is not None and start == 0:
                on_epoch(epoch, model)
        if hist["diverged"]:
            break
        with np.errstate(all="ignore"):
            hist["loss"].append(float(np.mean(losses)))
            hist["train_acc"].append(accuracy(model, xtr, ytr))
            hist["test_acc"].append(accuracy(model, xte, yte))
    return hist


class Progress:
    """A progress bar on stderr, one step per training run."""

    def __init__(self, total, stream=None):
        self.total, self.done, self.t0 = max(1, total), 0, time.time()
        self.stream = sys.stderr if stream is None else stream

    def step(self, label=""):
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total)
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                          f"{time.time() - self.t0:5.1f} s {label:<40.40}")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _clearly_less(a, b):
    """Whether ``a``'s mean is below ``b``'s by more than two standard errors of the
    difference (``_mean_std`` records over seeds): less than that is noise."""
    na, nb = len(a["runs"]), len(b["runs"])
    se = math.sqrt(a["std"] ** 2 / max(na - 1, 1) + b["std"] ** 2 / max(nb - 1, 1))
    return b["mean"] - a["mean"] > 2 * se


def _mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "runs": values.tolist()}


# ----------------------------------------------------------------- 1. units

def knn_accuracy(xtr, ytr, xte, yte, k=5):
    """k-nearest neighbours (Euclidean, majority vote), NumPy."""
    d2 = ((xte[:, None, :] - xtr[None, :, :]) ** 2).sum(axis=2)
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]
    votes = ytr[nearest]
    pred = np.array([np.bincount(v).argmax() for v in votes])
    return float((pred == yte).mean())


def units(settings, progress):
    """Wine with one feature (alcohol, in % vol) in another unit (x1000): k-nearest
    neighbours and a softmax regression trained with SGD, on the raw features and after
    ``StandardScaler`` / ``MinMaxScaler``; which feature dominates the distances."""
    from sklearn.datasets import load_wine

    data = load_wine()
    x = data.data.astype(np.float32)  # one dtype for the whole demo: one set of kernels
    feature = 0
    x[:, feature] *= 1000.0
    names = list(data.feature_names)
    scalings = {"raw (alcohol x1000)": None, "StandardScaler": StandardScaler,
                "MinMaxScaler": MinMaxScaler}
    knn, sgd, share = ({name: [] for name in scalings} for _ in range(3))
    for seed in range(settings["seeds"]):
        xtr, ytr, xte, yte = _split(x, data.target, seed)
        for name, scaler in scalings.items():
            if scaler is None:
                a, b = xtr, xte
            else:
                s = scaler().fit(xtr)
                a, b = s.transform(xtr), s.transform(xte)
            knn[name].append(knn_accuracy(a, ytr, b, yte))
            var = a.var(axis=0)
            share[name].append(float(var[feature] / var.sum()))
            model = MLP([a.shape[1], 3], np.random.default_rng(seed))
            hist = train(model, a, ytr, b, yte, lr=0.05, epochs=settings["epochs"] * 4,
                         seed=seed)
            sgd[name].append(0.0 if hist["diverged"] else hist["test_acc"][-1])
            progress.step(f"units: {name}")
    raw, std = "raw (alcohol x1000)", "StandardScaler"
    result = {
        "feature": names[feature],
        "knn_test_accuracy": {k: _mean_std(v) for k, v in knn.items()},
        "sgd_softmax_test_accuracy": {k: _mean_std(v) for k, v in sgd.items()},
        "rescaled_feature_share_of_distance_variance": {k: _mean_std(v) for k, v in share.items()},
    }
    gain = np.mean(knn[std]) - np.mean(knn[raw])
    result["holds"] = bool(gain > 0.05 and np.mean(share[raw]) > 0.5)
    result["verdict"] = (
        f"k-NN: {np.mean(knn[raw]):.2f} test accuracy on the raw features, where the "
        f"rescaled feature carries {100 * np.mean(share[raw]):.1f}% of the distance "
        f"variance; {np.mean(knn[std]):.2f} after StandardScaler "
        f"({100 * np.mean(share[std]):.1f}%), {np.mean(knn['MinMaxScaler']):.2f} after "
        f"MinMaxScaler. SGD softmax regression: {np.mean(sgd[raw]):.2f} raw, "
        f"{np.mean(sgd[std]):.2f} standardized.")
    return result


def _draw_units(ax, r):
    names = list(r["knn_test_accuracy"])
    pos = np.arange(len(names))
    for k, (key, label) in enumerate([("knn_test_accuracy", "5-NN"),
                                      ("sgd_softmax_test_accuracy", "SGD softmax")]):
        means = [r[key][n]["mean"] for n in names]
        stds = [r[key][n]["std"] for n in names]
        ax.bar(pos + 0.4 * k, means, 0.4, yerr=stds, label=label)
    ax.set_xticks(pos + 0.2)
    ax.set_xticklabels([n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("units: wine, alcohol x1000")
    ax.legend(fontsize=7)


# ----------------------------------------------------------------- 2. covariate shift

def _probe(model, x):
    """Each hidden layer's pre-activations on ``x``, the model's state left as it was."""
    state = [(l.bn.running_mean.copy(), l.bn.running_var.copy(),
              l.bn.num_batches_tracked.copy()) for l in model.layers if hasattr(l, "bn")]
    taps = []
    model.forward(x, taps=taps)
    for layer, (m, v, n) in zip([l for l in model.layers if hasattr(l, "bn")], state):
        layer.bn.running_mean[...] = m
        layer.bn.running_var[...] = v
        layer.bn.num_batches_tracked[...] = n
    return taps


def covariate_shift(settings, progress, layer=1, lr=0.1):
    """Digits, a 3-hidden-layer MLP: the mean and standard deviation of hidden layer
    ``layer``'s pre-activations on a fixed batch, at every epoch, with and without batch
    normalization; drift is how far each unit's mean moves from its first value, in units
    of that first spread."""
    curves, drift = {}, {}
    for bn in (False, True):
        key = "batch norm" if bn else "plain"
        runs = []
        for seed in range(settings["seeds"]):
            xtr, ytr, xte, yte = _digits(seed)
            probe = xtr[:256]
            model = MLP([64, 100, 100, 100, 10], np.random.default_rng(seed), batch_norm=bn)
            means, stds = [], []

            def record(epoch, m):
                z = _probe(m, probe)[layer].astype(np.float64)
                means.append(z.mean(axis=0))
                stds.append(z.std(axis=0))
            train(model, xtr, ytr, xte, yte, lr, settings["epochs"], seed, on_epoch=record)
            record(None, model)
            means, stds = np.array(means), np.array(stds)
            shift = np.abs(means - means[0]) / (stds[0] + 1e-12)
            runs.append({"mean_of_means": means.mean(axis=1).tolist(),
                         "mean_of_stds": stds.mean(axis=1).tolist(),
                         "drift": float(shift[-1].mean()),
                         "std_change": float(np.abs(np.log(stds[-1] / (stds[0] + 1e-12))).mean())})
            progress.step(f"covariate shift: {key}")
        curves[key] = runs
        drift[key] = _mean_std([r["drift"] for r in runs])
    result = {"layer": layer + 1, "lr": lr, "curves": curves, "drift": drift,
              "std_change": {k: _mean_std([r["std_change"] for r in v]) for k, v in curves.items()}}
    plain, bn = drift["plain"]["mean"], drift["batch norm"]["mean"]
    result["holds"] = _clearly_less(drift["batch norm"], drift["plain"])
    result["verdict"] = (
        f"hidden layer {layer + 1}'s units moved their mean by {plain:.2f} of their initial "
        f"spread over training without batch norm, {bn:.2f} with it "
        f"({'less' if result['holds'] else 'not clearly less'} drift with batch norm).")
    return result


def _draw_shift(ax, r):
    for key, color in (("plain", "C0"), ("batch norm", "C1")):
        run = r["curves"][key][0]
        m, s = np.array(run["mean_of_means"]), np.array(run["mean_of_stds"])
        ax.plot(m, color=color, label=f"{key}: mean")
        ax.fill_between(np.arange(len(m)), m - s, m + s, color=color, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"layer {r['layer']} pre-activation")
    ax.set_title("covariate shift: mean +- std")
    ax.legend(fontsize=7)


# ----------------------------------------------------------------- 3. learning rate

def learning_rate(settings, progress):
    """Digits, a 2-hidden-layer MLP, plain SGD over a sweep of learning rates, with and
    without batch norm: final accuracy, divergence, the highest rate that still trains,
    and epochs to ``TARGET`` test accuracy."""
    table = {}
    for bn in (False, True):
        key = "batch norm" if bn else "plain"
        table[key] = {}
        for lr in settings["lrs"]:
            runs = []
            for seed in range(settings["seeds"]):
                xtr, ytr, xte, yte = _digits(seed)
                model = MLP([64, 64, 64, 10], np.random.default_rng(seed), batch_norm=bn)
                hist = train(model, xtr, ytr, xte, yte, lr, settings["epochs"], seed)
                runs.append(hist)
                progress.step(f"learning rate {lr}: {key}")
            trained = [not h["diverged"] and h["train_acc"][-1] >= TRAINS for h in runs]
            to_target = [next((e + 1 for e, a in enumerate(h["test_acc"]) if a >= TARGET), None)
                         for h in runs]
            table[key][str(lr)] = {
                "final_test_acc": _mean_std([0.0 if h["diverged"] else h["test_acc"][-1]
                                             for h in runs]),
                "diverged": sum(h["diverged"] for h in runs),
                "trains": all(trained),
                "epochs_to_target": to_target,
                "loss": [h["loss"] for h in runs],
            }
    best = {k: max((float(lr) for lr, v in t.items() if v["trains"]), default=None)
            for k, t in table.items()}
    fastest = {}
    for k, t in table.items():
        reached = [max(e) for e in (v["epochs_to_target"] for v in t.values())
                   if all(x is not None for x in e)]
        fastest[k] = min(reached) if reached else None
    result = {"sweep": table, "highest_rate_that_trains": best,
              "fewest_epochs_to_target": fastest, "target": TARGET}
    bn_best, plain_best = best["batch norm"], best["plain"]
    result["holds"] = bool(bn_best is not None and (plain_best is None or bn_best > plain_best))
    result["verdict"] = (
        f"highest learning rate that still trains: {plain_best} without batch norm, "
        f"{bn_best} with it; epochs to {TARGET:.0%} test accuracy at the best rate: "
        f"{fastest['plain']} without, {fastest['batch norm']} with.")
    return result


def _draw_lr(ax, r):
    for key in ("plain", "batch norm"):
        lrs = [float(lr) for lr in r["sweep"][key]]
        acc = [v["final_test_acc"]["mean"] for v in r["sweep"][key].values()]
        err = [v["final_test_acc"]["std"] for v in r["sweep"][key].values()]
        ax.errorbar(lrs, acc, yerr=err, marker="o", label=key)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final test accuracy (0: diverged)")
    ax.set_ylim(0, 1.05)
    ax.set_title("learning rate: digits")
    ax.legend(fontsize=7)


# ----------------------------------------------------------------- 4. depth

def _grad_norms(model, x, y):
    logits = model.forward(x)
    _, dlogits = softmax_cross_entropy(logits, y)
    model.backward(dlogits)
    # relative to the weights: the size of an SGD step against what it changes
    return [float(np.linalg.norm(l.grad_weight) / np.linalg.norm(l.weight))
            for l in model.linears]


INITS = {"He": None, "N(0, 0.05)": 0.05}


def depth(settings, progress, lr=0.1):
    """Digits, a deep MLP (``settings["depth"]`` hidden layers of 32), with He's
    initialization and with a small fixed one (standard deviation 0.05, a common default
    before He's): the gradient norm of each layer's weights at initialization and after
    training, with and without batch norm, relative to the weights' norm (the size of
    an SGD step against what it changes): the smallest over layers measures vanishing
    gradients; test accuracy says whether the deep network trained."""
    result = {"hidden_layers": settings["depth"], "lr": lr, "epochs": settings["depth_epochs"],
              "runs": {}}
    for init, std in INITS.items():
        for bn in (False, True):
            key = f"{init}, {'batch norm' if bn else 'plain'}"
            runs = []
            for seed in range(settings["seeds"]):
                xtr, ytr, xte, yte = _digits(seed)
                sizes = [64] + [32] * settings["depth"] + [10]
                model = MLP(sizes, np.random.default_rng(seed), batch_norm=bn, init_std=std)
                with np.errstate(all="ignore"):
                    first = _grad_norms(model, xtr[:256], ytr[:256])
                hist = train(model, xtr, ytr, xte, yte, lr, settings["depth_epochs"], seed)
                with np.errstate(all="ignore"):
                    after = _grad_norms(model, xtr[:256], ytr[:256])
                runs.append({"init": first, "trained": after,
                             "test_acc": 0.0 if hist["diverged"] else hist["test_acc"][-1]})
                progress.step(f"depth: {key}")
            result["runs"][key] = runs

    def smallest(runs):
        # the smallest relative weight gradient over layers at init, log10
        return _mean_std([math.log10(max(min(r["init"]), 1e-300)) for r in runs])
    result["log10_smallest_relative_gradient_at_init"] = {
        k: smallest(v) for k, v in result["runs"].items()}
    result["test_accuracy"] = {k: _mean_std([r["test_acc"] for r in v])
                               for k, v in result["runs"].items()}
    low, acc = result["log10_smallest_relative_gradient_at_init"], result["test_accuracy"]
    small = "N(0, 0.05)"
    result["holds"] = bool(low[f"{small}, batch norm"]["mean"] > low[f"{small}, plain"]["mean"] + 1
                           and acc[f"{small}, batch norm"]["mean"]
                           > acc[f"{small}, plain"]["mean"] + 0.1)
    parts = [f"{k}: smallest layer gradient 1e{low[k]['mean']:.1f} of its weights at "
             f"initialization, test accuracy {acc[k]['mean']:.2f}" for k in result["runs"]]
    result["verdict"] = (f"{settings['depth']} hidden layers, {settings['depth_epochs']} "
                         f"epochs at lr {lr}: " + "; ".join(parts) + ".")
    return result


def _draw_depth(ax, r):
    for k, key in enumerate(r["runs"]):
        run = r["runs"][key][0]
        ax.plot(np.arange(1, len(run["init"]) + 1), run["init"], color=f"C{k}",
                label=f"{key} (test acc {r['test_accuracy'][key]['mean']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("|weight gradient| / |weight| at initialization")
    ax.set_title(f"depth: {r['hidden_layers']} hidden layers")
    ax.legend(fontsize=6)


# ----------------------------------------------------------------- 5. regularization

def regularization(settings, progress, lr=0.1, level=0.99):
    """Digits with a small training set (20%), a wide MLP trained until its training
    accuracy first reaches ``level``: the train/test gap there, with and without batch
    norm."""
    gaps = {}
    for bn in (False, True):
        key = "batch norm" if bn else "plain"
        runs = []
        for seed in range(settings["seeds"]):
            from sklearn.datasets import load_digits

            data = load_digits()
            xtr, ytr, xte, yte = _split(data.data.astype(np.float32), data.target, seed, 0.2)
            scaler = StandardScaler().fit(xtr)
            xtr, xte = scaler.transform(xtr), scaler.transform(xte)
            model = MLP([64, 256, 256, 10], np.random.default_rng(seed), batch_norm=bn)
            hist = train(model, xtr, ytr, xte, yte, lr, settings["reg_epochs"], seed)
            at = next((e for e, a in enumerate(hist["train_acc"]) if a >= level), None)
            if at is not None:
                runs.append({"epoch": at + 1, "train_acc": hist["train_acc"][at],
                             "test_acc": hist["test_acc"][at],
                             "gap": hist["train_acc"][at] - hist["test_acc"][at]})
            progress.step(f"regularization: {key}")
        gaps[key] = runs
    result = {"level": level, "lr": lr, "runs": gaps,
              "gap": {k: _mean_std([r["gap"] for r in v]) if v else None
                      for k, v in gaps.items()}}
    if all(result["gap"].values()):
        gp, gb = result["gap"]["plain"], result["gap"]["batch norm"]
        result["holds"] = _clearly_less(gb, gp)
        smaller = ("a smaller gap with batch norm" if result["holds"] else
                   "no gap smaller by more than two standard errors")
        result["verdict"] = (
            f"at {level:.0%} training accuracy the test accuracy trails by {gp['mean']:.3f} "
            f"+- {gp['std']:.3f} without batch norm and {gb['mean']:.3f} +- {gb['std']:.3f} "
            f"with it ({smaller}).")
    else:
        result["holds"] = None
        result["verdict"] = (f"not every network reached {level:.0%} training accuracy in "
                             f"{settings['reg_epochs']} epochs: no gap to compare.")
    return result


def _draw_reg(ax, r):
    keys = ["plain", "batch norm"]
    means = [r["gap"][k]["mean"] if r["gap"][k] else np.nan for k in keys]
    stds = [r["gap"][k]["std"] if r["gap"][k] else 0 for k in keys]
    ax.bar(keys, means, yerr=stds, color=["C0", "C1"])
    ax.set_ylabel(f"train - test accuracy at {r['level']:.0%} train")
    ax.set_title("regularization: digits, 20% train")


# ----------------------------------------------------------------- driver

EXPERIMENTS = {
    "units": (units, _draw_units),
    "covariate_shift": (covariate_shift, _draw_shift),
    "learning_rate": (learning_rate, _draw_lr),
    "depth": (depth, _draw_depth),
    "regularization": (regularization, _draw_reg),
}


def _runs(settings):
    s, lrs = settings["seeds"], len(settings["lrs"])
    return 3 * s + 2 * s + 2 * lrs * s + 2 * len(INITS) * s + 2 * s


def run(out_dir, quick=False, stream=None):
    """Run every experiment, write ``demo.json`` and the figures into ``out_dir``; returns
    the results."""
    os.makedirs(out_dir, exist_ok=True)
    settings = SETTINGS["quick" if quick else "full"]
    progress = Progress(_runs(settings), stream)
    t0 = time.time()
    results = {"settings": settings, "quick": quick}
    for name, (experiment, _) in EXPERIMENTS.items():
        results[name] = experiment(settings, progress)
    results["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(results, f, indent=1)
    _figures(results, out_dir)
    return results


def _figures(results, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (name, (_, draw)) in zip(axes.flat, EXPERIMENTS.items()):
        draw(ax, results[name])
    axes.flat[-1].axis("off")
    axes.flat[-1].text(0, 1, "\n\n".join(_wrap(f"{n}: {results[n]['verdict']}")
                                         for n in EXPERIMENTS), va="top", fontsize=7)
    fig.suptitle("What normalization does, measured (fastbn demo)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "summary.png"), dpi=90)
    plt.close(fig)
    for name, (_, draw) in EXPERIMENTS.items():
        fig, ax = plt.subplots(figsize=(6, 4.5))
        draw(ax, results[name])
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=90)
        plt.close(fig)


def _wrap(text, width=60):
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


def summary_lines(results):
    """One line per claim: whether it held on this data, and the numbers."""
    word = {True: "holds", False: "does NOT hold", None: "undecided"}
    return [f"{name}: {word[results[name]['holds']]}: {results[name]['verdict']}"
            for name in EXPERIMENTS]


def markdown_table(results):
    """The README's table of ``results``: per claim, the measure without and with
    normalization (mean +- std over seeds) and whether the claim held."""
    def ms(d, digits=2):
        return f"{d['mean']:.{digits}f} +- {d['std']:.{digits}f}"
    u, c = results["units"], results["covariate_shift"]
    lr, d, r = results["learning_rate"], results["depth"], results["regularization"]
    word = {True: "yes", False: "**no**", None: "undecided"}
    small = "N(0, 0.05)"
    rows = [
        ("units: 5-NN test accuracy, wine with alcohol x1000",
         ms(u["knn_test_accuracy"]["raw (alcohol x1000)"]),
         ms(u["knn_test_accuracy"]["StandardScaler"]) + " (StandardScaler)", u["holds"]),
        ("units: SGD softmax regression test accuracy",
         ms(u["sgd_softmax_test_accuracy"]["raw (alcohol x1000)"]),
         ms(u["sgd_softmax_test_accuracy"]["StandardScaler"]) + " (StandardScaler)", None),
        (f"covariate shift: drift of layer {c['layer']}'s unit means, in initial spreads",
         ms(c["drift"]["plain"]), ms(c["drift"]["batch norm"]), c["holds"]),
        ("learning rate: highest that still trains (digits)",
         str(lr["highest_rate_that_trains"]["plain"]),
         str(lr["highest_rate_that_trains"]["batch norm"]), lr["holds"]),
        (f"learning rate: fewest epochs to {lr['target']:.0%} test accuracy",
         str(lr["fewest_epochs_to_target"]["plain"]),
         str(lr["fewest_epochs_to_target"]["batch norm"]), None),
        (f"depth ({d['hidden_layers']} layers, {small} init): smallest layer gradient, "
         "log10 of its weights",
         ms(d["log10_smallest_relative_gradient_at_init"][f"{small}, plain"], 1),
         ms(d["log10_smallest_relative_gradient_at_init"][f"{small}, batch norm"], 1),
         d["holds"]),
        (f"depth ({small} init): test accuracy after {d['epochs']} epochs",
         ms(d["test_accuracy"][f"{small}, plain"]), ms(d["test_accuracy"][f"{small}, batch norm"]),
         None),
        ("depth (He init): test accuracy", ms(d["test_accuracy"]["He, plain"]),
         ms(d["test_accuracy"]["He, batch norm"]), None),
        (f"regularization: train - test accuracy at {r['level']:.0%} train accuracy",
         ms(r["gap"]["plain"], 3) if r["gap"]["plain"] else "not reached",
         ms(r["gap"]["batch norm"], 3) if r["gap"]["batch norm"] else "not reached", r["holds"]),
    ]
    lines = ["| claim: measure | without | with normalization | claim holds |",
             "|---|---:|---:|:---:|"]
    for claim, without, with_, holds in rows:
        lines.append(f"| {claim} | {without} | {with_} | {'' if holds is None else word[holds]} |")
    return "\n".join(lines)

"""Experiment `anchors`: recovery of a mixture of HMMs with and without anchor words (Prop. 4.4).

For each anchor setting (on: every state has a token only it emits; partial: half of the states do;
off: none does) and each n, the source mixture is fitted by Baum-Welch and compared with the truth
after the best permutation of states (by emission rows) and of concepts (by transition matrices):
max |tau - taû|, max |theta - thetâ|, max |pi - pî|; Algorithm 1's next-token KL and matching accuracy
show what the recovery buys downstream. The anchor mass and every other knob are the same across
settings.
"""

from __future__ import annotations

import numpy as np

from .common import cell_keys, compiled_replicates, design_from, mean_se, pyplot, savefig, to_lists
from .hmm_common import (
    HMM_EM_KNOBS,
    HMM_ESTIMATORS,
    HMM_PROBLEM_KNOBS,
    hmm_problem_from,
    validate_hmm_knobs,
)
from .runner import Sweep, check_knobs, versions

NAME = "anchors"
SETTINGS = ("on", "partial", "off")
DEFAULTS = {
    "seed": 0,
    **{k: v for k, v in HMM_PROBLEM_KNOBS.items() if k != "anchors"},
    "n_grid": [250, 1000, 4000],
    "replicates": 4,
    "n_test": 500,
    **HMM_EM_KNOBS,
}
METRICS = (("source_fit", "emit_error"), ("source_fit", "trans_error"), ("source_fit", "weight_max_error"),
           ("identification", "kl"), ("identification", "matching_accuracy"), ("oracle", "kl"))


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    validate_hmm_knobs(cfg)


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    validate(cfg)
    grid = sorted(int(n) for n in cfg["n_grid"])
    problems = {a: hmm_problem_from(cfg, anchors=a) for a in SETTINGS}
    sweep = Sweep(out_dir, cfg, NAME)
    fn = None

    def cell(item):
        nonlocal fn
        i, a, n = item
        if fn is None:
            fn = compiled_replicates(design_from(cfg, max(grid), estimators=HMM_ESTIMATORS,
                                                noweak_match="components", source_fit_errors=True))
        prob = problems[a]
        keys = cell_keys(cfg["seed"], i, int(cfg["replicates"]))
        return to_lists(fn(keys, n, prob))

    items = [(f"{a}_n{n}", (i, a, n)) for i, (a, n) in enumerate((a, n) for a in SETTINGS for n in grid)]
    cells = sweep.run(items, cell, progress=progress)
    out = {}
    for a in SETTINGS:
        entry = {"n": grid, "anchor_states": problems[a].anchor_states.tolist()}
        for group, metric in METRICS:
            means, ses = zip(*(mean_se(cells[f"{a}_n{n}"][group][metric]) for n in grid), strict=True)
            entry[f"{group}.{metric}"] = {"mean": list(means), "se": list(ses)}
        out[a] = entry
    results = {"experiment": NAME, "config": cfg, "versions": versions(), "settings": out}
    return sweep.finish(results, plot, "anchors.png")


def plot(results: dict, path) -> None:
    plt = pyplot()
    shown = [("source_fit.emit_error", r"max $|\tau - \hat\tau|$"),
             ("source_fit.trans_error", r"max $|\theta - \hat\theta|$"),
             ("identification.kl", "Algorithm 1 next-token KL")]
    fig, axes = plt.subplots(1, len(shown), figsize=(14, 4.2))
    for ax, (key, label) in zip(axes, shown, strict=True):
        for a, e in results["settings"].items():
            n = np.asarray(e["n"], float)
            mean, se = np.asarray(e[key]["mean"]), np.asarray(e[key]["se"])
            line, = ax.plot(n, mean, "o-", ms=3, label=f"anchors {a}")
            ax.fill_between(n, mean - 2 * se, mean + 2 * se, color=line.get_color(), alpha=0.15, lw=0)
        ax.set(xscale="log", yscale="log", xlabel="n (source records)", title=label)
        ax.legend(fontsize=7)
    fig.suptitle("Recovery of a mixture of HMMs with and without anchor words (mean ± 2 s.e.)")
    savefig(fig, path)
    plt.close(fig)


def table(results: dict):
    from rich.table import Table

    t = Table(title="Recovery after the best permutation of states and concepts, mean over replicates",
              title_justify="left")
    t.add_column("anchors")
    t.add_column("n", justify="right")
    for _, metric in METRICS:
        t.add_column(metric.replace("_", " "), justify="right")
    for a, e in results["settings"].items():
        for i, n in enumerate(e["n"]):
            t.add_row(a, str(n), *(f"{e[f'{g}.{m}']['mean'][i]:.4f}" for g, m in METRICS))
    return t


def reading(results: dict) -> str:
    s = results["settings"]
    return (
        "emit / trans / weight error: largest absolute error of tau, theta_k and pi^p of the source fit "
        "after the best state and concept permutation; kl: Algorithm 1's next-token KL; matching "
        "accuracy: fraction of concepts matched to the right target concept. At the largest n the "
        "transition error is "
        + ", ".join(f"{a} {e['source_fit.trans_error']['mean'][-1]:.3f}" for a, e in s.items())
        + "."
    )

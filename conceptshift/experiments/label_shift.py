"""Experiment `label-shift`: the label-shift baselines against Algorithm 1 as the weak heads shift.

Prior-shift estimation keeps the source's components and weak heads and re-estimates only the
target proportions pi^q: EM on the proportions (EMQ, Saerens et al. 2002, ``proportions_em``) and
confusion-matrix inversion (BBSE, Lipton et al. 2018, ``bbse``); both are consistent when the weak
heads do not move between domains (``weak_shift = 0``: a shift of the latent k alone) and biased
when they do. Algorithm 1 refits the target's weak heads and matches them to the source's, so it
stays consistent as long as the matching is right (Delta > 0, reported per cell). The sweep runs
each estimator over a grid of ``weak_shift`` and n; the oracle (gold target labels) is the floor.
The x-only estimate of pi^q (``proportions_x``, no label read) says how much the target's x alone
tell about pi^q: nothing for constant gates (it returns pi^p), everything for Gaussian gates
(``--set family=gated``), where any method that fits the target's x recovers pi^q without the weak
labels.
"""

from __future__ import annotations

import numpy as np

from .common import (
    EM_KNOBS,
    LABELS,
    PROBLEM_KNOBS,
    check_n_grid,
    grid_tables,
    problem_from,
    pyplot,
    savefig,
    sweep_over_problems,
)
from .runner import check_knobs, versions

NAME = "label-shift"
DEFAULTS = {
    "seed": 0,
    **PROBLEM_KNOBS,
    "shift_grid": [0.0, 0.25, 0.5, 1.0, 2.0],
    "n_grid": [500, 2000, 8000],
    "replicates": 8,
    "n_test": 2000,
    **EM_KNOBS,
}
ESTIMATORS = ("identification", "proportions_em", "bbse", "proportions_x", "oracle")
METRICS = ("reg_error", "kl", "excess_nll", "weight_error", "matching_accuracy")


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    grid = [float(s) for s in cfg["shift_grid"]]
    if not grid or any(s < 0 for s in grid):
        raise ValueError(f"shift_grid must be non-empty with every weak shift >= 0, got {grid}")
    check_n_grid(cfg)


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    validate(cfg)
    grid_s = sorted(float(s) for s in cfg["shift_grid"])
    problems = {f"shift{s:g}": problem_from(cfg, weak_shift=s) for s in grid_s}
    grid_n, sweep, cells = sweep_over_problems(cfg, out_dir, NAME, problems, progress=progress,
                                               estimators=ESTIMATORS)
    estimators = grid_tables(cells, ESTIMATORS, METRICS)
    for entry in estimators.values():
        entry.update(weak_shift=grid_s, n=grid_n)
    results = {
        "experiment": NAME, "config": cfg, "versions": versions(),
        "delta": [p.distinguishability() for p in problems.values()],
        "estimators": estimators,
        "layout": "metric mean/se/median are [weak_shift][n] tables",
    }
    return sweep.finish(results, plot, "label_shift.png")


def _metric(results: dict) -> str:
    return "reg_error" if "reg_error" in results["estimators"]["oracle"] else "kl"


def plot(results: dict, path) -> None:
    plt = pyplot()
    est = results["estimators"]
    metric = _metric(results)
    shifts = np.asarray(est["oracle"]["weak_shift"])
    ns = est["oracle"]["n"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    for name in ESTIMATORS:
        e = est[name]
        mean = np.asarray(e[metric]["mean"])
        se = np.asarray(e[metric]["se"])
        line, = axes[0].plot(shifts, mean[:, -1], "o-", ms=3, label=LABELS.get(name, name))
        axes[0].fill_between(shifts, np.maximum(mean[:, -1] - 2 * se[:, -1], 1e-12),
                             mean[:, -1] + 2 * se[:, -1], color=line.get_color(), alpha=0.15, lw=0)
        for row, ls in ((0, "o-"), (-1, "s--")):
            axes[1].plot(ns, mean[row], ls, ms=3, color=line.get_color())
        if "weight_error" in e:
            axes[2].plot(shifts, np.asarray(e["weight_error"]["mean"])[:, -1], "o-", ms=3,
                         color=line.get_color())
    ylabel = r"$E_x(\hat q(x) - q(x))^2$" if metric == "reg_error" else r"$E_x KL(q \| \hat q)$"
    axes[0].set(xlabel="weak-head shift between domains", ylabel=ylabel, yscale="log",
                title=f"error at n = {ns[-1]} (bands: 2 s.e.)")
    axes[1].set(xlabel="n (source = target)", ylabel=ylabel, xscale="log", yscale="log",
                title=f"against n: shift {shifts[0]:g} (solid), {shifts[-1]:g} (dashed)")
    axes[1].set_xticks(ns, [str(n) for n in ns])
    axes[1].xaxis.set_minor_locator(plt.NullLocator())
    axes[2].set(xlabel="weak-head shift between domains",
                ylabel=r"$\sum_k |\hat\pi^q_k - \pi^q_k|$", title=f"target proportions, n = {ns[-1]}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(ESTIMATORS), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    savefig(fig, path)
    plt.close(fig)


SHORT = {"identification": "Alg. 1", "proportions_em": "EMQ", "bbse": "BBSE", "proportions_x": "x only",
         "oracle": "oracle"}


def table(results: dict):
    from rich.table import Table

    est = results["estimators"]
    metric = _metric(results)
    shifts = est["oracle"]["weak_shift"]
    n = est["oracle"]["n"][-1]
    t = Table(title=f"Label-shift baselines (EMQ, BBSE) against Algorithm 1: {metric} at n = {n}, "
                    "mean over replicates")
    t.add_column("weak shift", justify="right")
    t.add_column("Delta", justify="right")
    for name in ESTIMATORS:
        t.add_column(SHORT[name], justify="right")
    for i, (s, d) in enumerate(zip(shifts, results["delta"], strict=True)):
        t.add_row(f"{s:g}", f"{d:.2g}", *[f"{est[name][metric]['mean'][i][-1]:.3g}"
                                          for name in ESTIMATORS])
    return t

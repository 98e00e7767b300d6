"""Experiment `distinguishability`: matching accuracy and error of Algorithm 1 over a grid of the
distinguishability Delta (Assumption 4.5) and n (Prop. 4.6).

Delta > 0 means each target weak head is closer to its own source weak head than to any other; the
paper's greedy rule a(k) = argmin, and with it Algorithm 1, should succeed once n is large enough for
the estimation error to fall below Delta. The optimal assignment used here is more forgiving: it can
stay right for moderately negative Delta, where the greedy rule already fails (its agreement with the
optimal assignment and whether it is a bijection are reported too).
"""

from __future__ import annotations

import numpy as np

from .common import (
    EM_KNOBS,
    IDENTIFICATION_ONLY,
    PROBLEM_KNOBS,
    check_n_grid,
    grid_tables,
    problem_from,
    pyplot,
    savefig,
    sweep_over_problems,
)
from .runner import check_knobs, versions

NAME = "distinguishability"
DEFAULTS = {
    "seed": 0,
    **PROBLEM_KNOBS,
    "delta_grid": [-8.0, -4.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0],
    "n_grid": [250, 1000, 4000],
    "replicates": 8,
    "n_test": 1000,
    **EM_KNOBS,
}
METRICS = ("matching_accuracy", "matching_margin", "reg_error", "excess_nll", "greedy_bijection",
           "greedy_agrees")


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    if not cfg["delta_grid"]:
        raise ValueError("delta_grid must not be empty")
    check_n_grid(cfg)


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    validate(cfg)
    grid_d = sorted(float(d) for d in cfg["delta_grid"])
    problems = {f"delta{d:+g}": problem_from(cfg, delta=d) for d in grid_d}
    grid_n, sweep, cells = sweep_over_problems(cfg, out_dir, NAME, problems, progress=progress,
                                               estimators=IDENTIFICATION_ONLY, fit_info=True)
    estimators = grid_tables(cells, ("identification", "identification_noweak", "oracle"), METRICS)
    for entry in estimators.values():
        entry.update(delta=grid_d, n=grid_n)
    results = {
        "experiment": NAME, "config": cfg, "versions": versions(),
        "delta_realised": [p.distinguishability() for p in problems.values()],
        "estimators": estimators,
        "layout": "metric mean/se/median are [delta][n] tables",
    }
    return sweep.finish(results, plot, "distinguishability.png")


def plot(results: dict, path) -> None:
    plt = pyplot()

    e = results["estimators"]["identification"]
    d = np.asarray(e["delta"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for j, n in enumerate(e["n"]):
        for ax, metric in zip(axes, ("matching_accuracy", "reg_error"), strict=True):
            mean = np.asarray(e[metric]["mean"])[:, j]
            se = np.asarray(e[metric]["se"])[:, j]
            line, = ax.plot(d, mean, "o-", label=f"n = {n}", ms=3)
            ax.fill_between(d, mean - 2 * se, mean + 2 * se, color=line.get_color(), alpha=0.15, lw=0)
    for ax in axes:
        ax.axvline(0, color="k", lw=0.6, ls=":")
    axes[0].set(xlabel=r"distinguishability $\Delta$ (Assumption 4.5)", ylabel="matching accuracy",
                title="Algorithm 1: components matched correctly", ylim=(-0.02, 1.02))
    axes[1].set(xlabel=r"$\Delta$", ylabel=r"$E_x(\hat q(x) - q(x))^2$", yscale="log",
                title="Algorithm 1: regression-function error")
    axes[0].legend()
    savefig(fig, path)
    plt.close(fig)


def table(results: dict):
    from rich.table import Table

    e = results["estimators"]["identification"]
    t = Table(title="Algorithm 1 against the distinguishability Delta (mean over replicates)")
    t.add_column("Delta", justify="right")
    for n in e["n"]:
        t.add_column(f"match acc. n={n}", justify="right")
    for n in e["n"]:
        t.add_column(f"reg. error n={n}", justify="right")
    t.add_column(f"greedy = optimal n={e['n'][-1]}", justify="right")
    for i, d in enumerate(e["delta"]):
        acc = [f"{v:.2f}" for v in e["matching_accuracy"]["mean"][i]]
        err = [f"{v:.3g}" for v in e["reg_error"]["mean"][i]]
        t.add_row(f"{d:+g}", *acc, *err, f"{e['greedy_agrees']['mean'][i][-1]:.2f}")
    return t

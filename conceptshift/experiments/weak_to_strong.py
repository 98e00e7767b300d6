"""Experiment `weak_to_strong`: weak-to-strong classification in the spirit of Burns et al. (2023).

A binary (or C-class) task under latent concept shift: the strong label y and a weak supervisor's
label y' share the concept k; the weak supervisor is a biased copy of the strong experts
(``weak_bias``, in logits), or with ``weak_labeller=noise`` the strong label flipped at a rate per
concept (``flip``, ``flip_spread``, ``flip_to``: a weak head the fitted families do not contain; see
:mod:`conceptshift.models.problem`). Every estimator of q(y | x) is scored on gold target labels by accuracy,
calibration (ECE) and the excess log-loss, and by the performance gap recovered

    PGR = (err_weak - err) / (err_weak - err_ceiling),

with err_weak the test error of the true weak supervisor q(y' | x) used as a classifier of y, and
err_ceiling the error of the oracle (the strong family trained on gold target labels, Burns et al.'s
"strong ceiling"). PGR is computed from the replicates' mean errors at each n, with a 90% percentile
bootstrap interval over replicates (the estimators of one replicate share its data, so replicates are
resampled jointly).
"""

from __future__ import annotations

import numpy as np

from .common import (
    EM_KNOBS,
    LABELS,
    PROBLEM_KNOBS,
    check_n_grid,
    pgr_table,
    problem_from,
    pyplot,
    savefig,
    summarise,
    sweep_over_n,
)
from .runner import check_knobs, versions

NAME = "weak-to-strong"
DEFAULTS = {
    "seed": 0,
    **PROBLEM_KNOBS,
    "family": "logistic",
    "n_components": 2,
    "separation": 6.0,
    "weak_bias": 3.0,
    "n_grid": [250, 500, 1000, 2000, 4000, 8000],
    "replicates": 8,
    "n_test": 4000,
    "lam": 1.0,
    "n_demos": 8,
    "n_boot": 2000,
    **EM_KNOBS,
}
CLASSIFICATION = ("logistic", "categorical")


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    if cfg["family"] not in CLASSIFICATION:
        raise ValueError(f"family must be one of {CLASSIFICATION} (a classification task), got "
                         f"{cfg['family']!r}")
    check_n_grid(cfg)


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    validate(cfg)
    problem = problem_from(cfg)
    grid, sweep, ordered = sweep_over_n(cfg, out_dir, NAME, problem, progress=progress,
                                        weak_labeller=True)
    results = {
        "experiment": NAME,
        "config": cfg,
        "versions": versions(),
        "problem": {
            "pi_p": np.asarray(problem.params_p.weights).tolist(),
            "pi_q": np.asarray(problem.params_q.weights).tolist(),
            "distinguishability": problem.distinguishability(),
        },
        "estimators": summarise(ordered, grid),
        "pgr": pgr_table(ordered, int(cfg["n_boot"]), int(cfg["seed"])),
    }
    return sweep.finish(results, plot, "weak_to_strong.png")


def plot(results: dict, path) -> None:
    plt = pyplot()
    est, pgr = results["estimators"], results["pgr"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    for name, e in est.items():
        n = np.asarray(e["n"], float)
        acc = np.asarray(e["accuracy"]["mean"])
        se = np.asarray(e["accuracy"]["se"])
        style = dict(ls="--", lw=1.2) if name == "weak_labeller" else dict(marker="o", ms=3, lw=1.5)
        line, = axes[0].plot(n, acc, label=LABELS.get(name, name), **style)
        axes[0].fill_between(n, acc - 2 * se, acc + 2 * se, color=line.get_color(), alpha=0.15, lw=0)
        if name in pgr:
            p = pgr[name]
            axes[1].errorbar(n, p["mean"], yerr=[np.subtract(p["mean"], p["lower"]),
                                                 np.subtract(p["upper"], p["mean"])],
                             marker="o", ms=3, capsize=2, lw=1.2, color=line.get_color())
    axes[0].set(xscale="log", xlabel="n (source = weak target sample size)",
                ylabel="test accuracy on gold target labels",
                title="accuracy (mean ± 2 s.e. over replicates)")
    axes[1].axhline(0, color="k", lw=0.6)
    axes[1].axhline(1, color="k", lw=0.6, ls=":")
    axes[1].set(xscale="log", xlabel="n", ylabel="performance gap recovered (PGR)",
                title="PGR from mean errors, 90% bootstrap interval")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax in axes:
        ax.set_xticks(est["oracle"]["n"])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    fig.suptitle("Weak-to-strong classification under latent concept shift")
    savefig(fig, path)
    plt.close(fig)


SHORT = {**LABELS, "weak_training_ll": "weak training (lik.)",
         "identification_noweak": "identif. (no weak P)", "weak_labeller": "weak labeller"}


def table(results: dict):
    from rich.table import Table

    est, pgr = results["estimators"], results["pgr"]
    grid = est["oracle"]["n"]
    t = Table(title=f"Weak-to-strong classification, {results['config']['family']}: mean of "
                    f"{results['config']['replicates']} replicates", title_justify="left")
    t.add_column("estimator", no_wrap=True)
    t.add_column(f"accuracy n={grid[0]}", justify="right")
    t.add_column(f"accuracy n={grid[-1]}", justify="right")
    t.add_column(f"ECE n={grid[-1]}", justify="right")
    t.add_column(f"PGR n={grid[-1]} [90%]", justify="right", no_wrap=True)
    for name, e in est.items():
        acc = e["accuracy"]["mean"]
        p = pgr.get(name)
        cell = "" if p is None else f"{p['mean'][-1]:+.2f} [{p['lower'][-1]:+.2f}, {p['upper'][-1]:+.2f}]"
        t.add_row(SHORT.get(name, name), f"{acc[0]:.3f}", f"{acc[-1]:.3f}", f"{e['ece']['mean'][-1]:.3f}",
                  cell)
    return t


def reading(results: dict) -> str:
    est, pgr = results["estimators"], results["pgr"]
    n = est["oracle"]["n"][-1]
    weak = est["weak_labeller"]["accuracy"]["mean"][-1]
    ceil = est["oracle"]["accuracy"]["mean"][-1]
    ranked = sorted((p["mean"][-1], name) for name, p in pgr.items()
                    if name != "oracle" and np.isfinite(p["mean"][-1]))
    best = ", ".join(f"{SHORT.get(nm, nm)} {v:+.2f}" for v, nm in reversed(ranked[-3:]))
    return (f"PGR = (err_weak - err) / (err_weak - err_oracle): 0 is the weak supervisor's accuracy "
            f"({weak:.3f} at n = {n}), 1 the strong ceiling's (the oracle, {ceil:.3f}). Highest PGR at "
            f"n = {n}: {best}. Intervals are 90% bootstrap intervals over replicates; PGR is a ratio "
            "of differences of errors and is noisy where the gap is small.")

"""Experiment `consistency`: error against n for every estimator (Theorem 1.1, Props. 4.6-4.7).

Identification and the oracle should be consistent (error falling like a power of n); weak training
and refinement should level off at a bias that does not shrink with n.
"""

from __future__ import annotations

import numpy as np

from .common import (
    EM_KNOBS,
    LABELS,
    PROBLEM_KNOBS,
    check_n_grid,
    problem_from,
    pyplot,
    savefig,
    summarise,
    sweep_over_n,
)
from .runner import check_knobs, versions

NAME = "consistency"
DEFAULTS = {
    "seed": 0,
    **PROBLEM_KNOBS,
    "n_grid": [250, 500, 1000, 2000, 4000],
    "replicates": 8,
    "n_test": 2000,
    "lam": 1.0,
    "n_demos": 8,
    **EM_KNOBS,
}


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    check_n_grid(cfg)


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    validate(cfg)
    problem = problem_from(cfg)
    grid, sweep, ordered = sweep_over_n(cfg, out_dir, NAME, problem, progress=progress)
    estimators = summarise(ordered, grid)
    results = {
        "experiment": NAME,
        "config": cfg,
        "versions": versions(),
        "problem": {
            "pi_p": np.asarray(problem.params_p.weights).tolist(),
            "pi_q": np.asarray(problem.params_q.weights).tolist(),
            "distinguishability": problem.distinguishability(),
        },
        "estimators": estimators,
    }
    return sweep.finish(results, plot, "consistency.png")


def main_metric(results: dict) -> str:
    """The error the table and figure rank by: the regression-function error where y has a mean,
    the exact KL over the classes otherwise (a categorical y)."""
    return "reg_error" if "reg_error" in results["estimators"]["oracle"] else "kl"


def plot(results: dict, path) -> None:
    plt = pyplot()

    est = results["estimators"]
    main = main_metric(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, e in est.items():
        n = np.asarray(e["n"], float)
        for ax, metric in zip(axes, (main, "excess_nll"), strict=True):
            mean = np.asarray(e[metric]["mean"])
            se = np.asarray(e[metric]["se"])
            label = LABELS.get(name, name)
            if metric == main:
                label += f" (slope {e['slope_' + main]:.2f})"
            line, = ax.plot(n, mean, "o-", label=label, lw=1.5, ms=3)
            ax.fill_between(n, mean - 2 * se, mean + 2 * se, color=line.get_color(), alpha=0.15, lw=0)
    axes[0].set(xscale="log", yscale="log", xlabel="n (source = weak target sample size)",
                ylabel=(r"$E_x(\hat q(x) - q(x))^2$" if main == "reg_error"
                        else r"$E_x KL(q(\cdot|x) \| \hat q(\cdot|x))$"),
                title="regression-function error" if main == "reg_error" else "KL over the classes")
    axes[1].set(xscale="log", xlabel="n", ylabel=r"$E[\log q(y|x) - \log \hat q(y|x)]$",
                title="excess test log-loss")
    axes[1].axhline(0, color="k", lw=0.5)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax in axes:
        ax.set_xticks(est["oracle"]["n"])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Consistency under latent concept shift: mean ± 2 s.e. over replicates")
    savefig(fig, path)
    plt.close(fig)


SHORT = {
    "source_only": "source only",
    "weak_only": "weak only",
    "weak_training_sq": "weak training (squared loss)",
    "weak_training_ll": "weak training (lik.)",
    "refinement": "refinement",
    "refinement_icl": "in-context refinement",
    "identification": "identification",
    "identification_noweak": "identif. (no weak P)",
    "oracle": "oracle",
}


def table(results: dict):
    from rich.table import Table

    est = results["estimators"]
    grid = est["oracle"]["n"]
    t = Table(title=f"Distance of each estimate of q(y|x) from the truth, "
                    f"mean of {results['config']['replicates']} replicates", title_justify="left")
    t.add_column("estimator", no_wrap=True)
    t.add_column(f"error n={grid[0]}", justify="right", min_width=8)
    t.add_column(f"error n={grid[-1]}", justify="right", min_width=8)
    t.add_column("slope", justify="right")
    t.add_column(f"KL n={grid[-1]}", justify="right", min_width=8)
    t.add_column("with n", no_wrap=True)
    main = main_metric(results)
    for name, e in est.items():
        mean = e[main]["mean"]
        slope = e["slope_" + main]
        verdict = "[green]falls[/]" if slope < -0.4 else "[red]levels off[/]"
        t.add_row(SHORT.get(name, name), f"{mean[0]:.3g}", f"{mean[-1]:.3g}", f"{slope:+.2f}",
                  f"{e['excess_nll']['mean'][-1]:.3g}", verdict)
    return t


def reading(results: dict) -> str:
    est = results["estimators"]
    n = est["oracle"]["n"]
    main = main_metric(results)
    ratio = est["refinement"][main]["mean"][-1] / est["identification"][main]["mean"][-1]
    return (
        "error: E_x (q̂(x) - q(x))^2, the squared distance of the estimated regression function from "
        "the true one; KL: excess test log-loss E[log q(y|x) - log q̂(y|x)]; slope: of log error "
        f"against log n over n = {n[0]}..{n[-1]}. Identification (Algorithm 1: fit both domains, "
        "match components through the weak labels, move the target's proportions onto the source's "
        "components) and the oracle, which sees gold target labels, are consistent. Weak training "
        "and label refinement stay biased however much data they get: at the largest n refinement's "
        f"error is {ratio:.0f} times identification's."
    )

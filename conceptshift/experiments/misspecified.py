"""Experiment `misspecified`: Algorithm 1 with the wrong number of components, and K chosen by BIC
(a reviewer's concern: the method "presumes K is known").

For each K_fit in k_grid, the source and weak-target mixtures are fitted with K_fit components on the
same simulated data; the identification error is reported per K_fit, and for K chosen per replicate
by the source fit's BIC.
"""

from __future__ import annotations

import numpy as np

from .common import (
    EM_KNOBS,
    IDENTIFICATION_ONLY,
    PROBLEM_KNOBS,
    cell_keys,
    compiled_replicates,
    design_from,
    mean_se,
    problem_from,
    pyplot,
    savefig,
    to_lists,
)
from .runner import Sweep, check_knobs, versions

NAME = "misspecified"
DEFAULTS = {
    "seed": 0,
    **PROBLEM_KNOBS,
    "k_grid": [2, 3, 4, 5],
    "n_grid": [500, 2000],
    "replicates": 8,
    "n_test": 1000,
    **EM_KNOBS,
}


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    if not cfg["k_grid"] or any(int(k) < 1 for k in cfg["k_grid"]):
        raise ValueError(f"k_grid must hold integers >= 1, got {cfg['k_grid']}")
    if not cfg["n_grid"] or any(int(n) < 2 * max(cfg["k_grid"]) for n in cfg["n_grid"]):
        raise ValueError("every n in n_grid must be at least 2 * max(k_grid)")
    if int(cfg["replicates"]) < 2:
        raise ValueError(f"replicates must be >= 2, got {cfg['replicates']}")


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    validate(cfg)
    problem = problem_from(cfg)
    ks = sorted(int(k) for k in cfg["k_grid"])
    ns = sorted(int(n) for n in cfg["n_grid"])
    sweep = Sweep(out_dir, cfg, NAME)
    compiled = {}

    def cell(item):
        k, j, n = item
        if k not in compiled:
            compiled[k] = compiled_replicates(design_from(
                cfg, max(ns), estimators=IDENTIFICATION_ONLY, fit_info=True, n_components=k))
        # the same keys for every K at a given n: every K is fitted to the same data
        return to_lists(compiled[k](cell_keys(cfg["seed"], j, int(cfg["replicates"])), n, problem))

    items = [(f"K{k}_n{n}", (k, j, n)) for k in ks for j, n in enumerate(ns)]
    cells = sweep.run(items, cell, progress=progress)
    per_k = {}
    for k in ks:
        per_k[str(k)] = {
            name: {metric: [dict(zip(("mean", "se"), mean_se(cells[f"K{k}_n{n}"][name][metric]), strict=True))
                            for n in ns]
                   for metric in ("reg_error", "excess_nll")}
            for name in ("identification", "identification_noweak", "oracle")
        }
    bic = {}
    for n in ns:
        src = np.asarray([cells[f"K{k}_n{n}"]["fit"]["source_bic"] for k in ks])  # (K, R)
        pick = np.argmin(src, axis=0)
        err = np.asarray([cells[f"K{k}_n{n}"]["identification"]["reg_error"] for k in ks])
        chosen = err[pick, np.arange(err.shape[1])]
        m, s = mean_se(chosen)
        bic[str(n)] = {"chosen_K": [ks[i] for i in pick], "reg_error": {"mean": m, "se": s},
                       "frequency_true_K": float(np.mean(np.asarray(ks)[pick] == problem.spec.n_components))}
    results = {
        "experiment": NAME, "config": cfg, "versions": versions(), "true_K": problem.spec.n_components,
        "k_grid": ks, "n_grid": ns, "per_k": per_k, "bic": bic,
        "estimators": {"identification": {"n": ns, "reg_error": {
            "mean": [per_k[str(problem.spec.n_components)]["identification"]["reg_error"][j]["mean"]
                     for j in range(len(ns))] if problem.spec.n_components in ks else [],
        }}},
    }
    return sweep.finish(results, plot, "misspecified.png")


def plot(results: dict, path) -> None:
    plt = pyplot()

    ks = results["k_grid"]
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    for j, n in enumerate(results["n_grid"]):
        m = [results["per_k"][str(k)]["identification"]["reg_error"][j]["mean"] for k in ks]
        s = [results["per_k"][str(k)]["identification"]["reg_error"][j]["se"] for k in ks]
        ax.errorbar(ks, m, yerr=2 * np.asarray(s), fmt="o-", capsize=2, label=f"n = {n}")
        ax.axhline(results["bic"][str(n)]["reg_error"]["mean"], ls=":", color=ax.lines[-1].get_color(),
                   label=f"K by BIC, n = {n}")
    ax.axvline(results["true_K"], color="k", lw=0.6)
    ax.set(yscale="log", xlabel="K fitted", ylabel=r"$E_x(\hat q(x) - q(x))^2$",
           title="Algorithm 1 with misspecified K (vertical line: true K)")
    ax.legend(fontsize=7)
    savefig(fig, path)
    plt.close(fig)


def table(results: dict):
    from rich.table import Table

    ns = results["n_grid"]
    t = Table(title=f"Algorithm 1 with K fitted = {results['k_grid']} (true K = {results['true_K']})")
    t.add_column("K fitted", justify="right")
    for n in ns:
        t.add_column(f"reg. error n={n}", justify="right")
    for k in results["k_grid"]:
        e = results["per_k"][str(k)]["identification"]["reg_error"]
        t.add_row(str(k), *(f"{e[j]['mean']:.4g} ± {e[j]['se']:.2g}" for j in range(len(ns))))
    t.add_row("by BIC", *(f"{results['bic'][str(n)]['reg_error']['mean']:.4g} (true K picked "
                          f"{results['bic'][str(n)]['frequency_true_K']:.0%})" for n in ns))
    return t

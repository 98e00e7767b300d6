"""Experiment `consistency`: error against n for every estimator (Theorem 1.1, Props. 4.6-4.7).

Identification and the oracle should be consistent (error falling like a power of n, the exponent
fitted with a bootstrap interval); weak training and refinement should level off at a bias that
does not shrink with n (label refinement's: the population value ``refinement_population``, q_re
from the true source model, which the plug-in estimate should reach).

Every estimator is also scored by the performance gap recovered, PGR = (err_weak - err) /
(err_weak - err_oracle), with err_weak the error of the true weak labeller q(y' | x) taken as an
estimate of q(y | x). The default problem is a weak-to-strong one: the weak heads are biased
(``weak_bias`` 1.5) and noisy (``weak_noise`` 2), so the weak labeller is several times worse than
what the source and the weak labels together identify, and the proportions shift little
(``shift`` 0.25), so that weak training, which pools source labels with weak target labels, has
something to gain from both.
"""

from __future__ import annotations

import numpy as np

from .common import (
    EM_KNOBS,
    PROBLEM_KNOBS,
    check_n_grid,
    pgr_table,
    problem_from,
    pyplot,
    savefig,
    slope_interval,
    summarise,
    sweep_over_n,
)
from .runner import check_knobs, versions

NAME = "consistency"
DEFAULTS = {
    "seed": 0,
    **PROBLEM_KNOBS,
    "shift": 0.25,
    "weak_bias": 1.5,
    "weak_noise": 2.0,
    "n_grid": [125, 250, 500, 1000, 2000, 4000, 8000, 16000],
    "replicates": 8,
    "n_boot": 2000,
    "n_test": 2000,
    "lam": 1.0,
    "n_demos": 8,
    "n_draws": 8,
    "target_scale": 1.0,
    "fit_degree": 0,
    **EM_KNOBS,
}


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    check_n_grid(cfg)
    if cfg["fit_degree"] and getattr(problem_from(cfg).strong_model, "degree", None) is None:
        raise ValueError(f"fit_degree (0: the truth's degree) applies to families with polynomial "
                         f"experts (a degree), not to family {cfg['family']!r}")
    scale = float(cfg["target_scale"])
    if not scale > 0 or min(cfg["n_grid"]) * scale < 2 * cfg["n_components"]:
        raise ValueError(f"target_scale must be > 0 with every n * target_scale >= 2 * n_components "
                         f"(the weak target sample has n * target_scale rows), got {scale}")


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    validate(cfg)
    problem = problem_from(cfg)
    grid, sweep, ordered = sweep_over_n(cfg, out_dir, NAME, problem, progress=progress,
                                        weak_labeller=True, population_refinement=True,
                                        degree=int(cfg["fit_degree"]) or None)
    estimators = summarise(ordered, grid)
    main = "reg_error" if "reg_error" in ordered[0]["oracle"] else "kl"
    pgr = pgr_table(ordered, int(cfg["n_boot"]), int(cfg["seed"]), metric=main)
    for name, e in estimators.items():
        e[main]["values"] = [c[name][main] for c in ordered]  # per replicate, for the figure
        e["slope_interval"] = slope_interval(grid, e[main]["values"], int(cfg["n_boot"]),
                                             int(cfg["seed"]))
        if name in pgr:
            e["pgr"] = pgr[name]
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


REFERENCES = ("weak_labeller", "refinement_population")  # not estimators: drawn dashed


def plot(results: dict, path) -> None:
    plt = pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    est = results["estimators"]
    main = main_metric(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    rng = np.random.default_rng(0)
    palette = iter(plt.get_cmap("tab10").colors)
    colors = {name: next(palette) for name in est if name not in REFERENCES}
    colors.update(weak_labeller="k", refinement_population=colors.get("refinement", "0.4"))
    for name, e in est.items():
        n = np.asarray(e["n"], float)
        err = e[main]
        ref = name in REFERENCES
        label = SHORT.get(name, name)
        si = e.get("slope_interval")
        if si and not ref:
            label += f" (slope {si['slope']:.2f} [{si['lower']:.2f}, {si['upper']:.2f}])"
        c = colors[name]
        axes[0].plot(n, err["median"], "--" if ref else "o-", color=c, label=label, lw=1.5, ms=3)
        if not ref:
            axes[0].fill_between(n, err["q10"], err["q90"], color=c, alpha=0.12, lw=0)
            for ni, vals in zip(n, err.get("values", []), strict=False):
                jitter = ni * np.exp(rng.uniform(-0.06, 0.06, len(vals)))
                axes[0].scatter(jitter, vals, s=4, color=c, alpha=0.35, lw=0)
        if "pgr" in e and name != "oracle":
            p = e["pgr"]
            axes[1].plot(n, p["mean"], "--" if ref else "o-", color=c, lw=1.5, ms=3)
            axes[1].fill_between(n, p["lower"], p["upper"], color=c, alpha=0.12, lw=0)
        nll = e["excess_nll"]
        mean, se = np.asarray(nll["mean"]), np.asarray(nll["se"])
        axes[2].plot(n, mean, "--" if ref else "o-", color=c, lw=1.5, ms=3)
        axes[2].fill_between(n, mean - 2 * se, mean + 2 * se, color=c, alpha=0.12, lw=0)
    axes[0].set(xscale="log", yscale="log", xlabel="n (source = weak target sample size)",
                ylabel=(r"$E_x(\hat q(x) - q(x))^2$" if main == "reg_error"
                        else r"$E_x KL(q(\cdot|x) \| \hat q(\cdot|x))$"),
                title="error: median, 10-90% band, replicates")
    axes[1].set(xscale="log", xlabel="n", ylabel="performance gap recovered (PGR)",
                title="PGR (0: weak labeller, 1: oracle), 90% interval")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].axhline(1, color="k", lw=0.5, ls=":")
    axes[1].set_ylim(-1.5, 1.2)
    axes[2].set(xscale="log", xlabel="n", ylabel=r"$E[\log q(y|x) - \log \hat q(y|x)]$",
                title="excess test log-loss: mean ± 2 s.e.")
    axes[2].axhline(0, color="k", lw=0.5)
    for ax in axes:
        ax.set_xticks(est["oracle"]["n"])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelrotation=45)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3,
               fontsize=8)
    fig.suptitle(f"Consistency under latent concept shift ({results['config']['replicates']} "
                 "replicates per n; slopes of the mean error with 90% bootstrap intervals)")
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
    "weak_labeller": "weak labeller (reference)",
    "refinement_population": "refinement, population",
}


def table(results: dict):
    from rich.table import Table

    est = results["estimators"]
    grid = est["oracle"]["n"]
    t = Table(title=f"Distance of each estimate of q(y|x) from the truth over "
                    f"{results['config']['replicates']} replicates", title_justify="left")
    t.add_column("estimator", no_wrap=True)
    t.add_column(f"mean n={grid[0]}", justify="right", no_wrap=True)
    t.add_column(f"mean n={grid[-1]}", justify="right", no_wrap=True)
    t.add_column(f"median n={grid[-1]}", justify="right", no_wrap=True)
    t.add_column("slope [90%]", justify="right", no_wrap=True)
    t.add_column(f"PGR n={grid[-1]}", justify="right", no_wrap=True)
    t.add_column("with n", no_wrap=True)
    main = main_metric(results)
    for name, e in est.items():
        err = e[main]
        si = e["slope_interval"]
        falls = si["upper"] < -0.25
        verdict = "" if name in REFERENCES else "[green]falls[/]" if falls else "[red]levels off[/]"
        pgr = f"{e['pgr']['mean'][-1]:+.2f}" if "pgr" in e else ""
        t.add_row(SHORT.get(name, name), f"{err['mean'][0]:.3g}", f"{err['mean'][-1]:.3g}",
                  f"{err['median'][-1]:.3g}",
                  f"{si['slope']:+.2f} [{si['lower']:+.2f}, {si['upper']:+.2f}]", pgr, verdict)
    return t


def reading(results: dict) -> str:
    est = results["estimators"]
    n = est["oracle"]["n"]
    main = main_metric(results)

    def pgr(name):
        p = est[name]["pgr"]
        return f"{p['mean'][-1]:.2f} [{p['lower'][-1]:.2f}, {p['upper'][-1]:.2f}]"

    ratio = est["refinement"][main]["mean"][-1] / est["identification"][main]["mean"][-1]
    falls = {name: est[name]["slope_interval"]["upper"] < -0.25
             for name in ("identification", "oracle")}
    verdict = ("are consistent" if all(falls.values()) else
               "do not both fall with n here (" + ", ".join(
                   f"{k} {'falls' if v else 'levels off'}" for k, v in falls.items()) + ")")
    text = (
        "error: E_x (q̂(x) - q(x))^2, the squared distance of the estimated regression function from "
        "the true one (mean and median over replicates); slope: of log mean error against log n over "
        f"n = {n[0]}..{n[-1]}, with a 90% bootstrap interval; PGR = (err_weak - err) / (err_weak - "
        "err_oracle), 0 at the true weak labeller's error, 1 at the oracle's. Identification "
        "(Algorithm 1: fit both domains, match components through the weak labels, move the "
        "target's proportions onto the source's components) and the oracle, which sees gold target "
        f"labels, {verdict}: at n = {n[-1]} identification's PGR is {pgr('identification')}. "
        f"Weak training (PGR {pgr('weak_training_ll')}) and label refinement (PGR "
        f"{pgr('refinement')}) recover part of the gap and stay biased however much data they "
        f"get: at the largest n refinement's error is {ratio:.0f} times identification's"
    )
    if "refinement_population" in est:
        pop = est["refinement_population"][main]
        text += (f", and {est['refinement'][main]['mean'][-1]:.3g} against {pop['mean'][-1]:.3g} "
                 f"± {2 * pop['se'][-1]:.2g} for q_re from the true source model (its limit)")
    return text + "."

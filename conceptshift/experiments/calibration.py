"""Experiment `calibration`: do the 90% intervals of q̂(x) cover q(x), from clear matchings to ambiguous ones?

A grid of ``weak_swap`` values moves each target weak head part of the way towards the next
concept's source weak head, so the matching margin of Algorithm 1 shrinks from clear (0) to nothing
(1/2, where two matchings fit the data equally well and only one gives the true q). At each value,
``replicates`` data sets are drawn and each is given four routes to a band of q̂(x):

* ``em_bootstrap``: Algorithm 1 on a parametric bootstrap of the two EM fits (separate fits, hard
  argmin matching per draw);
* ``svi_fullrank``: Algorithm 1 on draws of full-rank Gaussian guides of the two fits (separate);
* ``joint_svi`` and ``joint_nuts``: the joint model of both domains with the matching summed out
  (:mod:`conceptshift.inference.joint`), a full-rank guide or NUTS; each draw's matching is drawn
  from its exact p(a | theta, tau).

The weak swap is the ``weak_swap`` knob of the problem (``swap_grid`` lists its values); the
median matching margin of the EM fits and the share of data sets on which Algorithm 1's matching
is the true one are reported beside it.

Scored per data set on the gold test covariates: the coverage of q(x) by each route's central 90%
interval (the 5% and 95% quantiles of q̂(x) over the draws), the mean width, the squared error of
the mean, the posterior probability each route gives to the true matching (the shift prior's
matching posterior averaged over the draws) and whether Algorithm 1's EM matching is the true one.
Coverage is reported per grid value and pooled, with Monte Carlo standard errors over data sets.
"""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .common import PROBLEM_KNOBS, mean_se, problem_from, pyplot, savefig, separate_fit_draws
from .runner import Sweep, check_knobs, versions

NAME = "calibration"
METHODS = ("em_bootstrap", "svi_fullrank", "joint_svi", "joint_nuts")
LONG = {"em_bootstrap": "separate EM fits + parametric bootstrap",
        "svi_fullrank": "separate fits, SVI full-rank guides",
        "joint_svi": "joint model, SVI full-rank guide",
        "joint_nuts": "joint model, NUTS"}
DEFAULTS = {
    "seed": 0,
    **PROBLEM_KNOBS,
    "n": 500,
    "n_test": 200,
    "swap_grid": [0.0, 0.3, 0.4, 0.45, 0.5],
    "replicates": 20,
    "restarts": 8,
    "n_boot": 200,
    "svi_steps": 2000,
    "svi_lr": 0.02,
    "num_chains": 2,
    "num_warmup": 300,
    "num_samples": 300,
    "level": 0.9,
    "methods": list(METHODS),
}


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    if not cfg["swap_grid"] or any(float(s) < 0 for s in cfg["swap_grid"]):
        raise ValueError(f"swap_grid must hold weak swaps >= 0, got {cfg['swap_grid']}")
    bad = [m for m in cfg["methods"] if m not in METHODS]
    if bad or not cfg["methods"]:
        raise ValueError(f"methods must be a non-empty list among {METHODS}, got {cfg['methods']}")
    if int(cfg["n"]) < 4 * int(cfg["n_components"]):
        raise ValueError(f"n must be >= 4 * n_components, got n={cfg['n']}")
    from ..models.registry import family_class

    if not hasattr(family_class(cfg["family"]), "conditional_mean"):
        raise ValueError(f"family must be one whose q(y|x) has a mean q(x) (e.g. regression, gated, "
                         f"softmax, logistic, poisson), got {cfg['family']!r}")
    for k in ("n_test", "svi_steps", "num_warmup", "num_samples", "n_boot", "restarts", "replicates"):
        if int(cfg[k]) < 1:
            raise ValueError(f"{k} must be >= 1, got {cfg[k]}")
    if int(cfg["n_boot"]) < 20 or int(cfg["num_samples"]) < 20:
        raise ValueError("n_boot and num_samples must be >= 20 for a 90% interval")
    if not 0 < float(cfg["level"]) < 1:
        raise ValueError(f"level must be in (0, 1), got {cfg['level']}")


def _flatten(template, draws):
    """Draws with any leading axes -> one leading axis, by the ranks of ``template``'s leaves."""
    return jax.tree_util.tree_map(lambda t, a: a.reshape((-1,) + t.shape), template, draws)


def replicate(cfg: dict, swap: float, rep: int) -> dict:
    """One data set at ``weak_swap = swap``: every route's band scored against the truth."""
    from .._validation import OptimumWarning
    from ..diagnostics.metrics import matching_accuracy
    from ..inference import fit_em
    from ..inference.estimators import Data, identify
    from ..inference.joint import fit_joint
    from ..inference.matching import all_permutations
    from ..inference.mcmc import ConvergenceWarning
    from ..inference.predictor import Predictor
    from ..inference.uncertainty import identification_draws, matching_posterior_of_draws
    from ..models.problem import simulate

    problem = problem_from(cfg, weak_swap=float(swap))
    m1 = problem.fit_model
    m2 = m1.with_heads(2)
    n, level = int(cfg["n"]), float(cfg["level"])
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg["seed"]), int(round(1000 * swap))), rep)
    kd, ks, kt, km = jax.random.split(key, 4)
    sim = simulate(kd, problem, n, n, int(cfg["n_test"]))
    ys = jnp.stack([sim.source.y, sim.source.y_weak], 1)
    restarts = int(cfg["restarts"])
    with warnings.catch_warnings():  # recorded below as unreliable_fit instead
        warnings.simplefilter("ignore", OptimumWarning)
        sfit = fit_em(m2, ks, sim.source.x, ys, restarts=restarts)
        tfit = fit_em(m1, kt, sim.target.x, sim.target.y_weak, restarts=restarts)
    ident = identify(m1, sfit.params, tfit.params, source_fit=sfit, target_fit=tfit)
    src_truth = problem.truth_labels(ident.predictor.params, 0, "p", 0)
    tgt_truth = problem.truth_labels(tfit.params, 0, "q", 1)
    # the true matching in the fits' labels: a(k) is the target component of k's true concept
    a_true = np.asarray(jnp.argsort(tgt_truth)[src_truth])
    x = sim.test.x
    q_true = np.asarray(problem.true_mean(x), np.float64)
    template = jax.eval_shape(m1.init_params, jax.random.key(0))
    need = min(2, restarts)
    unreliable = any(bool((f.restarts_at_best < need) | f.degenerate | ~f.converged) for f in (sfit, tfit))
    out = {"swap": float(swap), "margin": float(ident.margin), "unreliable_fit": float(unreliable),
           "alg1_correct": float(matching_accuracy(ident.assignment, src_truth, tgt_truth) == 1),
           "em_error": float(np.mean((np.asarray(Predictor(m1, ident.predictor.params).mean(x))
                                      - q_true) ** 2))}
    perms_all = all_permutations(m1.n_components)

    def p_of(perms, prob, a):
        hit = np.all(np.asarray(perms) == a[None], axis=1)
        return float(np.asarray(prob)[hit].sum())

    def score(name, q_draws, perms, prob, seconds, checks=None):
        means = np.asarray(_flatten_means(m1, template, q_draws, x))
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
        out[name] = {"coverage": float(np.mean((q_true >= lo) & (q_true <= hi))),
                     "width": float(np.mean(hi - lo)),
                     "error": float(np.mean((means.mean(0) - q_true) ** 2)),
                     "p_true_matching": p_of(perms, prob, a_true),
                     "seconds": seconds}
        if checks is not None:  # NUTS: divergent transitions after warm-up, and every failed check
            out[name]["divergences"] = checks["divergences"]
            out[name]["max_rhat"] = checks.get("max_rhat", float("nan"))
            out[name]["failed_checks"] = "; ".join(checks["failed"]) or "none"

    for name in cfg["methods"]:
        k = jax.random.fold_in(km, METHODS.index(name))
        k1, k2, k3 = jax.random.split(k, 3)
        t0, checks = time.perf_counter(), None
        if name in ("em_bootstrap", "svi_fullrank"):
            sdraw, tdraw, _ = separate_fit_draws(
                name, m1, (k1, k2, k3, jax.random.fold_in(k3, 1)), sfit, tfit, sim.source.x, ys,
                sim.target.x, sim.target.y_weak, n_boot=int(cfg["n_boot"]),
                num_samples=int(cfg["num_samples"]), svi_steps=int(cfg["svi_steps"]),
                svi_lr=float(cfg["svi_lr"]))
            q, _ = identification_draws(m1, sdraw, tdraw, n_batch=1)
            perms, prob = matching_posterior_of_draws(m1, sdraw, tdraw, n_batch=1)
        else:
            with warnings.catch_warnings():  # recorded per data set (failed_checks) instead
                warnings.simplefilter("ignore", ConvergenceWarning)
                jp = fit_joint(m1, k1, Data(sim.source.x, sim.source.y, sim.source.y_weak),
                               Data(sim.target.x, None, sim.target.y_weak),
                               method=name.removeprefix("joint_"), source_fit=sfit, target_fit=tfit,
                               num_chains=int(cfg["num_chains"]), num_warmup=int(cfg["num_warmup"]),
                               num_samples=int(cfg["num_samples"]), svi_steps=int(cfg["svi_steps"]),
                               learning_rate=float(cfg["svi_lr"]))
            q, _ = jp.predictor_draws(k3)
            perms, prob = perms_all, jp.matching_prob
            checks = jp.checks
        score(name, q, perms, prob, time.perf_counter() - t0, checks)
    return out


def _flatten_means(m1, template, draws, x):
    from ..inference.predictor import Predictor

    flat = _flatten(template, draws)
    return jax.vmap(lambda p: Predictor(m1, p).mean(x))(flat)


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    validate(cfg)
    sweep = Sweep(out_dir, cfg, NAME)
    cells = [(f"swap{s:g}_rep{r}", (float(s), r)) for s in cfg["swap_grid"]
             for r in range(int(cfg["replicates"]))]
    res = sweep.run(cells, lambda c: replicate(cfg, *c), progress=progress)
    rows = list(res.values())
    results = {"experiment": NAME, "config": cfg, "versions": versions(),
               "summary": summarise(rows, cfg), "datasets": rows}
    return sweep.finish(results, plot, "calibration.png")


def summarise(rows: list[dict], cfg: dict) -> dict:
    """Per swap value and pooled: mean coverage (with its Monte Carlo s.e. over data sets), width,
    error and the probability of the true matching for each route; the margin and Algorithm 1's
    accuracy."""
    grid = [float(s) for s in cfg["swap_grid"]]
    out = {"swap": grid, "margin_median": [], "alg1_correct": [], "replicates": [], "pooled": {}}
    for s in grid:
        sub = [r for r in rows if r["swap"] == s]
        out["replicates"].append(len(sub))
        out["margin_median"].append(float(np.median([r["margin"] for r in sub])))
        out["alg1_correct"].append(mean_se([r["alg1_correct"] for r in sub])[0])
    for m in cfg["methods"]:
        entry = {}
        for metric in ("coverage", "width", "error", "p_true_matching", "seconds"):
            per = [mean_se([r[m][metric] for r in rows if r["swap"] == s]) for s in grid]
            entry[metric] = [v for v, _ in per]
            entry[f"{metric}_se"] = [e for _, e in per]
            pooled, pooled_se = mean_se([r[m][metric] for r in rows])
            out["pooled"].setdefault(m, {})[metric] = pooled
            out["pooled"][m][f"{metric}_se"] = pooled_se
        if all("divergences" in r[m] for r in rows):  # NUTS: the data sets with any divergence,
            # and with any failed sampler check
            entry["with_divergences"] = [int(sum(r[m]["divergences"] > 0 for r in rows if r["swap"] == s))
                                         for s in grid]
        if all("failed_checks" in r[m] for r in rows):
            entry["with_failed_checks"] = [int(sum(r[m]["failed_checks"] != "none" for r in rows
                                                   if r["swap"] == s)) for s in grid]
        out[m] = entry
    out["n_datasets"] = len(rows)
    return out


def plot(results: dict, path) -> None:
    """Coverage of q(x) by each route's 90% interval against the weak swap, with ±2 s.e., and the
    probability each route gives to the true matching."""
    plt = pyplot()
    s = results["summary"]
    cfg = results["config"]
    level = float(cfg["level"])
    grid = np.asarray(s["swap"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(cfg["methods"]):
        cov, se = np.asarray(s[m]["coverage"]), np.asarray(s[m]["coverage_se"])
        axes[0].errorbar(grid + 0.004 * (i - 1.5), cov, yerr=2 * se, marker="o", ms=4, capsize=3,
                         color=f"C{i}", label=LONG[m])
        axes[1].errorbar(grid + 0.004 * (i - 1.5), s[m]["p_true_matching"], yerr=2 * np.asarray(
            s[m]["p_true_matching_se"]), marker="o", ms=4, capsize=3, color=f"C{i}")
    axes[0].axhline(level, color="k", ls="--", lw=1, label=f"nominal {level:.0%}")
    axes[0].set_ylim(0, 1.02)
    axes[0].set_xlabel("weak swap (0: clear matching; towards 0.5: ambiguous)")
    axes[0].set_ylabel(f"coverage of q(x) by the {level:.0%} interval")
    axes[1].plot(grid, s["alg1_correct"], "k:", marker="s", ms=4, label="Algorithm 1's EM matching correct")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_xlabel("weak swap")
    axes[1].set_ylabel("posterior probability of the true matching")
    h0, l0 = axes[0].get_legend_handles_labels()
    h1, l1 = axes[1].get_legend_handles_labels()
    fig.legend(h0 + h1, l0 + l1, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(f"Calibration over {s['n_datasets']} data sets (n = {cfg['n']}, means ± 2 s.e.)")
    fig.tight_layout(rect=(0, 0.13, 1, 0.95))
    savefig(fig, path)
    plt.close(fig)


def table(results: dict):
    from rich.table import Table

    s = results["summary"]
    cfg = results["config"]
    t = Table(title=f"Coverage of q(x) by {float(cfg['level']):.0%} intervals (mean ± s.e. over data sets)",
              title_justify="left")
    t.add_column("swap", justify="right")
    t.add_column("margin", justify="right")
    t.add_column("Alg. 1 right", justify="right")
    for m in cfg["methods"]:
        t.add_column(m, justify="right")
    for i, sw in enumerate(s["swap"]):
        t.add_row(f"{sw:g}", f"{s['margin_median'][i]:.3g}", f"{s['alg1_correct'][i]:.2f}",
                  *(f"{s[m]['coverage'][i]:.2f} ± {s[m]['coverage_se'][i]:.2f}" for m in cfg["methods"]))
    t.add_row("pooled", "", "", *(f"{s['pooled'][m]['coverage']:.3f} ± {s['pooled'][m]['coverage_se']:.3f}"
                                  for m in cfg["methods"]))
    return t


def reading(results: dict) -> str:
    s = results["summary"]
    parts = [f"{m}: P(true matching) {s['pooled'][m]['p_true_matching']:.2f}, width "
             f"{s['pooled'][m]['width']:.3f}" for m in results["config"]["methods"]]
    checked = [f"{m}: {sum(s[m]['with_failed_checks'])} of {s['n_datasets']} data sets failed a sampler "
               f"check ({sum(s[m].get('with_divergences', []))} with divergences)"
               for m in results["config"]["methods"] if "with_failed_checks" in s[m]]
    return ("Coverage: share of gold test x whose q(x) lies in the route's central interval; s.e.: over "
            "data sets. " + "; ".join(parts) + "." + "".join(f" {c}." for c in checked))

"""Experiment `posterior`: q̂(y|x) with uncertainty by EM bootstrap, SVI, NUTS and the joint model.

One simulated problem: the source (x, y, y') and weak-target (x, y') samples are fitted separately
by EM, by SVI (AutoDelta for the MLE, a full-rank guide for a posterior) and by NUTS (chains
vectorized, draws relabelled to the EM fit), and Algorithm 1 turns each pair of source and target
draws into a draw of q̂ (a hard matching per draw). The joint model of both domains
(:mod:`conceptshift.inference.joint`, the matching summed out under the shift prior) is fitted by
SVI and by NUTS, each draw's matching drawn from its exact conditional. Every method's draws go into
an ArviZ DataTree (netCDF in the output folder) and are checked against the truth: R-hat and ESS
(of q̂'s parameters and of the sampled fits' own), the posterior over matchings, test ELPD under q̂
and under q, PIT calibration, HDI coverage of q(x).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .common import PROBLEM_KNOBS, problem_from, pyplot, savefig, separate_fit_draws
from .runner import Sweep, check_knobs, versions

NAME = "posterior"
DEFAULTS = {
    "seed": 0,
    **PROBLEM_KNOBS,
    "n": 500,
    "n_test": 200,
    "restarts": 8,
    "svi_steps": 3000,
    "svi_lr": 0.02,
    "num_chains": 4,
    "num_warmup": 500,
    "num_samples": 1000,
    "n_boot": 200,
    "hdi_prob": 0.9,
}
METHODS = ("em_bootstrap", "svi_fullrank", "nuts", "joint_svi", "joint_nuts")
SEPARATE = ("em_bootstrap", "svi_fullrank", "nuts")
SHORT = {"em_bootstrap": "EM boot", "svi_fullrank": "SVI", "nuts": "NUTS", "joint_svi": "joint SVI",
         "joint_nuts": "joint NUTS"}
LONG = {"em_bootstrap": "EM + parametric bootstrap", "svi_fullrank": "SVI, full-rank Gaussian guide",
        "nuts": "NUTS (Markov chains)", "joint_svi": "Joint model, SVI (matching summed out)",
        "joint_nuts": "Joint model, NUTS (matching summed out)"}


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    if int(cfg["n"]) < 4 * int(cfg["n_components"]):
        raise ValueError(f"n must be >= 4 * n_components, got n={cfg['n']}")
    for k in ("n_test", "svi_steps", "num_warmup", "num_samples", "n_boot", "restarts"):
        if int(cfg[k]) < 1:
            raise ValueError(f"{k} must be >= 1, got {cfg[k]}")
    if int(cfg["num_chains"]) < 2:
        raise ValueError(f"num_chains must be >= 2 (for R-hat), got {cfg['num_chains']}")
    if not 0 < float(cfg["hdi_prob"]) < 1:
        raise ValueError(f"hdi_prob must be in (0, 1), got {cfg['hdi_prob']}")


def _data(cfg):
    from ..models.problem import simulate

    problem = problem_from(cfg)
    n = int(cfg["n"])
    sim = simulate(jax.random.fold_in(jax.random.key(cfg["seed"]), 1), problem, n, n, int(cfg["n_test"]))
    return problem, sim


def _em(cfg, problem, sim):
    from ..inference import fit_em

    m1 = problem.fit_model
    m2 = m1.with_heads(2)
    key = jax.random.fold_in(jax.random.key(cfg["seed"]), 2)
    ks, kt = jax.random.split(key)
    ys = jnp.stack([sim.source.y, sim.source.y_weak], 1)
    t0 = time.perf_counter()
    sfit = fit_em(m2, ks, sim.source.x, ys, restarts=int(cfg["restarts"]))
    tfit = fit_em(m1, kt, sim.target.x, sim.target.y_weak, restarts=int(cfg["restarts"]))
    jax.block_until_ready((sfit.loglik, tfit.loglik))
    return m1, m2, ys, sfit, tfit, time.perf_counter() - t0


def _jsonable(d: dict) -> dict:
    def conv(v):
        if isinstance(v, (float, np.floating)):
            return float(v)
        return int(v) if isinstance(v, (int, np.integer)) else v

    return {k: conv(v) for k, v in d.items() if k != "summary"}


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    from ..diagnostics.posterior import diagnose, posterior_datatree, write_datatree
    from ..inference.estimators import Data
    from ..inference.joint import fit_joint
    from ..inference.mcmc import ConvergenceWarning, fit_nuts, param_arrays
    from ..inference.svi import fit_svi
    from ..inference.uncertainty import identification_draws, matching_posterior_of_draws

    validate(cfg)
    out = Path(out_dir)
    problem, sim = _data(cfg)
    m1, m2, ys, sfit, tfit, em_s = _em(cfg, problem, sim)
    prob = float(cfg["hdi_prob"])
    base = jax.random.fold_in(jax.random.key(cfg["seed"]), 3)
    sweep = Sweep(out, cfg, NAME)

    def finish(name, draws, extra, stats=None, assignments=None, fit_draws=None, matching=None):
        dt = posterior_datatree(m1, draws, sim.test.x, sim.test.y, jax.random.fold_in(base, 99),
                                sample_stats=stats, truth=problem, assignments=assignments,
                                attrs={"method": name, "title": f"q̂(x) by {LONG.get(name, name)}"},
                                draws_kind="mcmc" if name.endswith("nuts") else "independent",
                                fit_draws=fit_draws, matching_posterior=matching)
        write_datatree(dt, out / f"{name}.nc")
        d = _jsonable(diagnose(dt, prob=prob))
        d.update(extra)
        return d

    def cell(name):
        key = jax.random.fold_in(base, METHODS.index(name))
        ks, kt, kd = jax.random.split(key, 3)
        t0 = time.perf_counter()
        separate = dict(n_boot=int(cfg["n_boot"]), num_samples=int(cfg["num_samples"]),
                        svi_steps=int(cfg["svi_steps"]), svi_lr=float(cfg["svi_lr"]), progress=progress)
        if name == "em_bootstrap":
            sb, tb, _ = separate_fit_draws(name, m1, (ks, kt, None, None), sfit, tfit, sim.source.x, ys,
                                        sim.target.x, sim.target.y_weak, **separate)
            q, a = identification_draws(m1, sb, tb, n_batch=1)
            draws = jax.tree_util.tree_map(lambda a: a[None], q)
            assignments = np.asarray(a)[None]
            extra = {"fit_seconds": time.perf_counter() - t0 + em_s,
                     "source_loglik": float(sfit.loglik), "target_loglik": float(tfit.loglik)}
            return finish(name, draws, extra, assignments=assignments,
                          matching=matching_posterior_of_draws(m1, sb, tb, n_batch=1))
        if name == "svi_fullrank":
            kw = dict(num_steps=int(cfg["svi_steps"]), learning_rate=float(cfg["svi_lr"]),
                      progress=progress)
            # the MLE by AutoDelta from EM's optimum's neighbourhood: does SVI reach EM's optimum?
            sd = fit_svi(m2, ks, sim.source.x, ys, guide="delta", mle=True, init_params=sfit.params, **kw)
            td = fit_svi(m1, kt, sim.target.x, sim.target.y_weak, guide="delta", mle=True,
                         init_params=tfit.params, **kw)
            sdraw, tdraw, (sr, tr) = separate_fit_draws(
                name, m1, (ks, kt, *jax.random.split(kd)), sfit, tfit, sim.source.x, ys, sim.target.x,
                sim.target.y_weak, **separate)
            q, a = identification_draws(m1, sdraw, tdraw, n_batch=1)
            draws = jax.tree_util.tree_map(lambda a: a[None], q)
            assignments = np.asarray(a)[None]
            matching = matching_posterior_of_draws(m1, sdraw, tdraw, n_batch=1)
            n = int(cfg["n"])
            extra = {"fit_seconds": time.perf_counter() - t0,
                     "svi_delta_source_gap_per_obs": (float(sfit.loglik) - sd.loglik) / n,
                     "svi_delta_target_gap_per_obs": (float(tfit.loglik) - td.loglik) / n,
                     "svi_rejected_steps": sd.n_rejected + td.n_rejected + sr.n_rejected + tr.n_rejected}
            return finish(name, draws, extra, assignments=assignments, matching=matching)
        if name.startswith("joint"):
            src = Data(sim.source.x, sim.source.y, sim.source.y_weak)
            tgt = Data(sim.target.x, None, sim.target.y_weak)
            jp = fit_joint(m1, ks, src, tgt, method=name.removeprefix("joint_"), source_fit=sfit,
                           target_fit=tfit, num_chains=int(cfg["num_chains"]),
                           num_warmup=int(cfg["num_warmup"]), num_samples=int(cfg["num_samples"]),
                           svi_steps=int(cfg["svi_steps"]), learning_rate=float(cfg["svi_lr"]),
                           progress=progress)
            q, a = jp.predictor_draws(kd)
            fit_draws = param_arrays("", jp.params)  # source_*, target_*, log_shift_scale
            extra = {"fit_seconds": time.perf_counter() - t0,
                     "shift_scale_median": float(np.median(np.exp(np.asarray(jp.params.log_shift_scale))))}
            return finish(name, q, extra, stats=jp.sample_stats, assignments=np.asarray(a),
                          fit_draws=fit_draws, matching=(jp.assignments, jp.matching_prob))
        kw = dict(num_chains=int(cfg["num_chains"]), num_warmup=int(cfg["num_warmup"]),
                  num_samples=int(cfg["num_samples"]), progress=progress)
        sr = fit_nuts(m2, ks, sim.source.x, ys, init_params=sfit.params, **kw)
        tr = fit_nuts(m1, kt, sim.target.x, sim.target.y_weak, init_params=tfit.params, **kw)
        q, assignments = identification_draws(m1, sr.params, tr.params, n_batch=2)
        # ArviZ's standard names for the pair of chains behind each q̂ draw (the source and target
        # fits are independent, so the pair's log density and energy are the sums), and each fit's
        # own statistics under its prefix
        ss, ts = sr.sample_stats, tr.sample_stats
        stats = {"diverging": ss["diverging"] | ts["diverging"],
                 "lp": ss["lp"] + ts["lp"],
                 "energy": ss["energy"] + ts["energy"],
                 "acceptance_rate": np.minimum(ss["acceptance_rate"], ts["acceptance_rate"]),
                 "n_steps": ss["n_steps"] + ts["n_steps"],
                 "tree_depth": np.maximum(*(np.ceil(np.log2(np.asarray(r["n_steps"]) + 1))
                                            for r in (ss, ts))).astype(np.int64)}
        for who, r in (("source", ss), ("target", ts)):
            for k in ("lp", "acceptance_rate", "n_steps", "step_size", "energy"):
                stats[f"{who}_{k}"] = r[k]
        extra = {"fit_seconds": time.perf_counter() - t0,
                 # each fit's own checks (its E-BFMI on its own energy, its tail ESS)
                 "source_failed_checks": "; ".join(sr.checks["failed"]) or "none",
                 "target_failed_checks": "; ".join(tr.checks["failed"]) or "none",
                 "relabelled_draws_source": float(np.mean(np.any(
                     np.asarray(sr.perms) != np.arange(m1.n_components), -1))),
                 "relabelled_draws_target": float(np.mean(np.any(
                     np.asarray(tr.perms) != np.arange(m1.n_components), -1)))}
        return finish(name, draws=q, extra=extra, stats=stats, assignments=assignments,
                      fit_draws={**param_arrays("source", sr.params),
                                 **param_arrays("target", tr.params)},
                      matching=matching_posterior_of_draws(m1, sr.params, tr.params, n_batch=2))

    with warnings.catch_warnings():  # diagnose names the failed checks, in results.json and the reading
        warnings.simplefilter("ignore", ConvergenceWarning)
        cells = sweep.run([(m, m) for m in METHODS], cell, progress=progress)
    results = {
        "experiment": NAME,
        "config": cfg,
        "versions": versions(),
        "problem": {"pi_q": np.asarray(problem.params_q.weights).tolist(),
                    "distinguishability": problem.distinguishability()},
        "methods": {m: cells[m] for m in METHODS},
        "datatrees": [str(out / f"{m}.nc") for m in METHODS],
    }
    results = sweep.finish(results, plot, "posterior.png")
    if int(cfg["n_features"]) == 1:
        from ..diagnostics.posterior import plot_posterior, read_datatree

        figs = plot_posterior(read_datatree(out / "nuts.nc"), out, prob=prob, prefix="nuts_")
        results["figures"] += figs
        from ..files import write_json_atomic

        write_json_atomic(out / "results.json", results)
    return results


def plot(results: dict, path) -> None:
    """q̂(x) bands of the three methods against q(x) (one-dimensional x), or their coverage."""
    from arviz_stats import hdi

    from ..diagnostics.posterior import read_datatree

    plt = pyplot()
    prob = float(results["config"]["hdi_prob"])
    methods = [m for m in METHODS if m in results["methods"]]
    ncols = min(3, len(methods))
    nrows = -(-len(methods) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), sharey=True, squeeze=False)
    axes = grid.ravel()
    files = dict(zip(METHODS, results["datatrees"], strict=False))
    for ax, m in zip(axes, methods, strict=False):
        file = files[m]
        dt = read_datatree(file)
        x = dt["constant_data"]["x"].values[:, 0]
        order = np.argsort(x)
        band = hdi(dt, prob=prob, var_names=["q_mean"])["q_mean"]
        lo, hi = band.sel(ci_bound="lower").values[order], band.sel(ci_bound="upper").values[order]
        ax.scatter(x, dt["observed_data"]["y"].values, s=3, color="0.8", label="gold test data")
        ax.fill_between(x[order], lo, hi, color="C0", alpha=0.35, lw=0,
                        label=f"{prob:.0%} band of q̂(x) over the draws")
        ax.plot(x[order], dt["posterior"]["q_mean"].mean(("chain", "draw")).values[order],
                color="C0", lw=1.2, label="mean of q̂(x) over the draws")
        ax.plot(x[order], dt["truth"]["q_mean"].values[order], "k--", lw=1.2, label="truth q(x)")
        r = results["methods"][m]
        ax.set_title(f"{LONG.get(m, m)}\ncoverage of q(x) {r['hdi_coverage']:.2f}", fontsize=10)
        ax.set_xlabel("x (first feature)")
    for row in grid:
        row[0].set_ylabel("E[y | x]")
    handles, labels = axes[0].get_legend_handles_labels()
    spare = axes[len(methods):]
    for ax in spare:
        ax.axis("off")
    if len(spare):  # the legend in the empty panel, off the data
        spare[0].legend(handles, labels, loc="center", frameon=False, fontsize=9)
        fig.suptitle("Algorithm 1's q̂(x) with uncertainty against the truth")
        fig.tight_layout()
    else:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=9)
        fig.suptitle("Algorithm 1's q̂(x) with uncertainty against the truth", y=1.02)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    savefig(fig, path)
    plt.close(fig)


def table(results: dict):
    from rich.table import Table

    t = Table(title="Posterior over q̂(y|x) (Algorithm 1) against the truth, gold test data",
              title_justify="left")
    for c in ("method", "s", "R-hat", "R-hat fit", "ESS", "match p", "ELPD", "truth", "gap/obs", "PIT p",
              "cover", "error"):
        t.add_column(c, justify="right" if c != "method" else "left", no_wrap=True)
    for m, r in results["methods"].items():
        mcmc = "max_rhat" in r  # independent draws (bootstrap, SVI) have no R-hat or ESS
        t.add_row(SHORT.get(m, m), f"{r['fit_seconds']:.0f}",
                  f"{r['max_rhat']:.3f}" if mcmc else "-",
                  f"{r['max_rhat_fit']:.3f}" if "max_rhat_fit" in r else "-",
                  f"{r['min_ess_bulk']:.0f}" if mcmc else "-",
                  f"{r['matching_posterior_prob']:.3f}" if "matching_posterior_prob" in r else "-",
                  f"{r['elpd_test']:.1f}", f"{r['elpd_truth']:.1f}", f"{r['elpd_gap_per_obs']:.4f}",
                  f"{r['pit_ks_pvalue']:.2f}", f"{r['hdi_coverage']:.2f}", f"{r['reg_error']:.2g}")
    return t


def reading(results: dict) -> str:
    svi = results["methods"]["svi_fullrank"]
    return (
        "ELPD test: sum over gold test points of log mean_draws q̂(y|x); ELPD truth: the same under "
        "the true q; gap/obs: their difference per point (an estimate of E_x KL(q || q̂)); PIT KS p: "
        "p-value of the posterior predictive PIT against uniform; HDI cover: fraction of test x "
        f"whose true q(x) lies in the {results['config']['hdi_prob']:.0%} HDI of q̂(x); error: "
        "E_x (mean q̂(x) - q(x))^2. R-hat and ESS are over q̂'s parameters (draws relabelled to the "
        "EM fit before matching); R-hat fit: over the sampled fits' own parameters (the joint model's "
        "with log tau); match p: posterior probability of the most probable matching under the shift "
        "prior, averaged over the draws. The bootstrap's and SVI's are independent draws, which get no "
        "R-hat, ESS, rank plot or PSIS-LOO. AutoDelta's MLE "
        f"ended {svi['svi_delta_source_gap_per_obs']:.2e} (source) and "
        f"{svi['svi_delta_target_gap_per_obs']:.2e} (target) nats per sample below EM's optimum."
        + "".join(f" Sampler checks, {SHORT.get(m, m)}: "
                  + ("all passed." if r["failed_checks"] == "none" else r["failed_checks"] + ".")
                  for m, r in results["methods"].items() if "failed_checks" in r)
    )

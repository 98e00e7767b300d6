"""Experiment `weak-training`: the limit error of weak training over lambda against Prop. 3.1.

Weak training minimises sum_Q' (f - y')^2 + lam sum_P (f - y)^2. With n_P = n_Q' and p(x) = q(x),
its limit is f* = eta E_P[y|x] + (1 - eta) E_Q'[y'|x], eta = lam / (1 + lam), so the limit error is

    E_x (f* - q)^2 = eta^2 |eps_P|^2 + (1 - eta)^2 |eps_Q'|^2 + 2 eta (1 - eta) <eps_P, eps_Q'>

with eps_P = E_P[y|x] - q(x), eps_Q' = E_Q'[y'|x] - q(x) in L2(Q_x). The paper displays
eta |eps_P|^2 + (1 - eta)^2 |eps_Q'|^2 + eta (1 - eta) <eps_P, eps_Q'>; both are reported next to the
measured error of the estimator at a large n. Constant gates only (then f* lies in the model class).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..diagnostics.metrics import reg_error
from ..inference.estimators import Data, weak_training_ll, weak_training_sq
from ..models.problem import simulate
from .common import (
    EM_KNOBS,
    PROBLEM_KNOBS,
    cell_keys,
    em_options,
    mean_se,
    problem_from,
    pyplot,
    savefig,
    to_lists,
)
from .runner import Sweep, check_knobs, versions

NAME = "weak-training"
DEFAULTS = {
    "seed": 0,
    **PROBLEM_KNOBS,
    "lam_grid": [0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0],
    "n": 10000,
    "replicates": 4,
    "n_test": 20000,
    **EM_KNOBS,
}


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    if cfg["family"] != "regression":
        raise ValueError("weak-training needs family = 'regression' (p(x) = q(x), f* in the model class)")
    if not cfg["lam_grid"] or any(float(v) <= 0 for v in cfg["lam_grid"]):
        raise ValueError(f"lam_grid must hold positive values, got {cfg['lam_grid']}")
    if int(cfg["replicates"]) < 2 or int(cfg["n"]) < 10:
        raise ValueError("need replicates >= 2 and n >= 10")


def _replicate(key, lam, problem, *, n, n_test, opts):
    ksim, kfit = jax.random.split(key)
    sim = simulate(ksim, problem, n, n, n_test)
    w = jnp.ones((n,), sim.source.x.dtype)
    src = Data(sim.source.x, sim.source.y, sim.source.y_weak, w)
    tgt = Data(sim.target.x, None, sim.target.y_weak, w)
    m1 = problem.fit_model
    x = sim.test.x
    return {
        "weak_training_sq": reg_error(weak_training_sq(m1, src, tgt, lam), problem, x),
        "weak_training_ll": reg_error(weak_training_ll(m1, kfit, src, tgt, lam, opts), problem, x),
    }


def limits(problem, x, lam: float) -> dict:
    """The exact limit error and the paper's displayed expression at lam, over covariates x."""
    q = problem.true_mean(x)
    eps_p = problem.source_mean(x) - q
    eps_w = problem.model.conditional_mean(problem.params_q, x, head=1) - q
    eta = lam / (1 + lam)
    a, b, c = jnp.mean(eps_p**2), jnp.mean(eps_w**2), jnp.mean(eps_p * eps_w)
    return {"eta": eta, "exact": float(jnp.mean((eta * eps_p + (1 - eta) * eps_w) ** 2)),
            "exact_expanded": float(eta**2 * a + (1 - eta) ** 2 * b + 2 * eta * (1 - eta) * c),
            "paper": float(eta * a + (1 - eta) ** 2 * b + eta * (1 - eta) * c),
            "eps_p_sq": float(a), "eps_w_sq": float(b), "inner": float(c)}


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    validate(cfg)
    problem = problem_from(cfg)
    grid = sorted(float(v) for v in cfg["lam_grid"])
    x_big = problem.sample_x(jax.random.key(cfg["seed"] + 99), int(cfg["n_test"]), "q")
    sweep = Sweep(out_dir, cfg, NAME)
    fn = jax.jit(jax.vmap(partial(_replicate, n=int(cfg["n"]), n_test=int(cfg["n_test"]),
                                  opts=em_options(cfg)), in_axes=(0, None, None)))

    def cell(item):
        i, lam = item
        res = to_lists(fn(cell_keys(cfg["seed"], i, int(cfg["replicates"])),
                          jnp.asarray(lam, x_big.dtype), problem))
        res["limits"] = limits(problem, x_big, lam)
        return res

    cells = sweep.run([(f"lam{lam:g}", (i, lam)) for i, lam in enumerate(grid)], cell, progress=progress)
    rows = []
    for lam in grid:
        c = cells[f"lam{lam:g}"]
        row = {"lam": lam, **c["limits"]}
        for name in ("weak_training_sq", "weak_training_ll"):
            row[name] = dict(zip(("mean", "se"), mean_se(c[name]), strict=True))
        rows.append(row)
    results = {
        "experiment": NAME, "config": cfg, "versions": versions(), "rows": rows,
        "estimators": {name: {"lam": grid, "reg_error": {"mean": [r[name]["mean"] for r in rows],
                                                          "se": [r[name]["se"] for r in rows]}}
                       for name in ("weak_training_sq", "weak_training_ll")},
    }
    return sweep.finish(results, plot, "weak_training.png")


def plot(results: dict, path) -> None:
    plt = pyplot()

    rows = results["rows"]
    lam = np.asarray([r["lam"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    for name, label in (("weak_training_sq", "weak training, squared loss (measured)"),
                        ("weak_training_ll", "weak training, likelihood (measured)")):
        m = np.asarray([r[name]["mean"] for r in rows])
        s = np.asarray([r[name]["se"] for r in rows])
        ax.errorbar(lam, m, yerr=2 * s, fmt="o", ms=4, capsize=2, label=label)
    exact = r"exact limit $\|\eta\epsilon_P + (1-\eta)\epsilon_{Q'}\|^2$"
    ax.plot(lam, [r["exact"] for r in rows], "k-", label=exact)
    ax.plot(lam, [r["paper"] for r in rows], "k--", label="Prop. 3.1 as displayed")
    ax.set(xscale="log", xlabel=r"$\lambda$ (weight on the source loss)",
           ylabel=r"$E_x(\hat f(x) - q(x))^2$", title=f"Weak training at n = {results['config']['n']}")
    ax.legend(fontsize=7)
    savefig(fig, path)
    plt.close(fig)


def table(results: dict):
    from rich.table import Table

    t = Table(title=f"Weak training: measured error at n = {results['config']['n']} against Prop. 3.1")
    for c in ("lambda", "eta", "measured (squared loss)", "exact limit", "paper's expression",
              "measured (likelihood)"):
        t.add_column(c, justify="right")
    for r in results["rows"]:
        t.add_row(f"{r['lam']:g}", f"{r['eta']:.3f}",
                  f"{r['weak_training_sq']['mean']:.4f} ± {r['weak_training_sq']['se']:.4f}",
                  f"{r['exact']:.4f}", f"{r['paper']:.4f}",
                  f"{r['weak_training_ll']['mean']:.4f} ± {r['weak_training_ll']['se']:.4f}")
    return t

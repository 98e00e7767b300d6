"""Pieces the experiments share: the problem from a config, one compiled replicate of every estimator,
summaries over replicates, log-log slopes, and plotting helpers."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..diagnostics.metrics import excess_nll, matching_accuracy, param_error, reg_error, truth_labels
from ..inference.estimators import Data, EMOptions, estimate_all
from ..models.problem import Problem, ProblemSpec, make_problem, simulate

PROBLEM_KNOBS = {
    "family": "regression",
    "n_components": 3,
    "n_features": 1,
    "degree": 1,
    "separation": 3.0,
    "noise": 0.5,
    "shift": 2.0,
    "weak_bias": 0.5,
    "weak_shift": 0.3,
    "weak_noise": 1.0,
    "gate_separation": 3.0,
}
EM_KNOBS = {"restarts": 8, "max_iter": 200, "tol": 1e-6}

LABELS = {
    "source_only": "source only",
    "weak_only": "weak only",
    "weak_training_sq": "weak training (squared loss)",
    "weak_training_ll": "weak training (likelihood)",
    "refinement": "label refinement",
    "refinement_icl": "in-context refinement",
    "identification": "identification (Alg. 1)",
    "identification_noweak": "identification, no weak source labels",
    "oracle": "oracle (gold target labels)",
}
MIXTURE_ESTIMATORS = ("source_only", "weak_only", "weak_training_ll", "refinement", "refinement_icl",
                      "identification", "identification_noweak", "oracle")


def problem_from(cfg: dict, **override) -> Problem:
    knobs = {k: cfg[k] for k in PROBLEM_KNOBS if k in cfg}
    knobs.update(override)
    if cfg.get("delta") is not None and "delta" not in override:
        knobs["delta"] = cfg["delta"]
    return make_problem(jax.random.key(cfg["seed"]), ProblemSpec(**knobs))


def em_options(cfg: dict) -> EMOptions:
    return EMOptions(int(cfg["restarts"]), int(cfg["max_iter"]), float(cfg["tol"]))


def _identification_only(key, model, src, tgt, gold, opts):
    """The fits Algorithm 1 needs (and the oracle), without the other baselines."""
    from ..inference.estimators import Estimates, fit_em_with, identify, oracle
    from ..inference.predictor import Predictor

    keys = jax.random.split(key, 4)
    m1, m2 = model.with_heads(1), model.with_heads(2)
    s2f = fit_em_with(m2, keys[0], src.x, jnp.stack([src.y, src.y_weak], axis=1), src.w, opts)
    s1f = fit_em_with(m1, keys[1], src.x, src.y, src.w, opts)
    t1f = fit_em_with(m1, keys[2], tgt.x, tgt.y_weak, tgt.w, opts)
    preds = {
        "weak_only": Predictor(m1, t1f.params),
        "identification": None,
        "identification_noweak": None,
        "oracle": oracle(keys[3], m1, gold, opts),
    }
    ident = identify(s2f.params, t1f.params, m1, match="weak", source_fit=s2f, target_fit=t1f)
    ident_nw = identify(s1f.params, t1f.params, m1, match="strong", source_fit=s1f,
                        target_fit=t1f)
    preds["identification"] = ident.predictor
    preds["identification_noweak"] = ident_nw.predictor
    bic = {"source_bic": s2f.bic, "target_bic": t1f.bic}
    return Estimates(preds, ident, ident_nw), bic


def replicate(key, n, problem: Problem, *, n_max: int, n_test: int, lam: float, n_demos: int,
              opts: EMOptions, which: str = "all", n_components: int | None = None) -> dict:
    """Every estimator and metric on one simulated data set with n source and n target rows.

    The sample is drawn at size ``n_max`` and rows past ``n`` get weight 0, so every n (and every
    problem of the same shapes) shares one compiled program. ``which="identification"`` runs only
    Algorithm 1 (with and without weak source labels), weak-only and the oracle; ``n_components``
    fits that many components instead of the true number (misspecification).
    """
    ksim, kest = jax.random.split(key)
    sim = simulate(ksim, problem, n_max, n_max, n_test)
    dtype = sim.source.x.dtype
    w = (jnp.arange(n_max) < n).astype(dtype)
    src = Data(sim.source.x, sim.source.y, sim.source.y_weak, w)
    tgt = Data(sim.target.x, None, sim.target.y_weak, w)
    gold = Data(sim.target.x, sim.target.y, None, w)
    model = problem.strong_model
    if n_components is not None:
        import dataclasses

        model = dataclasses.replace(model, n_components=n_components)
    extra = {}
    if which == "all":
        est = estimate_all(kest, model, src, tgt, gold, lam=lam, n_demos=n_demos, opts=opts)
    else:
        est, extra = _identification_only(kest, model, src, tgt, gold, opts)
    x_t, y_t = sim.test.x, sim.test.y
    K_true = problem.spec.n_components
    out = {}
    for name, pred in est.predictors.items():
        m = {"reg_error": reg_error(pred, problem, x_t), "excess_nll": excess_nll(pred, problem, x_t, y_t)}
        if name in MIXTURE_ESTIMATORS and model.n_components == K_true:
            m["coef_error"], m["weight_error"] = param_error(pred, problem)
        out[name] = m
    for name, ident in (("identification", est.identification),
                        ("identification_noweak", est.identification_noweak)):
        if model.n_components == K_true:
            src_truth = truth_labels(problem, ident.predictor.params, 0, "p", 0)
            tgt_truth = truth_labels(problem, est.predictors["weak_only"].params, 0, "q", 1)
            out[name]["matching_accuracy"] = matching_accuracy(ident.assignment, src_truth, tgt_truth)
        out[name]["matching_margin"] = ident.margin
        out[name]["greedy_bijection"] = ident.greedy_bijection.astype(dtype)
        out[name]["greedy_agrees"] = jnp.all(ident.greedy == ident.assignment).astype(dtype)
    if extra:
        out["fit"] = extra
    return out


_COMPILED: dict = {}


def compiled_replicates(cfg: dict, n_max: int, *, which: str = "all", n_components=None):
    """jit(vmap(replicate)) over replicate keys, called as ``fn(keys, n, problem)``; n and the
    problem's parameters are traced, so one compile serves every n and every Delta (and repeated
    runs in one process reuse it)."""
    cache_key = (n_max, int(cfg["n_test"]), float(cfg.get("lam", 1.0)), int(cfg.get("n_demos", 8)),
                 em_options(cfg), which, n_components)
    if cache_key in _COMPILED:
        return _COMPILED[cache_key]
    fn = partial(replicate, n_max=n_max, n_test=int(cfg["n_test"]), lam=float(cfg.get("lam", 1.0)),
                 n_demos=int(cfg.get("n_demos", 8)), opts=em_options(cfg), which=which,
                 n_components=n_components)
    _COMPILED[cache_key] = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))
    return _COMPILED[cache_key]


def cell_keys(seed: int, cell_index: int, replicates: int):
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), cell_index), replicates)


def to_lists(tree) -> dict:
    """Device arrays -> nested lists of Python floats (per replicate)."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float64).tolist(), tree)


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se


def loglog_slope(n, err) -> float:
    """Least-squares slope of log(err) against log(n)."""
    n, err = np.asarray(n, float), np.asarray(err, float)
    ok = (err > 0) & np.isfinite(err)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(n[ok]), np.log(err[ok]), 1)[0])


def summarise(cells: list[dict], n_grid: list[int]) -> dict:
    """{estimator: {"n": grid, metric: {"mean": [...], "se": [...]}}} over replicates per cell."""
    out = {}
    for name in cells[0]:
        if name == "fit":
            continue
        entry = {"n": list(n_grid)}
        for metric in cells[0][name]:
            means, ses = zip(*(mean_se(c[name][metric]) for c in cells), strict=True)
            entry[metric] = {"mean": list(means), "se": list(ses)}
        entry["slope_reg_error"] = loglog_slope(n_grid, entry["reg_error"]["mean"])
        out[name] = entry
    return out


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (figures are only written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, path) -> None:
    """Saves a figure atomically: a temporary file in the same folder (removed whatever happens,
    also on SIGTERM through the CLI's handler), then a rename."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)

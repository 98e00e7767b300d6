"""What the mixture-of-HMMs experiments share: the problem from a config and one compiled replicate of
the estimators (Algorithm 1 with both matchings, in-context refinement for several M, source only, weak
training (likelihood), oracle) with their metrics. The estimators are the package's generic ones
(:mod:`conceptshift.inference.estimators`); the identification through the concepts' transitions keeps
its result name ``identification_transitions`` (``match="components"``)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from ..inference.estimators import EMOptions, fit_em_with, identify
from ..inference.hmm_estimators import (
    SeqData,
    next_token_kl,
    param_errors,
    refinement_icl_path,
    truth_labels,
)
from ..inference.matching import assign_traced
from ..inference.predictor import Predictor
from ..models.batch import pad_tokens
from ..models.hmm import HMMMixture, HMMParams
from ..models.hmm_problem import HMMProblem, HMMProblemSpec, make_hmm_problem, simulate_from_params

HMM_PROBLEM_KNOBS = {
    "n_components": 3,
    "n_states": 4,
    "n_tokens": 8,
    "length": 8,
    "anchors": "on",
    "anchor_mass": 0.6,
    "separation": 0.7,
    "shift": 2.0,
    "weak_noise": 0.4,
    "weak_shift": 0.2,
}
HMM_EM_KNOBS = {"restarts": 4, "max_iter": 200, "tol": 1e-6}


def hmm_problem_from(cfg: dict, **override) -> HMMProblem:
    knobs = {k: cfg[k] for k in HMM_PROBLEM_KNOBS if k in cfg}
    knobs.update(override)
    prob = make_hmm_problem(jax.random.key(cfg["seed"]), HMMProblemSpec(**knobs))
    k_star = int(cfg.get("target_concept", -1))
    if k_star >= 0:  # Example 3.3: q(k) = 1{k = k*}
        K = prob.spec.n_components
        if k_star >= K:
            raise ValueError(f"target_concept must be -1 or in [0, {K}), got {k_star}")
        lw = jnp.where(jnp.arange(K) == k_star, 0.0, -jnp.inf).astype(prob.params_q.log_weights.dtype)
        prob = prob._replace(params_q=prob.params_q._replace(log_weights=lw))
    return prob


def validate_hmm_knobs(cfg: dict) -> None:
    HMMProblemSpec(**{k: cfg[k] for k in HMM_PROBLEM_KNOBS if k in cfg})
    for name in ("restarts", "max_iter", "replicates", "n_test"):
        if int(cfg[name]) < (2 if name == "replicates" else 1):
            raise ValueError(f"{name} must be >= {2 if name == 'replicates' else 1}, got {cfg[name]}")
    grid = cfg["n_grid"]
    if not grid or any(int(n) < 2 * int(cfg["n_components"]) for n in grid):
        raise ValueError(f"n_grid must be non-empty with every n >= 2 * n_components, got {grid}")


def em_options(cfg: dict) -> EMOptions:
    return EMOptions(int(cfg["restarts"]), int(cfg["max_iter"]), float(cfg["tol"]))


def _fit(model, key, x, lengths, y, w, opts):
    return fit_em_with(model, key, pad_tokens(x, lengths), y, w, opts).params


def hmm_replicate(key, n, params_p: HMMParams, params_q: HMMParams, *, model: HMMMixture, n_max: int,
                  n_test: int, T: int, lo: int, m_grid: tuple[int, ...], n_draws: int, lam: float,
                  opts: EMOptions, baselines: bool) -> dict:
    """Every HMM estimator and metric on one simulated data set with n source and n target records.

    Records past n get weight 0 (one compiled program serves every n and every problem of the same
    shapes: the problem's parameters are traced arguments)."""
    ksim, kest = jax.random.split(key)
    sim = simulate_from_params(ksim, model, params_p, params_q, n_source=n_max, n_target=n_max,
                               n_test=n_test, T=T, lo=lo)
    dtype = params_p.log_weights.dtype
    w = (jnp.arange(n_max) < n).astype(dtype)
    s, t = sim.source, sim.target
    keys = jax.random.split(kest, 6)
    m1, m2 = model.with_heads(1), model.with_heads(2)
    s2 = _fit(m2, keys[0], s.x, s.lengths, jnp.stack([s.y, s.y_weak], 1), w, opts)
    # the weak-target fit and the oracle's gold fit share one vmapped EM (one copy in the program)
    both = jax.vmap(lambda k, y: _fit(m1, k, t.x, t.lengths, y, w, opts))(
        keys[1:3], jnp.stack([t.y_weak, t.y]))
    t1 = jax.tree_util.tree_map(lambda a: a[0], both)
    gold = jax.tree_util.tree_map(lambda a: a[1], both)
    truth = m2.next_token_log_probs(params_q, sim.test.x, sim.test.lengths, 0)
    xt, lt = sim.test.x, sim.test.lengths

    def kl(pred):
        return next_token_kl(truth, pred.log_probs(xt, lengths=lt))

    out = {}
    src_truth = truth_labels(params_p, s2)
    tgt_truth = truth_labels(params_q, t1)
    for match in ("weak", "components"):
        ident = identify(s2, t1, model, match=match)
        name = "identification" if match == "weak" else "identification_transitions"
        out[name] = {"kl": kl(ident.predictor),
                     "matching_accuracy": jnp.mean((tgt_truth[ident.assignment] == src_truth).astype(dtype)),
                     "matching_margin": ident.margin}
    out["oracle"] = {"kl": kl(Predictor(m1, gold))}
    out["source_only"] = {"kl": kl(Predictor(m1, m2.select_heads(s2, (0,))))}
    if baselines:
        x = jnp.concatenate([t.x, s.x], 0)
        lengths = jnp.concatenate([t.lengths, s.lengths], 0)
        wt = _fit(m1, keys[3], x, lengths, jnp.concatenate([t.y_weak, s.y], 0),
                  jnp.concatenate([w, lam * w], 0), opts)
        out["weak_training_ll"] = {"kl": kl(Predictor(m1, wt))}
        tdata = SeqData(t.x, t.lengths, None, t.y_weak, w)
        path = refinement_icl_path(keys[4], m2, s2, tdata, xt, lt, m_grid, n_draws)
        strong = refinement_icl_path(keys[4], m2, s2, tdata, xt, lt, m_grid, n_draws, demo_head=0)
        for i, M in enumerate(m_grid):
            out[f"icl_M{M}"] = {"kl": next_token_kl(truth, path.log_probs[i]),
                                "kl_strong_demo_head": next_token_kl(truth, strong.log_probs[i])}
    emit, trans, weights = param_errors(params_p, s2)
    out["source_fit"] = {"emit_error": emit, "trans_error": trans, "weight_error": weights,
                         "state_perm_ok": _states_recovered(params_p, s2).astype(dtype)}
    return out


def _states_recovered(truth: HMMParams, fit: HMMParams):
    """True when every true state's nearest fitted emission row (row-wise argmin) is its partner in
    the optimal state alignment: the states are recovered without ambiguity."""
    a, b = jnp.exp(truth.log_emit), jnp.exp(fit.log_emit)
    cost = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)
    perm = assign_traced(cost)
    return jnp.all(jnp.argmin(cost, axis=1).astype(perm.dtype) == perm)  # int64 argmin under x64


_COMPILED: dict = {}


def compiled_hmm_replicates(cfg: dict, model: HMMMixture, n_max: int, *, T: int, lo: int,
                            baselines: bool = True):
    """jit(vmap(hmm_replicate)) over replicate keys, called as ``fn(keys, n, params_p, params_q)``."""
    m_grid = tuple(int(m) for m in cfg.get("m_grid", [0]))
    key = (model, n_max, int(cfg["n_test"]), T, lo, m_grid, int(cfg.get("n_draws", 8)),
           float(cfg.get("lam", 1.0)), em_options(cfg), baselines)
    if key not in _COMPILED:
        fn = partial(hmm_replicate, model=model, n_max=n_max, n_test=int(cfg["n_test"]), T=T, lo=lo,
                     m_grid=m_grid, n_draws=int(cfg.get("n_draws", 8)), lam=float(cfg.get("lam", 1.0)),
                     opts=em_options(cfg), baselines=baselines)
        _COMPILED[key] = jax.jit(jax.vmap(fn, in_axes=(0, None, None, None)))
    return _COMPILED[key]

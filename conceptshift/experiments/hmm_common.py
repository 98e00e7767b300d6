"""What the mixture-of-HMMs experiments share: their knobs, the problem from a config and the estimators
they run. The replicate is the generic one of :mod:`.common` (:func:`~.common.replicate`), with the
family's estimators (:mod:`conceptshift.inference.estimators`); Algorithm 1 without weak source labels
(``identification_noweak``) matches the concepts' transition matrices (``noweak_match="components"``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..models.hmm_problem import HMMProblem, HMMProblemSpec, make_hmm_problem

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
HMM_ESTIMATORS = ("identification", "identification_noweak", "source_only", "oracle")
HMM_BASELINES = HMM_ESTIMATORS + ("weak_training_ll",)


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
        prob = dataclasses.replace(prob, params_q=prob.params_q._replace(log_weights=lw))
    return prob


def validate_hmm_knobs(cfg: dict) -> None:
    HMMProblemSpec(**{k: cfg[k] for k in HMM_PROBLEM_KNOBS if k in cfg})
    for name in ("restarts", "max_iter", "replicates", "n_test"):
        if int(cfg[name]) < (2 if name == "replicates" else 1):
            raise ValueError(f"{name} must be >= {2 if name == 'replicates' else 1}, got {cfg[name]}")
    grid = cfg["n_grid"]
    if not grid or any(int(n) < 2 * int(cfg["n_components"]) for n in grid):
        raise ValueError(f"n_grid must be non-empty with every n >= 2 * n_components, got {grid}")

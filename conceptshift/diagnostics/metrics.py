"""Metrics of an estimate q̂(y | x) against the truth q(y | x), on the gold test sample.

All functions are pure and vmappable.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from ..inference.matching import assign_traced
from ..inference.predictor import Predictor
from ..models.problem import Problem


def reg_error(pred: Predictor, problem: Problem, x: Array) -> Array:
    """E_x (q̂(x) - q(x))^2 over the test covariates: the regression-function error."""
    return jnp.mean((pred.mean(x) - problem.true_mean(x)) ** 2)


def excess_nll(pred: Predictor, problem: Problem, x: Array, y: Array) -> Array:
    """E[log q(y | x) - log q̂(y | x)] over gold test pairs: a Monte Carlo estimate of
    E_x KL(q(.|x) || q̂(.|x)) (can be slightly negative by sampling error)."""
    return jnp.mean(problem.true_log_prob(x, y) - pred.log_prob(x, y))


def param_error(pred: Predictor, problem: Problem) -> tuple[Array, Array]:
    """Errors of a K-component estimate against Q's strong components after the best permutation.

    Returns:
      (coef_error, weight_error): sum_k |betâ_{s(k)} - beta_k|^2 over the matched components and
      sum_k |pî_{s(k)} - pi^q_k| (twice the total-variation distance of the proportions).
    """
    true = problem.heads("q", "strong")
    est = pred.params
    cost = jnp.sum((true.coef[:, None, 0, :] - est.coef[None, :, 0, :]) ** 2, -1)  # (K_true, K_est)
    perm = assign_traced(cost)
    coef_err = jnp.sum(cost[jnp.arange(cost.shape[0]), perm])
    w_err = jnp.sum(jnp.abs(jnp.exp(est.log_weights[perm]) - jnp.exp(true.log_weights)))
    return coef_err, w_err


def truth_labels(problem: Problem, params, head: int, domain: str, true_head: int) -> Array:
    """For each fitted component, the true component it estimates, shape (K,): optimal assignment
    of the fit's ``head`` against head ``true_head`` (0: y, 1: y') of the truth in ``domain``."""
    true = problem.params_p if domain == "p" else problem.params_q
    return assign_traced(problem.model.match_cost(params, head, true, true_head))


def matching_accuracy(assignment: Array, source_truth: Array, target_truth: Array) -> Array:
    """Fraction of source components k whose matched target component a(k) estimates the same true
    component: mean_k [t_Q(a(k)) == t_P(k)]."""
    return jnp.mean((target_truth[assignment] == source_truth).astype(jnp.float32))

"""Metrics of an estimate q̂(y | x) against the truth q(y | x), on the gold test sample (the truth's
parameter errors and component labels are the simulated problems' own: ``param_errors`` and
``truth_labels`` of :class:`~conceptshift.models.Problem` and
:class:`~conceptshift.models.hmm_problem.HMMProblem`).

All functions are pure and vmappable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from ..inference.predictor import Predictor
from ..models.problem import Problem


def reg_error(pred: Predictor, problem: Problem, x: Array) -> Array:
    """E_x (q̂(x) - q(x))^2 over the test covariates: the regression-function error."""
    return jnp.mean((pred.mean(x) - problem.true_mean(x)) ** 2)


def excess_nll(pred: Predictor, problem: Problem, x: Array, y: Array) -> Array:
    """E[log q(y | x) - log q̂(y | x)] over gold test pairs: a Monte Carlo estimate of
    E_x KL(q(.|x) || q̂(.|x)) (can be slightly negative by sampling error)."""
    return jnp.mean(problem.true_log_prob(x, y) - pred.log_prob(x, y))


def categorical_kl(log_q: Array, log_q_hat: Array) -> Array:
    """E_x KL(q(. | x) || q̂(. | x)) over the query rows, exact over the classes of a categorical y
    (log-probability tables (N, V)): the expected excess log-loss."""
    q = jnp.exp(log_q)
    return jnp.mean(jnp.sum(jnp.where(q > 0, q * (log_q - log_q_hat), 0.0), axis=-1))


def matching_accuracy(assignment: Array, source_truth: Array, target_truth: Array) -> Array:
    """Fraction of source components k whose matched target component a(k) estimates the same true
    component: mean_k [t_Q(a(k)) == t_P(k)]."""
    return jnp.mean((target_truth[assignment] == source_truth).astype(jnp.float32))


def classification_metrics(log_probs: Array, y: Array, n_bins: int = 10) -> dict:
    """Accuracy and calibration of class probabilities log q̂(y = c | x) (N, C) against labels y
    (N,): ``accuracy`` (of the most probable class), ``error`` (1 - accuracy) and ``ece``, the
    expected calibration error sum_b (n_b / N) |accuracy_b - confidence_b| over ``n_bins``
    equal-width bins of the confidence max_c q̂(c | x) (Guo et al. 2017)."""
    conf = jnp.exp(jnp.max(log_probs, axis=-1))
    correct = (jnp.argmax(log_probs, axis=-1).astype(jnp.int32) == y.astype(jnp.int32)).astype(conf.dtype)
    b = jnp.clip(jnp.floor(conf * n_bins).astype(jnp.int32), 0, n_bins - 1)
    gap = jax.ops.segment_sum(correct - conf, b, num_segments=n_bins)
    acc = jnp.mean(correct)
    return {"accuracy": acc, "error": 1.0 - acc, "ece": jnp.sum(jnp.abs(gap)) / conf.shape[0]}


def performance_gap_recovered(err_weak, err, err_ceiling):
    """PGR = (err_weak - err) / (err_weak - err_ceiling) (Burns et al. 2023): 0 at the weak
    supervisor's error, 1 at the strong ceiling's; NaN where the weak supervisor is not worse than the
    ceiling (no gap to recover). Arrays broadcast."""
    gap = jnp.asarray(err_weak) - jnp.asarray(err_ceiling)
    return jnp.where(gap > 0, (jnp.asarray(err_weak) - jnp.asarray(err)) / jnp.where(gap > 0, gap, 1.0),
                     jnp.nan)

"""Estimators of the target q(y | x) from source data (x, y, y') ~ P and weak target data (x, y') ~ Q
(paper section 3), each returning a :class:`Predictor`.

name              what it fits                                                      paper
----------------  ----------------------------------------------------------------  ---------------
source_only       the mixture on P's (x, y)                                         desideratum (ii)
weak_only         the mixture on Q's (x, y')                                        desideratum (ii)
weak_training     least squares on sum_Q' (f - y')^2 + lam sum_P (f - y)^2          Prop. 3.1
weak_training_ll  the mixture by EM on Q' (weight 1) and P (weight lam) pooled      Prop. 3.1
refinement        labels drawn from sum_k p(y | x, k) p(k | x, y'), then a fit      Ex. 3.4
refinement_icl    the same with p(k | x, V), V = M weak demonstrations from Q'      Ex. 3.3, (3.1)
identification    MLE on P and on Q', optimal matching of weak heads, pi^q to P     Algorithm 1
oracle            the mixture on gold target labels                                 reference

Weak-training convention: the loss is sum over Q' of loss(y') plus lam times the sum over P of
loss(y), as in the paper's main text. With n_P = n_Q', the weight on P is eta = lam / (1 + lam).

All estimators are pure functions of a key and arrays: they run under ``jit`` and ``vmap`` (the
experiments vmap them over replicates). Samples carry per-row weights so that samples of different
sizes can share one compiled program (rows with weight 0 are padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .._validation import is_traced
from ..models._experts import ExpertsFamily
from ..models.registry import check_family
from ..models.regression import RegressionMixture
from .em import EMResult, fit_em, standardise
from .matching import assign_traced, assignment_margin, greedy_assignment
from .predictor import Predictor, strong_predictor, with_proportions

ESTIMATORS = (
    "source_only",
    "weak_only",
    "weak_training",
    "weak_training_ll",
    "refinement",
    "refinement_icl",
    "identification",
    "identification_noweak",
    "oracle",
)


@dataclass(frozen=True)
class EMOptions:
    """How the estimators run EM (static: part of the compiled program)."""

    restarts: int = 4
    max_iter: int = 300
    tol: float = 1e-7


class Data(NamedTuple):
    """One sample: x (N, D), labels (N,) or None, per-row weights (N,)."""

    x: Array
    y: Array | None
    y_weak: Array | None
    w: Array


def as_data(sample, w=None) -> Data:
    """A :class:`conceptshift.models.Sample` (or anything with x, y, y_weak) as weighted Data."""
    w = jnp.ones((sample.x.shape[0],), sample.x.dtype) if w is None else w
    return Data(sample.x, sample.y, sample.y_weak, w)


def fit_em_with(model, key, x, y, w, opts: EMOptions) -> EMResult:
    """``fit_em`` with the estimators' options (restarts, iterations, tolerance) and weights w."""
    return fit_em(model, key, x, y, weights=w, restarts=opts.restarts, max_iter=opts.max_iter,
                  tol=opts.tol)


def head_vectors(params, head: int) -> Array:
    """Coefficients and log-scale of one head, (K, P + 1): the space heads are matched in."""
    return jnp.concatenate([params.coef[:, head, :], params.log_scale[:, head : head + 1]], axis=1)


def head_cost(params_a, head_a: int, params_b, head_b: int) -> Array:
    """Squared distances (K, K) between the heads of two fits: cost[k, j] = |a_k - b_j|^2."""
    a, b = head_vectors(params_a, head_a), head_vectors(params_b, head_b)
    return jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)


def gate_cost(params_a, params_b) -> Array:
    """Squared distances (K, K) between gate means (gated families)."""
    a, b = params_a.gate_mean, params_b.gate_mean
    return jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)


# ---------------------------------------------------------------------------------- baselines
def source_only(key, model: ExpertsFamily, source: Data, opts: EMOptions = EMOptions()) -> Predictor:
    fit = fit_em_with(model.with_heads(1), key, source.x, source.y, source.w, opts)
    return Predictor(model.with_heads(1), fit.params)


def weak_only(key, model: ExpertsFamily, target: Data, opts: EMOptions = EMOptions()) -> Predictor:
    fit = fit_em_with(model.with_heads(1), key, target.x, target.y_weak, target.w, opts)
    return Predictor(model.with_heads(1), fit.params)


def oracle(key, model: ExpertsFamily, gold: Data, opts: EMOptions = EMOptions()) -> Predictor:
    """The mixture fitted on gold target labels (x, y) ~ Q: the reference no estimator can see."""
    return source_only(key, model, gold, opts)


def _pooled(source: Data, target: Data, lam):
    x = jnp.concatenate([target.x, source.x], 0)
    y = jnp.concatenate([target.y_weak, source.y], 0)
    w = jnp.concatenate([target.w, lam * source.w], 0)
    return x, y, w


def weak_training(model: ExpertsFamily, source: Data, target: Data, lam) -> Predictor:
    """Prop. 3.1's estimator: argmin sum_Q' (f(x) - y')^2 + lam sum_P (f(x) - y)^2 over
    f(x) = sum_k pi_k Phi(x) . beta_k. That f is linear in Phi(x), so the minimiser is weighted
    least squares on Phi; the predictive density is N(f(x), weighted mean squared residual)."""
    _check_weak_training(model, source, target, lam)
    x, y, w = _pooled(source, target, jnp.asarray(lam, source.x.dtype))
    ls = RegressionMixture(1, model.n_features, degree=model.degree, basis_fn=model.basis_fn,
                           reg=model.reg)
    # solved on standardised data like every fit, so that it does not depend on where they sit
    z, u, w, std = standardise(ls, x, y[:, None], w)
    params = ls.m_step(z, u, w[:, None], ls.data_stats(z, u, w))
    return Predictor(ls, ls.params_from_standard(params, std))


def _check_weak_training(model, source: Data, target: Data, lam) -> None:
    """The weak-training estimators' inputs: a family, Data with the labels they read, and a
    finite lam >= 0 (checked where it is concrete)."""
    check_family(model, "weak training", em_kinds=("closed_form", "generalized"))
    for name, data, label in (("source", source, "y"), ("target", target, "y_weak")):
        if not isinstance(data, Data):
            raise TypeError(f"{name} must be a Data (see as_data), got {type(data).__name__}")
        if getattr(data, label) is None:
            raise ValueError(f"{name}.{label} is required by weak training, got None")
        if data.x.ndim != 2 or data.x.shape[1] != model.n_features:
            raise ValueError(f"{name}.x must have shape (N, {model.n_features}), got {data.x.shape}")
    if not is_traced(lam):
        value = np.asarray(lam)
        if value.shape != () or not np.issubdtype(value.dtype, np.number):
            raise TypeError(f"lam must be a real number, got {lam!r}")
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"lam must be finite and >= 0, got {float(value)}")


def weak_training_ll(key, model: ExpertsFamily, source: Data, target: Data, lam,
                     opts: EMOptions = EMOptions()) -> Predictor:
    """The likelihood-weighted version: the mixture fitted by EM to Q' (weight 1) and P (weight lam)."""
    _check_weak_training(model, source, target, lam)
    x, y, w = _pooled(source, target, jnp.asarray(lam, source.x.dtype))
    fit = fit_em_with(model.with_heads(1), key, x, y, w, opts)
    return Predictor(model.with_heads(1), fit.params)


# ---------------------------------------------------------------------------------- refinement
def _weak_component_logits(model2: ExpertsFamily, params2, x: Array, y_weak: Array) -> Array:
    """log pî_k + log g(x | η̂_k) + log phi(y'; x, θ̂^wp_k), (N, K), from a two-head source fit."""
    weak = model2.select_heads(params2, (1,))
    return model2.with_heads(1).component_log_probs(weak, x, y_weak[:, None])


def _draw_refined(key, model2, params2, x, logits) -> Array:
    """ŷ ~ sum_k p̂(y | x, k) softmax(logits)_k: the source model's strong head given k."""
    kk, ky = jax.random.split(key)
    k = jax.random.categorical(kk, logits, axis=-1)  # (N,)
    mu = model2.expert_mean(params2, x)[:, :, 0]  # (N, K) strong head
    sd = jnp.exp(params2.log_scale[:, 0])  # (K,)
    mu_k = jnp.take_along_axis(mu, k[:, None], axis=1)[:, 0]
    return mu_k + sd[k] * jax.random.normal(ky, mu_k.shape, mu_k.dtype)


def refinement_labels(key, model2: ExpertsFamily, params2, target: Data) -> Array:
    """Example 3.4: one refined label per weak pair, ŷ ~ sum_k p̂(y | x, k) p̂(k | x, y')."""
    logits = _weak_component_logits(model2, params2, target.x, target.y_weak)
    return _draw_refined(key, model2, params2, target.x, logits)


def refinement_icl_logits(key, model2: ExpertsFamily, params2, target: Data, n_demos: int) -> Array:
    """log p̂(k | x, V) up to a constant, (N, K), with V = n_demos weak pairs drawn from Q' for each
    query x (eq. 3.1; demonstrations treated as independent given k as in Example 3.3)."""
    n = target.x.shape[0]
    per_pair = _weak_component_logits(model2, params2, target.x, target.y_weak)
    per_pair = per_pair - params2.log_weights[None, :]  # log g(x_j|η_k) + log phi(y'_j|x_j, k)
    idx = jax.random.choice(key, n, (n, n_demos), p=target.w / jnp.sum(target.w))
    demos = jnp.sum(per_pair[idx], axis=1)  # (N, K)
    return model2.gate_log_probs(params2, target.x) + demos


def refinement_icl_labels(key, model2, params2, target: Data, n_demos: int) -> Array:
    kd, kr = jax.random.split(key)
    logits = refinement_icl_logits(kd, model2, params2, target, n_demos)
    return _draw_refined(kr, model2, params2, target.x, logits)


# ---------------------------------------------------------------------------------- Algorithm 1
class Identification(NamedTuple):
    """Algorithm 1's outcome: q̂ as a predictor, the matching, and the two fits it was made from
    (``None`` when :func:`identify` was given parameters only)."""

    predictor: Predictor
    assignment: Array  # (K,) a(k): target component matched to source component k
    margin: Array  # () second-best minus best total matching cost
    greedy: Array  # (K,) the paper's argmin rule
    greedy_bijection: Array  # () whether the greedy rule gave a permutation
    cost: Array  # (K, K)
    source_fit: EMResult | None = None  # the fit of D_P (loglik, converged, degenerate, ...)
    target_fit: EMResult | None = None  # the fit of D_Q'


def identify(source_params, target_params, model: ExpertsFamily, *, weak_source: bool = True,
             gate_weight: float = 0.0, source_fit: EMResult | None = None,
             target_fit: EMResult | None = None) -> Identification:
    """Steps 3-4 of Algorithm 1 from a source fit and a weak-target fit.

    Args:
      source_params: two-head (y, y') source fit, or one-head (y) when ``weak_source`` is False.
      target_params: one-head fit of (x, y') on Q'.
      model: the single-head family.
      weak_source: match thetâ^wp to thetâ^wq; otherwise the strong heads thetâ to thetâ^wq.
      gate_weight: add this times the squared distance between gate means to the cost.
      source_fit, target_fit: the fits the parameters came from, carried into the result.
    """
    cost = head_cost(source_params, 1 if weak_source else 0, target_params, 0)
    if gate_weight:
        cost = cost + gate_weight * gate_cost(source_params, target_params)
    a = assign_traced(cost)
    greedy, bij = greedy_assignment(cost)
    n_heads = source_params.coef.shape[1]
    strong = strong_predictor(model.with_heads(n_heads), source_params, 0)
    pred = with_proportions(strong, target_params.log_weights[a])
    return Identification(pred, a, assignment_margin(cost), greedy, bij, cost, source_fit,
                          target_fit)


def identification(key, model: ExpertsFamily, source: Data, target: Data,
                   opts: EMOptions = EMOptions(), *, weak_source: bool = True) -> Identification:
    """Algorithm 1: MLE on D_P (with the weak head when ``weak_source``), MLE on D_Q', matching."""
    ks, kt = jax.random.split(key)
    if weak_source:
        y = jnp.stack([source.y, source.y_weak], axis=1)
        sfit = fit_em_with(model.with_heads(2), ks, source.x, y, source.w, opts)
    else:
        sfit = fit_em_with(model.with_heads(1), ks, source.x, source.y, source.w, opts)
    tfit = fit_em_with(model.with_heads(1), kt, target.x, target.y_weak, target.w, opts)
    return identify(sfit.params, tfit.params, model, weak_source=weak_source, source_fit=sfit,
                    target_fit=tfit)


# ---------------------------------------------------------------------------------- all at once
class Estimates(NamedTuple):
    predictors: dict  # name -> Predictor
    identification: Identification
    identification_noweak: Identification


def estimate_all(key, model: ExpertsFamily, source: Data, target: Data, gold: Data, *,
                 lam=1.0, n_demos: int = 8, opts: EMOptions = EMOptions()) -> Estimates:
    """Every estimator of the table above on one data set, sharing the source and target fits.

    ``gold`` holds gold target labels (x, y) ~ Q for the oracle only.
    """
    keys = jax.random.split(key, 9)
    m1, m2 = model.with_heads(1), model.with_heads(2)
    y2 = jnp.stack([source.y, source.y_weak], axis=1)
    s2f = fit_em_with(m2, keys[0], source.x, y2, source.w, opts)
    s1f = fit_em_with(m1, keys[1], source.x, source.y, source.w, opts)
    t1f = fit_em_with(m1, keys[2], target.x, target.y_weak, target.w, opts)
    s2, s1, t1 = s2f.params, s1f.params, t1f.params
    ident = identify(s2, t1, m1, weak_source=True, source_fit=s2f, target_fit=t1f)
    ident_nw = identify(s1, t1, m1, weak_source=False, source_fit=s1f, target_fit=t1f)
    y_ref = refinement_labels(keys[3], m2, s2, target)
    y_icl = refinement_icl_labels(keys[4], m2, s2, target, n_demos)
    preds = {
        "source_only": Predictor(m1, s1),
        "weak_only": Predictor(m1, t1),
        "weak_training": weak_training(m1, source, target, lam),
        "weak_training_ll": weak_training_ll(keys[5], m1, source, target, lam, opts),
        "refinement": Predictor(m1, fit_em_with(m1, keys[6], target.x, y_ref, target.w, opts).params),
        "refinement_icl": Predictor(m1, fit_em_with(m1, keys[7], target.x, y_icl, target.w, opts).params),
        "identification": ident.predictor,
        "identification_noweak": ident_nw.predictor,
        "oracle": oracle(keys[8], m1, gold, opts),
    }
    return Estimates(preds, ident, ident_nw)

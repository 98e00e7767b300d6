"""Estimators of the target q(y | x) from source data (x, y, y') ~ P and weak target data (x, y') ~ Q
(paper section 3), each returning a :class:`Predictor`.

name              what it fits                                                      paper
----------------  ----------------------------------------------------------------  ---------------
source_only       the mixture on P's (x, y)                                         desideratum (ii)
weak_only         the mixture on Q's (x, y')                                        desideratum (ii)
weak_training_sq  least squares on sum_Q' (f - y')^2 + lam sum_P (f - y)^2          Prop. 3.1
weak_training_ll  the mixture by EM on Q' (weight 1) and P (weight lam) pooled      Prop. 3.1
refinement        labels drawn from sum_k p(y | x, k) p(k | x, y'), then a fit      Ex. 3.4
refinement_icl    the same with p(k | x, V), V = M weak demonstrations from Q'      Ex. 3.3, (3.1)
identification    MLE on P and on Q', optimal matching of weak heads, pi^q to P     Algorithm 1
oracle            the mixture on gold target labels                                 reference

Every estimator but ``weak_training_sq`` (a conditional mean: families whose y has one) works for
every registered family through the protocol (``fit_em``, ``with_heads``, ``select_heads``,
``match_cost``, ``log_weights``): for a mixture of HMMs, x is tokens with -1 as trailing padding
(:func:`as_data` pads a sample that carries ``lengths``). ``identification(match=...)`` matches
the source's weak heads with the target's (``"weak"``, the paper's Algorithm 1), the source's
strong heads (``"strong"``, for a source without weak labels) or the components' own head-free
signatures (``"components"``: the HMM's transition matrices).

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

from .._validation import float_dtype, is_traced
from ..models import ExpertsFamily
from ..models.batch import pad_tokens
from ..models.registry import check_family
from ..models.regression import RegressionMixture
from .em import EMResult, fit_em, standardise
from .matching import assign_traced, assignment_margin, greedy_assignment
from .predictor import Predictor, strong_predictor, with_proportions

ESTIMATORS = (
    "source_only",
    "weak_only",
    "weak_training_sq",
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
    """One sample: x (N, D) (sequences: tokens (N, T), -1 as trailing padding), labels (N,) or
    None, per-row weights (N,)."""

    x: Array
    y: Array | None
    y_weak: Array | None
    w: Array


def as_data(sample, w=None) -> Data:
    """A :class:`conceptshift.models.Sample` (or anything with x, y, y_weak) as weighted Data; a
    sample of sequences with ``lengths`` gets its tokens padded with -1 past each length."""
    x = sample.x
    lengths = getattr(sample, "lengths", None)
    if lengths is not None:
        x = pad_tokens(x, lengths)
    if w is None:
        w = jnp.ones((x.shape[0],), x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else float_dtype())
    return Data(x, sample.y, sample.y_weak, w)


def fit_em_with(model, key, x, y, w, opts: EMOptions) -> EMResult:
    """``fit_em`` with the estimators' options (restarts, iterations, tolerance) and weights w."""
    return fit_em(model, key, x, y, weights=w, restarts=opts.restarts, max_iter=opts.max_iter,
                  tol=opts.tol)


# ---------------------------------------------------------------------------------- baselines
def source_only(key, model, source: Data, opts: EMOptions = EMOptions()) -> Predictor:
    fit = fit_em_with(model.with_heads(1), key, source.x, source.y, source.w, opts)
    return Predictor(model.with_heads(1), fit.params)


def weak_only(key, model, target: Data, opts: EMOptions = EMOptions()) -> Predictor:
    fit = fit_em_with(model.with_heads(1), key, target.x, target.y_weak, target.w, opts)
    return Predictor(model.with_heads(1), fit.params)


def oracle(key, model, gold: Data, opts: EMOptions = EMOptions()) -> Predictor:
    """The mixture fitted on gold target labels (x, y) ~ Q: the reference no estimator can see."""
    return source_only(key, model, gold, opts)


def _pooled(source: Data, target: Data, lam):
    x = jnp.concatenate([target.x, source.x], 0)
    y = jnp.concatenate([target.y_weak, source.y], 0)
    w = jnp.concatenate([target.w, lam * source.w], 0)
    return x, y, w


def weak_training_sq(model: ExpertsFamily, source: Data, target: Data, lam) -> Predictor:
    """Prop. 3.1's estimator: argmin sum_Q' (f(x) - y')^2 + lam sum_P (f(x) - y)^2 over
    f(x) = sum_k pi_k Phi(x) . beta_k. That f is linear in Phi(x), so the minimiser is weighted
    least squares on Phi; the predictive density is N(f(x), weighted mean squared residual).
    For the regression families (a conditional mean linear in their design)."""
    check_family(model, "weak_training_sq", em_kinds=("closed_form", "generalized"))
    _check_weak_training(model, source, target, lam)
    x, y, w = _pooled(source, target, jnp.asarray(lam, source.x.dtype))
    ls = RegressionMixture(1, model.n_features, degree=model.degree, basis_fn=model.basis_fn,
                           reg=model.reg)
    # solved on standardised data like every fit, so that it does not depend on where they sit
    z, u, w, std = standardise(ls, x, y[:, None], w)
    params = ls.m_step(z, u, w[:, None], ls.data_stats(z, u, w))
    return Predictor(ls, ls.params_from_standard(params, std))


def _check_weak_training(model, source: Data, target: Data, lam) -> None:
    """The weak-training estimators' inputs: a family, Data with the labels they read (x of the
    same width in both), and a finite lam >= 0 (checked where it is concrete)."""
    check_family(model, "weak training", needs=("with_heads",))
    for name, data, label in (("source", source, "y"), ("target", target, "y_weak")):
        if not isinstance(data, Data):
            raise TypeError(f"{name} must be a Data (see as_data), got {type(data).__name__}")
        if getattr(data, label) is None:
            raise ValueError(f"{name}.{label} is required by weak training, got None")
        if data.x.ndim != 2:
            raise ValueError(f"{name}.x must have shape (N, ...) of rank 2, got {data.x.shape}")
    if source.x.shape[1] != target.x.shape[1]:
        raise ValueError(f"source.x and target.x must have the same number of columns, got "
                         f"{source.x.shape} and {target.x.shape}")
    if not is_traced(lam):
        value = np.asarray(lam)
        if value.shape != () or not np.issubdtype(value.dtype, np.number):
            raise TypeError(f"lam must be a real number, got {lam!r}")
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"lam must be finite and >= 0, got {float(value)}")


def weak_training_ll(key, model, source: Data, target: Data, lam,
                     opts: EMOptions = EMOptions()) -> Predictor:
    """The likelihood-weighted version: the mixture fitted by EM to Q' (weight 1) and P (weight lam)."""
    _check_weak_training(model, source, target, lam)
    x, y, w = _pooled(source, target, jnp.asarray(lam, source.w.dtype))
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


MATCHES = {"weak": (1, 0), "strong": (0, 0), "components": (None, None)}


def _match(match: str, weak_source: bool | None) -> str:
    if weak_source is not None:  # the earlier spelling: weak_source=False is match="strong"
        return "weak" if weak_source else "strong"
    if match not in MATCHES:
        raise ValueError(f"match must be one of {tuple(MATCHES)}, got {match!r}")
    return match


def identify(source_params, target_params, model, *, match: str = "weak", weak_source: bool | None = None,
             source_fit: EMResult | None = None, target_fit: EMResult | None = None) -> Identification:
    """Steps 3-4 of Algorithm 1 from a source fit and a weak-target fit, for every family.

    Args:
      source_params: two-head (y, y') source fit, or one-head (y) unless ``match="weak"``.
      target_params: one-head fit of (x, y') on Q'.
      model: the family (any number of heads; the estimate is its one-head version).
      match: ``"weak"`` matches thetâ^wp to thetâ^wq (Algorithm 1); ``"strong"`` the strong heads
        thetâ to thetâ^wq (a source without weak labels); ``"components"`` the components' head-free
        signatures (the HMM's transition matrices). The cost is the family's ``match_cost``.
      weak_source: the earlier spelling of ``match`` (True: "weak", False: "strong").
      source_fit, target_fit: the fits the parameters came from, carried into the result.
    """
    check_family(model, "identify", needs=("match_cost", "with_heads", "select_heads"))
    head_a, head_b = MATCHES[_match(match, weak_source)]
    cost = model.match_cost(source_params, head_a, target_params, head_b)
    a = assign_traced(cost)
    greedy, bij = greedy_assignment(cost)
    strong = strong_predictor(model, source_params, 0)
    pred = with_proportions(strong, target_params.log_weights[a])
    return Identification(pred, a, assignment_margin(cost), greedy, bij, cost, source_fit,
                          target_fit)


def identification(key, model, source: Data, target: Data, opts: EMOptions = EMOptions(), *,
                   match: str = "weak", weak_source: bool | None = None) -> Identification:
    """Algorithm 1, for every family: MLE on D_P (with the weak head when ``match="weak"``), MLE on
    D_Q', matching (:func:`identify`), pi^q onto P's components."""
    match = _match(match, weak_source)
    ks, kt = jax.random.split(key)
    if match == "weak":
        y = jnp.stack([source.y, source.y_weak], axis=1)
        sfit = fit_em_with(model.with_heads(2), ks, source.x, y, source.w, opts)
    else:
        sfit = fit_em_with(model.with_heads(1), ks, source.x, source.y, source.w, opts)
    tfit = fit_em_with(model.with_heads(1), kt, target.x, target.y_weak, target.w, opts)
    return identify(sfit.params, tfit.params, model, match=match, source_fit=sfit, target_fit=tfit)


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
    ident = identify(s2, t1, m1, match="weak", source_fit=s2f, target_fit=t1f)
    ident_nw = identify(s1, t1, m1, match="strong", source_fit=s1f, target_fit=t1f)
    y_ref = refinement_labels(keys[3], m2, s2, target)
    y_icl = refinement_icl_labels(keys[4], m2, s2, target, n_demos)
    preds = {
        "source_only": Predictor(m1, s1),
        "weak_only": Predictor(m1, t1),
        "weak_training_sq": weak_training_sq(m1, source, target, lam),
        "weak_training_ll": weak_training_ll(keys[5], m1, source, target, lam, opts),
        "refinement": Predictor(m1, fit_em_with(m1, keys[6], target.x, y_ref, target.w, opts).params),
        "refinement_icl": Predictor(m1, fit_em_with(m1, keys[7], target.x, y_icl, target.w, opts).params),
        "identification": ident.predictor,
        "identification_noweak": ident_nw.predictor,
        "oracle": oracle(keys[8], m1, gold, opts),
    }
    return Estimates(preds, ident, ident_nw)

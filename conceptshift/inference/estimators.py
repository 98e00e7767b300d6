"""Estimators of the target q(y | x) from source data (x, y, y') ~ P and weak target data (x, y') ~ Q
(paper section 3), each returning a :class:`Predictor`.

name              what it fits                                                      paper
----------------  ----------------------------------------------------------------  ---------------
source_only       the mixture on P's (x, y)                                         desideratum (ii)
weak_only         the mixture on Q's (x, y')                                        desideratum (ii)
weak_training_sq  least squares on sum_Q' (f - y')^2 + lam sum_P (f - y)^2          Prop. 3.1
weak_training_ll  the mixture by EM on Q' (weight 1) and P (weight lam) pooled      Prop. 3.1
refinement        q_re = sum_k p(y | x, k) E_y' p(k | x, y'), scored exactly        Ex. 3.4, Prop. 3.2
refinement_icl    the same with p(k | x, V), V = M weak demonstrations from Q'      Ex. 3.3, (3.1)
refinement_icl_concept  the same, V from the query's own concept (the weak target fit's)  Prop. 3.2
identification    MLE on P and on Q', optimal matching of weak heads, pi^q to P     Algorithm 1
oracle            the mixture on gold target labels                                 reference
proportions_em    pi^q by EM with the source's components and weak heads fixed      label shift
bbse              pi^q by inverting the source posterior's confusion matrix         label shift
proportions_x     pi^q by EM on the target's x alone, the source's gates fixed      diagnostic

``refinement_icl_concept`` and the last three run only when asked for by name
(``estimate_all(names=...)``). The last three (:mod:`.label_shift`: EMQ, Saerens et al. 2002; BBSE,
Lipton et al. 2018; the x-only estimate) are baselines: the
first two consistent when the weak heads do not shift between domains, biased when they do; the
third reads no label at all and is consistent exactly when x alone identifies pi^q (Gaussian
gates, where each domain draws x from its own gate mixture; not a softmax gate over a shared p(x)).

Every estimator but ``weak_training_sq`` (a conditional mean: families whose y has one) works for
every registered family through the protocol (``fit_em``, ``with_heads``, ``select_heads``,
``match_cost``, ``log_weights``): for a mixture of HMMs, x is tokens with -1 as trailing padding
(:func:`as_data` pads a sample that carries ``lengths``). ``identification(match=...)`` matches
the source's weak heads with the target's (``"weak"``, the paper's Algorithm 1), the source's
strong heads (``"strong"``, for a source without weak labels) or the components' own head-free
signatures (``"components"``: the HMM's transition matrices).

The two refinements return the refined conditional of Prop. 3.2 itself, q_re(y | x) =
sum_k p̂(y | x, k) q̂(k | x) with x-dependent weights (a :class:`~.refinement.RefinedPredictor`), not a
constant-weight mixture refitted to drawn labels, which cannot represent it.

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

from .._validation import check_key, float_dtype, is_traced
from ..models import ExpertsFamily
from ..models.batch import pad_tokens
from ..models.registry import check_family
from ..models.regression import RegressionMixture
from .em import EMResult, fit_em, standardise
from .label_shift import bbse, proportions_em, proportions_x
from .matching import assign_traced, assignment_margin, greedy_assignment, matching_log_posterior
from .predictor import Predictor, strong_predictor, with_proportions
from .refinement import DEMOS, RefinedPredictor, refined, refined_icl


def _entry(model, key, caller: str):
    """The package's argument order, model first, then key, then data: a swapped call is a clear
    TypeError before anything is traced."""
    check_family(model, caller)
    return check_key("key", key)


def _weighted(*samples, needs: tuple[tuple[str, ...], ...] = (),
              names: tuple[str, ...] = ("source", "target", "gold")):
    """Each sample, a :class:`Data`, with its weights filled in; ``needs[i]``: the labels sample i
    must carry (``"y"``, ``"y_weak"``). Raises TypeError for anything but Data and ValueError for a
    missing label, naming it, before anything is fitted."""
    out = []
    for i, d in enumerate(samples):
        name = names[i]
        if not isinstance(d, Data):
            raise TypeError(f"{name} must be a Data (see as_data), got {type(d).__name__}")
        for label in (needs[i] if i < len(needs) else ()):
            if getattr(d, label) is None:
                raise ValueError(f"{name}.{label} is required here, got None")
        out.append(d.weighted())
    return tuple(out)


def check_data_samples(*samples, needs: tuple[tuple[str, ...], ...] = (),
                       names: tuple[str, ...] = ("source", "target", "gold")):
    """Each sample, a :class:`Data`, with its weights filled in; ``needs[i]`` the labels sample i
    must carry. TypeError for anything but Data, ValueError naming a missing label, before
    anything is fitted."""
    return _weighted(*samples, needs=needs, names=names)


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
    None, per-row weights (N,) (None, the default: every row weighs 1)."""

    x: Array
    y: Array | None = None
    y_weak: Array | None = None
    w: Array | None = None

    def weighted(self) -> Data:
        """The same sample with its weights filled in (unit weights where ``w`` is None) and a 1-D
        x (one covariate per row) as a column."""
        out = self
        if getattr(self.x, "ndim", 2) == 1:
            out = out._replace(x=self.x[:, None])
        if out.w is not None:
            return out
        x = jnp.asarray(out.x)
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else float_dtype()
        return out._replace(w=jnp.ones(x.shape[:1], dtype))


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
def source_only(model, key, source: Data, opts: EMOptions = EMOptions()) -> Predictor:
    key = _entry(model, key, "source_only")
    source, = _weighted(source, needs=(("y",),), names=("source",))
    fit = fit_em_with(model.with_heads(1), key, source.x, source.y, source.w, opts)
    return Predictor(model.with_heads(1), fit.params)


def weak_only(model, key, target: Data, opts: EMOptions = EMOptions()) -> Predictor:
    key = _entry(model, key, "weak_only")
    target, = _weighted(target, needs=(("y_weak",),), names=("target",))
    fit = fit_em_with(model.with_heads(1), key, target.x, target.y_weak, target.w, opts)
    return Predictor(model.with_heads(1), fit.params)


def oracle(model, key, gold: Data, opts: EMOptions = EMOptions()) -> Predictor:
    """The mixture fitted on gold target labels (x, y) ~ Q: the reference no estimator can see."""
    key = _entry(model, key, "oracle")
    gold, = _weighted(gold, needs=(("y",),), names=("gold",))
    return source_only(model, key, gold, opts)


def _pooled(source: Data, target: Data, lam):
    """Q' (weight 1) and P (weight lam) stacked, in the working precision (numpy float64 input
    included)."""
    dt = float_dtype()
    x = jnp.concatenate([jnp.asarray(target.x, dt), jnp.asarray(source.x, dt)], 0)
    y = jnp.concatenate([jnp.asarray(target.y_weak, dt), jnp.asarray(source.y, dt)], 0)
    w = jnp.concatenate([jnp.asarray(target.w, dt), jnp.asarray(lam, dt) * jnp.asarray(source.w, dt)], 0)
    return x, y, w


def weak_training_sq(model: ExpertsFamily, source: Data, target: Data, lam) -> Predictor:
    """Prop. 3.1's estimator: argmin sum_Q' (f(x) - y')^2 + lam sum_P (f(x) - y)^2 over
    f(x) = sum_k pi_k Phi(x) . beta_k. That f is linear in Phi(x), so the minimiser is weighted
    least squares on Phi; the predictive density is N(f(x), weighted mean squared residual).
    For the regression families (a conditional mean linear in their design)."""
    check_family(model, "weak_training_sq", em_kinds=("closed_form", "generalized"))
    source, target = _weighted(source, target)
    _check_weak_training(model, source, target, lam)
    x, y, w = _pooled(source, target, lam)
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


def weak_training_ll(model, key, source: Data, target: Data, lam,
                     opts: EMOptions = EMOptions()) -> Predictor:
    """The likelihood-weighted version: the mixture fitted by EM to Q' (weight 1) and P (weight lam)."""
    key = _entry(model, key, "weak_training_ll")
    source, target = _weighted(source, target, needs=(("y",), ("y_weak",)))
    _check_weak_training(model, source, target, lam)
    x, y, w = _pooled(source, target, lam)
    fit = fit_em_with(model.with_heads(1), key, x, y, w, opts)
    return Predictor(model.with_heads(1), fit.params)


# ---------------------------------------------------------------------------------- refinement
def refinement(model, key, source: Data, target: Data, opts: EMOptions = EMOptions(), *,
               n_draws: int = 128) -> RefinedPredictor:
    """Weak-label refinement (Example 3.4) scored exactly: q_re(y | x) = sum_k p̂(y | x, k) q̂(k | x)
    with q̂(k | x) = E_{y' ~ q̂'(y'|x)} p̂(k | x, y') (:mod:`.refinement`), from the two-head source fit
    and the weak target fit."""
    key = _entry(model, key, "refinement")
    source, target = _weighted(source, target, needs=(("y", "y_weak"), ("y_weak",)))
    ks, kt, kd = jax.random.split(key, 3)
    y = jnp.stack([source.y, source.y_weak], axis=1)
    s2 = fit_em_with(model.with_heads(2), ks, source.x, y, source.w, opts).params
    t1 = fit_em_with(model.with_heads(1), kt, target.x, target.y_weak, target.w, opts).params
    return refined(model.with_heads(2), kd, s2, t1, n_draws=n_draws)


def refinement_icl(model, key, source: Data, target: Data, opts: EMOptions = EMOptions(), *,
                   n_demos: int = 8, n_draws: int = 8, demo_head: int = 1,
                   demos: str = "pool") -> RefinedPredictor:
    """In-context refinement (Example 3.3) scored exactly: q̂(k | x) = E_V p̂(k | x, V) with V =
    ``n_demos`` weak pairs drawn from D_Q' (``demos="pool"``, eq. 3.1) or from the query's own
    concept (``demos="concept"``, Prop. 3.2; the concepts are those of the weak target fit, fitted
    here), from the two-head source fit (:mod:`.refinement`)."""
    key = _entry(model, key, "refinement_icl")
    source, target = _weighted(source, target, needs=(("y", "y_weak"), ("y_weak",)))
    if demos not in DEMOS:
        raise ValueError(f"demos must be one of {DEMOS}, got {demos!r}")
    ks, kd, kt = jax.random.split(key, 3)
    y = jnp.stack([source.y, source.y_weak], axis=1)
    s2 = fit_em_with(model.with_heads(2), ks, source.x, y, source.w, opts).params
    t1 = None
    if demos == "concept":
        t1 = fit_em_with(model.with_heads(1), kt, target.x, target.y_weak, target.w, opts).params
    return refined_icl(model.with_heads(2), kd, s2, target.x, target.y_weak, target.w,
                       n_demos=n_demos, n_draws=n_draws, demo_head=demo_head, demos=demos,
                       target_params=t1)


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
    # () the posterior probability of ``assignment`` given the fitted heads, under the shift prior
    # with its scale integrated out (matching.matching_log_posterior; the heads taken as known)
    matching_prob: Array
    source_fit: EMResult | None = None  # the fit of D_P (loglik, converged, degenerate, ...)
    target_fit: EMResult | None = None  # the fit of D_Q'


MATCHES = {"weak": (1, 0), "strong": (0, 0), "components": (None, None)}


def _match(match: str, weak_source: bool | None) -> str:
    if weak_source is not None:  # the earlier spelling: weak_source=False is match="strong"
        return "weak" if weak_source else "strong"
    if match not in MATCHES:
        raise ValueError(f"match must be one of {tuple(MATCHES)}, got {match!r}")
    return match


def identify(model, source_params, target_params, *, match: str = "weak", weak_source: bool | None = None,
             source_fit: EMResult | None = None, target_fit: EMResult | None = None) -> Identification:
    """Steps 3-4 of Algorithm 1 from a source fit and a weak-target fit, for every family.

    Args:
      model: the family (any number of heads; the estimate is its one-head version).
      source_params: two-head (y, y') source fit, or one-head (y) unless ``match="weak"``.
      target_params: one-head fit of (x, y') on Q'.
      match: ``"weak"`` matches thetâ^wp to thetâ^wq (Algorithm 1); ``"strong"`` the strong heads
        thetâ to thetâ^wq (a source without weak labels); ``"components"`` the components' head-free
        signatures (the HMM's transition matrices). The cost is the family's ``match_cost``.
      weak_source: the earlier spelling of ``match`` (True: "weak", False: "strong").
      source_fit, target_fit: the fits the parameters came from, carried into the result.
    """
    check_family(model, "identify", needs=("match_cost", "match_dim", "with_heads", "select_heads"))
    head_a, head_b = MATCHES[_match(match, weak_source)]
    cost = model.match_cost(source_params, head_a, target_params, head_b)
    a = assign_traced(cost)
    greedy, bij = greedy_assignment(cost)
    strong = strong_predictor(model, source_params, 0)
    pred = with_proportions(strong, target_params.log_weights[a])
    perms, log_prob = matching_log_posterior(jnp.where(jnp.isfinite(cost), cost, 0.0),
                                             dim=int(model.match_dim(head_a)))
    # NaN where the cost is not finite (no matching was made: ``assignment`` is all -1)
    prob = jnp.where(a[0] >= 0, jnp.sum(jnp.where(jnp.all(perms == a[None], axis=1), jnp.exp(log_prob), 0.0)),
                     jnp.nan)
    return Identification(pred, a, assignment_margin(cost), greedy, bij, cost, prob, source_fit,
                          target_fit)


def identification(model, key, source: Data, target: Data, opts: EMOptions = EMOptions(), *,
                   match: str = "weak", weak_source: bool | None = None) -> Identification:
    """Algorithm 1, for every family: MLE on D_P (with the weak head when ``match="weak"``), MLE on
    D_Q', matching (:func:`identify`), pi^q onto P's components."""
    key = _entry(model, key, "identification")
    need = ("y", "y_weak") if _match(match, weak_source) == "weak" else ("y",)
    source, target = _weighted(source, target, needs=(need, ("y_weak",)))
    match = _match(match, weak_source)
    ks, kt = jax.random.split(key)
    if match == "weak":
        y = jnp.stack([source.y, source.y_weak], axis=1)
        sfit = fit_em_with(model.with_heads(2), ks, source.x, y, source.w, opts)
    else:
        sfit = fit_em_with(model.with_heads(1), ks, source.x, source.y, source.w, opts)
    tfit = fit_em_with(model.with_heads(1), kt, target.x, target.y_weak, target.w, opts)
    return identify(model, sfit.params, tfit.params, match=match, source_fit=sfit, target_fit=tfit)


# ---------------------------------------------------------------------------------- all at once
class Estimates(NamedTuple):
    predictors: dict  # name -> Predictor, for the estimators asked for
    identification: Identification | None
    identification_noweak: Identification | None
    fits: dict  # the EM fits they share: "source" (y, y'), "source_strong" (y), "target" (y'), "oracle"


_NEEDS_FIT = {  # which shared fits each estimator reads
    "source_only": ("source_strong",),
    "weak_only": ("target",),
    "weak_training_sq": (),
    "weak_training_ll": (),
    "refinement": ("source", "target"),
    "refinement_icl": ("source",),
    "refinement_icl_concept": ("source", "target"),
    "identification": ("source", "target"),
    "identification_noweak": ("source_strong", "target"),
    "oracle": ("oracle",),
    "proportions_em": ("source",),
    "bbse": ("source",),
    "proportions_x": ("source",),
}
# run only when named: not in ESTIMATORS, the default set
ON_REQUEST = ("refinement_icl_concept", "proportions_em", "bbse", "proportions_x")


def estimate_all(model, key, source: Data, target: Data, gold: Data, *, lam=1.0, n_demos: int = 8,
                 opts: EMOptions = EMOptions(), names: tuple[str, ...] | None = None,
                 noweak_match: str = "strong", n_draws: int = 8,
                 label_draws: int = 128) -> Estimates:
    """The estimators ``names`` (default: every one of the table above that the family supports)
    on one data set, sharing the source and target fits; for every family.

    ``gold`` holds gold target labels (x, y) ~ Q for the oracle only. ``noweak_match``: the matching
    of ``identification_noweak`` (Algorithm 1 without weak source labels): ``"strong"`` (strong
    heads against the target's weak heads) or ``"components"`` (head-free signatures: an HMM's
    transitions). ``weak_training_sq`` is left out by default for a family without a conditional
    mean. ``n_draws``: demonstration sets per query of ``refinement_icl``; ``label_draws``: draws
    of y' per target component in ``refinement``'s expectation (a categorical y' is summed exactly).
    """
    key = _entry(model, key, "estimate_all")
    source, target, gold = _weighted(source, target, gold)
    m1, m2 = model.with_heads(1), model.with_heads(2)
    if names is None:
        least_squares = hasattr(m1, "conditional_mean") and m1.em_kind in ("closed_form",
                                                                           "generalized")
        names = tuple(n for n in ESTIMATORS if n != "weak_training_sq" or least_squares)
    bad = [n for n in names if n not in _NEEDS_FIT]
    if bad:
        raise ValueError(f"names must be among {tuple(_NEEDS_FIT)}, got {bad}")
    if noweak_match not in ("strong", "components"):
        raise ValueError(f"noweak_match must be 'strong' or 'components', got {noweak_match!r}")
    needed = {f for n in names for f in _NEEDS_FIT[n]}
    keys = jax.random.split(key, 9)
    fits = {}
    if "source" in needed:
        y2 = jnp.stack([source.y, source.y_weak], axis=1)
        fits["source"] = fit_em_with(m2, keys[0], source.x, y2, source.w, opts)
    if "source_strong" in needed:
        fits["source_strong"] = fit_em_with(m1, keys[1], source.x, source.y, source.w, opts)
    pair = "target" in needed and "oracle" in needed and gold.x.shape == target.x.shape
    if pair:  # the weak-target and gold fits share one vmapped EM (one copy in the program)
        both = jax.vmap(lambda k, x, y, w: fit_em_with(m1, k, x, y, w, opts))(
            jnp.stack([keys[2], keys[8]]), jnp.stack([target.x, gold.x]),
            jnp.stack([target.y_weak, gold.y]), jnp.stack([target.w, gold.w]))
        fits["target"] = jax.tree_util.tree_map(lambda a: a[0], both)
        fits["oracle"] = jax.tree_util.tree_map(lambda a: a[1], both)
    else:
        if "target" in needed:
            fits["target"] = fit_em_with(m1, keys[2], target.x, target.y_weak, target.w, opts)
        if "oracle" in needed:
            fits["oracle"] = fit_em_with(m1, keys[8], gold.x, gold.y, gold.w, opts)
    ident = ident_nw = None
    preds = {}
    for name in names:
        if name == "source_only":
            preds[name] = Predictor(m1, fits["source_strong"].params)
        elif name == "weak_only":
            preds[name] = Predictor(m1, fits["target"].params)
        elif name == "oracle":
            preds[name] = Predictor(m1, fits["oracle"].params)
        elif name == "weak_training_sq":
            preds[name] = weak_training_sq(m1, source, target, lam)
        elif name == "weak_training_ll":
            preds[name] = weak_training_ll(m1, keys[5], source, target, lam, opts)
        elif name == "refinement":
            preds[name] = refined(m2, keys[3], fits["source"].params, fits["target"].params,
                                  n_draws=label_draws)
        elif name == "refinement_icl":
            preds[name] = refined_icl(m2, keys[4], fits["source"].params, target.x, target.y_weak,
                                      target.w, n_demos=n_demos, n_draws=n_draws)
        elif name == "refinement_icl_concept":
            preds[name] = refined_icl(m2, keys[4], fits["source"].params, target.x, target.y_weak,
                                      target.w, n_demos=n_demos, n_draws=n_draws, demos="concept",
                                      target_params=fits["target"].params)
        elif name == "proportions_em":
            preds[name] = proportions_em(m2, fits["source"].params, target.x, target.y_weak,
                                         target.w)
        elif name == "proportions_x":
            preds[name] = proportions_x(m2, fits["source"].params, target.x, target.w)
        elif name == "bbse":
            preds[name] = bbse(m2, fits["source"].params, source.x, source.y, source.y_weak,
                               source.w, target.x, target.y_weak, target.w)
        elif name == "identification":
            ident = identify(m1, fits["source"].params, fits["target"].params, match="weak",
                             source_fit=fits["source"], target_fit=fits["target"])
            preds[name] = ident.predictor
        else:  # identification_noweak: the source fitted without its weak labels
            ident_nw = identify(m1, fits["source_strong"].params, fits["target"].params,
                                match=noweak_match, source_fit=fits["source_strong"],
                                target_fit=fits["target"])
            preds[name] = ident_nw.predictor
    return Estimates(preds, ident, ident_nw, fits)

"""Algorithm 1 on your own data in one call: :func:`fit_target`.

A researcher with a labelled source sample (x, y, y') ~ P and a weakly labelled target sample
(x, y') ~ Q' gets the estimate q̂(y | x) of the target's conditional, the two EM fits it was made
from, the matching of their components with a margin, the target's proportions carried to the
source components, and with :meth:`TargetFit.bootstrap` a parametric bootstrap whose draws redo
both fits and the matching (so an interval includes the matching's own uncertainty)::

    import jax
    from conceptshift.inference import fit_target
    from conceptshift.models import RegressionMixture

    fit = fit_target(RegressionMixture(3), jax.random.key(0), xs, ys, xt, yt_weak,
                     source_y_weak=ys_weak)
    fit.predict(x_new)                          # the mean of q̂(y | x), one per row
    boot = fit.bootstrap(jax.random.key(1), 200)
    lower, upper = boot.interval(x_new, 0.9)     # 90% percentile intervals
    boot.agreement                               # share of draws that kept the matching
    fit.summary()["matching_posterior"]          # p(matching | fits) under the shift prior
    boot.matching_posterior()                    # the same averaged over the redrawn fits

Arrays are numpy or JAX; x may be (N,) for one covariate everywhere x is taken. This is the
host-side convenience (its results are numpy values and Python numbers); the compiled pieces it
calls (``fit_em``, ``identify``, the bootstrap) run under ``jit`` and ``vmap`` themselves, and a
second call with new data of the same shapes reuses their compiled programs. Without
``source_y_weak`` the source is fitted on y alone and its strong heads are matched with the
target's weak heads (the paper's variant for a source without weak labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._validation import check_float, check_int, check_key, float_dtype
from ..models.registry import check_family
from .em import EMResult, fit_em
from .estimators import identify
from .matching import average_matching_posterior, matching_log_posterior, matching_posterior_summary
from .predictor import Predictor
from .uncertainty import bootstrap_em


def _fit_info(fit: EMResult) -> dict:
    """What a reader checks of an EM fit, as plain Python values."""
    return {"loglik": float(fit.loglik), "converged": bool(fit.converged),
            "degenerate": bool(fit.degenerate), "restarts_at_best": int(fit.restarts_at_best),
            "n_iter": int(fit.n_iter), "bic": float(fit.bic)}


@dataclass(frozen=True)
class TargetFit:
    """Algorithm 1's outcome on one pair of samples (:func:`fit_target`).

    Attributes:
      model: the one-head family of q̂.
      predictor: q̂(y | x) as a :class:`~conceptshift.inference.predictor.Predictor` (``mean``,
        ``log_prob``, ``sample``; its ``params`` are the source components under the target's
        proportions).
      assignment: (K,) a(k), the target component matched to source component k.
      margin: the second-best matching's total cost minus the best's (squared distances between
        matched heads, in the fits' own units; 0 is a tie). :meth:`bootstrap`'s ``agreement`` says
        how often the matching survives a redrawn sample, which reads more easily.
      target_weights: (K,) pî^q on the source components, pî^q_k = pî^{q'}_{a(k)}.
      match: ``"weak"`` (weak heads against weak heads) or ``"strong"`` (the source's strong heads
        against the target's weak heads, when the source has no weak labels).
      source_fit, target_fit: the two :class:`~conceptshift.inference.em.EMResult` (log-likelihood,
        convergence, restarts at the best optimum, ...).
      matchings, matching_prob: every candidate matching (M, K) and its posterior probability given
        the two fits under the shift prior of Assumption 4.5 (target weak head a(k) near source head
        k at a common scale, that scale integrated out;
        :func:`~conceptshift.inference.matching.matching_log_posterior`). It treats the fitted heads
        as known; :meth:`bootstrap`'s ``matching_prob`` averages it over redrawn fits.
    """

    model: Any
    predictor: Predictor
    assignment: np.ndarray
    margin: float
    target_weights: np.ndarray
    match: str
    source_fit: EMResult
    target_fit: EMResult
    source_x: Any
    target_x: Any
    matchings: np.ndarray
    matching_prob: np.ndarray

    def predict(self, x) -> np.ndarray:
        """The mean of q̂(y | x) for each row of ``x`` ((N, D), or (N,) for one covariate)."""
        if not hasattr(self.model, "conditional_mean"):
            raise TypeError(f"predict needs a family whose y has a mean; "
                            f"{type(self.model).__name__} has none (use predictor.log_probs)")
        return np.asarray(self.predictor.mean(self.model.covariates(x)))

    def predict_proba(self, x) -> np.ndarray:
        """q̂(y = c | x) for every class c of a categorical y, (N, C)."""
        if not hasattr(self.model, "conditional_log_probs"):
            raise TypeError(f"predict_proba needs a family with class labels; "
                            f"{type(self.model).__name__} has none (use predict)")
        return np.exp(np.asarray(self.predictor.log_probs(self.model.covariates(x))))

    def summary(self) -> dict:
        """The fit as plain Python values (JSON-able): ``assignment``, ``margin``, ``match``,
        ``target_weights``, ``source`` and ``target`` (each fit's log-likelihood, convergence,
        degeneracy, restarts at the best optimum, iterations, BIC)."""
        return {"assignment": self.assignment.tolist(), "margin": self.margin, "match": self.match,
                "matching_posterior": matching_posterior_summary(self.matchings, self.matching_prob),
                "target_weights": self.target_weights.tolist(),
                "source": _fit_info(self.source_fit), "target": _fit_info(self.target_fit)}

    def bootstrap(self, key, n_boot: int = 200, *, max_iter: int = 300,
                  tol: float = 1e-7) -> TargetBootstrap:
        """A parametric bootstrap of Algorithm 1: ``n_boot`` source and target samples redrawn
        from the two fits (at the observed x), each refitted by EM from the fit and matched again
        (one compiled call per domain). The draws carry the matching's uncertainty: a draw whose
        matching differs from the point estimate's predicts with its own."""
        key = check_key("key", key)
        n_boot = check_int("n_boot", n_boot, minimum=2)
        max_iter = check_int("max_iter", max_iter, minimum=1)
        tol = check_float("tol", tol, nonnegative=True)
        ks, kt = jax.random.split(key)
        sm = self.model.with_heads(2 if self.match == "weak" else 1)
        sb = bootstrap_em(sm, ks, self.source_fit.params, self.source_x, n_boot,
                          max_iter=max_iter, tol=tol)
        tb = bootstrap_em(self.model, kt, self.target_fit.params, self.target_x, n_boot,
                          max_iter=max_iter, tol=tol)
        params, assignments, costs = _match_draws(self.model, self.match, sb, tb)
        perms, prob = average_matching_posterior(costs, dim=_match_dim(self.model, self.match))
        return TargetBootstrap(self.model, params, np.asarray(assignments), self.assignment,
                               np.asarray(perms), np.asarray(prob, np.float64))


@dataclass(frozen=True)
class TargetBootstrap:
    """Bootstrap draws of Algorithm 1 (:meth:`TargetFit.bootstrap`).

    Attributes:
      params: q̂'s parameters with a leading axis of ``n_boot`` draws.
      assignments: (n_boot, K) each draw's matching.
      agreement: the share of draws whose matching equals the point estimate's (1: the matching
        never changed; near 1/K!: the data do not decide it).
      matchings, matching_prob: every candidate matching and its posterior probability under the
        shift prior (:class:`TargetFit`'s), averaged over the draws.
    """

    model: Any
    params: Any
    assignments: np.ndarray
    point_assignment: np.ndarray
    matchings: np.ndarray
    matching_prob: np.ndarray

    def matching_posterior(self, top: int = 3) -> dict:
        """The ``top`` most probable matchings with their probabilities
        (:func:`~conceptshift.inference.matching.matching_posterior_summary`)."""
        return matching_posterior_summary(self.matchings, self.matching_prob, top=top)

    @property
    def n_boot(self) -> int:
        return int(self.assignments.shape[0])

    @property
    def agreement(self) -> float:
        return float(np.mean(np.all(self.assignments == self.point_assignment[None], axis=1)))

    def predict(self, x) -> np.ndarray:
        """Each draw's mean of q̂(y | x), (n_boot, N)."""
        if not hasattr(self.model, "conditional_mean"):
            raise TypeError(f"predict needs a family whose y has a mean; "
                            f"{type(self.model).__name__} has none")
        x = self.model.covariates(x)
        return np.asarray(_draw_means(self.model, self.params, x))

    def predict_proba(self, x) -> np.ndarray:
        """Each draw's q̂(y = c | x) for a categorical y, (n_boot, N, C)."""
        if not hasattr(self.model, "conditional_log_probs"):
            raise TypeError(f"predict_proba needs a family with class labels; "
                            f"{type(self.model).__name__} has none")
        x = self.model.covariates(x)
        return np.exp(np.asarray(_draw_log_probs(self.model, self.params, x)))

    def interval(self, x, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Equal-tailed percentile intervals at ``level`` of the mean of q̂(y | x), each (N,), or
        for a family without a mean (categorical y) of q̂(y = c | x), each (N, C)."""
        level = check_float("level", level, positive=True)
        if not level < 1:
            raise ValueError(f"level must lie in (0, 1), got {level}")
        draws = self.predict(x) if hasattr(self.model, "conditional_mean") else self.predict_proba(x)
        a = (1 - level) / 2
        return np.quantile(draws, a, axis=0), np.quantile(draws, 1 - a, axis=0)


@partial(jax.jit, static_argnames=("method",))
def _over_draws(predictors, x, method: str):
    """``predictor.method(x)`` of every draw (a Predictor whose params carry a draws axis)."""
    return jax.vmap(lambda p: getattr(p, method)(x))(predictors)


def _draw_means(model, params, x):
    return _over_draws(Predictor(model, params), x, "mean")


def _draw_log_probs(model, params, x):
    return _over_draws(Predictor(model, params), x, "log_probs")


@partial(jax.jit, static_argnames=("model", "match"))
def _identify(model, match, source_fit, target_fit):
    return identify(model, source_fit.params, target_fit.params, match=match,
                    source_fit=source_fit, target_fit=target_fit)


@partial(jax.jit, static_argnames=("model", "match"))
def _match_draws(model, match, source_draws, target_draws):
    def one(s, t):
        ident = identify(model, s, t, match=match)
        return ident.predictor.params, ident.assignment, ident.cost

    return jax.vmap(one)(source_draws, target_draws)


def fit_target(model, key, source_x, source_y, target_x, target_y_weak, *, source_y_weak=None,
               restarts: int = 8, max_iter: int = 500, tol: float = 1e-8) -> TargetFit:
    """Algorithm 1 on data: fits the source mixture (with its weak head when ``source_y_weak`` is
    given) and the weak target mixture by EM, matches their components, and carries the target's
    proportions to the source components.

    Args:
      model: the family of q̂, e.g. ``RegressionMixture(3)`` (its ``n_heads`` is ignored: the
        source is fitted with two heads, y and y', or one, y).
      key: a ``jax.random`` key; the same key gives the same fit.
      source_x, source_y: the source covariates ((N, D), or (N,) for one covariate) and strong
        labels (N,).
      target_x, target_y_weak: the target covariates and weak labels.
      source_y_weak: the source's weak labels (N,); None: match the source's strong heads with the
        target's weak heads.
      restarts, max_iter, tol: EM's (:func:`~conceptshift.inference.fit_em`).

    Returns:
      a :class:`TargetFit`.
    """
    check_family(model, "fit_target", needs=("match_cost", "match_dim"))
    key = check_key("key", key)
    restarts = check_int("restarts", restarts, minimum=1)
    max_iter = check_int("max_iter", max_iter, minimum=1)
    tol = check_float("tol", tol, nonnegative=True)
    m1 = model.with_heads(1)
    match = "strong" if source_y_weak is None else "weak"
    n_s = m1.covariates(source_x).shape[0]  # validated here; EM takes the data as given
    n_t = m1.covariates(target_x).shape[0]
    ys = _labels("source_y", source_y, n_s)
    yt = _labels("target_y_weak", target_y_weak, n_t)
    if match == "weak":
        yw = _labels("source_y_weak", source_y_weak, n_s)
        host = isinstance(ys, np.ndarray) and isinstance(yw, np.ndarray)
        ys = np.stack([ys, yw], axis=1) if host else jnp.stack([jnp.asarray(ys), jnp.asarray(yw)], 1)
    sm = model.with_heads(2 if match == "weak" else 1)
    ks, kt = jax.random.split(key)
    em = {"restarts": restarts, "max_iter": max_iter, "tol": tol}
    sfit = fit_em(sm, ks, source_x, ys, **em)
    tfit = fit_em(m1, kt, target_x, yt, **em)
    ident = _identify(m1, match, sfit, tfit)
    perms, log_prob = matching_log_posterior(ident.cost, dim=_match_dim(m1, match))
    dtype = float_dtype()
    return TargetFit(
        model=m1, predictor=ident.predictor, assignment=np.asarray(ident.assignment),
        margin=float(ident.margin),
        target_weights=np.exp(np.asarray(ident.predictor.params.log_weights, np.float64)),
        match=match, source_fit=sfit, target_fit=tfit,
        source_x=jnp.asarray(m1.covariates(source_x), dtype),
        target_x=jnp.asarray(m1.covariates(target_x), dtype), matchings=np.asarray(perms),
        matching_prob=np.exp(np.asarray(log_prob, np.float64)))


def _match_dim(model, match: str) -> int:
    """The length of the head vectors the matching compares (source head 1 for weak, 0 for strong)."""
    return int(model.match_dim(1 if match == "weak" else 0))


def _labels(name: str, y, n: int):
    """One label per row: (n,) or (n, 1), numpy or JAX."""
    if y is None:
        raise TypeError(f"{name} must be an array of {n} labels, got None")
    arr = y if isinstance(y, jax.Array) else np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.shape != (n,):
        raise ValueError(f"{name} must hold one label per row of its x ({n},), got shape "
                         f"{tuple(arr.shape)}")
    return arr


__all__ = ["TargetBootstrap", "TargetFit", "fit_target"]

"""Choosing the number of components K: every K of a range fitted (one compiled program for the
closed-form families, :func:`~conceptshift.inference.em.fit_em_range`) and compared by BIC or ICL.

BIC = -2 log L + p log n (p free parameters); ICL = BIC + 2 sum_n w_n H(r_n), the classification
entropy of the fit's responsibilities added (Biernacki, Celeux and Govaert 2000), which favours
well-separated components. Lower is better for both. Degenerate fits (a component on too few
points, or fitting its points exactly) are never chosen.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..models.registry import check_family
from .em import EMResult, fit_em_range

CRITERIA = ("bic", "icl")


class ComponentChoice(NamedTuple):
    """The outcome of :func:`choose_components`: ``table`` (one dict per K: ``components``,
    ``loglik``, ``bic``, ``icl``, ``converged``, ``degenerate``, ``restarts_at_best``), ``best``
    (the chosen K), ``criterion``, and ``fits`` ({K: EMResult})."""

    table: list
    best: int
    criterion: str
    fits: dict


def classification_entropy(model, params, x, y, weights=None) -> float:
    """sum_n w_n H(r_n), r_n the posterior over the components of row n (nats)."""
    lp = model.component_log_probs(params, x, y)
    logr = jax.nn.log_softmax(lp, axis=-1)
    ent = -jnp.sum(jnp.exp(logr) * jnp.where(jnp.isfinite(logr), logr, 0.0), axis=-1)
    w = jnp.ones_like(ent) if weights is None else jnp.asarray(weights, ent.dtype)
    return float(jnp.sum(w * ent))


def choose_components(model, key, x, y, components=range(1, 7), *, criterion: str = "bic",
                      weights=None, restarts: int = 8, max_iter: int = 500,
                      tol: float = 1e-8) -> ComponentChoice:
    """Fits ``model`` with each number of components in ``components`` and picks the one with the
    lowest ``criterion`` (``"bic"`` or ``"icl"``) among the fits that are not degenerate.

    Example:
      >>> import jax, numpy as np
      >>> from conceptshift.models import RegressionMixture
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=600); z = rng.integers(0, 2, 600)
      >>> y = np.where(z, 3 + x, -3 - x) + 0.3 * rng.normal(size=600)
      >>> choose_components(RegressionMixture(1), jax.random.key(0), x, y, range(1, 5)).best
      2
    """
    check_family(model, "choose_components", needs=("rows", "response_rows"))  # table families
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    fits = fit_em_range(model, key, x, y, components, weights=weights, restarts=restarts,
                        max_iter=max_iter, tol=tol)
    if x is None:  # an intercept-only fit: no covariates
        x = np.zeros((np.shape(y)[0], 0))
    table = []
    for k, fit in fits.items():
        mk = dataclasses.replace(model, n_components=k)
        ent = classification_entropy(mk, fit.params, mk.rows(x), mk.response_rows(jnp.asarray(y)),
                                     weights)
        table.append(_row(k, fit, ent))
    eligible = [r for r in table if not r["degenerate"] and np.isfinite(r[criterion])]
    if not eligible:
        raise ValueError("every fit in the range is degenerate: fewer components, or more data")
    best = min(eligible, key=lambda r: r[criterion])["components"]
    return ComponentChoice(table, best, criterion, fits)


def _row(k: int, fit: EMResult, entropy: float) -> dict:
    bic = float(fit.bic)
    return {"components": k, "loglik": float(fit.loglik), "bic": bic, "icl": bic + 2 * entropy,
            "converged": bool(fit.converged), "degenerate": bool(fit.degenerate),
            "restarts_at_best": int(fit.restarts_at_best)}


__all__ = ["CRITERIA", "ComponentChoice", "choose_components", "classification_entropy"]

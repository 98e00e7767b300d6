"""Uncertainty for Algorithm 1: a distribution over q̂(y | x) rather than one estimate.

Bayesian: posterior draws of the two-head source fit and of the weak-target fit are matched draw by
draw (steps 3-4 of Algorithm 1 on each pair), giving draws of q̂'s parameters.
Frequentist: a parametric bootstrap of the EM fits (data redrawn from each fit, refitted by EM from
the fit, all replicates in one vmapped compiled call) run through the same matching.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .._validation import check_int, check_key, float_dtype
from ..models import ExpertsFamily
from ..models.registry import check_family
from .em import fit_em
from .estimators import identify
from .matching import average_matching_posterior
from .mcmc import relabel_one


def identification_draws(model: ExpertsFamily, source_draws, target_draws, *, n_batch: int = 2):
    """Algorithm 1 applied to each (source draw, target draw) pair.

    Args:
      model: the single-head family.
      source_draws: two-head (y, y') source parameters with ``n_batch`` leading axes.
      target_draws: one-head weak-target parameters with the same leading axes.

    Returns:
      (q̂ parameter draws (single head, same leading axes), assignments (..., K)).
    """
    fn = lambda s, t: _ident(model, s, t)  # noqa: E731
    for _ in range(n_batch):
        fn = jax.vmap(fn)
    return fn(source_draws, target_draws)


def _ident(model, s, t):
    ident = identify(model, s, t, match="weak")
    return ident.predictor.params, ident.assignment


@partial(jax.jit, static_argnames=("model", "max_iter"))
def _bootstrap_impl(model, keys, params, x, tol, max_iter):
    def one(key):
        b = model.resample_batch(key, params, x)
        fit = fit_em(model, key, b.x, b.y, init_params=params, max_iter=max_iter, tol=tol)
        # each refit aligned to the fit by what its components explain in its own data set
        return relabel_one(model, fit.params, params, batch=b)[0]

    return jax.vmap(one)(keys)


def bootstrap_em(model, key, params, x, n_boot: int, *, max_iter: int = 300, tol: float = 1e-7):
    """Parametric bootstrap of an EM fit, for every family: ``n_boot`` data sets drawn from
    ``params`` with the rows of ``x`` (the family's ``resample_batch``: at the observed x for
    regression mixtures, x redrawn for gated families, the same sequence lengths for a mixture of
    HMMs), each refitted by EM starting from ``params`` and relabelled to it by allocation on its
    own resampled data set (:func:`~conceptshift.inference.mcmc.relabel`). Returns the refits
    with a leading axis of size ``n_boot``; one compiled call.
    """
    check_family(model, "bootstrap_em", needs=("covariates", "resample_batch", "batch_component_log_probs",
                                               "permute"))
    key = check_key("key", key)
    n_boot = check_int("n_boot", n_boot, minimum=1)
    x = model.covariates(x)
    dtype = float_dtype()
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    keys = jax.random.split(key, n_boot)
    return _bootstrap_impl(model, keys, params, x, jnp.asarray(tol, dtype), max_iter)


def bootstrap_identification(model: ExpertsFamily, key, source_params, target_params, source_x,
                             target_x, n_boot: int, **em_kw):
    """Bootstrap draws of Algorithm 1's q̂: source (two-head) and weak-target fits bootstrapped
    independently, matched replicate by replicate. Returns (q̂ params (n_boot, ...), assignments)."""
    ks, kt = jax.random.split(check_key("key", key))
    sb = bootstrap_em(model.with_heads(2), ks, source_params, source_x, n_boot, **em_kw)
    tb = bootstrap_em(model.with_heads(1), kt, target_params, target_x, n_boot, **em_kw)
    return identification_draws(model.with_heads(1), sb, tb, n_batch=1)


__all__ = ["bootstrap_em", "bootstrap_identification", "identification_draws", "matching_posterior_of_draws"]


def matching_posterior_of_draws(model, source_draws, target_draws, *, n_batch: int = 2,
                                match: str = "weak"):
    """The probability of each matching from draws of the separate source and target fits:
    p(a | heads) under the shift prior with its scale integrated out
    (:func:`~conceptshift.inference.matching.matching_log_posterior` with ``dim``), averaged over
    the draws (:func:`~conceptshift.inference.matching.average_matching_posterior`; for separate
    fits an approximation: those draws were made without the shift prior, and tau is integrated
    out under a flat prior here, where the joint model samples it under a Gamma(2, 0.1)).

    Args:
      model: the one-head family.
      source_draws, target_draws: the fits' parameters with ``n_batch`` leading axes.
      match: ``"weak"`` (the source's weak head 1 against the target's head 0) or ``"strong"`` (the
        source's strong head 0).

    Returns:
      (assignments (M, K), prob (M,)).
    """
    check_family(model, "matching_posterior_of_draws", needs=("match_cost", "match_dim"))
    n_batch = check_int("n_batch", n_batch, minimum=0)
    if match not in ("weak", "strong"):
        raise ValueError(f"match must be 'weak' or 'strong', got {match!r}")
    head = 1 if match == "weak" else 0
    fn = lambda s, t: model.match_cost(s, head, t, 0)  # noqa: E731
    for _ in range(n_batch):
        fn = jax.vmap(fn)
    costs = fn(source_draws, target_draws)
    K = costs.shape[-1]
    return average_matching_posterior(costs.reshape(-1, K, K), dim=int(model.match_dim(head)))

"""Between the families' NumPyro sample sites and their parameter pytrees.

``numpyro_model`` samples ``weights`` (K,), ``coef`` (K, H, P), ``scale`` (K, H) (or (1, H) when
the scale is shared) and, for :class:`GatedExperts`, ``gate_mean`` (K, D), ``gate_sd`` (K, D) and
``gate_corr_chol`` (K, D, D; full covariances with D > 1). SVI and NUTS work on these sites; the
estimators, metrics and EM work on :class:`RegressionParams` / :class:`GatedParams`. The maps here
go both ways, through each family's ``site_names``, ``to_sites`` and ``from_sites`` (no branch on a
concrete family here).
"""

from __future__ import annotations

import jax
from jax import Array

from ..models import ExpertsFamily, numpyro_numerics

__all__ = ["numpyro_numerics", "latent_site_names", "sites_from_params", "params_from_sites",
           "params_from_draws"]


def latent_site_names(model: ExpertsFamily) -> tuple[str, ...]:
    """The latent sites of ``model.numpyro_model`` in the order they are sampled
    (``model.site_names()``)."""
    return model.site_names()


def sites_from_params(model: ExpertsFamily, params) -> dict[str, Array]:
    """The model's latent site values (constrained space) that give ``params``
    (``model.to_sites``): the weights are renormalised; a shared scale is read from component 0."""
    return model.to_sites(params)


def params_from_sites(model: ExpertsFamily, sites: dict):
    """The family's parameter pytree from one set of latent site values (``model.from_sites``; no
    leading draw axes; ``jax.vmap`` it over draws)."""
    return model.from_sites(sites)


def params_from_draws(model: ExpertsFamily, sites: dict, n_batch: int):
    """:func:`params_from_sites` over ``n_batch`` leading axes (e.g. 2 for (chain, draw))."""
    fn = model.from_sites
    for _ in range(n_batch):
        fn = jax.vmap(fn)
    return fn({k: sites[k] for k in model.site_names()})

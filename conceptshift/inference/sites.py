"""Between the families' NumPyro sample sites and their parameter pytrees.

``numpyro_model`` samples ``weights`` (K,), ``coef`` (K, H, P), ``scale`` (K, H) (or (1, H) when
the scale is shared) and, for :class:`GatedExperts`, ``gate_mean`` (K, D), ``gate_sd`` (K, D) and
``gate_corr_chol`` (K, D, D; full covariances with D > 1). SVI and NUTS work on these sites; the
estimators, metrics and EM work on :class:`RegressionParams` / :class:`GatedParams`. The maps here
go both ways; the gate covariance is rebuilt by the model's own ``_gate_sites`` (under
``substitute``), so there is one definition of it.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import Array
from numpyro import handlers

from ..models._experts import ExpertsFamily
from ..models.gated import GatedExperts
from ..models.softmax_gated import SoftmaxGatedExperts


def numpyro_numerics():
    """A context in which numpyro's own distribution code runs under any user setting: it relies on
    implicit rank broadcasting and int/float promotion, which ``jax_numpy_rank_promotion="raise"``
    and ``jax_numpy_dtype_promotion="strict"`` forbid."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.numpy_rank_promotion("allow"))
    stack.enter_context(jax.numpy_dtype_promotion("standard"))
    return stack


def latent_site_names(model: ExpertsFamily) -> tuple[str, ...]:
    """The latent sites of ``model.numpyro_model`` in the order they are sampled."""
    names = ["weights", "coef", "scale"]
    if isinstance(model, SoftmaxGatedExperts):
        names.append("gate_weights")
    if isinstance(model, GatedExperts):
        names += ["gate_mean", "gate_sd"]
        if model.covariance == "full" and model.n_features > 1:
            names.append("gate_corr_chol")
    return tuple(names)


def sites_from_params(model: ExpertsFamily, params) -> dict[str, Array]:
    """The model's latent site values (constrained space) that give ``params``.

    The weights are renormalised; a shared scale is read from component 0.
    """
    w = jnp.exp(params.log_weights - jax.scipy.special.logsumexp(params.log_weights))
    scale = jnp.exp(params.log_scale)
    if model.shared_scale:
        scale = scale[:1]
    out = {"weights": w, "coef": params.coef, "scale": scale}
    if isinstance(model, SoftmaxGatedExperts):
        out["gate_weights"] = params.gate_weights
    if isinstance(model, GatedExperts):
        cov = params.gate_cov
        sd = jnp.sqrt(jnp.diagonal(cov, axis1=-2, axis2=-1))
        out["gate_mean"] = params.gate_mean
        out["gate_sd"] = sd
        if "gate_corr_chol" in latent_site_names(model):
            corr = cov / (sd[..., :, None] * sd[..., None, :])
            out["gate_corr_chol"] = jnp.linalg.cholesky(corr)
    return out


def params_from_sites(model: ExpertsFamily, sites: dict):
    """The family's parameter pytree from one set of latent site values (no leading draw axes;
    ``jax.vmap`` it over draws)."""
    K, H = model.n_components, model.n_heads
    coef = sites["coef"]
    scale = jnp.broadcast_to(sites["scale"], (K, H))
    gate = {}
    if isinstance(model, SoftmaxGatedExperts):
        gate = {"gate_weights": sites["gate_weights"]}
    if isinstance(model, GatedExperts):
        dummy = jnp.zeros((0, model.n_features), coef.dtype)
        with numpyro_numerics(), handlers.seed(rng_seed=0), handlers.substitute(data=sites):
            gate = model._gate_sites(dummy)
    return model._params_from_sites(jnp.log(sites["weights"]), coef, jnp.log(scale), gate)


def params_from_draws(model: ExpertsFamily, sites: dict, n_batch: int):
    """:func:`params_from_sites` over ``n_batch`` leading axes (e.g. 2 for (chain, draw))."""
    fn = lambda s: params_from_sites(model, s)  # noqa: E731
    for _ in range(n_batch):
        fn = jax.vmap(fn)
    return fn({k: sites[k] for k in latent_site_names(model)})

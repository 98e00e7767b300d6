"""NUTS on a family's marginalised NumPyro model, several chains vectorized, and relabelling.

The model is ``numpyro_model`` itself: k is summed out in its ``MixtureSameFamily`` likelihood, so
NUTS samples only continuous sites. The posterior of a K-component mixture is invariant under the K!
relabellings of its components; chains (and long single chains) visit different labellings, and
every per-component summary (R-hat, ESS, intervals) is meaningless until the draws are aligned.
:func:`relabel` aligns each draw to a reference fit (e.g. EM's) by the permutation that minimises the
squared distance between component parameter vectors (Hungarian algorithm, vmapped over draws).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from numpyro.distributions import biject_to
from numpyro.infer import MCMC, NUTS

from .._validation import check_float, check_int, check_key
from ..models._experts import ExpertsFamily
from .matching import _assign
from .sites import latent_site_names, numpyro_numerics, params_from_draws, sites_from_params

EXTRA_FIELDS = ("diverging", "accept_prob", "num_steps", "energy", "potential_energy",
                "adapt_state.step_size")


def component_vectors(params) -> Array:
    """One row per component, (K, F): coefficients of every head, log-scales, log-weight and the
    gate's mean (Gaussian gates) or slopes (softmax gates): what draws are aligned on."""
    K = params.coef.shape[0]
    parts = [params.coef.reshape(K, -1), params.log_scale.reshape(K, -1), params.log_weights[:, None]]
    if hasattr(params, "gate_mean"):
        parts.append(params.gate_mean)
    if hasattr(params, "gate_weights"):
        parts.append(params.gate_weights)
    return jnp.concatenate(parts, axis=1)


def relabel_one(params, reference):
    """(aligned params, perm): component k of the result is component perm[k] of ``params``, the
    one closest to the reference's component k under the optimal assignment."""
    a, b = component_vectors(reference), component_vectors(params)
    cost = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)
    perm = _assign(cost)
    return jax.tree_util.tree_map(lambda v: v[perm], params), perm


@jax.jit
def _relabel_flat(flat, reference):
    return jax.vmap(relabel_one, in_axes=(0, None))(flat, reference)


def relabel(params, reference, *, n_batch: int = 2):
    """Aligns draws with ``n_batch`` leading axes (2 for (chain, draw)) to ``reference``.

    Returns:
      (aligned params, perms of shape batch + (K,)). Relabelling an already aligned set of draws
      returns it unchanged; a draw whose components were permuted comes back exactly.
    """
    n_batch = check_int("n_batch", n_batch, minimum=0)
    leaves = jax.tree_util.tree_leaves(params)
    batch = leaves[0].shape[:n_batch]
    flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[n_batch:]), params)
    out, perm = _relabel_flat(flat, reference)
    unflat = lambda a: a.reshape(batch + a.shape[1:])  # noqa: E731
    return jax.tree_util.tree_map(unflat, out), unflat(perm)


@dataclass
class MCMCResult:
    """Outcome of :func:`fit_nuts`.

    ``params``: the family's parameter pytree with leading (chain, draw) axes, relabelled to
    ``reference`` when one was given; ``raw_params`` before relabelling; ``perms`` (C, S, K) the
    permutations applied; ``sample_stats``: NUTS's per-draw statistics (C, S), named as ArviZ
    expects (``diverging``, ``acceptance_rate``, ``n_steps``, ``energy``, ``lp``, ``step_size``).
    """

    model: ExpertsFamily
    params: Any
    raw_params: Any
    perms: Array | None
    reference: Any
    sample_stats: dict
    num_chains: int
    num_samples: int


_MCMCS: dict = {}


def _mcmc(model, num_chains, num_warmup, num_samples, target_accept, max_tree_depth, progress):
    key = (model, num_chains, num_warmup, num_samples, target_accept, max_tree_depth, progress)
    if key not in _MCMCS:
        kernel = NUTS(model.numpyro_model, target_accept_prob=target_accept,
                      max_tree_depth=max_tree_depth)
        _MCMCS[key] = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples,
                           num_chains=num_chains, chain_method="vectorized", progress_bar=progress,
                           jit_model_args=True)
    return _MCMCS[key]


def _unconstrained_inits(model, params, num_chains, dtype, x, y):
    """Per-chain unconstrained site values from a params pytree, unbatched or (C, ...)."""
    from numpyro import handlers

    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    batched = params.coef.ndim == 4
    if not batched:
        params = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num_chains,) + a.shape), params)
    if params.coef.shape[0] != num_chains:
        raise ValueError(f"init_params has {params.coef.shape[0]} chains, expected {num_chains}")
    sites = jax.vmap(lambda p: sites_from_params(model, p))(params)
    one = {k: v[0] for k, v in sites.items()}
    with numpyro_numerics():
        trace = handlers.trace(handlers.substitute(handlers.seed(model.numpyro_model, 0),
                                                   data=one)).get_trace(x, y)
        return {n: biject_to(trace[n]["fn"].support).inv(sites[n]) for n in latent_site_names(model)}


def fit_nuts(
    model: ExpertsFamily,
    key,
    x,
    y,
    *,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    init_params=None,
    reference=None,
    target_accept: float = 0.8,
    max_tree_depth: int = 8,
    progress: bool = False,
) -> MCMCResult:
    """Samples the posterior of ``model.numpyro_model`` given (x, y) with NUTS, chains vectorized.

    Args:
      model, key, x, y: as for :func:`fit_em`.
      num_chains, num_warmup, num_samples: per chain.
      init_params: the family's parameters to start every chain from (e.g. an EM fit), or a pytree
        with a leading chain axis (one start per chain); default: NumPyro's ``init_to_uniform``.
      reference: parameters the draws are relabelled to (default: ``init_params`` when unbatched;
        None and no init: no relabelling).
      target_accept, max_tree_depth: NUTS settings.

    A second call with data of the same shapes and the same settings reuses the compiled sampler.
    """
    if not isinstance(model, ExpertsFamily):
        raise TypeError(f"model must be a conceptshift model family, got {type(model).__name__}")
    key = check_key("key", key)
    num_chains = check_int("num_chains", num_chains, minimum=1)
    num_warmup = check_int("num_warmup", num_warmup, minimum=1)
    num_samples = check_int("num_samples", num_samples, minimum=1)
    max_tree_depth = check_int("max_tree_depth", max_tree_depth, minimum=1)
    target_accept = check_float("target_accept", target_accept, positive=True)
    if not target_accept < 1:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
    x, y = model.check_data(x, y)
    if reference is None and init_params is not None and init_params.coef.ndim == 3:
        reference = init_params
    inits = None
    if init_params is not None:
        inits = _unconstrained_inits(model, init_params, num_chains, y.dtype, x, y)
    mcmc = _mcmc(model, num_chains, num_warmup, num_samples, target_accept, max_tree_depth,
                 bool(progress))
    with numpyro_numerics():
        mcmc.run(key, x, y, init_params=inits, extra_fields=EXTRA_FIELDS)
        sites = mcmc.get_samples(group_by_chain=True)
        extra = mcmc.get_extra_fields(group_by_chain=True)
    raw = params_from_draws(model, sites, 2)
    if reference is not None:
        reference = jax.tree_util.tree_map(lambda a: jnp.asarray(a, y.dtype), reference)
        params, perms = relabel(raw, reference)
    else:
        params, perms = raw, None
    stats = {
        "diverging": np.asarray(extra["diverging"]),
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "n_steps": np.asarray(extra["num_steps"]),
        "energy": np.asarray(extra["energy"]),
        "lp": -np.asarray(extra["potential_energy"]),
        "step_size": np.asarray(extra["adapt_state.step_size"]),
    }
    return MCMCResult(model, params, raw, perms, reference, stats, num_chains, num_samples)

"""Softmax-gated mixture of regressions: flexmix's concomitant-variable model.

p(y | x) = sum_k softmax_k(b + W x) N(y; Phi(x) . beta_k, sigma_k^2), with gate offsets b (K,)
(stored as ``log_weights``, normalised so that logsumexp(b) = 0) and gate slopes W (K, D). Like
:class:`RegressionMixture` the model is conditional on x (its likelihood is log p(y | x)); unlike it,
the mixing proportions depend on x. The gate has no closed-form M-step: it is fitted by generalized
EM (:func:`conceptshift.inference.gem.fit_gem`), an Optax inner loop on the gate's weighted
multinomial log-likelihood with the experts' closed-form M-step.

Gate prior: a ridge (reg / 2) * ||W||^2 * n_x_var (slopes scaled by the covariates' spread) keeps the
slopes finite when the responsibilities separate linearly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import Array

from .. import _precision as _p
from .._validation import check_int
from ._experts import DataStats, ExpertsFamily


class SoftmaxGatedParams(NamedTuple):
    log_weights: Array  # (K,) gate offsets b, logsumexp(b) = 0 (the proportions at x = 0)
    coef: Array  # (K, H, P) expert coefficients, intercept first
    log_scale: Array  # (K, H)
    gate_weights: Array  # (K, D) gate slopes W

    @property
    def weights(self) -> Array:
        return jnp.exp(self.log_weights)

    @property
    def scale(self) -> Array:
        return jnp.exp(self.log_scale)


@dataclass(frozen=True)
class SoftmaxGatedExperts(ExpertsFamily):
    """p(k | x) = softmax(b + W x), Gaussian regression experts; fitted by :func:`fit_gem`."""

    def __post_init__(self):
        super().__post_init__()
        check_int("n_features", self.n_features, minimum=1)

    def n_gate_params(self) -> int:
        """The gate's free slopes: (K - 1) D (softmax logits are defined up to a common shift, as in
        flexmix's ``FLXPmultinom``, whose df counts (K - 1)(1 + D) with the intercepts)."""
        return (self.n_components - 1) * self.n_features

    @property
    def em_kind(self) -> str:
        return "generalized"

    def gate_logits_t(self, params, xT: Array) -> Array:
        """b + W x in the E-step's layout, x (D, N) -> (K, N)."""
        return params.log_weights[:, None] + _p.mm(params.gate_weights, xT)

    def gate_log_probs_t(self, params, xT):
        return jax.nn.log_softmax(self.gate_logits_t(params, xT), axis=0)

    def marginal_x_log_prob(self, params, x):
        return jnp.zeros((x.shape[0],), dtype=params.coef.dtype)

    def _gate_from_standard(self, params, std):
        # b + W z = b + (W / s) (x - loc): slopes W / s, offsets b - (W / s) loc
        w = params.gate_weights / std.x_scale[None, :]
        b = params.log_weights - _p.mm(w, std.x_loc)
        return params._replace(log_weights=jax.nn.log_softmax(b), gate_weights=w)

    def _gate_to_standard(self, params, std):
        b = params.log_weights + _p.mm(params.gate_weights, std.x_loc)
        return params._replace(log_weights=jax.nn.log_softmax(b),
                               gate_weights=params.gate_weights * std.x_scale[None, :])

    def gate_ridge(self, stats: DataStats) -> Array:
        """(D,) ridge on each gate slope column: reg times the covariate's variance."""
        return self.reg * stats.x_var

    def log_prior(self, params, stats: DataStats):
        heads = self._log_prior_heads(params._replace(log_weights=jnp.zeros_like(params.log_weights)),
                                      stats)
        return heads - 0.5 * jnp.sum(self.gate_ridge(stats)[None, :] * params.gate_weights**2)

    def gate_objective(self, params, x: Array, r: Array, stats: DataStats) -> Array:
        """sum_n sum_k r_nk log p(k | x_n) minus the gate ridge: what the gate M-step maximises."""
        logp = self.gate_log_probs_t(params, x.T)  # (K, N)
        ridge = 0.5 * jnp.sum(self.gate_ridge(stats)[None, :] * params.gate_weights**2)
        return jnp.sum(r.T * logp) - ridge

    def experts_m_step(self, x, y, r, stats: DataStats, ref):
        """Closed-form (coef, log_scale) given responsibilities r (N, K), residuals against ``ref``."""
        ss = self.suff_stats(x, y, r, jnp.swapaxes(ref, 1, 2), stats)
        _, coef, log_scale = self._heads_from_stats(ss, stats)
        ss = self.suff_stats(x, y, r, jnp.swapaxes(coef, 1, 2), stats)
        _, coef, log_scale = self._heads_from_stats(ss, stats)
        return coef, log_scale

    def init_params(self, key, dtype=None) -> SoftmaxGatedParams:
        dtype = dtype or jnp.zeros((), float).dtype
        K, H, P, D = self.n_components, self.n_heads, self.n_coef, self.n_features
        k1, k2 = jax.random.split(key)
        return SoftmaxGatedParams(jnp.full((K,), -jnp.log(K), dtype),
                                  jax.random.normal(k1, (K, H, P), dtype), jnp.zeros((K, H), dtype),
                                  0.1 * jax.random.normal(k2, (K, D), dtype))

    def _gate_sites(self, x):
        import numpyro

        K, D = self.n_components, self.n_features
        w = numpyro.sample("gate_weights", dist.Normal(jnp.zeros((K, D), x.dtype), 5.0).to_event(2))
        return {"gate_weights": w}

    def gate_fields(self):
        return ("gate_weights",)

    def _gate_site_names(self):
        return ("gate_weights",)

    def _gate_to_sites(self, params):
        return {"gate_weights": params.gate_weights}

    def _gate_from_sites(self, sites, dtype):
        return {"gate_weights": sites["gate_weights"]}

    def _params_from_sites(self, log_weights, coef, log_scale, gate_sites):
        return SoftmaxGatedParams(log_weights, coef, log_scale, gate_sites["gate_weights"])

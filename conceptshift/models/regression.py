"""Mixture of linear regressions (paper Example 2.6): constant gates, p(k | x) = pi_k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import Array
from jax.scipy.special import gammaln

from .. import _precision as _p
from .._validation import check_float
from ._experts import DataStats, ExpertsFamily


class RegressionParams(NamedTuple):
    log_weights: Array  # (K,) log pi_k
    coef: Array  # (K, H, P) regression coefficients, intercept first
    log_scale: Array  # (K, H) log of the component standard deviations

    @property
    def weights(self) -> Array:
        return jnp.exp(self.log_weights)

    @property
    def scale(self) -> Array:
        return jnp.exp(self.log_scale)


@dataclass(frozen=True)
class RegressionMixture(ExpertsFamily):
    """p(y | x) = sum_k pi_k N(y; Phi(x) . beta_k, sigma_k^2), with Phi(x) = [1, psi(x)].

    The model is conditional on x: its likelihood is log p(y | x).

    Args:
      n_components: K.
      n_features: D, covariates per sample (0 for an intercept-only, i.e. univariate, mixture).
      n_heads: H, responses sharing the concept k (e.g. 2 for the strong label y and weak label y').
      degree: polynomial degree of the feature map (1: linear in x).
      basis_fn: optional user feature map ``x (N, D) -> (N, B)`` (no intercept column).
      shared_scale: one standard deviation per head shared by all components.
      reg: strength of the weak prior that keeps empty components finite (module docs).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = RegressionMixture(n_components=2)
      >>> params = model.init_params(jax.random.key(0))
      >>> model.log_likelihood(params, jnp.zeros((3, 1)), jnp.zeros((3, 1))).shape
      (3,)
    """

    def gate_log_probs_t(self, params, xT):
        return jnp.broadcast_to(params.log_weights[:, None], (self.n_components, xT.shape[1]))

    def _gate_rows(self, params, stats, centred):
        K = self.n_components
        return jnp.zeros((K, 0, self.n_coef), params.coef.dtype), params.log_weights

    def marginal_x_log_prob(self, params, x):
        return jnp.zeros((x.shape[0],), dtype=params.coef.dtype)

    def m_step_from_stats(self, ss, stats: DataStats) -> RegressionParams:
        return RegressionParams(*self._heads_from_stats(ss, stats))

    def log_prior(self, params, stats: DataStats):
        return self._log_prior_heads(params, stats)

    def init_params(self, key, dtype=None) -> RegressionParams:
        """Random parameters (standard-normal coefficients, unit scales, equal weights)."""
        dtype = dtype or jnp.zeros((), float).dtype
        K, H, P = self.n_components, self.n_heads, self.n_coef
        coef = jax.random.normal(key, (K, H, P), dtype)
        return RegressionParams(
            jnp.full((K,), -jnp.log(K), dtype), coef, jnp.zeros((K, H), dtype)
        )

    def _params_from_sites(self, log_weights, coef, log_scale, gate_sites):
        return RegressionParams(log_weights, coef, log_scale)


@dataclass(frozen=True)
class StudentRegressionMixture(RegressionMixture):
    """A simulation truth with heavy-tailed noise: p(y | x) = sum_k pi_k t_nu(y; Phi(x) . beta_k,
    sigma_k), Student's t with ``noise_df`` = nu degrees of freedom and scale sigma_k =
    exp(log_scale) (its standard deviation is sigma_k sqrt(nu / (nu - 2)) for nu > 2; the mean
    exists for nu > 1, which the problems require).

    It evaluates and samples every head with t noise (``component_log_probs``, ``distribution``,
    ``conditional_log_prob``, ``sample_conditional``) and shares the parameters of
    :class:`RegressionMixture`, which is what the estimators fit to its data (Gaussian noise: a
    misspecified noise law). It has no M-step of its own: EM refuses it (``m_step_from_stats``).
    """

    noise_df: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        check_float("noise_df", self.noise_df, positive=True)
        if not self.noise_df > 1:
            raise ValueError(f"noise_df must exceed 1 (a t law with a mean), got {self.noise_df}")

    def head_distribution(self, params, x: Array) -> dist.Distribution:
        mean = self.expert_mean(params, x)
        scale = jnp.broadcast_to(jnp.exp(params.log_scale), mean.shape)
        return dist.StudentT(jnp.asarray(self.noise_df, mean.dtype), mean, scale).to_event(1)

    def _head_log_probs_t(self, params, phiT: Array, yT: Array):
        K, H, P = params.coef.shape
        mu = _p.mm(params.coef.reshape(K * H, P), phiT).reshape(K, H, -1)
        e = yT[None, :, :] - mu
        nu = jnp.asarray(self.noise_df, e.dtype)
        z2 = (e * jnp.exp(-params.log_scale)[:, :, None]) ** 2
        const = gammaln((nu + 1) / 2) - gammaln(nu / 2) - 0.5 * jnp.log(nu * jnp.pi)
        lp = jnp.sum(const - params.log_scale[:, :, None] - 0.5 * (nu + 1) * jnp.log1p(z2 / nu),
                     axis=1)
        return lp, e

    def m_step_from_stats(self, ss, stats: DataStats):
        raise NotImplementedError(
            "StudentRegressionMixture is a simulation truth (heavy-tailed noise) without an EM of "
            "its own: fit its data with RegressionMixture (Problem.fit_model)")

"""Gaussian-gated mixture of experts (cluster-weighted model, Assumption 2.4 with Gaussian gates).

p(x, y) = sum_k pi_k N(x; m_k, S_k) N(y; Phi(x) . beta_k, sigma_k^2), so that
p(k | x) = softmax_k(log pi_k + log N(x; m_k, S_k)). With linear experts and full-covariance gates
this is exactly a full-covariance Gaussian mixture of (x, y) in another parametrisation.
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
from ._experts import DataStats, ExpertsFamily, numpyro_numerics


class GatedParams(NamedTuple):
    log_weights: Array  # (K,) log pi_k
    coef: Array  # (K, H, P) expert coefficients, intercept first
    log_scale: Array  # (K, H) log expert standard deviations
    gate_mean: Array  # (K, D) m_k
    gate_cov: Array  # (K, D, D) S_k (diagonal matrices when covariance="diag")

    @property
    def weights(self) -> Array:
        return jnp.exp(self.log_weights)

    @property
    def scale(self) -> Array:
        return jnp.exp(self.log_scale)



@dataclass(frozen=True)
class GatedExperts(ExpertsFamily):
    """Gaussian-gated mixture of experts; the likelihood is the joint log p(x, y).

    Args: as :class:`RegressionMixture`, plus
      covariance: ``"full"`` or ``"diag"`` gate covariances.

    The gate covariance gets the same weak prior as the expert variances:
    S_k = (scatter_k + nu diag(var x)) / (N_k + nu), with nu = max(reg, 100 eps).
    """

    covariance: str = "full"

    def __post_init__(self):
        super().__post_init__()
        check_int("n_features", self.n_features, minimum=1)
        if self.covariance not in ("full", "diag"):
            raise ValueError(f"covariance must be 'full' or 'diag', got {self.covariance!r}")

    def n_gate_params(self) -> int:
        K, D = self.n_components, self.n_features
        cov = D * (D + 1) // 2 if self.covariance == "full" else D
        return K * (D + cov)

    def gate_distribution(self, params) -> dist.MultivariateNormal:
        """g(x | eta_k): MultivariateNormal with batch (K,) and event (D,)."""
        return dist.MultivariateNormal(params.gate_mean, covariance_matrix=params.gate_cov)

    def x_distribution(self, params) -> dist.MixtureSameFamily:
        """The marginal p(x) = sum_k pi_k g(x | eta_k)."""
        return dist.MixtureSameFamily(
            dist.Categorical(logits=params.log_weights), self.gate_distribution(params)
        )

    def _whitening(self, params):
        """U_k = L_k^-1 (K, D, D) for S_k = L_k L_k^T, and half log det S_k (K,)."""
        K, D = self.n_components, self.n_features
        chol = jnp.linalg.cholesky(params.gate_cov)
        eye = jnp.broadcast_to(jnp.eye(D, dtype=chol.dtype), (K, D, D))
        u = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
        return u, jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)

    def gate_log_probs_t(self, params, xT):
        """log pi_k + log N(x; m_k, S_k) in the E-step's layout, x (D, N) -> (K, N).

        Through the inverse Cholesky factors U_k = L_k^-1: all components' whitened coordinates come
        from one (K D, D) @ (D, N) product. It equals
        ``gate_distribution(params).log_prob(x[:, None, :]).T`` (tested).
        """
        K, D = self.n_components, self.n_features
        u, half_logdet = self._whitening(params)
        shift = _p.einsum("kij,kj->ki", u, params.gate_mean)  # (K, D)
        z = _p.mm(u.reshape(K * D, D), xT).reshape(K, D, -1) - shift[:, :, None]
        maha = jnp.sum(z * z, axis=1)  # (K, N)
        log_norm = -half_logdet - 0.5 * D * jnp.log(2 * jnp.pi)
        return (params.log_weights + log_norm)[:, None] - 0.5 * maha

    def uses_gate_stats(self) -> bool:
        return True

    @property
    def models_x(self) -> bool:
        return True

    def _gate_from_standard(self, params, std):
        s = std.x_scale
        return params._replace(gate_mean=std.x_loc[None, :] + s[None, :] * params.gate_mean,
                               gate_cov=params.gate_cov * (s[:, None] * s[None, :])[None])

    def _gate_to_standard(self, params, std):
        s = std.x_scale
        return params._replace(gate_mean=(params.gate_mean - std.x_loc[None, :]) / s[None, :],
                               gate_cov=params.gate_cov / (s[:, None] * s[None, :])[None])

    def _gate_rows(self, params, stats: DataStats, centred: bool):
        """z = L_k^-1 (x - m_k) = [-L_k^-1 (m_k - xbar), L_k^-1] [1, x - xbar]: rows 0..D of the
        centred design (see ``ExpertsFamily._gate_rows``)."""
        if not centred:
            return None
        K, D = self.n_components, self.n_features
        u, half_logdet = self._whitening(params)
        shift = _p.einsum("kij,kj->ki", u, params.gate_mean - stats.x_mean[None, :])
        rest = jnp.zeros((K, D, self.n_coef - 1 - D), u.dtype)
        Z = jnp.concatenate([-shift[:, :, None], u, rest], axis=2)
        return Z, params.log_weights - half_logdet - 0.5 * D * jnp.log(2 * jnp.pi)

    def m_step_from_stats(self, ss, stats: DataStats) -> GatedParams:
        log_weights, coef, log_scale = self._heads_from_stats(ss, stats)
        dtype = ss.s_pp.dtype
        nu = self._gate_nu(dtype)
        tiny = jnp.finfo(dtype).tiny
        nk = ss.nk
        mc = ss.s_x / jnp.maximum(nk, tiny)[:, None]  # (K, D) mean, centred on xbar
        scatter = ss.s_xx - nk[:, None, None] * (mc[:, :, None] * mc[:, None, :])
        scatter = 0.5 * (scatter + jnp.swapaxes(scatter, 1, 2))
        prior = nu * stats.x_var
        if self.covariance == "full":
            cov = (scatter + jnp.diag(prior)[None]) / (nk + nu)[:, None, None]
        else:
            d = jnp.maximum(jnp.diagonal(scatter, axis1=1, axis2=2), 0.0)
            cov = jax.vmap(jnp.diag)((d + prior[None, :]) / (nk + nu)[:, None])
        mean = mc + stats.x_mean[None, :]
        return GatedParams(log_weights, coef, log_scale, mean, cov)

    def log_prior(self, params, stats: DataStats):
        nu = self._gate_nu(params.coef.dtype)
        chol = jnp.linalg.cholesky(params.gate_cov)
        logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)  # (K,)
        inv_diag = jnp.diagonal(jnp.linalg.inv(params.gate_cov), axis1=-2, axis2=-1)  # (K, D)
        gate = -0.5 * nu * jnp.sum(logdet) - 0.5 * nu * jnp.sum(inv_diag * stats.x_var[None, :])
        return self._log_prior_heads(params, stats) + gate

    def _degenerate_gates(self, params, x, r, stats):
        nk = jnp.sum(r, 0)
        nu = self._gate_nu(params.coef.dtype)
        scatter = params.gate_cov * (nk + nu)[:, None, None] - jnp.diag(nu * stats.x_var)[None]
        # scatter collapsed along some direction: the gate sits on tied or collinear points
        scaled = scatter / jnp.sqrt(stats.x_var[:, None] * stats.x_var[None, :])[None]
        return jnp.linalg.eigvalsh(scaled)[:, 0] <= nu

    def init_params(self, key, dtype=None) -> GatedParams:
        dtype = dtype or jnp.zeros((), float).dtype
        K, H, P, D = self.n_components, self.n_heads, self.n_coef, self.n_features
        k1, k2 = jax.random.split(key)
        return GatedParams(
            jnp.full((K,), -jnp.log(K), dtype),
            jax.random.normal(k1, (K, H, P), dtype),
            jnp.zeros((K, H), dtype),
            jax.random.normal(k2, (K, D), dtype),
            jnp.broadcast_to(jnp.eye(D, dtype=dtype), (K, D, D)),
        )

    def sample_x(self, key, params: GatedParams, n: int) -> Array:
        """x ~ sum_k pi_k N(m_k, S_k), (n, D): draws of :meth:`x_distribution`."""
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            return self.x_distribution(params).sample(key, (n,))

    def _gate_sites(self, x):
        import numpyro

        K, D = self.n_components, self.n_features
        dtype = x.dtype
        mean = numpyro.sample("gate_mean", dist.Normal(jnp.zeros((K, D), dtype), 10.0).to_event(2))
        sd = numpyro.sample("gate_sd", dist.HalfNormal(jnp.full((K, D), 10.0, dtype)).to_event(2))
        if self.covariance == "full" and D > 1:
            corr = numpyro.sample(
                "gate_corr_chol", dist.LKJCholesky(D, 2.0).expand([K]).to_event(1)
            )
            tril = sd[..., :, None] * corr
            cov = _p.mm(tril, jnp.swapaxes(tril, -1, -2))
        else:
            cov = jax.vmap(jnp.diag)(sd**2)
        return {"gate_mean": mean, "gate_cov": cov}

    def gate_fields(self):
        return ("gate_mean", "gate_cov")

    def _gate_site_names(self):
        full = self.covariance == "full" and self.n_features > 1
        return ("gate_mean", "gate_sd") + (("gate_corr_chol",) if full else ())

    def _gate_to_sites(self, params):
        cov = params.gate_cov
        sd = jnp.sqrt(jnp.diagonal(cov, axis1=-2, axis2=-1))
        out = {"gate_mean": params.gate_mean, "gate_sd": sd}
        if "gate_corr_chol" in self._gate_site_names():
            out["gate_corr_chol"] = jnp.linalg.cholesky(cov / (sd[..., :, None] * sd[..., None, :]))
        return out

    def _gate_from_sites(self, sites, dtype):
        # the covariance rebuilt by the model's own site code: one definition of it
        from numpyro import handlers

        dummy = jnp.zeros((0, self.n_features), dtype)
        with numpyro_numerics(), handlers.seed(rng_seed=0), handlers.substitute(data=sites):
            return self._gate_sites(dummy)

    def _observe_x(self, params, x):
        import numpyro

        numpyro.sample("x", self.x_distribution(params), obs=x)

    def _params_from_sites(self, log_weights, coef, log_scale, gate_sites):
        return GatedParams(
            log_weights, coef, log_scale, gate_sites["gate_mean"], gate_sites["gate_cov"]
        )

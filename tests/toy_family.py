"""A toy family written only against the family protocol: a mixture of K Poisson laws over H count
heads, y_nh | k ~ Poisson(rate_kh), with no covariates (x has 0 columns).

It lives in one file and touches nothing else in the package: registering it
(``register_family("poisson_toy", PoissonMixture)``) is enough for ``fit_em``, ``fit_svi``,
``fit_nuts``, ``relabel`` and the contract tests to run on it (tests/test_toy_family.py).
Priors: Dirichlet(1 + reg) on the weights, Gamma(1 + reg, reg) on every rate (the M-step's pseudo-
counts), so ``objective = loglik + log_prior`` never decreases under EM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import Array
from jax.scipy.special import gammaln, logsumexp

from conceptshift.models.batch import Batch


class PoissonParams(NamedTuple):
    log_weights: Array  # (K,)
    log_rate: Array  # (K, H)


class PoissonStats(NamedTuple):
    n_k: Array  # (K,) sum_n w_n r_nk
    s_kh: Array  # (K, H) sum_n w_n r_nk y_nh


@dataclass(frozen=True)
class PoissonMixture:
    n_components: int
    n_heads: int = 1
    reg: float = 1e-3

    em_kind = "expected_stats"

    @property
    def n_params(self) -> int:
        return self.n_components - 1 + self.n_components * self.n_heads

    # ---------------------------------------------------------------- data
    def batch(self, x, y=None, weights=None) -> Batch:
        if y is None:
            raise TypeError("y must be an array of counts (N, H), got None")
        y = np.asarray(y, np.float64)
        if y.ndim == 1 and self.n_heads == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != self.n_heads:
            raise ValueError(f"y must have shape (N, {self.n_heads}), got {y.shape}")
        if np.any(y < 0) or np.any(y != np.round(y)):
            raise ValueError("y must hold non-negative integer counts")
        dtype = jnp.zeros((), float).dtype
        n = y.shape[0]
        w = jnp.ones((n,), dtype) if weights is None else jnp.asarray(weights, dtype)
        return Batch(jnp.zeros((n, 0), dtype), jnp.asarray(y, dtype), w)

    def sample_batch(self, key, params: PoissonParams, n: int) -> Batch:
        kz, ky = jax.random.split(key)
        z = jax.random.categorical(kz, params.log_weights, shape=(n,))
        y = jax.random.poisson(ky, jnp.exp(params.log_rate)[z]).astype(params.log_rate.dtype)
        return Batch(jnp.zeros((n, 0), y.dtype), y, jnp.ones((n,), y.dtype))

    # ---------------------------------------------------------------- density
    def component_log_probs(self, params: PoissonParams, batch: Batch) -> Array:
        y = batch.y[:, None, :]  # (N, 1, H)
        lp = y * params.log_rate[None] - jnp.exp(params.log_rate)[None] - gammaln(y + 1)
        return params.log_weights[None, :] + jnp.sum(lp, axis=-1)

    def batch_component_log_probs(self, params: PoissonParams, batch: Batch) -> Array:
        return self.component_log_probs(params, batch)

    def batch_log_likelihood(self, params: PoissonParams, batch: Batch) -> Array:
        return jnp.sum(batch.w * logsumexp(self.component_log_probs(params, batch), axis=-1))

    def log_prior(self, params: PoissonParams) -> Array:
        a = self.reg
        return a * jnp.sum(params.log_weights) + jnp.sum(a * params.log_rate - a * jnp.exp(params.log_rate))

    # ---------------------------------------------------------------- EM
    def init_params(self, key, dtype=None) -> PoissonParams:
        dtype = dtype or jnp.zeros((), float).dtype
        K, H = self.n_components, self.n_heads
        return PoissonParams(jnp.full((K,), -jnp.log(K), dtype),
                             jnp.log(1.0 + 4.0 * jax.random.uniform(key, (K, H), dtype)))

    def start_params(self, key, batch: Batch) -> PoissonParams:
        r = jax.random.dirichlet(key, jnp.ones((self.n_components,), batch.w.dtype), (batch.w.shape[0],))
        return self.m_step_from_stats(self._stats(r * batch.w[:, None], batch))

    def _stats(self, rw, batch) -> PoissonStats:
        return PoissonStats(jnp.sum(rw, axis=0), rw.T @ batch.y)

    def expected_stats(self, params: PoissonParams, batch: Batch):
        lp = self.component_log_probs(params, batch)
        ll = logsumexp(lp, axis=-1)
        r = jnp.exp(lp - ll[:, None])
        return jnp.sum(batch.w * ll), self._stats(r * batch.w[:, None], batch)

    def m_step_from_stats(self, s: PoissonStats) -> PoissonParams:
        a = self.reg
        weights = (s.n_k + a) / jnp.sum(s.n_k + a)
        rate = (s.s_kh + a) / (s.n_k[:, None] + a)
        return PoissonParams(jnp.log(weights), jnp.log(rate))

    # ---------------------------------------------------------------- NumPyro and sites
    def batch_model(self, batch: Batch):
        K, H, a = self.n_components, self.n_heads, self.reg
        dtype = batch.w.dtype
        weights = numpyro.sample("weights", dist.Dirichlet(jnp.full((K,), 1.0 + a, dtype)))
        rate = numpyro.sample("rate", dist.Gamma(jnp.full((K, H), 1.0 + a, dtype), a).to_event(2))
        mix = dist.MixtureSameFamily(dist.Categorical(probs=weights),
                                     dist.Poisson(jnp.broadcast_to(rate, (batch.y.shape[0], K, H)))
                                     .to_event(1))
        with numpyro.handlers.scale(scale=batch.w):
            numpyro.sample("y", mix, obs=batch.y)

    def site_names(self):
        return ("weights", "rate")

    def to_sites(self, params: PoissonParams) -> dict:
        return {"weights": jax.nn.softmax(params.log_weights), "rate": jnp.exp(params.log_rate)}

    def from_sites(self, sites: dict) -> PoissonParams:
        return PoissonParams(jnp.log(sites["weights"]), jnp.log(sites["rate"]))

    # ---------------------------------------------------------------- heads and components
    def with_heads(self, n_heads: int) -> PoissonMixture:
        return PoissonMixture(self.n_components, n_heads, self.reg)

    def select_heads(self, params: PoissonParams, heads) -> PoissonParams:
        return params._replace(log_rate=params.log_rate[:, jnp.asarray(heads)])

    def permute(self, params: PoissonParams, perm) -> PoissonParams:
        perm = jnp.asarray(perm)
        return jax.tree_util.tree_map(lambda a: a[perm], params)

    def match_cost(self, params_a: PoissonParams, head_a, params_b: PoissonParams, head_b) -> Array:
        a, b = params_a.log_rate[:, head_a], params_b.log_rate[:, head_b]
        return (a[:, None] - b[None, :]) ** 2

    def match_dim(self, head) -> int:
        return 1

    def relabel_vectors(self, params: PoissonParams) -> Array:
        return jnp.concatenate([params.log_weights[:, None], params.log_rate], axis=1)

"""Initial responsibilities for EM: k-means++ seeding (with a few Lloyd steps) and random ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from .. import _precision as _p


def _standardise(z: Array, w: Array) -> Array:
    n = jnp.sum(w)
    mean = _p.mm(w, z) / n
    sd = jnp.sqrt(_p.mm(w, (z - mean[None, :]) ** 2) / n)
    return (z - mean[None, :]) / jnp.where(sd > 0, sd, 1.0)[None, :]


def _sq_dist(z: Array, centers: Array) -> Array:
    """Squared distances (N, K) without forming an (N, K, F) temporary."""
    zz = jnp.sum(z**2, -1)[:, None]
    cc = jnp.sum(centers**2, -1)[None, :]
    return jnp.maximum(zz - 2 * _p.mm(z, centers.T) + cc, 0.0)


def _masked(d: Array, active: Array | None) -> Array:
    """Distances (N, K) with the inactive components' set to +inf (never the nearest)."""
    return d if active is None else jnp.where(active[None, :], d, jnp.inf)


def kmeans_pp_responsibilities(key, z: Array, w: Array, n_components: int, n_lloyd: int = 10,
                               active: Array | None = None):
    """Hard responsibilities (N, K) from k-means++ seeding on standardised z followed by Lloyd steps.

    Args:
      key: PRNG key.
      z: (N, F) points (for mixtures of experts: the columns of x and y).
      w: (N,) non-negative sample weights.
      n_components: K.
      n_lloyd: number of Lloyd iterations after seeding.
      active: optional (K,) bool, the components in use (the first ones): the others get no point
        (the seeding is sequential, so the active centres are k-means++'s with that many).
    """
    K = n_components
    z = _standardise(z, w)
    N = z.shape[0]
    keys = jax.random.split(key, K)
    p0 = w / jnp.sum(w)
    first = jax.random.choice(keys[0], N, p=p0)
    centers = jnp.zeros((K, z.shape[1]), z.dtype).at[0].set(z[first])
    d2 = jnp.sum((z - z[first][None, :]) ** 2, -1)

    def seed(k, carry):
        centers, d2 = carry
        mass = w * d2
        total = jnp.sum(mass)
        # all points already on a centre (e.g. tied data): fall back to the weights
        p = jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), p0)
        idx = jax.random.choice(keys[k], N, p=p)
        c = z[idx]
        return centers.at[k].set(c), jnp.minimum(d2, jnp.sum((z - c[None, :]) ** 2, -1))

    centers, _ = jax.lax.fori_loop(1, K, seed, (centers, d2))

    def lloyd(_, centers):
        onehot = jax.nn.one_hot(jnp.argmin(_masked(_sq_dist(z, centers), active), -1), K,
                                dtype=z.dtype)
        mass = _p.mm(onehot.T, w)
        sums = _p.mm((onehot * w[:, None]).T, z)
        return jnp.where(mass[:, None] > 0, sums / jnp.where(mass > 0, mass, 1.0)[:, None], centers)

    centers = jax.lax.fori_loop(0, n_lloyd, lloyd, centers)
    return jax.nn.one_hot(jnp.argmin(_masked(_sq_dist(z, centers), active), -1), K, dtype=z.dtype)


def random_responsibilities(key, n: int, n_components: int, dtype) -> Array:
    """Responsibilities (N, K) drawn row-wise from a flat Dirichlet."""
    return jax.random.dirichlet(key, jnp.ones((n_components,), dtype), (n,)).astype(dtype)


def subset_responsibilities(key, phi: Array, y: Array, w: Array, n_components: int,
                            active: Array | None = None) -> Array:
    """Hard responsibilities (N, K) from K regressions, each fitted exactly to P + 1 random points.

    Suited to mixtures of regressions, whose components (e.g. crossing lines) need not be clusters
    in (x, y). Each point goes to the line with the smallest standardised squared residual (among
    the ``active`` components, (K,) bool, when given).
    """
    K = n_components
    N, P = phi.shape
    m = P + 1
    idx = jax.random.choice(key, N, (K, m), p=w / jnp.sum(w))
    phi_s, y_s = phi[idx], y[idx]  # (K, m, P), (K, m, H)
    gram = _p.einsum("kmp,kmq->kpq", phi_s, phi_s)
    gram = gram + 1e-6 * jnp.mean(jnp.diagonal(gram, axis1=1, axis2=2)) * jnp.eye(P, dtype=phi.dtype)[None]
    beta = jnp.linalg.solve(gram, _p.einsum("kmp,kmh->kph", phi_s, y_s))  # (K, P, H)
    resid = y[:, None, :] - _p.einsum("np,kph->nkh", phi, beta)
    n = jnp.sum(w)
    y_var = _p.mm(w, (y - (_p.mm(w, y) / n)[None, :]) ** 2) / n
    score = jnp.sum(resid**2 / jnp.where(y_var > 0, y_var, 1.0)[None, None, :], -1)
    return jax.nn.one_hot(jnp.argmin(_masked(score, active), -1), K, dtype=phi.dtype)

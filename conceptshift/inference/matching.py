"""Matching mixture components across fits: optimal assignment, the paper's greedy rule, margin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .._validation import as_float_array, is_traced
from ..models.assignment import assign


def _check_cost(cost) -> Array:
    cost = as_float_array("cost", cost, ndim=2, allow_nan=True)
    if cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be square (K, K), got shape {cost.shape}")
    if not is_traced(cost) and not bool(jnp.all(jnp.isfinite(cost))):
        raise ValueError("cost has non-finite entries (NaN or inf); cannot match components")
    return cost


def assign_traced(cost: Array) -> Array:
    """:func:`optimal_assignment` without its input checks, for use under ``jit``/``vmap``: a
    non-finite cost gives -1 everywhere instead of an error."""
    perm = assign(cost)
    return jnp.where(jnp.all(jnp.isfinite(cost)), perm, -jnp.ones_like(perm))


def optimal_assignment(cost) -> Array:
    """The permutation minimising sum_k cost[k, perm[k]] (Hungarian algorithm via optax).

    Args:
      cost: (K, K) matrix; cost[k, j] is the price of matching row item k to column item j.

    Returns:
      perm (K,) int32 with rows in order: row k is matched to column perm[k]. Under ``jit`` a
      non-finite cost gives all -1 (outside jit it raises ValueError).

    Example:
      >>> optimal_assignment([[5.0, 1.0], [1.0, 5.0]]).tolist()
      [1, 0]
    """
    return assign_traced(_check_cost(cost))


def greedy_assignment(cost) -> tuple[Array, Array]:
    """The paper's step 3: a(k) = argmin_j cost[k, j] row by row.

    Returns:
      (assignment (K,), is_bijection ()): the assignment need not be a permutation.
    """
    cost = _check_cost(cost)
    a = jnp.argmin(cost, axis=1).astype(jnp.int32)
    counts = jnp.zeros(cost.shape[0], jnp.int32).at[a].add(1)
    return a, jnp.all(counts == 1)


def assignment_margin(cost) -> Array:
    """Total cost of the second-best permutation minus that of the best (>= 0).

    A margin near 0 means the match is fragile. The second-best assignment differs from the best in
    at least one pair, so it is the best assignment with one of the optimal pairs forbidden.
    """
    cost = _check_cost(cost)
    K = cost.shape[0]
    if K == 1:
        return jnp.asarray(jnp.inf, cost.dtype)
    perm = assign_traced(cost)
    best = jnp.sum(cost[jnp.arange(K), perm])
    big = (jnp.max(jnp.abs(cost)) + 1.0) * (K + 1)

    def without(k):
        c = cost.at[k, perm[k]].set(big)
        p = assign_traced(c)
        return jnp.sum(c[jnp.arange(K), p])

    return jnp.min(jax.vmap(without)(jnp.arange(K))) - best


def invert_permutation(perm) -> np.ndarray | Array:
    perm = jnp.asarray(perm)
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))

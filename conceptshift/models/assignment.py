"""The optimal assignment of a cost matrix under ``jit``/``vmap`` (Hungarian algorithm, optax): the one
helper every place that pairs components (or hidden states) calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from optax.assignment import hungarian_algorithm


@jax.jit  # an eager call compiles once per shape (optax's loop would otherwise compile every call)
def assign(cost: Array) -> Array:
    """perm (R,): row r's partner column in the assignment minimising sum_r cost[r, perm[r]]
    (R <= C rows)."""
    rows, cols = hungarian_algorithm(cost)
    # optax returns pairs in column order on square inputs: put them in row order
    return jnp.zeros(cost.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))

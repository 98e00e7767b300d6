"""The one data type generic code hands to a family: :class:`Batch`.

A family turns user arrays into a batch with ``model.batch(x, y=None, weights=None)`` (validated, at
the boundary) and everything generic (SVI, NUTS, the start of EM) works on the batch through the
family's protocol methods (``batch_model``, ``batch_log_likelihood``, ``start_params``), never on
the arrays' meaning. For regression families ``x`` holds covariates (N, D); for sequence families
integer tokens (N, T) with -1 as trailing padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array


class Batch(NamedTuple):
    """Rows of data: ``x`` (N, D) covariates or (N, T) tokens (-1 = padding past a sequence's
    end); ``y`` (N, H) responses (sequence families: output tokens, -1 where missing); ``w`` (N,)
    row weights (ones by default). A pytree: it passes through ``jax.jit`` and ``jax.vmap``."""

    x: Array
    y: Array
    w: Array


class TableRows:
    """What the table families (covariates x, one response per head) share: 1-D inputs of one
    covariate or one head as columns. Needs ``n_features`` and ``n_heads``."""

    def rows(self, x):
        """x as (N, D): a 1-D x of N rows is one covariate per row when D == 1."""
        if getattr(x, "ndim", 2) == 1 and self.n_features == 1:
            return x[:, None]
        return x

    def response_rows(self, y):
        """y as (N, H): a 1-D y of N rows is one head's labels when H == 1."""
        if getattr(y, "ndim", 2) == 1 and self.n_heads == 1:
            return y[:, None]
        return y


def pad_tokens(x, lengths) -> Array:
    """Tokens (N, T) with every entry past a sequence's length set to -1: the protocol's ``x`` for
    sequence families, from tokens and their lengths (N,)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    return jnp.where(jnp.arange(x.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None], x, -1)

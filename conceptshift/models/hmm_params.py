"""The mixture-of-HMMs family's parameter, statistics and data types and the pieces of its forward
algorithm that other modules share (:mod:`conceptshift.models.hmm` is the family itself).

Dimension names: N sequences, T positions, K concepts, S hidden states, V tokens, H output heads.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.scipy.special import logsumexp

from .. import _precision as _p
from .._validation import is_traced
from .assignment import assign


class HMMParams(NamedTuple):
    """Parameters of a mixture of HMMs, all as log-probabilities (rows sum to one in probability)."""

    log_weights: Array  # (K,) log pi_k
    log_init: Array  # (K, S) log p(h_1 = s | k)
    log_trans: Array  # (K, S, S) log theta_k(h' = j | h = i), rows i
    log_emit: Array  # (S, V) log tau(v | s), shared by the concepts
    log_out: Array  # (H, S, V) log out_j(v | s) of the output tokens, emitted from h_{L+1}

    @property
    def weights(self) -> Array:
        return jnp.exp(self.log_weights)


class HMMStats(NamedTuple):
    """Expected sufficient statistics (weighted sums over sequences, so they add across blocks)."""

    n_k: Array  # (K,) sum_n w_n r_nk
    init: Array  # (K, S) expected initial-state counts
    trans: Array  # (K, S, S) expected transition counts
    emit: Array  # (S, V) expected emission counts of the sequence tokens
    out: Array  # (H, S, V) expected emission counts of the output tokens


class HMMData(NamedTuple):
    """Validated sequence data: tokens (N, T) int32, lengths (N,) int32, outputs (N, H) int32 (-1 =
    missing), weights (N,) float."""

    x: Array
    lengths: Array
    y: Array
    w: Array


def padded_tokens(x):
    """(tokens, lengths) from integer tokens (N, T) with -1 as trailing padding (the sequence
    family's ``x`` in the protocol); padding anywhere but at the end of a row is refused. The
    family's ``check_data`` validates the tokens themselves."""
    if is_traced(x):
        present = x >= 0
        return jnp.where(present, x, 0), jnp.sum(present, axis=1).astype(jnp.int32)
    arr = np.asarray(x)
    if arr.ndim != 2:
        return x, None  # check_data names the expected shape
    present = arr >= 0
    lengths = present.sum(axis=1)
    trailing = np.arange(arr.shape[1])[None, :] < lengths[:, None]
    if np.any(present != trailing):
        i = int(np.argwhere(np.any(present != trailing, axis=1))[0, 0])
        raise ValueError(f"x row {i} has a token after padding (-1): padding must be trailing")
    if arr.size and lengths.min() < 1:
        i = int(np.argmin(lengths))
        raise ValueError(f"x row {i} is all padding (-1): every sequence needs at least one token")
    return arr, lengths.astype(np.int32)


def state_alignment(params_ref: HMMParams, params: HMMParams) -> Array:
    """perm (S,): state s of ``params_ref`` is state perm[s] of ``params`` (optimal matching of the
    emission rows tau(. | s) in squared distance)."""
    a, b = jnp.exp(params_ref.log_emit), jnp.exp(params.log_emit)
    return assign(jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1))


def concept_signature(params: HMMParams, head=None) -> Array:
    """Per-concept vectors compared across fits, (K, F): theta_k tau_head (rows: states, columns:
    tokens) through output head ``head``, or theta_k alone when ``head`` is None."""
    trans = jnp.exp(params.log_trans)
    if head is None:
        return trans.reshape(trans.shape[0], -1)
    return _p.einsum("kij,jv->kiv", trans, jnp.exp(params.log_out[head])).reshape(trans.shape[0], -1)


def normalise_log(logits: Array, axis: int = -1) -> Array:
    return logits - logsumexp(logits, axis=axis, keepdims=True)


def permute_states(params: HMMParams, perm) -> HMMParams:
    """Relabels hidden states: state s of the result is state perm[s] of ``params``."""
    perm = jnp.asarray(perm)
    return params._replace(log_init=params.log_init[:, perm],
                           log_trans=params.log_trans[:, perm][:, :, perm],
                           log_emit=params.log_emit[perm], log_out=params.log_out[:, perm])


def propagate(a: Array, trans: Array) -> Array:
    """log sum_i exp(a[..., k, i]) trans[k, i, j] for a (N, K, S) and trans (K, S, S)."""
    mx = jax.lax.stop_gradient(jnp.max(a, axis=-1, keepdims=True))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(a - mx)
    return jnp.log(_p.einsum("nki,kij->nkj", p, trans)) + mx

"""What the paper's estimators need beyond the generic ones for the mixture-of-HMMs family (Example
2.7): in-context refinement scored exactly, and the next-token metrics.

The estimators themselves are written once for every family in :mod:`.estimators` (``source_only``,
``weak_only``, ``weak_training_ll``, ``identification`` with ``match="weak"`` or ``"components"``,
``oracle``), with x the tokens padded by -1 (:func:`~.estimators.as_data` pads an ``HMMSample``).
Their matching of concepts across two fits is the family's ``match_cost``: it first aligns the
hidden states (the emission tau of the sequence tokens is shared by P and Q; anchor words make its
rows identifiable), then compares per concept either the weak output head as seen from each state,
W_k = theta_k tau^w (row s: p(y' | h_L = s, k); the analogue of the paper's weak heads theta^w_k,
which for HMMs depend on k only through theta_k), or the transition matrices theta_k themselves
(``match="components"``, Algorithm 1 without weak source labels).

In-context refinement (Example 3.3, eq. 3.2): for a query x with demonstrations V = ((x_j, y'_j))_{j<=M}
drawn from D_Q', q̂(k | x, V) is proportional to pî^p_k p̂(x | k) prod_j p̂(x_j, y'_j | k), where p̂ is the
source fit with its weak head (demonstrations independent given k, as in the example). The estimator is
the refined conditional q_re(y | x) = sum_k p̂(y | x, k) E_V q̂(k | x, V) of Prop. 3.2, the E_V estimated
with ``n_draws`` demonstration sets per query.

All functions are pure functions of keys and arrays: they run under ``jit`` and ``vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.scipy.special import logsumexp

from ..models.hmm import HMMMixture, HMMParams, concept_signature, permute_states, state_alignment
from .matching import assign_traced


class SeqData(NamedTuple):
    """One sample: x (N, T), lengths (N,), y (N,) or None, y_weak (N,) or None, weights (N,)."""

    x: Array
    lengths: Array
    y: Array | None
    y_weak: Array | None
    w: Array


def as_seq_data(sample, w=None) -> SeqData:
    """An :class:`conceptshift.models.hmm_problem.HMMSample` as weighted SeqData."""
    w = jnp.ones(sample.x.shape[:1], jnp.zeros(()).dtype) if w is None else w
    return SeqData(sample.x, sample.lengths, sample.y, sample.y_weak, w)


class ICLRefinement(NamedTuple):
    log_probs: Array  # (N, V) log q_re(y | x) on the queries ((G, N, V) from refinement_icl_path)
    log_post: Array  # (N, K) log E_V q̂(k | x, V) ((G, N, K))


def refinement_icl(key, model: HMMMixture, source_params: HMMParams, target: SeqData, x, lengths,
                   n_demos: int, n_draws: int = 8, *, demo_head: int = 1) -> ICLRefinement:
    """Example 3.3's in-context refinement of queries ``x`` with ``n_demos`` weak demonstrations.

    Args:
      key: draws the demonstrations (uniformly, by weight, from ``target``).
      model: the two-head family of ``source_params`` (head 0: y, head 1: y').
      source_params: the source fit p̂ with its weak head.
      target: D_Q', the pool of weak demonstrations (x_j, y'_j).
      x, lengths: the queries (N, T), (N,).
      n_demos: M, demonstrations per query (0: the source fit's own p̂(k | x)).
      n_draws: demonstration sets per query averaged in E_V q̂(k | x, V).
      demo_head: the source head that scores the demonstrations' labels: 1 (default), the weak head
        p̂(y' | h), as the regression family's refinement does; 0, the strong emission, as eq. 3.2
        displays it (p(y' | tau, h): the strong model reads the weak labels as its own tokens).
    """
    out = refinement_icl_path(key, model, source_params, target, x, lengths, (n_demos,), n_draws,
                              demo_head=demo_head)
    return ICLRefinement(out.log_probs[0], out.log_post[0])


def refinement_icl_path(key, model: HMMMixture, source_params: HMMParams, target: SeqData, x, lengths,
                        m_grid: tuple[int, ...], n_draws: int = 8, *, demo_head: int = 1
                        ) -> ICLRefinement:
    """:func:`refinement_icl` for every M in ``m_grid`` at once, (len(m_grid), N, V) and (len, N, K).

    The demonstration sets are nested (the first M of max(m_grid) draws), so the curve against M is
    free of the noise of independent draws, and one compiled program serves every M."""
    m_grid = tuple(int(m) for m in m_grid)
    if demo_head not in (0, 1):
        raise ValueError(f"demo_head must be 0 (strong) or 1 (weak), got {demo_head!r}")
    m2 = model.with_heads(2)
    log_post_x, per_k = m2.next_token_log_probs_by_concept(source_params, x, lengths, head=0)
    n = per_k.shape[0]
    m_max = max(m_grid)
    if m_max > 0:
        # log p̂(x_j, y'_j | k) of every demonstration under the source fit's weak head
        missing = jnp.full_like(target.y_weak, -1)
        yd = [missing, missing]
        yd[demo_head] = target.y_weak
        demo = m2.component_log_probs(source_params, target.x, target.lengths, jnp.stack(yd, 1))
        demo = demo - source_params.log_weights[None, :]  # (N_Q', K)
        p = target.w / jnp.sum(target.w)
        idx = jax.random.choice(key, target.w.shape[0], (n, n_draws, m_max), p=p)
        zero = jnp.zeros((n, n_draws, 1, per_k.shape[1]), demo.dtype)
        cum = jnp.concatenate([zero, jnp.cumsum(demo[idx], axis=2)], axis=2)  # (N, D, M_max + 1, K)
        logits = log_post_x[:, None, None, :] + cum[:, :, jnp.asarray(m_grid), :]  # (N, D, G, K)
        post = jax.nn.log_softmax(logits, axis=-1)
        log_post = logsumexp(post, axis=1) - jnp.log(jnp.asarray(n_draws, post.dtype))  # (N, G, K)
        log_post = jnp.swapaxes(log_post, 0, 1)
    else:
        log_post = jnp.broadcast_to(log_post_x[None], (len(m_grid),) + log_post_x.shape)
    log_probs = logsumexp(log_post[:, :, :, None] + per_k[None], axis=2)  # (G, N, V)
    return ICLRefinement(log_probs, log_post)


# ---------------------------------------------------------------------------------- metrics
def next_token_kl(log_q: Array, log_q_hat: Array) -> Array:
    """E_x KL(q(. | x) || q̂(. | x)) over the query rows, exact over the V tokens (the expected excess
    next-token log-loss)."""
    q = jnp.exp(log_q)
    return jnp.mean(jnp.sum(jnp.where(q > 0, q * (log_q - log_q_hat), 0.0), axis=-1))


def excess_log_loss(log_q: Array, log_q_hat: Array, y: Array) -> Array:
    """mean_n log q(y_n | x_n) - log q̂(y_n | x_n) on gold test tokens (a Monte Carlo estimate of
    :func:`next_token_kl`)."""
    y = jnp.asarray(y, jnp.int32)[:, None]
    return jnp.mean(jnp.take_along_axis(log_q, y, 1)[:, 0] - jnp.take_along_axis(log_q_hat, y, 1)[:, 0])


def truth_labels(true_params: HMMParams, params: HMMParams) -> Array:
    """For each fitted concept, the true concept it estimates (K,): optimal matching of transitions
    after aligning states through the emission."""
    return assign_traced(_transitions_cost(params, true_params))


def param_errors(true_params: HMMParams, params: HMMParams) -> tuple[Array, Array, Array]:
    """(max |tau - taû|, max |theta - thetâ|, max |pi - pî|) after the best permutation of states (by
    emission) and of concepts (by transitions)."""
    st = state_alignment(true_params, params)
    p = permute_states(params, st)
    perm = assign_traced(_transitions_cost(true_params, p))
    emit = jnp.max(jnp.abs(jnp.exp(true_params.log_emit) - jnp.exp(p.log_emit)))
    trans = jnp.max(jnp.abs(jnp.exp(true_params.log_trans) - jnp.exp(p.log_trans[perm])))
    w = jnp.max(jnp.abs(jnp.exp(true_params.log_weights) - jnp.exp(p.log_weights[perm])))
    return emit, trans, w


def _transitions_cost(params_a: HMMParams, params_b: HMMParams) -> Array:
    """cost[k, j]: |theta^a_k - theta^b_j|^2 after aligning b's states to a's (K, K)."""
    b = permute_states(params_b, state_alignment(params_a, params_b))
    sa, sb = concept_signature(params_a, None), concept_signature(b, None)
    return jnp.sum((sa[:, None, :] - sb[None, :, :]) ** 2, -1)

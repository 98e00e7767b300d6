"""Label-shift baselines for the target proportions: the source's components and weak heads are kept,
only pi^q is estimated from the weak target sample (x, y'). The first two are consistent when the
weak heads do not move between domains (theta^wq = theta^wp: prior shift of the latent k alone, the classic
label-shift setting) and biased when they do, which is the line between label shift and latent
concept shift that the paper draws; Algorithm 1 refits the target's weak heads instead.

- ``proportions_em`` (EMQ, Saerens, Latinne and Decaestecker 2002): maximum likelihood of pi^q in
  q(row) = sum_k pi^q_k p(row | k) with p(row | k) the source fit's (its weak head for y'), by EM on
  the proportions alone: r_nk ∝ pi_k p(row_n | k), pi_k = sum_n w_n r_nk / sum_n w_n.
- ``bbse`` (black-box shift estimation, Lipton, Wang and Smola 2018), with the source fit's posterior
  h(x, y') = p̂(k | x, y') (its weak head and pi^p) as the black box: the confusion matrix
  C[i, j] = E_P[h_i | k = j] is estimated on the source sample with its responsibilities under both
  heads, mu_i = E_Q'[h_i] on the target sample, and pi^q solves C pi^q = mu (clipped at 0 and
  normalised). The columns of C sum to 1, so the solution sums to 1 before clipping.

- ``proportions_x`` (a diagnostic, not a label-shift method): pi^q by EM on the proportions from the
  target's x alone, the source's gates fixed (no label read): r_nk ∝ pi_k g(x_n | eta_k). Where the
  gate depends on x (a Gaussian gate: g(x | eta_k) = p(x | k)), x alone identifies pi^q, so a
  weak-to-strong experiment on such a family measures little about the weak labels; with constant
  gates it returns the source's proportions (x carries nothing about k), and with a softmax gate over
  one p(x) shared by the domains it learns nothing about pi^q either.

Every family's fit carries its proportions as ``log_weights`` and its E-step quantity as
``component_log_probs(params, x, y)`` = log pi_k + log p(row | k); the term free of the proportions
is that minus ``log_weights``. For a softmax gate, whose p(k | x) is not pi_k times a term free of
pi, that difference is log p(k | x) - log_weights_k + log p(y' | x, k): EMQ's prior-shift
adjustment of the gate's posterior with exp(log_weights) as the source priors.

All three are pure functions of arrays: they run under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from .predictor import Predictor, strong_predictor, with_proportions

EM_STEPS = 500  # EM iterations on the proportions alone (each an (N, K) softmax: cheap)


def proportion_free_terms(model, params, x, y) -> Array:
    """log p(row | k) without the proportion term, (N, K): ``component_log_probs`` minus
    ``log_weights`` (module docs). ``y`` (N, H) for the family's H heads."""
    return model.component_log_probs(params, x, y=y) - params.log_weights[None, :]


def em_proportions(terms: Array, w: Array, log_pi0: Array, n_steps: int = EM_STEPS) -> Array:
    """log pi maximising sum_n w_n log sum_k pi_k exp(terms_nk), by ``n_steps`` EM steps from
    ``log_pi0``; each step never lowers it."""
    tiny = jnp.finfo(terms.dtype).tiny

    def step(_, lp):
        r = jax.nn.softmax(lp[None, :] + terms, axis=1)
        nk = jnp.sum(w[:, None] * r, axis=0)
        return jnp.log(jnp.maximum(nk, tiny)) - jnp.log(jnp.sum(nk))

    return jax.lax.fori_loop(0, n_steps, step, log_pi0)


def _weak_head(model, source_params):
    m1 = model.with_heads(1)
    return m1, model.select_heads(source_params, (1,))


def proportions_em(model, source_params, target_x, target_y_weak, target_w, *,
                   n_steps: int = EM_STEPS) -> Predictor:
    """EMQ: pi^q by EM with the two-head source fit's components and weak heads fixed (module
    docs); the estimate is the source's strong heads under pi^q."""
    m1, weak = _weak_head(model, source_params)
    terms = proportion_free_terms(m1, weak, target_x, target_y_weak[:, None])
    log_pi = em_proportions(terms, target_w, source_params.log_weights, n_steps)
    return with_proportions(strong_predictor(model, source_params, 0), log_pi)


def gate_terms(model, params, x) -> Array:
    """log p(k | x) without the proportion term, (N, K), up to a constant per row (which EM on the
    proportions ignores): ``log_posterior_k`` minus ``log_weights`` (module docs)."""
    return model.log_posterior_k(params, x) - params.log_weights[None, :]


def proportions_x(model, source_params, target_x, target_w, *, n_steps: int = EM_STEPS) -> Predictor:
    """pi^q from the target's x alone (module docs): EM on the proportions with the source fit's
    gates fixed; the estimate is the source's strong heads under it."""
    m1 = model.with_heads(1)
    terms = gate_terms(m1, model.select_heads(source_params, (0,)), target_x)
    log_pi = em_proportions(terms, target_w, source_params.log_weights, n_steps)
    return with_proportions(strong_predictor(model, source_params, 0), log_pi)


def bbse_proportions(model, source_params, source_x, source_y, source_y_weak, source_w, target_x,
                     target_y_weak, target_w) -> Array:
    """BBSE's pi^q (module docs): log proportions, (K,)."""
    m1, weak = _weak_head(model, source_params)
    y2 = jnp.stack([source_y, source_y_weak], axis=1)
    r = jax.nn.softmax(model.component_log_probs(source_params, source_x, y=y2), axis=1)  # (N, K)
    h_src = jax.nn.softmax(m1.component_log_probs(weak, source_x, y=source_y_weak[:, None]), axis=1)
    h_tgt = jax.nn.softmax(m1.component_log_probs(weak, target_x, y=target_y_weak[:, None]), axis=1)
    rw = r * source_w[:, None]
    conf = (h_src.T @ rw) / jnp.maximum(jnp.sum(rw, axis=0), jnp.finfo(rw.dtype).tiny)[None, :]
    mu = (target_w @ h_tgt) / jnp.sum(target_w)
    v = jnp.linalg.lstsq(conf, mu)[0]
    v = jnp.maximum(v, 0.0)
    total = jnp.sum(v)
    K = v.shape[0]
    v = jnp.where(total > 0, v / jnp.where(total > 0, total, 1.0), jnp.full((K,), 1.0 / K, v.dtype))
    return jnp.log(v)


def bbse(model, source_params, source_x, source_y, source_y_weak, source_w, target_x, target_y_weak,
         target_w) -> Predictor:
    """BBSE: the source's strong heads under :func:`bbse_proportions`' pi^q."""
    log_pi = bbse_proportions(model, source_params, source_x, source_y, source_y_weak, source_w,
                              target_x, target_y_weak, target_w)
    return with_proportions(strong_predictor(model, source_params, 0), log_pi)

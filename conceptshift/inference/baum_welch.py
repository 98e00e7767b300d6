"""Baum-Welch EM for a mixture of hidden Markov models, compiled end to end.

One call of :func:`fit_hmm_em` is one compiled program: restarts run side by side under ``vmap``, each a
``lax.while_loop`` of E-steps (forward-backward per sequence and concept, all sequences and concepts at
once; the backward pass is reverse-mode differentiation of the forward recursion, see
:mod:`conceptshift.models.hmm`) and closed-form M-steps for pi, the initial distributions, the
transition matrices theta_k, the emission tau and the output emissions. Sequences of different lengths
are padded and masked. Data are arguments of the compiled function: a second fit with new data of the
same shapes reuses it.

The M-step maximises the expected complete-data log-likelihood plus the log-density of a Dirichlet(1 +
reg) prior on every probability vector (``reg`` pseudo-counts), so empty states or concepts stay finite
and the reported ``objective`` never decreases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .._validation import is_traced
from ..models.hmm import HMMData, HMMMixture, HMMParams
from ..models.registry import check_family
from .em import EMResult, check_em_args, em_loop, restarts_at_best

HMMEMResult = EMResult
"""The result of :func:`fit_hmm_em`: :class:`conceptshift.inference.em.EMResult`, the one result type
of every family's EM (``loglik`` is sum_n w_n log p(x_n, y_n); ``objective`` adds the Dirichlet
prior; no standardisation: ``standardiser`` is None; a mixture of HMMs has no spurious
unbounded optimum, so ``degenerate`` is False)."""


def hmm_em_step(model: HMMMixture, params: HMMParams, d: HMMData) -> tuple[HMMParams, Array]:
    """One Baum-Welch iteration: (new parameters, weighted log-likelihood at the old ones)."""
    ll, stats = model.expected_stats(params, d)
    return model.m_step_from_stats(stats), ll


def _run(model: HMMMixture, d: HMMData, params0: HMMParams, tol, max_iter: int):
    def step(params):
        new, ll = hmm_em_step(model, params, d)
        return new, ll, ll + model.log_prior(params)

    params, n_iter, ll_tr, obj_tr, conv, failed = em_loop(step, params0, tol, max_iter, d.w.dtype,
                                                          jnp.sum(d.w))
    ll = jnp.sum(d.w * jax.scipy.special.logsumexp(model._component_log_probs(params, d), axis=-1))
    obj = ll + model.log_prior(params)
    return params, ll, obj, ll_tr, obj_tr, n_iter, conv & ~failed & jnp.isfinite(obj)


def _token_freq(model: HMMMixture, d: HMMData) -> Array:
    mask = (jnp.arange(d.x.shape[1], dtype=jnp.int32)[None, :] < d.lengths[:, None]).astype(d.w.dtype)
    counts = jnp.zeros((model.n_tokens,), d.w.dtype).at[d.x].add(mask * d.w[:, None])
    return counts / jnp.sum(counts)


def _fit_impl(model: HMMMixture, key, d: HMMData, tol, init_params, *, restarts: int, max_iter: int):
    tol = jnp.asarray(tol, d.w.dtype)
    if init_params is not None:
        params0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, d.w.dtype)[None], init_params)
    else:
        freq = _token_freq(model, d)
        params0 = jax.vmap(lambda k: model.init_params(k, d.w.dtype, token_freq=freq))(
            jax.random.split(key, restarts))
    runs = jax.vmap(lambda p: _run(model, d, p, tol, max_iter))(params0)
    params, ll, obj, ll_tr, obj_tr, n_iter, conv = runs
    best = jnp.argmax(jnp.where(jnp.isfinite(obj), ll, -jnp.inf))
    pick = jax.tree_util.tree_map(lambda a: a[best], runs)
    n = jnp.sum(d.w)
    bic = -2.0 * pick[1] + model.n_params * jnp.log(n)
    no = jnp.zeros(ll.shape, bool)
    return EMResult(pick[0], pick[1], pick[2], pick[3], pick[4], pick[5], pick[6], bic,
                    jnp.asarray(False), best.astype(jnp.int32), ll, conv, no,
                    restarts_at_best(ll, jnp.isfinite(obj), best, n), None)


_fit_jit = jax.jit(_fit_impl, static_argnames=("model", "restarts", "max_iter"))


def fit_hmm_em(model: HMMMixture, key, x, lengths=None, y=None, *, weights=None, restarts: int = 8,
               max_iter: int = 200, tol: float = 1e-8, init_params: HMMParams | None = None
               ) -> HMMEMResult:
    """Fits a mixture of HMMs to token sequences by Baum-Welch EM; returns the best restart.

    Args:
      model: e.g. ``HMMMixture(n_components=2, n_states=3, n_tokens=10, n_heads=1)``.
      key: a ``jax.random`` key (initial parameters; the same key gives the same fit).
      x: integer tokens (N, T), padded past each sequence's length.
      lengths: (N,) sequence lengths in [1, T]; None: all T.
      y: output tokens (N, H) (or (N,) for one head), -1 where missing; None: all missing.
      weights: optional non-negative per-sequence weights (N,).
      restarts: R random initialisations (Dirichlet transitions, emissions around the token
        frequencies) run together under ``vmap``; ``restarts_at_best`` in the result counts those
        that reached the best log-likelihood.
      max_iter: iteration cap of each EM loop.
      tol: stop when the objective changes by at most ``tol * (|objective| + N)`` in one iteration
        (or falls within float rounding); 0: run all ``max_iter`` iterations.
      init_params: start from these parameters instead (one run; ``restarts`` is ignored).

    Returns:
      :class:`HMMEMResult` of the restart with the highest log-likelihood.

    Example:
      >>> import jax
      >>> from conceptshift.models.hmm import HMMMixture
      >>> m = HMMMixture(2, 2, 4)
      >>> truth = m.init_params(jax.random.key(0))
      >>> x, lengths, _, _ = m.sample(jax.random.key(1), truth, n=200, length=10)
      >>> fit = fit_hmm_em(m, jax.random.key(2), x, lengths, restarts=4, max_iter=1000)
      >>> bool(fit.converged)
      True
    """
    check_family(model, "fit_hmm_em", em_kinds=("baum_welch",))
    key, restarts, max_iter, tol = check_em_args(key, restarts, max_iter, tol)
    d = model.check_data(x, lengths, y, weights)
    if init_params is not None:
        if not isinstance(init_params, HMMParams):
            raise TypeError(f"init_params must be HMMParams, got {type(init_params).__name__}")
        K, S, V, H = model.n_components, model.n_states, model.n_tokens, model.n_heads
        want = ((K,), (K, S), (K, S, S), (S, V), (H, S, V))
        for name, a, shape in zip(HMMParams._fields, init_params, want, strict=True):
            if tuple(jnp.shape(a)) != shape:
                raise ValueError(f"init_params.{name} must have shape {shape}, got {jnp.shape(a)}")
            if not is_traced(a) and not bool(np.all(np.isfinite(np.asarray(a, np.float64)))):
                raise ValueError(f"init_params.{name} has non-finite values")
        restarts = 1
    return _fit_jit(model, key, d, tol, init_params, restarts=restarts, max_iter=max_iter)

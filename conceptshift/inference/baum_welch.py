"""Baum-Welch EM for a mixture of hidden Markov models under its earlier calling convention:
:func:`fit_hmm_em` takes tokens with their lengths and runs the protocol's generic EM driver
(:mod:`conceptshift.inference.stats_em`). The one way is ``fit_em(model, key, x, y)`` with x the
tokens padded by -1 (``models.batch.pad_tokens(x, lengths)``); this module is its thin alias for
earlier code.

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

from jax import Array

from ..models.batch import Batch, pad_tokens
from ..models.hmm import HMMData, HMMMixture, HMMParams
from ..models.registry import check_family
from . import stats_em
from .em import EMResult

HMMEMResult = EMResult
"""The result of :func:`fit_hmm_em`: :class:`conceptshift.inference.em.EMResult`, the one result type
of every family's EM (``loglik`` is sum_n w_n log p(x_n, y_n); ``objective`` adds the Dirichlet
prior; no standardisation: ``standardiser`` is None; a mixture of HMMs has no spurious
unbounded optimum, so ``degenerate`` is False)."""

def hmm_em_step(model: HMMMixture, params: HMMParams, d: HMMData) -> tuple[HMMParams, Array]:
    """One Baum-Welch iteration on :class:`HMMData`: (new parameters, weighted log-likelihood at
    the old ones)."""
    ll, stats = model.expected_stats(params, Batch(pad_tokens(d.x, d.lengths), d.y, d.w))
    return model.m_step_from_stats(stats), ll


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
    check_family(model, "fit_hmm_em", needs=stats_em.NEEDS)
    d = model.check_data(x, lengths, y, weights)
    return stats_em.fit_stats_em(model, key, pad_tokens(d.x, d.lengths), d.y,
                                 weights=None if weights is None else d.w, restarts=restarts,
                                 max_iter=max_iter, tol=tol, init_params=init_params)

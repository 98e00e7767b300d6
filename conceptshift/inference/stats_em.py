"""EM for every family whose E-step is additive expected statistics and whose M-step is closed form
in them: the protocol's generic EM driver (``em_kind == "expected_stats"``; the mixture of HMMs,
whose statistics are the forward-backward counts, is one such family).

The family provides, on a :class:`~conceptshift.models.batch.Batch`:

- ``start_params(key, batch)``: one random start;
- ``expected_stats(params, batch) -> (weighted log-likelihood, statistics)`` at ``params``;
- ``m_step_from_stats(stats)``: the maximiser of the expected complete-data log-likelihood plus
  ``log_prior``;
- ``log_prior(params)``, ``batch_log_likelihood(params, batch)`` and ``n_params`` (for BIC).

One call is one compiled program: restarts run side by side under ``vmap``, each the shared
:func:`~conceptshift.inference.em.em_loop`; the restart with the highest log-likelihood is kept.
Data are arguments of the compiled function: new data of the same shapes reuse it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..models.registry import check_family
from .em import EMResult, check_em_args, check_init_params, em_loop, restarts_at_best

NEEDS = ("batch", "start_params", "expected_stats", "m_step_from_stats", "log_prior",
         "batch_log_likelihood")


def stats_em_step(model, params, batch):
    """One EM iteration: (new parameters, weighted log-likelihood at the old ones)."""
    ll, stats = model.expected_stats(params, batch)
    return model.m_step_from_stats(stats), ll


def _run(model, batch, params0, tol, max_iter: int):
    def step(params):
        new, ll = stats_em_step(model, params, batch)
        return new, ll, ll + model.log_prior(params)

    params, n_iter, ll_tr, obj_tr, conv, failed = em_loop(step, params0, tol, max_iter, batch.w.dtype,
                                                          jnp.sum(batch.w))
    ll = model.batch_log_likelihood(params, batch)
    obj = ll + model.log_prior(params)
    return params, ll, obj, ll_tr, obj_tr, n_iter, conv & ~failed & jnp.isfinite(obj)


def _fit_impl(model, key, batch, tol, init_params, *, restarts: int, max_iter: int):
    dtype = batch.w.dtype
    tol = jnp.asarray(tol, dtype)
    if init_params is not None:
        params0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype)[None], init_params)
    else:
        params0 = jax.vmap(lambda k: model.start_params(k, batch))(jax.random.split(key, restarts))
    runs = jax.vmap(lambda p: _run(model, batch, p, tol, max_iter))(params0)
    params, ll, obj, ll_tr, obj_tr, n_iter, conv = runs
    finite = jnp.isfinite(obj)
    best = jnp.argmax(jnp.where(finite, ll, -jnp.inf))
    pick = jax.tree_util.tree_map(lambda a: a[best], runs)
    n = jnp.sum(batch.w)
    bic = -2.0 * pick[1] + model.n_params * jnp.log(n)
    no = jnp.zeros(ll.shape, bool)
    return EMResult(pick[0], pick[1], pick[2], pick[3], pick[4], pick[5], pick[6], bic,
                    jnp.asarray(False), best.astype(jnp.int32), ll, conv, no,
                    restarts_at_best(ll, finite, best, n), None)


_fit_jit = jax.jit(_fit_impl, static_argnames=("model", "restarts", "max_iter"))


def fit_stats_em(model, key, x, y=None, *, weights=None, restarts: int = 8, max_iter: int = 200,
                 tol: float = 1e-8, init_params=None) -> EMResult:
    """Fits a family with additive expected statistics by EM (module docs); returns the best restart.
    Called by :func:`~conceptshift.inference.em.fit_em` for such families, with its arguments
    (``x``, ``y`` as the family's ``batch`` takes them; for a mixture of HMMs tokens (N, T) with -1
    as trailing padding and output tokens or None)."""
    check_family(model, "fit_stats_em", em_kinds=("expected_stats",), needs=NEEDS)
    key, restarts, max_iter, tol = check_em_args(key, restarts, max_iter, tol)
    batch = model.batch(x, y, weights)
    if batch.x.shape[0] < model.n_components:
        raise ValueError(f"x has {batch.x.shape[0]} rows, fewer than n_components={model.n_components}")
    if init_params is not None:
        check_init_params(model, init_params)
        restarts = 1
    return _fit_jit(model, key, batch, tol, init_params, restarts=restarts, max_iter=max_iter)

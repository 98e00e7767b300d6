"""Generalized EM for families whose gate has no closed-form M-step (:class:`SoftmaxGatedExperts`).

Each iteration: the E-step (responsibilities r), the experts' closed-form M-step (the exact maximiser
of their part of the expected penalised log-likelihood given r), then the gate's M-step: a fixed
number of L-BFGS steps (optax) on the gate's weighted multinomial log-likelihood
sum_n sum_k r_nk log softmax_k(b + W x_n) minus its ridge, started at the current gate. That gate
problem is concave; the new gate is accepted only if it does not lower the gate objective (otherwise
the old one is kept), so the EM objective (log-likelihood plus log prior) never decreases: a
generalized EM. Restarts run under ``vmap``; everything is one compiled program.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import logsumexp

from .._validation import check_int
from ..models.registry import check_family
from ..models.softmax_gated import SoftmaxGatedExperts
from .em import (
    EMResult,
    all_finite,
    check_em_args,
    check_finite_fit,
    check_fit_data,
    check_init_params,
    em_loop,
    restarts_at_best,
    standardise,
    to_raw,
)
from .starts import kmeans_pp_responsibilities, subset_responsibilities


def gate_m_step(model: SoftmaxGatedExperts, params, x, r, stats, inner_steps: int):
    """The gate's M-step: ``inner_steps`` L-BFGS steps on the gate objective from the current gate;
    the result is kept only if the objective did not decrease. Returns (params, accepted)."""
    scale = jnp.maximum(jnp.sum(r), jnp.finfo(r.dtype).tiny)

    def loss(g):
        p = params._replace(log_weights=g[0], gate_weights=g[1])
        return -model.gate_objective(p, x, r, stats) / scale

    g0 = (params.log_weights, params.gate_weights)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry, _):
        g, state = carry
        value, grad = value_and_grad(g, state=state)
        updates, state = opt.update(grad, state, g, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(g, updates), state), None

    # optax's line search mixes int32 and int64 counters under x64: standard promotion inside
    with jax.numpy_dtype_promotion("standard"):
        (g, _), _ = jax.lax.scan(body, (g0, opt.init(g0)), None, length=inner_steps)
    b = g[0] - logsumexp(g[0])  # the softmax does not see a common shift of b
    new = params._replace(log_weights=b, gate_weights=g[1])
    ok = all_finite(new) & (loss((b, g[1])) <= loss(g0))
    return jax.tree_util.tree_map(lambda a, c: jnp.where(ok, a, c), new, params), ok


def _objective(model, params, x, y, w, stats):
    ll_n = logsumexp(model.component_log_probs(params, x, y), axis=-1)
    return jnp.sum(w * ll_n) + model.log_prior(params, stats), jnp.sum(w * ll_n)


def _run_gem(model, x, y, w, stats, params0, tol, max_iter, inner_steps):
    def step(params):
        logp = model.component_log_probs(params, x, y)
        ll_n = logsumexp(logp, axis=-1)
        ll = jnp.sum(w * ll_n)
        r = jnp.exp(logp - ll_n[:, None]) * w[:, None]
        coef, log_scale = model.experts_m_step(x, y, r, stats, params.coef)
        new, _ = gate_m_step(model, params._replace(coef=coef, log_scale=log_scale), x, r, stats,
                             inner_steps)
        return new, ll, ll + model.log_prior(params, stats)

    params, n_iter, ll_tr, obj_tr, conv, failed = em_loop(step, params0, tol, max_iter, y.dtype,
                                                          jnp.sum(w))
    obj, ll = _objective(model, params, x, y, w, stats)
    return params, ll, obj, ll_tr, obj_tr, n_iter, conv & ~failed & jnp.isfinite(obj)


def _initial(model, key, x, y, w, stats, kind, inner_steps):
    k1, k2, k3 = jax.random.split(key, 3)
    K = model.n_components
    r0 = jnp.where(kind == 0,
                   kmeans_pp_responsibilities(k1, jnp.concatenate([x, y], axis=1), w, K),
                   subset_responsibilities(k2, model.design(x), y, w, K)) * w[:, None]
    p = model.init_params(k3, y.dtype)
    p = p._replace(gate_weights=jnp.zeros_like(p.gate_weights), coef=jnp.zeros_like(p.coef))
    coef, log_scale = model.experts_m_step(x, y, r0, stats, p.coef)
    p = p._replace(coef=coef, log_scale=log_scale)
    p, _ = gate_m_step(model, p, x, r0, stats, inner_steps)
    return p


def initial_params(model, key, x, y, w, init: str = "kmeans++", inner_steps: int = 10):
    """Generalized EM's start for (x, y, w) (experts and gate fitted to ``init``'s
    responsibilities on the standardised data), on the raw data's scale. Traceable."""
    z, u, w, std = standardise(model, x, y, w)
    kind = jnp.asarray(0 if init == "kmeans++" else 1)  # k-means++, else a random-subset start
    p = _initial(model, key, z, u, w, model.data_stats(z, u, w), kind, inner_steps)
    return model.params_from_standard(p, std)


@partial(jax.jit, static_argnames=("model", "restarts", "max_iter", "inner_steps"))
def _fit_gem_jit(model, key, x, y, w, std, tol, init_params=None, *, restarts, max_iter, inner_steps):
    """Generalized EM on standardised data (x, y) = (z, u), mapped back through ``std``;
    ``init_params`` (raw scale): one run from there instead of the restarts."""
    stats = model.data_stats(x, y, w)
    if init_params is not None:
        p0 = jax.tree_util.tree_map(lambda a: a[None], model.params_to_standard(init_params, std))
    else:
        keys = jax.random.split(key, restarts)
        p0 = jax.vmap(lambda k, u: _initial(model, k, x, y, w, stats, u, inner_steps))(
            keys, jnp.arange(restarts) % 2)
    params, ll, obj, ll_tr, obj_tr, n_iter, conv = jax.vmap(
        lambda p: _run_gem(model, x, y, w, stats, p, tol, max_iter, inner_steps))(p0)
    degenerate = jax.vmap(lambda p: jnp.any(model.degenerate_components(p, x, y, w, stats)))(params)
    score = jnp.where(degenerate | ~jnp.isfinite(obj), -jnp.inf, ll)
    fallback = jnp.where(jnp.isfinite(obj), ll, -jnp.inf)
    best = jnp.where(jnp.any(jnp.isfinite(score)), jnp.argmax(score), jnp.argmax(fallback))
    pick = lambda a: a[best]  # noqa: E731
    n = jnp.sum(w)
    bic = -2.0 * ll[best] + model.n_params * jnp.log(n)
    at_best = restarts_at_best(ll, ~degenerate & jnp.isfinite(obj), best, n)
    res = EMResult(jax.tree_util.tree_map(pick, params), ll[best], obj[best], ll_tr[best],
                   obj_tr[best], n_iter[best], conv[best], bic, degenerate[best],
                   best.astype(jnp.int32), ll, conv, degenerate, at_best, std)
    return to_raw(model, res, std, w)


def fit_gem(model: SoftmaxGatedExperts, key, x, y, *, weights=None, restarts: int = 8,
            max_iter: int = 500, tol: float = 1e-8, inner_steps: int = 10,
            init_params=None) -> EMResult:
    """Fits a :class:`SoftmaxGatedExperts` by generalized EM (module docs); returns an
    :class:`EMResult` like :func:`fit_em` (restarts alternate k-means++ and random-subset starts;
    the best non-degenerate restart is kept).

    Example:
      >>> import jax, numpy as np
      >>> from conceptshift.models.softmax_gated import SoftmaxGatedExperts
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=300); z = rng.random(300) < 1 / (1 + np.exp(-3 * x))
      >>> y = np.where(z, 2 + x, -2 - x) + 0.3 * rng.normal(size=300)
      >>> fit = fit_gem(SoftmaxGatedExperts(2), jax.random.key(0), x, y, restarts=2)
      >>> bool(fit.converged)
      True
    """
    check_family(model, "fit_gem", em_kinds=("generalized",))
    key, restarts, max_iter, tol = check_em_args(key, restarts, max_iter, tol)
    inner_steps = check_int("inner_steps", inner_steps, minimum=1)
    x, y, w = check_fit_data(model, x, y, weights)
    if init_params is not None:
        init_params = check_init_params(model, init_params)
        restarts = 1
    z, u, w, std = standardise(model, x, y, w)
    if init_params is not None:
        init_params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, u.dtype), init_params)
    result, map_error = _fit_gem_jit(model, key, z, u, w, std, jnp.asarray(tol, u.dtype), init_params,
                                     restarts=restarts, max_iter=max_iter, inner_steps=inner_steps)
    return check_finite_fit(result, map_error, u.dtype)

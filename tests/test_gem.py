"""Generalized EM for the softmax-gated mixture of regressions (flexmix's concomitant-variable
model): the gate M-step against scipy's optimiser, the fit against direct maximisation with scipy on a
tiny problem, a monotone objective, recovery of simulated parameters, compilation reuse, checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import X64, once, rtol
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

from conceptshift.inference.gem import _fit_gem_jit, fit_gem, gate_m_step
from conceptshift.models import RegressionMixture, SoftmaxGatedExperts


def simulate(seed, n, b=0.5, w=3.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    z = rng.random(n) < 1 / (1 + np.exp(-(b + w * x)))
    y = np.where(z, 2 + x, -2 - x) + 0.4 * rng.normal(size=n)
    return x, y


M = SoftmaxGatedExperts(2)


def test_gate_m_step_matches_scipy():
    """Fixed responsibilities: the concave gate problem's optimum, by the Optax L-BFGS inner loop
    and by scipy's BFGS, gives the same gate probabilities and objective."""
    rng = np.random.default_rng(0)
    m = SoftmaxGatedExperts(3, n_features=2)
    x = jnp.asarray(rng.normal(size=(60, 2)))
    r = jnp.asarray(rng.dirichlet(np.ones(3), size=60))
    stats = m.data_stats(x, jnp.zeros((60, 1), x.dtype), jnp.ones(60, x.dtype))
    p0 = m.init_params(jax.random.key(0))._replace(gate_weights=jnp.zeros((3, 2), x.dtype))
    new, ok = jax.jit(lambda p: gate_m_step(m, p, x, r, stats, 60))(p0)
    assert bool(ok)
    flat0, unravel = ravel_pytree((p0.log_weights, p0.gate_weights))

    def f(v):
        b, w = unravel(jnp.asarray(v, x.dtype))
        return -float(m.gate_objective(p0._replace(log_weights=b, gate_weights=w), x, r, stats))

    def g(v):
        grad = jax.grad(lambda u: -m.gate_objective(p0._replace(log_weights=unravel(u)[0],
                                                                gate_weights=unravel(u)[1]), x, r, stats))
        return np.asarray(grad(jnp.asarray(v, x.dtype)), np.float64)

    ref = minimize(f, np.asarray(flat0, np.float64), jac=g, method="BFGS", options={"gtol": 1e-10})
    b, w = unravel(jnp.asarray(ref.x, x.dtype))
    ref_p = p0._replace(log_weights=b, gate_weights=w)
    np.testing.assert_allclose(-float(m.gate_objective(new, x, r, stats)), ref.fun, rtol=rtol(1e-5, 1e-9))
    np.testing.assert_allclose(m.posterior_k(new, x), m.posterior_k(ref_p, x), atol=rtol(1e-3, 1e-6))


@pytest.mark.slow
def test_fit_is_a_stationary_point_scipy_cannot_improve():
    """Tiny problem: scipy's L-BFGS on the full penalised log-likelihood, started from the GEM fit
    and from a perturbation of it, finds no better objective and returns to the same optimum."""
    x, y = simulate(1, 60)
    fit = fit_gem(M, jax.random.key(0), x, y, restarts=2, tol=1e-12 if X64 else 1e-9, max_iter=2000)
    # EM works on standardised data, where its prior is defined: compare objectives there
    std = fit.standardiser
    xa, ya = M.check_data(x, y)
    xa = (xa - std.x_loc[None, :]) / std.x_scale[None, :]
    ya = (ya - std.y_loc[None, :]) / std.y_scale[None, :]
    w = jnp.ones(60, xa.dtype)
    stats = M.data_stats(xa, ya, w)
    fitted = M.params_to_standard(fit.params, std)
    jac = 60 * float(M.log_jacobian(std))
    flat, unravel = ravel_pytree(fitted)

    def neg(v):
        p = unravel(v)
        p = p._replace(log_weights=p.log_weights - jax.scipy.special.logsumexp(p.log_weights))
        return -(jnp.sum(M.log_likelihood(p, xa, ya)) + M.log_prior(p, stats))

    vg = jax.jit(jax.value_and_grad(neg))

    def fg(v):
        val, grad = vg(jnp.asarray(v, xa.dtype))
        return float(val), np.asarray(grad, np.float64)

    obj = -float(neg(flat))
    np.testing.assert_allclose(obj + jac, float(fit.objective), rtol=rtol(1e-5, 1e-10))
    start = np.asarray(flat, np.float64) + 0.05 * np.random.default_rng(0).normal(size=flat.size)
    for v0 in (np.asarray(flat, np.float64), start):
        ref = minimize(fg, v0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "ftol": 1e-15,
                                                                      "gtol": 1e-9})
        assert -ref.fun <= obj + rtol(1e-3, 1e-6) * abs(obj)
        np.testing.assert_allclose(-ref.fun, obj, rtol=rtol(1e-4, 1e-8))
        p = unravel(jnp.asarray(ref.x, xa.dtype))
        np.testing.assert_allclose(p.coef, fitted.coef, atol=rtol(5e-3, 1e-4))


def test_objective_never_decreases_and_recovery():
    """n = 2000 from a known concomitant model: a monotone objective trace, and the experts and the
    gate's log-odds (b_0 - b_1, W_0 - W_1) recovered."""
    x, y = simulate(2, 2000)
    fit = fit_gem(M, jax.random.key(1), x, y, restarts=2)
    assert bool(fit.converged) and not bool(fit.degenerate)
    tr = np.asarray(fit.objective_trace[: int(fit.n_iter)], np.float64)
    assert np.all(np.diff(tr) >= -rtol(1e-5, 1e-12) * np.abs(tr[1:]))
    k = int(np.argmax(np.asarray(fit.params.coef[:, 0, 0])))  # the component of y = 2 + x
    np.testing.assert_allclose(fit.params.coef[k, 0], [2.0, 1.0], atol=0.1)
    np.testing.assert_allclose(fit.params.coef[1 - k, 0], [-2.0, -1.0], atol=0.1)
    np.testing.assert_allclose(np.exp(fit.params.log_scale), 0.4, rtol=0.1)
    b, w = np.asarray(fit.params.log_weights), np.asarray(fit.params.gate_weights[:, 0])
    assert abs((b[k] - b[1 - k]) - 0.5) < 0.3 and abs((w[k] - w[1 - k]) - 3.0) < 0.6
    # new data of the same shape: no recompilation
    size = _fit_gem_jit._cache_size()
    x2, y2 = simulate(3, 2000)
    fit_gem(M, jax.random.key(1), x2, y2, restarts=2)
    assert _fit_gem_jit._cache_size() == size


def test_bad_arguments():
    x, y = simulate(0, 20)
    with pytest.raises(TypeError, match="fitted by generalized EM for fit_gem"):
        fit_gem(RegressionMixture(2), jax.random.key(0), x, y)
    with pytest.raises(ValueError, match="inner_steps must be >= 1"):
        fit_gem(M, jax.random.key(0), x, y, inner_steps=0)
    with pytest.raises(ValueError, match="n_features must be >= 1"):
        SoftmaxGatedExperts(2, n_features=0)


def test_softmax_gate_degrees_of_freedom_as_flexmix():
    """BIC's df: experts (K (P + 1)) plus flexmix's concomitant multinomial, (K - 1)(1 + D)."""
    from conceptshift.models.softmax_gated import SoftmaxGatedExperts

    for K, D in ((2, 1), (3, 2)):
        m = SoftmaxGatedExperts(K, n_features=D)
        assert m.n_params == K * (m.n_coef + 1) + (K - 1) * (1 + D)


@pytest.mark.slow  # the bootstrap's refits start so: tests/test_family_contract.py runs them
@once  # precision-independent plumbing
def test_init_params_start_one_run_there():
    """fit_em(softmax, init_params=optimum) is one run that stays at the optimum (a bootstrap refit
    starts so)."""
    from conceptshift.inference import fit_em

    x, y = simulate(0, 300)
    fit = fit_gem(M, jax.random.key(0), x, y, restarts=4)
    again = fit_em(M, jax.random.key(1), x, y, init_params=fit.params, max_iter=50)
    assert again.restart_loglik.shape == (1,)
    np.testing.assert_allclose(float(again.loglik), float(fit.loglik), rtol=rtol(1e-5, 1e-9))

"""The fused E-step kernel (``estep_stats_t``) against float64 NumPy sums written out term by term."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rtol

from conceptshift.models import Basis, GatedExperts, RegressionMixture
from conceptshift.models._experts import SuffStats


@pytest.mark.parametrize("D,degree", [(1, 1), (1, 3), (2, 2), (3, 1), (3, 3)])
def test_shift_matrix_is_the_binomial_expansion(D, degree):
    basis = Basis(D, degree)
    rng = np.random.default_rng(D * 10 + degree)
    x = jnp.asarray(rng.normal(size=(20, D)))
    c = jnp.asarray(rng.normal(size=D) * 2)
    T = basis.shift_matrix(c)
    np.testing.assert_allclose(
        np.asarray(jnp.matmul(basis(x - c[None, :]), T.T, precision="highest")), np.asarray(basis(x)),
        rtol=rtol(1e-4, 1e-12), atol=rtol(1e-4, 1e-11)
    )


def test_shift_matrix_needs_a_polynomial_basis():
    with pytest.raises(ValueError, match="polynomial"):
        Basis(1, 1, fn=jnp.sin).shift_matrix(jnp.zeros(1))
    assert not Basis(2, 0).shiftable


def _reference(model, params, x, y, w, xbar):
    """log-likelihood and statistics in float64, one sample at a time in closed form."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x, y, w = (np.asarray(a, np.float64) for a in (x, y, w))
    phi = np.asarray(model.design(jnp.asarray(x)), np.float64)
    K = model.n_components
    mu = np.einsum("np,khp->nkh", phi, p.coef)
    s = np.exp(p.log_scale)
    logp = np.log(np.exp(p.log_weights))[None] + np.sum(
        -0.5 * ((y[:, None, :] - mu) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi), -1
    )
    if isinstance(model, GatedExperts):
        for k in range(K):
            d = x - p.gate_mean[k]
            cov = p.gate_cov[k]
            logp[:, k] += -0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) - 0.5 * (
                np.linalg.slogdet(cov)[1] + x.shape[1] * np.log(2 * np.pi)
            )
    m = logp.max(1, keepdims=True)
    ll = (m + np.log(np.exp(logp - m).sum(1, keepdims=True)))[:, 0]
    r = np.exp(logp - ll[:, None]) * w[:, None]
    e = y[:, None, :] - mu  # (N, K, H) against the current coefficients
    xc = x - xbar
    return float(w @ ll), SuffStats(
        r.sum(0),
        np.einsum("nk,np,nq->kpq", r, phi, phi),
        np.einsum("nk,np,nkh->kph", r, phi, e),
        np.einsum("nk,nkh->kh", r, e**2),
        np.swapaxes(p.coef, 1, 2),
        np.einsum("nk,nd->kd", r, xc) if isinstance(model, GatedExperts) else np.zeros((K, 0)),
        np.einsum("nk,nd,ne->kde", r, xc, xc) if isinstance(model, GatedExperts)
        else np.zeros((K, 0, 0)),
    )


def _sq(x):
    return jnp.concatenate([x, x[:, :1] ** 2], axis=1)


MODELS = {
    "regression": RegressionMixture(3, n_features=2, degree=2),
    "regression-intercept": RegressionMixture(2, n_features=0),
    "gated-full": GatedExperts(3, n_features=2, n_heads=2),
    "gated-diag": GatedExperts(2, n_features=3, covariance="diag", degree=2),
    "gated-fn": GatedExperts(2, n_features=2, basis_fn=_sq),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_estep_equals_closed_form_sums(name):
    model = MODELS[name]
    rng = np.random.default_rng(7)
    n, D, H = 700, model.n_features, model.n_heads
    x = 3.0 + rng.normal(size=(n, D))  # off-centre: the kernel centres on xbar
    y = rng.normal(size=(n, H)) + (x[:, :1] if D else 0.0)
    w = rng.uniform(0.5, 1.5, size=n)
    dtype = jnp.zeros(()).dtype
    xj, yj, wj = (jnp.asarray(a, dtype) for a in (x, y, w))
    params = model.init_params(jax.random.key(3), dtype)
    if isinstance(model, GatedExperts):
        params = params._replace(gate_mean=params.gate_mean + 3.0,
                                 gate_cov=params.gate_cov * jnp.asarray(1.5, dtype))
    stats = model.data_stats(xj, yj, wj)
    ll, ss = jax.jit(model.estep_stats_t)(params, xj.T, yj.T, wj, stats)
    ll_ref, ref = _reference(model, params, x, y, w, np.asarray(stats.x_mean, np.float64))
    assert float(ll) == pytest.approx(ll_ref, rel=rtol(1e-5, 1e-11))
    for field, a, b in zip(SuffStats._fields, ss, ref, strict=True):
        scale = max(1.0, float(np.max(np.abs(b)))) if np.size(b) else 1.0
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol(2e-4, 1e-9),
                                   atol=scale * rtol(2e-5, 1e-11), err_msg=field)


@pytest.mark.parametrize("name", ["regression", "gated-full", "gated-fn"])
def test_fused_estep_equals_component_log_probs_and_suff_stats(name):
    """The fused kernel and the two-step path (log-densities, then statistics of r) agree."""
    model = MODELS[name]
    rng = np.random.default_rng(11)
    n = 300
    x = jnp.asarray(rng.normal(size=(n, model.n_features)), jnp.zeros(()).dtype)
    y = jnp.asarray(rng.normal(size=(n, model.n_heads)), x.dtype)
    w = jnp.ones((n,), x.dtype)
    params = model.init_params(jax.random.key(1), x.dtype)
    stats = model.data_stats(x, y, w)
    ll, ss = model.estep_stats_t(params, x.T, y.T, w, stats)
    logp = model.component_log_probs_t(params, x.T, y.T)
    lse = jax.scipy.special.logsumexp(logp, axis=0)
    r = jnp.exp(logp - lse[None])
    ss2 = model.suff_stats_t(x.T, y.T, r, jnp.swapaxes(params.coef, 1, 2), stats)
    assert float(ll) == pytest.approx(float(jnp.sum(lse)), rel=rtol(1e-5, 1e-12))
    for a, b in itertools.zip_longest(ss, ss2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol(1e-4, 1e-10),
                                   atol=rtol(1e-4, 1e-10))

"""Fits of real data sets against estimates published by flexmix, mixtools and scikit-learn.

The data and the published numbers are described in ../shared/data/README.md. Each fit runs once per
test process (``functools.cache``) and is shared by the tests of one data set.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from conftest import rtol
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.mixture import GaussianMixture

from conceptshift.inference import fit_em
from conceptshift.models import GatedExperts, GatedParams, RegressionMixture

DTYPE = jnp.zeros((), dtype=float).dtype


def _read(path: Path) -> np.ndarray:
    return np.genfromtxt(path, delimiter=",", names=True)


def _take(params, order):
    """Components reordered, as float64 numpy arrays."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64)[order], params)


# ================================================================ flexmix: NPreg, yn ~ x + x^2, K = 2
NPREG_MODEL = RegressionMixture(2, degree=2)
NPREG_ML_LOGLIK = -642.532014  # exact ML optimum (README)
NPREG_ML_SIGMA = np.array([3.4444, 3.4509])  # line, parabola (README, 4 decimals)
# flexmix (Leisch 2004), components sorted by intercept: the line first, then the parabola
FLEXMIX_COEF = np.array([
    [-0.20866478, 4.81612095, 0.03632578],
    [14.7175699, 9.8455831, -0.9682393],
])
FLEXMIX_SIGMA = np.array([3.47494722, 3.4808477])
FLEXMIX_PRIOR = np.array([0.494, 0.506])
FLEXMIX_LOGLIK = -642.5451


@functools.cache
def npreg_fit(path: Path):
    d = _read(path / "NPreg.csv")
    assert d.shape == (200,)
    fit = fit_em(NPREG_MODEL, jax.random.key(0), d["x"], d["yn"], restarts=10)
    order = np.argsort(np.asarray(fit.params.coef)[:, 0, 0])  # by intercept
    return d["x"], d["yn"], fit, _take(fit.params, order)


def _em_numpy(x, y, coef, sigma, prior, variance: str, max_iter=20000, tol=1e-13):
    """Plain EM for a K-component mixture of quadratic regressions, in float64 numpy.

    variance="ml": sigma_k^2 = RSS_k / n_k (maximum likelihood);
    variance="flexmix": sigma_k^2 = RSS_k / n_k * N / (N - p), flexmix's FLXMRglm rule, with N the
      number of rows (all N rows enter each component's weighted fit) and p = 3 coefficients;
    variance="per_component": sigma_k^2 = RSS_k / (n_k - p), with n_k the effective size.
    Returns (coef, sigma, prior, ML log-likelihood at those parameters).
    """
    X = np.c_[np.ones_like(x), x, x**2]
    N, p = X.shape
    coef, sigma, prior = (np.array(a, dtype=np.float64) for a in (coef, sigma, prior))
    prev = -np.inf
    for _ in range(max_iter):
        logp = np.log(prior)[None, :] + norm.logpdf(y[:, None], X @ coef.T, sigma[None, :])
        ll = logsumexp(logp, axis=1)
        r = np.exp(logp - ll[:, None])
        nk = r.sum(0)
        prior = nk / N
        for k in range(len(nk)):
            w = r[:, k]
            coef[k] = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w * y))
            rss = w @ (y - X @ coef[k]) ** 2
            s2 = {"ml": rss / nk[k], "flexmix": rss / nk[k] * N / (N - p),
                  "per_component": rss / (nk[k] - p)}[variance]
            sigma[k] = np.sqrt(s2)
        if abs(ll.sum() - prev) < tol * abs(ll.sum()):
            break
        prev = ll.sum()
    logp = np.log(prior)[None, :] + norm.logpdf(y[:, None], X @ coef.T, sigma[None, :])
    return coef, sigma, prior, float(logsumexp(logp, axis=1).sum())


def test_npreg_matches_ml_optimum_and_flexmix(data_dir):
    """One test (one compiled fit per process) with four parts: the ML optimum, flexmix's
    coefficients, the ML sigma, and flexmix's sigma convention."""
    x, y, fit, params = npreg_fit(data_dir)

    # --- the exact ML optimum (README), reached by the best of 10 restarts
    assert bool(fit.converged) and not bool(fit.degenerate)
    np.testing.assert_allclose(float(fit.loglik), NPREG_ML_LOGLIK, atol=rtol(1e-3, 1e-5), rtol=0)
    assert float(np.max(fit.restart_loglik)) <= NPREG_ML_LOGLIK + rtol(1e-3, 1e-5)
    assert NPREG_MODEL.n_params == 9  # flexmix's df
    np.testing.assert_allclose(float(fit.bic), -2 * float(fit.loglik) + 9 * np.log(200),
                               rtol=rtol(1e-6, 1e-12))

    # --- coefficients and priors: flexmix is not the ML fit (its sigma convention moves its fixed
    # point slightly), so three significant figures. The line's small x^2 term (0.036) is held to
    # 5e-4 absolute instead, i.e. 3 decimals on a term multiplying x^2 <= 100.
    coef = np.asarray(params.coef, np.float64)[:, 0, :]
    np.testing.assert_allclose(coef, FLEXMIX_COEF, rtol=5e-3, atol=5e-4)
    np.testing.assert_allclose(np.exp(params.log_weights), FLEXMIX_PRIOR, atol=1e-3)

    # --- sigma is the ML sigma. The weak ridge prior (reg=1e-6 times the design's mean squared
    # column, dominated by x^4 here) shifts it by ~1e-4 relative from the exact ML value.
    sigma = np.exp(params.log_scale)[:, 0]
    np.testing.assert_allclose(sigma, NPREG_ML_SIGMA, rtol=2e-4)
    # the README's ML numbers themselves: plain EM in float64, polished from our fit
    start = (coef, sigma, np.exp(params.log_weights))
    ml_coef, ml_sigma, _, ml_ll = _em_numpy(x, y, *start, "ml")
    np.testing.assert_allclose(ml_sigma, NPREG_ML_SIGMA, atol=1e-4)
    np.testing.assert_allclose(ml_ll, NPREG_ML_LOGLIK, atol=1e-6)
    # In float32 EM stops once the objective moves by at most 8 ulps (5e-4 nats at -642.5), and
    # the coefficients along the likelihood's flat directions are then known to a few 1e-4
    # (measured: 4.4e-4 from the ML values at the stop, 2.0e-4 after 300 iterations).
    np.testing.assert_allclose(coef, ml_coef, rtol=1e-3, atol=rtol(1e-3, 1e-4))

    # --- flexmix's sigma^2 = ML sigma^2 * N / (N - p), with N = 200 rows (every row enters each
    # component's weighted fit) and p = 3 coefficients; NOT the per-component RSS_k / (n_k - p).
    # Approximately at our ML fit ...
    N, p = 200, 3
    np.testing.assert_allclose(sigma * np.sqrt(N / (N - p)), FLEXMIX_SIGMA, rtol=3e-3)
    # ... and exactly at the fixed point of an EM using that rule, which reproduces all of
    # flexmix's published numbers
    fx_coef, fx_sigma, fx_prior, fx_ll = _em_numpy(x, y, *start, "flexmix")
    np.testing.assert_allclose(fx_coef, FLEXMIX_COEF, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(fx_sigma, FLEXMIX_SIGMA, rtol=5e-4)
    np.testing.assert_allclose(fx_prior, FLEXMIX_PRIOR, atol=1e-3)
    np.testing.assert_allclose(fx_ll, FLEXMIX_LOGLIK, atol=1e-3)
    # the per-component effective size n_k does not give flexmix's numbers
    _, pc_sigma, _, pc_ll = _em_numpy(x, y, *start, "per_component")
    assert abs(pc_ll - FLEXMIX_LOGLIK) > 0.02
    assert np.all(np.abs(pc_sigma / FLEXMIX_SIGMA - 1) > 5e-3)


# ================================================================ mixtools: faithful waiting, K = 2
MIXTOOLS = dict(
    lam=np.array([0.3608498, 0.6391502]),
    mu=np.array([54.61364, 80.09031]),
    sigma=5.869089,
    loglik=-1034.002,
)


@functools.cache
def faithful_waiting_fit(path: Path):
    d = _read(path / "faithful.csv")
    model = RegressionMixture(2, n_features=0, shared_scale=True)
    return model, fit_em(model, jax.random.key(0), None, d["waiting"], restarts=4)


def test_faithful_waiting_matches_mixtools(data_dir):
    model, fit = faithful_waiting_fit(data_dir)
    assert model.n_coef == 1 and model.n_params == 4
    assert bool(fit.converged) and not bool(fit.degenerate)
    order = np.argsort(np.asarray(fit.params.coef)[:, 0, 0])
    params = _take(fit.params, order)
    # mixtools stops on its own tolerance: ~1e-5 relative agreement in the parameters
    np.testing.assert_allclose(np.exp(params.log_weights), MIXTOOLS["lam"], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(params.coef)[:, 0, 0], MIXTOOLS["mu"], rtol=1e-4)
    scale = np.exp(params.log_scale)
    np.testing.assert_allclose(scale, MIXTOOLS["sigma"], rtol=1e-4)
    assert scale[0, 0] == scale[1, 0]  # one shared variance
    # published to 3 decimals
    np.testing.assert_allclose(float(fit.loglik), MIXTOOLS["loglik"], atol=1e-3, rtol=0)


# ================================================================ scikit-learn: faithful (x, y) full GMM
@functools.cache
def faithful_gmm(path: Path):
    d = _read(path / "faithful.csv")
    xy = np.c_[d["eruptions"], d["waiting"]]
    gm = GaussianMixture(2, covariance_type="full", reg_covar=1e-10, n_init=20, tol=1e-10,
                         max_iter=2000, random_state=0).fit(xy)
    assert gm.converged_
    return xy, gm


@functools.cache
def faithful_gated_fit(path: Path):
    d = _read(path / "faithful.csv")
    return fit_em(GatedExperts(2), jax.random.key(0), d["eruptions"], d["waiting"], restarts=10)


def _gated_from_gmm(gm: GaussianMixture) -> GatedParams:
    cov = gm.covariances_
    slope = cov[:, 1, 0] / cov[:, 0, 0]
    intercept = gm.means_[:, 1] - slope * gm.means_[:, 0]
    resid = cov[:, 1, 1] - cov[:, 1, 0] ** 2 / cov[:, 0, 0]
    f = lambda a: jnp.asarray(np.asarray(a, np.float64), DTYPE)  # noqa: E731
    return GatedParams(
        log_weights=f(np.log(gm.weights_)),
        coef=f(np.stack([intercept, slope], -1)[:, None, :]),
        log_scale=f(0.5 * np.log(resid)[:, None]),
        gate_mean=f(gm.means_[:, :1]),
        gate_cov=f(cov[:, :1, :1]),
    )


def test_gated_faithful_matches_sklearn(data_dir):
    """GatedExperts(2) on (eruptions -> waiting) is a full-covariance GMM of (x, y): the best of our
    restarts reaches sklearn's optimum, and our log-likelihood at sklearn's parameters is its
    score. (One test: the sklearn and EM fits are computed once per process.)"""
    xy, gm = faithful_gmm(data_dir)
    n = xy.shape[0]
    sk_loglik = gm.score(xy) * n
    model = GatedExperts(2)

    # --- our log-likelihood at sklearn's parameters, converted
    sk_params = _gated_from_gmm(gm)
    x, y = model.check_data(xy[:, 0], xy[:, 1])
    ll = np.asarray(jax.jit(model.log_likelihood)(sk_params, x, y))
    np.testing.assert_allclose(ll, gm.score_samples(xy), rtol=rtol(1e-5, 1e-11),
                               atol=rtol(1e-4, 1e-10))
    np.testing.assert_allclose(ll.sum(), sk_loglik, rtol=rtol(1e-6, 1e-12))

    # --- our fit: the same optimum; our weak prior moves the log-likelihood by O(reg) only
    fit = faithful_gated_fit(data_dir)
    assert bool(fit.converged) and not bool(fit.degenerate)
    np.testing.assert_allclose(float(fit.loglik), sk_loglik, rtol=rtol(1e-5, 1e-7))
    # the parameters too (components sorted by the mean of x)
    got_order = np.argsort(np.asarray(fit.params.gate_mean)[:, 0])
    ref_order = np.argsort(gm.means_[:, 0])
    for name in GatedParams._fields:
        np.testing.assert_allclose(np.asarray(getattr(fit.params, name))[got_order],
                                   np.asarray(getattr(sk_params, name))[ref_order],
                                   rtol=rtol(1e-3, 1e-4), atol=rtol(1e-3, 1e-4), err_msg=name)

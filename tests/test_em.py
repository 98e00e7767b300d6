"""EM: monotone objective, recovery of simulated parameters, compilation reuse, jit/vmap, weights,
collapsing components, the degenerate-restart rule and argument checks.

Shapes are shared on purpose: every test fitting ``REG3``/``GATED3`` to N_SIM rows uses the same
(restarts, max_iter), so each worker compiles that fit once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import X64, once, rtol
from scipy.optimize import linear_sum_assignment

from conceptshift.inference import fit_em
from conceptshift.inference.em import _fit_em_jit
from conceptshift.models import GatedExperts, RegressionMixture, RegressionParams

DTYPE = jnp.zeros((), dtype=float).dtype
N_SIM, K_SIM = 120, 3
REG3, GATED3 = RegressionMixture(K_SIM), GatedExperts(K_SIM)
FIT = dict(restarts=2, max_iter=300)


def simulate(seed: int, gated: bool, n: int = N_SIM, K: int = K_SIM):
    """A random K-component problem (numpy): lines in x, gated problems with clustered x."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, K, n)
    if gated:
        x = rng.normal(0, 2, K)[z] + rng.normal(size=n)
    else:
        x = rng.uniform(-2, 2, n)
    b0, b1, s = rng.normal(0, 3, K), rng.normal(0, 2, K), rng.uniform(0.3, 1.0, K)
    y = b0[z] + b1[z] * x + s[z] * rng.normal(size=n)
    return x, y


def _finite_tree(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(a)))) for a in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------- monotonicity
# float64: the objective is an exact ascent, up to rounding of sums of N terms (relative 1e-12).
# float32: one ulp of a log-likelihood is ~6e-8 relative; sums over N rows and the E-step's
# logsumexp make decreases of a few ulps (observed ~3e-7) ordinary, so 1e-5 relative.
OBJ_TOL = rtol(1e-5, 1e-12)
LL_TOL = rtol(1e-5, 1e-9)  # the prior moves plain loglik by O(reg): a tiny, bounded dip at most


_loglik = jax.jit(lambda m, p, x, y: m.log_likelihood(p, x, y), static_argnums=0)


def _check_bookkeeping(model, fit, x, y):
    """The EMResult's fields agree with each other and with the model."""
    ll = _loglik(model, fit.params, *model.check_data(x, y))
    np.testing.assert_allclose(float(jnp.sum(ll)), float(fit.loglik), rtol=rtol(1e-6, 1e-12))
    bic = -2 * float(fit.loglik) + model.n_params * np.log(len(y))
    np.testing.assert_allclose(float(fit.bic), bic, rtol=rtol(1e-6, 1e-12))
    b = int(fit.best_restart)
    assert 0 <= b < FIT["restarts"]
    assert fit.restart_loglik.shape == (FIT["restarts"],)
    assert float(fit.restart_loglik[b]) == float(fit.loglik)
    assert bool(fit.restart_converged[b]) == bool(fit.converged)
    assert bool(fit.restart_degenerate[b]) == bool(fit.degenerate)
    assert fit.loglik_trace.shape == fit.objective_trace.shape == (FIT["max_iter"],)
    assert fit.n_iter.dtype == jnp.int32 and fit.best_restart.dtype == jnp.int32
    assert all(a.dtype == DTYPE for a in fit.params)


@pytest.mark.parametrize("model", [REG3, GATED3], ids=["regression", "gated"])
def test_objective_never_decreases(model):
    """~10 seeded problems per family; also checks the result's bookkeeping on each fit."""
    gated = isinstance(model, GatedExperts)
    for seed in range(10):
        x, y = simulate(seed, gated)
        fit = fit_em(model, jax.random.key(seed), x, y, **FIT)
        _check_bookkeeping(model, fit, x, y)
        if seed == 0:  # the same key gives the same fit
            again = fit_em(model, jax.random.key(seed), x, y, **FIT)
            for u, v in zip(jax.tree_util.tree_leaves(fit), jax.tree_util.tree_leaves(again),
                            strict=True):
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        n = int(fit.n_iter)
        obj_tr, ll_tr = np.asarray(fit.objective_trace), np.asarray(fit.loglik_trace)
        assert 2 <= n <= FIT["max_iter"]
        assert np.all(np.isfinite(obj_tr[:n])) and np.all(np.isnan(obj_tr[n:]))
        assert np.all(np.isfinite(ll_tr[:n])) and np.all(np.isnan(ll_tr[n:]))
        np.testing.assert_array_equal(fit.trace(), ll_tr[:n])
        # the reported final values come after the last traced one
        obj = np.r_[obj_tr[:n], float(fit.objective)]
        ll = np.r_[ll_tr[:n], float(fit.loglik)]
        worst_obj = np.min(np.diff(obj) / np.abs(obj[1:]))
        worst_ll = np.min(np.diff(ll) / np.abs(ll[1:]))
        assert worst_obj >= -OBJ_TOL, f"seed {seed}: objective fell by {-worst_obj:.3g} (relative)"
        assert worst_ll >= -LL_TOL, f"seed {seed}: loglik fell by {-worst_ll:.3g} (relative)"
        # the objective is the log-likelihood plus a weak prior: close to it for a clean fit
        gap = abs(float(fit.objective) - float(fit.loglik))
        assert bool(fit.degenerate) or gap < 1e-2 * abs(float(fit.loglik))


# ---------------------------------------------------------------- recovery
def _oracle_regression(x, y, z, K):
    """Per-class ML estimates from the true labels: OLS coefficients, RSS/n_k variances, shares."""
    coef, scale, share = [], [], []
    for k in range(K):
        X = np.c_[np.ones((z == k).sum()), x[z == k]]
        beta, *_ = np.linalg.lstsq(X, y[z == k], rcond=None)
        coef.append(beta)
        scale.append(np.sqrt(np.mean((y[z == k] - X @ beta) ** 2)))
        share.append(np.mean(z == k))
    return np.array(coef), np.array(scale), np.array(share)


def _match(fitted_coef, ref_coef):
    """perm with fitted[perm[j]] ~ ref[j] (Hungarian assignment on coefficient distances)."""
    cost = np.linalg.norm(ref_coef[:, None, :] - fitted_coef[None, :, :], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


# Lines that never cross on [-2, 2] (gaps of 6 noise sd at the least): EM's responsibilities are
# nearly hard and its fit must equal the oracle fit on the true labels up to the permutation, the
# O(reg) prior and the last bits of soft assignment (observed: 1e-5 to 4e-5 relative in float64,
# the most on intercepts extrapolated far from a narrow cluster of x).
RECOVERY_TOL = rtol(5e-4, 1e-4)
TRUE_COEF = np.array([[-6.0, 1.0], [0.0, -1.0], [6.0, 0.5]])
TRUE_SCALE = np.array([0.3, 0.25, 0.35])
TRUE_W = np.array([0.3, 0.3, 0.4])


def test_recovers_separated_regression():
    rng = np.random.default_rng(7)
    z = rng.choice(K_SIM, N_SIM, p=TRUE_W)
    x = rng.uniform(-2, 2, N_SIM)
    y = TRUE_COEF[z, 0] + TRUE_COEF[z, 1] * x + TRUE_SCALE[z] * rng.normal(size=N_SIM)
    fit = fit_em(REG3, jax.random.key(3), x, y, **FIT)
    assert bool(fit.converged) and not bool(fit.degenerate)

    coef = np.asarray(fit.params.coef)[:, 0, :]
    perm = _match(coef, TRUE_COEF)
    assert sorted(perm) == [0, 1, 2]
    got = REG3.permute(fit.params, perm)
    o_coef, o_scale, o_share = _oracle_regression(x, y, z, K_SIM)
    tol = RECOVERY_TOL
    np.testing.assert_allclose(np.asarray(got.coef)[:, 0, :], o_coef, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(got.scale)[:, 0], o_scale, rtol=tol)
    np.testing.assert_allclose(np.asarray(got.weights), o_share, rtol=tol)
    # and the oracle itself is near the truth (sampling error only)
    np.testing.assert_allclose(o_coef, TRUE_COEF, atol=0.2)
    np.testing.assert_allclose(o_scale, TRUE_SCALE, rtol=0.3)
    np.testing.assert_allclose(o_share, TRUE_W, atol=0.12)


GATE_MEAN = np.array([-4.0, 0.0, 4.0])
GATE_SD = np.array([0.5, 0.6, 0.4])


def test_recovers_separated_gated():
    rng = np.random.default_rng(11)
    z = rng.choice(K_SIM, N_SIM, p=TRUE_W)
    x = GATE_MEAN[z] + GATE_SD[z] * rng.normal(size=N_SIM)
    y = TRUE_COEF[z, 0] + TRUE_COEF[z, 1] * x + TRUE_SCALE[z] * rng.normal(size=N_SIM)
    fit = fit_em(GATED3, jax.random.key(5), x, y, **FIT)
    assert bool(fit.converged) and not bool(fit.degenerate)

    # match on the gate means (the clusters of x), then compare everything
    perm = _match(np.asarray(fit.params.gate_mean), GATE_MEAN[:, None])
    got = GATED3.permute(fit.params, perm)
    o_coef, o_scale, o_share = _oracle_regression(x, y, z, K_SIM)
    o_mean = np.array([x[z == k].mean() for k in range(K_SIM)])
    o_var = np.array([x[z == k].var() for k in range(K_SIM)])  # ML (1/n_k)
    tol = RECOVERY_TOL
    np.testing.assert_allclose(np.asarray(got.coef)[:, 0, :], o_coef, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(got.scale)[:, 0], o_scale, rtol=tol)
    np.testing.assert_allclose(np.asarray(got.weights), o_share, rtol=tol)
    np.testing.assert_allclose(np.asarray(got.gate_mean)[:, 0], o_mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(got.gate_cov)[:, 0, 0], o_var, rtol=tol)
    np.testing.assert_allclose(o_mean, GATE_MEAN, atol=0.25)


# ---------------------------------------------------------------- compilation reuse, jit, vmap
def test_new_data_of_same_shape_does_not_recompile():
    x0, y0 = simulate(100, gated=False)
    fit_em(REG3, jax.random.key(0), x0, y0, **FIT)
    size = _fit_em_jit._cache_size()
    x1, y1 = simulate(101, gated=False)
    fit1 = fit_em(REG3, jax.random.key(1), x1, y1, **FIT)
    assert _fit_em_jit._cache_size() == size
    # numpy float64 input, jax input and a list of floats are the same program too
    fit2 = fit_em(REG3, jax.random.key(1), jnp.asarray(x1, DTYPE), list(y1), **FIT)
    assert _fit_em_jit._cache_size() == size
    # numpy inputs are standardised in float64 before rounding, JAX arrays where they are: the
    # same fit to the working precision
    np.testing.assert_allclose(float(fit1.loglik), float(fit2.loglik), rtol=rtol(1e-6, 1e-12))
    assert size >= 1


def _assert_same_fit(a, b, tol, ptol=None):
    np.testing.assert_allclose(float(a.loglik), float(b.loglik), rtol=tol)
    ptol = 1e3 * tol if ptol is None else ptol
    for u, v in zip(a.params, b.params, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=ptol, atol=ptol)


@once
def test_fit_em_under_jit_and_vmap_over_keys_and_datasets():
    """One jitted, vmapped program over a batch of (key, data set) pairs equals one eager fit each.
    (One compile: jit and vmap are exercised together to keep the suite fast.)"""
    B = 3
    data = [simulate(20 + b, gated=False) for b in range(B)]
    xs = jnp.asarray(np.stack([d[0] for d in data]), DTYPE)
    ys = jnp.asarray(np.stack([d[1] for d in data]), DTYPE)
    keys = jax.random.split(jax.random.key(9), B)

    @jax.jit
    def fit_batch(keys, xs, ys):
        # the model is static through the closure; key, x and y are traced
        return jax.vmap(lambda k, x, y: fit_em(REG3, k, x, y, **FIT))(keys, xs, ys)

    batched = fit_batch(keys, xs, ys)
    assert batched.loglik.shape == (B,)
    assert batched.params.coef.shape == (B, K_SIM, 1, 2)
    assert batched.restart_loglik.shape == (B, FIT["restarts"])
    assert batched.loglik_trace.shape == (B, FIT["max_iter"])
    for b in range(B):
        # the same device arrays (numpy inputs would be standardised in float64 first: the same
        # fit to rounding, which a flat direction of the likelihood can amplify)
        one = fit_em(REG3, keys[b], xs[b], ys[b], **FIT)
        # the log-likelihood to float resolution; the parameters to 1e-2 in float32: on the XLA
        # E-step, batched products round differently from single ones, and EM stops (at float
        # resolution) ~1e-3 apart along a flat direction of the likelihood
        _assert_same_fit(jax.tree_util.tree_map(lambda a, b=b: a[b], batched), one,
                         rtol(1e-6, 1e-12), ptol=rtol(1e-2, 1e-9))
    # three different data sets: three different fits
    assert len({float(v) for v in batched.loglik}) == B


# ---------------------------------------------------------------- weights and collapsing components
N_SMALL = 40
REG2 = RegressionMixture(2)
SMALL = dict(max_iter=200)


def outlier_data(seed: int = 0):
    """38 points on a noisy line and 2 more far above it: a linear expert can sit on those two."""
    rng = np.random.default_rng(seed)
    m = N_SMALL - 2
    x = rng.uniform(-2, 2, m)
    y = 1 + x + 0.5 * rng.normal(size=m)
    return np.r_[x, 1.5, 2.0], np.r_[y, 9.0, 10.0]


def two_lines(seed: int, n: int):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, n)
    y = np.where(np.arange(n) % 2 == 0, 2 + x, -2 - 1.5 * x) + 0.4 * rng.normal(size=n)
    return x, y


def start(coef, log_scale, weights):
    f = lambda a: jnp.asarray(np.asarray(a, np.float64), DTYPE)  # noqa: E731
    return RegressionParams(f(np.log(weights)), f(np.asarray(coef)[:, None, :]),
                            f(np.asarray(log_scale)[:, None]))


def test_integer_frequency_weights_equal_repeated_rows():
    x, y = two_lines(1, N_SMALL)
    # 10 rows dropped (weight 0), 10 doubled, 20 kept: the repeated data have N_SMALL rows too, so
    # both fits share one compiled program
    w = np.random.default_rng(2).permutation(np.repeat([0, 2, 1], [10, 10, 20]))
    assert w.sum() == N_SMALL
    p0 = start([[1.0, 0.5], [-1.0, -1.0]], [0.0, 0.0], [0.5, 0.5])
    weighted = fit_em(REG2, jax.random.key(0), x, y, weights=w, init_params=p0, **SMALL)
    repeated = fit_em(REG2, jax.random.key(0), np.repeat(x, w), np.repeat(y, w), init_params=p0,
                      **SMALL)
    tol = rtol(1e-4, 1e-10)
    np.testing.assert_allclose(float(weighted.loglik), float(repeated.loglik), rtol=tol)
    np.testing.assert_allclose(float(weighted.objective), float(repeated.objective), rtol=tol)
    np.testing.assert_allclose(float(weighted.bic), float(repeated.bic), rtol=tol)
    for a, b in zip(weighted.params, repeated.params, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=10 * tol, atol=10 * tol)
    n = min(int(weighted.n_iter), int(repeated.n_iter))
    np.testing.assert_allclose(weighted.trace()[:n], repeated.trace()[:n], rtol=tol)
    if X64:
        assert int(weighted.n_iter) == int(repeated.n_iter)
    # and the weights matter: unweighted data give another fit
    plain = fit_em(REG2, jax.random.key(0), x, y, init_params=p0, **SMALL)
    assert abs(float(plain.loglik) - float(weighted.loglik)) > 1.0


def test_far_away_initial_component_stays_finite():
    x, y = two_lines(3, N_SMALL)
    # component 0 starts 1e4 noise units away from every point: it gets no responsibility at all
    p0 = start([[1e4, 0.0], [0.0, 0.0]], [0.0, 1.0], [0.5, 0.5])
    fit = fit_em(REG2, jax.random.key(0), x, y, init_params=p0, **SMALL)
    assert _finite_tree(fit.params)
    assert np.isfinite(float(fit.loglik)) and np.isfinite(float(fit.objective))
    assert np.isfinite(float(fit.bic))
    n = int(fit.n_iter)
    assert np.all(np.isfinite(np.asarray(fit.objective_trace)[:n]))
    # after its first M-step the empty component's weight is the prior's pseudo-count share, not
    # zero or NaN (where EM takes it from there depends on rounding: it may or may not come back)
    one = fit_em(REG2, jax.random.key(0), x, y, init_params=p0, max_iter=1, tol=0.0)
    assert 0 < float(np.min(np.asarray(one.params.weights))) <= 1e-5
    assert bool(one.degenerate)  # an empty component is one that holds too few points


ONE_LINE = 60


def _line_data(case: str):
    rng = np.random.default_rng(4)
    x = rng.uniform(-2, 2, ONE_LINE)
    y = 1 + 2 * x
    if case == "noisy":
        y = y + 0.1 * rng.normal(size=ONE_LINE)
    elif case == "constant_y":
        y = np.full(ONE_LINE, 3.0)
    elif case == "tied_x":  # one covariate value: every component's design is rank-deficient
        x, y = np.full(ONE_LINE, 0.5), rng.normal(size=ONE_LINE)
    return x, y


def _check_all_finite(fit):
    assert np.all(np.isfinite(np.asarray(fit.restart_loglik))), np.asarray(fit.restart_loglik)
    assert _finite_tree(fit.params)
    for name in ("loglik", "objective", "bic"):
        assert np.isfinite(float(getattr(fit, name))), name
    n = int(fit.n_iter)
    assert np.all(np.isfinite(np.asarray(fit.loglik_trace)[:n]))
    np.testing.assert_allclose(float(np.sum(fit.params.weights)), 1.0, rtol=rtol(1e-5, 1e-12))


SIX = dict(restarts=4, max_iter=100)


def test_too_many_components_never_give_nan():
    """K = 6 on data from one line (noisy, exact, or a constant response): components empty out or
    collapse; all results stay finite. (Cases in one test: one compiled program.)"""
    for case in ("noisy", "exact", "constant_y"):
        x, y = _line_data(case)
        fit = fit_em(RegressionMixture(6), jax.random.key(0), x, y, **SIX)
        _check_all_finite(fit)
        if case != "noisy":
            # every restart fits exact data exactly: all spurious, and flagged so
            assert bool(np.all(fit.restart_degenerate)) and bool(fit.degenerate), case


def test_too_many_components_on_tied_x_never_give_nan():
    """Tied covariate values make every component's design rank-deficient; in float32 the ridge
    alone is below the Gram's resolution (at commit 7d93166 this gave NaN restarts)."""
    x, y = _line_data("tied_x")
    for key in range(4):
        _check_all_finite(fit_em(RegressionMixture(6), jax.random.key(key), x, y, **SIX))


def test_m_step_finite_on_tied_covariate():
    """The prior is documented to keep every M-step finite: also for a component whose points all
    share one x value (a discrete covariate), whatever its size."""
    model = RegressionMixture(1)
    N = 40
    x, y = model.check_data(np.full(N, 0.5), np.random.default_rng(0).normal(size=N))

    @jax.jit
    def m_step(w):
        return model.m_step(x, y, w[:, None], model.data_stats(x, y, w))

    # the component holds the first n rows (weights 0 elsewhere): one compiled program for all n
    bad = [n for n in range(3, N + 1)
           if not _finite_tree(m_step((jnp.arange(N) < n).astype(DTYPE)))]
    assert not bad, f"non-finite M-step for n in {bad}"


# ---------------------------------------------------------------- degenerate restarts
def test_degenerate_restarts_are_flagged_and_never_kept():
    """On a noisy line plus 2 outliers, some restarts put a linear expert exactly through the two
    outliers (D + 1 = 2 points, variance on the prior's floor): a higher log-likelihood than any
    clean fit, but spurious. They must be flagged and never kept while a clean restart exists."""
    x, y = outlier_data()
    selection_mattered = 0
    for key in range(8):
        fit = fit_em(REG2, jax.random.key(key), x, y, restarts=8, **SMALL)
        ll = np.asarray(fit.restart_loglik)
        degen = np.asarray(fit.restart_degenerate)
        best = int(fit.best_restart)
        assert np.all(np.isfinite(ll))
        if not degen.all():
            assert not degen[best] and not bool(fit.degenerate)
            assert ll[best] == ll[~degen].max()
            if degen.any() and ll[degen].max() > ll[best] + 1.0:
                selection_mattered += 1
        assert float(fit.loglik) == ll[best]
    assert selection_mattered > 0, "no key produced a degenerate restart beating the clean ones"


def test_component_on_two_points_is_degenerate():
    x, y = outlier_data()
    # component 0 exactly through (1.5, 9) and (2, 10), with a tiny scale; component 1 on the line
    p0 = start([[6.0, 2.0], [1.0, 1.0]], [np.log(1e-3), 0.0], [2 / N_SMALL, 1 - 2 / N_SMALL])
    fit = fit_em(REG2, jax.random.key(0), x, y, init_params=p0, **SMALL)
    assert bool(fit.degenerate) and bool(fit.restart_degenerate[0])
    assert int(fit.best_restart) == 0
    assert _finite_tree(fit.params) and np.isfinite(float(fit.loglik))
    # it stayed there: weight 2/N, coefficients through the two points, scale near the floor
    np.testing.assert_allclose(np.asarray(fit.params.coef)[0, 0], [6.0, 2.0], atol=1e-2)
    np.testing.assert_allclose(float(fit.params.weights[0]), 2 / N_SMALL, rtol=1e-3)
    assert float(fit.params.scale[0, 0]) < 1e-2
    # a clean start on the same data is not flagged
    clean = fit_em(REG2, jax.random.key(0), x, y,
                   init_params=start([[1.0, 1.0], [1.5, 1.0]], [0.0, 0.5], [0.5, 0.5]), **SMALL)
    assert not bool(clean.degenerate)


# ---------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"restarts": 0}, ValueError, "restarts"),
        ({"restarts": 2.0}, TypeError, "restarts"),
        ({"restarts": True}, TypeError, "restarts"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"tol": "small"}, TypeError, "tol"),
        ({"init": "x"}, ValueError, "init"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"key": 0}, TypeError, "key"),
        ({"key": "key"}, TypeError, "key"),
        ({"key": np.zeros(3)}, TypeError, "key"),
        ({"key": jax.random.split(jax.random.key(0), 2)}, ValueError, "key"),
        ({"weights": -np.ones(5)}, ValueError, "weights"),
        ({"weights": np.ones(4)}, ValueError, "weights"),
        ({"y": [1.0, np.nan, 2.0, 3.0, 4.0]}, ValueError, "y"),
        ({"y": np.array(list("abcde"))}, TypeError, "y"),
        ({"x": np.zeros((5, 2))}, ValueError, "x"),
        ({"model": RegressionMixture(6)}, ValueError, "n_components"),
        ({"model": "RegressionMixture"}, TypeError, "model"),
        ({"model": RegressionMixture}, TypeError, "model"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    args = {"model": REG2, "key": jax.random.key(0), "x": np.arange(5.0), "y": np.ones(5)}
    args.update(kwargs)
    model, key, x, y = (args.pop(k) for k in ("model", "key", "x", "y"))
    with pytest.raises(exc, match=name):
        fit_em(model, key, x, y, **args)


def test_tol_zero_runs_every_iteration():
    # fixed work (benchmarks divide by the count): no stopping rule, not even at a fixed point
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = np.where(x > 0, 3.0, -3.0) + 0.01 * rng.normal(size=60)
    fit = fit_em(RegressionMixture(2), jax.random.key(0), x, y, max_iter=40, tol=0.0)
    assert int(fit.n_iter) == 40 and not bool(fit.converged)
    assert int(fit_em(RegressionMixture(2), jax.random.key(0), x, y, max_iter=40, tol=1e-6).n_iter) < 40


@once  # plumbing: a warning at the boundary
def test_a_single_restart_at_the_best_optimum_warns():
    """restarts_at_best == 1 of several restarts is an OptimumWarning naming the count; two or more
    at the best, a single-run fit, or a traced result (inside jit) say nothing."""
    import warnings

    from conceptshift._validation import OptimumWarning
    from conceptshift.inference.em import warn_single_optimum

    m = RegressionMixture(2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=120)
    y = np.where(rng.random(120) < 0.5, 1 + 2 * x, -1 - x) + 0.2 * rng.normal(size=120)
    fit = fit_em(m, jax.random.key(0), x, y, restarts=3, max_iter=50)
    one = fit._replace(restarts_at_best=jnp.asarray(1, jnp.int32))
    with pytest.warns(OptimumWarning, match="only 1 of 3 EM restarts"):
        warn_single_optimum(one)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimumWarning)
        warn_single_optimum(one._replace(restarts_at_best=jnp.asarray(2, jnp.int32)))
        warn_single_optimum(one._replace(restart_loglik=one.restart_loglik[:1]))
        jax.jit(warn_single_optimum)(one)


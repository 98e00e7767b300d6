"""Algorithm 1 in one call on data drawn with plain numpy (not the package's simulator)."""

import jax
import numpy as np
import pytest
from conftest import once

from conceptshift.inference import fit_target
from conceptshift.models import RegressionMixture

BETA = np.array([[-3.0, 1.0], [0.0, -2.0], [3.0, 0.5]])  # strong heads (intercept, slope)
WEAK = np.array([[-2.0, 0.5], [1.0, -1.0], [2.5, 1.5]])  # weak heads, shared by both domains
PI_P, PI_Q = np.array([0.6, 0.3, 0.1]), np.array([0.1, 0.3, 0.6])


def draw(rng, n, pi):
    k = rng.choice(3, n, p=pi)
    x = rng.normal(size=n)
    y = BETA[k, 0] + BETA[k, 1] * x + 0.5 * rng.normal(size=n)
    yw = WEAK[k, 0] + WEAK[k, 1] * x + rng.normal(size=n)
    return x, y, yw


def truth(x):
    return (PI_Q[None] * (BETA[:, 0][None] + BETA[:, 1][None] * x[:, None])).sum(1)


@pytest.mark.slow  # two EM compiles and a bootstrap (the CLI test runs the same path by default)
@once  # precision-independent plumbing
def test_fit_target_recovers_q_with_intervals_that_cover_it():
    """n = 1500 per domain, 1-D x: the mean of q̂ within 0.1 of q on [-2, 2]; 40 bootstrap draws
    keep the matching (agreement 1) and their 90% intervals cover q at most points; the source
    without weak labels (strong-head matching) gives the same matching here; a second call with
    new data of the same shapes compiles nothing new."""
    rng = np.random.default_rng(0)
    xs, ys, yws = draw(rng, 1500, PI_P)
    xt, _, ywt = draw(rng, 1500, PI_Q)
    model = RegressionMixture(3)
    fit = fit_target(model, jax.random.key(0), xs, ys, xt, ywt, source_y_weak=yws, restarts=4)
    grid = np.linspace(-2, 2, 9)
    assert np.max(np.abs(fit.predict(grid) - truth(grid))) < 0.1
    s = fit.summary()
    assert sorted(s["assignment"]) == [0, 1, 2] and s["match"] == "weak" and s["margin"] > 1
    assert s["source"]["converged"] and s["target"]["restarts_at_best"] >= 1
    np.testing.assert_allclose(sum(s["target_weights"]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.sort(s["target_weights"]), np.sort(PI_Q), atol=0.05)
    boot = fit.bootstrap(jax.random.key(1), 40)
    lower, upper = boot.interval(grid, 0.9)
    assert boot.agreement == 1.0 and boot.predict(grid).shape == (40, 9)
    assert np.all(lower <= fit.predict(grid) + 1e-6) and np.all(fit.predict(grid) <= upper + 1e-6)
    assert np.mean((lower <= truth(grid)) & (truth(grid) <= upper)) >= 0.75
    strong = fit_target(model, jax.random.key(0), xs, ys, xt, ywt, restarts=4)
    assert strong.match == "strong" and strong.source_fit.params.coef.shape[1] == 1
    # a second call with new data of the same shapes compiles nothing (1511 rows: shapes no
    # other test compiles, so the first call must compile)
    xt3, _, ywt3 = draw(rng, 1511, PI_Q)
    first = _compiles(lambda: fit_target(model, jax.random.key(3), xs, ys, xt3, ywt3,
                                         source_y_weak=yws, restarts=4))
    xs2, ys2, yws2 = draw(rng, 1500, PI_P)
    xt4, _, ywt4 = draw(rng, 1511, PI_Q)
    second = _compiles(lambda: fit_target(model, jax.random.key(4), xs2, ys2, xt4, ywt4,
                                          source_y_weak=yws2, restarts=4))
    assert first > 0 and second == 0, (first, second)


def _compiles(fn) -> int:
    """How many XLA compilations ``fn()`` triggers (JAX's compile log)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            fn()
    finally:
        logger.removeHandler(handler)
    return sum("Compiling" in r.getMessage() for r in records)


def test_fit_target_refuses_bad_input_before_fitting():
    rng = np.random.default_rng(0)
    xs, ys, yws = draw(rng, 50, PI_P)
    xt, _, ywt = draw(rng, 40, PI_Q)
    model = RegressionMixture(3)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="target_y_weak"):
        fit_target(model, key, xs, ys, xt, ywt[:30], source_y_weak=yws)
    with pytest.raises(ValueError, match="source_y_weak"):
        fit_target(model, key, xs, ys, xt, ywt, source_y_weak=yws[:10])
    with pytest.raises(TypeError, match="source_y"):
        fit_target(model, key, xs, None, xt, ywt)
    with pytest.raises(TypeError, match="model"):
        fit_target(key, model, xs, ys, xt, ywt)
    with pytest.raises(ValueError, match="restarts"):
        fit_target(model, key, xs, ys, xt, ywt, restarts=0)
    with pytest.raises(ValueError, match="x"):
        fit_target(model, key, np.c_[xs, xs], ys, xt, ywt)
    with pytest.raises(TypeError, match="predict"):
        _no_mean_predict()


def _no_mean_predict():
    from conceptshift.inference.target import TargetFit

    class NoMean:
        pass

    TargetFit(NoMean(), *([None] * 11)).predict(np.zeros(3))

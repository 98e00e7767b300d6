"""The families' NumPyro generative models: sites, shapes, and the likelihood they define."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from conftest import once, rtol
from numpyro import handlers

from conceptshift.models import GatedExperts, RegressionMixture


def _trace(model, x, y, data=None):
    fn = handlers.seed(model.numpyro_model, jax.random.key(0))
    if data is not None:
        fn = handlers.substitute(fn, data=data)
    with _numpyro_promotion():
        return handlers.trace(fn).get_trace(x, y)


def _numpyro_promotion():
    """numpyro's own distribution code (LKJCholesky, MultivariateNormal) relies on implicit
    broadcasting and int/float promotion, which the strict test settings forbid."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.numpy_rank_promotion("allow"))
    stack.enter_context(jax.numpy_dtype_promotion("standard"))
    return stack


def test_regression_model_likelihood_equals_log_likelihood():
    model = RegressionMixture(3, n_heads=2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(20, 1)))
    y = jnp.asarray(rng.normal(size=(20, 2)))
    data = {
        "weights": jnp.asarray([0.2, 0.3, 0.5], x.dtype),
        "coef": jnp.asarray(rng.normal(size=(3, 2, 2)), x.dtype),
        "scale": jnp.asarray(rng.uniform(0.5, 2.0, size=(3, 2)), x.dtype),
    }
    tr = _trace(model, x, y, data)
    assert set(tr) >= {"weights", "coef", "scale", "y"}
    assert tr["y"]["is_observed"]
    with _numpyro_promotion():
        lp = tr["y"]["fn"].log_prob(y)
    params = model.init_params(jax.random.key(1))._replace(
        log_weights=jnp.log(data["weights"]), coef=data["coef"], log_scale=jnp.log(data["scale"]))
    np.testing.assert_allclose(lp, model.log_likelihood(params, x, y), rtol=rtol(1e-5, 1e-12))


@once
@pytest.mark.parametrize("covariance, D", [pytest.param("full", 2, marks=pytest.mark.slow),
                                          pytest.param("diag", 2, marks=pytest.mark.slow),  # 8 s
                                          ("full", 1)])
def test_gated_model_sites_and_prior_draw(covariance, D):
    model = GatedExperts(2, n_features=D, covariance=covariance)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(15, D)))
    tr = _trace(model, x, None)
    assert tr["gate_mean"]["value"].shape == (2, D)
    assert tr["x"]["is_observed"] and not tr["y"]["is_observed"]
    assert tr["y"]["value"].shape == (15, 1)
    assert ("gate_corr_chol" in tr) == (covariance == "full" and D > 1)
    with _numpyro_promotion():
        log_joint, _ = numpyro.infer.util.log_density(
            handlers.seed(model.numpyro_model, jax.random.key(0)), (x, tr["y"]["value"]), {},
            {k: v["value"] for k, v in tr.items() if not v["is_observed"] and k != "y"})
    assert np.isfinite(float(log_joint))

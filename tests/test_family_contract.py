"""The contract every registered family meets, checked over the registry: a family gets these
checks by being registered (``conceptshift.models.registry``).

- its log-likelihood is the NumPyro model's log density of the observed sites;
- it is invariant under ``permute``, and ``params_to_standard`` inverts ``params_from_standard``;
- its parameters round-trip through the posterior sites;
- ``fit_em`` fits it and returns an ``EMResult`` whose objective never falls beyond float
  resolution, under ``jit``/``vmap`` of the density, without recompiling for new data of the shape.

The HMM family is registered but joins this protocol in a later step (its EM, estimators and
sites are a parallel stack today): it is skipped here, by name, so the gap stays visible.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rtol
from numpyro import handlers

from conceptshift.inference import EMResult, fit_em
from conceptshift.inference.em import _fit_em_jit
from conceptshift.inference.gem import _fit_gem_jit
from conceptshift.inference.sites import numpyro_numerics, params_from_sites, sites_from_params
from conceptshift.models import Standardiser, family, family_names

DTYPE = jnp.zeros((), dtype=float).dtype
NOT_YET = {"hmm": "the HMM family joins the family protocol in a later step"}
NAMES = [pytest.param(n, marks=pytest.mark.skip(reason=NOT_YET[n])) if n in NOT_YET else n
         for n in family_names()]


def _setup(name, seed=0, n=120):
    """A small instance (defaults but K = 2, two heads) and data drawn from it."""
    model = family(name, n_components=2, n_heads=2)
    kp, ky = jax.random.split(jax.random.key(seed))
    params = model.init_params(kp, DTYPE)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(n, model.n_features)), DTYPE)
    y = model.sample_conditional(ky, params, x)
    return model, params, x, y


def _total(model, params, x, y):
    return float(jnp.sum(model.log_likelihood(params, x, y)))


@pytest.mark.parametrize("name", NAMES)
def test_log_likelihood_is_the_numpyro_models_density(name):
    model, params, x, y = _setup(name)
    sites = sites_from_params(model, params)
    with numpyro_numerics():
        fn = handlers.substitute(handlers.seed(model.numpyro_model, jax.random.key(0)), data=sites)
        tr = handlers.trace(fn).get_trace(x, y)
        observed = sum(float(jnp.sum(site["fn"].log_prob(site["value"])))
                       for site in tr.values() if site["type"] == "sample" and site["is_observed"])
    np.testing.assert_allclose(observed, _total(model, params, x, y), rtol=rtol(1e-5, 1e-12))


@pytest.mark.parametrize("name", NAMES)
def test_permutation_and_standard_coordinates(name):
    model, params, x, y = _setup(name)
    perm = jnp.asarray([1, 0])
    np.testing.assert_allclose(_total(model, model.permute(params, perm), x, y),
                               _total(model, params, x, y), rtol=rtol(1e-6, 1e-13))
    D, H = model.n_features, model.n_heads
    std = Standardiser(jnp.full((D,), 3.0, DTYPE), jnp.full((D,), 0.5, DTYPE),
                       jnp.full((H,), -2.0, DTYPE), jnp.full((H,), 4.0, DTYPE))
    back = model.params_to_standard(model.params_from_standard(params, std), std)
    for a, b in zip(back, params, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol(1e-4, 1e-10),
                                   atol=rtol(1e-4, 1e-10))


@pytest.mark.parametrize("name", NAMES)
def test_sites_round_trip(name):
    model, params, x, y = _setup(name)
    back = params_from_sites(model, sites_from_params(model, params))
    for field, a, b in zip(params._fields, back, params, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if field == "log_weights":  # defined up to a common shift
            a, b = a - np.logaddexp.reduce(a), b - np.logaddexp.reduce(b)
        np.testing.assert_allclose(a, b, rtol=rtol(1e-4, 1e-10), atol=rtol(1e-5, 1e-10),
                                   err_msg=field)


@pytest.mark.parametrize("name", NAMES)
def test_fit_em_monotone_jit_vmap_and_no_recompile(name):
    model, params, x, y = _setup(name)
    fit = fit_em(model, jax.random.key(1), x, y, max_iter=300)  # the default 8 restarts
    assert isinstance(fit, EMResult) and np.isfinite(float(fit.loglik))
    tr = np.r_[np.asarray(fit.objective_trace, np.float64)[: int(fit.n_iter)], float(fit.objective)]
    eps = float(jnp.finfo(fit.objective.dtype).eps)
    assert np.all(np.diff(tr) >= -8 * eps * (np.abs(tr[1:]) + len(y)))
    assert float(fit.loglik) >= _total(model, params, x, y) - 1.0  # at least the truth, nearly

    sizes = _fit_em_jit._cache_size() + _fit_gem_jit._cache_size()
    _, _, x2, y2 = _setup(name, seed=1)
    fit_em(model, jax.random.key(2), x2, y2, max_iter=300)
    assert _fit_em_jit._cache_size() + _fit_gem_jit._cache_size() == sizes

    batch = jax.tree.map(lambda *a: jnp.stack(a), params, model.permute(params, jnp.asarray([1, 0])))
    ll = jax.jit(jax.vmap(lambda p: jnp.sum(model.log_likelihood(p, x, y))))(batch)
    np.testing.assert_allclose(np.asarray(ll), _total(model, params, x, y), rtol=rtol(1e-5, 1e-12))


def _data_for_any(name):
    """Data any registered family can be fitted to with fit_em's one call: (model, x, y)."""
    if name not in NOT_YET:
        model, _, x, y = _setup(name)
        return model, x, y
    # sequences: integer tokens with -1 as trailing padding, and output tokens
    model = family(name, n_components=2, n_states=2, n_tokens=4, n_heads=1)
    x, lengths, y, _ = model.sample(jax.random.key(1), model.init_params(jax.random.key(0)),
                                    n=80, length=6)
    x = np.where(np.arange(x.shape[1])[None, :] < np.asarray(lengths)[:, None], np.asarray(x), -1)
    return model, x, y


@pytest.mark.parametrize("name", family_names())
def test_fit_em_fits_every_registered_family_with_one_call(name):
    """One call, one result type, for every family (the HMM included)."""
    model, x, y = _data_for_any(name)
    fit = fit_em(model, jax.random.key(3), x, y, restarts=2, max_iter=200)
    assert isinstance(fit, EMResult)
    assert np.isfinite(float(fit.loglik)) and np.isfinite(float(fit.bic))
    assert fit.restart_loglik.shape == (2,) and 1 <= int(fit.restarts_at_best) <= 2
    assert len(fit.trace()) == int(fit.n_iter)

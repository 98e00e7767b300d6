"""A family added as a user would add one: its own file (tests/toy_family.py) and one
registration line, nothing else. The contract tests then run on it unchanged, and the package's
generic entry points (fit_em, fit_svi, fit_nuts, relabel) fit it."""

import jax
import numpy as np
import pytest
import test_family_contract as contract
from conftest import once
from toy_family import PoissonMixture

from conceptshift.inference import fit_em
from conceptshift.inference.mcmc import fit_nuts
from conceptshift.models import registry

NAME = "poisson_toy"


@pytest.fixture(scope="module", autouse=True)
def registered():
    registry.register_family(NAME, PoissonMixture)  # the one line a new family needs
    yield
    registry.FAMILIES.pop(NAME)
    registry.EXAMPLES.pop(NAME)


@pytest.mark.parametrize("check", [
    contract.test_log_likelihood_is_the_numpyro_models_density,
    contract.test_permutation_invariance,
    contract.test_sites_round_trip,
    contract.test_fit_em_monotone_jit_vmap_and_no_recompile,
    contract.test_fit_svi_runs_and_relabel_undoes_a_permutation,
    contract.test_algorithm_1_undoes_a_known_relabelling,
], ids=lambda f: f.__name__.removeprefix("test_"))
@once  # the toy family shows that one file and one line make a family; the registered families'
# contract tests run in both precisions
def test_contract(check):
    check(NAME)


@pytest.mark.slow  # 10 s (NUTS); the contract tests run on the toy family in the default run
@once  # precision-independent plumbing
def test_em_recovers_the_rates_and_nuts_agrees():
    """Two well separated Poisson components: EM finds their rates; NUTS from EM's fit gives a
    posterior mean within a few posterior sd of them."""
    rng = np.random.default_rng(0)
    z = rng.random(600) < 0.3
    y = np.where(z[:, None], rng.poisson(2.0, (600, 1)), rng.poisson(9.0, (600, 1)))
    model = PoissonMixture(2)
    fit = fit_em(model, jax.random.key(0), None, y)
    rates = np.sort(np.exp(np.asarray(fit.params.log_rate[:, 0])))
    np.testing.assert_allclose(rates, [2.0, 9.0], rtol=0.1)
    post = fit_nuts(model, jax.random.key(1), None, y, num_chains=2, num_warmup=200, num_samples=200,
                    init_params=fit.params)
    draws = np.exp(np.asarray(post.params.log_rate[..., 0])).reshape(-1, 2)
    em_rates = np.exp(np.asarray(fit.params.log_rate[:, 0]))
    assert np.all(np.abs(draws.mean(0) - em_rates) < 4 * draws.std(0))

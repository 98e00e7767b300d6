"""NUTS with relabelling, Algorithm 1's posterior and bootstrap draws, and the ArviZ DataTree:
relabelling restores permuted draws exactly, chains started in different labellings agree once
relabelled, the diagnostics equal direct computations, the netCDF round trip is identical; the
compiled sampler matches an exact posterior, reuses its compiled program on new data and is
reproducible.

One short NUTS run (module fixture) serves the default tests; the full criteria (R-hat < 1.01,
bulk ESS > 400, 90% HDI coverage of q(x) in [0.85, 0.95] over 200 replicates, with its Monte Carlo
standard error) are ``slow``.
"""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import once, rtol
from scipy import stats
from scipy.special import logsumexp

from conceptshift.diagnostics.posterior import (
    diagnose,
    failed_checks,
    hdi_coverage,
    pit_values,
    posterior_datatree,
    read_datatree,
    write_datatree,
)
from conceptshift.inference import fit_em
from conceptshift.inference.estimators import identify
from conceptshift.inference.mcmc import fit_nuts, relabel
from conceptshift.inference.uncertainty import bootstrap_em, identification_draws
from conceptshift.models import GatedExperts, RegressionMixture, make_problem, simulate

M1 = RegressionMixture(2)


def _jitter(params, key, n_batch_shape, scale=0.05):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = [jnp.broadcast_to(a, n_batch_shape + a.shape)
           + scale * jax.random.normal(k, n_batch_shape + a.shape, a.dtype)
           for a, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.mark.parametrize("model", [
    RegressionMixture(3, n_heads=2),
    pytest.param(GatedExperts(3, n_features=2), marks=pytest.mark.slow),
], ids=["regression", "gated"])
def test_relabel_restores_permuted_draws_exactly(model):
    ref = model.init_params(jax.random.key(0))
    ref = ref._replace(coef=3 * ref.coef)  # well separated components
    draws = _jitter(ref, jax.random.key(1), (2, 25))  # (chain, draw)
    perms = jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(jax.random.key(2), 50))
    perms = perms.reshape(2, 25, 3)
    shuffled = jax.tree_util.tree_map(
        lambda a: jax.vmap(jax.vmap(lambda v, p: v[p]))(a, perms), draws)
    back, found = relabel(model, shuffled, ref)
    for u, v in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(draws), strict=True):
        np.testing.assert_array_equal(u, v)
    # the permutation found undoes the one applied: shuffled[found] == draws
    inv = jax.vmap(jax.vmap(jnp.argsort))(perms)
    np.testing.assert_array_equal(found, inv)
    # aligned draws are left alone
    same, ident = relabel(model, draws, ref)
    assert np.all(np.asarray(ident) == np.arange(3))


def test_relabel_by_allocation_keeps_occupied_components_when_one_has_emptied():
    """A NUTS draw of the kind seen at `experiment posterior --set seed=314`'s weak-target fit: the
    third component has emptied (weight 0.003) and its line wanders over its prior, far from every
    other. The occupied components are the reference's first two, in the same order. The distance
    between parameter vectors puts the wandering component under label 0 and the 73% component
    under label 2; the allocation cost (what each component explains in the data) keeps the
    identity."""
    model = RegressionMixture(3)
    ref = model.init_params(jax.random.key(0))._replace(
        log_weights=jnp.asarray([-0.343, -1.407, -3.085]),
        coef=jnp.asarray([[[-3.422, 0.794]], [[1.756, 0.232]], [[-0.666, -1.656]]]),
        log_scale=jnp.asarray([[0.031], [-0.080], [-0.887]]))
    draw = ref._replace(
        log_weights=jnp.log(jnp.asarray([0.727, 0.270, 0.003])),
        coef=jnp.asarray([[[-3.42, 0.76]], [[1.68, 0.18]], [[-10.6, 7.15]]]),
        log_scale=jnp.asarray([[0.03], [-0.05], [0.5]]))
    batch = model.sample_batch(jax.random.key(1), ref, 500)
    draws = jax.tree_util.tree_map(lambda a: a[None], draw)
    _, by_distance = relabel(model, draws, ref, n_batch=1)
    assert np.asarray(by_distance[0]).tolist() == [2, 1, 0]  # the case discriminates
    _, by_allocation = relabel(model, draws, ref, n_batch=1, batch=batch)
    assert np.asarray(by_allocation[0]).tolist() == [0, 1, 2]
    # and a permuted copy of the draw comes back to the identity labelling
    perm = jnp.asarray([2, 0, 1])
    shuffled = jax.tree_util.tree_map(lambda a: a[None], model.permute(draw, perm))
    back, found = relabel(model, shuffled, ref, n_batch=1, batch=batch)
    np.testing.assert_array_equal(np.asarray(found[0]), np.argsort(perm))
    for u, v in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(draws), strict=True):
        np.testing.assert_array_equal(u, v)
    # a component no row can belong to in the reference (responsibility 0) and of weight exactly 0
    # in the draw (log-responsibility -inf): 0 x -inf must not turn the cost into nan
    far = ref._replace(coef=ref.coef.at[2].set(jnp.asarray([[400.0, 0.0]])))
    empty = far._replace(log_weights=far.log_weights.at[2].set(-jnp.inf))
    _, found = relabel(model, jax.tree_util.tree_map(lambda a: a[None], empty), far, n_batch=1, batch=batch)
    assert np.asarray(found[0]).tolist() == [0, 1, 2]
    broken = jax.tree_util.tree_map(lambda a: a[None], draw._replace(coef=draw.coef.at[0].set(jnp.nan)))
    with pytest.raises(ValueError, match="relabelling cost is not finite"):
        relabel(model, broken, ref, n_batch=1, batch=batch)


@pytest.fixture(scope="module")
def problem_data():
    prob = make_problem(jax.random.key(0), n_components=2, noise=0.5)
    sim = simulate(jax.random.key(1), prob, 10, 150, 100)
    em = fit_em(M1, jax.random.key(2), sim.target.x, sim.target.y, restarts=4)
    return prob, sim, em


@pytest.fixture(scope="module")
def boot_run():
    """A DataTree of 2 x 100 draws scattered around the true parameters (the DataTree does not
    care where its draws come from; NUTS and the bootstrap are exercised separately)."""
    prob = make_problem(jax.random.key(0), n_components=2, noise=0.5)
    sim = simulate(jax.random.key(1), prob, 10, 10, 100)
    t = prob.heads("q", "strong")
    draws = _jitter(t, jax.random.key(3), (2, 100), scale=0.05)
    draws = draws._replace(log_weights=jax.nn.log_softmax(draws.log_weights, axis=-1))
    em = None
    stats_ = {"diverging": np.zeros((2, 100), bool)}
    dt = posterior_datatree(M1, draws, sim.test.x, sim.test.y, jax.random.key(4),
                            sample_stats=stats_, truth=prob)
    return prob, sim, em, draws, dt


@pytest.mark.slow
def test_nuts_chains_in_different_labellings_agree_once_relabelled(problem_data):
    """Chains started at EM's fit in the two labellings: the raw draws disagree (R-hat >> 1), the
    relabelled ones agree. Short chains here; the full criteria are in the slow test below."""
    from arviz_base import from_dict
    from arviz_stats import rhat

    prob, sim, em = problem_data
    x, y = sim.target.x[:100], sim.target.y[:100]
    starts = jax.tree_util.tree_map(lambda a: jnp.stack([a, a[::-1]]), em.params)
    res = fit_nuts(M1, jax.random.key(3), x, y, num_chains=2, num_warmup=100, num_samples=100,
                   init_params=starts, reference=em.params, max_tree_depth=5)
    assert res.params.coef.shape == (2, 100, 2, 1, 2)
    assert set(res.sample_stats) >= {"diverging", "acceptance_rate", "lp", "step_size"}
    raw = from_dict({"posterior": {"w": np.exp(np.asarray(res.raw_params.log_weights, float))}})
    assert float(rhat(raw)["w"].max()) > 1.5  # label switching: raw chains disagree
    assert np.all(np.asarray(res.perms[1]) == [1, 0])  # chain 1 ran in the other labelling
    post = {"w": np.exp(np.asarray(res.params.log_weights, float)),
            "c": np.asarray(res.params.coef[..., 0, :], float)}
    r = rhat(from_dict({"posterior": post}))
    assert float(r["w"].max()) < 1.1 and float(r["c"].max()) < 1.1
    np.testing.assert_allclose(np.sort(post["w"].mean((0, 1))),
                               np.sort(np.asarray(prob.params_q.weights, float)), atol=0.15)
    assert res.checks["max_rhat"] < 1.1
    # without a reference nothing is relabelled: the checks fail on R-hat, and fit_nuts says so
    from conceptshift.inference.mcmc import ConvergenceWarning

    with pytest.warns(ConvergenceWarning, match=r"^fit_nuts: sampler checks failed: R-hat \d"):
        unaligned = fit_nuts(M1, jax.random.key(3), x, y, num_chains=2, num_warmup=100, num_samples=100,
                             init_params=starts, max_tree_depth=5)
    assert unaligned.perms is None and unaligned.checks["max_rhat"] > 1.5


@once
def test_diagnostics_equal_direct_computations(boot_run):
    prob, sim, em, draws, dt = boot_run
    d = diagnose(dt, prob=0.9)
    ll = dt["log_likelihood"]["y"].values.reshape(-1, 100)
    # the log-likelihood group is log q̂_s(y | x) of each draw
    p0 = jax.tree_util.tree_map(lambda a: a[0, 0], draws)
    np.testing.assert_allclose(ll[0], M1.conditional_log_prob(p0, sim.test.x, sim.test.y),
                               rtol=rtol(1e-5, 1e-10))
    np.testing.assert_allclose(d["elpd_test"], np.sum(logsumexp(ll, 0) - np.log(ll.shape[0])),
                               rtol=1e-10)
    np.testing.assert_allclose(d["elpd_truth"], float(jnp.sum(prob.true_log_prob(sim.test.x, sim.test.y))),
                               rtol=rtol(1e-5, 1e-10))
    ks = stats.kstest(pit_values(dt), "uniform")
    np.testing.assert_allclose(d["pit_ks"], ks.statistic, rtol=1e-10)
    np.testing.assert_allclose(d["pit_ks_pvalue"], ks.pvalue, atol=0.02)
    # HDI by hand: the shortest window holding ceil(0.9 S) sorted draws
    q = np.sort(dt["posterior"]["q_mean"].values.reshape(-1, 100), axis=0)
    m = int(np.ceil(0.9 * q.shape[0]))
    width = q[m - 1:] - q[: q.shape[0] - m + 1]
    j = np.argmin(width, axis=0)
    lo, hi = q[j, np.arange(100)], q[j + m - 1, np.arange(100)]
    true = np.asarray(prob.true_mean(sim.test.x), float)
    rate, inside = hdi_coverage(dt, 0.9)
    np.testing.assert_allclose(rate, np.mean((lo <= true) & (true <= hi)), atol=0.02)
    assert 0 < d["pareto_k_max"] and np.isfinite(d["elpd_loo"])


@once
def test_datatree_groups_and_netcdf_round_trip(boot_run, tmp_path):
    dt = boot_run[4]
    assert set(dt.children) == {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
                                "observed_data", "constant_data", "truth"}
    assert dt["posterior"]["q_mean"].dims == ("chain", "draw", "obs")
    assert dt["truth"]["coef"].dims == ("component", "term")
    path = tmp_path / "run" / "posterior.nc"
    write_datatree(dt, path)
    back = read_datatree(path)
    assert back.identical(dt)
    assert [p.name for p in path.parent.iterdir()] == ["posterior.nc"]  # no temporary file left
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_datatree(tmp_path / "missing.nc")


@pytest.mark.slow
def test_identification_draws_are_algorithm_1_draw_by_draw():
    m2 = RegressionMixture(2, n_heads=2)
    src = _jitter(m2.init_params(jax.random.key(0)), jax.random.key(1), (2, 3), scale=0.3)
    tgt = _jitter(M1.init_params(jax.random.key(2)), jax.random.key(3), (2, 3), scale=0.3)
    q, a = identification_draws(M1, src, tgt)
    assert q.coef.shape == (2, 3, 2, 1, 2) and a.shape == (2, 3, 2)
    one_fn = jax.jit(lambda s_, t_: identify(M1, s_, t_))
    def pick(tree, c, s):
        return jax.tree_util.tree_map(lambda v: v[c, s], tree)

    for c in range(2):
        for s in range(3):
            one = one_fn(pick(src, c, s), pick(tgt, c, s))
            np.testing.assert_array_equal(a[c, s], one.assignment)
            for u, v in zip(jax.tree_util.tree_leaves(one.predictor.params),
                            jax.tree_util.tree_leaves(pick(q, c, s)),
                            strict=True):
                np.testing.assert_allclose(u, v, rtol=1e-6)


@once
def test_bootstrap_em_runs_and_relabels_to_the_fit():
    """Plumbing, fast (the statistics are the slow test below): refits of two well separated lines
    come back aligned with the fit's components (each refit's coefficients nearest its own)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    y = np.where(rng.random(200) < 0.4, 3 + x, -3 - x) + 0.3 * rng.normal(size=200)
    m = RegressionMixture(2)
    fit = fit_em(m, jax.random.key(0), x, y, restarts=4)
    boot = bootstrap_em(m, jax.random.key(1), fit.params, x, 4, max_iter=30)
    assert boot.coef.shape == (4, 2, 1, 2)
    dist = np.abs(np.asarray(boot.coef[:, :, 0, 0]) - np.asarray(fit.params.coef[None, :, 0, 0]))
    assert np.all(dist < 1.0)


@pytest.mark.slow
def test_bootstrap_em_matches_ols_standard_errors():
    """K = 1: the parametric bootstrap of the ML fit has the sampling spread of OLS,
    sd(beta*) ~ s (X'X)^-1/2 (up to the ML variance's (n - P) / n), over 400 refits."""
    rng = np.random.default_rng(0)
    n = 400
    x = rng.normal(size=n)
    y = 1.0 + 2.0 * x + 0.5 * rng.normal(size=n)
    X = np.stack([np.ones(n), x], 1)
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    s2 = np.sum((y - X @ beta) ** 2) / n
    se = np.sqrt(s2 * np.diag(np.linalg.inv(X.T @ X)))
    m = RegressionMixture(1)
    fit = fit_em(m, jax.random.key(0), x, y)
    boot = bootstrap_em(m, jax.random.key(1), fit.params, x, 400)
    coef = np.asarray(boot.coef[:, 0, 0], float)
    np.testing.assert_allclose(coef.std(0), se, rtol=0.12)
    assert np.all(np.abs(coef.mean(0) - beta) < 4 * se / np.sqrt(400))
    with pytest.raises(ValueError, match="n_boot must be >= 1"):
        bootstrap_em(m, jax.random.key(1), fit.params, x, 0)


# ------------------------------------------------------------------------------ the compiled sampler
K1 = RegressionMixture(1)
NUTS_SMALL = dict(num_chains=2, num_warmup=300, num_samples=500, max_tree_depth=6)


def _ols(seed, n=400):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = 1.0 + 2.0 * x + 0.5 * rng.normal(size=n)
    return x, y


def _exact_regression_posterior(x, y):
    """K = 1 under a flat prior on the coefficients and on the scale (the model's N(0, 10^2) and
    HalfNormal(10) are flat at this data's scale): beta | y ~ t_nu(beta_OLS, RSS / nu (X'X)^-1) and
    sigma^2 | y ~ InvGamma(nu / 2, RSS / 2), nu = n - P - 1. Returns (mean, sd) of beta, E[sigma]."""
    from scipy.special import gammaln

    X = np.stack([np.ones_like(x), x], 1)
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    rss = float(np.sum((y - X @ beta) ** 2))
    nu = len(y) - X.shape[1] - 1
    sd = np.sqrt(rss / nu * np.diag(np.linalg.inv(X.T @ X)) * nu / (nu - 2))
    a, b = nu / 2, rss / 2
    e_sigma = np.sqrt(b) * np.exp(gammaln(a - 0.5) - gammaln(a))
    return beta, sd, e_sigma


@pytest.fixture(scope="module")
def ols_nuts():
    x, y = _ols(0)
    return x, y, fit_nuts(K1, jax.random.key(0), x, y, **NUTS_SMALL)


class _Compiles(logging.Handler):
    """Collects JAX's compile log lines (``jax.log_compiles``)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling"):
            self.lines.append(msg)


@once  # a statistical check with wide tolerances and plumbing: the float32 pass
def test_nuts_reproduces_the_exact_regression_posterior(ols_nuts):
    """The compiled sampler (warm-up adaptation included) on K = 1 matches the closed-form posterior:
    means within ~6 Monte Carlo standard errors (ESS ~ 1000), sds within 10%."""
    x, y, res = ols_nuts
    beta, sd, e_sigma = _exact_regression_posterior(x, y)
    coef = np.asarray(res.params.coef[..., 0, 0, :], np.float64).reshape(-1, 2)
    sigma = np.exp(np.asarray(res.params.log_scale[..., 0, 0], np.float64)).ravel()
    assert coef.shape == (1000, 2)
    assert np.all(np.abs(coef.mean(0) - beta) < 0.2 * sd), (coef.mean(0), beta, sd)
    np.testing.assert_allclose(coef.std(0), sd, rtol=0.1)
    assert abs(sigma.mean() - e_sigma) < 0.2 * sigma.std()
    st = res.sample_stats
    assert set(st) == {"diverging", "acceptance_rate", "n_steps", "energy", "lp", "step_size", "tree_depth"}
    assert all(v.shape == (2, 500) for v in st.values())
    assert not st["diverging"].any()
    # warm-up adapted the step size (from 1.0) and it stays fixed while sampling
    assert np.all(st["step_size"] == st["step_size"][:, :1]) and np.all(st["step_size"] != 1.0)
    assert 0.6 < st["acceptance_rate"].mean() < 0.97
    assert res.perms is None and res.raw_params is res.params


@once  # a statistical check with wide tolerances and plumbing: the float32 pass
def test_nuts_no_recompile_on_new_data_and_same_key_same_draws(ols_nuts):
    """A second call with new data of the same shape compiles nothing (logged by jax.log_compiles;
    a fresh jit inside the same capture is the positive control); the same key gives identical
    draws, another key others."""
    x, y, res = ols_nuts
    x2, y2 = _ols(1)
    handler = _Compiles()
    log = logging.getLogger("jax")
    log.addHandler(handler)
    try:
        with jax.log_compiles():
            jax.jit(lambda a: 2 * a)(jnp.ones(3))
            control = len(handler.lines)
            other = fit_nuts(K1, jax.random.key(1), x2, y2, **NUTS_SMALL)
    finally:
        log.removeHandler(handler)
    assert control >= 1
    assert handler.lines[control:] == [], handler.lines[control:]
    assert np.all(np.isfinite(np.asarray(other.params.coef)))
    again = fit_nuts(K1, jax.random.key(0), x, y, **NUTS_SMALL)
    for a, b in zip(jax.tree_util.tree_leaves((res.params, res.sample_stats)),
                    jax.tree_util.tree_leaves((again.params, again.sample_stats)), strict=True):
        np.testing.assert_array_equal(a, b)
    third = fit_nuts(K1, jax.random.key(2), x, y, **NUTS_SMALL)
    assert not np.array_equal(third.params.coef, res.params.coef)


@pytest.mark.slow
def test_nuts_agrees_with_numpyros_mcmc_on_a_two_component_mixture():
    """Our compiled sampler and NumPyro's own ``MCMC(NUTS)`` on the same K = 2 data, both relabelled
    to EM's fit: posterior means of every parameter agree within 5 combined Monte Carlo standard
    errors, and posterior sds within 15%."""
    from arviz_base import from_dict
    from arviz_stats import ess
    from numpyro.infer import MCMC, NUTS

    from conceptshift.inference.sites import numpyro_numerics, params_from_draws

    rng = np.random.default_rng(5)
    n = 150
    x = rng.uniform(-2, 2, n)
    z = rng.integers(0, 2, n)
    y = np.where(z == 1, 1.5 + 1.0 * x, -1.0 - 1.5 * x) + 0.4 * rng.normal(size=n)
    em = fit_em(M1, jax.random.key(0), x, y, restarts=4)
    ours = fit_nuts(M1, jax.random.key(1), x, y, num_chains=4, num_warmup=500, num_samples=1000,
                    reference=em.params)
    xa, ya = M1.check_data(x, y)
    mcmc = MCMC(NUTS(M1.numpyro_model, max_tree_depth=8), num_warmup=500, num_samples=1000,
                num_chains=4, chain_method="vectorized", progress_bar=False)
    with numpyro_numerics():
        mcmc.run(jax.random.key(2), xa, ya)
    theirs, _ = relabel(M1, params_from_draws(M1, mcmc.get_samples(group_by_chain=True), 2), em.params)

    def flat(p):
        return {"w": np.exp(np.asarray(p.log_weights, np.float64)),
                "c": np.asarray(p.coef[..., 0, :], np.float64).reshape(p.coef.shape[:3] + (-1,)),
                "s": np.exp(np.asarray(p.log_scale[..., 0], np.float64))}

    a, b = flat(ours.params), flat(theirs)
    ess_a, ess_b = ess(from_dict({"posterior": a})), ess(from_dict({"posterior": b}))
    for k in a:
        va, vb = a[k].reshape(-1, *a[k].shape[2:]), b[k].reshape(-1, *b[k].shape[2:])
        mcse = np.sqrt(va.var(0) / ess_a[k].values + vb.var(0) / ess_b[k].values)
        assert np.all(np.abs(va.mean(0) - vb.mean(0)) < 5 * mcse), (k, va.mean(0), vb.mean(0), mcse)
        np.testing.assert_allclose(va.std(0), vb.std(0), rtol=0.15)


def test_bad_arguments():
    x, y = np.zeros((10, 1)), np.zeros(10)
    with pytest.raises(ValueError, match="target_accept must be in"):
        fit_nuts(M1, jax.random.key(0), x, y, target_accept=1.5)
    with pytest.raises(ValueError, match="num_chains must be >= 1"):
        fit_nuts(M1, jax.random.key(0), x, y, num_chains=0)
    with pytest.raises(TypeError, match="init_params must be the family's parameters"):
        fit_nuts(M1, jax.random.key(0), x, y, init_params={"coef": np.zeros((2, 1, 2))})
    with pytest.raises(ValueError, match=r"init_params.log_weights must have shape \(2,\) or \(4, 2\)"):
        fit_nuts(M1, jax.random.key(0), x, y, init_params=RegressionMixture(3).init_params(jax.random.key(0)))
    with pytest.raises(ValueError, match=r"for 4 chains, got \(3, 2\)"):
        p3 = _jitter(M1.init_params(jax.random.key(0)), jax.random.key(1), (3,))
        fit_nuts(M1, jax.random.key(0), x, y, init_params=p3)
    with pytest.raises(ValueError, match="one head"):
        posterior_datatree(RegressionMixture(2, n_heads=2),
                           RegressionMixture(2, n_heads=2).init_params(jax.random.key(0)), x, y,
                           jax.random.key(0))


# ------------------------------------------------------------------------------ slow: full criteria
@pytest.mark.slow
def test_nuts_well_specified_rhat_ess_and_hdi_coverage():
    """A well-specified problem (K = 2, the data drawn from the model's family), 200 replicates of
    n = 300 target points: relabelled NUTS (4 chains x 1000 draws, started at EM's fit) has R-hat <
    1.01 and bulk ESS > 400 for every parameter in every replicate, and the 90% HDIs of q̂(x) cover
    the true q(x) at a rate in [0.85, 0.95].

    The test points are fixed and well spread: 9 quantiles (5% to 95%) of the target's x. The HDIs
    of one replicate are strongly correlated across x (q(x) is linear in x here), so the unit of
    replication is the data set: the coverage is the mean over replicates of their per-replicate
    rates and its Monte Carlo standard error is sd(rates) / sqrt(R), which must be small enough
    (< 0.025) for the [0.85, 0.95] check to be sharp. q(x) = sum_k w_k (a_k + b_k x) does not
    depend on the labelling, so relabelling cannot move the coverage. The compiled sampler is reused
    across replicates (same shapes: no recompilation). Runtime about 6-8 minutes on 2 CPU cores.

    n = 300 because the minor component has weight 0.12: at n = 100 (about 12 of its points) its
    scale's posterior is a funnel in some data sets (divergences, R-hat up to 1.2, bulk ESS down to
    13), a property of that posterior, not of the sampler (the coverage there was 0.904 +- 0.014)."""
    import time

    from conceptshift._validation import float_dtype

    R, n, S = 200, 300, 1000
    prob = make_problem(jax.random.key(0), n_components=2, noise=0.5)
    assert prob.spec.family == "regression" and prob.spec.x_scale == 1.0  # x ~ N(0, 1)
    xg = jnp.asarray(stats.norm.ppf(np.linspace(0.05, 0.95, 9))[:, None], float_dtype())
    with jax.numpy_rank_promotion("allow"):  # numpyro's mixture sampler broadcasts implicitly
        yg = prob.model.distribution(prob.params_q, xg).sample(jax.random.key(7))[:, 0]
    t0 = time.perf_counter()
    inside, rhats, esss = np.zeros((R, xg.shape[0]), bool), [], []
    for rep in range(R):
        sim = simulate(jax.random.key(1000 + rep), prob, 1, n, 1)
        x, y = sim.target.x, sim.target.y
        em = fit_em(M1, jax.random.key(rep), x, y, restarts=4)
        res = fit_nuts(M1, jax.random.key(5000 + rep), x, y, num_chains=4, num_warmup=500,
                       num_samples=S, init_params=em.params)
        dt = posterior_datatree(M1, res.params, xg, yg, jax.random.key(rep),
                                sample_stats=res.sample_stats, truth=prob)
        d = diagnose(dt)
        rhats.append(d["max_rhat"])
        esss.append(d["min_ess_bulk"])
        inside[rep] = hdi_coverage(dt, 0.9)[1]
    rates = inside.mean(1)
    coverage, se = rates.mean(), rates.std(ddof=1) / np.sqrt(R)
    print(f"90% HDI coverage of q(x): {coverage:.4f} +- {se:.4f} (MC s.e.) over {R} replicates x "
          f"{xg.shape[0]} points; per point {np.round(inside.mean(0), 3).tolist()}; "
          f"max R-hat {max(rhats):.4f}, min bulk ESS {min(esss):.0f}; {time.perf_counter() - t0:.0f} s")
    bad = [(r, rhats[r], esss[r]) for r in range(R) if not (rhats[r] < 1.01 and esss[r] > 400)]
    assert not bad, bad
    assert se < 0.025, se
    assert 0.85 <= coverage <= 0.95, (coverage, se)


@once
def test_independent_draws_get_no_chain_diagnostics(boot_run, tmp_path):
    """Bootstrap refits or guide draws (one chain of independent draws): no R-hat, ESS or
    PSIS-LOO, labelled as such; the CLI's diagnose exits 0 on a folder holding such a tree (the
    posterior experiment's end-to-end test checks that no rank plot is drawn for them)."""
    from conceptshift.cli import main
    from conceptshift.diagnostics.posterior import draws_kind

    prob, sim, _, draws, _ = boot_run
    one = jax.tree_util.tree_map(lambda a: a[:1], draws)
    dt = posterior_datatree(M1, one, sim.test.x, sim.test.y, jax.random.key(4), truth=prob,
                            draws_kind="independent")
    assert draws_kind(dt) == "independent" and dt.attrs["draws"] == "independent"
    d = diagnose(dt)
    assert d["draws"] == "independent draws" and d["n_draws"] == 100
    assert not {"max_rhat", "min_ess_bulk", "elpd_loo", "pareto_k_max"} & set(d)
    assert "r_hat" not in d["summary"].columns and np.isfinite(d["elpd_test"])
    assert draws_kind(boot_run[4]) == "mcmc" and "max_rhat" in diagnose(boot_run[4])
    write_datatree(dt, tmp_path / "boot.nc")
    assert main(["diagnose", str(tmp_path), "--no-figures"]) == 0
    with pytest.raises(ValueError, match="draws_kind"):
        posterior_datatree(M1, one, sim.test.x, sim.test.y, jax.random.key(4), draws_kind="iid")


@once
def test_truth_is_aligned_to_the_posteriors_labels_without_size_1_dims(boot_run):
    """Draws in another component order than the truth: the truth group follows the draws'
    labels (its permutation recorded), q̂'s one head leaves no size-1 dimension, and the
    variables carry a long name."""
    prob, sim, _, draws, _ = boot_run
    swapped = jax.tree_util.tree_map(lambda a: a[:, :, ::-1], draws)
    dt = posterior_datatree(M1, swapped, sim.test.x, sim.test.y, jax.random.key(4), truth=prob)
    assert dt["truth"].attrs["truth_permutation"] == "1,0"
    np.testing.assert_allclose(dt["truth"]["weights"].values,
                               dt["posterior"]["weights"].mean(("chain", "draw")).values, atol=0.05)
    assert dt["posterior"]["coef"].dims == ("chain", "draw", "component", "term")
    assert all(n > 1 for v in dt["posterior"].data_vars.values() for n in v.shape[2:])
    assert dt["posterior"]["weights"].attrs["long_name"].startswith("proportion")
    assert list(dt["posterior"]["coef"].term.values) == ["Intercept", "x1"]


@once
def test_matching_group_flags_chains_that_settle_in_different_matchings(boot_run, tmp_path):
    prob, sim, _, draws, _ = boot_run
    same = np.broadcast_to(np.array([0, 1]), (2, 100, 2))
    split = np.stack([np.broadcast_to([0, 1], (100, 2)), np.broadcast_to([1, 0], (100, 2))])
    d_same = diagnose(posterior_datatree(M1, draws, sim.test.x, sim.test.y, jax.random.key(4),
                                         assignments=same))
    assert d_same["matching_share"] == 1.0 and d_same["matchings_seen"] == 1
    assert d_same["chains_disagree"] is False
    dt = posterior_datatree(M1, draws, sim.test.x, sim.test.y, jax.random.key(4), assignments=split)
    d = diagnose(dt)
    assert d["matching_share"] == 0.5 and d["matchings_seen"] == 2 and d["chains_disagree"] is True
    assert d["matchings"] == "0,1: 0.500;1,0: 0.500"
    assert "chains settle in different matchings" in d["failed_checks"]
    assert "different matchings" not in d_same["failed_checks"]
    write_datatree(dt, tmp_path / "m.nc")
    np.testing.assert_array_equal(read_datatree(tmp_path / "m.nc")["matching"]["assignment"].values,
                                  split)
    with pytest.raises(ValueError, match="assignments"):
        posterior_datatree(M1, draws, sim.test.x, sim.test.y, jax.random.key(4),
                           assignments=same[:, :10])


def test_failed_checks_name_each_sampler_check_that_fails():
    """Vehtari et al.'s thresholds (R-hat <= 1.01, ESS >= 100 per chain) plus no divergences,
    E-BFMI >= 0.3 and chains that agree on the matching; independent draws are not checked."""
    good = {"draws": "Markov chains", "max_rhat": 1.004, "min_ess_bulk": 900.0, "min_ess_tail": 800.0,
            "divergences": 0, "bfmi_min": 0.8, "chains_disagree": False, "max_rhat_fit": 1.009,
            "min_ess_bulk_fit": 401.0, "worst_rhat_fit": "target_coef"}
    assert failed_checks(good, 4) == []
    bad = {**good, "max_rhat_fit": 1.172, "min_ess_tail": 19.0, "divergences": 1, "bfmi_min": 0.2}
    got = failed_checks(bad, 4)
    assert got == ["R-hat of the fits' parameters (worst: target_coef) 1.172 > 1.01",
                   "tail ESS of q̂'s parameters 19 < 400 (100 per chain)",
                   "1 divergent transition after warm-up", "E-BFMI 0.20 < 0.3"]
    assert failed_checks({**good, "max_rhat": float("nan")}, 4) == ["R-hat of q̂'s parameters nan > 1.01"]
    assert failed_checks(good, 5) == ["bulk ESS of the fits' parameters 401 < 500 (100 per chain)"]
    assert failed_checks({**bad, "draws": "independent draws"}, 1) == []
    assert failed_checks({**good, "min_ess_tail_fit": 350.0}, 4) == [
        "tail ESS of the fits' parameters 350 < 400 (100 per chain)"]


def test_convergence_checks_match_arviz_and_name_what_fails():
    """The checks fit_nuts and fit_joint run on their draws: R-hat and ESS as ArviZ computes them,
    each failing check named, and none on iid chains."""
    from arviz_stats.base import array_stats

    from conceptshift.inference.mcmc import ConvergenceWarning, convergence_checks, warn_unconverged

    rng = np.random.default_rng(0)
    arrays = {"coef": rng.normal(size=(4, 500, 2, 3)), "log_tau": rng.normal(size=(4, 500))}
    stats = {"diverging": np.zeros((4, 500), bool), "energy": rng.normal(size=(4, 500))}
    good = convergence_checks(arrays, stats)
    assert good["failed"] == [] and good["divergences"] == 0
    r = [np.max(array_stats.rhat(a.reshape(4, 500, -1), chain_axis=0, draw_axis=1)) for a in arrays.values()]
    np.testing.assert_allclose(good["max_rhat"], max(r), rtol=1e-12)
    np.testing.assert_allclose(good["bfmi_min"], np.min(array_stats.bfmi(stats["energy"])), rtol=1e-12)
    # the tail ESS ArviZ's summary reports
    from arviz_base import from_dict
    from arviz_stats import summary

    table = summary(from_dict({"posterior": arrays}), round_to="none")
    np.testing.assert_allclose(good["min_ess_tail"], table["ess_tail"].min(), rtol=1e-10)
    np.testing.assert_allclose(good["min_ess_bulk"], table["ess_bulk"].min(), rtol=1e-10)
    # one chain elsewhere in one coordinate; two divergences; a random-walk energy (poor E-BFMI)
    shifted = {**arrays, "log_tau": arrays["log_tau"] + np.array([0, 0, 0, 1.0])[:, None]}
    diverging = np.zeros((4, 500), bool)
    diverging[:, :2] = True
    bad = convergence_checks(shifted, {"diverging": diverging, "energy": np.cumsum(stats["energy"], 1)})
    assert bad["worst_rhat"] == "log_tau"
    assert bad["failed"][0].startswith("R-hat ") and bad["failed"][0].endswith("> 1.01 (worst: log_tau)")
    assert "8 divergent transitions after warm-up" in bad["failed"]
    assert bad["failed"][-1].startswith("E-BFMI ")
    with pytest.warns(ConvergenceWarning, match="fit_nuts: sampler checks failed: R-hat"):
        warn_unconverged(bad, "fit_nuts")
    # too few draws for R-hat (nan): the check fails, it does not pass
    few = convergence_checks({"c": arrays["coef"][:, :3]}, {"diverging": diverging[:, :3] & False,
                                                           "energy": stats["energy"][:, :3]})
    assert math.isnan(few["max_rhat"]) and few["failed"][0] == "R-hat nan > 1.01 (worst: c)"

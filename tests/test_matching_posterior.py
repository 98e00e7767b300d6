"""The posterior over matchings (exact enumeration against brute force, its mode against the
Hungarian argmin, the truncation beyond K = 7) and the joint model's shift prior."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import X64, once
from scipy.special import logsumexp
from scipy.stats import gamma, norm

from conceptshift.inference.matching import (
    average_matching_posterior,
    local_permutations,
    matching_log_posterior,
    matching_posterior_summary,
    optimal_assignment,
)


def _brute(cost, dim=None, scale=None):
    """Every assignment by itertools, weights written out in float64."""
    K = cost.shape[0]
    perms = np.asarray(list(itertools.permutations(range(K))))
    total = np.array([sum(cost[k, p[k]] for k in range(K)) for p in perms])
    # tau integrated out under a flat prior by quadrature, not by the closed form
    if scale is not None:
        logw = -total / (2 * scale**2)
    else:
        from scipy.integrate import quad

        logw = np.log([quad(lambda t, c=c: t ** (-K * dim) * np.exp(-c / (2 * t * t)), 0, np.inf)[0]
                       for c in total])
    return perms, np.exp(logw - logsumexp(logw))


@pytest.mark.parametrize("kind", ["dim", "scale"])
def test_exact_enumeration_agrees_with_brute_force_at_k3(kind):
    cost = np.random.default_rng(0).uniform(0.1, 2.0, size=(3, 3))
    kw = {"dim": 3} if kind == "dim" else {"scale": 0.4}
    perms, lp = matching_log_posterior(cost, **kw)
    bp, bprob = _brute(cost, **kw)
    np.testing.assert_array_equal(np.asarray(perms), bp)
    np.testing.assert_allclose(np.exp(np.asarray(lp, np.float64)), bprob, rtol=1e-5 if X64 else 2e-4,
                               atol=1e-7)
    assert abs(float(jnp.sum(jnp.exp(lp))) - 1) < 1e-5


@once
def test_mode_is_the_hungarian_argmin_and_works_under_jit_and_vmap():
    rng = np.random.default_rng(1)
    for K in (2, 3, 5, 7):
        costs = jnp.asarray(rng.uniform(0, 3, size=(16, K, K)), jnp.float32)
        perms, lp = jax.jit(jax.vmap(lambda c: matching_log_posterior(c, dim=2)))(costs)
        modes = perms[jnp.arange(16), jnp.argmax(lp, -1)]
        hung = jax.vmap(optimal_assignment)(costs)
        np.testing.assert_array_equal(np.asarray(modes), np.asarray(hung))
        assert perms.shape == (16, math.factorial(K), K)


@once
def test_beyond_seven_the_neighbourhood_of_the_best_holds_the_mass():
    """K = 8: 8! = 40320 assignments by brute force against the 141 within three pairs of the best.
    The truncation's probabilities are the exact ones renormalised over the candidates."""
    K = 8
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(K, 2)) * 3
    perm = rng.permutation(K)
    noisy = truth[perm] + 0.3 * rng.normal(size=(K, 2))
    cost = np.sum((truth[:, None] - noisy[None]) ** 2, -1)
    perms, lp = matching_log_posterior(jnp.asarray(cost, jnp.float64 if X64 else jnp.float32), dim=2)
    assert perms.shape == (len(local_permutations(K)), K) == (141, K)
    bp, bprob = _brute(cost, dim=2)
    index = {tuple(p): i for i, p in enumerate(bp)}
    exact = bprob[[index[tuple(p)] for p in np.asarray(perms)]]
    assert exact.sum() > 0.99  # the neglected assignments are four or more pairs away
    np.testing.assert_allclose(np.exp(np.asarray(lp, np.float64)), exact / exact.sum(), rtol=1e-3,
                               atol=1e-6)
    best = np.asarray(perms)[int(np.argmax(lp))]
    np.testing.assert_array_equal(best, np.argsort(perm))  # the noisy row perm[k]... is truth k's
    np.testing.assert_array_equal(best, np.asarray(optimal_assignment(cost)))


def test_average_over_draws_and_summary():
    rng = np.random.default_rng(3)
    costs = rng.uniform(0.1, 2, size=(5, 3, 3))
    perms, prob = average_matching_posterior(costs, dim=3)
    each = np.stack([_brute(c, dim=3)[1] for c in costs])
    np.testing.assert_allclose(np.asarray(prob), each.mean(0), rtol=2e-4, atol=1e-7)
    _, jitted = jax.jit(lambda c: average_matching_posterior(c, dim=3))(jnp.asarray(costs, jnp.float32))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(prob), rtol=1e-4)
    s = matching_posterior_summary(perms, prob)
    assert s["best"] == np.asarray(perms)[int(np.argmax(prob))].tolist()
    assert s["n_candidates"] == 6 and len(s["matchings"]) == 3
    assert s["matchings"][0]["prob"] >= s["matchings"][1]["prob"] >= s["matchings"][2]["prob"]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="exactly one of dim"):
        matching_log_posterior(np.ones((3, 3)))
    with pytest.raises(ValueError, match="cost must be square"):
        matching_log_posterior(np.ones((3, 2)), dim=1)
    with pytest.raises(ValueError, match="costs must have ndim"):
        average_matching_posterior(np.ones((3, 3)), dim=1)
    with pytest.raises(ValueError, match="costs must have shape"):
        average_matching_posterior(np.ones((2, 3, 2)), dim=1)
    with pytest.raises(ValueError, match="cost has non-finite"):
        matching_log_posterior(np.full((3, 3), np.nan), dim=1)
    with pytest.raises(ValueError, match="scale must be a positive"):
        matching_log_posterior(np.ones((3, 3)), scale=0.0)
    with pytest.raises(ValueError, match="not log-probabilities"):
        matching_posterior_summary(*matching_log_posterior(np.ones((3, 3)), dim=2))
    # a draw with a non-finite cost (a degenerate refit) is left out of the average
    costs = np.random.default_rng(4).uniform(0.1, 2, size=(3, 3, 3))
    bad = costs.copy()
    bad[1, 0, 0] = np.nan
    np.testing.assert_allclose(np.asarray(average_matching_posterior(bad, dim=2)[1]),
                               np.asarray(average_matching_posterior(costs[[0, 2]], dim=2)[1]), rtol=1e-5)


# ---------------------------------------------------------------------------------- joint model
@once  # the model's algebra; its tolerance is set for float32
def test_joint_shift_density_is_the_sum_over_assignments_written_out():
    from numpyro.infer.util import log_density

    from conceptshift.inference.joint import JointBatch, JointModel, JointParams
    from conceptshift.models import RegressionMixture

    fam = RegressionMixture(3)
    jm = JointModel(fam)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    sp = jm.source_model.init_params(k1)
    tp = jm.target_model.init_params(k2)
    params = JointParams(sp, tp, jnp.asarray(-0.3, sp.coef.dtype))
    # by hand: (1/K!) sum_a prod_k N(v^wq_{a(k)}; v^wp_k, tau^2 I), v = (coefficients, log-scale)
    vp = np.concatenate([np.asarray(sp.coef[:, 1, :]), np.asarray(sp.log_scale[:, 1:2])], 1)
    vq = np.concatenate([np.asarray(tp.coef[:, 0, :]), np.asarray(tp.log_scale[:, 0:1])], 1)
    tau = math.exp(-0.3)
    terms = [sum(norm.logpdf(vq[a[k]], vp[k], tau).sum() for k in range(3))
             for a in itertools.permutations(range(3))]
    want = logsumexp(terms) - math.log(6)
    got = float(jm.shift_log_density(params))
    assert abs(got - want) < (1e-9 if X64 else 1e-3) * max(1, abs(want))
    # the NumPyro model's log joint is the two domains' models plus the shift term
    sb = jm.source_model.sample_batch(k3, sp, 40)
    tb = jm.target_model.sample_batch(k1, tp, 30)
    batch = JointBatch(sb, tb)
    sites = jm.to_sites(params)

    def density(model_fn, data, values):  # compiled: tracing NumPyro's handlers once is cheaper
        return jax.jit(lambda d, v: log_density(model_fn, (d,), {}, v)[0])(data, values)

    joint = density(jm.batch_model, batch, sites)
    s_only = density(jm.source_model.batch_model, sb, jm.source_model.to_sites(sp))
    t_only = density(jm.target_model.batch_model, tb, jm.target_model.to_sites(tp))
    # and tau's prior, Gamma(2, rate 0.1), with the Jacobian of log tau
    prior = gamma(2.0, scale=10.0).logpdf(tau) + math.log(tau)
    np.testing.assert_allclose(float(joint), float(s_only + t_only) + got + prior, rtol=1e-5 if X64 else 1e-4)
    # the site maps go both ways
    back = jm.from_sites(sites)
    np.testing.assert_allclose(np.asarray(back.target.coef), np.asarray(tp.coef), rtol=1e-6)


def test_joint_model_refuses_what_it_cannot_do():
    from conceptshift.inference.estimators import Data
    from conceptshift.inference.joint import JointModel, fit_joint
    from conceptshift.models import RegressionMixture

    with pytest.raises(ValueError, match="n_components must be <= 7"):
        JointModel(RegressionMixture(8))
    x = np.zeros((20, 1))
    with pytest.raises(ValueError, match="target.y_weak is required"):
        fit_joint(RegressionMixture(2), jax.random.key(0), Data(x, x[:, 0], x[:, 0]), Data(x))
    with pytest.raises(ValueError, match="method must be one of"):
        fit_joint(RegressionMixture(2), jax.random.key(0), Data(x, x[:, 0], x[:, 0]),
                  Data(x, None, x[:, 0]), method="mcmc")
    with pytest.raises(TypeError, match="model must be an instance"):
        fit_joint(jax.random.key(0), RegressionMixture(2), Data(x, x[:, 0], x[:, 0]),
                  Data(x, None, x[:, 0]))


@pytest.mark.slow  # compiles NUTS and SVI on the joint model (about a minute)
@once
def test_fit_joint_is_sure_of_a_clear_matching_and_compiles_once():
    """Data drawn with plain numpy, heads far apart: both routes put probability > 0.99 on
    Algorithm 1's matching, their 90% bands of q̂(x) cover q, NUTS's chains agree (R-hat < 1.05 on
    the proportions), and a second call with new data of the same shapes compiles nothing."""
    from test_target import PI_P, PI_Q, _compiles, draw, truth

    from conceptshift.inference.estimators import Data, identify
    from conceptshift.inference.joint import fit_joint
    from conceptshift.inference.predictor import Predictor
    from conceptshift.models import RegressionMixture

    rng = np.random.default_rng(4)
    model = RegressionMixture(3)

    def data(n_s=401, n_t=397):
        xs, ys, yws = draw(rng, n_s, PI_P)
        xt, _, ywt = draw(rng, n_t, PI_Q)
        return Data(xs, ys, yws), Data(xt, None, ywt)

    src, tgt = data()
    grid = np.linspace(-2, 2, 9)
    kw = {"num_chains": 2, "num_warmup": 400, "num_samples": 400, "restarts": 4}
    for method in ("svi", "nuts"):
        jp = fit_joint(model, jax.random.key(0), src, tgt, method=method, svi_steps=1000, **kw)
        ident = identify(model, jp.source_fit.params, jp.target_fit.params)
        summary = jp.matching_summary()
        assert summary["best"] == np.asarray(ident.assignment).tolist() and summary["best_prob"] > 0.99
        q, a = jp.predictor_draws(jax.random.key(1))
        means = np.asarray(jax.vmap(jax.vmap(lambda p: Predictor(model, p).mean(grid[:, None])))(q))
        means = means.reshape(-1, grid.size)
        lo, hi = np.quantile(means, [0.05, 0.95], axis=0)
        # at n = 400 per domain the posterior mean errs by up to 0.26 at the edge x = 2 (EM's
        # point estimate by 0.11); the 90% band covers q at all 9 points (measured)
        assert np.mean((lo <= truth(grid)) & (truth(grid) <= hi)) >= 8 / 9
        assert np.max(np.abs(means.mean(0) - truth(grid))) < 0.35
        if method == "nuts":
            from arviz_stats.base import array_stats

            w = np.exp(np.asarray(jp.params.target.log_weights))
            assert np.max(array_stats.rhat(w, chain_axis=0, draw_axis=1)) < 1.05
        new_src, new_tgt = data()
        again = functools.partial(fit_joint, model, jax.random.key(2), new_src, new_tgt, method=method,
                                  svi_steps=1000, **kw)
        assert _compiles(again) == 0

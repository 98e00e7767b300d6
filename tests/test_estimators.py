"""Estimators of q(y|x): closed forms, Algorithm 1 on known permutations, refinement, jit/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import once, rtol

from conceptshift.inference.estimators import (
    Data,
    EMOptions,
    identify,
    refinement_icl_logits,
    weak_training_sq,
)
from conceptshift.inference.predictor import Predictor
from conceptshift.models import RegressionMixture, make_problem, simulate


def _data(problem, n, key=1):
    sim = simulate(jax.random.key(key), problem, n, n, n)
    w = jnp.ones((n,), sim.source.x.dtype)
    src = Data(sim.source.x, sim.source.y, sim.source.y_weak, w)
    tgt = Data(sim.target.x, None, sim.target.y_weak, w)
    return sim, src, tgt


def test_weak_training_is_pooled_least_squares():
    prob = make_problem(jax.random.key(0), n_components=3)
    _, src, tgt = _data(prob, 300)
    lam = 2.5
    pred = weak_training_sq(prob.strong_model, src, tgt, lam)
    X = np.concatenate([np.asarray(tgt.x), np.asarray(src.x)])[:, 0]
    Phi = np.stack([np.ones_like(X), X], 1).astype(np.float64)
    y = np.concatenate([np.asarray(tgt.y_weak), np.asarray(src.y)]).astype(np.float64)
    w = np.concatenate([np.ones(300), lam * np.ones(300)])
    beta = np.linalg.solve(Phi.T @ (w[:, None] * Phi), Phi.T @ (w * y))
    np.testing.assert_allclose(np.asarray(pred.params.coef[0, 0]), beta, rtol=rtol(1e-3, 1e-6), atol=1e-4)
    resid = y - Phi @ beta
    mse = np.sum(w * resid**2) / w.sum()
    assert float(pred.params.scale[0, 0]) ** 2 == pytest.approx(mse, rel=rtol(1e-3, 1e-5))


@pytest.mark.parametrize("weak_source", [True, False])
def test_identify_recovers_known_permutation(weak_source):
    """Given the true source parameters and a permuted copy of the true weak-target fit, Algorithm 1
    returns the inverse permutation and exactly the true q(y|x)."""
    prob = make_problem(jax.random.key(3), n_components=4, delta=1.0)
    perm = np.array([2, 0, 3, 1])
    m1 = prob.strong_model
    target = prob.model.permute(prob.model.select_heads(prob.params_q, (1,)), perm)
    source = prob.params_p if weak_source else prob.model.select_heads(prob.params_p, (0,))
    ident = identify(source, target, m1, weak_source=weak_source)
    np.testing.assert_array_equal(perm[np.asarray(ident.assignment)], np.arange(4))
    x = jnp.linspace(-2.0, 2.0, 7)[:, None]
    np.testing.assert_allclose(ident.predictor.mean(x), prob.true_mean(x), rtol=1e-5, atol=1e-5)
    assert float(ident.margin) > 0
    if weak_source:  # Delta > 0: the paper's greedy rule agrees
        assert bool(ident.greedy_bijection)
        np.testing.assert_array_equal(ident.greedy, ident.assignment)


def test_identify_under_jit_and_vmap():
    prob = make_problem(jax.random.key(3), n_components=3)
    tq = prob.model.select_heads(prob.params_q, (1,))
    perms = jnp.asarray([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    targets = jax.vmap(lambda p: prob.model.permute(tq, p))(perms)
    f = jax.jit(jax.vmap(lambda t: identify(prob.params_p, t, prob.strong_model).assignment))
    a = np.asarray(f(targets))
    for p, ai in zip(np.asarray(perms), a, strict=True):
        np.testing.assert_array_equal(p[ai], np.arange(3))


def test_icl_posterior_concentrates_with_more_demonstrations():
    """With many demonstrations the in-context posterior p(k|x, V) collapses on one concept."""
    prob = make_problem(jax.random.key(0), n_components=3)
    _, _, tgt = _data(prob, 400)
    ent = []
    for m in (1, 32):
        logits = refinement_icl_logits(jax.random.key(2), prob.model, prob.params_p, tgt, m)
        p = jax.nn.softmax(logits, -1)
        ent.append(float(jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), -1))))
    assert ent[1] < 0.5 * ent[0]


def test_predictor_pytree_and_density():
    m = RegressionMixture(2)
    params = m.init_params(jax.random.key(0))
    pred = Predictor(m, params)
    leaves, tree = jax.tree_util.tree_flatten(pred)
    assert jax.tree_util.tree_unflatten(tree, leaves).model == m
    x = jnp.zeros((5, 1))
    y = jnp.linspace(-1.0, 1.0, 5)
    lp = jax.jit(lambda p: p.log_prob(x, y))(pred)
    np.testing.assert_allclose(lp, pred.log_prob(x, y), rtol=1e-6)
    assert pred.sample(jax.random.key(1), x).shape == (5,)


def test_em_options_hashable():
    assert hash(EMOptions()) == hash(EMOptions())


@once  # precision-independent plumbing
def test_identification_returns_the_fits_it_made():
    """Algorithm 1 run end to end hands back both EM fits (log-likelihood, convergence,
    degeneracy, restarts at the best optimum), not only the matching."""
    from conceptshift.inference import EMResult
    from conceptshift.inference.estimators import EMOptions, identification

    prob = make_problem(jax.random.key(3), n_components=2, delta=1.0)
    _, src, tgt = _data(prob, 300)
    ident = identification(jax.random.key(0), prob.strong_model, src, tgt,
                           EMOptions(restarts=2, max_iter=100))
    for fit, heads in ((ident.source_fit, 2), (ident.target_fit, 1)):
        assert isinstance(fit, EMResult) and fit.params.coef.shape[1] == heads
        assert np.isfinite(float(fit.loglik)) and 1 <= int(fit.restarts_at_best) <= 2
    assert identify(prob.params_p, prob.params_q, prob.strong_model).source_fit is None

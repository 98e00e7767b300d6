"""The ground-truth generator and simulator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import once, rtol

from conceptshift.models import ProblemSpec, make_problem, simulate


@once
@pytest.mark.parametrize("family", ["regression", "gated"])
def test_shapes_and_shared_components(family):
    prob = make_problem(jax.random.key(0), family=family, n_components=3, n_features=2)
    pp, pq = prob.params_p, prob.params_q
    assert pp.coef.shape == (3, 2, 3)
    # strong heads shared, weak heads and proportions differ (Assumption 2.3)
    np.testing.assert_array_equal(pp.coef[:, 0], pq.coef[:, 0])
    assert not np.allclose(pp.coef[:, 1], pq.coef[:, 1])
    assert not np.allclose(pp.log_weights, pq.log_weights)
    np.testing.assert_allclose(jnp.sum(pp.weights), 1.0, rtol=1e-6)
    sim = simulate(jax.random.key(1), prob, 50, 60, 70)
    assert sim.source.x.shape == (50, 2) and sim.source.y.shape == (50,)
    assert sim.source.y_weak.shape == (50,) and sim.target.y.shape == (60,)
    assert sim.target.y_weak.shape == (60,) and sim.test.y.shape == (70,) and sim.test.y_weak is None


def test_same_key_same_problem_and_sample():
    a = make_problem(jax.random.key(3))
    b = make_problem(jax.random.key(3))
    np.testing.assert_array_equal(a.params_q.coef, b.params_q.coef)
    sa = simulate(jax.random.key(4), a, 10, 10, 10)
    sb = simulate(jax.random.key(4), b, 10, 10, 10)
    np.testing.assert_array_equal(sa.source.y, sb.source.y)


def test_proportions_follow_the_shift():
    prob = make_problem(jax.random.key(0), n_components=3, shift=2.0)
    sim = simulate(jax.random.key(1), prob, 20000, 20000, 10)
    freq_p = np.bincount(np.asarray(sim.source.k), minlength=3) / 20000
    freq_q = np.bincount(np.asarray(sim.target.k), minlength=3) / 20000
    np.testing.assert_allclose(freq_p, prob.params_p.weights, atol=0.015)
    np.testing.assert_allclose(freq_q, prob.params_q.weights, atol=0.015)


def test_true_mean_matches_monte_carlo():
    prob = make_problem(jax.random.key(2), n_components=2, shift=1.0)
    x = jnp.asarray([[-1.0], [0.5]])
    xs = jnp.repeat(x, 20000, axis=0)
    ys = prob.model.sample_conditional(jax.random.key(5), prob.params_q, xs)[:, 0]
    mc = np.asarray(ys).reshape(2, 20000).mean(1)
    se = np.asarray(ys).reshape(2, 20000).std(1) / np.sqrt(20000)
    assert np.all(np.abs(mc - np.asarray(prob.true_mean(x))) < 5 * se)


def test_true_log_prob_is_a_density():
    prob = make_problem(jax.random.key(2), n_components=3)
    grid = jnp.linspace(-40.0, 40.0, 8001)
    x = jnp.full((grid.shape[0], 1), 0.3)
    dens = jnp.exp(prob.true_log_prob(x, grid))
    total = float(jnp.sum(dens) * (grid[1] - grid[0]))
    assert total == pytest.approx(1.0, rel=rtol(1e-3, 1e-8))  # f32: summation error


@pytest.mark.parametrize("delta", [0.1, 1.0, 3.0])
def test_delta_knob_hits_target(delta):
    prob = make_problem(jax.random.key(0), n_components=3, delta=delta)
    assert prob.distinguishability() == pytest.approx(delta, abs=rtol(1e-3, 1e-6))


def test_delta_out_of_reach_is_clear():
    with pytest.raises(ValueError, match="delta"):
        make_problem(jax.random.key(0), n_components=3, separation=1.0, delta=1e6)


@pytest.mark.parametrize("bad, err", [
    (dict(family="hmm"), ValueError), (dict(n_components=0), ValueError),
    (dict(noise=-1.0), ValueError), (dict(separation="big"), TypeError),
])
def test_bad_spec(bad, err):
    with pytest.raises(err, match=next(iter(bad))):
        ProblemSpec(**bad)


@once  # plumbing: shapes, the latent k the simulator reports, the weak head's bias
@pytest.mark.parametrize("family", ["logistic", "categorical",
                                    pytest.param("poisson", marks=pytest.mark.slow)])
def test_glm_problems_share_strong_heads_and_simulate_their_law(family):
    """Ground truth for the classification and count families: both domains share the strong
    heads, the weak heads are theta + weak_bias u_k (then shifted in the target), Delta is computed
    from the weak coefficients, and the simulator's labels follow the family's own p(y | x, k) at
    the k it reports (the empirical mean of y per concept against the model's)."""
    prob = make_problem(jax.random.key(0), family=family, n_components=2, weak_bias=1.0,
                        weak_shift=0.2)
    R = 2 if family == "categorical" else 1
    assert prob.params_p.coef.shape == (2, 2, R, 2)
    np.testing.assert_array_equal(prob.params_p.coef[:, 0], prob.params_q.coef[:, 0])
    bias = np.linalg.norm(np.asarray(prob.params_p.coef[:, 1] - prob.params_p.coef[:, 0]).reshape(2, -1),
                          axis=1)
    np.testing.assert_allclose(bias, 1.0, rtol=1e-5)
    assert np.isfinite(prob.distinguishability())
    sim = simulate(jax.random.key(1), prob, 20000, 10, 10)
    m1 = prob.strong_model
    x, y, k = sim.source.x, np.asarray(sim.source.y), np.asarray(sim.source.k)
    for c in range(2):
        one = m1.select_heads(prob.params_p, (0,))._replace(
            log_weights=jnp.log(jnp.asarray(np.eye(2)[c] + 1e-30, x.dtype)))
        rows = k == c
        if family == "categorical":
            want = np.exp(np.asarray(m1.conditional_log_probs(one, x[rows])))  # (n, C)
            got = np.eye(3)[y[rows].astype(int)]
        else:
            want, got = np.asarray(m1.conditional_mean(one, x[rows])), y[rows]
        np.testing.assert_allclose(got.mean(0), want.mean(0), rtol=0.1, atol=0.02)
    with pytest.raises(ValueError, match="degree must be 1"):
        ProblemSpec(family="logistic", degree=2)

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


@once  # plumbing and a brute-force sum: precision-independent
@pytest.mark.parametrize("family, C, flip_to", [("logistic", 2, "other"),
                                                ("categorical", 3, "other"),
                                                ("categorical", 3, "class")])
def test_label_noise_labeller_flips_at_its_rates_and_its_law_is_the_sum(family, C, flip_to):
    """weak_labeller="noise": y' is y replaced at rate rho_k per concept by a draw from T_k[y, .]
    (flip_to="other": another class, so the simulator's flips per concept are within 4 binomial
    standard errors of the rates; "class": every changed label is the concept's class); the
    labeller's p(y' | x, k) is the brute-force sum over v of p(y = v | x, k) C_k[v, y'];
    q(y' | x) sums to 1; the unused weak heads say so."""
    prob = make_problem(jax.random.key(3), family=family, n_components=2, weak_labeller="noise",
                        flip=0.3, flip_spread=0.5, weak_shift=0.1, flip_to=flip_to)
    fp, fq = np.asarray(prob.flip_p, float), np.asarray(prob.flip_q, float)
    T = np.asarray(prob.flip_target, float)
    np.testing.assert_allclose(np.sort(fp), [0.05, 0.55], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fq - fp), 0.1, rtol=1e-5)  # no rate clipped here
    np.testing.assert_allclose(T.sum(-1), 1.0)
    assert prob.distinguishability() == pytest.approx(
        min(abs(fq[0] - fp[1]), abs(fq[1] - fp[0])) ** 2 - max(abs(fq - fp)) ** 2, rel=1e-4)
    sim = simulate(jax.random.key(1), prob, 20000, 20000, 10)
    for smp, flip in ((sim.source, fp), (sim.target, fq)):
        k, y, yw = (np.asarray(a).astype(int) for a in (smp.k, smp.y, smp.y_weak))
        for j in range(2):
            n, rho, changed = np.sum(k == j), flip[j], y[k == j] != yw[k == j]
            if flip_to == "other":
                assert abs(np.mean(changed) - rho) < 4 * np.sqrt(rho * (1 - rho) / n)
            else:
                assert np.all(yw[k == j][changed] == np.argmax(T[j, 0]))
    x = sim.target.x[:5]
    strong = np.exp(np.asarray(prob.model.component_class_log_probs(prob.params_q, x, 0)))
    want = np.zeros_like(strong)
    for n in range(5):
        for j in range(2):
            for v in range(C):
                for c in range(C):
                    want[n, j, c] += strong[n, j, v] * ((1 - fq[j]) * (v == c) + fq[j] * T[j, v, c])
    np.testing.assert_allclose(np.exp(np.asarray(prob.weak_log_probs(x, "q"))), want, rtol=1e-5)
    lab = prob.weak_labeller()
    np.testing.assert_allclose(np.exp(np.asarray(lab.log_probs(x))).sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lab.log_prob(x, jnp.zeros(5, x.dtype))),
                               np.asarray(lab.log_probs(x)[:, 0]), rtol=1e-6)
    with pytest.raises(ValueError, match="no weak head"):
        prob.heads("q", "weak")


def test_label_noise_knobs_are_checked():
    with pytest.raises(ValueError, match="weak_labeller"):
        ProblemSpec(family="logistic", weak_labeller="confusion")
    with pytest.raises(ValueError, match="class labels"):
        ProblemSpec(family="poisson", weak_labeller="noise")
    with pytest.raises(ValueError, match="flip"):
        ProblemSpec(family="logistic", weak_labeller="noise", flip=0.9, flip_spread=0.5)
    with pytest.raises(ValueError, match="flip_to"):
        ProblemSpec(family="logistic", weak_labeller="noise", flip_to="up")


@once  # brute force over permutations: precision-independent
def test_population_margin_against_every_permutation_and_the_swap_knob():
    """The population matching margin equals the brute-force minimum over the K! - 1 wrong
    matchings of the weak heads' squared distances less the identity's; moving each target weak
    head towards the next concept's source weak head (weak_swap) takes it from positive to negative
    between 0 and 1, while Delta < 0 with a positive margin is common (Delta is sufficient only)."""
    import itertools

    from conceptshift.models.problem import _weak_vectors

    margins = []
    for swap in (0.0, 0.25, 0.75, 1.0):
        prob = make_problem(jax.random.key(0), n_components=4, weak_swap=swap)
        wp, wq = np.asarray(_weak_vectors(prob.params_p)), np.asarray(_weak_vectors(prob.params_q))
        cost = ((wq[:, None] - wp[None]) ** 2).sum(-1)
        wrong = min(cost[np.arange(4), p].sum() for p in itertools.permutations(range(4))
                    if p != (0, 1, 2, 3))
        want = wrong - np.trace(cost)
        assert prob.population_margin() == pytest.approx(want, rel=1e-4, abs=1e-4)
        margins.append(want)
    assert margins[0] > 0 > margins[-1]
    assert make_problem(jax.random.key(0), delta=-4.0).population_margin() > 0
    with pytest.raises(ValueError, match="weak_swap"):
        make_problem(jax.random.key(0), family="logistic", weak_labeller="noise", weak_swap=0.5)


@once  # the construction's identities: precision-independent
def test_two_truths_share_their_observable_laws_but_not_q():
    """permute_target_concepts: the target's weak law Q'(y' | x) and P are unchanged, q(y | x) moves,
    and the permuted truth violates Assumption 4.5; gated problems and bad permutations refused."""
    from conceptshift.models import permute_target_concepts

    a = make_problem(jax.random.key(0), n_components=3)
    b = permute_target_concepts(a, [1, 2, 0])
    x = jnp.repeat(jnp.linspace(-3.0, 3.0, 40), 40)[:, None]
    yw = jnp.tile(jnp.linspace(-6.0, 6.0, 40), 40)
    m1 = a.model.with_heads(1)
    weak = [t.model.select_heads(t.params_q, (1,)) for t in (a, b)]
    np.testing.assert_allclose(m1.conditional_log_prob(weak[0], x, yw),
                               m1.conditional_log_prob(weak[1], x, yw), atol=rtol(1e-5, 1e-12))
    assert b.params_p is a.params_p
    assert float(jnp.mean((a.true_mean(x) - b.true_mean(x)) ** 2)) > 1.0
    assert a.distinguishability() > 0 > b.distinguishability()
    assert a.population_margin() > 0 > b.population_margin()
    with pytest.raises(ValueError, match="perm"):
        permute_target_concepts(a, [0, 0, 1])
    with pytest.raises(ValueError, match="constant gates"):
        permute_target_concepts(make_problem(jax.random.key(0), family="gated"), [1, 2, 0])


@once  # knob checks
def test_given_proportions_one_hot_included():
    """pi_p / pi_q replace the shift construction; a one-hot pi^q draws one concept only and keeps
    every density finite; bad proportions are refused naming the knob."""
    prob = make_problem(jax.random.key(0), n_components=3, pi_p=(0.2, 0.3, 0.5), pi_q=(1.0, 0.0, 0.0))
    np.testing.assert_allclose(prob.params_p.weights, [0.2, 0.3, 0.5], rtol=1e-6)
    sim = simulate(jax.random.key(1), prob, 50, 500, 50)
    assert set(np.asarray(sim.target.k).tolist()) == {0}
    assert np.all(np.isfinite(np.asarray(prob.true_log_prob(sim.test.x, sim.test.y))))
    for bad in ((0.5, 0.5), (0.5, 0.6, -0.1), (0.2, 0.2, 0.2)):
        with pytest.raises(ValueError, match="pi_q"):
            make_problem(jax.random.key(0), n_components=3, pi_q=bad)


@once  # knob checks
def test_covariate_shift_and_strong_drift_knobs():
    """covariate_shift moves the target's x (and the gold test sample's) along the first coordinate
    and leaves the source's; strong_drift moves each target strong head by exactly that distance;
    at 0 both leave the default problem as it was; a covariate shift of a gated problem is refused."""
    base = make_problem(jax.random.key(0), n_components=3)
    same = make_problem(jax.random.key(0), n_components=3, strong_drift=0.0, covariate_shift=0.0)
    np.testing.assert_array_equal(base.params_q.coef, same.params_q.coef)
    shifted = make_problem(jax.random.key(0), n_components=3, covariate_shift=2.0)
    sim = simulate(jax.random.key(1), shifted, 4000, 4000, 4000)
    assert float(jnp.mean(sim.target.x[:, 0])) == pytest.approx(2.0, abs=0.1)
    assert float(jnp.mean(sim.test.x[:, 0])) == pytest.approx(2.0, abs=0.1)
    assert float(jnp.mean(sim.source.x[:, 0])) == pytest.approx(0.0, abs=0.1)
    drift = make_problem(jax.random.key(0), n_components=3, strong_drift=1.5)
    moved = np.linalg.norm(np.asarray(drift.params_q.coef[:, 0] - drift.params_p.coef[:, 0]), axis=-1)
    np.testing.assert_allclose(moved, 1.5, rtol=1e-5)
    np.testing.assert_array_equal(drift.params_p.coef, base.params_p.coef)
    with pytest.raises(ValueError, match="covariate_shift"):
        make_problem(jax.random.key(0), family="gated", covariate_shift=1.0)


@once  # a simulation check
def test_softmax_gated_truth_shares_p_x_and_draws_k_from_its_gate():
    """family="softmax": both domains draw x from one N(0, I) and k from softmax(b + W x) with the
    slopes W shared and the intercepts b = log pi per domain; the drawn concepts' frequencies match
    E_x p(k | x) within 4 binomial s.e."""
    prob = make_problem(jax.random.key(0), family="softmax", n_components=3)
    np.testing.assert_array_equal(prob.params_p.gate_weights, prob.params_q.gate_weights)
    n = 20000
    sim = simulate(jax.random.key(1), prob, n, n, 10)
    for sample, params in ((sim.source, prob.params_p), (sim.target, prob.params_q)):
        assert abs(float(jnp.mean(sample.x))) < 4 / np.sqrt(n)
        freq = np.bincount(np.asarray(sample.k), minlength=3) / n
        want = np.asarray(jnp.mean(jnp.exp(prob.model.log_posterior_k(params, sample.x)), 0))
        assert np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / n)), (freq, want)
    with pytest.raises(ValueError, match="constant gates"):
        from conceptshift.models import permute_target_concepts

        permute_target_concepts(prob, [1, 2, 0])


@once  # densities against scipy, a simulation check
def test_heavy_tailed_truth_is_students_t_and_the_fits_stay_gaussian():
    """noise_df = nu: every head of the truth is Student's t (log-densities against scipy, through
    both code paths), the simulated residuals have its tails, and the estimators fit the Gaussian
    family (EM refuses the t truth with a message); 0 is the Gaussian default."""
    from scipy import stats

    from conceptshift.inference import fit_em
    from conceptshift.models import RegressionMixture

    prob = make_problem(jax.random.key(0), n_components=3, noise_df=3.0)
    m2 = prob.model
    assert type(prob.fit_model) is RegressionMixture and prob.fit_model.n_heads == 1
    assert type(make_problem(jax.random.key(0)).model) is RegressionMixture
    x = jnp.linspace(-2.0, 2.0, 7)[:, None]
    y = jnp.stack([jnp.linspace(-6.0, 6.0, 7), jnp.linspace(5.0, -5.0, 7)], 1)
    p = prob.params_q
    mean = np.asarray(m2.expert_mean(p, x), np.float64)  # (N, K, H)
    scale = np.exp(np.asarray(p.log_scale, np.float64))
    want = np.log(np.asarray(p.weights, np.float64))[None] + np.sum(
        stats.t.logpdf(np.asarray(y, np.float64)[:, None, :], 3.0, mean, scale), -1)
    np.testing.assert_allclose(m2.component_log_probs(p, x, y), want, rtol=rtol(1e-5, 1e-12))
    strong = m2.with_heads(1)
    np.testing.assert_allclose(strong.conditional_log_prob(m2.select_heads(p, (0,)), x, y[:, 0]),
                               prob.true_log_prob(x, y[:, 0]), rtol=rtol(1e-5, 1e-12))
    want0 = np.log(np.sum(np.asarray(p.weights)[None] * stats.t.pdf(
        np.asarray(y[:, :1], np.float64), 3.0, mean[..., 0], scale[None, :, 0]), -1))
    np.testing.assert_allclose(prob.true_log_prob(x, y[:, 0]), want0, rtol=rtol(1e-5, 1e-12))
    sim = simulate(jax.random.key(1), prob, 20000, 10, 10)
    params = m2.select_heads(prob.params_p, (0,))
    mu = jnp.take_along_axis(strong.expert_mean(params, sim.source.x)[..., 0],
                             sim.source.k[:, None], 1)[:, 0]
    z = np.asarray((sim.source.y - mu) / jnp.exp(params.log_scale[sim.source.k, 0]), np.float64)
    assert stats.kstest(z, stats.t(3.0).cdf).pvalue > 1e-3
    assert stats.kstest(z, stats.norm.cdf).pvalue < 1e-6
    with pytest.raises(NotImplementedError, match="fit_model"):
        fit_em(strong, jax.random.key(2), sim.source.x[:50], sim.source.y[:50])
    for bad, match in ((dict(noise_df=1.0), "exceed 1"), (dict(noise_df=-1.0), "noise_df"),
                       (dict(noise_df=4.0, family="gated"), "regression")):
        with pytest.raises(ValueError, match=match):
            make_problem(jax.random.key(0), **bad)

"""Mixture of HMMs (Example 2.7): forward algorithm against brute-force enumeration of hidden paths,
Baum-Welch against brute-force expected counts and against hmmlearn's CategoricalHMM, EM guarantees
(monotone, no NaN, no recompilation), recovery of a simulated problem with anchor words."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import X64, once, rtol

from conceptshift.inference.baum_welch import fit_hmm_em
from conceptshift.inference.stats_em import fit_program as _fit_jit
from conceptshift.models.batch import pad_tokens
from conceptshift.models.hmm import HMMMixture, HMMParams
from conceptshift.models.hmm_problem import HMMProblemSpec, make_hmm_problem, simulate_hmm


def _probs(params):
    return {k: np.exp(np.asarray(v, np.float64)) for k, v in params._asdict().items()}


def _brute(params, x, length, y):
    """log pi_k + log p(x, y | k) and the expected counts (init, trans, emit, out) given k, by summing
    over every hidden path h_1..h_{L+1} (h_{L+1} only when an output token is present)."""
    P = _probs(params)
    K, S = P["log_init"].shape
    xs = list(x[:length])
    has_y = any(v >= 0 for v in y)
    n_states = length + 1 if has_y else length
    logp = np.zeros(K)
    counts = []
    for k in range(K):
        tot = 0.0
        c_tr = np.zeros((S, S))
        c_em = np.zeros(P["log_emit"].shape)
        for path in itertools.product(range(S), repeat=n_states):
            pr = P["log_init"][k, path[0]]
            for t in range(length):
                pr *= P["log_emit"][path[t], xs[t]]
            for t in range(n_states - 1):
                pr *= P["log_trans"][k, path[t], path[t + 1]]
            for h, v in enumerate(y):
                if v >= 0:
                    pr *= P["log_out"][h, path[-1], v]
            tot += pr
            for t in range(n_states - 1):
                c_tr[path[t], path[t + 1]] += pr
            for t in range(length):
                c_em[path[t], xs[t]] += pr
        logp[k] = np.log(P["log_weights"][k] * tot)
        counts.append((c_tr / tot, c_em / tot))
    return logp, counts


@pytest.fixture(scope="module")
def tiny():
    m = HMMMixture(n_components=2, n_states=2, n_tokens=3, n_heads=2)
    p = m.init_params(jax.random.key(0))
    x, lengths, y, _ = m.sample(jax.random.key(1), p, 6, 4, lengths=jnp.array([4, 3, 1, 2, 4, 4]))
    y = np.asarray(y).copy()
    y[1, 0] = -1  # one head missing
    y[4] = -1  # both missing: no h_{L+1}
    return m, p, np.asarray(x), np.asarray(lengths), y


def test_log_likelihood_equals_brute_force_enumeration(tiny):
    m, p, x, lengths, y = tiny
    got = np.asarray(m.component_log_probs(p, x, lengths, y))
    for i in range(x.shape[0]):
        want, _ = _brute(p, x[i], lengths[i], y[i])
        np.testing.assert_allclose(got[i], want, rtol=rtol(2e-5, 1e-12))
    # the NumPyro distribution evaluates the same density
    d = m.distribution(p, lengths, x.shape[1])
    lp = d.log_prob(np.concatenate([x, y], 1))
    np.testing.assert_allclose(lp, jax.scipy.special.logsumexp(got, axis=1), rtol=rtol(2e-5, 1e-12))


def test_expected_counts_equal_brute_force_posterior_expectations(tiny):
    """The E-step's counts (gradients of the log-likelihood) are the forward-backward expectations."""
    m, p, x, lengths, y = tiny
    w = np.linspace(0.5, 2.0, x.shape[0])
    _, stats = m.expected_stats(p, m.batch(pad_tokens(x, lengths), y, w))
    want_tr = np.zeros((2, 2, 2))
    want_em = np.zeros((2, 3))
    for i in range(x.shape[0]):
        logp, counts = _brute(p, x[i], lengths[i], y[i])
        r = np.exp(logp - np.logaddexp.reduce(logp))
        for k in range(2):
            want_tr[k] += w[i] * r[k] * counts[k][0]
            want_em += w[i] * r[k] * counts[k][1]
    np.testing.assert_allclose(stats.trans, want_tr, rtol=rtol(1e-4, 1e-10), atol=rtol(1e-5, 1e-12))
    np.testing.assert_allclose(stats.emit, want_em, rtol=rtol(1e-4, 1e-10), atol=rtol(1e-5, 1e-12))
    np.testing.assert_allclose(jnp.sum(stats.n_k), w.sum(), rtol=rtol(1e-5, 1e-12))


def test_next_token_distribution_normalised_and_matches_joint(tiny):
    m, p, x, lengths, _ = tiny
    for head in (0, 1):
        table = np.asarray(m.next_token_log_probs(p, x, lengths, head), np.float64)
        np.testing.assert_allclose(np.exp(table).sum(1), 1.0, rtol=rtol(1e-5, 1e-12))
        # q(y | x) = p(x, y) / p(x) with the other head missing
        for v in range(3):
            y = np.full((x.shape[0], 2), -1)
            y[:, head] = v
            joint = jax.scipy.special.logsumexp(m.component_log_probs(p, x, lengths, y), axis=1)
            marg = jax.scipy.special.logsumexp(m.component_log_probs(p, x, lengths, None), axis=1)
            np.testing.assert_allclose(table[:, v], joint - marg, rtol=rtol(1e-4, 1e-10),
                                       atol=rtol(1e-5, 1e-12))


def _hmmlearn_setup(n_iter):
    hmm = pytest.importorskip("hmmlearn.hmm")
    m = HMMMixture(1, 3, 4, reg=1e-12)
    truth = m.init_params(jax.random.key(0))
    lengths = np.asarray(jax.random.randint(jax.random.key(2), (40,), 3, 13))
    x, _, _, _ = m.sample(jax.random.key(1), truth, 40, 12, lengths=lengths)
    x = np.asarray(x)
    p0 = m.init_params(jax.random.key(5))
    hl = hmm.CategoricalHMM(n_components=3, n_features=4, init_params="", n_iter=n_iter, tol=0,
                            params="ste")
    hl.startprob_ = np.exp(np.asarray(p0.log_init[0], np.float64))
    hl.transmat_ = np.exp(np.asarray(p0.log_trans[0], np.float64))
    hl.emissionprob_ = np.exp(np.asarray(p0.log_emit, np.float64))
    hl.startprob_ /= hl.startprob_.sum()
    hl.transmat_ /= hl.transmat_.sum(1, keepdims=True)
    hl.emissionprob_ /= hl.emissionprob_.sum(1, keepdims=True)
    X = np.concatenate([x[i, : lengths[i]] for i in range(40)])[:, None]
    return m, p0, x, lengths, hl, X


@pytest.mark.filterwarnings("ignore::DeprecationWarning:hmmlearn")
def test_k1_matches_hmmlearn_likelihood_and_em_fixed_point():
    m, p0, x, lengths, hl, X = _hmmlearn_setup(n_iter=25)
    np.testing.assert_allclose(m.log_likelihood(p0, x, lengths), hl.score(X, lengths),
                               rtol=rtol(1e-5, 1e-12))
    hl.fit(X, lengths)
    fit = fit_hmm_em(m, jax.random.key(0), x, lengths, init_params=p0, max_iter=25, tol=0.0)
    assert int(fit.n_iter) == 25
    # the log-likelihood trace is hmmlearn's monitor history, iteration by iteration
    np.testing.assert_allclose(fit.trace(), np.asarray(hl.monitor_.history), rtol=rtol(1e-5, 1e-12))
    tol = rtol(2e-4, 1e-9)
    np.testing.assert_allclose(np.exp(fit.params.log_trans[0]), hl.transmat_, atol=tol)
    np.testing.assert_allclose(np.exp(fit.params.log_emit), hl.emissionprob_, atol=tol)
    np.testing.assert_allclose(np.exp(fit.params.log_init[0]), hl.startprob_, atol=tol)


@pytest.fixture(scope="module")
def anchored():
    prob = make_hmm_problem(jax.random.key(0), HMMProblemSpec(n_components=2, n_states=3, n_tokens=6,
                                                              length=10, min_length=6, separation=0.8))
    sim = simulate_hmm(jax.random.key(1), prob, 2000, 10, 10)
    y = np.stack([sim.source.y, sim.source.y_weak], 1)
    fit = fit_hmm_em(prob.model, jax.random.key(2), sim.source.x, sim.source.lengths, y, restarts=4,
                     max_iter=150, tol=1e-7)
    return prob, sim, y, fit


def test_em_monotone_finite_and_recovers_anchored_problem(anchored):
    prob, sim, y, fit = anchored
    obj = np.asarray(fit.objective_trace)[: int(fit.n_iter)]
    assert np.all(np.isfinite(obj)) and np.all(np.isfinite(np.asarray(fit.restart_loglik)))
    scale = np.abs(obj).max() * (1e-6 if not X64 else 1e-12)
    assert np.all(np.diff(obj) >= -scale), np.diff(obj).min()
    assert bool(fit.converged)
    # the fit is at least as likely as the truth (it is the MLE up to restarts)
    truth_ll = prob.model.log_likelihood(prob.params_p, sim.source.x, sim.source.lengths, y)
    assert float(fit.loglik) >= float(truth_ll) - 1.0
    errs = prob.param_errors(fit.params, "p")
    emit, trans, w = (float(errs[k]) for k in ("emit_error", "trans_error", "weight_max_error"))
    assert emit < 0.05 and trans < 0.12 and w < 0.08, (emit, trans, w)


def test_sampler_matches_density(anchored):
    """Frequencies of simulated next tokens and concepts agree with the model's laws."""
    prob, sim, y, _ = anchored
    table = np.exp(np.asarray(prob.model.next_token_log_probs(prob.params_p, sim.source.x, sim.source.lengths,
                                                              1), np.float64))
    freq = np.bincount(np.asarray(y[:, 1]), minlength=6) / y.shape[0]
    se = np.sqrt(table.mean(0) * (1 - table.mean(0)) / y.shape[0])
    assert np.all(np.abs(freq - table.mean(0)) < 4.5 * se + 1e-3), (freq, table.mean(0))
    pz = np.bincount(np.asarray(sim.source.z), minlength=2) / y.shape[0]
    np.testing.assert_allclose(pz, np.exp(np.asarray(prob.params_p.log_weights, np.float64)), atol=0.035)
    lengths = np.asarray(sim.source.lengths)
    assert lengths.min() >= 6 and lengths.max() <= 10 and np.all(np.asarray(sim.source.x)[
        np.arange(10)[None, :] >= lengths[:, None]] == 0)


def test_new_data_same_shape_does_not_recompile_and_empty_state_stays_finite(anchored):
    prob, sim, y, fit = anchored
    size = _fit_jit._cache_size()
    assert size >= 1  # the fit did go through the cached program
    x2 = np.asarray(sim.source.x).copy()
    x2[:, :] = np.where(x2 == 5, 4, x2)  # token 5 never occurs: its emission count is zero
    fit2 = fit_hmm_em(prob.model, jax.random.key(7), x2, sim.source.lengths, y, restarts=4,
                      max_iter=150, tol=1e-7)
    assert _fit_jit._cache_size() == size
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in fit2.params)
    assert float(jnp.max(jnp.exp(fit2.params.log_emit[:, 5]))) < 1e-4


def test_jit_and_vmap_over_parameters(tiny):
    m, p, x, lengths, y = tiny
    w = jnp.log(jnp.array([0.2, 0.8], p.log_weights.dtype))
    q = m.permute_states(p, jnp.array([1, 0]))._replace(log_weights=w)
    ps = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), p, q)
    batched = jax.jit(jax.vmap(lambda p: m.log_likelihood(p, x, lengths, y)))(ps)
    np.testing.assert_allclose(batched[0], m.log_likelihood(p, x, lengths, y), rtol=rtol(1e-5, 1e-12))
    np.testing.assert_allclose(batched[1], m.log_likelihood(q, x, lengths, y), rtol=rtol(1e-5, 1e-12))
    assert abs(float(batched[0] - batched[1])) > 1e-3  # the two parameter sets differ


def test_permutation_invariance_of_likelihood(tiny):
    m, p, x, lengths, y = tiny
    base = m.log_likelihood(p, x, lengths, y)
    q = m.permute_states(m.permute(p, jnp.array([1, 0])), jnp.array([1, 0]))
    np.testing.assert_allclose(m.log_likelihood(q, x, lengths, y), base, rtol=rtol(1e-6, 1e-13))


def test_numpyro_model_observes_the_same_density(tiny):
    from numpyro import handlers

    m, p, x, lengths, y = tiny
    probs = {k: jnp.exp(v) for k, v in zip(("weights", "init", "trans", "emit", "out"), p, strict=True)}
    tr = handlers.trace(handlers.substitute(m.numpyro_model, probs)).get_trace(x, lengths, y)
    site = tr["obs"]
    np.testing.assert_allclose(jnp.sum(site["fn"].log_prob(site["value"])),
                               m.log_likelihood(p, x, lengths, y), rtol=rtol(1e-5, 1e-12))


@pytest.mark.slow
@once
def test_numpyro_nuts_and_svi_run_on_the_numpyro_model(tiny):
    """NumPyro's own NUTS and SVI run on the family's NumPyro model (the suite's fit_svi and
    fit_nuts take the Gaussian families for now): finite draws of every site, a falling ELBO."""
    import optax
    from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    m, p, x, lengths, y = tiny
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        mc = MCMC(NUTS(m.numpyro_model), num_warmup=30, num_samples=30, progress_bar=False)
        mc.run(jax.random.key(2), x, lengths, y)
        draws = mc.get_samples()
        svi = SVI(m.numpyro_model, AutoNormal(m.numpyro_model), optax.adam(0.05), Trace_ELBO())
        losses = svi.run(jax.random.key(3), 150, x, lengths, y, progress_bar=False).losses
    assert set(draws) == {"weights", "init", "trans", "emit", "out"}
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in draws.values())
    assert float(jnp.mean(losses[-20:])) < float(jnp.mean(losses[:20]))


@pytest.mark.parametrize("bad, match", [
    (dict(x=np.array([[0, 3]])), r"x\[0, 1\] = 3 is not a token"),
    (dict(x=np.array([0, 1])), "x must have shape"),
    (dict(x=np.array([[0.5, 1.0]])), "integer tokens"),
    (dict(lengths=np.array([3])), "lengths must lie in"),
    (dict(y=np.array([[5]])), "y must hold tokens"),
    (dict(y=np.array([[0, 1]])), "y must have shape"),
    (dict(weights=np.array([-1.0])), "weights must be >= 0"),
])
def test_bad_input_is_a_clear_error_before_compiling(bad, match):
    m = HMMMixture(1, 2, 3, n_heads=1)
    args = dict(x=np.array([[0, 1]]), lengths=None, y=None, weights=None) | bad
    with pytest.raises((ValueError, TypeError), match=match):
        fit_hmm_em(m, jax.random.key(0), args["x"], args["lengths"], args["y"], weights=args["weights"])


def test_init_params_shape_checked():
    m = HMMMixture(2, 2, 3)
    bad = HMMParams(jnp.zeros(3), jnp.zeros((2, 2)), jnp.zeros((2, 2, 2)), jnp.zeros((2, 3)),
                    jnp.zeros((0, 2, 3)))
    with pytest.raises(ValueError, match="init_params.log_weights"):
        fit_hmm_em(m, jax.random.key(0), np.zeros((3, 2), int), init_params=bad)


# ---------------------------------------------------------------- estimators (no new EM compile)
@pytest.mark.slow  # 30 s of CPU: `make test-slow`
@once
def test_identification_recovers_a_concept_permutation_and_moves_target_weights(anchored):
    """Algorithm 1 steps 3-4 on a target 'fit' that is the source fit with concepts and states
    relabelled, its weak head shifted slightly and other proportions: the matching undoes the
    relabelling, and the estimate is the source's concepts under the target's proportions."""
    from conceptshift.diagnostics.metrics import categorical_kl as next_token_kl
    from conceptshift.inference.estimators import identify

    prob, sim, _, fit = anchored
    m2 = prob.model
    perm, sperm = jnp.array([1, 0]), jnp.array([2, 0, 1])
    tgt = m2.permute_states(m2.permute(fit.params, perm), sperm)
    tgt = m2.select_heads(tgt, (1,))
    tgt = tgt._replace(log_out=jnp.log(0.9 * jnp.exp(tgt.log_out) + 0.1 / 6),
                       log_weights=jnp.log(jnp.array([0.7, 0.3], tgt.log_weights.dtype)))
    for match in ("weak", "components"):
        ident = identify(m2, fit.params, tgt, match=match)
        np.testing.assert_array_equal(ident.assignment, [1, 0])  # source k <-> target perm^-1(k)
        assert bool(ident.greedy_bijection) and float(ident.margin) > 0
        np.testing.assert_allclose(jnp.exp(ident.predictor.params.log_weights), [0.3, 0.7], rtol=1e-6)
    # the predictor is the source's strong head under the new weights
    want = m2.with_heads(1).next_token_log_probs(
        m2.select_heads(fit.params, (0,))._replace(log_weights=ident.predictor.params.log_weights),
        sim.test.x, sim.test.lengths)
    got = ident.predictor.log_probs(sim.test.x, lengths=sim.test.lengths)
    np.testing.assert_allclose(got, want, rtol=rtol(1e-5, 1e-12))
    assert abs(float(next_token_kl(got, got))) < 1e-6


def test_icl_refinement_equals_eq_3_2_written_out(anchored):
    """q_re(y|x) = sum_k p̂(y|x,k) mean_V softmax_k(log pî_k + log p̂(x|k) + sum_j log p̂(x_j, y'_j|k)),
    written out with the same demonstration indices for every M of the grid (the generic
    ``refined_icl`` with one key and one ``m_pool``); M = 0 is the source fit, and 200
    demonstrations from a mixture make q̂(k | x, V) a point mass."""
    from conceptshift.inference.estimators import as_data
    from conceptshift.inference.refinement import refined_icl

    prob, sim, _, fit = anchored
    m2, tgt = prob.model, as_data(sim.source)  # demonstrations from the source sample itself
    xq = pad_tokens(sim.source.x[:40], sim.source.lengths[:40])
    grid = (0, 1, 3, 200)
    preds = [refined_icl(m2, jax.random.key(2), fit.params, tgt.x, tgt.y_weak, tgt.w, n_demos=M,
                         n_draws=4, m_pool=200) for M in grid]
    n = tgt.w.shape[0]
    idx = jax.random.choice(jax.random.key(2), n, (40, 4, 200), p=tgt.w / jnp.sum(tgt.w))
    yw = jnp.stack([jnp.full_like(tgt.y_weak, -1), tgt.y_weak], 1)
    demo = m2.component_log_probs(fit.params, tgt.x, y=yw) - fit.params.log_weights[None]
    lpx, per_k = m2.next_token_log_probs_by_concept(fit.params, xq)
    for pred, M in zip(preds[:3], grid[:3], strict=True):
        post = jnp.mean(jax.nn.softmax(lpx[:, None, :] + jnp.sum(demo[idx[:, :, :M]], 2), -1), 1)
        want = jnp.log(jnp.einsum("nk,nkv->nv", post, jnp.exp(per_k)))
        np.testing.assert_allclose(pred.log_probs(xq), want, rtol=rtol(1e-5, 1e-12),
                                   atol=rtol(2e-6, 1e-12))
    src = m2.next_token_log_probs(fit.params, xq, head=0)
    np.testing.assert_allclose(preds[0].log_probs(xq), src, rtol=rtol(1e-5, 1e-12),
                               atol=rtol(1e-6, 1e-13))
    np.testing.assert_allclose(preds[0].posterior_k(xq), m2.posterior_k(fit.params, xq),
                               rtol=rtol(1e-4, 1e-10), atol=1e-7)
    assert float(jnp.min(jnp.max(preds[3].posterior_k(xq), axis=1))) > 0.99
    np.testing.assert_allclose(jnp.sum(jnp.exp(preds[3].log_probs(xq)), 1), 1.0, rtol=rtol(1e-5, 1e-12))


@pytest.mark.parametrize("anchors, want", [("on", [1, 1, 1, 1]), ("partial", [1, 1, 0, 0]),
                                           ("off", [0, 0, 0, 0])])
def test_anchor_knob(anchors, want):
    """A token is an anchor word when exactly one state emits it (Prop. 4.4, assumption 2)."""
    prob = make_hmm_problem(jax.random.key(0), n_components=2, n_states=4, n_tokens=7, anchors=anchors)
    tau = np.exp(np.asarray(prob.params_p.log_emit, np.float64))
    np.testing.assert_allclose(tau.sum(1), 1.0, rtol=1e-6)
    emitters = (tau > 0).sum(0)
    has_anchor = [int(any(emitters[v] == 1 and tau[s, v] > 0 for v in range(7))) for s in range(4)]
    assert has_anchor == want and prob.anchor_states.astype(int).tolist() == want
    # both domains share everything but the proportions and the weak output emission
    p, q = prob.params_p, prob.params_q
    for a, b in ((p.log_trans, q.log_trans), (p.log_emit, q.log_emit), (p.log_out[0], q.log_out[0])):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(p.log_weights, q.log_weights) and not np.allclose(p.log_out[1], q.log_out[1])

"""Mixtures of generalized linear experts (logistic, binomial, categorical, Poisson): one component
equals scikit-learn's unpenalised GLMs, flexmix's NPreg count fit and a binomial fit with trials per
row are reached (Python and CLI), simulated
parameters are recovered, bad responses are refused at the boundary. The protocol's contract tests
(tests/test_family_contract.py) run on the three families by their registration."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import X64, once, rtol

from conceptshift.inference import fit_em
from conceptshift.models import (
    BinomialMixture,
    CategoricalMixture,
    LogisticMixture,
    PoissonRegressionMixture,
)

REFERENCE = Path(__file__).parent / "reference"


def _design(n, d, seed):
    rng = np.random.default_rng(seed)
    return rng, rng.normal(size=(n, d))


@pytest.mark.skipif(not X64, reason="a 1e-6 comparison: the float64 pass")
def test_one_component_equals_sklearn_glms():
    from sklearn.linear_model import LogisticRegression, PoissonRegressor

    rng, x = _design(400, 2, 0)
    eta = 0.3 + x @ np.array([1.0, -0.7])
    yb = (rng.uniform(size=400) < 1 / (1 + np.exp(-eta))).astype(float)
    yp = rng.poisson(np.exp(0.5 * eta)).astype(float)
    yc = np.argmax(x @ np.array([[0.0, 1.0, -1.0], [0.0, -0.5, 1.5]]) + rng.gumbel(size=(400, 3)), 1)

    fit = fit_em(LogisticMixture(1, 2, reg=0.0), jax.random.key(0), x, yb, restarts=1, tol=0,
                 max_iter=30)
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(x, yb)
    np.testing.assert_allclose(fit.params.coef[0, 0, 0], np.r_[ref.intercept_, ref.coef_[0]],
                               rtol=1e-6, atol=1e-8)
    ll = np.sum(yb * np.log(ref.predict_proba(x)[:, 1]) + (1 - yb) * np.log(ref.predict_proba(x)[:, 0]))
    np.testing.assert_allclose(float(fit.loglik), ll, rtol=1e-9)

    fit = fit_em(PoissonRegressionMixture(1, 2, reg=0.0), jax.random.key(0), x, yp, restarts=1,
                 tol=0, max_iter=30)
    ref = PoissonRegressor(alpha=0.0, tol=1e-12, max_iter=10000).fit(x, yp)
    np.testing.assert_allclose(fit.params.coef[0, 0, 0], np.r_[ref.intercept_, ref.coef_],
                               rtol=1e-6, atol=1e-8)

    m = CategoricalMixture(1, 2, n_classes=3, reg=0.0)
    fit = fit_em(m, jax.random.key(0), x, yc, restarts=1, tol=0, max_iter=30)
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(x, yc)
    np.testing.assert_allclose(np.exp(np.asarray(m.conditional_log_probs(fit.params, jnp.asarray(x)))),
                               ref.predict_proba(x), atol=1e-6)
    ll = np.sum(np.log(ref.predict_proba(x)[np.arange(400), yc]))
    np.testing.assert_allclose(float(fit.loglik), ll, rtol=1e-8)


def test_flexmix_npreg_poisson_optimum_reached(data_dir):
    """flexmix 2.3-18, best of 30 starts: yp ~ x, Poisson, K = 2, log-likelihood -440.640294375."""
    d = pd.read_csv(data_dir / "NPreg.csv")
    fit = fit_em(PoissonRegressionMixture(2, reg=0.0), jax.random.key(0), d.x.values, d.yp.values,
                 restarts=8, max_iter=2000, tol=rtol(1e-8, 1e-13))
    assert bool(fit.converged)
    # flexmix stops at its own tolerance: its optimum is matched to 1e-6 nats, coefficients to 1e-4
    assert float(fit.loglik) == pytest.approx(-440.640294375, abs=rtol(2e-3, 1e-6))
    coef = np.asarray(fit.params.coef[:, 0, 0])
    order = np.argsort(coef[:, 0])
    np.testing.assert_allclose(coef[order], [[1.2473835, 0.0646998], [1.8642895, -0.1619203]],
                               atol=rtol(2e-3, 1e-4))
    np.testing.assert_allclose(np.exp(np.asarray(fit.params.log_weights))[order],
                               [0.4618813, 0.5381187], atol=rtol(2e-3, 1e-4))


@pytest.mark.slow
@pytest.mark.skipif(not X64, reason="3000 EM iterations in a flat likelihood: the float64 pass")
def test_flexmix_npreg_binomial_loglik_reached(data_dir):
    """flexmix's binomial K = 2 fit (-138.251029927) is weakly identified; EM run long enough reaches
    at least its log-likelihood."""
    d = pd.read_csv(data_dir / "NPreg.csv")
    fit = fit_em(LogisticMixture(2, reg=0.0), jax.random.key(0), d.x.values, d.yb.values,
                 restarts=8, max_iter=3000, tol=0.0)
    assert float(fit.loglik) >= -138.251029927


@pytest.mark.slow  # a statistical check (n = 6000, 8 restarts); the contract tests fit these families
@pytest.mark.parametrize("cls, extra", [(PoissonRegressionMixture, {}), (LogisticMixture, {}),
                                        (CategoricalMixture, {"n_classes": 3})])
def test_simulated_parameters_recovered(cls, extra):
    """Two heads sharing the component (the strong and the weak label, as in the paper): a mixture
    of logistic regressions on one binary response per row is not identified, with two it is."""
    m = cls(2, 1, n_heads=2, **extra)
    R = m.n_predictors
    base = np.array([[[1.0, 1.5], [0.5, -1.0]], [[-1.0, -1.5], [-0.5, 1.0]]])  # (K, H, P)
    if cls is LogisticMixture:
        # binary labels carry little information: at these slopes EM from the truth and from its
        # restarts end within 0.2 nats of each other with coefficients 0.5 apart (n = 6000, measured);
        # steeper experts are recovered to 0.15
        base = 3.0 * base
    coef = np.repeat(base[:, :, None, :], R, axis=2)
    if R > 1:
        coef[:, :, 1] *= -1.0
    dtype = m.init_params(jax.random.key(0)).coef.dtype
    truth = m.init_params(jax.random.key(0))._replace(
        log_weights=jnp.log(jnp.asarray([0.4, 0.6], dtype)), coef=jnp.asarray(coef, dtype))
    batch = m.sample_batch(jax.random.key(1), truth, 6000)
    fit = fit_em(m, jax.random.key(2), batch.x, batch.y, restarts=8)
    perm = np.argsort(-np.asarray(fit.params.coef[:, 0, 0, 1]))  # the component with slope +1.5 first
    # the optimiser: its restarts reach the optimum that EM started at the truth reaches
    at_truth = fit_em(m, jax.random.key(3), batch.x, batch.y, init_params=truth, max_iter=2000)
    assert float(fit.loglik) >= float(at_truth.loglik) - 1e-3
    np.testing.assert_allclose(np.asarray(fit.params.coef)[perm], np.asarray(at_truth.params.coef),
                               atol=0.02)
    # the estimator: n = 6000 sets the tolerance. Steep logistic slopes are the least informative and
    # biased away from zero in finite samples (this sample's maximum, where EM from the truth ends
    # too: slopes 4.18 and 6.04 for 3 and 4.5)
    tol = dict(atol=0.3, rtol=0.45) if cls is LogisticMixture else dict(atol=0.3, rtol=0.2)
    np.testing.assert_allclose(np.asarray(fit.params.coef)[perm], coef, **tol)
    np.testing.assert_allclose(np.exp(np.asarray(fit.params.log_weights))[perm], [0.4, 0.6], atol=0.05)
    assert float(fit.loglik) >= float(m.batch_log_likelihood(truth, batch)) - 1e-3 * 6000


@pytest.mark.parametrize("cls, y, message", [
    (LogisticMixture, [0, 1, 2.5, 1], "0 or 1"),
    (PoissonRegressionMixture, [0, 3, -1, 2], "non-negative integer counts"),
    (CategoricalMixture, [0, 1, 3, 2], r"class labels 0\.\.2"),
])
def test_responses_the_family_cannot_have_are_refused(cls, y, message):
    m = cls(1, 1, **({"n_classes": 3} if cls is CategoricalMixture else {}))
    with pytest.raises(ValueError, match=message):
        fit_em(m, jax.random.key(0), np.arange(4.0), np.asarray(y, float))


CLI_RUNS = """
import contextlib, io, json, sys
from conceptshift.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            rc = main(argv)
        except SystemExit as ex:
            rc = ex.code
    out.append([rc, o.getvalue(), e.getvalue()])
print(json.dumps(out))
"""


def cli_runs(*argvs):
    """(exit code, stdout, stderr) of each CLI invocation, all in one subprocess (the CLI sets
    the process's precision; one interpreter and one JAX import for all of them)."""
    p = subprocess.run([sys.executable, "-c", CLI_RUNS, json.dumps([list(a) for a in argvs])],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return [tuple(r) for r in json.loads(p.stdout.strip().splitlines()[-1])]


@pytest.mark.slow  # 12 s (a CLI subprocess); the same flexmix optima are checked in Python by default
@once
def test_cli_fits_flexmix_references_and_refuses_bad_responses(data_dir, capsys):
    """From the command line: flexmix's NPreg Poisson fit, its concomitant-gate fit and the binomial
    fit with trials per row (tests/reference) are reached; bad responses and options are one line
    on stderr with exit code 2."""
    csv = str(data_dir / "NPreg.csv")
    bin_csv = str(REFERENCE / "binomial_trials.csv")
    runs = cli_runs(["fit", csv, "--family", "poisson", "-k", "2", "--y", "yp", "--x", "x", "--json"],
                    ["fit", csv, "--family", "logistic", "-k", "2", "--y", "yn", "--x", "x"],
                    ["fit", csv, "--family", "poisson", "-k", "2", "--y", "yp", "--x", "x", "--gate",
                     "softmax", "--json"],
                    ["fit", bin_csv, "--family", "binomial", "-k", "2", "--y", "successes", "--x",
                     "x", "--trials", "trials", "--json"])
    rc, out, err = runs[0]
    assert rc == 0, err
    s = json.loads(out)
    assert s["loglik"] == pytest.approx(-440.640294375, abs=1e-5)
    assert np.asarray(s["coef"]).shape == (2, 2) and s["restarts_at_best"] >= 1
    assert {"bic", "weights", "converged", "n_iter"} <= set(s) and "scale" not in s
    rc, out, err = runs[1]
    assert rc == 2 and err.count("\n") == 1 and "0 or 1" in err and "Traceback" not in err
    # the concomitant (softmax) gate: flexmix's FLXPmultinom optimum (tests/reference)
    rc, out, err = runs[2]
    assert rc == 0, err
    s = json.loads(out)
    assert s["loglik"] == pytest.approx(-440.551290067, abs=1e-5)
    assert s["gate"] == "softmax" and s["gate_x"] == ["x"] and np.shape(s["gate_weights"]) == (2, 1)
    assert s["df"] == 6 and len(s["gate_intercept"]) == 2
    # binomial responses with trials: flexmix's cbind(successes, trials - successes) ~ x optimum
    rc, out, err = runs[3]
    assert rc == 0, err
    s = json.loads(out)
    ref = json.loads((REFERENCE / "flexmix_binomial.json").read_text())["binomial_trials"]
    assert s["loglik"] == pytest.approx(ref["loglik"], abs=1e-5) and s["trials"] == "trials"
    assert np.shape(s["coef"]) == (2, 2) and s["df"] == 5


@once
def test_cli_refuses_gate_options_in_one_line(data_dir, capsys):
    """Gate options that do not apply are refused before anything is read or compiled: one line on
    stderr, exit code 2 (in process)."""
    from conceptshift.cli import main

    csv = str(data_dir / "NPreg.csv")

    for args, message in [(("--gate-x", "x"), "needs --gate gaussian"),
                          (("--gate", "softmax", "--gate-x", "yp"), "also the response"),
                          (("--family", "regression", "--gate", "softmax"), "does not apply")]:
        family = ["--family", "poisson"] if "--family" not in args else []
        assert main(["fit", csv, *family, "-k", "2", "--y", "yp", "--x", "x", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


@once
def test_fit_summary_of_a_categorical_fit():
    """coef K x C x P with the reference class as zeros; no scale (the CLI's --json keys)."""
    from conceptshift.diagnostics import fit_summary

    m = CategoricalMixture(2, 1, n_classes=3)
    batch = m.sample_batch(jax.random.key(0), m.init_params(jax.random.key(1)), 200)
    fit = fit_em(m, jax.random.key(2), batch.x, batch.y, restarts=2, max_iter=5)
    s = fit_summary(m, fit, batch.x, batch.y)
    coef = np.asarray(s["coef"])
    assert coef.shape == (2, 3, 2) and np.all(coef[:, 0] == 0) and "scale" not in s
    assert s["n_classes"] == 3 and sum(s["size"]) == 200


@pytest.mark.skipif(not X64, reason="against autodiff to 1e-10: the float64 pass")
@pytest.mark.parametrize("cls, extra", [(PoissonRegressionMixture, {}), (LogisticMixture, {}),
                                        (CategoricalMixture, {"n_classes": 4})])
def test_newton_gradient_and_hessian_are_the_objectives(cls, extra):
    """The M-step's closed-form gradient and Hessian equal autodiff's of the weighted objective."""
    m = cls(2, 2, reg=0.3, **extra)
    batch = m.sample_batch(jax.random.key(0), m.init_params(jax.random.key(1)), 50)
    phi = m.design(batch.x)
    rw = jax.random.uniform(jax.random.key(2), (50,), phi.dtype)
    beta = 0.3 * jax.random.normal(jax.random.key(3), (m.n_predictors * m.n_coef,), phi.dtype)
    g, h = m._grad_hess(beta, phi, batch.y[:, 0], rw)
    f = lambda b: m._head_objective(b, phi, batch.y[:, 0], rw)  # noqa: E731
    np.testing.assert_allclose(g, jax.grad(f)(beta), rtol=rtol(1e-4, 1e-10), atol=rtol(1e-4, 1e-10))
    np.testing.assert_allclose(h, jax.hessian(f)(beta), rtol=rtol(1e-4, 1e-10), atol=rtol(1e-4, 1e-10))


@once
def test_gaussian_family_given_discrete_y_warns(data_dir):
    """A family with Gaussian responses given 0/1 labels or a few integer levels says so (Python:
    a DiscreteResponseWarning naming the discrete families; CLI: one warning line, the fit runs)."""
    from conceptshift._validation import DiscreteResponseWarning
    from conceptshift.models import RegressionMixture

    x = np.linspace(-1, 1, 40)
    with pytest.warns(DiscreteResponseWarning, match="0/1 labels.*logistic"):
        RegressionMixture(2).batch(x, (x > 0).astype(float))
    with pytest.warns(DiscreteResponseWarning, match="3 integer levels.*categorical or Poisson"):
        RegressionMixture(2).batch(x, np.round(x + 1))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DiscreteResponseWarning)
        RegressionMixture(2).batch(x, x**2)  # continuous: silent
    p = subprocess.run([sys.executable, "-m", "conceptshift.cli", "fit", str(data_dir / "NPreg.csv"),
                        "-k", "2", "--y", "yb", "--x", "x", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and json.loads(p.stdout)["family"] == "regression"
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("warning: y holds only 0/1 labels")


@once
def test_gate_newton_gradient_and_hessian_are_the_objectives():
    """The softmax gate's closed-form gradient equals autodiff's; its Hessian equals autodiff's on
    the subspace sum_k W_k = 0 (it is made definite along the softmax's common shift), and the Newton
    direction stays in that subspace."""
    m = PoissonRegressionMixture(3, 2, reg=0.3, gate="softmax")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(40, 2)))
    phi = jnp.concatenate([jnp.ones((40, 1), x.dtype), x], axis=1)
    rw = jax.nn.softmax(jax.random.normal(jax.random.key(1), (40, 3), x.dtype), -1)
    rw = rw * jax.random.uniform(jax.random.key(2), (40, 1), x.dtype, 0.5, 2.0)
    t = 0.3 * jax.random.normal(jax.random.key(3), (3, 3), x.dtype)
    theta = (t - jnp.mean(t, axis=0, keepdims=True)).reshape(-1)  # centred
    g, h = m._gate_grad_hess(theta, phi, rw)
    f = lambda th: m._gate_objective(th, phi, rw)  # noqa: E731
    tol = dict(rtol=rtol(1e-4, 1e-10), atol=rtol(1e-4, 1e-10))
    np.testing.assert_allclose(g, jax.grad(f)(theta), **tol)
    v = jax.random.normal(jax.random.key(4), (3, 3), x.dtype)
    v = (v - jnp.mean(v, axis=0, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(h @ v, jax.hessian(f)(theta) @ v, **tol)
    d = jnp.linalg.solve(h, -g).reshape(3, 3)
    np.testing.assert_allclose(jnp.sum(d, axis=0), 0.0, atol=rtol(1e-4, 1e-10))


@pytest.mark.skipif(not X64, reason="stationarity to 1e-5 of a converged fit: the float64 pass")
@pytest.mark.parametrize("gate", [pytest.param("softmax", marks=pytest.mark.slow), "gaussian"])
def test_gated_fit_is_a_stationary_point(gate):
    """EM converged (tight tolerance) at a point where autodiff's gradient of the objective
    (log-likelihood plus log prior) vanishes in every parameter: the gates' M-steps maximise the
    right function."""
    m = LogisticMixture(2, 2, n_heads=2, gate=gate, expert_columns=(0,), gate_columns=(1,))
    truth = m.init_params(jax.random.key(0))._replace(
        coef=jnp.asarray([[[[1.0, 3.0]], [[0.5, 2.0]]], [[[-1.0, -3.0]], [[-0.5, -2.0]]]]))
    if gate == "softmax":
        truth = truth._replace(gate_weights=jnp.asarray([[1.5], [-1.5]]))
    else:
        truth = truth._replace(gate_mean=jnp.asarray([[-1.0], [1.0]]))
    batch = m.sample_batch(jax.random.key(1), truth, 800)
    fit = fit_em(m, jax.random.key(2), batch.x, batch.y, restarts=2, max_iter=3000, tol=1e-13)
    assert bool(fit.converged)

    def objective(p):
        p = p._replace(log_weights=jax.nn.log_softmax(p.log_weights))
        return m.batch_log_likelihood(p, batch) + m.log_prior(p)

    grad = jax.grad(objective)(fit.params)
    for field, g in zip(grad._fields, grad, strict=True):
        g = np.asarray(g)
        if field == "gate_cov":  # a symmetric matrix: the derivative along symmetric directions
            g = g + np.swapaxes(g, 1, 2)
        # measured: |gradient| <= 6e-5 at convergence; a wrong M-step leaves O(1) to O(100)
        np.testing.assert_allclose(g, 0.0, atol=1e-3, err_msg=field)


@pytest.mark.skipif(not X64, reason="a 1e-7 comparison: the float64 pass")
def test_flexmix_concomitant_poisson_fit_reached(data_dir):
    """flexmix's FLXPmultinom fit of NPreg's yp ~ x with a softmax gate on x (K = 2; best of 40
    starts, tests/reference/flexmix_glm_gates.R): its log-likelihood reached (or passed by rounding),
    coefficients to 1e-4, the gate's logit contrast (flexmix fixes component 1's logits at 0) to 1e-3."""
    ref = json.loads((Path(__file__).parent / "reference" / "flexmix_glm_gates.json").read_text())
    ref = ref["poisson_softmax_gate"]
    d = pd.read_csv(data_dir / "NPreg.csv")
    m = PoissonRegressionMixture(2, 1, gate="softmax", reg=0.0)
    fit = fit_em(m, jax.random.key(0), d.x.values, d.yp.values, restarts=10, max_iter=5000, tol=1e-15)
    assert float(fit.loglik) >= ref["loglik"] - 1e-7
    coef = np.asarray(fit.params.coef)[:, 0, 0]
    order = np.argsort(coef[:, 0])  # flexmix's Comp.1 has the smaller intercept here
    np.testing.assert_allclose(coef[order], ref["coef"], atol=1e-4)
    logits = np.c_[np.asarray(fit.params.log_weights), np.asarray(fit.params.gate_weights)][order]
    np.testing.assert_allclose(logits - logits[0], ref["gate"], atol=1e-3)


def test_separating_components_are_flagged_degenerate():
    """Labels a component separates put its maximum at infinity: every restart is flagged (the
    result's ``degenerate``), while a fit of labels with noise is clean."""
    x = np.linspace(-2.0, 2.0, 80)
    m = LogisticMixture(2, 1, reg=0.0)
    sep = fit_em(m, jax.random.key(0), x, (x > 0.3).astype(float), restarts=2, max_iter=200, tol=0.0)
    assert bool(sep.degenerate) and np.all(np.asarray(sep.restart_degenerate))
    rng = np.random.default_rng(0)
    noisy = (rng.uniform(size=80) < 1 / (1 + np.exp(-x))).astype(float)
    ok = fit_em(m, jax.random.key(0), x, noisy, restarts=2, max_iter=200)
    assert not bool(ok.degenerate)


@pytest.mark.skipif(not X64, reason="8 ulps of float64: the float64 pass (the contract tests check "
                                     "every family's trace in both precisions)")
@pytest.mark.parametrize("seeds", [range(10), pytest.param(range(10, 40), marks=pytest.mark.slow)])
@pytest.mark.parametrize("cls, hyper", [
    (LogisticMixture, {}), (CategoricalMixture, {"n_classes": 3, "gate": "softmax"}),
    (PoissonRegressionMixture, {"gate": "gaussian"})])
def test_em_objective_never_falls_over_seeded_problems(cls, hyper, seeds):
    """Seeded problems per family, 10 in the default run and 30 more in test-slow (one compiled
    program): EM's objective (log-likelihood plus log prior) never falls beyond 8 ulps, whatever
    the gate (a 4-ulp acceptance tolerance in the Newton steps once let the Gaussian-gated Poisson
    fall 51 ulps here). A fit flagged degenerate (a component collapsing: seed 18 of the
    Gaussian-gated Poisson, whose objective then jitters by 25-45 ulps, 3e-11 nats) is left out, as
    in tests/test_equivariance.py; most fits are clean."""
    m = cls(3, 2, n_heads=2, **hyper)
    clean = 0
    for seed in seeds:
        truth = m.init_params(jax.random.key(100 + seed))
        truth = truth._replace(coef=3.0 * truth.coef)
        batch = m.sample_batch(jax.random.key(seed), truth, 300)
        fit = fit_em(m, jax.random.key(seed), batch.x, batch.y, restarts=1, max_iter=150, tol=0.0)
        tr = np.r_[np.asarray(fit.objective_trace, np.float64)[: int(fit.n_iter)], float(fit.objective)]
        assert np.all(np.isfinite(tr)), seed
        if bool(fit.degenerate):
            continue
        clean += 1
        eps = float(jnp.finfo(fit.objective.dtype).eps)
        falls = -np.diff(tr) / (eps * (np.abs(tr[1:]) + 300))
        assert falls.max() <= 8, (seed, falls.max())
    assert clean >= 2 * len(seeds) // 3  # measured: 26 and 27 clean of 30 (logistic, Poisson)


def test_numpy_float64_covariates_take_the_working_precision_silently():
    """A user's numpy float64 x given to a fitted predictor: no dtype-truncation warning, the
    working precision's dtype out."""
    import warnings

    from conceptshift.inference.predictor import Predictor

    m = LogisticMixture(2, 2, gate="softmax", expert_columns=(0,), gate_columns=(1,))
    pred = Predictor(m, m.init_params(jax.random.key(0)))
    x = np.random.default_rng(0).normal(size=(5, 2))  # float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pred.mean(x)
    assert out.dtype == m.init_params(jax.random.key(0)).coef.dtype and out.shape == (5,)


@pytest.mark.skipif(not X64, reason="a 1e-6 comparison: the float64 pass")
def test_binomial_one_component_equals_sklearn_on_the_expanded_rows():
    """K = 1 with m trials per row is the logistic regression of the m Bernoulli rows each row
    stands for (sklearn with the successes and failures as sample weights): coefficients to 1e-6,
    and the log-likelihood that one plus sum_n log C(m_n, y_n)."""
    from scipy.special import gammaln
    from sklearn.linear_model import LogisticRegression

    rng, x = _design(300, 1, 5)
    m = rng.integers(1, 30, size=300)
    y = rng.binomial(m, 1 / (1 + np.exp(-(0.4 - 1.2 * x[:, 0])))).astype(float)
    fit = fit_em(BinomialMixture(1, 2, trials_column=1, reg=0.0), jax.random.key(0),
                 np.c_[x, m], y, restarts=1, tol=0, max_iter=30)
    xx = np.r_[x, x]
    yy = np.r_[np.ones(300), np.zeros(300)]
    ww = np.r_[y, m - y]
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(xx, yy, sample_weight=ww)
    np.testing.assert_allclose(fit.params.coef[0, 0, 0], np.r_[ref.intercept_, ref.coef_[0]],
                               rtol=1e-6, atol=1e-8)
    p1 = ref.predict_proba(x)[:, 1]
    ll = np.sum(y * np.log(p1) + (m - y) * np.log1p(-p1)
                + gammaln(m + 1) - gammaln(y + 1) - gammaln(m - y + 1))
    np.testing.assert_allclose(float(fit.loglik), ll, rtol=1e-9)


def test_flexmix_binomial_fit_with_trials_reached(capsys):
    """flexmix's fit of cbind(successes, trials - successes) ~ x, K = 2, on 300 rows drawn with
    numpy (best of 40 starts, tests/reference/flexmix_binomial.R): log-likelihood -582.935350157,
    reached from Python to 1e-7 nats in float64 (the CLI's fit: the CLI reference test); a --trials
    column that is not a number of trials, or is the response or a covariate, is one line and exit
    code 2."""
    ref = json.loads((REFERENCE / "flexmix_binomial.json").read_text())["binomial_trials"]
    if X64:  # the 1e-7 comparison in Python
        d = pd.read_csv(REFERENCE / "binomial_trials.csv")
        m = BinomialMixture(2, n_features=2, trials_column=1, reg=0.0)
        fit = fit_em(m, jax.random.key(0), d[["x", "trials"]].values, d.successes.values,
                     restarts=8, max_iter=2000, tol=1e-14)
        assert float(fit.loglik) >= ref["loglik"] - 1e-7
        coef = np.asarray(fit.params.coef)[:, 0, 0]
        order = np.argsort(-coef[:, 0])  # flexmix's Comp.1 has the larger intercept here
        np.testing.assert_allclose(coef[order], ref["coef"], atol=2e-5)
        np.testing.assert_allclose(np.exp(np.asarray(fit.params.log_weights))[order],
                                   ref["weights"], atol=1e-6)
        return
    from conceptshift.cli import main  # refused before any fit: in process, once

    csv = str(REFERENCE / "binomial_trials.csv")
    for args, message in [(("--y", "trials", "--trials", "successes"), "--trials 'successes' must"),
                          (("--y", "successes", "--trials", "successes"), "also the response"),
                          (("--y", "successes", "--x", "x", "trials", "--trials", "trials"),
                           "also a covariate")]:
        assert main(["fit", csv, "--family", "binomial", "-k", "2", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_binomial_trials_are_checked():
    m = BinomialMixture(1, n_features=2, trials_column=1)
    x = np.c_[np.zeros(3), [2.0, 3.0, 1.0]]
    with pytest.raises(ValueError, match="successes 0..m"):
        m.batch(x, [1.0, 4.0, 0.0])
    with pytest.raises(ValueError, match="positive integer"):
        m.batch(np.c_[np.zeros(3), [2.0, 0.0, 1.0]], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="trials_column"):
        BinomialMixture(1, n_features=1, trials_column=1)
    with pytest.raises(ValueError, match="number of trials"):
        BinomialMixture(1, n_features=2, trials_column=1, expert_columns=(0, 1))

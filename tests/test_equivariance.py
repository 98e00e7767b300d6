"""Fits that are right wherever the data sit: EM runs on standardised data, so an affine map of a
covariate or of a response maps the fit exactly (the log-likelihood unchanged, or moved by
-N log|s| for a scale s of y, and of x for families that model x), in both precisions; and the
objective never falls by more than float resolution, far from the origin included."""

import csv
import functools
import importlib.util
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import X64, once, rtol
from hypothesis import given, settings
from hypothesis import strategies as st

from conceptshift._validation import PrecisionWarning
from conceptshift.inference import fit_em, fit_gem
from conceptshift.models import GatedExperts, RegressionMixture
from conceptshift.models.softmax_gated import SoftmaxGatedExperts

DTYPE = jnp.zeros((), dtype=float).dtype
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# the fitted log-likelihood in float32 is the standardised one plus N log-Jacobian terms: its
# rounding is a few ulps of the larger of the two
LL_TOL = rtol(2e-6, 1e-9)


def npreg(data_dir):
    rows = list(csv.DictReader((data_dir / "NPreg.csv").open()))
    return (np.array([float(r["x"]) for r in rows]), np.array([float(r["yn"]) for r in rows]))


def _fit(model, x, y, **kw):
    fitter = fit_gem if isinstance(model, SoftmaxGatedExperts) else fit_em
    return fitter(model, jax.random.key(0), x, y, restarts=4, max_iter=300, **kw)


def _jacobian(model, n, sx, sy):
    """What -N log|s| the fit's log-likelihood moves by under x -> a + sx x, y -> b + sy y."""
    out = -n * np.log(abs(sy))
    return out - n * np.log(abs(sx)) if model.models_x else out


MODELS = {
    "regression-1": RegressionMixture(2, degree=1),
    "regression-2": RegressionMixture(2, degree=2),
    "gated-1": GatedExperts(2, degree=1),
    "gated-2": GatedExperts(2, degree=2),
}
MAPS = [(1.0, 100.0, 1.0, 0.0), (1.0, 2000.0, 1.0, 0.0), (1.0, 1e8, 1.0, 0.0), (1e-8, 0.0, 1.0, 0.0),
        (1e8, -3.0, 1.0, 0.0), (1.0, 0.0, 1.0, 1e4), (1.0, 0.0, 1e-8, 5.0), (-3.0, 5.0, -2.0, 7.0)]


@pytest.mark.parametrize("name", list(MODELS))
def test_npreg_fit_is_equivariant_under_affine_maps(data_dir, name):
    """flexmix's NPreg: x + 100 at degree 2 fitted -701.53 against -642.53 before, x + 2000 at
    degree 1 -726.29 against -704.05; now every map gives the original optimum."""
    model = MODELS[name]
    x, y = npreg(data_dir)
    base = _fit(model, x, y)
    assert bool(base.converged) and not bool(base.degenerate)
    for sx, ax, sy, ay in MAPS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PrecisionWarning)
            fit = _fit(model, ax + sx * x, ay + sy * y)
        want = float(base.loglik) + _jacobian(model, len(y), sx, sy)
        np.testing.assert_allclose(float(fit.loglik), want, rtol=LL_TOL, atol=1e-6 * len(y),
                                   err_msg=f"x -> {ax} + {sx} x, y -> {ay} + {sy} y")
        assert np.isfinite(float(fit.bic)) and bool(fit.converged)
        # the raw parameters cannot hold a fit at x ~ 1e8 in float32, nor a quadratic's there in
        # float64 (nor, in float32, a quadratic at x + 2000 or 5 + 1e-8 y): said, not silent
        warned = any(issubclass(w.category, PrecisionWarning) for w in caught)
        if abs(ax) >= 1e8:  # x ~ 1e8: float32 loses the fit; float64 loses a quadratic's
            assert warned == (not X64 or model.degree >= 2), (sx, ax, sy, ay)
        elif X64:
            assert not warned, (sx, ax, sy, ay)


def test_npreg_reference_optimum_wherever_x_sits(data_dir):
    """The exact ML optimum of flexmix's yn ~ x + x^2 (K = 2), -642.532014, at x and x + 100."""
    x, y = npreg(data_dir)
    for shift in (0.0, 100.0, 2000.0):
        fit = _fit(MODELS["regression-2"], x + shift, y)
        np.testing.assert_allclose(float(fit.loglik), -642.532014, atol=rtol(2e-3, 2e-6))


@pytest.mark.skipif(not X64, reason="raw parameters far from the origin need float64 to compare")
@pytest.mark.parametrize("name", ["regression-2", "gated-1"])
def test_parameters_map_with_the_data(data_dir, name):
    """Not only the log-likelihood: the fitted regression function and gate move with the data."""
    model = MODELS[name]
    x, y = npreg(data_dir)
    base = _fit(model, x, y)
    sx, ax, sy, ay = -3.0, 50.0, 2.5, -40.0
    fit = _fit(model, ax + sx * x, ay + sy * y)
    xs = jnp.asarray(x[:, None])
    np.testing.assert_allclose(np.asarray(model.conditional_mean(fit.params, ax + sx * xs)),
                               ay + sy * np.asarray(model.conditional_mean(base.params, xs)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fit.params.log_weights),
                               np.asarray(base.params.log_weights), atol=1e-6)
    np.testing.assert_allclose(np.asarray(fit.params.log_scale),
                               np.asarray(base.params.log_scale) + np.log(sy), atol=1e-6)
    if model.models_x:
        np.testing.assert_allclose(np.asarray(fit.params.gate_mean),
                                   ax + sx * np.asarray(base.params.gate_mean), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(fit.params.gate_cov),
                                   sx**2 * np.asarray(base.params.gate_cov), rtol=1e-6)


def _two_lines(seed, n=150):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, n)
    z = rng.random(n) < 1 / (1 + np.exp(-2 * x))
    y = np.where(z, 1 + 2 * x, -1 - x) + 0.3 * rng.normal(size=n)
    return x, y


@functools.cache
def _base_loglik(model) -> float:
    """The fit of the untransformed data (the same for every example of the property)."""
    x, y = _two_lines(3)
    return float(_fit(model, x, y).loglik)


@pytest.mark.slow  # 17 s; the default run keeps the NPreg equivariance tests over affine maps
@once  # 2 examples x 3 families of compiles: the float32 pass (where the shifts cost most digits)
@settings(max_examples=2, deadline=None, derandomize=True)
@given(log_sx=st.floats(-8, 8), tx=st.floats(-1e8, 1e8), log_sy=st.floats(-8, 8),
       ty=st.floats(-1e8, 1e8), flip=st.booleans())
def test_equivariance_property(log_sx, tx, log_sy, ty, flip):
    """Any scale from 1e-8 to 1e8 of x and of y, and shifts up to 1e8 times the data's spread (a
    larger shift leaves float64 itself too few digits of the data), for the three families."""
    x, y = _two_lines(3)
    sx, sy = (-1.0 if flip else 1.0) * 10.0**log_sx, 10.0**log_sy
    ax, ay = abs(sx) * tx, sy * ty
    for model in (RegressionMixture(2), GatedExperts(2), SoftmaxGatedExperts(2)):
        with warnings.catch_warnings():  # float32 raw parameters far out: a PrecisionWarning
            warnings.simplefilter("ignore", PrecisionWarning)
            fit = _fit(model, ax + sx * x, ay + sy * y)
        want = _base_loglik(model) + _jacobian(model, len(y), sx, sy)
        np.testing.assert_allclose(float(fit.loglik), want, rtol=LL_TOL, atol=2e-6 * len(y),
                                   err_msg=type(model).__name__)


def test_standard_coordinates_round_trip_and_densities():
    """params_from_standard is exact: raw log-density = standardised log-density + log-Jacobian,
    and params_to_standard inverts it."""
    rng = np.random.default_rng(0)
    model = GatedExperts(2, n_features=2, degree=2)
    x = rng.normal(size=(50, 2)) * [3.0, 0.5] + [10.0, -4.0]
    y = rng.normal(size=(50, 1)) * 7.0 + 100.0
    w = np.ones(50)
    std = model.standardiser(x, y, w, xp=np)
    z, u = (x - std.x_loc) / std.x_scale, (y - std.y_loc) / std.y_scale
    params = model.init_params(jax.random.key(1))
    params = params._replace(gate_cov=params.gate_cov * 0.8 + 0.1)
    std_j = type(std)(*(jnp.asarray(a, DTYPE) for a in std))
    raw = model.params_from_standard(params, std_j)
    f = lambda a: jnp.asarray(a, DTYPE)  # noqa: E731
    got = np.asarray(model.log_likelihood(raw, f(x), f(y)), np.float64)
    want = np.asarray(model.log_likelihood(params, f(z), f(u)), np.float64) + float(
        model.log_jacobian(std_j))
    np.testing.assert_allclose(got, want, rtol=rtol(1e-4, 1e-10), atol=rtol(1e-3, 1e-9))
    back = model.params_to_standard(raw, std_j)
    for a, b in zip(back, params, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol(1e-3, 1e-9),
                                   atol=rtol(1e-3, 1e-9))


# ---------------------------------------------------------------- monotone wherever the data sit
def monotone_problem(seed: int):
    """The monotonicity benchmark's seeded problems (``benchmarks/monotone.py``), 300 rows, every
    fourth one far from the origin (x + 1e4, and y + 1e4 for some)."""
    spec = importlib.util.spec_from_file_location("monotone", BENCH / "monotone.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.problem(seed, n=300, far_every=4)


def objective_falls(fit) -> float:
    """The largest fall of the objective trace (final value included), in ulps of the objective."""
    tr = np.r_[np.asarray(fit.objective_trace, np.float64)[: int(fit.n_iter)], float(fit.objective)]
    eps = float(jnp.finfo(fit.objective.dtype).eps)
    falls = -np.diff(tr) / (eps * np.abs(tr[1:]))
    return float(falls.max()) if falls.size else 0.0


@pytest.mark.skipif(X64, reason="float32, where standardisation decides it; every family's float64 "
                                "trace is checked to 8 ulps by the contract tests")
def test_objective_never_falls_beyond_float_resolution():
    """Seeded problems, a quarter far from the origin: no clean fit's objective falls by more than
    8 ulps, and each converges, in float32 and float64 (before standardisation, 41 of 320 such
    float32 fits fell, most by over 1e6 ulps). A restart that collapses a component onto a few
    points (flagged degenerate) sits below float32's resolution and may jitter."""
    worst, unconverged = {}, []
    for seed in range(6):  # every fourth far from the origin; benchmarks/monotone.py runs 320
        model, x, y = monotone_problem(seed)
        fit = fit_em(model, jax.random.key(seed), x, y, restarts=1, max_iter=1000)
        assert np.isfinite(float(fit.loglik))
        if bool(fit.degenerate):
            continue
        worst[seed] = objective_falls(fit)
        if not bool(fit.converged):
            unconverged.append(seed)
    assert len(worst) >= 4
    bad = {s: f"{v:.0f} ulps" for s, v in worst.items() if v > 8}
    assert not bad, f"objective fell: {bad}"
    assert not unconverged, f"not converged in 1000 iterations: {unconverged}"

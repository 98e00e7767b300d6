"""The API's bad inputs as a table: each is a clear ValueError or TypeError naming the argument,
raised at the boundary (before anything is compiled); and what must be accepted is, with finite
results. The CLI's cases are in test_cli_fuzz.py."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import X64, once

from conceptshift._validation import PrecisionWarning, UnrepresentableFitError
from conceptshift.inference import fit_em, fit_gem, fit_hmm_em
from conceptshift.inference.em import _fit_em_jit
from conceptshift.inference.estimators import as_data, weak_training_ll, weak_training_sq
from conceptshift.inference.svi import fit_svi
from conceptshift.models import Basis, GatedExperts, HMMMixture, RegressionMixture, RegressionParams
from conceptshift.models.softmax_gated import SoftmaxGatedExperts

DTYPE = jnp.zeros((), dtype=float).dtype
RNG = np.random.default_rng(0)
X = RNG.uniform(-2, 2, 40)
Y = np.where(np.arange(40) % 2 == 0, 1 + X, -1 - X) + 0.2 * RNG.normal(size=40)
REG = RegressionMixture(2)
HMM = HMMMixture(2, 2, 4)
KEY = jax.random.key(0)
GOOD = RegressionParams(jnp.log(jnp.full((2,), 0.5, DTYPE)), jnp.zeros((2, 1, 2), DTYPE),
                        jnp.zeros((2, 1), DTYPE))


def _nan_at(a, i=3):
    a = np.array(a, dtype=np.float64)
    a[i] = np.nan
    return a


def _weak_data():
    class S:
        pass

    src, tgt = S(), S()
    src.x, src.y, src.y_weak = jnp.asarray(X[:, None], DTYPE), jnp.asarray(Y, DTYPE), None
    tgt.x, tgt.y, tgt.y_weak = jnp.asarray(X[:, None], DTYPE), None, jnp.asarray(Y, DTYPE)
    return as_data(src), as_data(tgt)


SRC, TGT = _weak_data()

# (id, call, exception type, pattern the message must match: it names the argument)
CASES = [
    ("nan-x", lambda: fit_em(REG, KEY, _nan_at(X), Y), ValueError, r"^x has 1 non-finite"),
    ("inf-y", lambda: fit_em(REG, KEY, X, np.where(X > 1, np.inf, Y)), ValueError, r"^y has \d+ non"),
    ("str-x", lambda: fit_em(REG, KEY, ["a"] * 40, Y), TypeError, r"^x must hold numbers"),
    ("complex-y", lambda: fit_em(REG, KEY, X, Y + 1j), TypeError, r"^y must be real"),
    ("ragged-y", lambda: fit_em(REG, KEY, X, Y[:-1]), ValueError, r"^y must have shape \(40, 1\)"),
    ("x-2d-wrong", lambda: fit_em(REG, KEY, np.c_[X, X], Y), ValueError, r"^x must have 1 column"),
    ("x-3d", lambda: fit_em(REG, KEY, X[:, None, None], Y), ValueError, r"^x must have ndim"),
    ("no-rows", lambda: fit_em(REG, KEY, X[:0], Y[:0]), ValueError, r"^x must have at least one row"),
    ("too-few-rows", lambda: fit_em(RegressionMixture(5), KEY, X[:3], Y[:3]), ValueError,
     r"fewer than n_components=5"),
    ("int-key", lambda: fit_em(REG, 0, X, Y), TypeError, r"^key must be a jax.random key"),
    ("restarts-0", lambda: fit_em(REG, KEY, X, Y, restarts=0), ValueError, r"^restarts must be >= 1"),
    ("restarts-float", lambda: fit_em(REG, KEY, X, Y, restarts=2.5), TypeError, r"^restarts must be an int"),
    ("max-iter-0", lambda: fit_em(REG, KEY, X, Y, max_iter=0), ValueError, r"^max_iter must be >= 1"),
    ("tol-neg", lambda: fit_em(REG, KEY, X, Y, tol=-1.0), ValueError, r"^tol must be >= 0"),
    ("tol-nan", lambda: fit_em(REG, KEY, X, Y, tol=float("nan")), ValueError, r"^tol must be finite"),
    ("init-name", lambda: fit_em(REG, KEY, X, Y, init="best"), ValueError, r"^init must be one of"),
    ("weights-neg", lambda: fit_em(REG, KEY, X, Y, weights=-np.ones(40)), ValueError,
     r"^weights must be >= 0"),
    ("weights-shape", lambda: fit_em(REG, KEY, X, Y, weights=np.ones(39)), ValueError,
     r"^weights must have shape \(40,\)"),
    ("weights-nan", lambda: fit_em(REG, KEY, X, Y, weights=_nan_at(np.ones(40))), ValueError,
     r"^weights has 1 non-finite"),
    ("init-params-type", lambda: fit_em(GatedExperts(2), KEY, X, Y, init_params=GOOD), TypeError,
     r"^init_params must be a GatedParams"),
    ("init-params-shape", lambda: fit_em(REG, KEY, X, Y, init_params=GOOD._replace(
        coef=jnp.zeros((2, 1, 3), DTYPE))), ValueError, r"^init_params.coef must have shape \(2, 1, 2\)"),
    ("init-params-nan", lambda: fit_em(REG, KEY, X, Y, init_params=GOOD._replace(
        log_scale=jnp.full((2, 1), jnp.nan, DTYPE))), ValueError, r"^init_params.log_scale has non-finite"),
    ("init-params-inf", lambda: fit_em(REG, KEY, X, Y, init_params=GOOD._replace(
        log_weights=jnp.asarray([0.0, -jnp.inf], DTYPE))), ValueError, r"^init_params.log_weights"),
    ("model-type", lambda: fit_em("regression", KEY, X, Y), TypeError, r"^model must be"),
    ("gem-model", lambda: fit_gem(REG, KEY, X, Y), TypeError,
     r"^model must be a family fitted by generalized EM for fit_gem; RegressionMixture is fitted by "
     r"closed_form EM \(use fit_em"),
    ("hmm-model", lambda: fit_hmm_em(REG, KEY, X[:, None].astype(int), None), TypeError,
     r"^model must provide start_params, expected_stats for fit_hmm_em"),
    ("svi-hmm-floats", lambda: fit_svi(HMM, KEY, X, Y), TypeError, r"^x must hold integer tokens"),
    ("unregistered", lambda: fit_em(object(), KEY, X, Y), TypeError,
     r"^model must be an instance of a registered family \(regression, gated, softmax, hmm"),
    ("gem-nan", lambda: fit_gem(SoftmaxGatedExperts(2), KEY, _nan_at(X), Y), ValueError, r"^x has 1"),
    ("components-0", lambda: RegressionMixture(0), ValueError, r"^n_components must be >= 1"),
    ("reg-nan", lambda: RegressionMixture(2, reg=float("nan")), ValueError, r"^reg must be finite"),
    ("degree-neg", lambda: RegressionMixture(2, degree=-1), ValueError, r"^degree must be >= 0"),
    ("covariance", lambda: GatedExperts(2, covariance="tied"), ValueError, r"^covariance must be"),
    ("lam-neg", lambda: weak_training_sq(REG, SRC, TGT, -1.0), ValueError, r"^lam must be finite and >= 0"),
    ("lam-nan", lambda: weak_training_sq(REG, SRC, TGT, float("nan")), ValueError, r"^lam must be finite"),
    ("lam-inf-ll", lambda: weak_training_ll(REG, KEY, SRC, TGT, float("inf")), ValueError, r"^lam must"),
    ("lam-str", lambda: weak_training_sq(REG, SRC, TGT, "1"), TypeError, r"^lam must be a real number"),
    ("weak-source-type", lambda: weak_training_sq(REG, (X, Y), TGT, 1.0), TypeError,
     r"^source must be a Data"),
    ("weak-missing-label", lambda: weak_training_sq(REG, TGT, TGT, 1.0), ValueError,
     r"^source.y is required"),
]
if not X64:
    CASES.append(("beyond-float32", lambda: fit_em(REG, KEY, X * 1e40, Y), ValueError,
                  r"^x has values up to 1.99e\+40.*beyond the range of float32.*JAX_ENABLE_X64"))


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_before_compiling(call, exc, pattern):
    size = _fit_em_jit._cache_size()
    with pytest.raises(exc) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)
    # refused before the fit was compiled (the model and weak-training cases never reach it: for
    # them the check only says nothing else compiled it on the way)
    assert _fit_em_jit._cache_size() == size


def test_huge_values_fit_in_float64_or_are_refused():
    """y of order 1e200 (and x of 1e150): finite fits in float64 (EM runs on standardised data, the
    log-likelihood is moved by the exact log-Jacobian); refused up front in float32."""
    if not X64:
        with pytest.raises(ValueError, match="beyond the range of float32"):
            fit_em(REG, KEY, X, Y * 1e200)
        return
    base = fit_em(REG, KEY, X, Y, restarts=2)
    fit = fit_em(REG, KEY, X * 1e150, Y * 1e200, restarts=2)
    assert np.isfinite(float(fit.loglik)) and np.isfinite(float(fit.bic))
    np.testing.assert_allclose(float(fit.loglik), float(base.loglik) - 40 * np.log(1e200), rtol=1e-9)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in fit.params)


@pytest.mark.skipif(not X64, reason="the float32 case is refused before fitting")
def test_a_fit_that_overflows_on_the_data_scale_says_so():
    """Gate covariances of x ~ 1e200 are ~1e400: beyond float64, so the fit raises, naming them."""
    with pytest.raises(UnrepresentableFitError, match=r"fitted gate_cov overflow float64"):
        fit_em(GatedExperts(2), KEY, X * 1e200, Y, restarts=2)


@pytest.mark.skipif(X64, reason="float32 raw parameters")
def test_parameters_that_lose_the_fit_on_the_data_scale_warn():
    """float32: a slope on x ~ 1e38 underflows to 0, gate variances of x ~ 1e-20 flush to 0; the
    raw parameters then describe another density: a PrecisionWarning says so (never silent). The
    same data near the origin do not warn."""
    with pytest.warns(PrecisionWarning, match="round-trip error|under- or overflow"):
        fit_em(REG, KEY, X * 1e38, Y, restarts=2)
    with pytest.warns(PrecisionWarning):
        fit_em(GatedExperts(2), KEY, X * 1e-20, Y, restarts=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        fit_em(REG, KEY, X + 10.0, Y, restarts=2)


def test_degree_34_design_is_finite():
    """The binomial coefficients of a degree-34 shift matrix exceed int32: computed as floats."""
    T = Basis(1, 34).shift_matrix(jnp.asarray([0.5], DTYPE))
    assert T.shape == (35, 35) and bool(jnp.all(jnp.isfinite(T)))
    np.testing.assert_allclose(float(T[34, 17]), 2333606220 * 0.5**17, rtol=1e-6)


@once  # precision-independent plumbing
def test_default_restarts_and_restarts_at_best():
    fit = fit_em(REG, KEY, X, Y)
    assert np.asarray(fit.restart_loglik).shape == (8,)
    assert 1 <= int(fit.restarts_at_best) <= 8
    one = fit_em(REG, KEY, X, Y, restarts=1)
    assert int(one.restarts_at_best) == 1

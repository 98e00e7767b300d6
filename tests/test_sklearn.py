"""conceptshift.sklearn: scikit-learn's own estimator checks, and the estimators in a pipeline."""

import pickle
import warnings

import numpy as np
import pytest
from conftest import once

from conceptshift.sklearn import MixtureClassifier, MixtureRegressor


def _lines(n=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 1))
    k = rng.integers(0, 2, n)
    y = np.where(k == 0, 2 * X[:, 0], -2 * X[:, 0] + 3) + 0.1 * rng.normal(size=n)
    return X, y


@pytest.mark.slow  # about 80 s each: every check fits again at new shapes
@pytest.mark.parametrize("est", [MixtureRegressor(2, n_init=2, max_iter=50),
                                 MixtureClassifier(2, n_init=2, max_iter=50)],
                         ids=["regressor", "classifier"])
@once  # the estimators compute in float64 whatever JAX's mode
def test_check_estimator(est):
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OptimumWarning on the checks' tiny data sets
        check_estimator(est)


@once  # float64 inside the estimator in either mode
def test_regressor_recovers_lines_and_works_in_sklearn_tools():
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    X, y = _lines()
    reg = MixtureRegressor(2, random_state=0).fit(X, y)
    np.testing.assert_allclose(np.sort(reg.coef_[:, 1]), [-2.0, 2.0], atol=0.05)
    np.testing.assert_allclose(reg.weights_.sum(), 1.0, rtol=1e-12)
    assert reg.converged_ and reg.n_features_in_ == 1
    # the mean of two crossing lines: E[y | x] = pi_0 2x + pi_1 (3 - 2x)
    assert reg.predict(X).shape == (300,) and reg.sample(X, random_state=1).shape == (300,)
    ll = reg.log_likelihood(X, y)
    assert reg.bic(X, y) == pytest.approx(-2 * ll.sum() + reg.model_.n_params * np.log(300))
    assert reg.aic(X, y) < reg.bic(X, y)
    again = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(again.predict(X), reg.predict(X))
    assert clone(reg).get_params() == reg.get_params()
    scores = cross_val_score(MixtureRegressor(2, n_init=2, random_state=0), X, y, cv=3)
    assert scores.shape == (3,) and np.all(np.isfinite(scores))
    with pytest.raises(ValueError, match="gate"):
        MixtureRegressor(2, gate="sigmoid").fit(X, y)
    with pytest.raises(ValueError, match="n_init"):
        MixtureRegressor(2, n_init=0).fit(X, y)


@pytest.mark.slow  # 6 s; check_estimator checks it too (slow)
@once
def test_sample_weight_is_repetition():
    """Weights of 2 (and 0) equal repeated (and removed) rows to 1e-9, random starts included:
    EM sees the distinct rows with their summed weights either way."""
    X, y = _lines(120, seed=3)
    w = np.where(np.arange(120) % 3 == 0, 2.0, 1.0)
    w[::10] = 0.0
    rep = np.repeat(np.arange(120), w.astype(int))
    a = MixtureRegressor(2, random_state=0, n_init=4).fit(X, y, sample_weight=w)
    b = MixtureRegressor(2, random_state=0, n_init=4).fit(X[rep], y[rep])
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-9, atol=1e-9)


@pytest.mark.slow  # 4 s; check_estimator covers its contract too (slow)
@once
def test_classifier_predicts_classes_and_probabilities():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 2))
    k = rng.integers(0, 2, 400)
    logit = np.where(k == 0, 3 * X[:, 0], -3 * X[:, 1])
    y = np.where(rng.random(400) < 1 / (1 + np.exp(-logit)), "yes", "no")
    clf = MixtureClassifier(2, random_state=0).fit(X, y)
    p = clf.predict_proba(X)
    assert list(clf.classes_) == ["no", "yes"] and p.shape == (400, 2)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
    assert set(clf.predict(X)) <= {"no", "yes"} and 0.6 < clf.score(X, y) <= 1.0
    with pytest.raises(ValueError, match="2 classes"):
        MixtureClassifier(2).fit(X, np.zeros(400))

"""scikit-learn estimators: mixtures of regressions and of classifiers that pipelines, grid search,
cross-validation and ``clone`` accept.

- :class:`MixtureRegressor`: y | x ~ sum_k p(k | x) N(Phi(x) . beta_k, sigma_k^2), with a constant
  gate (a mixture of regressions, flexmix's ``FLXMRglm``), a Gaussian gate on x, or a softmax gate
  (concomitant variables). ``predict`` is the conditional mean E[y | x].
- :class:`MixtureClassifier`: p(y = c | x) = sum_k p(k | x) softmax_c(x . B_k), a mixture of
  logistic (two classes) or multinomial regressions with a constant gate. ``predict_proba`` is the
  mixture's class probabilities.

Both fit by EM with ``n_init`` restarts (:func:`~conceptshift.inference.fit_em`) in float64 (JAX's
x64 mode, inside the estimator only), seeded by ``random_state``; ``warm_start=True`` starts the
next ``fit`` from the current parameters. EM sees the distinct rows with their summed weights
(rows of weight 0 dropped), so ``sample_weight`` is exactly repetition, random starts included.
Fitted attributes are numpy arrays (they pickle).
scikit-learn itself is needed (``pip install conceptshift[sklearn]``); the tests run
``sklearn.utils.estimator_checks.check_estimator`` on both.
"""

from __future__ import annotations

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import (
        _check_sample_weight,
        check_is_fitted,
        check_random_state,
        validate_data,
    )
except ImportError as err:  # pragma: no cover - exercised without scikit-learn only
    raise ImportError("conceptshift.sklearn needs scikit-learn >= 1.6: pip install "
                      "'conceptshift[sklearn]'") from err

GATES = ("constant", "gaussian", "softmax")


def _float64():
    import jax

    ctx = getattr(jax, "enable_x64", None)
    if ctx is not None:
        return ctx(True)
    from jax.experimental import enable_x64  # older JAX

    return enable_x64()


def _collapse(X, y, w):
    """The distinct (x, y) rows with their summed weights, rows of weight 0 dropped, in sorted
    order: EM's likelihood is the same, and its random starts draw from these rows, so a sample
    with repeated rows and one with the same rows weighted by their counts give the same fit."""
    keep = w > 0
    data = np.column_stack([X[keep], y[keep]])
    uniq, inverse = np.unique(data, axis=0, return_inverse=True)
    weights = np.bincount(inverse.reshape(-1), weights=w[keep], minlength=len(uniq))
    return uniq[:, :-1], uniq[:, -1], weights


def _to_numpy(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.asarray(a).dtype), tree)


class _MixtureBase(BaseEstimator):
    """What the two estimators share: EM with restarts, warm starts, information criteria."""

    def _check_common(self):
        for name in ("n_components", "n_init", "max_iter"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.tol, int | float | np.floating) or not self.tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")

    def _seed(self):
        import jax

        rs = check_random_state(self.random_state)
        return jax.random.key(int(rs.randint(0, 2**31 - 1)))

    def _distinct_rows(self, X, y, sample_weight):
        """:func:`_collapse` of the validated data, with at least ``n_components`` rows left."""
        sw = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        Xc, yc, wc = _collapse(X, y, sw)
        if len(Xc) < self.n_components:
            raise ValueError(f"n_components={self.n_components} exceeds the {len(Xc)} distinct "
                             f"samples of positive weight")
        return Xc, yc, wc

    def _fit_em(self, model, X, y, sample_weight):
        from .inference import fit_em

        warm = self.warm_start and getattr(self, "params_", None) is not None \
            and getattr(self, "model_", None) == model
        kw = {"init_params": self.params_} if warm else {"restarts": int(self.n_init)}
        with _float64():
            fit = fit_em(model, self._seed(), X, y, weights=sample_weight, max_iter=int(self.max_iter),
                         tol=float(self.tol), **kw)
            self.params_ = _to_numpy(fit.params)
        self.model_ = model
        self.converged_ = bool(fit.converged)
        self.n_iter_ = int(fit.n_iter)
        self.lower_bound_ = float(fit.loglik)  # the total log-likelihood reached
        self.restarts_at_best_ = int(fit.restarts_at_best)
        self.weights_ = np.exp(np.asarray(self.params_.log_weights, np.float64))
        return self

    def _loglik(self, X, y) -> np.ndarray:
        with _float64():
            return np.asarray(self.model_.log_likelihood(self.params_, X, y.reshape(-1, 1)), np.float64)

    def log_likelihood(self, X, y) -> np.ndarray:
        """log p(y | x) per row (log p(x, y) for a Gaussian gate, which models x too)."""
        check_is_fitted(self)
        X, y = self._check_xy(X, y)
        return self._loglik(X, y)

    def _n_params(self) -> int:
        return int(self.model_.n_params)

    def bic(self, X, y) -> float:
        """-2 log-likelihood + (free parameters) log n on (X, y): lower is better."""
        return float(-2 * np.sum(self.log_likelihood(X, y)) + self._n_params() * np.log(len(X)))

    def aic(self, X, y) -> float:
        """-2 log-likelihood + 2 (free parameters) on (X, y): lower is better."""
        return float(-2 * np.sum(self.log_likelihood(X, y)) + 2 * self._n_params())


class MixtureRegressor(RegressorMixin, _MixtureBase):
    """A mixture of polynomial regressions fitted by EM.

    Args:
      n_components: K, the number of regression lines.
      gate: ``"constant"`` (p(k | x) = pi_k, a mixture of regressions), ``"gaussian"`` (p(k | x)
        from a Gaussian mixture on x, which the fit models too) or ``"softmax"`` (p(k | x) =
        softmax(b + W x)).
      degree: polynomial degree of each line in x.
      n_init: EM restarts; the best log-likelihood is kept.
      max_iter, tol: EM's iteration cap and relative tolerance on its objective.
      random_state: seed (int, ``RandomState`` or None) of the restarts.
      warm_start: start a further ``fit`` from the current parameters (one run).

    Attributes (after ``fit``): ``coef_`` (K, P) intercept first, ``scale_`` (K,) noise standard
    deviations, ``weights_`` (K,) the proportions, ``params_`` (the family's parameters),
    ``converged_``, ``n_iter_``, ``lower_bound_`` (log-likelihood), ``restarts_at_best_``,
    ``n_features_in_``.

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> X = rng.normal(size=(400, 1)); k = rng.integers(0, 2, 400)
      >>> y = np.where(k == 0, 2 * X[:, 0], -2 * X[:, 0] + 3) + 0.1 * rng.normal(size=400)
      >>> reg = MixtureRegressor(2, random_state=0).fit(X, y)
      >>> np.sort(reg.coef_[:, 1]).round(1)
      array([-2.,  2.])
    """

    def __init__(self, n_components: int = 2, *, gate: str = "constant", degree: int = 1,
                 n_init: int = 8, max_iter: int = 500, tol: float = 1e-8, random_state=None,
                 warm_start: bool = False):
        self.n_components = n_components
        self.gate = gate
        self.degree = degree
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.warm_start = warm_start

    def _family(self, n_features: int):
        from .models import GatedExperts, RegressionMixture, SoftmaxGatedExperts

        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if not isinstance(self.degree, int | np.integer) or isinstance(self.degree, bool) \
                or not 0 <= self.degree <= 10:
            raise ValueError(f"degree must be an integer in [0, 10], got {self.degree!r}")
        cls = {"constant": RegressionMixture, "gaussian": GatedExperts,
               "softmax": SoftmaxGatedExperts}[self.gate]
        return cls(int(self.n_components), n_features, degree=int(self.degree))

    def _check_xy(self, X, y):
        return validate_data(self, X, y, y_numeric=True, dtype=np.float64, reset=False)

    def fit(self, X, y, sample_weight=None):
        """Fits the mixture to (X, y) by EM; ``sample_weight`` per row (optional)."""
        self._check_common()
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        model = self._family(X.shape[1])
        self._fit_em(model, *self._distinct_rows(X, y, sample_weight))
        self.coef_ = np.asarray(self.params_.coef, np.float64)[:, 0, :]
        self.scale_ = np.exp(np.asarray(self.params_.log_scale, np.float64))[:, 0]
        return self

    def predict(self, X) -> np.ndarray:
        """The conditional mean E[y | x] = sum_k p(k | x) Phi(x) . beta_k, (n,)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        with _float64():
            return np.asarray(self.model_.conditional_mean(self.params_, X), np.float64)

    def sample(self, X, random_state=None) -> np.ndarray:
        """One draw of y ~ p(y | x) for each row of X, (n,)."""
        import jax

        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
        with _float64():
            return np.asarray(self.model_.sample_conditional(jax.random.key(seed), self.params_, X),
                              np.float64)[:, 0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


class MixtureClassifier(ClassifierMixin, _MixtureBase):
    """A mixture of logistic (two classes) or multinomial regressions fitted by EM, constant gate:
    p(y = c | x) = sum_k pi_k softmax_c(x . B_k).

    Args: as :class:`MixtureRegressor` (without ``gate`` and ``degree``: the experts are linear in
    x).

    Attributes (after ``fit``): ``classes_``, ``coef_`` (K, C - 1, P) intercept first (class 0 is
    the reference), ``weights_``, ``params_``, ``converged_``, ``n_iter_``, ``lower_bound_``,
    ``restarts_at_best_``, ``n_features_in_``.
    """

    def __init__(self, n_components: int = 2, *, n_init: int = 8, max_iter: int = 500,
                 tol: float = 1e-8, random_state=None, warm_start: bool = False):
        self.n_components = n_components
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.warm_start = warm_start

    def _family(self, n_features: int, n_classes: int):
        from .models import CategoricalMixture, LogisticMixture

        if n_classes == 2:
            return LogisticMixture(int(self.n_components), n_features)
        return CategoricalMixture(int(self.n_components), n_features, n_classes=n_classes)

    def _check_xy(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64, reset=False)
        return X, self._encode(y)

    def _encode(self, y):
        idx = np.searchsorted(self.classes_, y)
        idx = np.clip(idx, 0, len(self.classes_) - 1)
        if not np.all(self.classes_[idx] == y):
            raise ValueError("y contains labels not seen in fit")
        return idx.astype(np.int32)

    def fit(self, X, y, sample_weight=None):
        """Fits the mixture to (X, y) by EM; ``sample_weight`` per row (optional)."""
        self._check_common()
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"MixtureClassifier needs samples of at least 2 classes in the data, "
                             f"got 1 class: {self.classes_[0]!r}")
        model = self._family(X.shape[1], len(self.classes_))
        Xc, yc, wc = self._distinct_rows(X, yi.astype(np.float64), sample_weight)
        if len(np.unique(yc)) < 2:
            raise ValueError("MixtureClassifier needs samples of at least 2 classes among the rows of "
                             "positive weight, got 1")
        self._fit_em(model, Xc, yc.astype(np.int32), wc)
        self.coef_ = np.asarray(self.params_.coef, np.float64)[:, 0]
        return self

    def predict_proba(self, X) -> np.ndarray:
        """p(y = c | x) for each class of ``classes_``, (n, C)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        with _float64():
            lp = self.model_.conditional_log_probs(self.params_, X)
        return np.exp(np.asarray(lp, np.float64))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def sample(self, X, random_state=None) -> np.ndarray:
        """One draw of y ~ p(y | x) for each row of X, in the labels of ``classes_``."""
        check_is_fitted(self)
        p = self.predict_proba(X)
        rs = check_random_state(random_state)
        u = rs.random_sample(len(p))[:, None]
        return self.classes_[np.minimum((np.cumsum(p, axis=1) < u).sum(1), len(self.classes_) - 1)]


__all__ = ["MixtureClassifier", "MixtureRegressor"]

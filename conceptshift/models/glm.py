"""Mixtures of generalized linear experts for discrete responses: Bernoulli (logit link), binomial
(logit link, a number of trials per row), categorical (softmax over C classes) and Poisson (log link),
with a constant, Gaussian or softmax gate, one file on the family protocol.

Component k has proportion pi_k and, for each head h (the strong label y, the weak label y', ...), a
linear predictor on the design Phi(x) = (1, x_1, .., x_D) (intercept first):

  bernoulli    p(y = 1 | x, k) = sigmoid(Phi(x) . beta_kh)
  binomial     y | x, k ~ Binomial(m, sigmoid(Phi(x) . beta_kh)), the trials m a column of x
               (``trials_column``; flexmix's cbind(successes, failures) ~ x), or a constant ``trials_per_row``
  categorical  p(y = c | x, k) = softmax_c(0, Phi(x) . beta_kh1, .., Phi(x) . beta_kh(C-1))  (class 0 the
               reference)
  poisson      y | x, k ~ Poisson(exp(Phi(x) . beta_kh))

so ``coef`` has shape (K, H, R, P) with R = 1 (Bernoulli, binomial, Poisson) or C - 1 (categorical)
linear predictors per head and P = 1 + D (the experts read the columns ``expert_columns`` of x, default
all but a binomial's trials column).

The gate p(k | x) = softmax_k(log pi_k + f_k(x)) reads the columns ``gate_columns`` of x, u (default
all):

  constant   f_k = 0: p(k | x) = pi_k; the likelihood is log p(y | x)                 (GLMParams)
  softmax    f_k = W_k . u, flexmix's concomitant model (FLXPmultinom): log_weights holds the offsets
             b (logsumexp(b) = 0), W (K, G) the slopes (sum_k W_k = 0); log p(y | x) (GLMSoftmaxParams)
  gaussian   f_k = log N(u; m_k, S_k), a cluster-weighted model: the likelihood is the joint
             log p(u, y | rest of x) = log sum_k pi_k N(u; m_k, S_k) p(y | x, k)   (GLMGaussianParams)

EM (``em_kind = "responsibilities"``, the protocol's generic driver): the E-step is the posterior over k
of :meth:`batch_component_log_probs`; the M-step sets the proportions in closed form and maximises, for
every component and head, the responsibility-weighted log-likelihood minus a ridge (reg / 2) |beta|^2
by ``newton_steps`` Newton steps from the current coefficients (the problem is concave), each with step
halving: a step is taken only if it does not lower that objective, so EM's objective (log-likelihood plus
log prior) never decreases (a generalized EM). The prior: Dirichlet(1 + reg) on the proportions and
N(0, 1 / reg) on every coefficient (the ridge); ``reg = 0`` is the maximum-likelihood fit (flexmix's
``FLXMRglm``), which can run off to infinity on separable data. The gates' M-steps: the Gaussian gate's
means and covariances in closed form, S_k = (scatter_k + nu I) / (N_k + nu) with nu = max(reg, 1e-6)
(the MAP of an inverse-Wishart-like prior, which keeps S_k positive definite); the softmax gate's (b, W)
by the same safeguarded Newton steps on sum_n w_n sum_k r_nk log p(k | x_n) - reg / 2 |W|^2, in the
subspace sum_k W_k = 0 (the softmax's common shift is not identified).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import Array
from jax.scipy.special import gammaln, logsumexp
from numpyro.distributions import constraints

from .. import _precision as _p
from .._validation import as_float_array, check_float, check_int, float_dtype, is_traced
from .batch import Batch, TableRows

MAX_ETA = 60.0  # log-link predictors are clipped here: exp(60) ~ 1e26 counts, finite in float32
HALVINGS = 12  # step sizes 1, 1/2, .., 2^-12 are tried in each Newton step


class GLMParams(NamedTuple):
    """A constant gate's parameters."""

    log_weights: Array  # (K,) log pi_k
    coef: Array  # (K, H, R, P): R linear predictors per head on the design (intercept first)

    @property
    def weights(self) -> Array:
        return jax.nn.softmax(self.log_weights)


class GLMSoftmaxParams(NamedTuple):
    """A softmax gate's parameters: p(k | x) = softmax_k(b + W u)."""

    log_weights: Array  # (K,) gate offsets b, logsumexp(b) = 0 (the proportions at u = 0)
    coef: Array  # (K, H, R, P)
    gate_weights: Array  # (K, G) gate slopes W, sum_k W_k = 0

    @property
    def weights(self) -> Array:
        return jax.nn.softmax(self.log_weights)


class GLMGaussianParams(NamedTuple):
    """A Gaussian gate's parameters: p(k | x) proportional to pi_k N(u; m_k, S_k)."""

    log_weights: Array  # (K,) log pi_k
    coef: Array  # (K, H, R, P)
    gate_mean: Array  # (K, G) m_k
    gate_cov: Array  # (K, G, G) S_k

    @property
    def weights(self) -> Array:
        return jax.nn.softmax(self.log_weights)


GATES = ("constant", "gaussian", "softmax")


def _xlogx(a: Array) -> Array:
    """a log a, 0 at a = 0."""
    return jnp.where(a > 0, a * jnp.log(jnp.where(a > 0, a, 1.0)), 0.0)


def _safeguarded_newton(value_grad_hess, beta0: Array, n_steps: int) -> Array:
    """``n_steps`` Newton steps on B independent concave problems at once, each with step halving:
    for every problem the largest step 1, 1/2, .., 2^-HALVINGS that does not lower its objective is
    taken (none if every one would, or if the step's predicted gain is below the objective's
    rounding).

    ``value_grad_hess(beta)`` maps beta (B, M) to the B objectives (B,), their gradients (B, M) and
    Hessians (B, M, M), from one pass over the data. Every trial point is evaluated with its
    gradient and Hessian, so the accepted trial (usually the first, the full step) provides the next
    step's: an M-step reads the data 1 + n_steps times, not 1 + 2 n_steps. The problems share each
    pass (a family's components read the rows once, not once each), and the trials stop when every
    problem has accepted a step."""
    dtype = beta0.dtype
    eye = jnp.eye(beta0.shape[1], dtype=dtype)
    eps = jnp.finfo(dtype).eps

    def one(carry, _):
        beta, f0, g0, h0 = carry
        scale = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(h0, axis1=1, axis2=2)), axis=1),
                            jnp.finfo(dtype).tiny)
        d = jnp.linalg.solve(h0 - 1e-10 * scale[:, None, None] * eye[None], -g0[..., None])[..., 0]
        d = jnp.where(jnp.all(jnp.isfinite(d), axis=1, keepdims=True), d, 0.0)  # ascent directions
        # a step whose predicted gain g.d is below the objective's rounding is not tried (near the
        # optimum the sign of so small a change is noise: halving would only repeat the evaluation)
        negligible = jnp.sum(g0 * d, axis=1) <= eps * jnp.abs(f0)

        def trial(c):
            i, t, f, g, h, ok = c
            step = jnp.asarray(2.0, dtype) ** -i.astype(dtype)
            v, gv, hv = value_grad_hess(beta + step * d)
            take = ~ok & jnp.isfinite(v) & (v >= f0)
            return (i + 1, jnp.where(take, step, t), jnp.where(take, v, f),
                    jnp.where(take[:, None], gv, g), jnp.where(take[:, None, None], hv, h), ok | take)

        start = (jnp.zeros((), jnp.int32), jnp.zeros(f0.shape, dtype), f0, g0, h0, negligible)
        _, t, f, g, h, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[-1]) & (c[0] <= HALVINGS),
                                              trial, start)
        # f, g, h: the objective and its derivatives where the step lands (the accepted trial's)
        return (beta + t[:, None] * d, f, g, h), None

    (beta, *_), _ = jax.lax.scan(one, (beta0, *value_grad_hess(beta0)), None, length=n_steps)
    return beta


GATE_NU = 1e-6  # the Gaussian gate covariance's prior weight when reg is smaller
SEPARATED_NLL = 1e-4  # a component whose rows' labels it predicts this surely is degenerate (nats)


@dataclass(frozen=True)
class GLMExperts(TableRows):
    """A K-component mixture of generalized linear experts with a constant gate (module docs); use a
    concrete family: :class:`LogisticMixture`, :class:`CategoricalMixture` or
    :class:`PoissonRegressionMixture`.

    Args:
      n_components: K.
      n_features: D, covariates (0: intercepts only).
      n_heads: H, responses per row sharing the component (the strong y and the weak y').
      n_classes: C, classes of a categorical response (2 for the Bernoulli family).
      reg: the ridge reg / 2 |beta|^2 and Dirichlet(1 + reg) prior (0: maximum likelihood).
      newton_steps: Newton steps per M-step.
      gate: ``"constant"``, ``"gaussian"`` or ``"softmax"`` (module docs).
      gate_columns: the columns of x the gate reads (indices; None: all).
      expert_columns: the columns of x the experts' design reads (indices; None: all).
    """

    n_components: int
    n_features: int = 1
    n_heads: int = 1
    n_classes: int = 2
    reg: float = 1e-6
    newton_steps: int = 3
    gate: str = "constant"
    gate_columns: tuple[int, ...] | None = None
    expert_columns: tuple[int, ...] | None = None

    response: ClassVar[str] = ""

    def __post_init__(self):
        check_int("n_components", self.n_components, minimum=1)
        check_int("n_features", self.n_features, minimum=0)
        check_int("n_heads", self.n_heads, minimum=1)
        check_int("n_classes", self.n_classes, minimum=2)
        check_float("reg", self.reg, nonnegative=True)
        check_int("newton_steps", self.newton_steps, minimum=1)
        if not self.response:
            raise TypeError("GLMExperts is abstract: use LogisticMixture, BinomialMixture, "
                            "CategoricalMixture or PoissonRegressionMixture")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(map(repr, GATES))}, got {self.gate!r}")
        for name in ("gate_columns", "expert_columns"):
            object.__setattr__(self, name, self._columns(name, getattr(self, name)))
        if self.gate != "constant" and not self.gate_cols:
            raise ValueError(f"a {self.gate} gate reads x: it needs n_features >= 1 and at least one "
                             f"gate column, got n_features={self.n_features}, "
                             f"gate_columns={self.gate_columns}")

    def _columns(self, name: str, cols):
        if cols is None:
            return None
        if isinstance(cols, (str, bytes)) or not hasattr(cols, "__iter__"):
            raise TypeError(f"{name} must be a sequence of column indices of x, got {cols!r}")
        out = tuple(cols)
        for c in out:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise TypeError(f"{name} must hold integer column indices, got {c!r}")
        out = tuple(int(c) for c in out)
        if any(not 0 <= c < self.n_features for c in out) or len(set(out)) != len(out):
            raise ValueError(f"{name} must hold distinct indices in 0..{self.n_features - 1} (the "
                             f"columns of x, n_features={self.n_features}), got {out}")
        if set(out) & set(self.reserved_columns):
            raise ValueError(f"{name} must not hold column {self.reserved_columns[0]}: it holds the "
                             f"number of trials, got {out}")
        return out

    @property
    def reserved_columns(self) -> tuple[int, ...]:
        """Columns of x that are neither the gate's nor the experts' (a binomial's trials)."""
        return ()

    def trials(self, x: Array) -> Array | None:
        """The number of trials of each row, (N,) (binomial responses; None otherwise)."""
        return None

    @property
    def gate_cols(self) -> tuple[int, ...]:
        """The columns of x the gate reads."""
        if self.gate_columns is None:
            return tuple(c for c in range(self.n_features) if c not in self.reserved_columns)
        return self.gate_columns

    @property
    def expert_cols(self) -> tuple[int, ...]:
        """The columns of x the experts' design reads."""
        if self.expert_columns is None:
            return tuple(c for c in range(self.n_features) if c not in self.reserved_columns)
        return self.expert_columns

    # ------------------------------------------------------------------ bookkeeping
    em_kind: ClassVar[str] = "responsibilities"

    @property
    def n_predictors(self) -> int:
        """R, linear predictors per head."""
        return self.n_classes - 1 if self.response == "categorical" else 1

    @property
    def n_coef(self) -> int:
        """P = 1 + the experts' covariates."""
        return 1 + len(self.expert_cols)

    @property
    def models_x(self) -> bool:
        """Whether the likelihood includes the gate covariates' density (the Gaussian gate)."""
        return self.gate == "gaussian"

    def n_gate_params(self) -> int:
        """The gate's free parameters beyond the K - 1 proportions."""
        K, G = self.n_components, len(self.gate_cols)
        if self.gate == "softmax":
            return (K - 1) * G
        if self.gate == "gaussian":
            return K * (G + G * (G + 1) // 2)
        return 0

    @property
    def n_params(self) -> int:
        """Free parameters (for BIC)."""
        K = self.n_components
        return (K - 1) + K * self.n_heads * self.n_predictors * self.n_coef + self.n_gate_params()

    def gate_fields(self) -> tuple[str, ...]:
        """The parameter fields of the gate beyond ``log_weights``."""
        return {"constant": (), "softmax": ("gate_weights",),
                "gaussian": ("gate_mean", "gate_cov")}[self.gate]

    def with_heads(self, n_heads: int):
        return dataclasses.replace(self, n_heads=n_heads)

    def select_heads(self, params: GLMParams, heads) -> GLMParams:
        return params._replace(coef=params.coef[:, jnp.asarray(heads, jnp.int32).reshape(-1)])

    def permute(self, params: GLMParams, perm) -> GLMParams:
        """Component k of the result is component perm[k] of ``params``."""
        perm = jnp.asarray(perm)
        return jax.tree_util.tree_map(lambda a: a[perm], params)

    # ------------------------------------------------------------------ data
    def _check_y(self, y) -> None:
        """Refuses responses the family cannot have generated (concrete arrays only)."""
        if is_traced(y):
            return
        v = np.asarray(y)
        whole = np.all(v == np.round(v))
        if self.response == "bernoulli" and not np.all((v == 0) | (v == 1)):
            bad = v[(v != 0) & (v != 1)].ravel()[0]
            raise ValueError(f"y must hold 0 or 1 for a Bernoulli (logistic) family, got {bad:g}")
        if self.response == "binomial" and not (whole and np.all(v >= 0)):
            bad = v[(v < 0) | (v != np.round(v))].ravel()[0]
            raise ValueError(f"y must hold numbers of successes (non-negative integers) for a "
                             f"binomial family, got {bad:g}")
        if self.response == "poisson" and not (whole and np.all(v >= 0)):
            bad = v[(v < 0) | (v != np.round(v))].ravel()[0]
            raise ValueError(f"y must hold non-negative integer counts for a Poisson family, got {bad:g}")
        if self.response == "categorical" and not (whole and np.all((v >= 0) & (v < self.n_classes))):
            bad = v[(v < 0) | (v >= self.n_classes) | (v != np.round(v))].ravel()[0]
            raise ValueError(f"y must hold class labels 0..{self.n_classes - 1} (n_classes="
                             f"{self.n_classes}), got {bad:g}")

    def _check_y_given_x(self, x, y) -> None:
        """Checks of y that need x (a binomial's y <= trials); none here."""

    def check_data(self, x, y=None, weights=None):
        """(x (N, D), y (N, H) or None, weights (N,)) as arrays of the working dtype, validated:
        x may be (N,) when D == 1 and None when D == 0; y (N,) when H == 1."""
        if x is None:
            if self.n_features:
                raise TypeError(f"x must be an array of shape (N, {self.n_features}), got None")
            if y is None:
                raise TypeError("y is required when x is None")
            n = np.shape(y)[0]
            x = np.zeros((n, 0))
        x = as_float_array("x", x, ndim=(1, 2))
        if x.ndim == 1:
            if self.n_features != 1:
                raise ValueError(f"x has shape {x.shape}; expected (N, {self.n_features})")
            x = x[:, None]
        if x.shape[1] != self.n_features:
            raise ValueError(f"x must have {self.n_features} column(s) (n_features), got {x.shape}")
        n = x.shape[0]
        if n < 1:
            raise ValueError("x must have at least one row")
        dtype = x.dtype
        if y is not None:
            y = as_float_array("y", y, ndim=(1, 2))
            if y.ndim == 1:
                if self.n_heads != 1:
                    raise ValueError(f"y has shape {y.shape}; expected (N, {self.n_heads})")
                y = y[:, None]
            if y.shape != (n, self.n_heads):
                raise ValueError(f"y must have shape ({n}, {self.n_heads}), got {y.shape}")
            self._check_y(y)
            self._check_y_given_x(x, y)
            y = jnp.asarray(y, dtype)
        if weights is None:
            w = jnp.ones((n,), dtype)
        else:
            w = jnp.asarray(as_float_array("weights", weights, ndim=1), dtype)
            if w.shape != (n,):
                raise ValueError(f"weights must have shape ({n},), got {w.shape}")
            if not is_traced(w) and (bool(jnp.any(w < 0)) or not bool(jnp.sum(w) > 0)):
                raise ValueError("weights must be >= 0 with a positive sum")
        return jnp.asarray(x, dtype), y, w

    def batch(self, x, y=None, weights=None) -> Batch:
        """The protocol's batch, validated (:meth:`check_data`); y is required."""
        if y is None:
            raise TypeError(f"y must be an array of responses (N, {self.n_heads}), got None")
        return Batch(*self.check_data(x, y, weights))

    def covariates(self, x) -> Array:
        """``x`` alone, validated (what a parametric-bootstrap data set keeps)."""
        return self.check_data(x)[0]

    def design(self, x: Array) -> Array:
        """Phi(x) = (1, x[:, expert_columns]), (N, P)."""
        x = jnp.asarray(x)  # numpy input in the working precision
        full = self.expert_columns is None and not self.reserved_columns
        cols = x if full else x[:, list(self.expert_cols)]
        return jnp.concatenate([jnp.ones(x.shape[:1] + (1,), x.dtype), cols], axis=1)

    def gate_x(self, x: Array) -> Array:
        """u = x[:, gate_columns], (N, G)."""
        x = jnp.asarray(x)
        full = self.gate_columns is None and not self.reserved_columns
        return x if full else x[:, list(self.gate_cols)]

    # ------------------------------------------------------------------ density
    def linear_predictors(self, params: GLMParams, x: Array) -> Array:
        """eta (N, K, H, R) = Phi(x) . beta_khr."""
        return _p.einsum("np,khrp->nkhr", self.design(x), params.coef)

    def _head_log_probs(self, eta: Array, y: Array, constant: bool = True,
                        trials: Array | None = None) -> Array:
        """log p(y_h | eta_h) summed over nothing: (N, K, H) for eta (N, K, H, R), y (N, H) (labels
        of any numeric dtype); ``constant=False`` leaves out the Poisson's -log y! and the
        binomial's log C(m, y) (free of eta); ``trials`` (N,): a binomial's m."""
        yk = y[:, None, :].astype(eta.dtype)
        if self.response == "bernoulli":
            e = eta[..., 0]
            return yk * e - jax.nn.softplus(e)
        if self.response == "binomial":
            e, m = eta[..., 0], trials[:, None, None].astype(eta.dtype)
            log_choose = gammaln(m + 1) - gammaln(yk + 1) - gammaln(m - yk + 1) if constant else 0.0
            return yk * e - m * jax.nn.softplus(e) + log_choose
        if self.response == "poisson":
            e = jnp.minimum(eta[..., 0], MAX_ETA)
            return yk * e - jnp.exp(e) - (gammaln(yk + 1) if constant else 0.0)
        logits = self._class_logits(eta)  # (N, K, H, C)
        idx = jnp.broadcast_to(yk, logits.shape[:-1]).astype(jnp.int32)[..., None]
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), idx, axis=-1)[..., 0]

    @staticmethod
    def _class_logits(eta: Array) -> Array:
        return jnp.concatenate([jnp.zeros(eta.shape[:-1] + (1,), eta.dtype), eta], axis=-1)

    def head_log_probs(self, params: GLMParams, x: Array, y: Array) -> Array:
        """log p(y_nh | x_n, k) for every row, component and head, (N, K, H)."""
        return self._head_log_probs(self.linear_predictors(params, x), y, trials=self.trials(x))

    def _gaussian_gate_log_probs(self, params: GLMGaussianParams, u: Array) -> Array:
        """log N(u_n; m_k, S_k), (N, K), through the Cholesky factors of S_k."""
        G = u.shape[1]
        chol = jnp.linalg.cholesky(params.gate_cov)  # (K, G, G)
        diff = u[None, :, :] - params.gate_mean[:, None, :]  # (K, N, G)
        z = jax.scipy.linalg.solve_triangular(chol, jnp.swapaxes(diff, 1, 2), lower=True)  # (K, G, N)
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)  # (K,)
        maha = jnp.sum(z * z, axis=1)  # (K, N)
        return (-0.5 * maha - half_logdet[:, None] - 0.5 * G * jnp.log(2 * jnp.pi)).T

    def gate_log_terms(self, params, x: Array) -> Array:
        """f_k(x), (N, K): p(k | x) = softmax_k(log pi_k + f_k(x)) (module docs)."""
        if self.gate == "softmax":
            return _p.mm(self.gate_x(x), params.gate_weights.T)
        if self.gate == "gaussian":
            return self._gaussian_gate_log_probs(params, self.gate_x(x))
        return jnp.zeros(x.shape[:1] + params.log_weights.shape, params.coef.dtype)

    def gate_component_log_probs(self, params, x: Array) -> Array:
        """The gate's part of the E-step, (N, K): log pi_k (constant gate), log p(k | x) (softmax
        gate), log pi_k + log N(u; m_k, S_k) (Gaussian gate, the joint density of u and k)."""
        lw = jnp.broadcast_to(params.log_weights, x.shape[:1] + params.log_weights.shape[-1:])
        if self.gate == "softmax":
            return jax.nn.log_softmax(lw + self.gate_log_terms(params, x), axis=-1)
        if self.gate == "gaussian":
            return lw + self.gate_log_terms(params, x)
        return lw

    def batch_component_log_probs(self, params: GLMParams, batch: Batch) -> Array:
        """The gate's term (:meth:`gate_component_log_probs`) + sum_h log p(y_nh | x_n, k), (N, K):
        EM's E-step quantity."""
        lp = jnp.sum(self.head_log_probs(params, batch.x, batch.y), axis=-1)
        return self.gate_component_log_probs(params, batch.x) + lp

    def component_log_probs(self, params: GLMParams, x, y) -> Array:
        """:meth:`batch_component_log_probs` of arrays x (N, D) and y (N, H) (unchecked)."""
        x = self.rows(x)
        y = self.response_rows(y)
        return self.batch_component_log_probs(params, Batch(x, y, jnp.ones(x.shape[:1], x.dtype)))

    def batch_log_likelihood(self, params: GLMParams, batch: Batch) -> Array:
        """sum_n w_n log p(y_n | x_n), a scalar."""
        return jnp.sum(batch.w * logsumexp(self.batch_component_log_probs(params, batch), axis=-1))

    def gate_nu(self, dtype) -> Array:
        """The Gaussian gate covariance's prior weight nu = max(reg, 1e-6)."""
        return jnp.asarray(max(self.reg, GATE_NU), dtype)

    def log_prior(self, params: GLMParams) -> Array:
        """log density (up to a constant) of the prior: N(0, 1 / reg) on beta; Dirichlet(1 + reg) on
        pi (constant and Gaussian gates); N(0, 1 / reg) on the softmax gate's slopes; on each Gaussian
        gate covariance the inverse-Wishart-like -nu / 2 (log det S_k + tr S_k^-1)."""
        dtype = params.coef.dtype
        reg = jnp.asarray(self.reg, dtype)
        out = -0.5 * reg * jnp.sum(params.coef**2)
        if self.gate == "softmax":
            return out - 0.5 * reg * jnp.sum(params.gate_weights**2)
        out = out + reg * jnp.sum(jax.nn.log_softmax(params.log_weights))
        if self.gate == "gaussian":
            chol = jnp.linalg.cholesky(params.gate_cov)
            logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)))
            trace_inv = jnp.sum(jnp.diagonal(jnp.linalg.inv(params.gate_cov), axis1=-2, axis2=-1))
            out = out - 0.5 * self.gate_nu(dtype) * (logdet + trace_inv)
        return out

    def log_posterior_k(self, params: GLMParams, x: Array) -> Array:
        """log p(k | x) = log softmax_k(log pi_k + f_k(x)), (N, K) (module docs)."""
        x = self.rows(x)
        lw = jnp.broadcast_to(params.log_weights, x.shape[:1] + params.log_weights.shape[-1:])
        return jax.nn.log_softmax(lw + self.gate_log_terms(params, x), axis=-1)

    def posterior_k(self, params: GLMParams, x: Array) -> Array:
        x = self.rows(x)
        return jnp.exp(self.log_posterior_k(params, x))

    def conditional_log_prob(self, params: GLMParams, x: Array, y: Array, head: int = 0) -> Array:
        """log q(y | x) of head ``head`` for y (N,), (N,)."""
        x = self.rows(x)
        lp = self.head_log_probs(self.select_heads(params, (head,)), x, y[:, None])[..., 0]
        return logsumexp(self.log_posterior_k(params, x) + lp, axis=-1)

    def sample_conditional(self, key, params: GLMParams, x: Array) -> Array:
        """y ~ p(y | x) for every row and head (one component per row), (N, H)."""
        x = self.rows(x)
        return self.sample_with_components(key, params, x)[0]

    def sample_with_components(self, key, params: GLMParams, x: Array) -> tuple[Array, Array]:
        """(y (N, H), k (N,)): each row's component k ~ p(k | x), then y ~ p(y | x, k)."""
        kz, ky = jax.random.split(key)
        z = jax.random.categorical(kz, self.log_posterior_k(params, x), axis=-1)
        eta = jnp.take_along_axis(self.linear_predictors(params, x), z[:, None, None, None],
                                  axis=1)[:, 0]  # (N, H, R)
        if self.response == "bernoulli":
            y = jax.random.bernoulli(ky, jax.nn.sigmoid(eta[..., 0]))
        elif self.response == "binomial":
            m = jnp.broadcast_to(self.trials(x)[:, None], eta.shape[:2])
            y = jax.random.binomial(ky, m, jax.nn.sigmoid(eta[..., 0]))
        elif self.response == "poisson":
            y = jax.random.poisson(ky, jnp.exp(jnp.minimum(eta[..., 0], MAX_ETA)))
        else:
            y = jax.random.categorical(ky, self._class_logits(eta), axis=-1)
        return y.astype(x.dtype), z

    def sample_x(self, key, params, n: int) -> Array:
        """n rows of x: standard normal, the Gaussian gate's columns drawn from
        sum_k pi_k N(m_k, S_k) instead."""
        kx, kz, ku = jax.random.split(key, 3)
        x = jax.random.normal(kx, (n, self.n_features), params.coef.dtype)
        if self.gate != "gaussian":
            return x
        z = jax.random.categorical(kz, params.log_weights, shape=(n,))
        chol = jnp.linalg.cholesky(params.gate_cov)[z]  # (n, G, G)
        e = jax.random.normal(ku, (n, len(self.gate_cols)), x.dtype)
        u = params.gate_mean[z] + _p.einsum("nij,nj->ni", chol, e)
        return x.at[:, list(self.gate_cols)].set(u)

    def sample_batch(self, key, params: GLMParams, n: int) -> Batch:
        """n rows: x from :meth:`sample_x`, y ~ p(y | x), unit weights."""
        kx, ky = jax.random.split(key)
        x = self.sample_x(kx, params, n)
        return Batch(x, self.sample_conditional(ky, params, x), jnp.ones((n,), x.dtype))

    def resample_batch(self, key, params: GLMParams, x: Array) -> Batch:
        """A parametric-bootstrap data set: the rows of ``x`` kept (a Gaussian gate's columns u
        redrawn from its mixture, which the family models), y ~ p(y | x), unit weights."""
        kx, ky = jax.random.split(key)
        if self.gate == "gaussian":
            cols = list(self.gate_cols)
            x = x.at[:, cols].set(self.sample_x(kx, params, x.shape[0])[:, cols])
        return Batch(x, self.sample_conditional(ky, params, x), jnp.ones(x.shape[:1], x.dtype))

    def batch_degenerate_components(self, params: GLMParams, batch: Batch) -> Array:
        """Boolean (K,): components on a maximum at infinity. A component is flagged when one of its
        heads predicts its own rows' labels almost surely (responsibility-weighted mean
        -log p(y | x, k) below ``SEPARATED_NLL``; for counts the term -log y! left out): it
        separates its labels (or holds only zeros), so its coefficients run off without bound as EM
        goes on (at reg = 0) or rest on the ridge alone."""
        clp = self.batch_component_log_probs(params, batch)
        r = jnp.exp(clp - logsumexp(clp, -1, keepdims=True)) * batch.w[:, None]  # (N, K)
        nll = -self._head_log_probs(self.linear_predictors(params, batch.x), batch.y,
                                    constant=False, trials=self.trials(batch.x))  # (N, K, H)
        y = batch.y[:, None, :]
        if self.response == "poisson":  # -log p(y | mu) + log y! >= y - y log y: its floor at mu = y
            nll = nll - (y - _xlogx(y))
        if self.response == "binomial":  # -log p(y | p) + log C(m, y) >= its value at p = y / m
            m = self.trials(batch.x)[:, None, None]
            nll = nll - (_xlogx(m) - _xlogx(y) - _xlogx(m - y))
        nk = jnp.sum(r, axis=0)
        mean_nll = _p.einsum("nk,nkh->kh", r, nll) / jnp.maximum(nk, jnp.finfo(nk.dtype).tiny)[:, None]
        return jnp.any(mean_nll < SEPARATED_NLL, axis=-1) | (nk < 1.0)

    # ------------------------------------------------------------------ EM
    def _params(self, log_weights, coef, gate=()):
        """The gate's parameter type from its fields."""
        if self.gate == "softmax":
            return GLMSoftmaxParams(log_weights, coef, *gate)
        if self.gate == "gaussian":
            return GLMGaussianParams(log_weights, coef, *gate)
        return GLMParams(log_weights, coef)

    def _gate_init(self, key, dtype, K: int):
        G = len(self.gate_cols)
        if self.gate == "softmax":
            w = 0.1 * jax.random.normal(key, (K, G), dtype)
            return (w - jnp.mean(w, axis=0, keepdims=True),)
        if self.gate == "gaussian":
            return (jax.random.normal(key, (K, G), dtype),
                    jnp.broadcast_to(jnp.eye(G, dtype=dtype), (K, G, G)))
        return ()

    def init_params(self, key, dtype=None) -> GLMParams:
        """Random coefficients (standard normal / 2), equal proportions and a random gate (softmax:
        slopes N(0, 0.1^2), centred; Gaussian: means N(0, 1), unit covariances)."""
        dtype = jnp.dtype(dtype or float_dtype())
        K = self.n_components
        kc, kg = jax.random.split(key)
        coef = 0.5 * jax.random.normal(kc, (K, self.n_heads, self.n_predictors, self.n_coef), dtype)
        return self._params(jnp.full((K,), -jnp.log(jnp.asarray(K, dtype)), dtype), coef,
                            self._gate_init(kg, dtype, K))

    def start_params(self, key, batch: Batch) -> GLMParams:
        """EM's random start: Dirichlet(1) responsibilities (for a Gaussian gate, averaged with a
        soft assignment of u to K random rows), then one M-step from zero coefficients."""
        dtype = batch.w.dtype
        K = self.n_components
        kr, kc = jax.random.split(key)
        r = jax.random.dirichlet(kr, jnp.ones((K,), dtype), (batch.w.shape[0],))
        if self.gate == "gaussian":
            u = self.gate_x(batch.x)
            rows = jax.random.choice(kc, u.shape[0], (K,), replace=False, p=batch.w / jnp.sum(batch.w))
            var = jnp.maximum(jnp.mean(jnp.var(u, axis=0)), jnp.finfo(dtype).tiny)
            d2 = jnp.sum((u[:, None, :] - u[rows][None, :, :]) ** 2, -1)
            r = 0.5 * r + 0.5 * jax.nn.softmax(-0.5 * d2 / var, axis=-1)
        G = len(self.gate_cols)
        gate = {"constant": (), "softmax": (jnp.zeros((K, G), dtype),),
                "gaussian": (jnp.zeros((K, G), dtype),
                             jnp.broadcast_to(jnp.eye(G, dtype=dtype), (K, G, G)))}[self.gate]
        zero = self._params(jnp.zeros((K,), dtype),
                            jnp.zeros((K, self.n_heads, self.n_predictors, self.n_coef), dtype), gate)
        return self.m_step(zero, batch, r)

    def _head_objective(self, beta: Array, phi: Array, y: Array, rw: Array,
                        trials: Array | None = None) -> Array:
        """sum_n rw_n log p(y_n | Phi_n beta) - reg / 2 |beta|^2 for one component and head, up to
        a constant free of beta; beta (R * P,) (:meth:`_values_grads_hessians` of one component)."""
        return self._values_grads_hessians(beta[None], phi.T, y, rw[None], trials=trials)[0][0]

    def _grad_hess(self, beta: Array, phi: Array, y: Array, rw: Array,
                   trials: Array | None = None) -> tuple[Array, Array]:
        """Gradient (R P,) and Hessian (R P, R P) of :meth:`_head_objective`
        (:meth:`_values_grads_hessians` of one component)."""
        _, g, h = self._values_grads_hessians(beta[None], phi.T, y, rw[None], trials=trials)
        return g[0], h[0]

    def _class_counts(self, y: Array, trials: Array | None, dtype) -> tuple[Array, Array]:
        """(counts (C, N), totals (N,)) of the class responses: one-hot labels with total 1, or for
        the binomial (m - y, y) with total m."""
        if self.response == "binomial":
            m = trials.astype(dtype)
            yv = y.astype(dtype)
            return jnp.stack([m - yv, yv]), m
        onehot = y[None, :] == jnp.arange(self.n_predictors + 1, dtype=y.dtype)[:, None]
        return onehot.astype(dtype), jnp.ones(y.shape, dtype)

    def _predictors_t(self, beta: Array, phiT: Array) -> Array:
        """eta (K, R, N) for beta (K, R P) and the transposed design phiT (P, N): the rows last, the
        layout in which XLA's CPU backend fuses the elementwise work over the rows (a (N, K) layout
        measured 4 to 10 times slower)."""
        K, R, P = beta.shape[0], self.n_predictors, self.n_coef
        return _p.mm(beta.reshape(K * R, P), phiT).reshape(K, R, -1)

    @staticmethod
    def _outer_rows(phiT: Array) -> Array:
        """Phi_n Phi_n^T of every row, (P P, N): with it a Hessian is one matrix product."""
        P = phiT.shape[0]
        return (phiT[:, None, :] * phiT[None, :, :]).reshape(P * P, -1)

    def _values_grads_hessians(self, beta: Array, phiT: Array, y: Array, rwT: Array,
                               outer: Array | None = None,
                               trials: Array | None = None) -> tuple[Array, Array, Array]:
        """:meth:`_head_objective` of K components at once (K,) with their gradients (K, R P) and
        Hessians (K, R P, R P) in closed form, from one pass over the rows: for the Bernoulli,
        binomial and categorical responses (the Bernoulli is the categorical with C = 2, the binomial
        its sum over m_n trials)
        g = sum_n rw_n (c_n - m_n p_n) (x) Phi_n and H = -sum_n rw_n m_n (diag p_n - p_n p_n^T) (x)
        Phi_n Phi_n^T, c_n the class counts (e_{y_n} for a label); for the Poisson
        g = Phi^T (rw (y - mu)) and H = -Phi^T diag(rw mu) Phi; minus the ridge. ``outer``:
        :meth:`_outer_rows` of phiT (computed here when not given)."""
        K, R, P = beta.shape[0], self.n_predictors, self.n_coef
        outer = self._outer_rows(phiT) if outer is None else outer
        eta = self._predictors_t(beta, phiT)
        if self.response == "poisson":
            e = jnp.minimum(eta[:, 0], MAX_ETA)
            mu = jnp.exp(e)  # (K, N)
            f = jnp.sum(rwT * (y[None, :] * e - mu), axis=1)
            wmu = rwT * mu
            g = _p.mm(rwT * y[None, :] - wmu, phiT.T)
            h = -_p.mm(wmu, outer.T).reshape(K, P, P)
        else:
            logits = jnp.concatenate([jnp.zeros_like(eta[:, :1]), eta], axis=1)
            logp = jax.nn.log_softmax(logits, axis=1)  # (K, C, N)
            counts, total = self._class_counts(y, trials, beta.dtype)  # (C, N), (N,)
            f = jnp.sum(rwT * jnp.sum(jnp.where(counts[None] > 0, counts[None] * logp, 0.0), axis=1),
                        axis=1)
            p = jnp.exp(logp[:, 1:])  # (K, R, N)
            g = _p.mm((rwT[:, None] * (counts[None, 1:] - total[None, None] * p)).reshape(K * R, -1),
                      phiT.T).reshape(K, R * P)
            wp = (rwT * total[None])[:, None] * p  # (K, R, N)
            diag = _p.mm(wp.reshape(K * R, -1), outer.T).reshape(K, R, P, P)
            pp = (wp[:, :, None, :] * p[:, None, :, :]).reshape(K * R * R, -1)
            cross = _p.mm(pp, outer.T).reshape(K, R, R, P, P)
            h = -(jnp.eye(R, dtype=p.dtype)[None, :, :, None, None] * diag[:, :, None] - cross)
            h = jnp.transpose(h, (0, 1, 3, 2, 4)).reshape(K, R * P, R * P)
        reg = jnp.asarray(self.reg, beta.dtype)
        return (f - 0.5 * reg * jnp.sum(beta**2, axis=1), g - reg * beta,
                h - reg * jnp.eye(R * P, dtype=beta.dtype)[None])

    def _newton(self, beta0: Array, phi: Array, y: Array, rw: Array,
                trials: Array | None = None) -> Array:
        """``newton_steps`` safeguarded Newton steps on :meth:`_head_objective` of every component
        at once: beta0 (K, R P), rw (N, K) the components' row weights, y (N,) one head."""
        phiT, rwT = phi.T, rw.T
        outer = self._outer_rows(phiT)
        return _safeguarded_newton(
            lambda b: self._values_grads_hessians(b, phiT, y, rwT, outer, trials), beta0,
            self.newton_steps)

    def _gate_objective(self, theta: Array, phi: Array, rw: Array) -> Array:
        """sum_n sum_k rw_nk log softmax_k(Phi_n . theta_k) - reg / 2 |W|^2, theta = (b, W) flattened
        (K (1 + G),) (:meth:`_gate_value_grad_hess`)."""
        return self._gate_value_grad_hess(theta, phi, rw)[0]

    def _gate_grad_hess(self, theta: Array, phi: Array, rw: Array) -> tuple[Array, Array]:
        """Gradient and Hessian of :meth:`_gate_objective` (:meth:`_gate_value_grad_hess`)."""
        return self._gate_value_grad_hess(theta, phi, rw)[1:]

    def _gate_value_grad_hess(self, theta: Array, phi: Array,
                              rw: Array) -> tuple[Array, Array, Array]:
        """:meth:`_gate_objective` with its gradient and Hessian in closed form, from one pass over
        the rows; the Hessian made definite along the softmax's common shift (on which the gradient
        vanishes when sum_k W_k = 0): the Newton step then stays in that subspace."""
        K = rw.shape[1]
        Q = phi.shape[1]
        t = theta.reshape(K, Q)
        logp = jax.nn.log_softmax(_p.mm(phi, t.T), axis=-1)  # (N, K)
        p = jnp.exp(logp)
        w = jnp.sum(rw, axis=1)  # (N,)
        mask = jnp.concatenate([jnp.zeros((1,), theta.dtype), jnp.ones((Q - 1,), theta.dtype)])
        reg = jnp.asarray(self.reg, theta.dtype)
        f = jnp.sum(rw * logp) - 0.5 * reg * jnp.sum(t[:, 1:] ** 2)
        g = (rw - w[:, None] * p).T @ phi - reg * t * mask[None, :]
        outer = _p.einsum("n,na,nb->nab", w, phi, phi)
        diag = _p.einsum("nk,nab->kab", p, outer)
        cross = _p.einsum("nk,nl,nab->klab", p, p, outer)
        eyek = jnp.eye(K, dtype=theta.dtype)
        h = -(eyek[:, :, None, None] * diag[:, None] - cross)
        h = h - reg * eyek[:, :, None, None] * jnp.diag(mask)[None, None]
        scale = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(h.reshape(K * Q, K * Q)))), 1.0)
        shift = (jnp.full((K, K), 1.0 / K, theta.dtype)[:, :, None, None]
                 * jnp.eye(Q, dtype=theta.dtype)[None, None])
        h = h - scale * shift
        return f, g.reshape(-1), jnp.transpose(h, (0, 2, 1, 3)).reshape(K * Q, K * Q)

    def _gate_m_step(self, params, x: Array, rw: Array, log_weights: Array):
        """The gate's fields from responsibilities rw (N, K) (weighted): the Gaussian gate's in closed
        form, the softmax gate's by safeguarded Newton steps from ``params`` (module docs)."""
        if self.gate == "constant":
            return log_weights, ()
        u = self.gate_x(x)
        dtype = rw.dtype
        K, G = rw.shape[1], u.shape[1]
        if self.gate == "gaussian":
            nk = jnp.sum(rw, axis=0)
            tiny = jnp.finfo(dtype).tiny
            mean = _p.mm(rw.T, u) / jnp.maximum(nk, tiny)[:, None]
            diff = u[None, :, :] - mean[:, None, :]  # (K, N, G)
            scatter = _p.einsum("nk,kna,knb->kab", rw, diff, diff)
            nu = self.gate_nu(dtype)
            cov = (scatter + nu * jnp.eye(G, dtype=dtype)[None]) / (nk + nu)[:, None, None]
            return log_weights, (mean, 0.5 * (cov + jnp.swapaxes(cov, 1, 2)))
        phi = jnp.concatenate([jnp.ones(u.shape[:1] + (1,), dtype), u], axis=1)
        theta0 = jnp.concatenate([params.log_weights[:, None], params.gate_weights], axis=1)
        theta = _safeguarded_newton(lambda t: jax.tree.map(lambda a: a[None],
                                                           self._gate_value_grad_hess(t[0], phi, rw)),
                                    theta0.reshape(1, -1), self.newton_steps).reshape(K, 1 + G)
        b = theta[:, 0]
        return b - logsumexp(b), (theta[:, 1:],)

    def m_step(self, params: GLMParams, batch: Batch, r: Array) -> GLMParams:
        """The proportions in closed form; every component's and head's coefficients by safeguarded
        Newton steps from ``params`` (module docs). r: responsibilities (N, K)."""
        rw = r * batch.w[:, None]  # (N, K)
        nk = jnp.sum(rw, axis=0)
        reg = jnp.asarray(self.reg, nk.dtype)
        log_weights = jnp.log(nk + reg) - jnp.log(jnp.sum(nk + reg))
        phi = self.design(batch.x)
        K, H, R, P = params.coef.shape
        beta0 = params.coef.reshape(K, H, R * P)

        # every component's Newton steps together, one head at a time
        trials = self.trials(batch.x)
        coef = jnp.stack([self._newton(beta0[:, h], phi, batch.y[:, h], rw, trials)
                          for h in range(H)], 1)
        log_weights, gate = self._gate_m_step(params, batch.x, rw, log_weights)
        return self._params(log_weights, coef.reshape(K, H, R, P), gate)

    @property
    def coef_names(self) -> tuple[str, ...]:
        """Names of the design's columns: "1" (the intercept), then x1, .., xD (those the experts
        read)."""
        return ("1",) + tuple(f"x{i + 1}" for i in self.expert_cols)

    @classmethod
    def hyperparameters_from(cls, y) -> dict:
        """Hyperparameters a response column implies (none here; the categorical family's
        classes)."""
        return {}

    def fit_report(self, params: GLMParams) -> dict:
        """The family's parameters for a fit summary: ``coef`` K x P (intercept first), for a
        categorical response K x C x P with the reference class 0 as zeros, and an extra head axis
        after K for several heads; ``response`` and ``n_classes``."""
        coef = np.asarray(params.coef)  # (K, H, R, P)
        if self.response == "categorical":
            coef = np.concatenate([np.zeros_like(coef[:, :, :1]), coef], axis=2)
        else:
            coef = coef[:, :, 0]
        if self.n_heads == 1:
            coef = coef[:, 0]
        out = {"coef": coef.tolist(), "response": self.response, "n_classes": self.n_classes,
               "gate": self.gate}
        for field in self.gate_fields():
            out[field] = np.asarray(getattr(params, field)).tolist()
        return out

    # ------------------------------------------------------------------ the paper
    def match_cost(self, params_a: GLMParams, head_a, params_b: GLMParams, head_b) -> Array:
        """cost[k, j] (K, K): squared distance between the coefficients of head ``head_a`` of
        component k of fit a and head ``head_b`` of component j of fit b."""
        if head_a is None or head_b is None:
            raise ValueError(f"{type(self).__name__} matches components by a head (match='weak' or "
                             "'strong'); it has no head-free component signature")
        a = params_a.coef[:, head_a].reshape(params_a.coef.shape[0], -1)
        b = params_b.coef[:, head_b].reshape(params_b.coef.shape[0], -1)
        return jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)

    def match_dim(self, head) -> int:
        """The length of the vectors :meth:`match_cost` compares for ``head``: the head's
        coefficients."""
        if head is None:
            raise ValueError(f"{type(self).__name__} matches components by a head; it has no head-free "
                             "component signature")
        return self.n_predictors * self.n_coef

    def relabel_vectors(self, params: GLMParams) -> Array:
        """One row per component: log-weight, every coefficient and the gate's parameters."""
        K = params.coef.shape[0]
        return jnp.concatenate([a.reshape(K, -1) for a in params], axis=1)

    # ------------------------------------------------------------------ NumPyro and sites
    def _full_gate_cov(self) -> bool:
        return self.gate == "gaussian" and len(self.gate_cols) > 1

    def site_names(self) -> tuple[str, ...]:
        gate = {"constant": (), "softmax": ("gate_weights",),
                "gaussian": ("gate_mean", "gate_sd") + (("gate_corr_chol",) if self._full_gate_cov()
                                                         else ())}[self.gate]
        return ("weights", "coef") + gate

    def to_sites(self, params: GLMParams) -> dict:
        out = {"weights": jax.nn.softmax(params.log_weights), "coef": params.coef}
        if self.gate == "softmax":
            out["gate_weights"] = params.gate_weights
        elif self.gate == "gaussian":
            sd = jnp.sqrt(jnp.diagonal(params.gate_cov, axis1=-2, axis2=-1))
            out.update(gate_mean=params.gate_mean, gate_sd=sd)
            if self._full_gate_cov():
                out["gate_corr_chol"] = jnp.linalg.cholesky(
                    params.gate_cov / (sd[..., :, None] * sd[..., None, :]))
        return out

    @staticmethod
    def _gate_cov_from_sites(sites: dict) -> Array:
        sd = sites["gate_sd"]
        if "gate_corr_chol" not in sites:
            return jax.vmap(jnp.diag)(sd**2)
        tril = sd[..., :, None] * sites["gate_corr_chol"]
        return _p.mm(tril, jnp.swapaxes(tril, -1, -2))

    def from_sites(self, sites: dict) -> GLMParams:
        w = sites["weights"]
        lw = jnp.log(jnp.maximum(w, jnp.finfo(w.dtype).tiny))
        if self.gate == "softmax":
            return self._params(lw, sites["coef"], (sites["gate_weights"],))
        if self.gate == "gaussian":
            return self._params(lw, sites["coef"],
                                (sites["gate_mean"], self._gate_cov_from_sites(sites)))
        return self._params(lw, sites["coef"])

    def batch_model(self, batch: Batch):
        """Dirichlet(1 + reg) proportions (1 when reg is 0), N(0, 1 / reg) coefficients (N(0, 10^2)
        when reg is 0), the gate (softmax slopes N(0, 5^2); Gaussian means N(0, 10^2), scales
        HalfNormal(10), LKJ(2) correlations) and the observed data scaled by the row weights: the
        gate covariates u for a Gaussian gate, then the responses given x."""
        K, H, R, P = self.n_components, self.n_heads, self.n_predictors, self.n_coef
        G = len(self.gate_cols)
        dtype = batch.w.dtype
        reg = self.reg
        sd = 1.0 / np.sqrt(reg) if reg > 0 else 10.0
        sites = {"weights": numpyro.sample("weights", dist.Dirichlet(jnp.full((K,), 1.0 + reg, dtype))),
                 "coef": numpyro.sample("coef",
                                        dist.Normal(jnp.zeros((K, H, R, P), dtype), sd).to_event(4))}
        if self.gate == "softmax":
            sites["gate_weights"] = numpyro.sample(
                "gate_weights", dist.Normal(jnp.zeros((K, G), dtype), 5.0).to_event(2))
        elif self.gate == "gaussian":
            sites["gate_mean"] = numpyro.sample(
                "gate_mean", dist.Normal(jnp.zeros((K, G), dtype), 10.0).to_event(2))
            sites["gate_sd"] = numpyro.sample(
                "gate_sd", dist.HalfNormal(jnp.full((K, G), 10.0, dtype)).to_event(2))
            if self._full_gate_cov():
                sites["gate_corr_chol"] = numpyro.sample(
                    "gate_corr_chol", dist.LKJCholesky(G, 2.0).expand([K]).to_event(1))
        params = self.from_sites(sites)
        with numpyro.handlers.scale(scale=batch.w):
            if self.gate == "gaussian":
                numpyro.sample("u", self.gate_distribution(params), obs=self.gate_x(batch.x))
            numpyro.sample("y", self.distribution(params, batch.x), obs=batch.y)

    def gate_distribution(self, params: GLMGaussianParams) -> dist.MixtureSameFamily:
        """The Gaussian gate's marginal of u: sum_k pi_k N(u; m_k, S_k)."""
        return dist.MixtureSameFamily(
            dist.Categorical(logits=params.log_weights),
            dist.MultivariateNormal(params.gate_mean, covariance_matrix=params.gate_cov))

    def distribution(self, params: GLMParams, x: Array) -> GLMMixtureDistribution:
        """The NumPyro distribution of the responses (N, H) given x, with the per-row weights
        p(k | x): for the constant and softmax gates the density of :meth:`batch_log_likelihood`; for
        the Gaussian gate its conditional part."""
        x = self.rows(x)
        return GLMMixtureDistribution(self, self.log_posterior_k(params, x),
                                      self.linear_predictors(params, x), self.trials(x))


class GLMMixtureDistribution(dist.Distribution):
    """p(y | x) = sum_k p(k | x) prod_h p(y_h | eta_kh) per row, with log p(k | x) ``log_weights``
    (N, K) (or (K,) for every row): batch shape (N,), event shape (H,)
    (a mixture whose components' support depends on C, which NumPyro's MixtureSameFamily refuses)."""

    arg_constraints = {}
    pytree_data_fields = ("log_weights", "eta", "trials")
    pytree_aux_fields = ("model",)

    def __init__(self, model: GLMExperts, log_weights: Array, eta: Array,
                 trials: Array | None = None, *, validate_args=None):
        self.model, self.log_weights, self.eta, self.trials = model, log_weights, eta, trials
        super().__init__(batch_shape=eta.shape[:1], event_shape=eta.shape[2:3],
                         validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        m = self.model
        if m.response == "categorical":
            return constraints.independent(constraints.integer_interval(0, m.n_classes - 1), 1)
        if m.response == "bernoulli":
            return constraints.independent(constraints.boolean, 1)
        return constraints.independent(constraints.nonnegative_integer, 1)

    def log_prob(self, value) -> Array:
        lp = jnp.sum(self.model._head_log_probs(self.eta, jnp.asarray(value, self.eta.dtype),
                                                trials=self.trials), -1)
        lw = jax.nn.log_softmax(self.log_weights, axis=-1)
        return logsumexp((lw[None, :] if lw.ndim == 1 else lw) + lp, axis=-1)


class _ClassProbabilities:
    """q(y = c | x) for every class c of a discrete response with finitely many values."""

    def component_class_log_probs(self, params: GLMParams, x: Array, head: int = 0) -> Array:
        """log p(y = c | x, k) for every component k and class c, (N, K, C)."""
        x = self.rows(x)
        eta = self.linear_predictors(self.select_heads(params, (head,)), x)[:, :, 0]  # (N, K, R)
        logits = self._class_logits(eta)
        if self.response == "bernoulli":  # p(1) = sigmoid(eta): logits (0, eta)
            logits = logits[..., :2]
        return jax.nn.log_softmax(logits, -1)

    def conditional_log_probs(self, params: GLMParams, x: Array, head: int = 0) -> Array:
        """log q(y = c | x) for every class c, (N, C) (C = 2 for the Bernoulli family)."""
        x = self.rows(x)
        return logsumexp(self.log_posterior_k(params, x)[:, :, None]
                         + self.component_class_log_probs(params, x, head), axis=1)


@dataclass(frozen=True)
class LogisticMixture(_ClassProbabilities, GLMExperts):
    """A mixture of logistic regressions (Bernoulli responses 0/1, logit link): module docs."""

    response: ClassVar[str] = "bernoulli"

    def __post_init__(self):
        super().__post_init__()
        if self.n_classes != 2:
            raise ValueError(f"n_classes must be 2 for a logistic family (y in 0/1), got "
                             f"{self.n_classes}; use CategoricalMixture for more classes")

    def conditional_mean(self, params: GLMParams, x: Array, head: int = 0) -> Array:
        """q(y = 1 | x), (N,)."""
        x = self.rows(x)
        return jnp.exp(self.conditional_log_probs(params, x, head)[:, 1])


@dataclass(frozen=True)
class CategoricalMixture(_ClassProbabilities, GLMExperts):
    """A mixture of multinomial-logit regressions over ``n_classes`` classes (labels 0..C-1, class 0
    the reference): module docs."""

    response: ClassVar[str] = "categorical"

    @classmethod
    def hyperparameters_from(cls, y) -> dict:
        """``n_classes``: the largest label plus one (at least 2)."""
        v = np.asarray(y, dtype=float)
        top = np.max(v[np.isfinite(v)]) if np.any(np.isfinite(v)) else 1
        return {"n_classes": max(2, int(top) + 1)} if top == int(top) and top >= 0 else {}


@dataclass(frozen=True)
class BinomialMixture(GLMExperts):
    """A mixture of binomial regressions (logit link): y successes out of m trials per row, m the
    column ``trials_column`` of x (neither the experts' nor the gate's covariate by default) or the
    constant ``trials_per_row`` (module docs). flexmix's ``FLXMRglm(cbind(y, m - y) ~ x, family =
    "binomial")``.

    Args (beyond :class:`GLMExperts`'):
      trials_column: the column of x holding each row's number of trials (None: ``trials_per_row``).
      trials_per_row: the number of trials of every row when there is no trials column.
    """

    trials_column: int | None = None
    trials_per_row: int = 1

    response: ClassVar[str] = "binomial"

    def __post_init__(self):
        if self.trials_column is not None:
            if isinstance(self.trials_column, bool) or not isinstance(self.trials_column,
                                                                      (int, np.integer)):
                raise TypeError(f"trials_column must be a column index of x, got "
                                f"{self.trials_column!r}")
            if not 0 <= int(self.trials_column) < self.n_features:
                raise ValueError(f"trials_column must be in 0..{self.n_features - 1} (the columns "
                                 f"of x, n_features={self.n_features}), got {self.trials_column}")
        check_int("trials_per_row", self.trials_per_row, minimum=1)
        super().__post_init__()

    @property
    def reserved_columns(self) -> tuple[int, ...]:
        return () if self.trials_column is None else (int(self.trials_column),)

    def trials(self, x: Array) -> Array:
        x = jnp.asarray(x)
        if self.trials_column is None:
            return jnp.full(x.shape[:1], self.trials_per_row, x.dtype)
        return x[:, int(self.trials_column)]

    def sample_x(self, key, params, n: int) -> Array:
        """:meth:`GLMExperts.sample_x`, with the trials column (if any) uniform on
        1..2 ``trials_per_row``."""
        kx, km = jax.random.split(key)
        x = super().sample_x(kx, params, n)
        if self.trials_column is None:
            return x
        m = jax.random.randint(km, (n,), 1, 2 * self.trials_per_row + 1)
        return x.at[:, int(self.trials_column)].set(m.astype(x.dtype))

    def _check_y_given_x(self, x, y) -> None:
        if is_traced(x) or is_traced(y):
            return
        m = np.asarray(self.trials(np.asarray(x)))
        if not np.all((m >= 1) & (m == np.round(m))):
            bad = m[(m < 1) | (m != np.round(m))].ravel()[0]
            raise ValueError(f"the number of trials (column {self.trials_column} of x) must be a "
                             f"positive integer in every row, got {bad:g}")
        v = np.asarray(y)
        if not np.all(v <= m[:, None]):
            row = int(np.argwhere(v > m[:, None])[0, 0])
            raise ValueError(f"y must hold successes 0..m (m the number of trials), got "
                             f"{v[row].max():g} with m = {m[row]:g} in row {row}")

    def conditional_mean(self, params: GLMParams, x: Array, head: int = 0) -> Array:
        """E[y | x] = m sum_k p(k | x) sigmoid(Phi(x) . beta_k), (N,)."""
        x = self.rows(x)
        eta = self.linear_predictors(self.select_heads(params, (head,)), x)[:, :, 0, 0]
        return self.trials(x) * jnp.sum(self.posterior_k(params, x) * jax.nn.sigmoid(eta), axis=-1)


@dataclass(frozen=True)
class PoissonRegressionMixture(GLMExperts):
    """A mixture of Poisson regressions (counts, log link): module docs."""

    response: ClassVar[str] = "poisson"

    def conditional_mean(self, params: GLMParams, x: Array, head: int = 0) -> Array:
        """E[y | x] = sum_k pi_k exp(Phi(x) . beta_k), (N,)."""
        x = self.rows(x)
        eta = jnp.minimum(self.linear_predictors(self.select_heads(params, (head,)), x)[:, :, 0, 0],
                          MAX_ETA)
        return jnp.sum(self.posterior_k(params, x) * jnp.exp(eta), axis=-1)

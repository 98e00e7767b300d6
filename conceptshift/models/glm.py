"""Mixtures of generalized linear experts for discrete responses: Bernoulli (logit link), categorical
(softmax over C classes) and Poisson (log link), with a constant gate, one file on the family protocol.

Component k has proportion pi_k and, for each head h (the strong label y, the weak label y', ...), a
linear predictor on the design Phi(x) = (1, x_1, .., x_D) (intercept first):

  bernoulli    p(y = 1 | x, k) = sigmoid(Phi(x) . beta_kh)
  categorical  p(y = c | x, k) = softmax_c(0, Phi(x) . beta_kh1, .., Phi(x) . beta_kh(C-1))  (class 0 the
               reference)
  poisson      y | x, k ~ Poisson(exp(Phi(x) . beta_kh))

so ``coef`` has shape (K, H, R, P) with R = 1 (Bernoulli, Poisson) or C - 1 (categorical) linear
predictors per head and P = 1 + D.

EM (``em_kind = "responsibilities"``, the protocol's generic driver): the E-step is the posterior over k
of :meth:`batch_component_log_probs`; the M-step sets the proportions in closed form and maximises, for
every component and head, the responsibility-weighted log-likelihood minus a ridge (reg / 2) |beta|^2
by ``newton_steps`` Newton steps from the current coefficients (the problem is concave), each with step
halving: a step is taken only if it does not lower that objective, so EM's objective (log-likelihood plus
log prior) never decreases (a generalized EM). The prior: Dirichlet(1 + reg) on the proportions and
N(0, 1 / reg) on every coefficient (the ridge); ``reg = 0`` is the maximum-likelihood fit (flexmix's
``FLXMRglm``), which can run off to infinity on separable data.
"""

from __future__ import annotations

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
from .batch import Batch

MAX_ETA = 60.0  # log-link predictors are clipped here: exp(60) ~ 1e26 counts, finite in float32
HALVINGS = 12  # step sizes 1, 1/2, .., 2^-12 are tried in each Newton step


class GLMParams(NamedTuple):
    log_weights: Array  # (K,) log pi_k
    coef: Array  # (K, H, R, P): R linear predictors per head on the design (intercept first)

    @property
    def weights(self) -> Array:
        return jax.nn.softmax(self.log_weights)


@dataclass(frozen=True)
class GLMExperts:
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
    """

    n_components: int
    n_features: int = 1
    n_heads: int = 1
    n_classes: int = 2
    reg: float = 1e-6
    newton_steps: int = 3

    response: ClassVar[str] = ""

    def __post_init__(self):
        check_int("n_components", self.n_components, minimum=1)
        check_int("n_features", self.n_features, minimum=0)
        check_int("n_heads", self.n_heads, minimum=1)
        check_int("n_classes", self.n_classes, minimum=2)
        check_float("reg", self.reg, nonnegative=True)
        check_int("newton_steps", self.newton_steps, minimum=1)
        if not self.response:
            raise TypeError("GLMExperts is abstract: use LogisticMixture, CategoricalMixture or "
                            "PoissonRegressionMixture")

    # ------------------------------------------------------------------ bookkeeping
    em_kind: ClassVar[str] = "responsibilities"

    @property
    def n_predictors(self) -> int:
        """R, linear predictors per head."""
        return self.n_classes - 1 if self.response == "categorical" else 1

    @property
    def n_coef(self) -> int:
        """P = 1 + D."""
        return 1 + self.n_features

    @property
    def n_params(self) -> int:
        """Free parameters (for BIC)."""
        K = self.n_components
        return (K - 1) + K * self.n_heads * self.n_predictors * self.n_coef

    def with_heads(self, n_heads: int):
        return type(self)(self.n_components, self.n_features, n_heads, self.n_classes, self.reg,
                          self.newton_steps)

    def select_heads(self, params: GLMParams, heads) -> GLMParams:
        return params._replace(coef=params.coef[:, jnp.asarray(heads, jnp.int32).reshape(-1)])

    def permute(self, params: GLMParams, perm) -> GLMParams:
        """Component k of the result is component perm[k] of ``params``."""
        perm = jnp.asarray(perm)
        return GLMParams(params.log_weights[perm], params.coef[perm])

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
        if self.response == "poisson" and not (whole and np.all(v >= 0)):
            bad = v[(v < 0) | (v != np.round(v))].ravel()[0]
            raise ValueError(f"y must hold non-negative integer counts for a Poisson family, got {bad:g}")
        if self.response == "categorical" and not (whole and np.all((v >= 0) & (v < self.n_classes))):
            bad = v[(v < 0) | (v >= self.n_classes) | (v != np.round(v))].ravel()[0]
            raise ValueError(f"y must hold class labels 0..{self.n_classes - 1} (n_classes="
                             f"{self.n_classes}), got {bad:g}")

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
        """Phi(x) = (1, x), (N, P)."""
        return jnp.concatenate([jnp.ones(x.shape[:1] + (1,), x.dtype), x], axis=1)

    # ------------------------------------------------------------------ density
    def linear_predictors(self, params: GLMParams, x: Array) -> Array:
        """eta (N, K, H, R) = Phi(x) . beta_khr."""
        return _p.einsum("np,khrp->nkhr", self.design(x), params.coef)

    def _head_log_probs(self, eta: Array, y: Array) -> Array:
        """log p(y_h | eta_h) summed over nothing: (N, K, H) for eta (N, K, H, R), y (N, H)."""
        yk = y[:, None, :]
        if self.response == "bernoulli":
            e = eta[..., 0]
            return yk * e - jax.nn.softplus(e)
        if self.response == "poisson":
            e = jnp.minimum(eta[..., 0], MAX_ETA)
            return yk * e - jnp.exp(e) - gammaln(yk + 1)
        logits = self._class_logits(eta)  # (N, K, H, C)
        idx = jnp.broadcast_to(yk, logits.shape[:-1]).astype(jnp.int32)[..., None]
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), idx, axis=-1)[..., 0]

    @staticmethod
    def _class_logits(eta: Array) -> Array:
        return jnp.concatenate([jnp.zeros(eta.shape[:-1] + (1,), eta.dtype), eta], axis=-1)

    def head_log_probs(self, params: GLMParams, x: Array, y: Array) -> Array:
        """log p(y_nh | x_n, k) for every row, component and head, (N, K, H)."""
        return self._head_log_probs(self.linear_predictors(params, x), y)

    def batch_component_log_probs(self, params: GLMParams, batch: Batch) -> Array:
        """log pi_k + sum_h log p(y_nh | x_n, k), (N, K): EM's E-step quantity."""
        lp = jnp.sum(self.head_log_probs(params, batch.x, batch.y), axis=-1)
        return params.log_weights[None, :] + lp

    def component_log_probs(self, params: GLMParams, x, y) -> Array:
        """:meth:`batch_component_log_probs` of arrays x (N, D) and y (N, H) (unchecked)."""
        return self.batch_component_log_probs(params, Batch(x, y, jnp.ones(x.shape[:1], x.dtype)))

    def batch_log_likelihood(self, params: GLMParams, batch: Batch) -> Array:
        """sum_n w_n log p(y_n | x_n), a scalar."""
        return jnp.sum(batch.w * logsumexp(self.batch_component_log_probs(params, batch), axis=-1))

    def log_prior(self, params: GLMParams) -> Array:
        """log density (up to a constant) of Dirichlet(1 + reg) on pi and N(0, 1 / reg) on beta."""
        reg = jnp.asarray(self.reg, params.coef.dtype)
        return reg * jnp.sum(jax.nn.log_softmax(params.log_weights)) - 0.5 * reg * jnp.sum(
            params.coef**2)

    def log_posterior_k(self, params: GLMParams, x: Array) -> Array:
        """log p(k | x) = log pi_k (a constant gate), (N, K)."""
        lw = jax.nn.log_softmax(params.log_weights)
        return jnp.broadcast_to(lw, x.shape[:1] + lw.shape)

    def posterior_k(self, params: GLMParams, x: Array) -> Array:
        return jnp.exp(self.log_posterior_k(params, x))

    def conditional_log_prob(self, params: GLMParams, x: Array, y: Array, head: int = 0) -> Array:
        """log q(y | x) of head ``head`` for y (N,), (N,)."""
        lp = self.head_log_probs(self.select_heads(params, (head,)), x, y[:, None])[..., 0]
        return logsumexp(self.log_posterior_k(params, x) + lp, axis=-1)

    def sample_conditional(self, key, params: GLMParams, x: Array) -> Array:
        """y ~ p(y | x) for every row and head (one component per row), (N, H)."""
        kz, ky = jax.random.split(key)
        z = jax.random.categorical(kz, params.log_weights, shape=x.shape[:1])
        eta = jnp.take_along_axis(self.linear_predictors(params, x), z[:, None, None, None],
                                  axis=1)[:, 0]  # (N, H, R)
        if self.response == "bernoulli":
            y = jax.random.bernoulli(ky, jax.nn.sigmoid(eta[..., 0]))
        elif self.response == "poisson":
            y = jax.random.poisson(ky, jnp.exp(jnp.minimum(eta[..., 0], MAX_ETA)))
        else:
            y = jax.random.categorical(ky, self._class_logits(eta), axis=-1)
        return y.astype(x.dtype)

    def sample_batch(self, key, params: GLMParams, n: int) -> Batch:
        """n rows: x standard normal (the family models y given x), y ~ p(y | x), unit weights."""
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (n, self.n_features), params.coef.dtype)
        return Batch(x, self.sample_conditional(ky, params, x), jnp.ones((n,), x.dtype))

    def resample_batch(self, key, params: GLMParams, x: Array) -> Batch:
        """A parametric-bootstrap data set: the rows of ``x`` kept, y ~ p(y | x), unit weights."""
        return Batch(x, self.sample_conditional(key, params, x), jnp.ones(x.shape[:1], x.dtype))

    # ------------------------------------------------------------------ EM
    def init_params(self, key, dtype=None) -> GLMParams:
        """Random coefficients (standard normal / 2) and equal proportions."""
        dtype = jnp.dtype(dtype or float_dtype())
        K = self.n_components
        coef = 0.5 * jax.random.normal(key, (K, self.n_heads, self.n_predictors, self.n_coef), dtype)
        return GLMParams(jnp.full((K,), -jnp.log(jnp.asarray(K, dtype)), dtype), coef)

    def start_params(self, key, batch: Batch) -> GLMParams:
        """EM's random start: Dirichlet(1) responsibilities, then one M-step from zero coefficients."""
        dtype = batch.w.dtype
        K = self.n_components
        r = jax.random.dirichlet(key, jnp.ones((K,), dtype), (batch.w.shape[0],))
        zero = GLMParams(jnp.zeros((K,), dtype),
                         jnp.zeros((K, self.n_heads, self.n_predictors, self.n_coef), dtype))
        return self.m_step(zero, batch, r)

    def _head_objective(self, beta: Array, phi: Array, y: Array, rw: Array) -> Array:
        """sum_n rw_n log p(y_n | Phi_n beta) - reg / 2 |beta|^2 for one component and head;
        beta (R * P,)."""
        eta = phi @ beta.reshape(self.n_predictors, self.n_coef).T  # (N, R)
        lp = self._head_log_probs(eta[:, None, None, :], y[:, None])[:, 0, 0]
        return jnp.sum(rw * lp) - 0.5 * jnp.asarray(self.reg, beta.dtype) * jnp.sum(beta**2)

    def _grad_hess(self, beta: Array, phi: Array, y: Array, rw: Array) -> tuple[Array, Array]:
        """Gradient (R P,) and Hessian (R P, R P) of :meth:`_head_objective`, in closed form: for the
        Bernoulli and categorical responses (the Bernoulli is the categorical with C = 2) g = sum_n
        rw_n (e_{y_n} - p_n) (x) Phi_n and H = -sum_n rw_n (diag p_n - p_n p_n^T) (x) Phi_n Phi_n^T;
        for the Poisson g = Phi^T (rw (y - mu)) and H = -Phi^T diag(rw mu) Phi; minus the ridge."""
        R, P = self.n_predictors, self.n_coef
        b = beta.reshape(R, P)
        eta = phi @ b.T  # (N, R)
        if self.response == "poisson":
            mu = jnp.exp(jnp.minimum(eta[:, 0], MAX_ETA))
            g = phi.T @ (rw * (y - mu))
            h = -_p.einsum("n,na,nb->ab", rw * mu, phi, phi)
        else:
            p = jax.nn.softmax(self._class_logits(eta), axis=-1)[:, 1:]  # (N, R)
            onehot = (y[:, None] == jnp.arange(1, R + 1, dtype=y.dtype)[None, :]).astype(p.dtype)
            g = (((onehot - p) * rw[:, None]).T @ phi).reshape(-1)
            outer = _p.einsum("n,na,nb->nab", rw, phi, phi)  # (N, P, P)
            diag = _p.einsum("nr,nab->rab", p, outer)
            cross = _p.einsum("nr,ns,nab->rsab", p, p, outer)
            h = -(jnp.eye(R, dtype=p.dtype)[:, :, None, None] * diag[:, None] - cross)
            h = jnp.transpose(h, (0, 2, 1, 3)).reshape(R * P, R * P)
        reg = jnp.asarray(self.reg, beta.dtype)
        return g - reg * beta, h - reg * jnp.eye(R * P, dtype=beta.dtype)

    def _newton(self, beta0: Array, phi: Array, y: Array, rw: Array) -> Array:
        """``newton_steps`` safeguarded Newton steps on :meth:`_head_objective` from beta0."""
        f = lambda b: self._head_objective(b, phi, y, rw)  # noqa: E731
        steps = 2.0 ** -jnp.arange(HALVINGS + 1, dtype=beta0.dtype)
        eye = jnp.eye(beta0.shape[0], dtype=beta0.dtype)

        def one(beta, _):
            g, h = self._grad_hess(beta, phi, y, rw)
            scale = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(h))), jnp.finfo(beta.dtype).tiny)
            d = jnp.linalg.solve(h - 1e-10 * scale * eye, -g)  # ascent direction (h is negative)
            d = jnp.where(jnp.all(jnp.isfinite(d)), d, jnp.zeros_like(d))
            f0 = f(beta)
            vals = jax.vmap(lambda t: f(beta + t * d))(steps)
            ok = jnp.isfinite(vals) & (vals >= f0)
            t = jnp.where(jnp.any(ok), steps[jnp.argmax(ok)], 0.0)
            return beta + t * d, None

        beta, _ = jax.lax.scan(one, beta0, None, length=self.newton_steps)
        return beta

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

        def per_k(b_k, rw_k):
            return jax.vmap(lambda b, y: self._newton(b, phi, y, rw_k), in_axes=(0, 1))(b_k, batch.y)

        coef = jax.vmap(per_k, in_axes=(0, 1))(beta0, rw)
        return GLMParams(log_weights, coef.reshape(K, H, R, P))

    @property
    def coef_names(self) -> tuple[str, ...]:
        """Names of the design's columns: "1" (the intercept), x1, .., xD."""
        return ("1",) + tuple(f"x{i + 1}" for i in range(self.n_features))

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
        return {"coef": coef.tolist(), "response": self.response, "n_classes": self.n_classes}

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

    def relabel_vectors(self, params: GLMParams) -> Array:
        """One row per component, (K, 1 + H R P): log-weight and every coefficient."""
        K = params.coef.shape[0]
        return jnp.concatenate([params.log_weights[:, None], params.coef.reshape(K, -1)], axis=1)

    # ------------------------------------------------------------------ NumPyro and sites
    def site_names(self) -> tuple[str, ...]:
        return ("weights", "coef")

    def to_sites(self, params: GLMParams) -> dict:
        return {"weights": jax.nn.softmax(params.log_weights), "coef": params.coef}

    def from_sites(self, sites: dict) -> GLMParams:
        w = sites["weights"]
        return GLMParams(jnp.log(jnp.maximum(w, jnp.finfo(w.dtype).tiny)), sites["coef"])

    def batch_model(self, batch: Batch):
        """Dirichlet(1 + reg) proportions (1 when reg is 0), N(0, 1 / reg) coefficients (N(0, 10^2)
        when reg is 0) and the observed responses, scaled by the row weights."""
        K, H, R, P = self.n_components, self.n_heads, self.n_predictors, self.n_coef
        dtype = batch.w.dtype
        reg = self.reg
        sd = 1.0 / np.sqrt(reg) if reg > 0 else 10.0
        weights = numpyro.sample("weights", dist.Dirichlet(jnp.full((K,), 1.0 + reg, dtype)))
        coef = numpyro.sample("coef", dist.Normal(jnp.zeros((K, H, R, P), dtype), sd).to_event(4))
        params = GLMParams(jnp.log(jnp.maximum(weights, jnp.finfo(dtype).tiny)), coef)
        with numpyro.handlers.scale(scale=batch.w):
            numpyro.sample("y", self.distribution(params, batch.x), obs=batch.y)

    def distribution(self, params: GLMParams, x: Array) -> GLMMixtureDistribution:
        """The NumPyro distribution of the responses (N, H) given x: the same density as
        :meth:`batch_component_log_probs`."""
        return GLMMixtureDistribution(self, params.log_weights, self.linear_predictors(params, x))


class GLMMixtureDistribution(dist.Distribution):
    """p(y | x) = sum_k pi_k prod_h p(y_h | eta_kh) per row: batch shape (N,), event shape (H,)
    (a mixture whose components' support depends on C, which NumPyro's MixtureSameFamily refuses)."""

    arg_constraints = {}
    pytree_data_fields = ("log_weights", "eta")
    pytree_aux_fields = ("model",)

    def __init__(self, model: GLMExperts, log_weights: Array, eta: Array, *, validate_args=None):
        self.model, self.log_weights, self.eta = model, log_weights, eta
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
        lp = jnp.sum(self.model._head_log_probs(self.eta, jnp.asarray(value, self.eta.dtype)), -1)
        return logsumexp(jax.nn.log_softmax(self.log_weights)[None, :] + lp, axis=-1)


class _ClassProbabilities:
    """q(y = c | x) for every class c of a discrete response with finitely many values."""

    def conditional_log_probs(self, params: GLMParams, x: Array, head: int = 0) -> Array:
        """log q(y = c | x) for every class c, (N, C) (C = 2 for the Bernoulli family)."""
        eta = self.linear_predictors(self.select_heads(params, (head,)), x)[:, :, 0]  # (N, K, R)
        logits = self._class_logits(eta)
        if self.response == "bernoulli":  # p(1) = sigmoid(eta): logits (0, eta)
            logits = logits[..., :2]
        return logsumexp(self.log_posterior_k(params, x)[:, :, None]
                         + jax.nn.log_softmax(logits, -1), axis=1)


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
class PoissonRegressionMixture(GLMExperts):
    """A mixture of Poisson regressions (counts, log link): module docs."""

    response: ClassVar[str] = "poisson"

    def conditional_mean(self, params: GLMParams, x: Array, head: int = 0) -> Array:
        """E[y | x] = sum_k pi_k exp(Phi(x) . beta_k), (N,)."""
        eta = jnp.minimum(self.linear_predictors(self.select_heads(params, (head,)), x)[:, :, 0, 0],
                          MAX_ETA)
        return jnp.sum(self.posterior_k(params, x) * jnp.exp(eta), axis=-1)

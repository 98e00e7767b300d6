"""What the Gaussian-expert families share: the response heads phi(y; x, theta_k), their closed-form
M-step, the weak conjugate prior that keeps every M-step finite, the maps to and from the
standardised coordinates EM works in (:class:`Standardiser`), and the NumPyro conditional mixture.

Dimension names: N samples, K components, D covariates, P design columns (intercept first),
H response heads (y, and y' where a weak label is modelled).

The prior (strength ``reg``, default 1e-6) is what keeps empty or collapsing components finite. It
is defined on the standardised data (EM fits there), so it does not depend on where the data sit.
With nu = reg, v_h the sample variance of head h and c_p = reg * (Phi^T Phi)_pp / N per design
column:

  log pi ~ Dirichlet(1 + nu)        ->  pi_k = (N_k + nu) / (N + K nu)
  beta_khp | s2 ~ N(0, s2 / c_p)    ->  ridge solve (Phi^T W_k Phi + diag c) beta = Phi^T W_k y_h
  s2_kh: -(nu/2) log s2 - nu v_h / (2 s2)
                                    ->  s2_kh = (RSS_kh + sum_p c_p beta_khp^2 + nu v_h) / (N_k + nu)

Each M-step maximises the penalised log-likelihood exactly, so EM's objective (log-likelihood plus
log prior, reported as ``objective``) never decreases in exact arithmetic; the prior moves the
log-likelihood itself by O(reg) relative to the data's own spread. A component that fits its points
exactly has RSS ~ 0 and lands on the floor s2 = nu v_h / (N_k + nu) instead of zero.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import Array
from jax.scipy.special import logsumexp

from .. import _precision as _p
from .._validation import DiscreteResponseWarning, as_float_array, check_float, check_int, is_traced
from ._estep import EStepScheduling
from .basis import Basis
from .batch import Batch, TableRows


class DataStats(NamedTuple):
    """Constants of the data that set the prior's scale (fixed during one fit)."""

    y_var: Array  # (H,) weighted variance of each head
    x_var: Array  # (D,) weighted variance of each covariate
    phi_scale: Array  # (P,) diag(Phi^T W Phi) / sum(W): the ridge is relative to each column
    n: Array  # () sum of the weights
    x_mean: Array  # (D,) weighted mean of x: gate statistics are accumulated centred on it


class SuffStats(NamedTuple):
    """Expected sufficient statistics of one E-step (sums over samples, so they add across data
    blocks and devices, and average in online EM).

    Residuals are taken against a reference ``ref`` (the previous coefficients), so that the residual
    sum of squares of the new coefficients is formed without catastrophic cancellation in float32.
    """

    nk: Array  # (K,) sum_n r_nk
    s_pp: Array  # (K, P, P) sum_n r_nk phi_n phi_n^T
    s_pe: Array  # (K, P, H) sum_n r_nk phi_n e_nkh, e = y - phi . ref
    s_ee: Array  # (K, H) sum_n r_nk e_nkh^2
    ref: Array  # (K, P, H) the reference coefficients
    s_x: Array  # (K, D) sum_n r_nk (x_n - xbar)      (gated families; D = 0 otherwise)
    s_xx: Array  # (K, D, D) sum_n r_nk (x_n - xbar)(x_n - xbar)^T


class Standardiser(NamedTuple):
    """The affine map to the coordinates EM works in: z = (x - x_loc) / x_scale for each covariate,
    u = (y - y_loc) / y_scale for each head (weighted means and standard deviations of the data).

    EM, its prior, initialisation, tolerances and degeneracy tests all run on (z, u), and the fit is
    mapped back exactly (``ExpertsFamily.params_from_standard``): an affine map of a covariate or
    of a response maps the fit, whatever the data's location and scale. Covariates are left as they
    are (loc 0, scale 1) where the design is not closed under affine maps (a user ``basis_fn``).
    """

    x_loc: Array  # (D,)
    x_scale: Array  # (D,)
    y_loc: Array  # (H,)
    y_scale: Array  # (H,)


def numpyro_numerics():
    """A context in which numpyro's own distribution code runs under any user setting: it relies on
    implicit rank broadcasting and int/float promotion, which ``jax_numpy_rank_promotion="raise"``
    and ``jax_numpy_dtype_promotion="strict"`` forbid."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.numpy_rank_promotion("allow"))
    stack.enter_context(jax.numpy_dtype_promotion("standard"))
    return stack


def loc_scale(a, w, xp=jnp):
    """Weighted mean and standard deviation of each column of a (N, C) with weights w (N,), without
    overflow for any finite values (sums are taken of pre-scaled values); a constant column gets
    scale 1. ``xp``: ``numpy`` (host, float64) or ``jax.numpy`` (traced or device data)."""
    mm = _p.mm if xp is jnp else xp.matmul
    live = (w > 0)[:, None]
    n = xp.sum(w)
    zero = xp.zeros_like(a)
    big = xp.max(xp.where(live, xp.abs(a), zero), axis=0)
    big = xp.where(big > 0, big, xp.ones_like(big))
    loc = big * (mm(w, a / big[None, :]) / n)
    dev = xp.where(live, a - loc[None, :], zero)
    m = xp.max(xp.abs(dev), axis=0)
    m = xp.where(m > 0, m, xp.ones_like(m))
    sd = m * xp.sqrt(mm(w, (dev / m[None, :]) ** 2) / n)
    return loc, xp.where(sd > 0, sd, xp.ones_like(sd))


def _solve_psd(gram: Array, rhs: Array) -> Array:
    """Solves gram beta = rhs for a batch of symmetric positive semi-definite matrices (K, P, P).

    Cholesky of the Jacobi-scaled system where it succeeds; where the ridge is below the working
    precision (a component on a rank-deficient design, e.g. tied x in float32) its eigenvalues are
    clipped at P eps times the largest instead (the minimum-norm solution on the resolved subspace).
    """
    # Jacobi scaling first: the solve then does not depend on the columns' scales (the powers of a
    # high-degree design differ by orders of magnitude, which float32's Cholesky would not survive)
    d = jnp.sqrt(jnp.maximum(jnp.diagonal(gram, axis1=1, axis2=2), jnp.finfo(gram.dtype).tiny))
    inv_d = 1.0 / d  # (K, P)
    gram = gram * inv_d[:, :, None] * inv_d[:, None, :]
    rhs = rhs * inv_d[:, :, None]
    chol = jnp.linalg.cholesky(gram)
    beta = jax.scipy.linalg.cho_solve((chol, True), rhs)
    for _ in range(2):  # iterative refinement: the factorisation's error shrinks by cond * eps
        beta = beta + jax.scipy.linalg.cho_solve((chol, True), rhs - _p.mm(gram, beta))
    ok = jnp.all(jnp.isfinite(beta), axis=(1, 2))
    lam, vec = jnp.linalg.eigh(gram)
    floor = gram.shape[-1] * jnp.finfo(gram.dtype).eps * jnp.max(jnp.abs(lam), -1, keepdims=True)
    inv = jnp.where(lam > floor, 1.0 / jnp.where(lam > floor, lam, 1.0), 0.0)
    beta_eig = _p.einsum("kpq,kq,krq,krh->kph", vec, inv, vec, rhs)
    return jnp.where(ok[:, None, None], beta, beta_eig) * inv_d[:, :, None]


def _contract_minor(a: Array, b: Array) -> Array:
    """sum_n a[i, n] b[j, n] -> (I, J): a reduction over the long, minor sample axis, with the
    operand of more rows on the left."""
    return _p.dot_general(a, b, (((1,), (1,)), ((), ())))


def _tiny(dtype) -> Array:
    return jnp.asarray(jnp.finfo(dtype).tiny, dtype)


DISCRETE_LEVELS = 10  # integer responses with at most this many distinct values look discrete


def _warn_if_discrete(y, name: str) -> None:
    """A DiscreteResponseWarning when concrete responses are 0/1 labels or a few integer levels: a
    Gaussian density on them can exceed 1, and its log-likelihood is not that of the labels."""
    if is_traced(y) or y.size == 0:
        return
    v = np.asarray(y, dtype=np.float64)
    if not np.all(v == np.round(v)):
        return
    levels = np.unique(v)
    if levels.size > DISCRETE_LEVELS:
        return
    binary = set(levels.tolist()) <= {0.0, 1.0}
    kind = "0/1 labels" if binary else f"{levels.size} integer levels"
    advice = ("the logistic family (LogisticMixture, --family logistic)" if binary else
              "the categorical or Poisson family (CategoricalMixture, PoissonRegressionMixture; "
              "--family categorical or poisson)")
    warnings.warn(DiscreteResponseWarning(
        f"y holds only {kind}: {name} models Gaussian responses, whose density on them is not a "
        f"probability (it can exceed 1); for discrete y use {advice}"), stacklevel=3)


@dataclass(frozen=True)
class ExpertsFamily(TableRows, EStepScheduling):
    """Base of the families whose experts are Gaussian regressions on a feature map.

    Subclasses define the gate g(x | eta_k); this class owns the heads and everything around them.
    Instances are frozen and hashable: they are static arguments of ``jax.jit``.
    """

    n_components: int
    n_features: int = 1
    n_heads: int = 1
    degree: int = 1
    basis_fn: Any = None
    shared_scale: bool = False
    reg: float = 1e-6

    def __post_init__(self):
        check_int("n_components", self.n_components, minimum=1)
        check_int("n_features", self.n_features, minimum=0)
        check_int("n_heads", self.n_heads, minimum=1)
        check_int("degree", self.degree, minimum=0)
        check_float("reg", self.reg, positive=True)
        if self.basis_fn is not None and not callable(self.basis_fn):
            raise TypeError(f"basis_fn must be callable or None, got {type(self.basis_fn).__name__}")
        if self.n_features == 0 and (self.degree > 0 and self.basis_fn is None):
            object.__setattr__(self, "degree", 0)

    # ------------------------------------------------------------------ shapes and names
    @property
    def basis(self) -> Basis:
        return Basis(self.n_features, self.degree, self.basis_fn)

    @property
    def n_coef(self) -> int:
        """P, the number of regression coefficients per head (intercept included)."""
        return self.basis.n_terms

    @property
    def coef_names(self) -> tuple[str, ...]:
        return self.basis.names

    def n_gate_params(self) -> int:
        return 0

    @property
    def n_params(self) -> int:
        """Number of free parameters (for BIC)."""
        K, H, P = self.n_components, self.n_heads, self.n_coef
        scales = H if self.shared_scale else K * H
        return (K - 1) + K * H * P + scales + self.n_gate_params()

    @property
    def min_component_count(self) -> int:
        """A component with fewer effective points than this can fit them exactly (spurious)."""
        return max(self.n_coef, self.n_features + 1) + 1

    # ------------------------------------------------------------------ input handling
    def check_data(self, x, y=None, weights=None, *, n_name: str = "x", host: bool = False):
        """Validates and converts (x, y, weights) to arrays of shapes (N, D), (N, H), (N,).

        ``x`` may be (N,) when D == 1 and None or (N, 0) when D == 0; ``y`` may be (N,) when H == 1.
        Values must be finite and within the working precision's range. ``host=True``: when no
        input is a JAX array, they come back as float64 numpy arrays (EM standardises them before
        rounding to the working precision); otherwise all are JAX arrays of the working dtype.
        """
        conv = lambda name, v, ndim: as_float_array(name, v, ndim=ndim, host=host)  # noqa: E731
        if x is None:
            if self.n_features != 0:
                raise TypeError(f"x must be an array of shape (N, {self.n_features}), got None")
            if y is None:
                raise TypeError("y is required when x is None")
            y_arr = conv("y", y, (1, 2))
            x = np.zeros((y_arr.shape[0], 0), dtype=y_arr.dtype)
        x = conv(n_name, x, (1, 2))
        if x.ndim == 1:
            if self.n_features != 1:
                raise ValueError(
                    f"{n_name} has shape {x.shape}; expected (N, {self.n_features}) for "
                    f"n_features={self.n_features}"
                )
            x = x[:, None]
        if x.shape[1] != self.n_features:
            raise ValueError(
                f"{n_name} must have {self.n_features} column(s) (n_features), got shape {x.shape}"
            )
        n = x.shape[0]
        if n < 1:
            raise ValueError(f"{n_name} must have at least one row, got shape {x.shape}")
        out = [x]
        if y is not None:
            y = conv("y", y, (1, 2))
            if y.ndim == 1:
                if self.n_heads != 1:
                    raise ValueError(
                        f"y has shape {y.shape}; expected (N, {self.n_heads}) for "
                        f"n_heads={self.n_heads}"
                    )
                y = y[:, None]
            if y.shape != (n, self.n_heads):
                raise ValueError(f"y must have shape ({n}, {self.n_heads}), got {y.shape}")
            _warn_if_discrete(y, type(self).__name__)
            out.append(y)
        if weights is not None:
            weights = conv("weights", weights, 1)
            if weights.shape != (n,):
                raise ValueError(f"weights must have shape ({n},), got {weights.shape}")
            if not isinstance(weights, jax.core.Tracer):
                if bool(jnp.any(weights < 0)) or not bool(jnp.sum(weights) > 0):
                    raise ValueError("weights must be >= 0 with a positive sum")
            out.append(weights)
        if all(isinstance(a, np.ndarray) for a in out):
            return tuple(out)
        dtype = next((a.dtype for a in out if not isinstance(a, np.ndarray)), x.dtype)
        return tuple(jnp.asarray(a, dtype) for a in out)

    def batch(self, x, y=None, weights=None) -> Batch:
        """The protocol's :class:`~conceptshift.models.batch.Batch` of (x, y, weights), validated
        as :meth:`check_data` (unit weights by default); y is required."""
        if y is None:
            raise TypeError("y must be an array of responses (N,) or (N, H), got None")
        arrays = self.check_data(x, y, weights)
        x, y = arrays[0], arrays[1]
        w = arrays[2] if weights is not None else jnp.ones((x.shape[0],), y.dtype)
        return Batch(x, y, w)

    def sample_batch(self, key, params, n: int) -> Batch:
        """n rows drawn from the model: x from :meth:`sample_x`, y ~ p(y | x), unit weights."""
        kx, ky = jax.random.split(key)
        x = self.sample_x(kx, params, n)
        return Batch(x, self.sample_conditional(ky, params, x), jnp.ones((n,), x.dtype))

    def sample_x(self, key, params, n: int) -> Array:
        """Covariates (n, D) for :meth:`sample_batch`: standard normal where the family models
        y given x only (its gate is not a law of x); gated families draw from their gate."""
        return jax.random.normal(key, (n, self.n_features), params.coef.dtype)

    def covariates(self, x) -> Array:
        """``x`` alone, validated as :meth:`check_data` validates it (what a resampled data set
        keeps)."""
        return self.check_data(x)[0]

    def resample_batch(self, key, params, x) -> Batch:
        """A parametric-bootstrap data set with the rows of ``x`` (validated covariates): x kept
        where the family models y given x only, redrawn (:meth:`sample_x`) where it models x too;
        y ~ p(y | x); unit weights."""
        kx, ky = jax.random.split(key)
        if self.models_x:
            x = self.sample_x(kx, params, x.shape[0])
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            y = self.sample_conditional(ky, params, x)
        return Batch(x, y, jnp.ones((x.shape[0],), x.dtype))

    def batch_log_likelihood(self, params, batch: Batch) -> Array:
        """sum_n w_n log p(x_n, y_n) (log p(y_n | x_n) for constant gates), a scalar."""
        return jnp.sum(batch.w * self.log_likelihood(params, batch.x, batch.y))

    def batch_model(self, batch: Batch):
        """:meth:`numpyro_model` conditioned on ``batch`` (the row weights scale the observations):
        the one NumPyro model SVI and NUTS run, with the batch as its argument."""
        self.numpyro_model(batch.x, batch.y, weights=batch.w)

    def match_cost(self, params_a, head_a, params_b, head_b) -> Array:
        """cost[k, j] (K, K): squared distance between head ``head_a`` of component k of fit a and
        head ``head_b`` of component j of fit b, each head as its coefficients and log-scale (the
        space Algorithm 1 matches components in)."""
        if head_a is None or head_b is None:
            raise ValueError(f"{type(self).__name__} matches components by a head (match='weak' or "
                             "'strong'); it has no head-free component signature")

        def vectors(p, h):
            return jnp.concatenate([p.coef[:, h, :], p.log_scale[:, h : h + 1]], axis=1)

        a, b = vectors(params_a, head_a), vectors(params_b, head_b)
        return jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)

    def match_dim(self, head) -> int:
        """The length of the vectors :meth:`match_cost` compares for ``head``: the head's
        coefficients and its log-scale."""
        if head is None:
            raise ValueError(f"{type(self).__name__} matches components by a head; it has no head-free "
                             "component signature")
        return self.n_coef + 1

    def relabel_vectors(self, params) -> Array:
        """One row per component, (K, F), that draws are aligned on: coefficients of every head,
        log-scales, log-weight and the gate's per-component fields."""
        K = self.n_components
        parts = [params.coef.reshape(K, -1), params.log_scale.reshape(K, -1), params.log_weights[:, None]]
        parts += [getattr(params, f).reshape(K, -1) for f in self.gate_fields()]
        return jnp.concatenate(parts, axis=1)

    def design(self, x: Array) -> Array:
        """Design matrix Phi (N, P) of x (N, D)."""
        return self.basis(x)

    # ------------------------------------------------------------------ densities
    def gate_log_probs(self, params, x: Array) -> Array:
        """log pi_k + log g(x | eta_k), shape (N, K). Constant gates give log pi_k."""
        return self.gate_log_probs_t(params, x.T).T

    def gate_log_probs_t(self, params, xT: Array) -> Array:
        """:meth:`gate_log_probs` in the E-step's layout: x (D, N) -> (K, N)."""
        raise NotImplementedError(f"{type(self).__name__} does not define gate_log_probs_t: an "
                                  "ExpertsFamily subclass defines its gate (see conceptshift.models.gated)")

    def marginal_x_log_prob(self, params, x: Array) -> Array:
        """log p(x) under the model, shape (N,); zero for families that do not model x."""
        return logsumexp(self.gate_log_probs(params, x), axis=-1)

    def expert_mean(self, params, x: Array) -> Array:
        """mu(x; theta_kh) = Phi(x) . beta_kh, shape (N, K, H)."""
        phi = self.design(x)
        return _p.einsum("np,khp->nkh", phi, params.coef)

    def head_distribution(self, params, x: Array) -> dist.Distribution:
        """phi(y; x, theta_k): Normal with batch (N, K) and event (H,)."""
        mean = self.expert_mean(params, x)
        scale = jnp.broadcast_to(jnp.exp(params.log_scale), mean.shape)
        return dist.Normal(mean, scale).to_event(1)

    def head_log_probs(self, params, x: Array, y: Array) -> Array:
        """sum_h log phi(y_h; x, theta_kh), shape (N, K)."""
        return self.head_distribution(params, x).log_prob(y[:, None, :])

    def _head_log_probs_t(self, params, phiT: Array, yT: Array):
        """Head log-densities (K, N) and residuals e = y - mu (K, H, N) in the E-step's layout."""
        K, H, P = params.coef.shape
        mu = _p.mm(params.coef.reshape(K * H, P), phiT).reshape(K, H, -1)
        e = yT[None, :, :] - mu
        inv = jnp.exp(-params.log_scale)[:, :, None]
        lp = jnp.sum(-0.5 * (e * inv) ** 2 - params.log_scale[:, :, None], axis=1)
        return lp - 0.5 * H * jnp.log(2 * jnp.pi), e

    def component_log_probs_t(self, params, xT: Array, yT: Array) -> Array:
        """:meth:`component_log_probs` in the E-step's layout: x (D, N), y (H, N) -> (K, N)."""
        head, _ = self._head_log_probs_t(params, self.basis.transposed(xT), yT)
        return self.gate_log_probs_t(params, xT) + head

    def component_log_probs(self, params, x: Array, y: Array) -> Array:
        """log pi_k + log g(x | eta_k) + log phi(y; x, theta_k), shape (N, K): EM's E-step quantity.

        Its logsumexp over K is the joint log-density log p(x, y) (log p(y | x) for constant gates).
        It equals ``distribution(params, x).component_log_probs(y) + marginal_x_log_prob`` (tested);
        it is computed in the (K, N) layout, where the reductions over K and D are fast.
        """
        x = self.rows(x)
        y = self.response_rows(y)
        return self.component_log_probs_t(params, x.T, y.T).T

    def batch_component_log_probs(self, params, batch: Batch) -> Array:
        """:meth:`component_log_probs` of a batch, (N, K) (the row weights are not applied)."""
        return self.component_log_probs_t(params, batch.x.T, batch.y.T).T

    def log_likelihood(self, params, x: Array, y: Array) -> Array:
        """Per-sample log p(x, y) (log p(y | x) when the family does not model x), shape (N,)."""
        x = self.rows(x)
        y = self.response_rows(y)
        return logsumexp(self.component_log_probs(params, x, y), axis=-1)

    def log_posterior_k(self, params, x: Array) -> Array:
        """log p(k | x), shape (N, K), in log space (no underflow to log 0)."""
        x = self.rows(x)
        return jax.nn.log_softmax(self.gate_log_probs(params, x), axis=-1)

    def posterior_k(self, params, x: Array) -> Array:
        """p(k | x), shape (N, K): the gate probabilities."""
        x = self.rows(x)
        return jax.nn.softmax(self.gate_log_probs(params, x), axis=-1)

    def distribution(self, params, x: Array) -> dist.MixtureSameFamily:
        """The conditional mixture p(y | x) = sum_k p(k | x) phi(y; x, theta_k) as a NumPyro
        distribution with batch shape (N,) and event shape (H,).

        Its ``component_log_probs(y)`` is ``log p(k | x) + log phi_k(y)``; adding
        ``marginal_x_log_prob`` gives :meth:`component_log_probs`.
        """
        x = self.rows(x)
        mixing = dist.Categorical(logits=jax.nn.log_softmax(self.gate_log_probs(params, x), -1))
        return dist.MixtureSameFamily(mixing, self.head_distribution(params, x))

    # conditional q(y|x) helpers, one head at a time
    def conditional_mean(self, params, x: Array, head: int = 0) -> Array:
        """E[y_head | x] = sum_k p(k | x) mu(x; theta_k), shape (N,)."""
        x = self.rows(x)
        return jnp.sum(self.posterior_k(params, x) * self.expert_mean(params, x)[..., head], -1)

    def conditional_log_prob(self, params, x: Array, y: Array, head: int = 0) -> Array:
        """log p(y_head | x), shape (N,), for y of shape (N,)."""
        x = self.rows(x)
        sub = self.select_heads(params, (head,))
        return logsumexp(
            jax.nn.log_softmax(self.gate_log_probs(params, x), -1)
            + self.head_log_probs(sub, x, y[:, None]),
            axis=-1,
        )

    def sample_conditional(self, key, params, x: Array) -> Array:
        """Draws y ~ p(y | x) for each row of x, shape (N, H)."""
        x = self.rows(x)
        return self.distribution(params, x).sample(key)

    def select_heads(self, params, heads: tuple[int, ...]):
        """The same parameters restricted to the given heads (e.g. ``(0,)`` for the strong label)."""
        idx = jnp.asarray(heads)
        return params._replace(coef=params.coef[:, idx], log_scale=params.log_scale[:, idx])

    def with_heads(self, n_heads: int):
        """This family with another number of response heads."""
        import dataclasses

        return dataclasses.replace(self, n_heads=n_heads)

    def permute(self, params, perm):
        """Reorders the components: component j of the result is component ``perm[j]`` of params."""
        perm = jnp.asarray(perm)
        return jax.tree_util.tree_map(lambda a: a[perm], params)

    @property
    def em_kind(self) -> str:
        """How ``fit_em`` fits this family: ``"closed_form"`` (the fused E-step and closed-form
        M-steps), ``"generalized"`` (an M-step that iterates: the softmax gate's inner optax loop)
        or ``"expected_stats"`` (the family's ``expected_stats`` and ``m_step_from_stats`` on a
        batch, run by the generic driver ``inference.stats_em``: the mixture of HMMs)."""
        return "closed_form"

    # ------------------------------------------------------------------ standard coordinates
    @property
    def models_x(self) -> bool:
        """Whether the likelihood includes the covariates' density (log p(x, y) rather than
        log p(y | x)): then a map of x moves it by its log-Jacobian too."""
        return False

    @property
    def standardises_x(self) -> bool:
        """Whether EM standardises the covariates (see :class:`Standardiser`)."""
        return self.basis.affine_closed

    def standardiser(self, x: Array, y: Array, w: Array, xp=jnp) -> Standardiser:
        """The :class:`Standardiser` of (x (N, D), y (N, H)) under weights w (N,)."""
        y_loc, y_scale = loc_scale(y, w, xp)
        if self.standardises_x and x.shape[1]:
            x_loc, x_scale = loc_scale(x, w, xp)
        else:
            x_loc, x_scale = xp.zeros(x.shape[1], y.dtype), xp.ones(x.shape[1], y.dtype)
        return Standardiser(x_loc, x_scale, y_loc, y_scale)

    def log_jacobian(self, std: Standardiser) -> Array:
        """log |d(z, u) / d(x, y)| per row: the raw log-likelihood of a row is its standardised one
        plus this."""
        out = -jnp.sum(jnp.log(std.y_scale))
        return out - jnp.sum(jnp.log(std.x_scale)) if self.models_x else out

    def _coef_map(self, std: Standardiser) -> Array:
        """M (P, P) with Phi(z) = M Phi(x) (the identity when x is not standardised)."""
        if self.standardises_x:
            return self.basis.affine_matrix(std.x_loc, std.x_scale)
        return jnp.eye(self.n_coef, dtype=std.y_loc.dtype)

    def _coef_map_inverse(self, std: Standardiser) -> Array:
        """M^-1: Phi(x) = M^-1 Phi(z), x = x_loc + x_scale z."""
        if self.standardises_x:
            return self.basis.affine_matrix(-std.x_loc / std.x_scale, 1.0 / std.x_scale)
        return jnp.eye(self.n_coef, dtype=std.y_loc.dtype)

    def params_from_standard(self, params, std: Standardiser):
        """Parameters on the raw data from parameters fitted to the standardised data: the same
        densities, exactly (raw log-density = standardised log-density + ``log_jacobian``)."""
        e0 = jnp.zeros((self.n_coef,), params.coef.dtype).at[0].set(1.0)
        coef = std.y_scale[None, :, None] * _p.einsum("pq,khp->khq", self._coef_map(std), params.coef)
        coef = coef + std.y_loc[None, :, None] * e0[None, None, :]
        out = params._replace(coef=coef, log_scale=params.log_scale + jnp.log(std.y_scale)[None, :])
        return self._gate_from_standard(out, std)

    def params_to_standard(self, params, std: Standardiser):
        """The inverse of :meth:`params_from_standard`."""
        e0 = jnp.zeros((self.n_coef,), params.coef.dtype).at[0].set(1.0)
        c = (params.coef - std.y_loc[None, :, None] * e0[None, None, :]) / std.y_scale[None, :, None]
        coef = _p.einsum("pq,khp->khq", self._coef_map_inverse(std), c)
        out = params._replace(coef=coef, log_scale=params.log_scale - jnp.log(std.y_scale)[None, :])
        return self._gate_to_standard(out, std)

    def _gate_from_standard(self, params, std: Standardiser):
        return params

    def _gate_to_standard(self, params, std: Standardiser):
        return params

    # ------------------------------------------------------------------ EM pieces
    def data_stats(self, x: Array, y: Array, w: Array) -> DataStats:
        n = jnp.sum(w)
        ybar = _p.mm(w, y) / n
        y_var = _p.mm(w, (y - ybar[None, :]) ** 2) / n
        xbar = _p.mm(w, x) / n
        x_var = _p.mm(w, (x - xbar[None, :]) ** 2) / n
        phi = self.design(x)
        phi_scale = _p.mm(w, phi**2) / n
        phi_scale = jnp.where(phi_scale > 0, phi_scale, jnp.ones_like(phi_scale))
        # constant columns or responses would give a zero floor: fall back to 1
        y_var = jnp.where(y_var > 0, y_var, jnp.ones_like(y_var))
        x_var = jnp.where(x_var > 0, x_var, jnp.ones_like(x_var))
        return DataStats(y_var, x_var, phi_scale, n, xbar)

    def _ridge(self, stats: DataStats) -> Array:
        """The ridge c (P,) of the coefficient prior, one value per design column: reg times the
        column's mean square."""
        return self.reg * stats.phi_scale

    def uses_gate_stats(self) -> bool:
        return False

    def _gate_nu(self, dtype) -> Array:
        """Prior pseudo-count of the gate covariances: reg, but never below 100 eps, so that a
        collapsed gate stays positive definite after float32 rounding of its scatter."""
        return jnp.maximum(jnp.asarray(self.reg, dtype), 100 * jnp.finfo(dtype).eps)

    def suff_stats(self, x, y, r, ref, stats: DataStats) -> SuffStats:
        """Sufficient statistics of (x, y) under weighted responsibilities r (N, K), residuals taken
        against ``ref`` (K, P, H)."""
        return self.suff_stats_t(x.T, y.T, r.T, ref, stats)

    def _design_t(self, xT: Array, stats: DataStats):
        """The design in the E-step's layout (P, N) and the map T back to the raw design.

        Polynomial bases are evaluated at x - xbar (centred on the data mean), so that products of
        design columns summed over many rows keep their accuracy in float32; T (P, P) maps the
        centred statistics to the raw ones exactly (``Basis.shift_matrix``). Other maps: (phi, None).
        """
        return self._design_only_t(xT, stats), self._shift_t(stats)

    def _design_only_t(self, xT: Array, stats: DataStats) -> Array:
        """The design (P, N) of :meth:`_design_t`, centred for polynomial bases."""
        return self.basis.transposed(xT - stats.x_mean[:, None] if self.basis.shiftable else xT)

    def _shift_t(self, stats: DataStats) -> Array | None:
        """T of :meth:`_design_t` (None when the design is not centred)."""
        return self.basis.shift_matrix(stats.x_mean) if self.basis.shiftable else None

    def suff_stats_t(self, xT, yT, rT, ref, stats: DataStats) -> SuffStats:
        """:meth:`suff_stats` in the E-step's layout: x (D, N), y (H, N), r (K, N)."""
        A, T = self._design_t(xT, stats)
        ref_c = ref if T is None else _p.einsum("qp,kqh->kph", T, ref)  # T^T ref
        K, H = rT.shape[0], yT.shape[0]
        mu = _p.mm(jnp.swapaxes(ref_c, 1, 2).reshape(K * H, -1), A).reshape(K, H, -1)
        return self._stats_from_r(xT, A, T, yT[None, :, :] - mu, rT, ref, stats)

    def _stats_from_r(self, xT, A, T, e, rT, ref, stats: DataStats) -> SuffStats:
        """The statistics of design A (P, N) and residuals e (K, H, N) under responsibilities r (K, N).

        S_pp is symmetric: only its P (P + 1) / 2 distinct column products are formed, once for all
        components, and reduced against r in one matrix product (N the contracted, minor axis).
        """
        K, N = rT.shape
        P, H = A.shape[0], e.shape[1]
        if self.pair_products(K, P):
            iu, ju = np.triu_indices(P)
            s_pp = _contract_minor(A[iu] * A[ju], rT)  # (P (P + 1) / 2, K)
        else:  # wide designs: one (K P, N) @ (N, P) product
            s_pp = _p.mm((rT[:, None, :] * A[None]).reshape(K * P, N), A.T).reshape(K, P, P)
        re = rT[:, None, :] * e  # (K, H, N)
        s_pe = _contract_minor(A, re.reshape(K * H, N)).reshape(P, K, H)
        s_ee = jnp.sum(re * e, axis=-1)
        nk = jnp.sum(rT, axis=-1)
        s_x = s_xx = None
        if self.uses_gate_stats() and T is None:
            D = xT.shape[0]
            xc = xT - stats.x_mean[:, None]
            rx = rT[:, None, :] * xc[None, :, :]  # (K, D, N)
            s_x = jnp.sum(rx, axis=-1)
            s_xx = _p.mm(rx.reshape(K * D, N), xc.T).reshape(K, D, D)
        return self._assemble_stats(nk, s_pp, s_pe, s_ee, ref, T, s_x, s_xx)

    def _assemble_stats(self, nk, s_pp, s_pe, s_ee, ref, T, s_x=None, s_xx=None) -> SuffStats:
        """SuffStats from the sums over samples: nk (K,), s_pp (K, P, P) or its distinct pair
        products (P (P + 1) / 2, K) in ``numpy.triu_indices`` order, s_pe (P, K, H), s_ee (K, H);
        in the centred design when T is given (mapped back to the raw design here). The gate's
        s_x, s_xx are read off s_pp when the design is centred, and passed in otherwise."""
        K, P = nk.shape[0], s_pe.shape[0]
        D = self.n_features
        if s_pp.ndim == 2:
            iu, ju = np.triu_indices(P)
            pair = np.zeros((P, P), dtype=np.int32)
            pair[iu, ju] = np.arange(iu.size)
            pair[ju, iu] = np.arange(iu.size)
            s_pp = s_pp.T[:, pair]  # (K, P, P)
        s_pe = jnp.swapaxes(s_pe, 0, 1)  # (K, P, H)
        if self.uses_gate_stats() and T is not None:
            # rows 1..D of the centred polynomial design are x - xbar
            s_x, s_xx = s_pp[:, 0, 1:D + 1], s_pp[:, 1:D + 1, 1:D + 1]
        elif not self.uses_gate_stats():
            s_x = jnp.zeros((K, 0), nk.dtype)
            s_xx = jnp.zeros((K, 0, 0), nk.dtype)
        if T is not None:
            s_pp = _p.einsum("pq,kqr,sr->kps", T, s_pp, T)
            s_pe = _p.einsum("pq,kqh->kph", T, s_pe)
        return SuffStats(nk, s_pp, s_pe, s_ee, ref, s_x, s_xx)

    def _gate_rows(self, params, stats: DataStats, centred: bool):
        """The gate as rows of one matrix product with the design: log pi_k + log g(x | eta_k)
        = c_k - |Z_k a|^2 / 2 with Z_k (G, P) acting on the design column a. Returns (Z (K, G, P),
        c (K,)); G = 0 for constant gates. None (the default): the gate is evaluated on its own by
        ``gate_log_probs_t``."""
        return None

    @staticmethod
    def rebase(ss: SuffStats, new_ref: Array) -> SuffStats:
        """The same statistics with residuals against another reference (exact algebra)."""
        d = new_ref - ss.ref  # (K, P, H)
        s_ppd = _p.einsum("kpq,kqh->kph", ss.s_pp, d)
        s_pe = ss.s_pe - s_ppd
        s_ee = ss.s_ee - 2 * jnp.sum(d * ss.s_pe, axis=1) + jnp.sum(d * s_ppd, axis=1)
        return ss._replace(s_pe=s_pe, s_ee=s_ee, ref=new_ref)

    def _heads_from_stats(self, ss: SuffStats, stats: DataStats):
        """Closed-form (log_weights, coef, log_scale) maximising the penalised expected
        log-likelihood given the statistics."""
        dtype = ss.s_pp.dtype
        K = ss.nk.shape[0]
        nu = jnp.asarray(self.reg, dtype)
        nk = ss.nk
        log_weights = jnp.log(nk + nu) - jnp.log(stats.n + K * nu)
        c = self._ridge(stats)
        gram = ss.s_pp + jnp.diag(c)[None]
        # normal equations for y = e + phi . ref:  (S_pp + diag c) beta = S_pe + S_pp ref
        rhs = ss.s_pe + _p.einsum("kpq,kqh->kph", ss.s_pp, ss.ref)
        beta = _solve_psd(gram, rhs)  # (K, P, H)
        moved = self.rebase(ss, beta)  # residual sums against the new coefficients
        rss = jnp.maximum(moved.s_ee, 0.0)  # (K, H)
        coef = jnp.swapaxes(beta, 1, 2)  # (K, H, P)
        pen = jnp.sum(c[None, None, :] * coef**2, axis=-1)  # (K, H)
        H = coef.shape[1]
        if self.shared_scale:
            s2 = (jnp.sum(rss + pen, 0) + nu * stats.y_var) / (stats.n + nu)
            s2 = jnp.broadcast_to(s2, (K, H))
        else:
            s2 = (rss + pen + nu * stats.y_var[None, :]) / (nk[:, None] + nu)
        return log_weights, coef, 0.5 * jnp.log(s2)

    def m_step_from_stats(self, ss: SuffStats, stats: DataStats):
        """Parameters maximising the expected penalised log-likelihood given the statistics."""
        raise NotImplementedError(f"{type(self).__name__} does not define m_step_from_stats: an "
                                  "ExpertsFamily subclass defines its gate (see conceptshift.models.gated)")

    def _log_prior_heads(self, params, stats: DataStats) -> Array:
        dtype = params.coef.dtype
        nu = jnp.asarray(self.reg, dtype)
        c = self._ridge(stats)
        s2 = jnp.exp(2 * params.log_scale)
        lp = nu * jnp.sum(params.log_weights)
        lp = lp - jnp.sum(jnp.sum(c[None, None, :] * params.coef**2, -1) / (2 * s2))
        var_terms = -0.5 * nu * jnp.log(s2) - nu * stats.y_var[None, :] / (2 * s2)  # (K, H)
        lp = lp + (jnp.sum(var_terms[0]) if self.shared_scale else jnp.sum(var_terms))
        return lp

    def m_step(self, x: Array, y: Array, r: Array, stats: DataStats):
        """Parameters maximising the expected penalised log-likelihood given r (N, K)."""
        ref = jnp.zeros((r.shape[1], self.n_coef, self.n_heads), y.dtype)
        first = self.m_step_from_stats(self.suff_stats(x, y, r, ref, stats), stats)
        # second pass: residuals against the new coefficients, for accurate variances
        ref = jnp.swapaxes(first.coef, 1, 2)
        return self.m_step_from_stats(self.suff_stats(x, y, r, ref, stats), stats)

    def log_prior(self, params, stats: DataStats) -> Array:
        """The weak prior's log-density (up to a constant); EM maximises loglik + this."""
        raise NotImplementedError(f"{type(self).__name__} does not define log_prior: an "
                                  "ExpertsFamily subclass defines its gate (see conceptshift.models.gated)")

    def degenerate_components(self, params, x: Array, y: Array, w: Array, stats: DataStats):
        """Boolean (K,): components that sit on a spurious, unbounded-likelihood solution.

        A component is degenerate when it holds fewer than ``min_component_count`` effective points
        (it can fit them exactly) or when its residual sum of squares is below the prior's
        pseudo-sum nu * v_h (it fits its points exactly, e.g. on tied values).
        """
        logp = self.component_log_probs(params, x, y)
        r = jnp.exp(logp - logsumexp(logp, -1, keepdims=True)) * w[:, None]
        nk = jnp.sum(r, 0)
        resid = y[:, None, :] - self.expert_mean(params, x)
        rss = _p.einsum("nk,nkh->kh", r, resid**2)
        few = nk < self.min_component_count
        exact = jnp.any(rss <= self.reg * stats.y_var[None, :], axis=-1)
        return few | exact | self._degenerate_gates(params, x, r, stats)

    def _degenerate_gates(self, params, x, r, stats):
        return jnp.zeros((self.n_components,), dtype=bool)

    # ------------------------------------------------------------------ posterior sites
    def fit_report(self, params) -> dict:
        """The family's parameters for a fit summary (JSON-ready lists): ``coef`` (K x P; K x H x P
        for several heads), ``scale`` (K; K x H) and the gate's fields."""
        coef = np.asarray(params.coef)
        scale = np.exp(np.asarray(params.log_scale))
        if self.n_heads == 1:
            coef, scale = coef[:, 0, :], scale[:, 0]
        out = {"coef": coef.tolist(), "scale": scale.tolist()}
        for name in self.gate_fields():  # gate_mean, gate_cov (gated); gate_weights (softmax)
            out[name] = np.asarray(getattr(params, name)).tolist()
        return out

    def gate_fields(self) -> tuple[str, ...]:
        """The parameter fields of the gate beyond ``log_weights`` (none for constant gates)."""
        return ()

    def site_names(self) -> tuple[str, ...]:
        """The latent sites of :meth:`numpyro_model` in the order they are sampled."""
        return ("weights", "coef", "scale") + self._gate_site_names()

    def to_sites(self, params) -> dict[str, Array]:
        """The latent site values (constrained space) that give ``params`` (weights renormalised;
        a shared scale read from component 0): what SVI, NUTS and relabelling work on."""
        w = jnp.exp(params.log_weights - logsumexp(params.log_weights))
        scale = jnp.exp(params.log_scale)
        if self.shared_scale:
            scale = scale[:1]
        return {"weights": w, "coef": params.coef, "scale": scale, **self._gate_to_sites(params)}

    def from_sites(self, sites: dict):
        """The parameter pytree from one set of latent site values (no leading draw axes;
        ``jax.vmap`` it over draws)."""
        K, H = self.n_components, self.n_heads
        coef = sites["coef"]
        scale = jnp.broadcast_to(sites["scale"], (K, H))
        return self._params_from_sites(jnp.log(sites["weights"]), coef, jnp.log(scale),
                                       self._gate_from_sites(sites, coef.dtype))

    def _gate_site_names(self) -> tuple[str, ...]:
        return ()

    def _gate_to_sites(self, params) -> dict:
        return {}

    def _gate_from_sites(self, sites: dict, dtype) -> dict:
        return {}

    # ------------------------------------------------------------------ NumPyro model
    def numpyro_model(self, x: Array, y: Array | None = None, *, weights: Array | None = None):
        """The generative model with weakly informative priors, for SVI and NUTS.

        Sites: ``weights`` (K,), ``coef`` (K, H, P), ``scale`` (K, H), the family's gate sites,
        then ``x`` (gated families only) and ``y`` (N, H), both marginalised over k. ``weights``
        (N,): each row's observations count ``weights[n]`` times (``numpyro.handlers.scale``).
        """
        import contextlib

        import numpyro

        rows = contextlib.nullcontext() if weights is None else numpyro.handlers.scale(scale=weights)

        K, H, P = self.n_components, self.n_heads, self.n_coef
        dtype = x.dtype
        weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(K, dtype)))
        coef = numpyro.sample("coef", dist.Normal(jnp.zeros((K, H, P), dtype), 10.0).to_event(3))
        scale_shape = (1, H) if self.shared_scale else (K, H)
        scale = numpyro.sample("scale", dist.HalfNormal(jnp.full(scale_shape, 10.0, dtype)).to_event(2))
        scale = jnp.broadcast_to(scale, (K, H))
        params = self._params_from_sites(jnp.log(weights), coef, jnp.log(scale), self._gate_sites(x))
        with rows:  # (the row weights; the name ``weights`` is the proportions' site below)
            self._observe_x(params, x)
            numpyro.sample("y", self.distribution(params, x), obs=y)

    def _gate_sites(self, x):
        return {}

    def _observe_x(self, params, x):
        pass

    def _params_from_sites(self, log_weights, coef, log_scale, gate_sites):
        raise NotImplementedError(f"{type(self).__name__} does not define _params_from_sites: an "
                                  "ExpertsFamily subclass defines its gate (see conceptshift.models.gated)")

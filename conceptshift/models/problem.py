"""Ground truth for latent concept shift (Assumptions 2.1-2.4): a problem generator and a simulator.

A :class:`Problem` holds one two-head family (head 0: the strong label y, head 1: the weak label y')
and two parameter sets that share the gates and strong heads theta_k:

- ``params_p``: proportions pi^p and weak heads theta^{wp} (the source P);
- ``params_q``: proportions pi^q and weak heads theta^{wq} (the target Q).

For constant gates (mixture of regressions, and the generalized linear experts for classes and
counts: ``"logistic"``, ``"categorical"``, ``"poisson"``) both domains draw x from the same
N(0, x_scale^2 I) (Assumption 2.3). For Gaussian gates each domain draws x from its own gate mixture
(Assumption 2.4; the two assumptions cannot both hold when g is not constant, see the README's notes on
the paper).

For the generalized linear families the weak labeller is its own head: p(y' | x, k) is the same GLM
with coefficients theta^{wp}_k = theta_k + weak_bias u_k (a label of the same type as y, biased per
concept) in the source and theta^{wq}_k = theta^{wp}_k + weak_shift v_k in the target; ``noise`` and
``weak_noise`` do not apply (the response's own law sets its noise), ``separation`` is in units of the
linear predictor (logits, log-rates).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .._validation import check_float, check_int, check_key, float_dtype
from ._experts import ExpertsFamily
from .assignment import assign
from .gated import GatedExperts, GatedParams
from .glm import CategoricalMixture, GLMParams, LogisticMixture, PoissonRegressionMixture
from .regression import RegressionMixture, RegressionParams

FAMILIES = ("regression", "gated", "logistic", "categorical", "poisson")
GLM_FAMILIES = {"logistic": LogisticMixture, "categorical": CategoricalMixture,
                "poisson": PoissonRegressionMixture}


@dataclass(frozen=True)
class ProblemSpec:
    """Knobs of a simulated latent-concept-shift problem.

    Args:
      family: ``"regression"`` (constant gates), ``"gated"`` (Gaussian gates), or the generalized
        linear experts ``"logistic"`` (y in 0/1), ``"categorical"`` (``n_classes`` classes),
        ``"poisson"`` (counts), with constant gates (module docs).
      n_components: K.
      n_features: D.
      degree: polynomial degree of the experts' feature map.
      separation: smallest distance between two components' strong coefficient vectors.
      noise: standard deviation of the strong heads.
      shift: size of the proportion shift; pi^p = softmax(+shift/2 c), pi^q = softmax(-shift/2 c)
        with c evenly spaced in [-1, 1].
      weak_bias: distance between theta_k and the weak source head theta^{wp}_k.
      weak_shift: distance between theta^{wp}_k and theta^{wq}_k (Assumption 4.5 (ii): c > this^2).
      weak_noise: standard deviation of the weak heads.
      delta: if given, ``weak_shift`` is chosen so that the distinguishability of Assumption 4.5 equals
        this value (see :meth:`Problem.distinguishability`).
      gate_separation: distance between gate means (gated family), in units of x_scale.
      x_scale: standard deviation of x (regression) or of each gate (gated).
      n_classes: classes of a categorical response (family ``"categorical"``).
    """

    family: str = "regression"
    n_components: int = 3
    n_features: int = 1
    degree: int = 1
    separation: float = 3.0
    noise: float = 0.5
    shift: float = 2.0
    weak_bias: float = 0.5
    weak_shift: float = 0.3
    weak_noise: float = 1.0
    delta: float | None = None
    gate_separation: float = 3.0
    x_scale: float = 1.0
    n_classes: int = 3

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        check_int("n_components", self.n_components, minimum=1)
        check_int("n_features", self.n_features, minimum=1)
        check_int("degree", self.degree, minimum=1)
        for name in ("separation", "noise", "weak_noise", "x_scale"):
            check_float(name, getattr(self, name), positive=True)
        for name in ("shift", "weak_bias", "weak_shift", "gate_separation"):
            check_float(name, getattr(self, name), nonnegative=True)
        if self.delta is not None:
            check_float("delta", self.delta)
        check_int("n_classes", self.n_classes, minimum=2)
        if self.family in GLM_FAMILIES and self.degree != 1:
            raise ValueError(f"degree must be 1 for family {self.family!r} (generalized linear "
                             f"experts are linear in x), got {self.degree}")

    def model(self, n_heads: int = 2):
        if self.family in GLM_FAMILIES:
            extra = {"n_classes": self.n_classes} if self.family == "categorical" else {}
            return GLM_FAMILIES[self.family](self.n_components, self.n_features, n_heads=n_heads,
                                             **extra)
        cls = RegressionMixture if self.family == "regression" else GatedExperts
        return cls(self.n_components, self.n_features, n_heads=n_heads, degree=self.degree)


@dataclass(frozen=True)
class Problem:
    """A latent-concept-shift problem with known ground truth (see module docs).

    A pytree: its parameters are leaves, so a compiled function can take problems as arguments.
    """

    spec: ProblemSpec
    params_p: RegressionParams | GatedParams | GLMParams
    params_q: RegressionParams | GatedParams | GLMParams

    @property
    def model(self) -> ExpertsFamily:
        """The two-head family (y, y') both domains are drawn from."""
        return self.spec.model(2)

    @property
    def strong_model(self) -> ExpertsFamily:
        return self.spec.model(1)

    def heads(self, domain: str, which: str):
        """Single-head parameters: ``which`` is ``"strong"`` or ``"weak"``, domain ``"p"``/``"q"``."""
        params = {"p": self.params_p, "q": self.params_q}[domain]
        return self.model.select_heads(params, (0,) if which == "strong" else (1,))

    def true_mean(self, x: Array) -> Array:
        """q(x) = E_Q[y | x], shape (N,)."""
        return self.model.conditional_mean(self.params_q, x, head=0)

    def true_log_prob(self, x: Array, y: Array) -> Array:
        """log q(y | x), shape (N,)."""
        return self.model.conditional_log_prob(self.params_q, x, y, head=0)

    def source_mean(self, x: Array) -> Array:
        """p(x) = E_P[y | x], shape (N,)."""
        return self.model.conditional_mean(self.params_p, x, head=0)

    def distinguishability(self) -> float:
        """Delta of Assumption 4.5: min_k min_{k' != k} |theta^wq_k - theta^wp_k'|^2
        - max_k |theta^wq_k - theta^wp_k|^2 (coefficients and log-scales of the weak heads)."""
        return float(_delta(_weak_vectors(self.params_p), _weak_vectors(self.params_q)))

    def simulate_data(self, key, n_source: int, n_target: int, n_test: int) -> Simulation:
        """:func:`simulate` (the truth's side of the experiments' protocol; traceable)."""
        return simulate(key, self, n_source, n_target, n_test)

    def truth_labels(self, params, head: int, domain: str, true_head: int) -> Array:
        """For each fitted component, the true component it estimates, shape (K,): the optimal
        assignment of the fit's ``head`` against head ``true_head`` (0: y, 1: y') of the truth in
        ``domain``, by the family's matching cost."""
        true = self.params_p if domain == "p" else self.params_q
        return assign(self.model.match_cost(params, head, true, true_head))

    def param_errors(self, params, domain: str) -> dict:
        """Errors of a fit's first head against ``domain``'s strong components after the best
        permutation: ``coef_error`` sum_k |betâ_{s(k)} - beta_k|^2 and ``weight_error``
        sum_k |pî_{s(k)} - pi_k| (twice the total-variation distance of the proportions)."""
        true = self.params_p if domain == "p" else self.params_q
        K = true.coef.shape[0]
        a, b = true.coef[:, 0].reshape(K, -1), params.coef[:, 0].reshape(K, -1)
        cost = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)
        perm = assign(cost)
        return {"coef_error": jnp.sum(cost[jnp.arange(cost.shape[0]), perm]),
                "weight_error": jnp.sum(jnp.abs(jnp.exp(params.log_weights[perm])
                                                - jnp.exp(true.log_weights)))}

    def sample_x(self, key, n: int, domain: str) -> Array:
        """Draws n covariates from domain ``"p"`` or ``"q"``, shape (n, D)."""
        spec = self.spec
        dtype = self.params_p.coef.dtype
        if spec.family != "gated":
            return spec.x_scale * jax.random.normal(key, (n, spec.n_features), dtype)
        params = self.params_p if domain == "p" else self.params_q
        with jax.numpy_rank_promotion("allow"):  # numpyro's MVN sampler broadcasts implicitly
            return self.model.x_distribution(params).sample(key, (n,))


def _problem_flatten(p: Problem):
    # delta and weak_shift only matter when the problem is drawn: keep them out of the static part
    # so that problems of different Delta share one compiled program
    spec = dataclasses.replace(p.spec, delta=None, weak_shift=0.0)
    return (p.params_p, p.params_q), spec


jax.tree_util.register_pytree_node(
    Problem, _problem_flatten, lambda spec, children: Problem(spec, *children)
)


def _weak_vectors(params) -> Array:
    """The weak heads' parameters, one row per component: coefficients and, where the family has
    one, the log-scale."""
    K = params.coef.shape[0]
    parts = [params.coef[:, 1].reshape(K, -1)]
    if hasattr(params, "log_scale"):
        parts.append(params.log_scale[:, 1:])
    return jnp.concatenate(parts, axis=1)


def _delta(wp: Array, wq: Array) -> Array:
    d2 = jnp.sum((wq[:, None, :] - wp[None, :, :]) ** 2, -1)  # (K, K): [k, k']
    K = d2.shape[0]
    own = jnp.diagonal(d2)
    if K == 1:
        return -jnp.max(own)
    other = jnp.min(jnp.where(jnp.eye(K, dtype=bool), jnp.inf, d2))
    return other - jnp.max(own)


def _spread(rng: np.random.Generator, k: int, dim: int, min_dist: float) -> np.ndarray:
    """k points in R^dim, centred, rescaled so that their smallest pairwise distance is min_dist."""
    pts = rng.normal(size=(k, dim))
    if k == 1:
        return np.zeros((1, dim))
    if dim == 1:
        pts = np.linspace(-1.0, 1.0, k)[:, None][rng.permutation(k)]
    pts = pts - pts.mean(0)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    d = d[~np.eye(k, dtype=bool)].min()
    return pts * (min_dist / d)


def _unit(rng: np.random.Generator, k: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(k, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_problem(key, spec: ProblemSpec | None = None, **knobs) -> Problem:
    """Draws a latent-concept-shift problem.

    Args:
      key: a ``jax.random`` key (the problem is a deterministic function of it).
      spec: a :class:`ProblemSpec`; keyword knobs override its fields.

    Example:
      >>> import jax
      >>> prob = make_problem(jax.random.key(0), n_components=2, shift=1.0)
      >>> prob.params_p.coef.shape   # (K, heads (y, y'), P)
      (2, 2, 2)
    """
    key = check_key("key", key)
    spec = dataclasses.replace(spec or ProblemSpec(), **knobs)
    seed = np.asarray(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    rng = np.random.default_rng(int(seed))
    K, D = spec.n_components, spec.n_features
    model = spec.model(2)
    R = getattr(model, "n_predictors", 1)  # linear predictors per head (categorical: C - 1)
    P = R * model.n_coef
    dtype = float_dtype()

    theta = _spread(rng, K, P, spec.separation)
    theta[:, 0] += rng.normal()  # a common offset
    c = np.linspace(-1.0, 1.0, K) if K > 1 else np.zeros(1)
    log_pi_p = jax.nn.log_softmax(jnp.asarray(spec.shift / 2 * c))
    log_pi_q = jax.nn.log_softmax(jnp.asarray(-spec.shift / 2 * c))
    theta_wp = theta + spec.weak_bias * _unit(rng, K, P)
    direction = _unit(rng, K, P)
    means = _spread(rng, K, D, spec.gate_separation * spec.x_scale) if K > 1 else np.zeros((1, D))

    def build(weak_shift: float):
        theta_wq = theta_wp + weak_shift * direction
        log_s = np.log(np.array([spec.noise, spec.weak_noise]))
        log_scale = np.broadcast_to(log_s, (K, 2))
        coef_p = np.stack([theta, theta_wp], axis=1)
        coef_q = np.stack([theta, theta_wq], axis=1)
        arr = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        if spec.family in GLM_FAMILIES:
            shape = (K, 2, R, model.n_coef)
            pp = GLMParams(arr(log_pi_p), arr(coef_p.reshape(shape)))
            pq = GLMParams(arr(log_pi_q), arr(coef_q.reshape(shape)))
        elif spec.family == "regression":
            pp = RegressionParams(arr(log_pi_p), arr(coef_p), arr(log_scale))
            pq = RegressionParams(arr(log_pi_q), arr(coef_q), arr(log_scale))
        else:
            cov = np.broadcast_to(np.eye(D) * spec.x_scale**2, (K, D, D))
            pp = GatedParams(arr(log_pi_p), arr(coef_p), arr(log_scale), arr(means), arr(cov))
            pq = GatedParams(arr(log_pi_q), arr(coef_q), arr(log_scale), arr(means), arr(cov))
        return Problem(spec, pp, pq)

    if spec.delta is None:
        return build(spec.weak_shift)

    def delta_of(s):
        return build(s).distinguishability()

    lo, hi = 0.0, 4.0 * spec.separation + 1.0
    if delta_of(lo) < spec.delta:
        raise ValueError(
            f"delta={spec.delta} is out of reach: the largest distinguishability with "
            f"separation={spec.separation} and weak_bias={spec.weak_bias} is {delta_of(lo):.4g}"
        )
    while delta_of(hi) > spec.delta:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if delta_of(mid) > spec.delta else (lo, mid)
    return build(0.5 * (lo + hi))


class Sample(NamedTuple):
    x: Array  # (N, D)
    y: Array | None  # (N,) strong label
    y_weak: Array | None  # (N,) weak label
    k: Array  # (N,) the latent concept (never seen by the estimators)


class Simulation(NamedTuple):
    source: Sample  # (x, y, y') ~ P
    target: Sample  # (x, y') ~ Q; its gold y is there for the oracle only
    test: Sample  # gold (x, y) ~ Q, y' withheld (None)


def _draw(problem: Problem, key, n: int, domain: str) -> tuple[Array, Array, Array]:
    kx, ky = jax.random.split(key)
    params = problem.params_p if domain == "p" else problem.params_q
    x = problem.sample_x(kx, n, domain)
    model = problem.model
    if hasattr(model, "sample_with_components"):
        ys, k = model.sample_with_components(ky, params, x)
        return x, ys, k
    with jax.numpy_rank_promotion("allow"):  # numpyro's mixture sampler broadcasts implicitly
        ys, (k,) = model.distribution(params, x).sample_with_intermediates(ky)
    return x, ys, k


def simulate(key, problem: Problem, n_source: int, n_target: int, n_test: int) -> Simulation:
    """Draws the source sample (x, y, y'), the weak target sample (x, y') and a gold test sample.

    ``target.y`` holds the target's gold labels: no estimator but the oracle may read them.

    Example:
      >>> import jax
      >>> prob = make_problem(jax.random.key(0))
      >>> sim = simulate(jax.random.key(1), prob, 100, 200, 50)
      >>> sim.source.x.shape, sim.target.y_weak.shape, sim.test.y.shape
      ((100, 1), (200,), (50,))
    """
    key = check_key("key", key)
    n_source = check_int("n_source", n_source, minimum=1)
    n_target = check_int("n_target", n_target, minimum=1)
    n_test = check_int("n_test", n_test, minimum=1)
    ks, kt, ke = jax.random.split(key, 3)
    x, ys, k = _draw(problem, ks, n_source, "p")
    source = Sample(x, ys[:, 0], ys[:, 1], k)
    x, ys, k = _draw(problem, kt, n_target, "q")
    target = Sample(x, ys[:, 0], ys[:, 1], k)
    x, ys, k = _draw(problem, ke, n_test, "q")
    test = Sample(x, ys[:, 0], None, k)
    return Simulation(source, target, test)

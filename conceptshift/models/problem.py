"""Ground truth for latent concept shift (Assumptions 2.1-2.4): a problem generator and a simulator.

A :class:`Problem` holds one two-head family (head 0: the strong label y, head 1: the weak label y')
and two parameter sets that share the gates and strong heads theta_k:

- ``params_p``: proportions pi^p and weak heads theta^{wp} (the source P);
- ``params_q``: proportions pi^q and weak heads theta^{wq} (the target Q).

(Knobs that break the assumptions on purpose: ``strong_drift`` moves the target's strong heads,
``covariate_shift`` the target's x, ``weak_swap`` the target's weak heads towards other concepts'.)

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

For the class families (``"logistic"``, ``"categorical"``) the weak labeller may instead be a
label-noise (confusion) model, ``weak_labeller="noise"``: y' is the strong label y, replaced with
probability rho_k (a flip rate per concept: ``flip_p`` in the source, ``flip_q`` in the target) by a
label drawn from T_k[y, .] (``flip_target``, (K, C, C)): the confusion matrix is C_k = (1 - rho_k) I +
rho_k T_k. ``flip_to="class"`` sends every flip of concept k to one class c_k (drawn per concept; a
supervisor that says c_k when unsure, which moves its decision boundary), ``flip_to="other"`` to one
of the other classes uniformly (symmetric noise: below rho_k = 1/2 it leaves each concept's decisions
those of y, so the weak labeller's errors barely differ from the strong labels'). The rates are
spread over the concepts, rho^p_k = flip + flip_spread c_k (c evenly spaced in [-1/2, 1/2], in random
order); rho^q = rho^p + weak_shift v, v a unit vector in R^K, clipped to [0, 1]. The weak heads of the
fitted families (a GLM per concept) then do not contain the truth: p(y' | x, k) =
sum_v p(y = v | x, k) C_k[v, y'] is not a GLM in x, and y' depends on y given (x, k).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.scipy.special import logsumexp

from .._validation import check_float, check_int, check_key, float_dtype
from ._experts import ExpertsFamily
from .assignment import assign
from .gated import GatedExperts, GatedParams
from .glm import CategoricalMixture, GLMParams, LogisticMixture, PoissonRegressionMixture
from .regression import RegressionMixture, RegressionParams, StudentRegressionMixture
from .softmax_gated import SoftmaxGatedExperts, SoftmaxGatedParams

FAMILIES = ("regression", "gated", "softmax", "logistic", "categorical", "poisson")
WEAK_LABELLERS = ("heads", "noise")
FLIP_TO = ("class", "other")
CLASS_FAMILIES = ("logistic", "categorical")
GLM_FAMILIES = {"logistic": LogisticMixture, "categorical": CategoricalMixture,
                "poisson": PoissonRegressionMixture}


@dataclass(frozen=True)
class ProblemSpec:
    """Knobs of a simulated latent-concept-shift problem.

    Args:
      family: ``"regression"`` (constant gates), ``"gated"`` (Gaussian gates), ``"softmax"``
        (softmax gates p(k | x) = softmax(b + W x) over one p(x) = N(0, x_scale^2 I) shared by both
        domains: b carries the proportions, W (spread by ``gate_separation``) is shared, so x says
        nothing about pi^q), or the generalized
        linear experts ``"logistic"`` (y in 0/1), ``"categorical"`` (``n_classes`` classes),
        ``"poisson"`` (counts), with constant gates (module docs).
      n_components: K.
      n_features: D.
      degree: polynomial degree of the experts' feature map.
      separation: smallest distance between two components' strong coefficient vectors.
      noise: standard deviation of the strong heads (the t scale with ``noise_df``).
      shift: size of the proportion shift; pi^p = softmax(+shift/2 c), pi^q = softmax(-shift/2 c)
        with c evenly spaced in [-1, 1].
      weak_bias: distance between theta_k and the weak source head theta^{wp}_k.
      weak_shift: distance between theta^{wp}_k and theta^{wq}_k (Assumption 4.5 (ii): c > this^2).
      weak_noise: standard deviation of the weak heads (the t scale with ``noise_df``).
      delta: if given, ``weak_shift`` is chosen so that the distinguishability of Assumption 4.5 equals
        this value (see :meth:`Problem.distinguishability`).
      gate_separation: distance between gate means (gated family), in units of x_scale.
      x_scale: standard deviation of x (regression) or of each gate (gated).
      n_classes: classes of a categorical response (family ``"categorical"``).
      weak_labeller: ``"heads"`` (the weak label is its own head of the family) or ``"noise"``
        (class families: the strong label flipped at a per-concept rate; module docs).
      flip: mean flip rate of the label-noise labeller over the concepts (source).
      flip_spread: range of the source flip rates over the concepts.
      flip_to: where a flipped label goes: ``"class"`` (one class per concept) or ``"other"``
        (another class, uniformly).
      weak_swap: fraction of the way each target weak head moves towards the next concept's source
        weak head (cyclically, k -> k + 1 mod K), on top of ``weak_shift``: 0 leaves it, 1/2 puts it
        halfway (the matching of Algorithm 1 has no margin left, see
        :meth:`Problem.population_margin`), 1 gives the target concept k the weak head of source
        concept k + 1, where the optimal matching is wrong even with the population.
      pi_p, pi_q: the proportions of P and of Q (K values >= 0 summing to 1; zeros allowed, e.g. a
        one-hot pi^q); when given they replace the ``shift`` construction for that domain.
      covariate_shift: families whose x is not drawn from their gates (constant and softmax
        gates): the target's x is drawn around covariate_shift * x_scale along the first coordinate
        instead of 0 (a shift of p(x) between the domains; the gold test sample follows the
        target).
      strong_drift: the target's strong heads move from the source's, theta^q_k = theta_k +
        strong_drift w_k with w_k unit vectors (the components are then not shared: Assumption 2.1
        fails by that much).
      noise_df: 0 (default) for Gaussian noise; nu > 1 for Student's t noise with nu degrees of
        freedom in every head of both domains (family ``"regression"``; :meth:`model` is then a
        :class:`~conceptshift.models.regression.StudentRegressionMixture`, while the estimators
        fit :meth:`fit_model`, the Gaussian family: a heavy-tailed truth under a misspecified
        noise law).
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
    weak_labeller: str = "heads"
    flip: float = 0.3
    flip_spread: float = 0.5
    flip_to: str = "class"
    weak_swap: float = 0.0
    covariate_shift: float = 0.0
    strong_drift: float = 0.0
    pi_p: tuple[float, ...] | None = None
    pi_q: tuple[float, ...] | None = None
    noise_df: float = 0.0

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
        check_float("weak_swap", self.weak_swap, nonnegative=True)
        check_float("covariate_shift", self.covariate_shift)
        check_float("strong_drift", self.strong_drift, nonnegative=True)
        if self.covariate_shift and self.family == "gated":
            raise ValueError("covariate_shift applies to constant gates: a Gaussian gate's x is drawn "
                             "from its own mixture in each domain already")
        for name in ("pi_p", "pi_q"):
            pi = getattr(self, name)
            if pi is None:
                continue
            v = np.asarray(pi, dtype=np.float64)
            if v.shape != (self.n_components,) or not np.all(np.isfinite(v)) or np.any(v < 0) \
                    or abs(v.sum() - 1.0) > 1e-6:
                raise ValueError(f"{name} must be {self.n_components} proportions (n_components) "
                                 f">= 0 summing to 1, got {pi!r}")
            object.__setattr__(self, name, tuple(float(a) for a in v))
        if self.weak_labeller not in WEAK_LABELLERS:
            raise ValueError(f"weak_labeller must be one of {WEAK_LABELLERS}, got "
                             f"{self.weak_labeller!r}")
        if self.weak_labeller == "noise":
            if self.family not in CLASS_FAMILIES:
                raise ValueError(f"weak_labeller='noise' (label noise) needs class labels: family "
                                 f"must be one of {CLASS_FAMILIES}, got {self.family!r}")
            if self.flip_to not in FLIP_TO:
                raise ValueError(f"flip_to must be one of {FLIP_TO}, got {self.flip_to!r}")
            if self.weak_swap:
                raise ValueError("weak_swap moves weak heads: it does not apply to "
                                 "weak_labeller='noise'")
            check_float("flip", self.flip, nonnegative=True)
            check_float("flip_spread", self.flip_spread, nonnegative=True)
            lo, hi = self.flip - self.flip_spread / 2, self.flip + self.flip_spread / 2
            if lo < 0 or hi > 1:
                raise ValueError(f"flip +- flip_spread / 2 must lie in [0, 1] (flip rates), got "
                                 f"flip={self.flip}, flip_spread={self.flip_spread}")
        check_float("noise_df", self.noise_df, nonnegative=True)
        if self.noise_df:
            if self.family != "regression":
                raise ValueError(f"noise_df (heavy-tailed noise) applies to family 'regression', "
                                 f"got family {self.family!r}")
            if not self.noise_df > 1:
                raise ValueError(f"noise_df must be 0 (Gaussian noise) or exceed 1 (Student's t "
                                 f"with a mean), got {self.noise_df}")
        if self.family in GLM_FAMILIES and self.degree != 1:
            raise ValueError(f"degree must be 1 for family {self.family!r} (generalized linear "
                             f"experts are linear in x), got {self.degree}")

    def model(self, n_heads: int = 2):
        if self.family in GLM_FAMILIES:
            extra = {"n_classes": self.n_classes} if self.family == "categorical" else {}
            return GLM_FAMILIES[self.family](self.n_components, self.n_features, n_heads=n_heads,
                                             **extra)
        if self.noise_df:
            return StudentRegressionMixture(self.n_components, self.n_features, n_heads=n_heads,
                                            degree=self.degree, noise_df=self.noise_df)
        return self.fit_model(n_heads)

    def fit_model(self, n_heads: int = 1):
        """The family the estimators fit to the problem's data: :meth:`model`'s, with Gaussian
        noise where the truth's is heavy-tailed (``noise_df``)."""
        if self.family in GLM_FAMILIES:
            return self.model(n_heads)
        cls = {"regression": RegressionMixture, "gated": GatedExperts,
               "softmax": SoftmaxGatedExperts}[self.family]
        return cls(self.n_components, self.n_features, n_heads=n_heads, degree=self.degree)


@dataclass(frozen=True)
class Problem:
    """A latent-concept-shift problem with known ground truth (see module docs).

    A pytree: its parameters are leaves, so a compiled function can take problems as arguments.
    """

    spec: ProblemSpec
    params_p: RegressionParams | GatedParams | GLMParams
    params_q: RegressionParams | GatedParams | GLMParams
    flip_p: Array | None = None  # (K,) flip rates of a label-noise weak labeller (source)
    flip_q: Array | None = None  # (K,) ... (target)
    flip_target: Array | None = None  # (K, C, C): T_k[v, c], where a flipped label v goes

    @property
    def model(self) -> ExpertsFamily:
        """The two-head family (y, y') both domains are drawn from."""
        return self.spec.model(2)

    @property
    def strong_model(self) -> ExpertsFamily:
        return self.spec.model(1)

    @property
    def fit_model(self) -> ExpertsFamily:
        """The one-head family the estimators fit (the truth's, or its Gaussian-noise counterpart
        for a heavy-tailed truth, ``noise_df``)."""
        return self.spec.fit_model(1)

    @property
    def label_noise(self) -> bool:
        """Whether the weak labeller is a label-noise model (``weak_labeller="noise"``)."""
        return self.flip_p is not None

    def heads(self, domain: str, which: str):
        """Single-head parameters: ``which`` is ``"strong"`` or ``"weak"``, domain ``"p"``/``"q"``."""
        if which != "strong" and self.label_noise:
            raise ValueError("a label-noise weak labeller has no weak head: use weak_log_probs "
                             "or weak_labeller()")
        params = {"p": self.params_p, "q": self.params_q}[domain]
        return self.model.select_heads(params, (0,) if which == "strong" else (1,))

    def weak_log_probs(self, x: Array, domain: str) -> Array:
        """log p(y' = c | x, k) of the true weak labeller in ``domain``, (N, K, C) (class families):
        the weak head's, or for label noise log sum_v p(y = v | x, k) C_k[v, c]."""
        params = self.params_p if domain == "p" else self.params_q
        if not self.label_noise:
            return self.model.component_class_log_probs(params, x, head=1)
        strong = self.model.component_class_log_probs(params, x, head=0)  # (N, K, V)
        log_c = _log_confusion(self.flip_p if domain == "p" else self.flip_q, self.flip_target)
        return logsumexp(strong[:, :, :, None] + log_c[None], axis=2)

    def weak_labeller(self):
        """The true weak labeller of Q, q(y' | x), as a predictor of y (``log_prob``,
        ``log_probs``, ``mean``): what weak-to-strong experiments score as the weak supervisor."""
        return WeakLabeller(self)

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
        - max_k |theta^wq_k - theta^wp_k|^2 (coefficients and log-scales of the weak heads; for a
        label-noise labeller, its flip rates)."""
        if self.label_noise:
            return float(_delta(self.flip_p[:, None], self.flip_q[:, None]))
        return float(_delta(_weak_vectors(self.params_p), _weak_vectors(self.params_q)))

    def population_margin(self) -> float:
        """The matching margin of Algorithm 1 with the population's weak heads: the least total
        cost of a matching other than the identity minus the identity's, with cost[k, k'] =
        |theta^wq_k - theta^wp_k'|^2 (the space of :meth:`distinguishability`). Positive: the
        optimal assignment is right at the truth (by that much); negative: it is wrong however
        many data there are. Delta > 0 implies a positive margin, not conversely."""
        if self.label_noise:
            wp, wq = self.flip_p[:, None], self.flip_q[:, None]
        else:
            wp, wq = _weak_vectors(self.params_p), _weak_vectors(self.params_q)
        cost = np.asarray(jnp.sum((wq[:, None, :] - wp[None, :, :]) ** 2, -1), np.float64)
        K = cost.shape[0]
        if K == 1:
            return float("inf")
        ident = np.trace(cost)
        big = (np.abs(cost).max() + 1.0) * (K + 1)
        best = np.inf
        for k in range(K):  # the best matching that leaves k's own pair out
            c = cost.copy()
            c[k, k] = big
            perm = np.asarray(assign(jnp.asarray(c)))
            best = min(best, c[np.arange(K), perm].sum())
        return float(best - ident)

    def simulate_data(self, key, n_source: int, n_target: int, n_test: int) -> Simulation:
        """:func:`simulate` (the truth's side of the experiments' protocol; traceable)."""
        return simulate(key, self, n_source, n_target, n_test)

    def truth_labels(self, params, head: int, domain: str, true_head: int) -> Array:
        """For each fitted component, the true component it estimates, shape (K,): the optimal
        assignment of the fit's ``head`` against head ``true_head`` (0: y, 1: y') of the truth in
        ``domain``, by the family's matching cost."""
        true = self.params_p if domain == "p" else self.params_q
        if true_head == 1 and self.label_noise:
            # no weak head to compare coefficients with: the fitted head's class probabilities
            # against the labeller's, averaged over a fixed sample of x
            x = self.sample_x(jax.random.key(0), MATCH_GRID, domain)
            fit = self.model.with_heads(params.coef.shape[1])
            a = jnp.exp(fit.component_class_log_probs(params, x, head))  # (N, K, C)
            b = jnp.exp(self.weak_log_probs(x, domain))
            cost = jnp.mean(jnp.sum((a[:, :, None] - b[:, None]) ** 2, -1), 0)  # (K_fit, K_true)
            return assign(cost)
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
            x = spec.x_scale * jax.random.normal(key, (n, spec.n_features), dtype)
            if domain == "q" and spec.covariate_shift:
                x = x.at[:, 0].add(spec.covariate_shift * spec.x_scale)
            return x
        params = self.params_p if domain == "p" else self.params_q
        with jax.numpy_rank_promotion("allow"):  # numpyro's MVN sampler broadcasts implicitly
            return self.model.x_distribution(params).sample(key, (n,))


class WeakLabeller:
    """The true weak labeller of a problem's target, q(y' | x), as a predictor of y (the methods of
    :class:`~conceptshift.inference.Predictor` that scoring uses): the family's weak head, or for
    label noise q(y' = c | x) = sum_k q(k | x) sum_v p(y = v | x, k) C^q_k[v, c] (module docs)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.model = problem.strong_model
        self._weak = self.model.select_heads(problem.params_q, (1,))

    def log_probs(self, x: Array) -> Array:
        """log q(y' = c | x), (N, C) (class labels)."""
        p = self.problem
        if not p.label_noise:
            return self.model.conditional_log_probs(self._weak, x)
        lpk = p.model.log_posterior_k(p.params_q, x)
        return logsumexp(lpk[:, :, None] + p.weak_log_probs(x, "q"), axis=1)

    def log_prob(self, x: Array, y: Array) -> Array:
        """log q(y' = y | x), (N,)."""
        if not self.problem.label_noise:
            return self.model.conditional_log_prob(self._weak, x, y)
        idx = jnp.asarray(y).astype(jnp.int32)[:, None]
        return jnp.take_along_axis(self.log_probs(x), idx, axis=1)[:, 0]

    def mean(self, x: Array) -> Array:
        """E_q[y' | x] (q(y' = 1 | x) for binary labels), (N,)."""
        if not self.problem.label_noise:
            return self.model.conditional_mean(self._weak, x)
        lp = self.log_probs(x)
        if lp.shape[1] != 2:
            raise TypeError("a categorical label has no mean: use log_probs")
        return jnp.exp(lp[:, 1])


MATCH_GRID = 512  # rows of x over which truth_labels compares a label-noise labeller's heads


def _log_confusion(flip: Array, target: Array) -> Array:
    """log C_k[v, c], (K, C, C), C_k = (1 - rho_k) I + rho_k T_k."""
    eye = jnp.eye(target.shape[-1], dtype=target.dtype)
    rho = flip[:, None, None]
    return jnp.log((1.0 - rho) * eye[None] + rho * target)


def _flip_labels(key, y: Array, k: Array, flip: Array, target: Array) -> Array:
    """y' from y (N,): with probability flip[k] a label drawn from target[k, y]."""
    ku, kc = jax.random.split(key)
    yi = y.astype(jnp.int32)
    other = jax.random.categorical(kc, jnp.log(target[k, yi]), axis=-1)
    flipped = jax.random.uniform(ku, yi.shape, flip.dtype) < flip[k]
    return jnp.where(flipped, other, yi).astype(y.dtype)


def _problem_flatten(p: Problem):
    # knobs that only matter when the problem is drawn (delta, weak_shift, weak_swap, pi_p, pi_q,
    # strong_drift) are kept out of the static part
    # so that problems of different Delta share one compiled program
    spec = dataclasses.replace(p.spec, delta=None, weak_shift=0.0, weak_swap=0.0, pi_p=None,
                               pi_q=None, strong_drift=0.0)
    return (p.params_p, p.params_q, p.flip_p, p.flip_q, p.flip_target), spec


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
    # a proportion of 0 is kept as float32's smallest normal number (log -87.3; every density stays
    # finite and the concept is never drawn in practice)
    if spec.pi_p is not None:
        log_pi_p = jnp.asarray(np.log(np.maximum(spec.pi_p, np.finfo(np.float32).tiny)))
    if spec.pi_q is not None:
        log_pi_q = jnp.asarray(np.log(np.maximum(spec.pi_q, np.finfo(np.float32).tiny)))
    theta_wp = theta + spec.weak_bias * _unit(rng, K, P)
    direction = _unit(rng, K, P)
    swap = np.roll(theta_wp, -1, axis=0) - theta_wp  # towards the next concept's source weak head
    means = _spread(rng, K, D, spec.gate_separation * spec.x_scale) if K > 1 else np.zeros((1, D))
    noisy = spec.weak_labeller == "noise"
    if noisy:  # drawn after the rest: problems with weak heads are what they were
        spread = np.linspace(-0.5, 0.5, K) if K > 1 else np.zeros(1)
        flip_p = spec.flip + spec.flip_spread * spread[rng.permutation(K)]
        flip_dir = _unit(rng, 1, K)[0]
        C = 2 if spec.family == "logistic" else spec.n_classes
        if spec.flip_to == "class":
            to = np.eye(C)[rng.integers(0, C, K)]  # (K, C): each concept's class
            flip_target = np.broadcast_to(to[:, None, :], (K, C, C))
        else:
            flip_target = np.broadcast_to((1.0 - np.eye(C)) / (C - 1), (K, C, C))

    # drawn after the rest: problems without a drift are what they were
    theta_q = theta + spec.strong_drift * _unit(rng, K, P) if spec.strong_drift else theta

    def build(weak_shift: float):
        theta_wq = theta_wp + weak_shift * direction + spec.weak_swap * swap
        flips = {}
        if noisy:  # the weak heads are unused: keep them equal to the strong ones
            theta_wp_, theta_wq_ = theta, theta
            flips = {"flip_p": jnp.asarray(flip_p, dtype),
                     "flip_q": jnp.asarray(np.clip(flip_p + weak_shift * flip_dir, 0.0, 1.0), dtype),
                     "flip_target": jnp.asarray(flip_target, dtype)}
        else:
            theta_wp_, theta_wq_ = theta_wp, theta_wq
        log_s = np.log(np.array([spec.noise, spec.weak_noise]))
        log_scale = np.broadcast_to(log_s, (K, 2))
        coef_p = np.stack([theta, theta_wp_], axis=1)
        coef_q = np.stack([theta_q, theta_wq_], axis=1)
        arr = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        if spec.family in GLM_FAMILIES:
            shape = (K, 2, R, model.n_coef)
            pp = GLMParams(arr(log_pi_p), arr(coef_p.reshape(shape)))
            pq = GLMParams(arr(log_pi_q), arr(coef_q.reshape(shape)))
        elif spec.family == "regression":
            pp = RegressionParams(arr(log_pi_p), arr(coef_p), arr(log_scale))
            pq = RegressionParams(arr(log_pi_q), arr(coef_q), arr(log_scale))
        elif spec.family == "softmax":  # the slopes W shared, the intercepts b = log pi
            slopes = means / spec.x_scale
            pp = SoftmaxGatedParams(arr(log_pi_p), arr(coef_p), arr(log_scale), arr(slopes))
            pq = SoftmaxGatedParams(arr(log_pi_q), arr(coef_q), arr(log_scale), arr(slopes))
        else:
            cov = np.broadcast_to(np.eye(D) * spec.x_scale**2, (K, D, D))
            pp = GatedParams(arr(log_pi_p), arr(coef_p), arr(log_scale), arr(means), arr(cov))
            pq = GatedParams(arr(log_pi_q), arr(coef_q), arr(log_scale), arr(means), arr(cov))
        return Problem(spec, pp, pq, **flips)

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
        if hi > 1e6:  # clipped flip rates: the distinguishability stops falling
            raise ValueError(f"delta={spec.delta} is out of reach: the smallest distinguishability "
                             f"of this problem is about {delta_of(hi):.4g}")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if delta_of(mid) > spec.delta else (lo, mid)
    return build(0.5 * (lo + hi))


def permute_target_concepts(problem: Problem, perm) -> Problem:
    """The second of two truths that no data can tell apart (constant gates): the target's weak
    heads and proportions permuted together, concept k of Q given the weak head and the proportion
    of concept perm[k] of the first truth, while P and the strong heads stay.

    Q'(x, y') = sum_k pi^q_k p(y' | x, theta^wq_k) is then unchanged (a sum over the same pairs), and
    so is P(x, y, y'); but q(y | x) = sum_k pi^q_perm[k] p(y | x, theta_k) is not: any estimator of
    q(y | x) from P and Q' errs by at least E_x(q_A(x) - q_B(x))^2 / 4 on one of the two truths.
    Assumption 4.5 excludes the second for a perm that moves a concept (its own weak head moved
    onto another concept's), which is the one Algorithm 1 then gets wrong."""
    if problem.spec.family in ("gated", "softmax") or problem.label_noise:
        raise ValueError("permute_target_concepts needs constant gates and weak heads (a gate on x "
                         "ties x to the concept, so permuting Q's concepts changes Q'(x, y'))")
    K = problem.spec.n_components
    perm = np.asarray(perm)
    if not np.issubdtype(perm.dtype, np.integer) or sorted(perm.tolist()) != list(range(K)):
        raise ValueError(f"perm must be a permutation of range({K}) (n_components), got "
                         f"{perm.tolist()}")
    q = problem.params_q
    coef = q.coef.at[:, 1].set(q.coef[perm, 1])
    fields = {"log_weights": q.log_weights[perm], "coef": coef}
    if hasattr(q, "log_scale"):
        fields["log_scale"] = q.log_scale.at[:, 1].set(q.log_scale[perm, 1])
    return dataclasses.replace(problem, params_q=q._replace(**fields))


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
        if problem.label_noise:
            ky, kf = jax.random.split(ky)
        ys, k = model.sample_with_components(ky, params, x)
        if problem.label_noise:
            flip = problem.flip_p if domain == "p" else problem.flip_q
            ys = ys.at[:, 1].set(_flip_labels(kf, ys[:, 0], k, flip, problem.flip_target))
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

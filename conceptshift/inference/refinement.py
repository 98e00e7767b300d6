"""Label refinement scored exactly, for every family (paper section 3.2, Prop. 3.2).

Refinement draws new labels from the source model fed with weak information; the distribution of
those labels given x is, by Prop. 3.2,

    q_re(y | x) = sum_k p̂(y | x, k) q̂(k | x),

the source's components under *x-dependent* weights q̂(k | x). The estimators here return that
conditional itself as a :class:`RefinedPredictor` (not a refit of a constant-weight mixture to drawn
labels, which cannot represent it and would score a projection of q_re):

- ``refinement`` (one weak label at a time, Example 3.4): q̂(k | x) = E_{y' ~ q̂'(y'|x)} p̂(k | x, y'),
  with p̂(k | x, y') the source fit's posterior through its weak head and q̂'(y' | x) the weak target
  fit (the plug-in estimate of Q(y' | x)). The expectation is a sum over the values of a categorical
  y' (exact); otherwise a sum over the weak target fit's components k' (exact, weighted by
  q̂'(k' | x)) of a Monte Carlo average of ``n_draws`` draws of y' from each component.
- ``refinement_icl`` (in context, Example 3.3 and eq. 3.1): q̂(k | x) = E_V p̂(k | x, V), V = M weak
  pairs (x_j, y'_j) drawn from D_Q', p̂(k | x, V) proportional to p̂(k | x) prod_j p̂(x_j, y'_j | k)
  (demonstrations independent given k, as in Example 3.3); E_V is averaged over ``n_draws`` sets.
- ``refinement_icl_concept`` (Prop. 3.2's q(v | x, k')): the same with the demonstrations drawn from
  the query's own concept k', q̂(k | x) = sum_k' q̂'(k' | x) E_{V ~ k'} p̂(k | x, V), the concepts
  k' those of the weak target fit.

Both use the protocol alone (``log_posterior_k``, ``component_log_probs``, ``select_heads``,
``with_heads`` and the predictor's forwarding), in log space throughout: the weights q̂(k | x) enter
as per-row proportions log pi'_k = log q̂(k | x) - log p̂(k | x) + log pi_k, under which the family's
own p(k | x) equals q̂(k | x). That holds for every family whose p(k | x) is
softmax_k(log pi_k + f_k(x)) with f free of pi (a constant gate, a Gaussian gate log g(x | eta_k), a
softmax gate's b + W x, a mixture of HMMs' log p(x | k)): the protocol's requirement on
``log_weights``, checked for every registered family by the contract tests. Everything is a pure
function of keys and arrays: predictors are pytrees, built and evaluated under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jax.scipy.special import logsumexp

from .._validation import check_key
from ..models.registry import check_family
from .predictor import Predictor


@jax.tree_util.register_pytree_node_class
class RefinedPredictor(Predictor):
    """q_re(y | x) = sum_k p̂(y | x, k) q̂(k | x) (Prop. 3.2): a one-head fit's components under
    x-dependent weights ``weights.log_q_k(model, params, x)``, (N, K).

    The methods of :class:`Predictor` (``log_prob``, ``log_probs``, ``mean``, ``posterior_k``,
    ``sample``) evaluate the family row by row with each row's proportions (under ``vmap``), so
    they are exact for every family whose p(k | x) is softmax_k(log pi_k + f_k(x)) (module docs)."""

    def __init__(self, model, params, weights):
        super().__init__(model, params)
        self.weights = weights

    def tree_flatten(self):
        return (self.params, self.weights), self.model

    @classmethod
    def tree_unflatten(cls, model, children):
        return cls(model, *children)

    def log_q_k(self, x, **data) -> Array:
        """log q̂(k | x), (N, K)."""
        return self.weights.log_q_k(self.model, self.params, x, **data)

    def _row_log_weights(self, x, **data) -> Array:
        """Per-row proportions under which the family's p(k | x) is q̂(k | x), (N, K)."""
        lp = self.model.log_posterior_k(self.params, x, **data)
        return self.log_q_k(x, **data) - lp + self.params.log_weights[None, :]

    def _rows(self, method: str, x, *cols, **data):
        def one(lw_i, x_i, *c, **d):
            pred = Predictor(self.model, self.params._replace(log_weights=lw_i))
            rows = [a[None] for a in c]
            return getattr(pred, method)(x_i[None], *rows, **{k: v[None] for k, v in d.items()})[0]

        return jax.vmap(one)(self._row_log_weights(x, **data), x, *cols, **data)

    def log_prob(self, x, y, **data) -> Array:
        return self._rows("log_prob", x, y, **data)

    def log_probs(self, x, **data) -> Array:
        return self._rows("log_probs", x, **data)

    def mean(self, x, **data) -> Array:
        return self._rows("mean", x, **data)

    def posterior_k(self, x, **data) -> Array:
        return jnp.exp(self.log_q_k(x, **data))

    def sample(self, key, x: Array) -> Array:
        def one(k, lw_i, x_i):
            return Predictor(self.model, self.params._replace(log_weights=lw_i)).sample(k, x_i[None])[0]

        return jax.vmap(one)(jax.random.split(key, x.shape[0]), self._row_log_weights(x), x)

    def __repr__(self) -> str:
        return f"RefinedPredictor({self.model!r}, {type(self.weights).__name__})"


@jax.tree_util.register_pytree_node_class
class LabelWeights:
    """q̂(k | x) = E_{y' ~ q̂'(y' | x)} p̂(k | x, y'): Example 3.4's weak-label refinement.

    ``weak_model`` is the one-head family, ``weak_head`` the source fit restricted to its weak head
    (p̂(k | x, y') is the posterior of its ``component_log_probs``), ``weak_target`` the fit of
    (x, y') on Q'. A categorical y' (the family has ``conditional_log_probs``) is summed over its
    values; otherwise it is summed over the weak target fit's components k' (weights q̂'(k' | x))
    of the average over ``n_draws`` draws of y' from each component (``key`` draws them, the same
    for every row: q̂(k | x) is then a deterministic function of x)."""

    def __init__(self, weak_model, weak_head, weak_target, key, n_draws: int = 128):
        self.weak_model, self.weak_head, self.weak_target = weak_model, weak_head, weak_target
        self.key, self.n_draws = key, int(n_draws)

    def tree_flatten(self):
        return (self.weak_head, self.weak_target, self.key), (self.weak_model, self.n_draws)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], *children, aux[1])

    def log_q_k(self, model, params, x, **data) -> Array:
        m = self.weak_model

        def post(y):  # log p̂(k | x, y'), (N, K)
            return jax.nn.log_softmax(m.component_log_probs(self.weak_head, x, y=y[:, None], **data), -1)

        target = Predictor(m, self.weak_target)
        if hasattr(m, "conditional_log_probs"):  # categorical y': the exact sum over its values
            lq = target.log_probs(x, **data)  # (N, V)
            values = jnp.arange(lq.shape[1], dtype=jnp.int32)
            per = jax.vmap(lambda v: post(jnp.full(x.shape[:1], v, jnp.int32)))(values)  # (V, N, K)
            return logsumexp(lq.T[:, :, None] + per, axis=0)
        # Rao-Blackwellised over the target's component k': q̂(k | x) = sum_k' q̂'(k' | x)
        # E_{y' ~ p̂'(y' | x, k')} p̂(k | x, y'), the sum exact and only y' within a component drawn
        # (the draws of a mixture would pick one k' per draw for every row alike, a noise that does
        # not average out over x). Common random numbers: every row uses the same keys, so q̂(k | x)
        # is a function of x.
        n_k = self.weak_target.log_weights.shape[0]
        onehot = jnp.where(jnp.eye(n_k, dtype=bool), 0.0, -jnp.inf).astype(
            self.weak_target.log_weights.dtype)

        def within(lw, keys):  # log E_{y' ~ component} p̂(k | x, y'), (N, K)
            comp = Predictor(m, self.weak_target._replace(log_weights=lw))

            def draw(k):
                return jax.vmap(lambda xi: comp.sample(k, xi[None])[0])(x)

            per = jax.vmap(lambda k: post(draw(k)))(keys)
            return logsumexp(per, axis=0) - jnp.log(jnp.asarray(self.n_draws, per.dtype))

        keys = jax.random.split(self.key, self.n_draws)
        per_k = jax.vmap(within, in_axes=(0, None))(onehot, keys)  # (K', N, K)
        lq = m.log_posterior_k(self.weak_target, x, **data)  # log q̂'(k' | x), (N, K')
        return logsumexp(lq.T[:, :, None] + per_k, axis=0)


@jax.tree_util.register_pytree_node_class
class DemoWeights:
    """q̂(k | x) = E_V p̂(k | x, V), V = ``n_demos`` pairs drawn (by weight) from a pool of weak
    demonstrations with per-pair log-likelihoods ``demo`` (N_pool, K) = log p̂(x_j, y'_j | k).

    Each query row gets its own ``n_draws`` sets (as each query of in-context refinement gets its
    own demonstrations: q̂(k | x) is a Monte Carlo estimate per row) of ``m_pool >= n_demos`` draws
    of which the first ``n_demos`` are used: predictors built with one key and one ``m_pool`` have
    nested demonstration sets (a curve against M free of the noise of independent draws). The
    draws depend on the number of rows evaluated together: score a set of queries in one call."""

    def __init__(self, demo, pool_w, key, n_demos: int, n_draws: int = 8, m_pool: int | None = None):
        self.demo, self.pool_w, self.key = demo, pool_w, key
        self.n_demos, self.n_draws = int(n_demos), int(n_draws)
        self.m_pool = max(int(m_pool if m_pool is not None else n_demos), self.n_demos)

    def tree_flatten(self):
        return (self.demo, self.pool_w, self.key), (self.n_demos, self.n_draws, self.m_pool)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def log_q_k(self, model, params, x, **data) -> Array:
        lp = model.log_posterior_k(params, x, **data)  # log p̂(k | x), (N, K)
        if self.n_demos == 0:
            return lp
        return _demo_posterior(lp, self.demo, self.pool_w / jnp.sum(self.pool_w), self.key,
                               self.n_demos, self.n_draws, self.m_pool)


def _demo_posterior(lp, demo, p, key, n_demos: int, n_draws: int, m_pool: int) -> Array:
    """log E_V p̂(k | x, V), (N, K): per row, ``n_draws`` sets of ``m_pool`` demonstrations drawn
    from the pool with probabilities ``p``, of which the first ``n_demos`` are used (nested in M);
    ``lp`` = log p̂(k | x), ``demo`` = log p̂(x_j, y'_j | k) (N_pool, K)."""
    idx = jax.random.choice(key, p.shape[0], (lp.shape[0], n_draws, m_pool), p=p)
    logits = lp[:, None, :] + jnp.sum(demo[idx[:, :, :n_demos]], axis=2)
    post = jax.nn.log_softmax(logits, axis=-1)  # (N, draws, K)
    return logsumexp(post, axis=1) - jnp.log(jnp.asarray(n_draws, post.dtype))


@jax.tree_util.register_pytree_node_class
class ConceptDemoWeights:
    """Prop. 3.2's reading of in-context refinement: the demonstrations come from the query's own
    concept. q̂(k | x) = sum_k' q̂'(k' | x) E_{V ~ Q'(. | k')} p̂(k | x, V), with the concepts k' those of
    the weak target fit ``weak_target`` (one-head family ``weak_model``): the query's concept
    weights are its posterior q̂'(k' | x), and the demonstrations of concept k' are drawn from the
    pool with weights w_j q̂'(k' | x_j, y'_j) (``pool_concepts``, (N_pool, K'), log). As M grows,
    p̂(k | x, V) concentrates on the source concept whose (x, y') law is closest to concept k', so
    q̂(k | x) tends to the target's concept weights carried to the source components by a
    likelihood matching (where the pool reading, eq. 3.1, concentrates on one concept for all of
    Q'). Draws as :class:`DemoWeights` (nested in M, per row), with one key per concept k'."""

    def __init__(self, demo, pool_w, pool_concepts, weak_model, weak_target, key, n_demos: int,
                 n_draws: int = 8, m_pool: int | None = None):
        self.demo, self.pool_w, self.pool_concepts = demo, pool_w, pool_concepts
        self.weak_model, self.weak_target, self.key = weak_model, weak_target, key
        self.n_demos, self.n_draws = int(n_demos), int(n_draws)
        self.m_pool = max(int(m_pool if m_pool is not None else n_demos), self.n_demos)

    def tree_flatten(self):
        return ((self.demo, self.pool_w, self.pool_concepts, self.weak_target, self.key),
                (self.weak_model, self.n_demos, self.n_draws, self.m_pool))

    @classmethod
    def tree_unflatten(cls, aux, children):
        demo, pool_w, pool_concepts, weak_target, key = children
        weak_model, n_demos, n_draws, m_pool = aux
        return cls(demo, pool_w, pool_concepts, weak_model, weak_target, key, n_demos, n_draws,
                   m_pool)

    def log_q_k(self, model, params, x, **data) -> Array:
        lp = model.log_posterior_k(params, x, **data)  # log p̂(k | x), (N, K)
        if self.n_demos == 0:
            return lp
        lq = self.weak_model.log_posterior_k(self.weak_target, x, **data)  # log q̂'(k' | x), (N, K')
        pool = jnp.log(self.pool_w)[:, None] + self.pool_concepts  # (N_pool, K')
        probs = jax.nn.softmax(pool, axis=0)  # padding rows (w = 0) get probability 0

        def per_concept(p, key):  # log E_{V ~ concept} p̂(k | x, V), (N, K)
            return _demo_posterior(lp, self.demo, p, key, self.n_demos, self.n_draws, self.m_pool)

        keys = jax.random.split(self.key, probs.shape[1])
        per = jax.vmap(per_concept, in_axes=(1, 0))(probs, keys)  # (K', N, K)
        return logsumexp(lq.T[:, :, None] + per, axis=0)


DEMOS = ("pool", "concept")


def _source_heads(model, source_params, head: int):
    m1 = model.with_heads(1)
    return m1, model.select_heads(source_params, (0,)), model.select_heads(source_params, (head,))


def refined(model, key, source_params, target_params, *, n_draws: int = 128) -> RefinedPredictor:
    """Weak-label refinement's q_re (Example 3.4) from a two-head source fit (y, y') and the weak
    target fit of (x, y') on Q' (one head); ``n_draws``: draws of a continuous y' per component of
    the weak target fit (:class:`LabelWeights`)."""
    check_family(model, "refined")
    key = check_key("key", key)
    m1, strong, weak = _source_heads(model, source_params, 1)
    return RefinedPredictor(m1, strong, LabelWeights(m1, weak, target_params, key, n_draws))


def refined_icl(model, key, source_params, target_x, target_y_weak, target_w, *, n_demos: int,
                n_draws: int = 8, demo_head: int = 1, m_pool: int | None = None,
                demos: str = "pool", target_params=None) -> RefinedPredictor:
    """In-context refinement's q_re (Example 3.3) from a two-head source fit and the pool of weak
    demonstrations (x_j, y'_j) with weights. ``demo_head``: the source head that scores the
    demonstrations' labels, 1 (the weak head p̂(y' | x, k), default) or 0 (the strong head, as eq.
    3.2 displays it for HMMs: the strong model reads the weak labels as its own).

    ``demos``: where the demonstrations come from, ``"pool"`` (all of Q', eq. 3.1:
    :class:`DemoWeights`) or ``"concept"`` (the query's own concept, Prop. 3.2's q(v | x, k'):
    :class:`ConceptDemoWeights`, whose concepts are those of ``target_params``, the one-head fit of
    (x, y') on Q', required then)."""
    check_family(model, "refined_icl")
    key = check_key("key", key)
    if demo_head not in (0, 1):
        raise ValueError(f"demo_head must be 0 (strong) or 1 (weak), got {demo_head!r}")
    if demos not in DEMOS:
        raise ValueError(f"demos must be one of {DEMOS}, got {demos!r}")
    if demos == "concept" and target_params is None:
        raise ValueError("demos='concept' needs target_params, the weak target fit whose "
                         "components are the concepts k'")
    m1, strong, scorer = _source_heads(model, source_params, demo_head)
    y_demo = target_y_weak[:, None]
    demo = m1.component_log_probs(scorer, target_x, y=y_demo) \
        - scorer.log_weights[None, :]  # log p̂(x_j, y'_j | k)
    if demos == "pool":
        weights = DemoWeights(demo, target_w, key, n_demos, n_draws, m_pool)
    else:
        concepts = jax.nn.log_softmax(m1.component_log_probs(target_params, target_x, y=y_demo), -1)
        weights = ConceptDemoWeights(demo, target_w, concepts, m1, target_params, key, n_demos,
                                     n_draws, m_pool)
    return RefinedPredictor(m1, strong, weights)

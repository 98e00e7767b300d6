"""Matching mixture components across fits: optimal assignment, the paper's greedy rule, margin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .._validation import as_float_array, is_traced
from ..models.assignment import assign


def _check_cost(cost) -> Array:
    cost = as_float_array("cost", cost, ndim=2, allow_nan=True)
    if cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be square (K, K), got shape {cost.shape}")
    if not is_traced(cost) and not bool(jnp.all(jnp.isfinite(cost))):
        raise ValueError("cost has non-finite entries (NaN or inf); cannot match components")
    return cost


def assign_traced(cost: Array) -> Array:
    """:func:`optimal_assignment` without its input checks, for use under ``jit``/``vmap``: a
    non-finite cost gives -1 everywhere instead of an error."""
    perm = assign(cost)
    return jnp.where(jnp.all(jnp.isfinite(cost)), perm, -jnp.ones_like(perm))


def optimal_assignment(cost) -> Array:
    """The permutation minimising sum_k cost[k, perm[k]] (Hungarian algorithm via optax).

    Args:
      cost: (K, K) matrix; cost[k, j] is the price of matching row item k to column item j.

    Returns:
      perm (K,) int32 with rows in order: row k is matched to column perm[k]. Under ``jit`` a
      non-finite cost gives all -1 (outside jit it raises ValueError).

    Example:
      >>> optimal_assignment([[5.0, 1.0], [1.0, 5.0]]).tolist()
      [1, 0]
    """
    return assign_traced(_check_cost(cost))


def greedy_assignment(cost) -> tuple[Array, Array]:
    """The paper's step 3: a(k) = argmin_j cost[k, j] row by row.

    Returns:
      (assignment (K,), is_bijection ()): the assignment need not be a permutation.
    """
    cost = _check_cost(cost)
    a = jnp.argmin(cost, axis=1).astype(jnp.int32)
    counts = jnp.zeros(cost.shape[0], jnp.int32).at[a].add(1)
    return a, jnp.all(counts == 1)


def assignment_margin(cost) -> Array:
    """Total cost of the second-best permutation minus that of the best (>= 0).

    A margin near 0 means the match is fragile. The second-best assignment differs from the best in
    at least one pair, so it is the best assignment with one of the optimal pairs forbidden.
    """
    cost = _check_cost(cost)
    K = cost.shape[0]
    if K == 1:
        return jnp.asarray(jnp.inf, cost.dtype)
    perm = assign_traced(cost)
    best = jnp.sum(cost[jnp.arange(K), perm])
    big = (jnp.max(jnp.abs(cost)) + 1.0) * (K + 1)

    def without(k):
        c = cost.at[k, perm[k]].set(big)
        p = assign_traced(c)
        return jnp.sum(c[jnp.arange(K), p])

    return jnp.min(jax.vmap(without)(jnp.arange(K))) - best


def invert_permutation(perm) -> np.ndarray | Array:
    perm = jnp.asarray(perm)
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


# ---------------------------------------------------------------------------------- posterior
MAX_EXACT = 7  # K! = 5040 assignments; beyond, a neighbourhood of the optimal one (see below)


def all_permutations(K: int) -> np.ndarray:
    """Every assignment of K components, (K!, K) int32 in lexicographic order (identity first)."""
    import itertools

    return np.asarray(list(itertools.permutations(range(K))), np.int32).reshape(-1, K)


def local_permutations(K: int) -> np.ndarray:
    """The moves that change at most three pairs of an assignment, (M, K) int32: the identity, the
    K(K-1)/2 transpositions and the K(K-1)(K-2)/3 three-cycles (identity first)."""
    import itertools

    moves = [np.arange(K)]
    for i, j in itertools.combinations(range(K), 2):
        m = np.arange(K)
        m[[i, j]] = m[[j, i]]
        moves.append(m)
    for i, j, k in itertools.combinations(range(K), 3):
        for a, b, c in ((j, k, i), (k, i, j)):  # the two 3-cycles on {i, j, k}
            m = np.arange(K)
            m[[i, j, k]] = [a, b, c]
            moves.append(m)
    return np.asarray(moves, np.int32)


def candidate_assignments(cost: Array) -> Array:
    """The assignments a matching posterior is computed over, (M, K): all K! of them for
    K <= MAX_EXACT; beyond, the optimal assignment composed with every move of
    :func:`local_permutations` (the best one and all that differ from it in at most three pairs;
    1 + K(K-1)/2 + K(K-1)(K-2)/3 of them), a documented truncation whose neglected mass is that of
    the assignments four or more pairs away from the best."""
    K = cost.shape[-1]
    if K <= MAX_EXACT:
        return jnp.asarray(all_permutations(K))
    best = assign_traced(cost)
    return best[jnp.asarray(local_permutations(K))]


def _check_dim(K: int, dim) -> int:
    """dim >= 1; then K dim >= 2 (a proper posterior of the scale) whenever there is a choice
    (K >= 2), and K = 1 has its one assignment."""
    from .._validation import check_int

    return check_int("dim", dim, minimum=1)


def matching_log_posterior(cost, *, dim: int | None = None, scale=None) -> tuple[Array, Array]:
    """The posterior over assignments a of the components k of fit a to the components a(k) of fit
    b, from the matching cost (squared distances between the matched heads' vectors).

    The shift prior encodes Assumption 4.5: the target's weak head of a(k) lies near the source's
    weak head of k, theta^wq_{a(k)} ~ N(theta^wp_k, tau^2 I_dim) independently over k, with every
    assignment a priori equally likely. Given the heads, the likelihood of a is
    prod_k N(theta^wq_{a(k)}; theta^wp_k, tau^2) proportional to exp(-C_a / (2 tau^2)), where
    C_a = sum_k cost[k, a(k)]; so:

    * ``scale`` = tau given: log p(a | heads) = -C_a / (2 tau^2) - log Z;
    * ``dim`` given and no scale: tau is integrated out under the flat prior p(tau) proportional
      to 1 on (0, inf), which leaves p(a | heads) proportional to C_a^(-(K dim - 1) / 2). (The
      joint model, :mod:`conceptshift.inference.joint`, samples tau under a prior that vanishes
      at 0 like tau, for its sampler's sake; integrated out here, p(tau) proportional to tau would
      give C_a^(-(K dim - 2) / 2), flat over the assignments at K dim = 2, e.g. two Poisson rates.)

    ``dim`` is the length of the vectors the cost compares (the family's ``match_dim(head)``).

    Returns:
      (assignments (M, K) int32, log_prob (M,)), normalised over the M candidates of
      :func:`candidate_assignments` (exact for K <= 7). The mode is the optimal (Hungarian)
      assignment. Works under ``jit``/``vmap`` (static K, dim); there a non-finite cost gives NaN
      probabilities (outside ``jit`` it raises ValueError, as does a scale that is not positive).
    """
    if (dim is None) == (scale is None):
        raise ValueError("give exactly one of dim (the scale integrated out) and scale (tau)")
    cost = _check_cost(cost)
    perms = candidate_assignments(cost)
    K = cost.shape[0]
    total = jnp.sum(cost[jnp.arange(K), perms], axis=-1)  # (M,) C_a
    if scale is not None:
        scale = jnp.asarray(scale, cost.dtype)
        if not is_traced(scale) and not (scale.ndim == 0 and bool(jnp.isfinite(scale)) and float(scale) > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        logw = -total / (2.0 * scale**2)
    else:
        dim = _check_dim(K, dim)
        tiny = jnp.finfo(cost.dtype).tiny
        logw = -0.5 * (K * dim - 1) * jnp.log(jnp.maximum(total, tiny))
    return perms, logw - jax.nn.logsumexp(logw)


def matching_posterior_summary(perms, prob, *, top: int = 3) -> dict:
    """The ``top`` most probable assignments of a matching posterior (host side): ``best``
    (assignment list), ``best_prob``, ``matchings`` [{"assignment", "prob"}], ``n_candidates``
    and ``entropy`` (nats). ``prob`` are probabilities (not logs), one per row of ``perms``."""
    from .._validation import check_int

    top = check_int("top", top, minimum=1)
    perms, prob = np.asarray(perms), np.asarray(prob, np.float64)
    if perms.ndim != 2 or prob.shape != perms.shape[:1]:
        raise ValueError(f"perms must be (M, K) and prob (M,), got shapes {perms.shape} and {prob.shape}")
    if not np.all(np.isfinite(prob)) or np.any(prob < 0) or abs(prob.sum() - 1) > 1e-3:
        raise ValueError("prob must be probabilities summing to 1 (not log-probabilities, no NaN)")
    order = np.argsort(-prob, kind="stable")[:top]
    p = prob[prob > 0]
    return {"best": perms[order[0]].tolist(), "best_prob": float(prob[order[0]]),
            "matchings": [{"assignment": perms[i].tolist(), "prob": float(prob[i])} for i in order],
            "n_candidates": int(perms.shape[0]), "entropy": float(-np.sum(p * np.log(p)))}


def average_matching_posterior(costs, *, dim: int) -> tuple[Array, Array]:
    """The matching posterior of :func:`matching_log_posterior` (the scale integrated out) averaged
    over draws of the two fits' heads.

    For draws of a joint posterior that includes the shift prior this average is the posterior
    probability of each matching given the data. For draws of separate fits (bootstrap refits,
    separate posteriors) it is an approximation: those draws were made without the shift prior, and
    each draw's matching posterior is normalised before the average.

    Args:
      costs: (S, K, K) the matching costs of S draws. Draws with a non-finite cost (a degenerate
        refit) are left out of the average; none finite is a ValueError (NaN under ``jit``).
      dim: the length of the vectors the cost compares.

    Returns:
      (assignments (M, K), prob (M,)). For K > 7 the candidates are the neighbourhood of the
      optimal assignment of the mean finite cost, shared by every draw.
    """
    costs = as_float_array("costs", costs, ndim=3, allow_nan=True)
    S, K, K2 = costs.shape
    if K != K2 or S < 1:
        raise ValueError(f"costs must have shape (S, K, K) with S >= 1, got {costs.shape}")
    dim = _check_dim(K, dim)
    ok = jnp.all(jnp.isfinite(costs), axis=(1, 2))  # (S,)
    if not is_traced(costs) and not bool(jnp.any(ok)):
        raise ValueError("costs has no draw with finite entries; cannot match components")
    safe = jnp.where(ok[:, None, None], costs, 0.0)
    n_ok = jnp.sum(ok).astype(costs.dtype)
    perms = candidate_assignments(jnp.sum(safe, 0) / jnp.maximum(n_ok, 1))
    tiny = jnp.finfo(costs.dtype).tiny
    total = jnp.sum(safe[:, jnp.arange(K), perms], axis=-1)  # (S, M)
    logw = -0.5 * (K * dim - 1) * jnp.log(jnp.maximum(total, tiny))
    each = jnp.where(ok[:, None], jax.nn.softmax(logw, axis=-1), 0.0)
    return perms, jnp.sum(each, 0) / jnp.where(n_ok > 0, n_ok, jnp.nan)

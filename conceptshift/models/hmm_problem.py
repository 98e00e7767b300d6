"""Ground truth for the in-context-learning family (Example 2.7): a mixture-of-HMMs problem with a
proportion shift between source P and target Q, a weak output emission tau^w for each, and anchor words.

Both domains share the concepts (transition matrices theta_k and initial distributions), the emission
tau of the sequence tokens and the strong output emission, which is tau itself (y is the next token of
the sequence). They differ in the proportions (pi^p vs pi^q) and in the weak output emission:

  tau^{wp} = (1 - weak_noise) tau + weak_noise R_p,    tau^{wq} = (1 - weak_shift) tau^{wp} + weak_shift R_q

with R_p, R_q random stochastic matrices. Anchor words (Prop. 4.4, assumption 2): with ``anchors="on"``
every hidden state s has a token a_s that no other state emits (probability ``anchor_mass``); ``"off"``
splits that mass over a_s and the next state's a_{s+1}, so no token identifies a state; ``"partial"``
keeps anchors for the first ceil(S / 2) states only. The remaining 1 - anchor_mass goes to the V - S
ordinary tokens, which every state emits (Dirichlet rows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .._validation import check_float, check_int, check_key, float_dtype
from .assignment import assign
from .hmm import HMMMixture, HMMParams, permute_states, state_alignment

ANCHORS = ("on", "off", "partial")


@dataclass(frozen=True)
class HMMProblemSpec:
    """Knobs of a simulated mixture-of-HMMs problem.

    Args:
      n_components: K concepts.
      n_states: S hidden states.
      n_tokens: V tokens (V >= S: the first S tokens are the anchor candidates a_s = s).
      length: T, tokens per sequence x.
      min_length: sequences have lengths uniform in [min_length, T] (default T: all full).
      anchors: ``"on"``, ``"off"`` or ``"partial"`` (see the module docstring).
      anchor_mass: probability of each state's anchor token(s).
      separation: theta_k = separation * Perm_k + (1 - separation) * Dirichlet(1) rows, with Perm_k a
        permutation matrix distinct for each concept (1: deterministic cycles; 0: no structure).
      shift: pi^p = softmax(+shift/2 c), pi^q = softmax(-shift/2 c), c evenly spaced in [-1, 1].
      weak_noise: how far the weak source emission tau^{wp} is from tau.
      weak_shift: how far the weak target emission tau^{wq} is from tau^{wp}.
    """

    n_components: int = 3
    n_states: int = 4
    n_tokens: int = 8
    length: int = 8
    min_length: int | None = None
    anchors: str = "on"
    anchor_mass: float = 0.6
    separation: float = 0.7
    shift: float = 2.0
    weak_noise: float = 0.4
    weak_shift: float = 0.2

    def __post_init__(self):
        check_int("n_components", self.n_components, minimum=1)
        check_int("n_states", self.n_states, minimum=1)
        check_int("n_tokens", self.n_tokens, minimum=2)
        check_int("length", self.length, minimum=1)
        if self.min_length is not None:
            check_int("min_length", self.min_length, minimum=1, maximum=self.length)
        if self.n_tokens < self.n_states:
            raise ValueError(f"n_tokens must be >= n_states (one anchor candidate per state), got "
                             f"n_tokens={self.n_tokens} < n_states={self.n_states}")
        if self.anchors not in ANCHORS:
            raise ValueError(f"anchors must be one of {ANCHORS}, got {self.anchors!r}")
        for name in ("anchor_mass", "separation", "weak_noise", "weak_shift"):
            v = check_float(name, getattr(self, name), nonnegative=True)
            if v > 1:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        check_float("shift", self.shift, nonnegative=True)


class HMMSample(NamedTuple):
    """Sequences x (N, T), lengths (N,), strong next token y (N,), weak label y' (N,), concept z (N,)."""

    x: Array
    lengths: Array
    y: Array
    y_weak: Array
    z: Array


class HMMSimulation(NamedTuple):
    source: HMMSample  # (x, y, y') ~ P
    target: HMMSample  # (x, y') ~ Q'; its y is the gold label, read only by the oracle
    test: HMMSample  # (x, y) ~ Q, for evaluation


@dataclass(frozen=True)
class HMMProblem:
    """A simulated problem: two-head parameters (head 0: y through tau, head 1: y' through tau^w) for
    each domain; everything but the proportions and the weak head is shared.

    A pytree whose leaves are the parameters (and the anchor flags): a compiled function takes
    problems as arguments, and problems of the same shapes share it (the knobs that only shape the
    parameters, such as ``anchors`` or ``shift``, are left out of the static part). It offers the
    truth's side of the experiments' protocol: ``model``, ``strong_model``, ``fit_model``, ``simulate_data``,
    ``param_errors`` and ``truth_labels``. Inside a compiled function the problem's ``spec`` holds
    its shapes only (the other knobs read 0 or their default): read knobs outside."""

    spec: HMMProblemSpec
    params_p: HMMParams
    params_q: HMMParams
    anchor_states: Array  # (S,) bool: state s has an anchor token

    @property
    def model(self) -> HMMMixture:
        s = self.spec
        return HMMMixture(s.n_components, s.n_states, s.n_tokens, n_heads=2)

    @property
    def strong_model(self) -> HMMMixture:
        return self.model.with_heads(1)

    @property
    def fit_model(self) -> HMMMixture:
        """The family the estimators fit: the truth's own."""
        return self.strong_model

    def true_log_probs(self, x, lengths=None, head: int = 0) -> Array:
        """log q(y = v | x) under the target domain, (N, V) (head 1: q(y' | x))."""
        return self.model.next_token_log_probs(self.params_q, x, lengths, head)

    def simulate_data(self, key, n_source: int, n_target: int, n_test: int) -> HMMSimulation:
        """:func:`simulate_hmm` (traceable: no checks)."""
        spec = self.spec
        lo = spec.min_length if spec.min_length is not None else spec.length
        return simulate_from_params(key, self.model, self.params_p, self.params_q, n_source=n_source,
                                    n_target=n_target, n_test=n_test, T=spec.length, lo=lo)

    def truth_labels(self, params: HMMParams, head, domain: str, true_head) -> Array:
        """For each fitted concept, the true concept of ``domain`` it estimates, (K,): the optimal
        matching of transition matrices after aligning states through the emission (the heads do
        not enter: concepts are told apart by their transitions)."""
        true = self.params_p if domain == "p" else self.params_q
        return assign(self.model.match_cost(params, None, true, None))

    def param_errors(self, params: HMMParams, domain: str) -> dict:
        """Errors of a fit against ``domain``'s truth after the best permutation of states (by
        emission) and of concepts (by transitions): max |tau - taû|, max |theta - thetâ|,
        max |pi - pî|, and whether the states are recovered without ambiguity (every true state's
        nearest fitted emission row is its partner in the optimal alignment)."""
        true = self.params_p if domain == "p" else self.params_q
        st = state_alignment(true, params)
        p = permute_states(params, st)
        perm = assign(self.model.match_cost(true, None, p, None))
        a, b = jnp.exp(true.log_emit), jnp.exp(params.log_emit)
        cost = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)
        near = jnp.argmin(cost, axis=1).astype(st.dtype)
        dtype = true.log_weights.dtype
        return {"emit_error": jnp.max(jnp.abs(jnp.exp(true.log_emit) - jnp.exp(p.log_emit))),
                "trans_error": jnp.max(jnp.abs(jnp.exp(true.log_trans) - jnp.exp(p.log_trans[perm]))),
                "weight_max_error": jnp.max(jnp.abs(jnp.exp(true.log_weights)
                                                    - jnp.exp(p.log_weights[perm]))),
                "state_perm_ok": jnp.all(near == st).astype(dtype)}


def _hmm_problem_flatten(p: HMMProblem):
    # the knobs that only shape the parameters stay out of the static part: problems of the same
    # shapes share one compiled program
    spec = dataclasses.replace(p.spec, anchors="on", anchor_mass=0.0, separation=0.0, shift=0.0,
                               weak_noise=0.0, weak_shift=0.0)
    return (p.params_p, p.params_q, p.anchor_states), spec


jax.tree_util.register_pytree_node(
    HMMProblem, _hmm_problem_flatten, lambda spec, children: HMMProblem(spec, *children))


def _emission(rng: np.random.Generator, spec: HMMProblemSpec) -> tuple[np.ndarray, np.ndarray]:
    S, V, m = spec.n_states, spec.n_tokens, spec.anchor_mass
    tau = np.zeros((S, V))
    anchored = np.ones(S, bool)
    if spec.anchors == "off":
        anchored[:] = False
    elif spec.anchors == "partial":
        anchored[-(-S // 2):] = False
    loose = np.flatnonzero(~anchored)
    for s in range(S):
        if anchored[s]:
            tau[s, s] = m
        else:
            nxt = loose[(np.flatnonzero(loose == s)[0] + 1) % loose.size]
            tau[s, s] += m / 2
            tau[s, nxt] += m / 2
    if V > S:
        tau[:, S:] = (1 - m) * rng.dirichlet(np.ones(V - S), size=S)
    else:
        tau[:, :S] /= tau[:, :S].sum(1, keepdims=True)
    if not anchored.all() and loose.size == 1:
        anchored[loose] = True  # a single loose state keeps its own token
    return tau, anchored


def make_hmm_problem(key, spec: HMMProblemSpec | None = None, **knobs) -> HMMProblem:
    """Draws a mixture-of-HMMs problem (see :class:`HMMProblemSpec` for the knobs).

    Example:
      >>> import jax
      >>> prob = make_hmm_problem(jax.random.key(0), n_components=2, n_states=3, n_tokens=6)
      >>> prob.params_p.log_trans.shape, prob.params_q.log_out.shape
      ((2, 3, 3), (2, 3, 6))
    """
    key = check_key("key", key)
    if spec is None:
        spec = HMMProblemSpec(**knobs)
    elif knobs:
        raise TypeError("give either spec or knobs, not both")
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    K, S, V = spec.n_components, spec.n_states, spec.n_tokens
    perms: list[tuple[int, ...]] = []
    while len(perms) < K:
        p = tuple(int(i) for i in rng.permutation(S))
        if p not in perms or len(perms) >= _n_perms(S):
            perms.append(p)
    trans = np.stack([spec.separation * np.eye(S)[list(p)] + (1 - spec.separation)
                      * rng.dirichlet(np.ones(S), size=S) for p in perms])
    init = rng.dirichlet(np.full(S, 2.0), size=K)
    tau, anchored = _emission(rng, spec)
    tau_wp = (1 - spec.weak_noise) * tau + spec.weak_noise * rng.dirichlet(np.ones(V), size=S)
    tau_wq = (1 - spec.weak_shift) * tau_wp + spec.weak_shift * rng.dirichlet(np.ones(V), size=S)
    c = np.linspace(-1.0, 1.0, K) if K > 1 else np.zeros(1)
    dtype = float_dtype()

    def logs(a):
        with np.errstate(divide="ignore"):
            return jnp.asarray(np.log(a), dtype)

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    common = dict(log_init=logs(init), log_trans=logs(trans), log_emit=logs(tau))
    params_p = HMMParams(log_weights=logs(softmax(spec.shift / 2 * c)),
                         log_out=logs(np.stack([tau, tau_wp])), **common)
    params_q = HMMParams(log_weights=logs(softmax(-spec.shift / 2 * c)),
                         log_out=logs(np.stack([tau, tau_wq])), **common)
    return HMMProblem(spec, params_p, params_q, anchored)


def _n_perms(S: int) -> int:
    import math

    return math.factorial(S)


def _draw(key, model: HMMMixture, params: HMMParams, n: int, T: int, lo: int) -> HMMSample:
    kl, ks = jax.random.split(key)
    lengths = jax.random.randint(kl, (n,), lo, T + 1, dtype=jnp.int32)
    x, lengths, y, z = model.sample(ks, params, n, T, lengths)
    return HMMSample(x, lengths, y[:, 0], y[:, 1], z)


@partial(jax.jit, static_argnames=("model", "n_source", "n_target", "n_test", "T", "lo"))
def simulate_from_params(key, model, params_p, params_q, *, n_source, n_target, n_test, T, lo):
    """:func:`simulate_hmm` from explicit source and target parameters (traceable; no checks)."""
    k1, k2, k3 = jax.random.split(key, 3)
    return HMMSimulation(_draw(k1, model, params_p, n_source, T, lo),
                         _draw(k2, model, params_q, n_target, T, lo),
                         _draw(k3, model, params_q, n_test, T, lo))


def simulate_hmm(key, problem: HMMProblem, n_source: int, n_target: int, n_test: int) -> HMMSimulation:
    """Source (x, y, y') ~ P, weak target (x, y') ~ Q' (with its gold y) and a gold test sample ~ Q.

    One compiled program per set of sizes; the problem's parameters are arguments (traced)."""
    key = check_key("key", key)
    for name, v in (("n_source", n_source), ("n_target", n_target), ("n_test", n_test)):
        check_int(name, v, minimum=1)
    return problem.simulate_data(key, n_source, n_target, n_test)

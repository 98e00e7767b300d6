"""Mixture of hidden Markov models (paper Example 2.7, Xie et al. 2021): the in-context-learning family.

Concept k is a transition matrix theta_k (and an initial distribution) over S hidden states; tokens are
emitted through an emission matrix tau (S, V) shared by every concept. A record is a token sequence
x = (x^1, ..., x^L) (L <= T, padded to T) and optionally H output tokens (the next token y through the
strong output emission, y' through the weak one), all emitted from the *next* hidden state h_{L+1}:

  p(x, y | k) = sum_h p(h_1 | k) prod_t tau(x^t | h_t) theta_k(h_{t+1} | h_t) prod_j out_j(y_j | h_{L+1})

which is Example 2.7's sum_h p(y | h, tau) p(h | x, theta_k) p(x | theta_k). The density is computed by
the forward algorithm in log space under ``lax.scan`` (one definition for simulation, EM, SVI and NUTS).

Baum-Welch's expected counts are the gradients of the log-likelihood with respect to the log-parameters
(reverse-mode differentiation of the forward recursion *is* the backward recursion; Eisner 2016, "Inside-
outside and forward-backward algorithms are just backprop"), so EM's E-step reuses the forward pass
exactly and cannot drift from the density it maximises (tested against brute-force enumeration).

Dimension names: N sequences, T positions, K concepts, S hidden states, V tokens, H output heads.
Missing output tokens are -1 (they contribute a factor 1); positions past a sequence's length are
masked (their tokens are ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import Array
from jax.scipy.special import logsumexp

from .._validation import as_float_array, check_float, check_int, float_dtype, is_traced
from .batch import Batch, pad_tokens
from .hmm_distribution import HMMMixtureDistribution
from .hmm_params import (
    HMMData,
    HMMParams,
    HMMStats,
    concept_signature,
    normalise_log,
    padded_tokens,
    permute_states,
    propagate,
    state_alignment,
)

__all__ = ["HMMData", "HMMMixture", "HMMMixtureDistribution", "HMMParams", "HMMStats",
           "concept_signature", "padded_tokens", "permute_states", "state_alignment"]


@dataclass(frozen=True)
class HMMMixture:
    """A mixture of K hidden Markov models over S states and V tokens with H output heads.

    Args:
      n_components: K, the number of concepts (transition matrices).
      n_states: S, hidden states.
      n_tokens: V, vocabulary size.
      n_heads: H, output tokens per record emitted from the next hidden state h_{L+1} (0: sequences
        only; 1: the next token y; 2: y and the weak label y').
      reg: Dirichlet(1 + reg) prior on every probability vector: the M-step adds ``reg`` pseudo-counts,
        so an empty state or concept keeps finite parameters and EM's objective never decreases.

    Instances are frozen and hashable: they are static arguments of ``jax.jit``.

    Example:
      >>> import jax
      >>> m = HMMMixture(n_components=2, n_states=3, n_tokens=5, n_heads=1)
      >>> p = m.init_params(jax.random.key(0))
      >>> x, lengths, y, z = m.sample(jax.random.key(1), p, n=4, length=6)
      >>> m.log_likelihood(p, x, lengths, y).shape
      ()
    """

    n_components: int
    n_states: int
    n_tokens: int
    n_heads: int = 0
    reg: float = 1e-6

    def __post_init__(self):
        check_int("n_components", self.n_components, minimum=1)
        check_int("n_states", self.n_states, minimum=1)
        check_int("n_tokens", self.n_tokens, minimum=2)
        check_int("n_heads", self.n_heads, minimum=0)
        check_float("reg", self.reg, positive=True)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def em_kind(self) -> str:
        """``fit_em`` fits this family by its expected statistics (the forward-backward counts) and
        closed-form M-step: Baum-Welch, through the generic driver (``ExpertsFamily.em_kind``)."""
        return "expected_stats"

    @property
    def n_params(self) -> int:
        """Free parameters (for BIC)."""
        K, S, V, H = self.n_components, self.n_states, self.n_tokens, self.n_heads
        return (K - 1) + K * (S - 1) + K * S * (S - 1) + S * (V - 1) + H * S * (V - 1)

    def with_heads(self, n_heads: int) -> HMMMixture:
        return HMMMixture(self.n_components, self.n_states, self.n_tokens, n_heads, self.reg)

    def select_heads(self, params: HMMParams, heads: tuple[int, ...]) -> HMMParams:
        idx = jnp.asarray(heads, jnp.int32).reshape(-1)
        return params._replace(log_out=params.log_out[idx])

    def permute(self, params: HMMParams, perm) -> HMMParams:
        """Relabels concepts: component k of the result is component perm[k] of ``params``."""
        perm = jnp.asarray(perm)
        return params._replace(log_weights=params.log_weights[perm], log_init=params.log_init[perm],
                               log_trans=params.log_trans[perm])

    def permute_states(self, params: HMMParams, perm) -> HMMParams:
        """Relabels hidden states: state s of the result is state perm[s] of ``params``."""
        return permute_states(params, perm)

    def init_params(self, key, dtype=None, *, token_freq: Array | None = None) -> HMMParams:
        """Random parameters: Dirichlet(1) rows; emissions around ``token_freq`` (V,) if given."""
        return _init_jit(self, key, jnp.dtype(dtype or float_dtype()), token_freq)

    def _init_params(self, key, dtype, token_freq) -> HMMParams:
        K, S, V, H = self.n_components, self.n_states, self.n_tokens, self.n_heads
        ks = jax.random.split(key, 5)

        def dirichlet(k, shape):  # Dirichlet(1) rows from exponentials (cheaper than gamma draws)
            g = jnp.maximum(jax.random.exponential(k, shape, dtype), jnp.finfo(dtype).tiny)
            return jnp.log(g) - jnp.log(jnp.sum(g, -1, keepdims=True))

        if token_freq is None:
            log_emit = dirichlet(ks[3], (S, V))
            log_out = dirichlet(ks[4], (H, S, V))
        else:
            base = jnp.log(jnp.asarray(token_freq, dtype) + 1.0 / V)
            u = jax.random.uniform(ks[3], (S, V), dtype, -1.0, 1.0)
            log_emit = normalise_log(base[None, :] + u)
            log_out = jnp.broadcast_to(log_emit[None], (H, S, V))
        return HMMParams(
            log_weights=jnp.full((K,), -jnp.log(jnp.asarray(K, dtype)), dtype),
            log_init=dirichlet(ks[0], (K, S)),
            log_trans=dirichlet(ks[1], (K, S, S)),
            log_emit=log_emit,
            log_out=log_out,
        )

    # ------------------------------------------------------------------ input handling
    def check_data(self, x, lengths=None, y=None, weights=None, *, name: str = "x") -> HMMData:
        """Validates token sequences and converts them to :class:`HMMData`.

        Args:
          x: integer tokens (N, T) in [0, V); entries past a sequence's length are ignored.
          lengths: (N,) ints in [1, T]; None: read from ``x``, where -1 marks trailing padding
            (the protocol's convention; without any -1 every sequence has length T).
          y: output tokens (N, H) (or (N,) when H == 1) in [0, V), -1 for missing; None: all missing.
          weights: optional non-negative per-sequence weights (N,).
        """
        V, H = self.n_tokens, self.n_heads
        if x is None:
            raise TypeError(f"{name} must be an integer array of shape (N, T), got None")
        if not is_traced(x):
            arr = np.asarray(x)
            if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer)
                                           or np.issubdtype(arr.dtype, np.bool_)):
                if np.issubdtype(arr.dtype, np.floating) and arr.size and np.all(arr == np.round(arr)):
                    arr = arr.astype(np.int64)
                else:
                    raise TypeError(f"{name} must hold integer tokens, got dtype {arr.dtype}")
            if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
                raise ValueError(f"{name} must have shape (N, T) with N, T >= 1, got {arr.shape}")
            x = arr
        elif x.ndim != 2:
            raise ValueError(f"{name} must have shape (N, T), got {x.shape}")
        N, T = x.shape
        if lengths is None:  # -1 as trailing padding gives the lengths (none: every row has length T)
            x, lengths = padded_tokens(x)
        elif not is_traced(lengths):
            lengths = np.asarray(lengths)
            if not np.issubdtype(lengths.dtype, np.integer) or lengths.shape != (N,):
                raise ValueError(f"lengths must be integers of shape ({N},), got {lengths.dtype} "
                                 f"{lengths.shape}")
            if lengths.size and (lengths.min() < 1 or lengths.max() > T):
                raise ValueError(f"lengths must lie in [1, {T}], got range [{lengths.min()}, "
                                 f"{lengths.max()}]")
        if not is_traced(x) and not is_traced(lengths):
            valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
            bad = valid & ((x < 0) | (x >= V))
            if bad.any():
                i, t = np.argwhere(bad)[0]
                raise ValueError(f"{name}[{i}, {t}] = {x[i, t]} is not a token in [0, {V}) "
                                 f"(n_tokens={V})")
            x = np.where(valid, x, 0)
        if y is None:
            y = jnp.full((N, H), -1, jnp.int32)
        else:
            if not is_traced(y):
                y = np.asarray(y)
                if not (np.issubdtype(y.dtype, np.integer)
                        or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
                    raise TypeError(f"y must hold integer tokens, got dtype {y.dtype}")
                y = y.astype(np.int64)
                if y.ndim == 1 and H == 1:
                    y = y[:, None]
                if y.shape != (N, H):
                    raise ValueError(f"y must have shape ({N}, {H}) for n_heads={H}, got {y.shape}")
                if y.size and (y.min() < -1 or y.max() >= V):
                    raise ValueError(f"y must hold tokens in [0, {V}) or -1 (missing), got range "
                                     f"[{y.min()}, {y.max()}]")
            elif y.ndim == 1:
                y = y[:, None]
        if weights is None:
            w = jnp.ones((N,), float_dtype())
        else:
            w = as_float_array("weights", weights, ndim=1)
            if w.shape != (N,):
                raise ValueError(f"weights must have shape ({N},), got {w.shape}")
            if not is_traced(w) and (bool(jnp.any(w < 0)) or not bool(jnp.sum(w) > 0)):
                raise ValueError("weights must be >= 0 with a positive sum")
        return HMMData(jnp.asarray(x, jnp.int32), jnp.asarray(lengths, jnp.int32),
                       jnp.asarray(y, jnp.int32), w)

    # ------------------------------------------------------------------ the protocol's batch
    def batch(self, x, y=None, weights=None) -> Batch:
        """The protocol's :class:`~conceptshift.models.batch.Batch`: ``x`` integer tokens (N, T)
        with -1 as trailing padding, ``y`` output tokens (N, H) (-1 = missing; None: all missing),
        ``weights`` (N,) (ones by default); validated as :meth:`check_data`."""
        d = self.check_data(x, None, y, weights)  # lengths read off the -1 padding
        return Batch(pad_tokens(d.x, d.lengths), d.y, d.w)

    def sample_batch(self, key, params: HMMParams, n: int, length: int = 8) -> Batch:
        """n records drawn from the model, of lengths uniform in [ceil(length / 2), length] (so the
        batch has padding), unit weights."""
        kl, ks = jax.random.split(key)
        lengths = jax.random.randint(kl, (n,), (length + 1) // 2, length + 1, jnp.int32)
        x, lengths, y, _ = self.sample(ks, params, n, length, lengths)
        return Batch(pad_tokens(x, lengths), y, jnp.ones((n,), params.log_weights.dtype))

    def covariates(self, x) -> Array:
        """Tokens (N, T) with -1 as trailing padding, validated (what a resampled data set keeps:
        the sequence lengths)."""
        return self.batch(x).x

    def resample_batch(self, key, params: HMMParams, x) -> Batch:
        """A parametric-bootstrap data set: records of the same lengths as ``x``'s (tokens with -1
        as trailing padding) drawn from ``params``, every output head drawn; unit weights."""
        present = x >= 0
        lengths = jnp.sum(present, axis=1).astype(jnp.int32)
        n, T = x.shape
        tokens, _, y, _ = self._sample(key, params, lengths, n, T)
        return Batch(jnp.where(present, tokens, -1), y, jnp.ones((n,), params.log_weights.dtype))

    @staticmethod
    def data_of(batch: Batch) -> HMMData:
        """The batch as the forward algorithm's :class:`HMMData` (tokens, lengths, outputs, weights)."""
        present = batch.x >= 0
        return HMMData(jnp.where(present, batch.x, 0), jnp.sum(present, axis=1).astype(jnp.int32),
                       batch.y, batch.w)

    def batch_log_likelihood(self, params: HMMParams, batch: Batch) -> Array:
        """sum_n w_n log p(x_n, y_n), a scalar."""
        d = self.data_of(batch)
        return jnp.sum(d.w * logsumexp(self.data_component_log_probs(params, d), axis=-1))

    def batch_component_log_probs(self, params: HMMParams, batch: Batch) -> Array:
        """log pi_k + log p(x_n, y_n | k) of a batch, (N, K) (the row weights are not applied)."""
        return self.data_component_log_probs(params, self.data_of(batch))

    def batch_model(self, batch: Batch):
        """:meth:`numpyro_model` conditioned on ``batch`` (row weights scale the observations)."""
        self._numpyro_model(self.data_of(batch), 1.0)

    def start_params(self, key, batch: Batch) -> HMMParams:
        """EM's random start (:meth:`init_params`, emissions around the batch's token frequencies)."""
        d = self.data_of(batch)
        present = (batch.x >= 0).astype(d.w.dtype)
        counts = jnp.zeros((self.n_tokens,), d.w.dtype).at[d.x].add(present * d.w[:, None])
        return self._init_params(key, d.w.dtype, counts / jnp.sum(counts))

    def relabel_vectors(self, params: HMMParams) -> Array:
        """One row per concept, (K, 1 + S + S^2): log-weight, initial and transition log-probabilities
        (the emissions are shared, so they do not tell concepts apart)."""
        K = self.n_components
        return jnp.concatenate([params.log_weights[:, None], params.log_init,
                                params.log_trans.reshape(K, -1)], axis=1)

    def match_cost(self, params_a: HMMParams, head_a, params_b: HMMParams, head_b) -> Array:
        """cost[k, j] (K, K): squared distance between concept k of fit a and concept j of fit b,
        after aligning b's hidden states to a's (optimal matching of the emission rows). Each concept
        is compared by theta_k tau_head (its next-token law through output head ``head``, per
        state), or, with heads None, by its transition matrix theta_k alone (Algorithm 1's variant
        for sources without weak labels)."""
        b = permute_states(params_b, state_alignment(params_a, params_b))
        sa, sb = concept_signature(params_a, head_a), concept_signature(b, head_b)
        return jnp.sum((sa[:, None, :] - sb[None, :, :]) ** 2, -1)

    def match_dim(self, head) -> int:
        """The dimension in which the signatures :meth:`match_cost` compares differ: each is S rows
        of a stochastic matrix (theta_k tau_head, S x V; or theta_k, S x S, when ``head`` is None),
        and rows that sum to 1 differ in S (V - 1), or S (S - 1), dimensions."""
        return self.n_states * ((self.n_states if head is None else self.n_tokens) - 1)

    # ------------------------------------------------------------------ posterior sites
    def site_names(self) -> tuple[str, ...]:
        """The latent sites of :meth:`numpyro_model` in the order they are sampled."""
        return ("weights", "init", "trans", "emit") + (("out",) if self.n_heads else ())

    def to_sites(self, params: HMMParams) -> dict[str, Array]:
        """The latent site values (probabilities, rows renormalised) that give ``params``."""
        sites = {name: jax.nn.softmax(getattr(params, field), axis=-1)
                 for name, field in zip(("weights", "init", "trans", "emit", "out"), HMMParams._fields,
                                        strict=True)}
        return {n: sites[n] for n in self.site_names()}

    def from_sites(self, sites: dict) -> HMMParams:
        """The parameters from one set of latent site values (no leading draw axes)."""
        dtype = sites["weights"].dtype
        S, V = self.n_states, self.n_tokens
        out = sites["out"] if self.n_heads else jnp.zeros((0, S, V), dtype)
        return HMMParams(*(jnp.log(jnp.maximum(p, jnp.finfo(dtype).tiny))
                           for p in (sites["weights"], sites["init"], sites["trans"], sites["emit"], out)))

    # ------------------------------------------------------------------ the forward algorithm
    def forward(self, params: HMMParams, x: Array, lengths: Array) -> Array:
        """log p(x^{1:L}, h_L = s | k) for every sequence, concept and state, (N, K, S).

        Log-space forward recursion under ``lax.scan``: alpha_{t+1}(j) = log sum_i exp(alpha_t(i))
        theta_k(j | i) + log tau(x^{t+1} | j), with the running maximum taken out before the sum (a
        matrix product in probability space, exact in log space). Positions t >= L leave alpha as is.
        """
        N, T = x.shape
        emit_t = jnp.swapaxes(params.log_emit.T[x], 0, 1)  # (T, N, S)
        mask = jnp.arange(T, dtype=jnp.int32)[:, None] < lengths[None, :]  # (T, N)
        trans = jnp.exp(params.log_trans)  # (K, S, S)
        a0 = params.log_init[None, :, :] + emit_t[0][:, None, :]  # (N, K, S)

        def step(a, inp):
            e, m = inp
            new = propagate(a, trans) + e[:, None, :]
            return jnp.where(m[:, None, None], new, a), None

        a, _ = jax.lax.scan(step, a0, (emit_t[1:], mask[1:]))
        return a

    def data_component_log_probs(self, params: HMMParams, d: HMMData) -> Array:
        """log pi_k + log p(x, y | k), (N, K), of validated :class:`HMMData` (no checks: traceable;
        the forward algorithm that every entry point of the family uses)."""
        a = self.forward(params, d.x, d.lengths)  # (N, K, S)
        ll_x = logsumexp(a, axis=-1)
        if self.n_heads == 0:
            return params.log_weights[None, :] + ll_x
        nxt = propagate(a, jnp.exp(params.log_trans))  # log p(x, h_{L+1} = j | k)
        present = d.y >= 0  # (N, H)
        yy = jnp.where(present, d.y, 0)
        # out_terms[n, s] = sum_h [y_nh present] log out_h(y_nh | s)
        per_head = jnp.take_along_axis(
            jnp.swapaxes(params.log_out, 1, 2)[None, :, :, :],  # (1, H, V, S)
            yy[:, :, None, None], axis=2)[:, :, 0, :]  # (N, H, S)
        out_terms = jnp.sum(jnp.where(present[:, :, None], per_head, 0.0), axis=1)  # (N, S)
        ll_xy = logsumexp(nxt + out_terms[:, None, :], axis=-1)
        any_y = jnp.any(present, axis=1)
        return params.log_weights[None, :] + jnp.where(any_y[:, None], ll_xy, ll_x)

    def component_log_probs(self, params: HMMParams, x, lengths=None, y=None) -> Array:
        """log pi_k + log p(x, y | k), (N, K): EM's E-step quantity (y's missing entries are -1)."""
        return _clp_jit(self, params, self.check_data(x, lengths, y))

    def log_likelihood(self, params: HMMParams, x, lengths=None, y=None, weights=None) -> Array:
        """sum_n w_n log p(x_n, y_n), a scalar."""
        d = self.check_data(x, lengths, y, weights)
        return jnp.sum(d.w * logsumexp(_clp_jit(self, params, d), axis=-1))

    def log_posterior_k(self, params: HMMParams, x, lengths=None, y=None) -> Array:
        """log p(k | x, y), (N, K), in log space (no underflow to log 0)."""
        return jax.nn.log_softmax(self.component_log_probs(params, x, lengths, y), axis=-1)

    def row_width(self, batch: Batch) -> int:
        """Elements per row of the E-step's widest temporary (the forward recursion kept for its
        reverse pass, T x K x S): bounds the rows of a block (``stats_em``)."""
        return int(batch.x.shape[1]) * self.n_components * self.n_states

    def posterior_k(self, params: HMMParams, x, lengths=None, y=None) -> Array:
        """Sequence responsibilities p(k | x, y), (N, K)."""
        return jax.nn.softmax(self.component_log_probs(params, x, lengths, y), axis=-1)

    def next_token_log_probs(self, params: HMMParams, x, lengths=None, head: int = 0) -> Array:
        """log q(y = v | x) of output head ``head`` for every token v, (N, V):
        sum_k p(k | x) sum_j p(h_{L+1} = j | x, k) out_head(v | j), in log space."""
        d = self.check_data(x, lengths)
        return _next_jit(self, params, d.x, d.lengths, head)

    def _next_token_log_probs(self, params, x, lengths, head):
        a = self.forward(params, x, lengths)
        nxt = propagate(a, jnp.exp(params.log_trans)) + params.log_weights[None, :, None]  # (N, K, S)
        nxt = nxt - logsumexp(nxt, axis=(1, 2), keepdims=True)  # p(k, h_{L+1} | x)
        joint = nxt[:, :, :, None] + params.log_out[head][None, None, :, :]  # (N, K, S, V)
        return logsumexp(joint, axis=(1, 2))

    def conditional_log_probs(self, params: HMMParams, x, head: int = 0, *, lengths=None) -> Array:
        """log q(y = v | x) for every token v, (N, V): the protocol's name for
        :meth:`next_token_log_probs` (x: tokens with -1 as trailing padding, or ``lengths``)."""
        return self.next_token_log_probs(params, x, lengths, head=head)

    def next_token_log_probs_by_concept(self, params: HMMParams, x, lengths=None, head: int = 0
                                        ) -> tuple[Array, Array]:
        """(log p(k | x) (N, K), log p(y = v | x, k) (N, K, V)) of output head ``head``."""
        d = self.check_data(x, lengths)
        return _by_concept_jit(self, params, d.x, d.lengths, head)

    def _by_concept(self, params, x, lengths, head):
        a = self.forward(params, x, lengths)
        nxt = propagate(a, jnp.exp(params.log_trans))  # (N, K, S) log p(x, h_{L+1} | k)
        ll_k = logsumexp(nxt, axis=-1)
        post = jax.nn.log_softmax(params.log_weights[None, :] + ll_k, axis=-1)
        state = nxt - ll_k[:, :, None]
        per_k = logsumexp(state[:, :, :, None] + params.log_out[head][None, None, :, :], axis=2)
        return post, per_k

    def sample_conditional(self, key, params: HMMParams, x, lengths=None) -> Array:
        """Draws the output tokens y ~ q(y | x) of every head for each sequence, (N, H): the next
        hidden state h_{L+1} (and concept) from p(k, h_{L+1} | x), then each head from it."""
        d = self.check_data(x, lengths)
        return _cond_sample_jit(self, key, params, d.x, d.lengths)

    def _sample_conditional(self, key, params, x, lengths):
        a = self.forward(params, x, lengths)
        nxt = propagate(a, jnp.exp(params.log_trans)) + params.log_weights[None, :, None]  # (N, K, S)
        kh, ky = jax.random.split(key)
        ks = jax.random.categorical(kh, nxt.reshape(nxt.shape[0], -1), axis=-1)
        h = ks % self.n_states
        keys = jax.random.split(ky, max(self.n_heads, 1))
        cols = [jax.random.categorical(keys[j], params.log_out[j][h], axis=-1)
                for j in range(self.n_heads)]
        return jnp.stack(cols, 1).astype(jnp.int32) if cols else jnp.zeros((x.shape[0], 0), jnp.int32)

    def conditional_log_prob(self, params: HMMParams, x, lengths=None, y=None, head: int = 0) -> Array:
        """log q(y_n | x_n) of head ``head``, (N,) (y: tokens (N,), required)."""
        if y is None:
            raise TypeError("y must be output tokens of shape (N,), got None")
        table = self.next_token_log_probs(params, x, lengths, head)
        y = jnp.asarray(y, jnp.int32).reshape(-1)
        return jnp.take_along_axis(table, y[:, None], axis=1)[:, 0]

    # ------------------------------------------------------------------ EM pieces
    def expected_stats(self, params: HMMParams, batch: Batch) -> tuple[Array, HMMStats]:
        """Weighted log-likelihood and the expected counts of Baum-Welch's E-step, for a protocol
        :class:`~conceptshift.models.batch.Batch`.

        The counts are d/d(log-parameter) of sum_n w_n log p(x_n, y_n), which equals the forward-
        backward posterior expectations (the log-parameters enter the forward recursion linearly)."""

        d = self.data_of(batch)

        def ll(p):
            return jnp.sum(d.w * logsumexp(self.data_component_log_probs(p, d), axis=-1))

        val, g = jax.value_and_grad(ll)(params)
        return val, HMMStats(g.log_weights, g.log_init, g.log_trans, g.log_emit, g.log_out)

    def m_step_from_stats(self, s: HMMStats) -> HMMParams:
        """Closed-form maximiser of the expected complete-data log-likelihood plus the log prior."""
        nu = jnp.asarray(self.reg, s.n_k.dtype)

        def normalise(c):
            c = jnp.maximum(c, 0.0) + nu  # autodiff counts can be -0 or -1e-17 by rounding
            return jnp.log(c) - jnp.log(jnp.sum(c, -1, keepdims=True))

        return HMMParams(normalise(s.n_k), normalise(s.init), normalise(s.trans), normalise(s.emit),
                         normalise(s.out))

    def log_prior(self, params: HMMParams) -> Array:
        """log density (up to a constant) of the Dirichlet(1 + reg) prior on every row."""
        return self.reg * sum(jnp.sum(leaf) for leaf in params)

    # ------------------------------------------------------------------ NumPyro
    def distribution(self, params: HMMParams, lengths: Array, length: int | None = None):
        """The NumPyro distribution of records [x^1..x^T, y_1..y_H] (one integer vector per row)."""
        return HMMMixtureDistribution(self, params, lengths, length)

    def numpyro_model(self, x, lengths=None, y=None, *, concentration: float = 1.0):
        """Dirichlet priors on every probability vector and the observed records.

        ``x`` (N, T) and ``y`` (N, H) are concatenated into one record per row; sample sites:
        ``weights``, ``init``, ``trans``, ``emit``, ``out`` (only when H > 0) and the observed ``obs``.
        """
        self._numpyro_model(self.check_data(x, lengths, y), concentration)

    def _numpyro_model(self, d: HMMData, concentration):
        import numpyro

        K, S, V, H = self.n_components, self.n_states, self.n_tokens, self.n_heads
        dtype = d.w.dtype
        c = jnp.asarray(concentration, dtype)
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            weights = numpyro.sample("weights", dist.Dirichlet(jnp.full((K,), c)))
            init = numpyro.sample("init", dist.Dirichlet(jnp.full((K, S), c)).to_event(1))
            trans = numpyro.sample("trans", dist.Dirichlet(jnp.full((K, S, S), c)).to_event(2))
            emit = numpyro.sample("emit", dist.Dirichlet(jnp.full((S, V), c)).to_event(1))
            if H:
                out = numpyro.sample("out", dist.Dirichlet(jnp.full((H, S, V), c)).to_event(2))
            else:  # no output heads: no site (numpyro cannot transform a zero-size simplex batch)
                out = jnp.zeros((0, S, V), dtype)
            params = HMMParams(*(jnp.log(jnp.maximum(p, jnp.finfo(dtype).tiny))
                                 for p in (weights, init, trans, emit, out)))
            record = jnp.concatenate([d.x, d.y], axis=1)
            with numpyro.handlers.scale(scale=d.w):  # the row weights (ones by default)
                numpyro.sample("obs", self.distribution(params, d.lengths, d.x.shape[1]), obs=record)

    # ------------------------------------------------------------------ simulation
    def sample(self, key, params: HMMParams, n: int, length: int, lengths=None):
        """Draws n records: tokens (n, T) (zeros past each length), lengths (n,), outputs (n, H) from
        the state after the last token, concepts z (n,).

        ``length`` (T) is static; ``lengths`` (n,) in [1, T] defaults to T for every record.
        """
        n = check_int("n", n, minimum=1)
        T = check_int("length", length, minimum=1)
        if lengths is None:
            lengths = jnp.full((n,), T, jnp.int32)
        lengths = jnp.asarray(lengths, jnp.int32)
        if lengths.shape != (n,):
            raise ValueError(f"lengths must have shape ({n},), got {lengths.shape}")
        return _sample_jit(self, key, params, lengths, n, T)

    def _sample(self, key, params, lengths, n, T):
        kz, kh, kx, ky = jax.random.split(key, 4)
        z = jax.random.categorical(kz, params.log_weights, shape=(n,))
        h0 = jax.random.categorical(kh, params.log_init[z], axis=-1)  # (n,)

        def step(h, k):
            ke, kt = jax.random.split(k)
            tok = jax.random.categorical(ke, params.log_emit[h], axis=-1)
            h_next = jax.random.categorical(kt, params.log_trans[z, h], axis=-1)
            return h_next, (h, tok)

        _, (states, toks) = jax.lax.scan(step, h0, jax.random.split(kx, T + 1))
        states, toks = states.T, toks.T  # (n, T + 1)
        valid = jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]
        x = jnp.where(valid, toks[:, :T], 0).astype(jnp.int32)
        h_next = jnp.take_along_axis(states, lengths[:, None], axis=1)[:, 0]  # h_{L+1}
        keys = jax.random.split(ky, max(self.n_heads, 1))
        y = jnp.stack([jax.random.categorical(keys[j], params.log_out[j][h_next], axis=-1)
                       for j in range(self.n_heads)], axis=1) if self.n_heads else \
            jnp.zeros((n, 0), jnp.int32)
        return x, lengths, y.astype(jnp.int32), z.astype(jnp.int32)


def _clp(model, params, d):
    return model.data_component_log_probs(params, d)


def _next(model, params, x, lengths, head):
    return model._next_token_log_probs(params, x, lengths, head)


def _by_concept(model, params, x, lengths, head):
    return model._by_concept(params, x, lengths, head)


def _cond_sample(model, key, params, x, lengths):
    return model._sample_conditional(key, params, x, lengths)


def _sample(model, key, params, lengths, n, T):
    return model._sample(key, params, lengths, n, T)


def _init(model, key, dtype, token_freq):
    return model._init_params(key, dtype, token_freq)


# compiled entry points (the model, a frozen dataclass, is static; arrays are traced)
_clp_jit = jax.jit(_clp, static_argnums=0)
_next_jit = jax.jit(_next, static_argnums=(0, 4))
_by_concept_jit = jax.jit(_by_concept, static_argnums=(0, 4))
_sample_jit = jax.jit(_sample, static_argnums=(0, 4, 5))
_cond_sample_jit = jax.jit(_cond_sample, static_argnums=0)
_init_jit = jax.jit(_init, static_argnums=(0, 2))

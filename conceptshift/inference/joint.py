"""A joint Bayesian Algorithm 1: one NumPyro model of both domains with the matching marginalised.

Algorithm 1 fits D_P and D_Q' separately and matches the weak heads by a hard argmin, so any band
built from draws of the two fits ignores how sure the matching is. The joint model writes the
matching into the model instead:

* the source D_P = {(x, y, y')}: the family with two heads (strong theta_k and weak theta^wp_k),
  proportions pi^p, under the family's own priors;
* the weak target D_Q' = {(x, y')}: the family with one head (theta^wq_j) and proportions pi^q;
* the shift prior of Assumption 4.5, linking them through the unknown assignment a (component k of
  P is component a(k) of Q), a factor on top of the family's own weak priors on theta^wq (so the
  effective prior of the target heads is their product, close to the shift prior when tau is small
  against the family priors' scales):

      p(theta^wq | theta^wp, tau) = (1 / K!) sum_a prod_k N(theta^wq_{a(k)}; theta^wp_k, tau^2 I_d),

  the sum over all K! assignments written out (log-sum-exp, K <= 7), tau with the prior
  Gamma(2, rate 0.1) (:data:`SHIFT_SCALE_PRIOR`), and the family's ``match_cost`` /
  ``match_dim`` giving the squared distances between the matched heads' d-vectors.

The prior on tau vanishes at 0, as p(tau) proportional to tau does (the boundary-avoiding prior of
Chung et al., 2013, for a scale fitted from few groups); its rate makes it proper, with mean 20,
twice the scale (10) of the families' own priors on the heads. Two flatter priors were tried and measured:

* flat in log tau (p(tau) proportional to 1/tau) leaves the joint posterior improper at tau -> 0,
  where the integral over the target heads tends to the likelihood at theta^wq = theta^wp (the
  hierarchical-variance case of Gelman, 2006): NUTS drifted to tau -> 0 with 10 divergences;
* flat in tau gives a proper posterior but, where the data put tau near 0, leaves a funnel
  between tau and the heads: at ``experiment posterior --set seed=7`` (4 x 1000 draws, target_accept 0.95) 5
  divergences, step sizes 0.05-0.23 across chains and R-hat 1.020 on log tau (bulk ESS 232),
  against none, 0.20-0.29 and 1.003 (ESS 1383) with this prior, same data and key, in 25 s
  against 59 s.

What this prior does not remove: where a target component has little data (a weight below a few
per cent), its head is held mostly by the shift prior, centred on a source head at scale tau, and
NUTS meets the funnel of a centred hierarchical model as tau shrinks (``experiment posterior --set
seed=2026``: tens of divergences at tau 0.03-0.10 in some runs, R-hat 1.005-1.024 over keys). A
non-centred parametrisation, theta^wq_k = theta^wp_k + tau z_k around Algorithm 1's matching with
the other matchings kept in the sum, was built and measured: its density equals this one's plus
the Jacobian, but at that seed it gave 1, 4 and 177 divergences over three keys, with step sizes
down to 0.006, since it slows the components that many rows pin down. Partial non-centring,
weighted per coordinate by the prior's share of the precision at the EM fit (w = 1 / (1 + tau^2
times the target log-likelihood's curvature)), gave weights of 0.002-0.017 and runs like the
centred one's (40, 8 and 4 divergences). The geometry changes within the posterior: the small
component's weight ranges over 0.0004-0.04 across draws, and its head is pinned by data at one end
and by the shift prior at the other, so no fixed parametrisation suits both.

The assignment is a discrete latent summed out of the density, so NUTS and SVI see only continuous
sites. Each posterior draw (theta, tau) then carries the exact conditional p(a | theta, tau)
(:func:`~conceptshift.inference.matching.matching_log_posterior` with ``scale=tau``); a draw of q̂
samples a from it, so bands of q̂(x) integrate the matching's uncertainty, and the average of
p(a | theta, tau) over draws is the posterior probability of each matching given the data.

The target's components are labelled only up to the matching (the shift prior is symmetric in
them), and the source's up to a joint relabelling; draws are relabelled to the EM fits they start
from, the source's and the target's separately, each by what its components explain in its own data
(:func:`~conceptshift.inference.mcmc.relabel` with the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import Array
from numpyro import handlers

from .._validation import check_float, check_int, check_key
from ..models.batch import Batch
from ..models.registry import check_family
from .em import EMResult, fit_em
from .estimators import Data, check_data_samples
from .matching import MAX_EXACT, all_permutations, matching_log_posterior, matching_posterior_summary
from .mcmc import convergence_checks, param_arrays, relabel, sample_nuts, warn_unconverged
from .predictor import strong_predictor, with_proportions
from .sites import numpyro_numerics
from .svi import cached_adam, svi_on_batch

METHODS = ("nuts", "svi")
SHIFT_SCALE_PRIOR = (2.0, 0.1)  # tau ~ Gamma(concentration, rate): p(tau) proportional to tau exp(-tau / 10)


class JointBatch(NamedTuple):
    source: Batch  # (x, [y, y'], w)
    target: Batch  # (x, y', w)


class JointParams(NamedTuple):
    source: Any  # the two-head family's parameters (strong head 0, weak head 1)
    target: Any  # the one-head family's parameters (weak head)
    log_shift_scale: Array  # () log tau


@dataclass(frozen=True)
class JointModel:
    """The joint model of D_P and D_Q' over a family (its one-head version); hashable, so it is a
    static argument of the compiled samplers. Needs the family's ``match_cost`` and ``match_dim``
    and K <= 7 (the K! assignments are summed in the density)."""

    family: Any

    def __post_init__(self):
        check_family(self.family, "JointModel", needs=("with_heads", "batch", "batch_model", "to_sites",
                                                       "from_sites", "match_cost", "match_dim",
                                                       "batch_component_log_probs", "permute",
                                                       "batch_log_likelihood"))
        K = self.family.n_components
        if K > MAX_EXACT:
            raise ValueError(f"the joint model sums all K! matchings in its density; n_components must "
                             f"be <= {MAX_EXACT}, got {K}")

    @property
    def source_model(self):
        return self.family.with_heads(2)

    @property
    def target_model(self):
        return self.family.with_heads(1)

    @property
    def n_components(self) -> int:
        return self.family.n_components

    @property
    def match_dim(self) -> int:
        return int(self.family.match_dim(0))

    # ------------------------------------------------------------------ sites
    def site_names(self) -> tuple[str, ...]:
        return (tuple(f"source/{n}" for n in self.source_model.site_names())
                + tuple(f"target/{n}" for n in self.target_model.site_names()) + ("log_shift_scale",))

    def to_sites(self, params: JointParams) -> dict:
        out = {f"source/{n}": v for n, v in self.source_model.to_sites(params.source).items()}
        out.update({f"target/{n}": v for n, v in self.target_model.to_sites(params.target).items()})
        out["log_shift_scale"] = params.log_shift_scale
        return out

    def from_sites(self, sites: dict) -> JointParams:
        def part(prefix, m):
            return m.from_sites({n: sites[f"{prefix}/{n}"] for n in m.site_names()})

        return JointParams(part("source", self.source_model), part("target", self.target_model),
                           sites["log_shift_scale"])

    # ------------------------------------------------------------------ density
    def shift_log_density(self, params: JointParams) -> Array:
        """log p(theta^wq | theta^wp, tau): the shift prior with the assignment summed out."""
        K, d = self.n_components, self.match_dim
        cost = self.family.match_cost(params.source, 1, params.target, 0)
        perms = jnp.asarray(all_permutations(K))
        total = jnp.sum(cost[jnp.arange(K), perms], axis=-1)
        log_tau = params.log_shift_scale
        logw = -0.5 * total * jnp.exp(-2.0 * log_tau)
        return (jax.nn.logsumexp(logw) - math.lgamma(K + 1) - K * d * log_tau
                - 0.5 * K * d * math.log(2 * math.pi))

    @staticmethod
    def shift_scale_log_prior(log_tau) -> Array:
        """log p(log tau): the Gamma prior of :data:`SHIFT_SCALE_PRIOR` on tau with the Jacobian
        d tau / d log tau = tau."""
        concentration, rate = SHIFT_SCALE_PRIOR
        return dist.Gamma(concentration, rate).log_prob(jnp.exp(log_tau)) + log_tau

    def batch_model(self, batch: JointBatch) -> None:
        """The NumPyro model: both domains' family models (sites prefixed ``source/`` and
        ``target/``), log tau (its Gamma prior on tau with the Jacobian) and the shift prior as a
        factor."""
        with handlers.scope(prefix="source", divider="/"):
            src = handlers.trace(self.source_model.batch_model).get_trace(batch.source)
        with handlers.scope(prefix="target", divider="/"):
            tgt = handlers.trace(self.target_model.batch_model).get_trace(batch.target)
        dtype = batch.target.w.dtype
        log_tau = numpyro.sample("log_shift_scale", dist.ImproperUniform(dist.constraints.real, (), ()))
        numpyro.factor("shift_scale_prior", self.shift_scale_log_prior(log_tau))
        sites = {n: src[n]["value"] for n in src if src[n]["type"] == "sample" and not src[n]["is_observed"]}
        sites.update({n: tgt[n]["value"] for n in tgt
                      if tgt[n]["type"] == "sample" and not tgt[n]["is_observed"]})
        sites["log_shift_scale"] = jnp.asarray(log_tau, dtype)
        numpyro.factor("shift", self.shift_log_density(self.from_sites(sites)))

    def batch_log_likelihood(self, params: JointParams, batch: JointBatch) -> Array:
        """The two domains' log-likelihoods summed (what separate EM fits maximise)."""
        return (self.source_model.batch_log_likelihood(params.source, batch.source)
                + self.target_model.batch_log_likelihood(params.target, batch.target))

    def matching_log_posterior(self, params: JointParams) -> Array:
        """log p(a | theta, tau) for every assignment (K!,), in :func:`all_permutations`' order."""
        cost = self.family.match_cost(params.source, 1, params.target, 0)
        return matching_log_posterior(cost, scale=jnp.exp(params.log_shift_scale))[1]


# ---------------------------------------------------------------------------------- the fit
@dataclass
class JointPosterior:
    """Draws of the joint model (:func:`fit_joint`).

    ``params``: :class:`JointParams` with leading (chain, draw) axes (SVI: one chain), the source
    relabelled to ``source_fit`` and the target to ``target_fit``; ``assignments`` (M, K) every
    matching; ``matching_log_prob`` (C, S, M) log p(a | theta, tau) of each draw;
    ``matching_prob`` (M,) their average, the posterior probability of each matching given the
    data; ``sample_stats``: NUTS's per-draw statistics (None for SVI); ``checks``: NUTS's sampler
    checks (:func:`~conceptshift.inference.mcmc.convergence_checks` over the source's and target's
    parameters and log tau; ``failed`` empty when all passed; None for SVI).
    """

    model: JointModel
    method: str
    params: JointParams
    assignments: Array
    matching_log_prob: Array
    matching_prob: np.ndarray
    sample_stats: dict | None
    source_fit: EMResult
    target_fit: EMResult
    seconds: float = 0.0
    checks: dict | None = None

    def predictor_draws(self, key) -> tuple[Any, Array]:
        """One q̂ per draw, its matching sampled from p(a | theta, tau): (the one-head family's
        parameters with leading (chain, draw) axes, the sampled assignments (C, S, K))."""
        key = check_key("key", key)
        C, S = self.matching_log_prob.shape[:2]
        idx = jax.random.categorical(key, self.matching_log_prob, axis=-1)  # (C, S)
        a = jnp.asarray(self.assignments)[idx]
        m1 = self.model.target_model

        def one(src, tgt, a):
            return with_proportions(strong_predictor(m1, src, 0), tgt.log_weights[a]).params

        q = jax.vmap(jax.vmap(one))(self.params.source, self.params.target, a)
        return q, a

    def matching_summary(self, top: int = 3) -> dict:
        """The most probable matchings and their posterior probabilities
        (:func:`~conceptshift.inference.matching.matching_posterior_summary`)."""
        return matching_posterior_summary(self.assignments, self.matching_prob, top=top)


def _joint_batch(model: JointModel, source: Data, target: Data) -> JointBatch:
    y2 = jnp.stack([jnp.asarray(source.y), jnp.asarray(source.y_weak)], axis=1)
    return JointBatch(model.source_model.batch(source.x, y2, source.w),
                      model.target_model.batch(target.x, target.y_weak, target.w))


def fit_joint(family, key, source: Data, target: Data, *, method: str = "nuts", restarts: int = 8,
              source_fit: EMResult | None = None, target_fit: EMResult | None = None,
              num_chains: int = 4, num_warmup: int = 500, num_samples: int = 500,
              svi_steps: int = 3000, learning_rate: float = 0.02, target_accept: float = 0.95,
              max_tree_depth: int = 8, progress: bool = False) -> JointPosterior:
    """The joint model of D_P and D_Q' (:class:`JointModel`) fitted by NUTS or SVI.

    Args:
      family: the family (any number of heads; the source is fitted with two, the target with one).
      key: a ``jax.random`` key.
      source: :class:`~conceptshift.inference.estimators.Data` with ``y`` and ``y_weak``.
      target: Data with ``y_weak``.
      method: ``"nuts"`` (chains vectorized, as :func:`~conceptshift.inference.fit_nuts`) or ``"svi"``
        (a full-rank Gaussian guide; ``num_samples`` draws from it, one chain).
      restarts: EM restarts of the separate fits the chains start from (and the draws are relabelled
        to), unless ``source_fit`` and ``target_fit`` are given.
      num_chains, num_warmup, num_samples, target_accept, max_tree_depth: NUTS's settings.
        ``target_accept`` defaults to 0.95, not NUTS's usual 0.8: where the data put tau near 0
        the heads' posterior narrows with tau, and the smaller steps avoid divergences there
        (``experiment posterior --set seed=7``'s data, one key, 4 x 1000 draws: 3 divergences at
        0.8, none at 0.95, 22 s against 25 s).
      svi_steps, learning_rate: SVI's.

    Every chain starts at the EM fits with tau at sqrt(C_best / (K d)), the scale the optimal
    matching's cost suggests. A second call with data of the same shapes compiles nothing.

    NUTS's draws are checked (R-hat, bulk and tail ESS, divergences, E-BFMI; the result's
    ``checks``) and a :class:`~conceptshift.inference.mcmc.ConvergenceWarning` names any check that
    fails.
    """
    import time

    check_family(family, "fit_joint")
    key = check_key("key", key)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    source, target = check_data_samples(source, target, needs=(("y", "y_weak"), ("y_weak",)))
    num_chains = check_int("num_chains", num_chains, minimum=1)
    num_warmup = check_int("num_warmup", num_warmup, minimum=1)
    num_samples = check_int("num_samples", num_samples, minimum=1)
    svi_steps = check_int("svi_steps", svi_steps, minimum=1)
    restarts = check_int("restarts", restarts, minimum=1)
    max_tree_depth = check_int("max_tree_depth", max_tree_depth, minimum=1)
    learning_rate = check_float("learning_rate", learning_rate, positive=True)
    target_accept = check_float("target_accept", target_accept, positive=True)
    if not target_accept < 1:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
    if (source_fit is None) != (target_fit is None):
        raise ValueError("give both source_fit and target_fit, or neither")
    for name, fit in (("source_fit", source_fit), ("target_fit", target_fit)):
        if fit is not None and not isinstance(fit, EMResult):
            raise TypeError(f"{name} must be an EMResult (fit_em's result), got {type(fit).__name__}")
    model = JointModel(family.with_heads(1))
    batch = _joint_batch(model, source, target)
    t0 = time.perf_counter()
    ks, kt, kf, kd = jax.random.split(key, 4)
    if source_fit is None:
        source_fit = fit_em(model.source_model, ks, batch.source.x, batch.source.y, weights=batch.source.w,
                            restarts=restarts)
        target_fit = fit_em(model.target_model, kt, batch.target.x, batch.target.y, weights=batch.target.w,
                            restarts=restarts)
    dtype = batch.target.w.dtype
    sp = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), source_fit.params)
    tp = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), target_fit.params)
    K, d = model.n_components, model.match_dim
    cost = family.match_cost(sp, 1, tp, 0)
    best = float(jnp.min(jnp.sum(cost[jnp.arange(K), jnp.asarray(all_permutations(K))], -1)))
    log_tau0 = jnp.asarray(0.5 * math.log(max(best, 1e-12) / (K * d)), dtype)
    start = JointParams(sp, tp, log_tau0)
    stats = None
    if method == "nuts":
        params0 = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num_chains,) + jnp.shape(a)), start)
        raw, stats = sample_nuts(model, kf, batch, params0, num_chains=num_chains, num_warmup=num_warmup,
                                 num_samples=num_samples, target_accept=target_accept,
                                 max_tree_depth=max_tree_depth, progress=progress)
    else:
        res = svi_on_batch(model, kf, batch, start, guide="fullrank", num_steps=svi_steps,
                           optimizer=cached_adam(float(learning_rate)), progress=progress)
        raw = jax.tree_util.tree_map(lambda a: a[None], res.sample_params(kd, num_samples))
    src, _ = relabel(model.source_model, raw.source, sp, batch=batch.source)
    tgt, _ = relabel(model.target_model, raw.target, tp, batch=batch.target)
    params = JointParams(src, tgt, raw.log_shift_scale)
    with numpyro_numerics():
        lp = jax.vmap(jax.vmap(model.matching_log_posterior))(params)
    prob = np.asarray(jnp.mean(jnp.exp(lp).reshape(-1, lp.shape[-1]), 0), np.float64)
    jax.block_until_ready(lp)
    checks = None
    if stats is not None:
        checks = convergence_checks(param_arrays("", params), stats)
        warn_unconverged(checks, "fit_joint")
    return JointPosterior(model, method, params, jnp.asarray(all_permutations(K)), lp, prob, stats,
                          source_fit, target_fit, time.perf_counter() - t0, checks)

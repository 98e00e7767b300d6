"""NUTS on a family's marginalised NumPyro model, several chains vectorized, and relabelling.

The model is ``numpyro_model`` itself: k is summed out in its ``MixtureSameFamily`` likelihood, so
NUTS samples only continuous sites. The posterior of a K-component mixture is invariant under the K!
relabellings of its components; chains (and long single chains) visit different labellings, and
every per-component summary (R-hat, ESS, intervals) is meaningless until the draws are aligned.
:func:`relabel` aligns each draw to a reference fit (e.g. EM's) by an optimal assignment (vmapped
over draws), on one of two costs:

- given the data, by what the components explain: the assignment that minimises
  -sum_i w_i p_ref(k | row i) log p_draw(a(k) | row i), Stephens' (2000) Kullback-Leibler criterion
  against a fixed reference (the family's ``batch_component_log_probs``). A draw in which a
  component has emptied (its weight near 0, its parameters wandering over their prior) keeps every
  occupied component under its own label;
- without data, by squared distance between the components' parameter vectors
  (``relabel_vectors``). This is exact for permuted copies of one draw but can mislabel such emptied
  draws: the wandering component's vector may lie nearer an occupied component of the reference than
  the occupied one does. :func:`fit_nuts` and :func:`~conceptshift.inference.joint.fit_joint`
  relabel by the data.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from numpyro.distributions import biject_to
from numpyro.infer.hmc import hmc
from numpyro.infer.util import initialize_model

from .._validation import check_float, check_int, check_key
from ..models.registry import check_family
from .em import check_init_params
from .matching import assign_traced
from .sites import latent_site_names, numpyro_numerics, params_from_sites, sites_from_params

EXTRA_FIELDS = ("diverging", "accept_prob", "num_steps", "energy", "potential_energy",
                "adapt_state.step_size")

RHAT_MAX = 1.01  # Vehtari et al. (2021): rank-normalised split R-hat at most 1.01
ESS_PER_CHAIN = 100  # and bulk and tail ESS at least 100 per chain (400 for four chains)
BFMI_MIN = 0.3  # E-BFMI below it: the momentum resampling explores the energy poorly


class ConvergenceWarning(UserWarning):
    """A Markov-chain fit failed one of the sampler checks of :func:`convergence_checks`: its
    draws are not yet a sample of the posterior to trust."""


def param_arrays(prefix: str, params) -> dict:
    """{prefix_field: (chain, draw, ...) array} for a NamedTuple of parameter draws (a nested one
    flattened with its field names)."""
    if not hasattr(params, "_fields"):
        raise TypeError(f"params must be a NamedTuple of parameter draws, got {type(params).__name__}")
    out = {}
    for field, v in zip(params._fields, params, strict=True):
        name = f"{prefix}_{field}" if prefix else field
        out.update(param_arrays(name, v) if hasattr(v, "_fields") else {name: np.asarray(v)})
    return out


def draws_convergence(arrays: dict) -> dict | None:
    """R-hat (rank-normalised split, the larger of bulk and folded; Vehtari et al. 2021), bulk and
    tail ESS of every coordinate of named (chain, draw, ...) arrays: ``max_rhat``, ``worst_rhat``
    (the name holding it), ``min_ess_bulk``, ``min_ess_tail``. Constant coordinates (a pinned
    parameter) are skipped; None when nothing varies."""
    from arviz_base import rcParams
    from arviz_stats.base import array_stats

    # tail ESS at the quantiles ArviZ's summary uses: ci_prob and 1 - ci_prob (0.89 by default)
    ci_prob = rcParams["stats.ci_prob"]
    worst, name, bulk, tail = 0.0, "", np.inf, np.inf
    for var, a in arrays.items():
        a = np.asarray(a)
        v = a.reshape(a.shape[0], a.shape[1], -1)
        keep = np.std(v, axis=(0, 1)) > 0
        if not keep.any():
            continue
        v = v[..., keep]
        # nan (too few draws for the statistic) propagates: it fails the checks, never passes them
        r = float(np.max(array_stats.rhat(v, chain_axis=0, draw_axis=1)))
        if not math.isnan(worst) and not r <= worst:
            worst, name = r, var
        bulk = float(np.min([bulk, *np.ravel(array_stats.ess(v, chain_axis=0, draw_axis=1, method="bulk"))]))
        tail = float(np.min([tail, *np.ravel(array_stats.ess(v, chain_axis=0, draw_axis=1, method="tail",
                                                             prob=ci_prob))]))
    if not name:
        return None
    return {"max_rhat": worst, "worst_rhat": name, "min_ess_bulk": bulk, "min_ess_tail": tail}


def convergence_checks(arrays: dict, sample_stats: dict) -> dict:
    """The sampler checks of a Markov-chain fit, on its draws (named (chain, draw, ...) arrays, as
    :func:`param_arrays` gives them) and its ``sample_stats``: R-hat at most :data:`RHAT_MAX`, bulk
    and tail ESS at least :data:`ESS_PER_CHAIN` per chain, no divergent transition after warm-up,
    E-BFMI at least :data:`BFMI_MIN` in every chain.

    Returns :func:`draws_convergence`'s numbers, ``divergences``, ``bfmi_min`` and ``failed``: the
    checks that fail, as sentences (empty: all passed).
    """
    from arviz_stats.base import array_stats

    out = dict(draws_convergence(arrays) or {})
    n_chains = int(np.shape(sample_stats["diverging"])[0])
    out["divergences"] = int(np.sum(sample_stats["diverging"]))
    energy = np.asarray(sample_stats["energy"], np.float64)
    out["bfmi_min"] = float(np.min(array_stats.bfmi(energy, chain_axis=0, draw_axis=1)))
    rhat = [("R-hat ", out["max_rhat"], f" (worst: {out['worst_rhat']})")] if "max_rhat" in out else []
    ess = [(f"{k} ESS ", out[f"min_ess_{k}"]) for k in ("bulk", "tail") if f"min_ess_{k}" in out]
    out["failed"] = threshold_failures(n_chains, rhat=rhat, ess=ess, divergences=out["divergences"],
                                       bfmi_min=out["bfmi_min"])
    return out


def threshold_failures(n_chains: int, *, rhat=(), ess=(), divergences: int = 0, bfmi_min=None) -> list[str]:
    """The sampler checks that fail, as sentences, in this order: each ``rhat`` triple (words
    before, value, words after) above :data:`RHAT_MAX`, each ``ess`` pair (words before, value)
    below :data:`ESS_PER_CHAIN` per chain, divergent transitions after warm-up, and the smallest
    E-BFMI below :data:`BFMI_MIN`. A nan value fails. Shared by :func:`convergence_checks` and
    ``diagnostics.posterior.failed_checks``."""
    out = [f"{before}{v:.3f} > {RHAT_MAX}{after}" for before, v, after in rhat if not v <= RHAT_MAX]
    need = ESS_PER_CHAIN * n_chains
    out += [f"{before}{v:.0f} < {need} ({ESS_PER_CHAIN} per chain)" for before, v in ess if not v >= need]
    if divergences:
        out.append(f"{divergences} divergent transition{'s' if divergences != 1 else ''} after warm-up")
    if bfmi_min is not None and not bfmi_min >= BFMI_MIN:
        out.append(f"E-BFMI {bfmi_min:.2f} < {BFMI_MIN}")
    return out


def warn_unconverged(checks: dict, who: str) -> None:
    """A :class:`ConvergenceWarning` naming the failed checks of :func:`convergence_checks`, if
    any."""
    if checks["failed"]:
        warnings.warn(f"{who}: sampler checks failed: {'; '.join(checks['failed'])}. The draws are not "
                      "yet a sample to trust: run longer chains, raise target_accept, or read the "
                      "posterior's shape (conceptshift diagnose).", ConvergenceWarning, stacklevel=3)


def reference_responsibilities(model, reference, batch) -> Array:
    """p_ref(k | row i), (N, K), times the row weights: the reference's side of the allocation cost
    (computed once per set of draws)."""
    lr = jax.nn.log_softmax(model.batch_component_log_probs(reference, batch), axis=-1)
    return batch.w[:, None] * jnp.exp(lr)


def relabel_one(model, params, reference, batch=None, weighted_resp=None):
    """(aligned params, perm): component k of the result is component perm[k] of ``params``, the
    one assigned to the reference's component k by the optimal assignment.

    With ``batch`` (the data the draws were fitted to) the cost is by allocation:
    cost[k, j] = -sum_i w_i p_ref(k | row i) log p_params(j | row i) (``weighted_resp``, the first
    factor, may be passed precomputed by :func:`reference_responsibilities`). Without, it is the
    squared distance between the family's ``relabel_vectors``.
    """
    if batch is None:
        a, b = model.relabel_vectors(reference), model.relabel_vectors(params)
        cost = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)
    else:
        if weighted_resp is None:
            weighted_resp = reference_responsibilities(model, reference, batch)
        lr = jax.nn.log_softmax(model.batch_component_log_probs(params, batch), axis=-1)
        # a probability that underflowed to 0 (log -inf) counts as the smallest normal number, so
        # that a reference responsibility of 0 against it adds 0, not nan
        lr = jnp.where(jnp.isneginf(lr), jnp.log(jnp.finfo(lr.dtype).tiny), lr)
        cost = -(weighted_resp.T @ lr)
    perm = assign_traced(cost)
    return model.permute(params, perm), perm


def _relabel_flat_impl(model, flat, reference, batch, draws_per_step):
    if batch is None:
        return jax.vmap(lambda p: relabel_one(model, p, reference))(flat)
    resp = reference_responsibilities(model, reference, batch)
    # draws in groups: each holds its own (N, K) log-responsibilities
    return jax.lax.map(lambda p: relabel_one(model, p, reference, batch, resp), flat,
                       batch_size=draws_per_step)


_relabel_flat = jax.jit(_relabel_flat_impl, static_argnums=(0, 4))

# elements of the (draws, N, K) log-responsibilities one step of the allocation cost holds
_RELABEL_ELEMENTS = 1 << 24


def relabel(model, params, reference, *, n_batch: int = 2, batch=None):
    """Aligns draws of ``model``'s parameters with ``n_batch`` leading axes (2 for (chain, draw))
    to ``reference``; works for every registered family.

    Args:
      batch: the data the draws were fitted to, as ``model.batch(x, y)`` gives it. With it, the
        draws are aligned by allocation (Stephens' criterion, see the module docstring; needs the
        family's ``batch_component_log_probs``), which keeps occupied components under their labels
        in draws where another component has emptied; without it, by the distance between
        ``relabel_vectors``.

    Returns:
      (aligned params, perms of shape batch + (K,)). Relabelling an already aligned set of draws
      returns it unchanged; a draw whose components were permuted comes back exactly (both costs).
    """
    needs = ("permute",) + (("relabel_vectors",) if batch is None else ("batch_component_log_probs",))
    check_family(model, "relabel", needs=needs)
    n_batch = check_int("n_batch", n_batch, minimum=0)
    leaves = jax.tree_util.tree_leaves(params)
    lead = leaves[0].shape[:n_batch]
    flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[n_batch:]), params)
    n_draws = max(1, jax.tree_util.tree_leaves(flat)[0].shape[0])
    step = None
    if batch is not None:
        # elements per draw: its (N, K) log-responsibilities, or the family's widest E-step
        # temporary per row (``row_width``, the HMM's forward recursion) times N
        n = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
        width = model.row_width(batch) if hasattr(model, "row_width") else model.n_components
        step = max(1, min(n_draws, _RELABEL_ELEMENTS // max(n * width, 1)))
    out, perm = _relabel_flat(model, flat, reference, batch, step)
    if np.any(np.asarray(perm) < 0):  # the assignment solver's answer to a cost that is not finite
        raise ValueError("relabel: the relabelling cost is not finite for some draws (draws or reference "
                         "with non-finite parameters?)")
    unflat = lambda a: a.reshape(lead + a.shape[1:])  # noqa: E731
    return jax.tree_util.tree_map(unflat, out), unflat(perm)


@dataclass
class MCMCResult:
    """Outcome of :func:`fit_nuts`.

    ``params``: the family's parameter pytree with leading (chain, draw) axes, relabelled to
    ``reference`` when one was given; ``raw_params`` before relabelling; ``perms`` (C, S, K) the
    permutations applied; ``sample_stats``: NUTS's per-draw statistics (C, S), named as ArviZ
    expects (``diverging``, ``acceptance_rate``, ``n_steps``, ``energy``, ``lp``, ``step_size``,
    ``tree_depth``); ``checks``: :func:`convergence_checks` on the (relabelled) draws, its
    ``failed`` list empty when every sampler check passed (a :class:`ConvergenceWarning` says
    otherwise).
    """

    model: Any
    params: Any
    raw_params: Any
    perms: Array | None
    reference: Any
    sample_stats: dict
    num_chains: int
    num_samples: int
    checks: dict


@dataclass
class _Runner:
    """The compiled NUTS program of one configuration (see :func:`nuts_program`)."""

    init: Any  # jit(keys (C,), batch, params0 (C, ...) | None) -> HMCState batched over chains
    run_chunk: Any  # jit(state, batch, length=L) -> (state, (params (L, C, ...), stats (L, C)))


_RUNNERS: dict = {}


def nuts_program(model, batch, num_chains, num_warmup, num_samples, target_accept,
                 max_tree_depth) -> _Runner:
    """NUTS over a NumPyro model of a batch (``model.batch_model``; ``model`` is a family or
    anything hashable with ``batch_model``, ``site_names``, ``to_sites`` and ``from_sites``, such as
    :class:`~conceptshift.inference.joint.JointModel`; ``batch`` any pytree of arrays) built from NumPyro's
    functional kernel (``hmc(algo="NUTS")``:
    ``init_kernel`` / ``sample_kernel``), chains vectorized with ``jax.vmap`` and steps under
    ``lax.scan``. The data are arguments of the compiled functions, so one runner serves every data
    set of its shapes; it is cached per configuration (family, shapes, dtypes and the NUTS
    settings), as :mod:`.svi` caches its runners.

    NumPyro's ``init_kernel`` fixes the warm-up schedule (Stan's windows: step size by dual
    averaging, diagonal mass matrix by Welford) for ``num_warmup`` steps; ``sample_kernel`` adapts
    while the state's step counter is below it, then samples with the adapted kernel.
    """
    shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(batch))
    config = (model, shapes, num_chains, num_warmup, num_samples, target_accept, max_tree_depth)
    if config in _RUNNERS:
        return _RUNNERS[config]
    names = latent_site_names(model)
    found = {}

    def probe(batch):
        # traced on abstract data: the potential-energy generator (data -> potential), the
        # unconstrained -> constrained transforms and the sites' bijections; none holds data
        with numpyro_numerics():
            info = initialize_model(jax.random.key(0), model.batch_model, dynamic_args=True,
                                    model_args=(batch,))
            found["potential_fn_gen"] = info.potential_fn
            found["postprocess_gen"] = info.postprocess_fn
            found["bijections"] = {n: biject_to(info.model_trace[n]["fn"].support) for n in names}
        return info.param_info.potential_energy

    jax.eval_shape(probe, jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch))
    init_kernel, sample_kernel = hmc(potential_fn_gen=found["potential_fn_gen"], algo="NUTS")

    def init(keys, batch, params0):
        # as NumPyro's vectorized MCMC: each chain's key gives the kernel's key and the init key
        split = jax.vmap(jax.random.split)(keys)
        k_hmc, k_init = split[:, 0], split[:, 1]
        with numpyro_numerics():
            if params0 is None:  # NumPyro's default, init_to_uniform: Uniform(-2, 2) unconstrained
                z0 = initialize_model(k_init, model.batch_model, dynamic_args=True,
                                      model_args=(batch,)).param_info
            else:
                sites = jax.vmap(lambda p: sites_from_params(model, p))(params0)
                z0 = {n: found["bijections"][n].inv(sites[n]) for n in names}

            def one(z, k):
                return init_kernel(z, num_warmup, step_size=1.0, adapt_step_size=True,
                                   adapt_mass_matrix=True, dense_mass=[], target_accept_prob=target_accept,
                                   trajectory_length=None, max_tree_depth=max_tree_depth,
                                   model_args=(batch,), model_kwargs={}, rng_key=k)

            return jax.vmap(one)(z0, k_hmc)

    def run_chunk(state, batch, length):
        constrain = found["postprocess_gen"](batch)

        def one(s):
            s = sample_kernel(s, (batch,), {})
            params = params_from_sites(model, constrain(s.z))
            stats = (s.diverging, s.accept_prob, s.num_steps, s.energy, s.potential_energy,
                     s.adapt_state.step_size)
            return s, (params, stats)

        def step(s, _):
            with numpyro_numerics():
                return jax.vmap(one)(s)

        return jax.lax.scan(step, state, None, length=length)

    runner = _Runner(jax.jit(init), jax.jit(run_chunk, static_argnames="length"))
    _RUNNERS[config] = runner
    return runner


def _chunks(total: int, progress: bool, n_updates: int = 20) -> list[int]:
    """Scan lengths: one compiled scan over every step, or about ``n_updates`` equal ones (and a
    remainder) when a progress bar shows."""
    if not progress:
        return [total]
    size = -(-total // min(n_updates, total))
    return [size] * (total // size) + ([total % size] if total % size else [])


def _chain_params(model, params, num_chains, dtype):
    """(params as (C, ...) arrays of ``dtype``, whether they came unbatched): the family's
    parameters (checked as ``fit_em`` checks ``init_params``), or those with a leading axis of
    ``num_chains``."""
    template = jax.eval_shape(model.init_params, jax.random.key(0))
    if type(params) is type(template) and all(
            jnp.shape(a) == t.shape for a, t in zip(params, template, strict=True)):
        params = check_init_params(model, params)
        return jax.tree_util.tree_map(
            lambda a: jnp.broadcast_to(jnp.asarray(a, dtype), (num_chains,) + jnp.shape(a)), params), True
    if type(params) is not type(template):
        raise TypeError(f"init_params must be the family's parameters ({type(template).__name__}), got "
                        f"{type(params).__name__}")
    for name, a, t in zip(template._fields, params, template, strict=True):
        if jnp.shape(a) != (num_chains,) + t.shape:
            raise ValueError(f"init_params.{name} must have shape {t.shape} or ({num_chains}, "
                             f"{', '.join(map(str, t.shape))}) for {num_chains} chains, got {jnp.shape(a)}")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params), False


def sample_nuts(model, key, batch, params0, *, num_chains: int, num_warmup: int, num_samples: int,
                target_accept: float = 0.8, max_tree_depth: int = 8, progress: bool = False):
    """The NUTS loop of :func:`fit_nuts` on a prepared batch (no input checks): ``model`` as for
    :func:`nuts_program`, ``params0`` its parameters with a leading chain axis (or None: NumPyro's
    ``init_to_uniform``).

    Returns:
      (draws: the model's parameters with leading (chain, draw) axes, after warm-up;
      sample_stats: dict of (C, S) arrays named as ArviZ expects).
    """
    runner = nuts_program(model, batch, num_chains, num_warmup, num_samples, target_accept,
                          max_tree_depth)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    total = num_warmup + num_samples
    cols = [TextColumn(f"NUTS ({num_chains} chains)"), BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn()]
    draws, stats = [], []
    with Progress(*cols, disable=not progress, transient=False) as bar:
        task = bar.add_task("nuts", total=total)
        with numpyro_numerics():
            state = runner.init(jax.random.split(key, num_chains), batch, params0)
            for length in _chunks(total, bool(progress)):
                state, (p, st) = runner.run_chunk(state, batch, length=length)
                draws.append(p)
                stats.append(st)
                bar.advance(task, length)

    def chains_first(parts):  # (T, C, ...) chunks -> (C, S, ...) post-warm-up draws
        a = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        return jnp.swapaxes(a[num_warmup:], 0, 1)

    raw = jax.tree_util.tree_map(lambda *parts: chains_first(parts), *draws)
    extra = {f: np.asarray(chains_first([st[i] for st in stats])) for i, f in enumerate(EXTRA_FIELDS)}
    sample_stats = {
        "diverging": extra["diverging"],
        "acceptance_rate": extra["accept_prob"],
        "n_steps": extra["num_steps"],
        "energy": extra["energy"],
        "lp": -extra["potential_energy"],
        "step_size": extra["adapt_state.step_size"],
        "tree_depth": np.ceil(np.log2(extra["num_steps"].astype(np.float64) + 1)).astype(np.int64),
    }
    return raw, sample_stats


def fit_nuts(
    model,
    key,
    x,
    y=None,
    *,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    init_params=None,
    reference=None,
    target_accept: float = 0.8,
    max_tree_depth: int = 8,
    progress: bool = False,
) -> MCMCResult:
    """Samples the posterior of ``model.numpyro_model`` given (x, y) with NUTS, chains vectorized.

    Args:
      model, key, x, y: as for :func:`fit_em` (any registered family; for a mixture of HMMs x is
        tokens (N, T) with -1 as trailing padding, y output tokens or None).
      num_chains, num_warmup, num_samples: per chain.
      init_params: the family's parameters to start every chain from (e.g. an EM fit), or a pytree
        with a leading chain axis (one start per chain); default: NumPyro's ``init_to_uniform``.
      reference: parameters the draws are relabelled to, by allocation on the data (x, y and the
        row weights; see :func:`relabel`; default: ``init_params`` when unbatched; None and no
        init: no relabelling).
      target_accept, max_tree_depth: NUTS settings.
      progress: show a rich progress bar (the steps then run in about 20 compiled chunks).

    Warm-up adapts the step size (dual averaging towards ``target_accept``) and a diagonal mass
    matrix, as NumPyro's ``NUTS``. The same key gives the same draws. A second call with data of
    the same shapes and the same settings reuses the compiled sampler (no recompilation).

    The draws are checked (R-hat, bulk and tail ESS, divergences, E-BFMI: the result's ``checks``),
    and a :class:`ConvergenceWarning` names any check that fails. Without a reference the draws are
    not relabelled, and chains in different labellings fail R-hat.
    """
    check_family(model, "fit_nuts", needs=("batch", "batch_model", "to_sites", "from_sites",
                                           "batch_component_log_probs", "permute"))
    key = check_key("key", key)
    num_chains = check_int("num_chains", num_chains, minimum=1)
    num_warmup = check_int("num_warmup", num_warmup, minimum=1)
    num_samples = check_int("num_samples", num_samples, minimum=1)
    max_tree_depth = check_int("max_tree_depth", max_tree_depth, minimum=1)
    target_accept = check_float("target_accept", target_accept, positive=True)
    if not target_accept < 1:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
    batch = model.batch(x, y)
    dtype = batch.w.dtype
    params0 = None
    if init_params is not None:
        params0, unbatched = _chain_params(model, init_params, num_chains, dtype)
        if reference is None and unbatched:
            reference = init_params
    raw, sample_stats = sample_nuts(model, key, batch, params0, num_chains=num_chains,
                                    num_warmup=num_warmup, num_samples=num_samples,
                                    target_accept=target_accept, max_tree_depth=max_tree_depth,
                                    progress=progress)
    if reference is not None:
        reference = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), reference)
        params, perms = relabel(model, raw, reference, batch=batch)
    else:
        params, perms = raw, None
    checks = convergence_checks(param_arrays("", params), sample_stats)
    warn_unconverged(checks, "fit_nuts")
    return MCMCResult(model, params, raw, perms, reference, sample_stats, num_chains, num_samples, checks)

"""Expectation-maximisation for the mixture families, compiled end to end.

One call of :func:`fit_em` is one compiled program: restarts run side by side under ``vmap``, each an
EM loop in ``lax.while_loop`` that stops on a relative tolerance or an iteration cap. Data are
arguments of the compiled function, so a second fit with new data of the same shapes reuses it.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.scipy.special import logsumexp

from .._validation import (
    OptimumWarning,
    PrecisionWarning,
    UnrepresentableFitError,
    check_float,
    check_int,
    check_key,
    float_dtype,
    is_traced,
)
from ..models import ExpertsFamily, Standardiser
from ..models.registry import check_family
from .starts import kmeans_pp_responsibilities, random_responsibilities, subset_responsibilities

INITS = ("mixed", "kmeans++", "subset", "random")


class EMResult(NamedTuple):
    """Outcome of :func:`fit_em` (a pytree: it can be returned from ``jit`` and ``vmap``).

    ``loglik`` is the weighted total log-likelihood at ``params``: log p(y | x) summed over samples
    for :class:`RegressionMixture`, log p(x, y) for :class:`GatedExperts`. ``objective`` adds the
    weak prior's log-density; EM never decreases it. The traces hold one value per iteration (the
    value before that iteration's M-step) and NaN past ``n_iter``; :meth:`trace` trims them.

    EM runs on the standardised data (``standardiser``, see
    :class:`conceptshift.models.Standardiser`); ``params`` are mapped back to the raw data, and the
    log-likelihoods are the standardised ones plus the map's log-Jacobian (exact, and accurate in
    float32 wherever the data sit). ``restarts_at_best`` counts the clean restarts whose
    log-likelihood is within ``1e-6 (|loglik| + N)`` nats of the best (float32: 64 ulps of that):
    one of several means the best optimum was found once only, and more restarts are advised.
    """

    params: Any
    loglik: Array  # ()
    objective: Array  # ()
    loglik_trace: Array  # (max_iter,)
    objective_trace: Array  # (max_iter,)
    n_iter: Array  # () int32
    converged: Array  # () bool
    bic: Array  # ()
    degenerate: Array  # () bool: the kept fit is spurious (only when every restart was)
    best_restart: Array  # () int32
    restart_loglik: Array  # (R,)
    restart_converged: Array  # (R,)
    restart_degenerate: Array  # (R,)
    restarts_at_best: Array  # () int32: clean restarts that reached the best log-likelihood
    standardiser: Standardiser  # the affine map EM's coordinates are in

    def trace(self) -> np.ndarray:
        """The log-likelihood trace of the kept restart, trimmed to ``n_iter`` values."""
        return np.asarray(self.loglik_trace)[: int(self.n_iter)]


class _Run(NamedTuple):
    params: Any
    loglik: Array
    objective: Array
    loglik_trace: Array
    objective_trace: Array
    n_iter: Array
    converged: Array


def e_step(model: ExpertsFamily, params, x: Array, y: Array, w: Array):
    """Weighted log-likelihood () and weighted responsibilities w_n p(k | x_n, y_n), (N, K)."""
    logp = model.component_log_probs(params, x, y)
    ll_n = logsumexp(logp, axis=-1)
    r = jnp.exp(logp - ll_n[:, None]) * w[:, None]
    return jnp.sum(w * ll_n), r


def all_finite(tree) -> Array:
    """Whether every leaf of a pytree of arrays is finite (a scalar bool)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))


DEFAULT_BLOCK = "auto"
CPU_BLOCK = 32768  # rows of one block on a CPU (the "auto" choice there)
BLOCK_BUDGET = 1 << 21  # CPU: elements of the widest temporary of one block (8 MiB in float32)
ACCEL_BLOCK_BUDGET = 1 << 27  # GPU/TPU: 512 MiB in float32; few large blocks keep the device busy


def block_layout(n: int, block_size: int | str | None, n_shards: int = 1,
                 rows: int = 1, platform: str | None = None) -> tuple[int, int]:
    """(block, number of blocks per shard) covering n rows; n is padded with zero-weight rows.

    ``block_size`` is an upper bound: a block is also kept below the platform's budget of elements
    of a temporary with ``rows`` rows (``BLOCK_BUDGET`` on a CPU, so that wide models stay in
    cache; ``ACCEL_BLOCK_BUDGET`` on an accelerator, where one sequential block per kernel launch
    would leave most of the device idle), and never below 512 rows. ``"auto"``: ``CPU_BLOCK`` rows
    on a CPU, the budget alone elsewhere; None: one block."""
    platform = platform or jax.default_backend()
    budget = BLOCK_BUDGET if platform == "cpu" else ACCEL_BLOCK_BUDGET
    if block_size == "auto":
        block_size = CPU_BLOCK if platform == "cpu" else budget
    per_shard = -(-n // n_shards)
    if block_size is not None:
        block_size = max(min(block_size, budget // max(rows, 1)), min(block_size, 512))
    if block_size is None or per_shard <= block_size:
        return per_shard, 1
    nb = -(-per_shard // block_size)
    block = -(-per_shard // nb)  # equal blocks: at most nb - 1 padding rows
    block = -(-block // 8) * 8
    return block, nb


def _pad_blocks(a: Array, n_total: int, shape: tuple[int, ...]) -> Array:
    pad = [(0, n_total - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
    return jnp.pad(a, pad).reshape(shape + a.shape[1:])


def _blocks_t(a: Array, n_total: int, n_blocks: int) -> Array:
    """(N, C) -> (blocks, C, block), zero-padded to n_total rows: the E-step's layout. Transposed
    first, so that the block split moves contiguous rows (XLA's CPU transpose of the blocked
    array is slower)."""
    aT = jnp.pad(a.T, ((0, 0), (0, n_total - a.shape[0])))
    return jnp.swapaxes(aT.reshape(a.shape[1], n_blocks, n_total // n_blocks), 0, 1)


def make_stats_fn(model, x, y, w, stats, *, block_size=DEFAULT_BLOCK, mesh=None, backend="xla"):
    """The fused E-step: ``params -> (weighted loglik, SuffStats)`` with residuals against the
    current coefficients. Rows are processed in blocks under ``lax.scan`` (bounded temporaries,
    blocked float32 sums); with a ``mesh`` (one axis named "data") each device reduces its rows and
    the statistics are summed with ``psum``. ``backend``: the E-step's backend
    (``model.estep_backend``), ``"kernel"`` or ``"xla"``."""
    n = x.shape[0]
    n_shards = 1 if mesh is None else mesh.shape["data"]
    if block_size == "auto" and model.streams_rows(backend):
        block_size = None  # the compiled CPU kernel streams the rows itself: one call per shard
    block, nb = block_layout(n, block_size, n_shards, model.block_rows())
    total = n_shards * nb * block
    shape = (n_shards * nb, block)
    # blocks in the E-step's layout: samples on the minor axis, (blocks, D, B) and (blocks, H, B)
    xb = _blocks_t(x, total, shape[0])
    yb = _blocks_t(y, total, shape[0])
    wb = _pad_blocks(w, total, shape)

    def local(params, xb, yb, wb):
        plan = model.estep_plan(params, stats)  # once per iteration, not once per block

        def one(xs, ys, ws):
            return model.estep_stats_t(params, xs, ys, ws, stats, plan, backend)

        if xb.shape[0] == 1:
            return one(xb[0], yb[0], wb[0])

        def body(acc, blk):
            out = one(*blk)
            return jax.tree_util.tree_map(jnp.add, acc, out), None

        first = one(xb[0], yb[0], wb[0])
        acc, _ = jax.lax.scan(body, first, (xb[1:], yb[1:], wb[1:]))
        return acc

    if mesh is None:
        def fn(params):
            ll, ss = local(params, xb, yb, wb)
            return ll, ss._replace(ref=jnp.swapaxes(params.coef, 1, 2))
        return fn

    from jax.sharding import PartitionSpec as P

    def sharded(params, xb, yb, wb):
        ll, ss = local(params, xb, yb, wb)
        ll, ss = jax.lax.psum((ll, ss), "data")
        return ll, ss._replace(ref=jnp.swapaxes(params.coef, 1, 2))

    smap = jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")),
                         out_specs=P(), check_vma=False)
    return lambda params: smap(params, xb, yb, wb)


def em_loop(step, params0, tol, max_iter: int, dtype, n):
    """The EM driver every family shares: ``step(params) -> (new params, loglik, objective)`` (the
    log-likelihood and objective at the old parameters) repeated in ``lax.while_loop`` until the
    objective changes by at most ``tol * (|objective| + n)`` or ``max_iter`` (``n``: the sum of the
    row weights, so that the tolerance is per row even where the objective is near zero, as on
    standardised data). EM never lowers the objective in exact arithmetic, so a fall of at most
    8 ulps of (|objective| + n) also stops it as converged: the iteration is at the resolution of
    its float type (a sum of n terms rounds by about n ulps of a term; on a GPU, whose sums have no
    fixed order, a float32 objective jitters even between identical calls). ``tol <= 0`` runs
    ``max_iter`` iterations (fixed work, as the benchmarks need).

    A non-finite update keeps the previous parameters and stops the loop; a start that is not
    finite fails at once. (A fall beyond float resolution is not a stop: on ill-conditioned float32
    problems, high-degree designs above all, the M-step's solve can dip the objective for an
    iteration and EM then climbs on to the optimum; stopping there would end far below it.)
    Returns (params, n_iter, loglik trace, objective trace, converged-by-tolerance, failed)."""
    nan_trace = jnp.full((max_iter,), jnp.nan, dtype)
    ulps = 8 * jnp.finfo(dtype).eps
    n = jnp.asarray(n, dtype)

    def cond(state):
        _, _, it, _, _, conv, bad = state
        return (it < max_iter) & ~conv & ~bad

    def body(state):
        params, obj_prev, it, ll_tr, obj_tr, _, _ = state
        new, ll, obj = step(params)
        scale = jnp.abs(obj) + n
        bad = ~(all_finite(new) & jnp.isfinite(obj))
        change = obj - obj_prev
        conv = ~bad & (it > 0) & (tol > 0) & (
            (jnp.abs(change) <= tol * scale) | ((change <= 0) & (-change <= ulps * scale)))
        params = jax.tree_util.tree_map(lambda a, b: jnp.where(bad, b, a), new, params)
        return params, obj, it + 1, ll_tr.at[it].set(ll), obj_tr.at[it].set(obj), conv, bad

    init = (params0, jnp.asarray(-jnp.inf, dtype), jnp.asarray(0, jnp.int32), nan_trace, nan_trace,
            jnp.asarray(False), ~all_finite(params0))
    params, _, n_iter, ll_tr, obj_tr, conv, bad = jax.lax.while_loop(cond, body, init)
    return params, n_iter, ll_tr, obj_tr, conv, bad


def mask_weights(params, active: Array | None):
    """The proportions restricted to the ``active`` components ((K,) bool; None: all): the others
    get float's smallest normal number (log about -87 in float32: every density stays finite and
    they take no point), the active ones are renormalised. EM's M-step for the proportions of a
    mixture of the active components only (their Dirichlet prior included) is this map applied to
    the full M-step: pi_k = (N_k + nu) / sum over the active (N_j + nu)."""
    if active is None:
        return params
    lw = params.log_weights
    tiny = jnp.log(jnp.asarray(jnp.finfo(lw.dtype).tiny, lw.dtype))
    kept = jnp.where(active, lw, -jnp.inf)
    kept = kept - jax.scipy.special.logsumexp(kept)
    return params._replace(log_weights=jnp.where(active, kept, tiny))


def _run_em(model, x, y, w, stats, params0, tol, max_iter: int, *, block_size=DEFAULT_BLOCK,
            mesh=None, backend="xla", active=None) -> _Run:
    stats_fn = make_stats_fn(model, x, y, w, stats, block_size=block_size, mesh=mesh,
                             backend=backend)

    def step(params):
        ll, ss = stats_fn(params)
        new = mask_weights(model.m_step_from_stats(ss, stats), active)
        return new, ll, ll + model.log_prior(params, stats)

    params, n_iter, ll_tr, obj_tr, conv, failed = em_loop(step, params0, tol, max_iter, y.dtype,
                                                          jnp.sum(w))
    ll, _ = stats_fn(params)
    obj = ll + model.log_prior(params, stats)
    ll = jnp.where(failed & (n_iter == 0), -jnp.inf, ll)
    obj = jnp.where(failed & (n_iter == 0), -jnp.inf, obj)
    converged = conv & ~failed & jnp.isfinite(obj)
    return _Run(params, ll, obj, ll_tr, obj_tr, n_iter, converged)


def _initial_params(model, key, x, y, w, stats, kind, init: str, active=None):
    """M-step from initial responsibilities; ``kind`` (traced) picks the rule when init="mixed":
    even restarts use k-means++ on (x, y), odd ones random-subset regressions. ``active``: (K,)
    bool, the components in use (None: all)."""
    k1, k2 = jax.random.split(key)
    n, K = x.shape[0], model.n_components
    if init == "kmeans++":
        r0 = kmeans_pp_responsibilities(k1, jnp.concatenate([x, y], axis=1), w, K, active=active)
    elif init == "subset":
        r0 = subset_responsibilities(k2, model.design(x), y, w, K, active=active)
    elif init == "random":
        r0 = random_responsibilities(k2, n, K, y.dtype)
        if active is not None:
            r0 = r0 * active[None, :]
            r0 = r0 / jnp.sum(r0, axis=1, keepdims=True)
    else:
        r0 = jnp.where(
            kind == 0,
            kmeans_pp_responsibilities(k1, jnp.concatenate([x, y], axis=1), w, K, active=active),
            subset_responsibilities(k2, model.design(x), y, w, K, active=active),
        )
    return mask_weights(model.m_step(x, y, r0 * w[:, None], stats), active)


def standardise(model, x, y, w):
    """(z, u, w, std): the data in the standard coordinates EM works in (:class:`Standardiser`), as
    arrays of the working precision. Float64 numpy inputs (``check_data(..., host=True)``) are
    standardised before they are rounded, so that data far from the origin keep their digits in
    float32; JAX arrays (device-resident, sharded or traced) are standardised where they are."""
    if all(isinstance(a, np.ndarray) for a in (x, y, w)):
        std = model.standardiser(x, y, w, xp=np)
        z = (x - std.x_loc[None, :]) / std.x_scale[None, :]
        u = (y - std.y_loc[None, :]) / std.y_scale[None, :]
        dtype = float_dtype()
        return (jnp.asarray(z, dtype), jnp.asarray(u, dtype), jnp.asarray(w, dtype),
                Standardiser(*(jnp.asarray(a, dtype) for a in std)))
    std = model.standardiser(x, y, w)
    return ((x - std.x_loc[None, :]) / std.x_scale[None, :],
            (y - std.y_loc[None, :]) / std.y_scale[None, :], w, std)


def restarts_at_best(loglik: Array, clean: Array, best: Array, n: Array) -> Array:
    """How many clean restarts reached the best log-likelihood (to 1e-6 (|best| + n) nats, or 64
    ulps of it in float32)."""
    dtype = loglik.dtype
    rel = jnp.maximum(jnp.asarray(1e-6, dtype), 64 * jnp.finfo(dtype).eps)
    top = loglik[best]
    near = clean & (jnp.abs(loglik - top) <= rel * (jnp.abs(top) + n))
    return jnp.maximum(jnp.sum(near), 1).astype(jnp.int32)


def to_raw(model, res: EMResult, std: Standardiser, w: Array) -> tuple[EMResult, Array]:
    """An :class:`EMResult` on standardised data mapped back to the raw data (exact: parameters
    by ``params_from_standard``, log-likelihoods plus the log-Jacobian of the map), and the
    round-trip error of the parameters (largest |p' - p| / (1 + |p|) over the standardised
    parameters p and p' = params_to_standard(params_from_standard(p))): how much of the fit the
    raw parameters keep in the working precision."""
    n = jnp.sum(w)
    # one value, computed once: XLA may otherwise fuse it into each use with different rounding
    jac = jax.lax.optimization_barrier(n * model.log_jacobian(std))
    restart_loglik = res.restart_loglik + jac
    loglik = restart_loglik[res.best_restart]  # the same rounding as the restart's entry
    raw = model.params_from_standard(res.params, std)
    back = model.params_to_standard(raw, std)
    err = jnp.max(jnp.stack([jnp.max(jnp.abs(b - a) / (1 + jnp.abs(a))) for a, b in zip(
        jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(back), strict=True)]))
    return res._replace(
        params=raw,
        loglik=loglik, objective=res.objective + jac,
        loglik_trace=res.loglik_trace + jac, objective_trace=res.objective_trace + jac,
        bic=-2.0 * loglik + model.n_params * jnp.log(n),
        restart_loglik=restart_loglik, standardiser=std), err


def check_init_params(model, init_params):
    """``init_params`` of the family's parameter type, with the family's shapes and finite values
    (checked before anything is compiled); returns it or raises."""
    ref = jax.eval_shape(lambda k: model.init_params(k), jax.random.key(0))
    if type(init_params) is not type(ref):
        raise TypeError(f"init_params must be a {type(ref).__name__} (the family's parameters), "
                        f"got {type(init_params).__name__}")
    for name, want, have in zip(ref._fields, ref, init_params, strict=True):
        shape = tuple(getattr(have, "shape", np.shape(have)))
        if shape != tuple(want.shape):
            raise ValueError(f"init_params.{name} must have shape {tuple(want.shape)}, got {shape}")
        if not is_traced(have) and not bool(np.all(np.isfinite(np.asarray(have, np.float64)))):
            raise ValueError(f"init_params.{name} has non-finite values")
    return init_params


MAP_TOLERANCE = 1e-3  # round-trip error of the map to the data's scale beyond which fit_em warns


def check_finite_fit(result: EMResult, map_error, dtype) -> EMResult:
    """Raises :class:`UnrepresentableFitError` when a fit's parameters, mapped back to the raw data,
    are not finite in the working precision, and warns (:class:`PrecisionWarning`) when they keep
    the fit only to a round-trip error above ``MAP_TOLERANCE`` (e.g. float32 coefficients of a
    quadratic in x ~ 1e4, or a slope that underflows); passes traced results."""
    leaves = jax.tree_util.tree_leaves(result.params)
    if any(is_traced(a) for a in leaves) or is_traced(map_error):
        return result
    name = np.dtype(dtype).name
    advice = "rescale x or y" + ("" if name == "float64" else " or enable float64 (JAX_ENABLE_X64=1)")
    bad = [field for field, a in zip(result.params._fields, result.params, strict=True)
           if not bool(np.all(np.isfinite(np.asarray(a))))]
    if bad:
        raise UnrepresentableFitError(
            f"the fitted {', '.join(bad)} overflow {name} when mapped back to the data's scale "
            f"(x or y spans too wide a range for this parametrisation)", advice)
    err = float(map_error)
    if not err <= MAP_TOLERANCE:
        how = (f"keep the fit only roughly on the data's own scale in {name} (round-trip error "
               f"{err:.2g} in standardised units)" if np.isfinite(err) else
               f"under- or overflow on the data's own scale in {name}")
        warnings.warn(PrecisionWarning(
            f"the fitted parameters {how}: evaluated on the raw data they give another density; "
            f"the reported log-likelihood is the exact fit's", advice), stacklevel=3)
    return result


def initial_params(model, key, x, y, w, init: str = "kmeans++"):
    """EM's starting parameters for (x, y, w) (an M-step from ``init``'s responsibilities, found on
    the standardised data like every EM start), on the raw data's scale. Traceable."""
    z, u, w, std = standardise(model, x, y, w)
    params = _initial_params(model, key, z, u, w, model.data_stats(z, u, w), jnp.asarray(0), init)
    return model.params_from_standard(params, std)


def start_params(model, key, batch, init: str = "kmeans++"):
    """EM's start for a :class:`~conceptshift.models.batch.Batch`, for every family: the family's
    own (``model.start_params``) where it has one, else :func:`initial_params`. Traceable."""
    own = getattr(model, "start_params", None)
    if callable(own):
        return own(key, batch)
    if model.em_kind == "generalized":  # the gate's M-step iterates: generalized EM's start
        from .gem import initial_params as gem_initial_params

        return gem_initial_params(model, key, batch.x, batch.y, batch.w, init)
    return initial_params(model, key, batch.x, batch.y, batch.w, init)


def check_fit_data(model, x, y, weights):
    """(x, y, w) for an EM driver: validated by the family (float64 numpy where no input is a JAX
    array, for :func:`standardise`), unit weights by default, at least K rows."""
    if y is None:
        raise TypeError("y must be an array of responses (N,) or (N, H), got None")
    arrays = model.check_data(x, y, weights, host=True)
    x, y = arrays[0], arrays[1]
    if weights is not None:
        w = arrays[2]
    else:
        w = np.ones((x.shape[0],)) if isinstance(y, np.ndarray) else jnp.ones((x.shape[0],), y.dtype)
    if x.shape[0] < model.n_components:
        raise ValueError(f"x has {x.shape[0]} rows, fewer than n_components={model.n_components}")
    return x, y, w


def check_em_args(key, restarts, max_iter, tol):
    """The arguments every EM driver (EM, generalized EM, Baum-Welch) shares, validated; ``tol``
    may be traced (a fit under ``jit``)."""
    key = check_key("key", key)
    restarts = check_int("restarts", restarts, minimum=1)
    max_iter = check_int("max_iter", max_iter, minimum=1)
    if not is_traced(tol):
        tol = check_float("tol", tol, nonnegative=True)
    return key, restarts, max_iter, tol


def _fit_em_impl(model, key, x, y, w, std, tol, init_params, *, restarts, max_iter, init,
                 block_size, mesh, backend, n_active=None):
    """EM on standardised data (x, y) = (z, u); the result is mapped back through ``std``.
    ``n_active`` (traced int, or None for all): fit a mixture of the first n_active components
    only (the others held at proportion ~0, :func:`mask_weights`), so that every number of
    components up to K shares one compiled program (:func:`fit_em_range`)."""
    active = None if n_active is None else jnp.arange(model.n_components) < n_active
    stats = model.data_stats(x, y, w)
    tol = jnp.asarray(tol, y.dtype)
    if init_params is not None:
        init_params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, y.dtype), init_params)
        params0 = jax.tree_util.tree_map(lambda a: a[None], model.params_to_standard(init_params, std))
    else:
        keys = jax.random.split(key, restarts)
        kinds = jnp.arange(restarts) % 2
        params0 = jax.vmap(
            lambda k, u: _initial_params(model, k, x, y, w, stats, u, init, active)
        )(keys, kinds)

    runs = jax.vmap(
        lambda p: _run_em(model, x, y, w, stats, p, tol, max_iter, block_size=block_size,
                          mesh=mesh, backend=backend, active=active)
    )(params0)
    degenerate = jax.vmap(
        lambda p: jnp.any(model.degenerate_components(p, x, y, w, stats)
                          & (True if active is None else active))
    )(runs.params)
    finite = jnp.isfinite(runs.objective)
    score = jnp.where(degenerate | ~finite, -jnp.inf, runs.loglik)
    fallback = jnp.where(finite, runs.loglik, -jnp.inf)
    best = jnp.where(jnp.any(jnp.isfinite(score)), jnp.argmax(score), jnp.argmax(fallback))
    pick = jax.tree_util.tree_map(lambda a: a[best], runs)
    n = jnp.sum(w)
    bic = -2.0 * pick.loglik + model.n_params * jnp.log(n)
    res = EMResult(
        params=pick.params,
        loglik=pick.loglik,
        objective=pick.objective,
        loglik_trace=pick.loglik_trace,
        objective_trace=pick.objective_trace,
        n_iter=pick.n_iter,
        converged=pick.converged,
        bic=bic,
        degenerate=degenerate[best],
        best_restart=best.astype(jnp.int32),
        restart_loglik=runs.loglik,
        restart_converged=runs.converged,
        restart_degenerate=degenerate,
        restarts_at_best=restarts_at_best(runs.loglik, ~degenerate & finite, best, n),
        standardiser=std,
    )
    return to_raw(model, res, std, w)  # (result, round-trip error)


_fit_em_jit = jax.jit(
    _fit_em_impl,
    static_argnames=("model", "restarts", "max_iter", "init", "block_size", "mesh", "backend"),
)

ESTEP_BACKENDS = ("auto", "kernel", "xla")
EM_KINDS = {"closed_form": "EM with closed-form M-steps",
            "generalized": "generalized EM: its M-step iterates",
            "expected_stats": "EM on the family's expected statistics (stats_em)",
            "responsibilities": "generalized EM: its M-step reads the rows with their "
                                "responsibilities (stats_em)"}


def platform_of(x, mesh=None) -> str:
    """The platform a fit of ``x`` runs on: the mesh's devices, else the devices ``x`` lives on
    (a concrete JAX array), else JAX's default backend."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    if isinstance(x, jax.Array) and not is_traced(x):
        return next(iter(x.devices())).platform
    return jax.default_backend()


def resolve_backend(model, estep: str, dtype, platform: str) -> str:
    """The E-step backend of one fit (static: part of the compiled program's key). ``"auto"``:
    the compiled kernel where it applies on a CPU, XLA elsewhere (nothing is built for GPU/TPU)."""
    if estep not in ESTEP_BACKENDS:
        raise ValueError(f"estep must be one of {ESTEP_BACKENDS}, got {estep!r}")
    if estep == "xla":
        return "xla"
    chosen = model.estep_backend(dtype, platform)
    if estep == "kernel" and chosen != "kernel":
        raise ValueError(f"estep='kernel' needs a CPU program of a family the kernel fits, with the "
                         f"kernel built (platform {platform!r}, {type(model).__name__})")
    return chosen


def fit_em(
    model: ExpertsFamily,
    key,
    x,
    y,
    *,
    weights=None,
    restarts: int = 8,
    max_iter: int = 500,
    tol: float = 1e-8,
    init: str = "mixed",
    init_params=None,
    block_size: int | str | None = DEFAULT_BLOCK,
    mesh=None,
    estep: str = "auto",
) -> EMResult:
    """Fits ``model`` to (x, y) by EM (closed-form M-steps, generalized EM or Baum-Welch, as the
    family's ``em_kind`` says); returns the best restart.

    Args:
      model: a family instance, e.g. ``RegressionMixture(n_components=2)``. Every family has the
        same call and result type: one whose M-step iterates (``SoftmaxGatedExperts``) is fitted
        by generalized EM (:func:`fit_gem`), one with additive expected statistics, such as the
        mixture of HMMs (Baum-Welch), by the generic driver
        (:func:`~conceptshift.inference.stats_em.fit_stats_em`), with x the integer tokens (N, T),
        -1 as trailing padding, and y the output tokens (N, H) or None.
      key: a ``jax.random`` key; the same key gives the same fit.
      x: covariates (N, D), or (N,) when D == 1, or None when D == 0.
      y: responses (N, H), or (N,) when the model has one head.
      weights: optional non-negative per-sample weights (N,).
      restarts: R, number of initialisations run together under ``vmap`` (default 8: a mixture's
        likelihood has several optima, and one start often misses the best;
        ``restarts_at_best`` in the result says how many found it).
      max_iter: iteration cap of each EM loop.
      tol: stop when the objective changes by at most ``tol * (|objective| + N)`` in one iteration
        (or falls within float rounding); 0: run all ``max_iter`` iterations.
      init: ``"kmeans++"`` (k-means++ seeding and Lloyd steps on the columns of x and y),
        ``"subset"`` (K regressions through P + 1 random points each, points to the nearest),
        ``"random"`` (Dirichlet responsibilities) or ``"mixed"`` (restarts alternate k-means++ and
        subset, restart 0 uses k-means++).
      init_params: start from these parameters instead (one run; ``restarts`` is ignored): the
        family's parameter type with its shapes and finite values.
      block_size: at most this many rows per block of the fused E-step (bounded memory; fewer
        when a block's widest temporary would exceed the platform's budget, see
        :func:`block_layout`); ``"auto"``: 32768 rows on a CPU, blocks of up to 512 MiB on a GPU
        or TPU; None: one block. For families with expected statistics (the mixture of HMMs),
        ``"auto"`` is 4096 rows on a CPU (:func:`~conceptshift.inference.stats_em.fit_stats_em`).
        Families whose M-step iterates over the rows (the softmax gate) take neither this nor
        ``mesh``.
      mesh: a ``jax.sharding.Mesh`` with an axis named ``"data"``: rows are split across its
        devices, each device reduces its share and the statistics are summed with ``psum``
        (data-parallel EM; the result equals the single-device fit to float tolerance).
      estep: the E-step's backend, decided once per fit: ``"auto"`` (the compiled CPU kernel
        where it applies and the program runs on a CPU, XLA otherwise), ``"kernel"`` or ``"xla"``.

    Returns:
      :class:`EMResult` of the restart with the highest log-likelihood among those that are not
      degenerate (a component on fewer than ``model.min_component_count`` effective points, or
      fitting its points exactly). ``degenerate`` is True only when no restart was clean.

    The fit is equivariant: EM runs on standardised data (:class:`EMResult`), so shifting or
    scaling a covariate or a response maps the fitted parameters and leaves the log-likelihood
    unchanged (moved by -N log|s| when y, or x for gated families, is scaled by s).

    Raises:
      ValueError: bad data (shape, NaN, values beyond the working precision's range);
        ``UnrepresentableFitError`` (a ValueError) for a fit whose parameters overflow the working
        precision on the data's scale. A ``PrecisionWarning`` says when they keep the fit only
        roughly there (float32 and data far from the origin at degree 2, say).

    Example:
      >>> import jax, numpy as np
      >>> from conceptshift.models import RegressionMixture
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=200); z = rng.integers(0, 2, 200)
      >>> y = np.where(z, 1 + 2 * x, -1 - 2 * x) + 0.1 * rng.normal(size=200)
      >>> fit = fit_em(RegressionMixture(2), jax.random.key(0), x, y, restarts=4)
      >>> bool(fit.converged)
      True
    """
    kind = check_family(model, "fit_em", em_kinds=tuple(EM_KINDS)).em_kind
    key, restarts, max_iter, tol = check_em_args(key, restarts, max_iter, tol)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if kind != "closed_form":  # the same result type; row blocks and the mesh where stats add
        rows = kind == "expected_stats"
        unsupported = {"init": init != "mixed",
                       "block_size": block_size != DEFAULT_BLOCK and not rows,
                       "mesh": mesh is not None and not rows,
                       "estep": estep == "kernel"}
        bad = [name for name, given in unsupported.items() if given]
        if bad:
            raise ValueError(f"{', '.join(bad)} not supported for {type(model).__name__} "
                             f"({EM_KINDS[kind]})")
        if kind == "generalized":
            from .gem import fit_gem

            return warn_single_optimum(fit_gem(model, key, x, y, weights=weights, restarts=restarts,
                                               max_iter=max_iter, tol=tol, init_params=init_params))
        from .stats_em import fit_stats_em

        return warn_single_optimum(fit_stats_em(
            model, key, x, y, weights=weights, restarts=restarts, max_iter=max_iter, tol=tol,
            init_params=init_params, block_size=block_size, mesh=mesh))
    x, y, w = check_fit_data(model, x, y, weights)
    if init_params is not None:
        init_params = check_init_params(model, init_params)
        restarts = 1
    if block_size is not None and block_size != "auto":
        block_size = check_int("block_size", block_size, minimum=1)
    if mesh is not None and "data" not in getattr(mesh, "axis_names", ()):
        raise ValueError("mesh must be a jax.sharding.Mesh with an axis named 'data'")
    z, u, w, std = standardise(model, x, y, w)
    backend = resolve_backend(model, estep, u.dtype, platform_of(z, mesh))
    result, map_error = _fit_em_jit(
        model, key, z, u, w, std, tol, init_params, restarts=restarts, max_iter=max_iter, init=init,
        block_size=block_size, mesh=mesh, backend=backend,
    )
    return warn_single_optimum(check_finite_fit(result, map_error, u.dtype))


@partial(jax.jit, static_argnames=("model", "restarts", "max_iter", "init", "block_size", "backend"))
def _fit_em_range_jit(model, key, z, u, w, std, tol, n_active, *, restarts, max_iter, init, block_size,
                      backend):
    return jax.vmap(lambda nk: _fit_em_impl(
        model, key, z, u, w, std, tol, None, restarts=restarts, max_iter=max_iter, init=init,
        block_size=block_size, mesh=None, backend=backend, n_active=nk))(n_active)


def fit_em_range(model, key, x, y, components, *, weights=None, restarts: int = 8,
                 max_iter: int = 500, tol: float = 1e-8, init: str = "mixed",
                 estep: str = "auto") -> dict:
    """:func:`fit_em` at each number of components in ``components`` (e.g. ``range(1, 7)``), one
    result per K: ``{K: EMResult}`` with each fit's parameters for K components and its BIC.

    Families fitted by closed-form EM (``em_kind == "closed_form"``: the Gaussian-expert families)
    fit every K in one compiled program: a mixture of max(components) components of which the
    first K are active (the others held at proportion ~0, their starts and degeneracy checks
    ignored), vmapped over K; it equals a K-component fit in distribution (the same starts' rules,
    the same M-steps and prior). Other families fit each K in turn (a compile per K).
    """
    ks = sorted({check_int("components", k, minimum=1) for k in np.atleast_1d(
        np.asarray(components, dtype=object)).tolist()}) if np.size(components) else []
    if not ks:
        raise ValueError("components must name at least one number of components")
    kind = check_family(model, "fit_em_range", em_kinds=tuple(EM_KINDS)).em_kind
    k_max = ks[-1]
    big = dataclasses.replace(model, n_components=k_max)
    if kind != "closed_form":
        return {k: fit_em(dataclasses.replace(model, n_components=k), key, x, y, weights=weights,
                          restarts=restarts, max_iter=max_iter, tol=tol, init=init, estep=estep)
                for k in ks}
    key, restarts, max_iter, tol = check_em_args(key, restarts, max_iter, tol)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    x, y, w = check_fit_data(big, x, y, weights)
    z, u, w, std = standardise(big, x, y, w)
    backend = resolve_backend(big, estep, u.dtype, platform_of(z))
    results, map_errors = _fit_em_range_jit(
        big, key, z, u, w, std, tol, jnp.asarray(ks, jnp.int32), restarts=restarts,
        max_iter=max_iter, init=init, block_size=DEFAULT_BLOCK, backend=backend)
    n = jnp.sum(w)
    out = {}
    for i, k in enumerate(ks):
        mk = dataclasses.replace(model, n_components=k)
        res = jax.tree_util.tree_map(lambda a, i=i: a[i], results)
        params = jax.tree_util.tree_map(lambda a, k=k: a[:k], res.params)
        params = params._replace(log_weights=jax.nn.log_softmax(params.log_weights))
        res = res._replace(params=params, bic=-2.0 * res.loglik + mk.n_params * jnp.log(n))
        out[k] = warn_single_optimum(check_finite_fit(res, map_errors[i], u.dtype))
    return out


def warn_single_optimum(result: EMResult) -> EMResult:
    """Warns (:class:`OptimumWarning`) when several restarts ran and only one reached the best
    log-likelihood (``restarts_at_best == 1``): nothing confirms that optimum, and a higher one
    may exist. Passes traced results (inside ``jit`` / ``vmap`` the count is in the result)."""
    runs, best = result.restart_loglik, result.restarts_at_best
    if is_traced(best) or is_traced(runs) or runs.ndim != 1 or runs.shape[0] < 2:
        return result
    if int(best) == 1:
        warnings.warn(OptimumWarning(
            f"only 1 of {runs.shape[0]} EM restarts reached the best log-likelihood "
            f"({float(result.loglik):.6g}): a higher optimum may exist; run more restarts"),
            stacklevel=3)
    return result

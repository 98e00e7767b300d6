"""The protocol's generic EM driver, for two kinds of family:

- ``em_kind == "expected_stats"``: the E-step is additive expected statistics and the M-step is closed
  form in them (the mixture of HMMs, whose statistics are the forward-backward counts). The family
  provides ``expected_stats(params, batch) -> (weighted log-likelihood, statistics)`` and
  ``m_step_from_stats(stats)``, the maximiser of the expected complete-data log-likelihood plus
  ``log_prior``.
- ``em_kind == "responsibilities"``: the M-step reads the data with the E-step's responsibilities and
  may iterate (generalized EM: the mixtures of generalized linear experts, whose M-step is Newton's
  method). The family provides ``batch_component_log_probs(params, batch)`` (log pi_k + log p(row |
  k), (N, K)) and ``m_step(params, batch, r)``, which must not lower the expected complete-data
  log-likelihood plus ``log_prior``.

Both provide, on a :class:`~conceptshift.models.batch.Batch`, ``start_params(key, batch)`` (one
random start), ``log_prior(params)``, ``batch_log_likelihood(params, batch)`` and ``n_params`` (for
BIC).

One call is one compiled program: restarts run side by side under ``vmap``, each the shared
:func:`~conceptshift.inference.em.em_loop`; the restart with the highest log-likelihood is kept.
Data are arguments of the compiled function: new data of the same shapes reuse it.

Because the statistics add over rows, the driver sums them over row blocks (``block_size``: bounded
memory for the E-step's temporaries, a ``lax.scan`` over blocks) and over the devices of a mesh
(``mesh``: each device reduces its rows, then ``psum``), for every such family alike. Rows that pad
the last block repeat the first row with weight 0, so they are valid data of any family and add
nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from .._validation import check_int
from ..models.batch import Batch
from ..models.registry import check_family
from .em import (
    DEFAULT_BLOCK,
    EMResult,
    block_layout,
    check_em_args,
    check_init_params,
    em_loop,
    platform_of,
    restarts_at_best,
)

NEEDS = ("batch", "start_params", "expected_stats", "m_step_from_stats", "log_prior",
         "batch_log_likelihood")
NEEDS_RESPONSIBILITIES = ("batch", "start_params", "batch_component_log_probs", "m_step", "log_prior",
                          "batch_log_likelihood")
KINDS = ("expected_stats", "responsibilities")

STATS_CPU_BLOCK = 4096  # rows per block on a CPU ("auto"): the forward-backward keeps (T, rows, K, S)


def stats_em_step(model, params, batch):
    """One EM iteration: (new parameters, weighted log-likelihood at the old ones)."""
    ll, stats = model.expected_stats(params, batch)
    return model.m_step_from_stats(stats), ll


def _pad_rows(a, total: int):
    """``a`` (N, ...) to ``total`` rows by repeating its first row (valid data of any family)."""
    extra = total - a.shape[0]
    if extra == 0:
        return a
    return jnp.concatenate([a, jnp.broadcast_to(a[:1], (extra,) + a.shape[1:])], axis=0)


def blocked_batch(batch: Batch, block_size, n_shards: int = 1, platform: str | None = None,
                  row_width: int = 1) -> Batch:
    """The batch as (n_shards * blocks, block, ...) arrays; padding rows repeat row 0 with weight 0.

    ``block_size``: rows per block at most (``"auto"``: ``STATS_CPU_BLOCK`` on a CPU, the
    platform's memory budget elsewhere; None: one block per device); ``row_width``: elements of
    the E-step's widest temporary per row (the family's ``row_width(batch)``), which keeps a block
    within the platform's budget (:func:`~conceptshift.inference.em.block_layout`)."""
    n = batch.w.shape[0]
    platform = platform or jax.default_backend()
    if block_size == "auto" and platform == "cpu":
        block_size = STATS_CPU_BLOCK
    block, nb = block_layout(n, block_size, n_shards, rows=row_width, platform=platform)
    total = n_shards * nb * block

    def lay(a, fill_w=False):
        a = jnp.pad(a, (0, total - n)) if fill_w else _pad_rows(a, total)
        return a.reshape((n_shards * nb, block) + a.shape[1:])

    return Batch(lay(batch.x), lay(batch.y), lay(batch.w, fill_w=True))


def row_sum(fn, blocks: Batch, mesh=None):
    """``params -> sum over blocks of fn(params, block)`` (a pytree of sums), the blocks under
    ``lax.scan``; with a mesh each device reduces its blocks and the sums are ``psum``-ed."""

    def local(params, xb, yb, wb):
        first = fn(params, Batch(xb[0], yb[0], wb[0]))
        if xb.shape[0] == 1:
            return first

        def body(acc, blk):
            return jax.tree_util.tree_map(jnp.add, acc, fn(params, Batch(*blk))), None

        acc, _ = jax.lax.scan(body, first, (xb[1:], yb[1:], wb[1:]))
        return acc

    if mesh is None:
        return lambda params: local(params, blocks.x, blocks.y, blocks.w)

    from jax.sharding import PartitionSpec as P

    def sharded(params, xb, yb, wb):
        return jax.lax.psum(local(params, xb, yb, wb), "data")

    smap = jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")),
                         out_specs=P(), check_vma=False)
    return lambda params: smap(params, blocks.x, blocks.y, blocks.w)


def responsibility_step(model, params, batch):
    """One EM iteration of a ``"responsibilities"`` family: (new parameters, weighted
    log-likelihood at the old ones)."""
    clp = model.batch_component_log_probs(params, batch)
    ll_n = logsumexp(clp, axis=-1)
    r = jnp.exp(clp - ll_n[:, None])
    return model.m_step(params, batch, r), jnp.sum(batch.w * ll_n)


def _run(model, blocks, params0, tol, max_iter: int, mesh):
    ll_fn = row_sum(model.batch_log_likelihood, blocks, mesh)
    if model.em_kind == "expected_stats":
        stats_fn = row_sum(model.expected_stats, blocks, mesh)

        def step(params):
            ll, stats = stats_fn(params)
            return model.m_step_from_stats(stats), ll, ll + model.log_prior(params)
    else:  # one block (the M-step reads every row)
        batch = Batch(blocks.x[0], blocks.y[0], blocks.w[0])

        def step(params):
            new, ll = responsibility_step(model, params, batch)
            return new, ll, ll + model.log_prior(params)

    params, n_iter, ll_tr, obj_tr, conv, failed = em_loop(step, params0, tol, max_iter, blocks.w.dtype,
                                                          jnp.sum(blocks.w))
    ll = ll_fn(params)
    obj = ll + model.log_prior(params)
    return params, ll, obj, ll_tr, obj_tr, n_iter, conv & ~failed & jnp.isfinite(obj)


def _fit_impl(model, key, batch, tol, init_params, *, restarts: int, max_iter: int, block_size,
              mesh, platform):
    dtype = batch.w.dtype
    tol = jnp.asarray(tol, dtype)
    if init_params is not None:
        params0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype)[None], init_params)
    else:
        params0 = jax.vmap(lambda k: model.start_params(k, batch))(jax.random.split(key, restarts))
    n_shards = 1 if mesh is None else mesh.shape["data"]
    width = model.row_width(batch) if hasattr(model, "row_width") else 1
    if model.em_kind == "responsibilities":
        block_size = None
    blocks = blocked_batch(batch, block_size, n_shards, platform, width)
    runs = jax.vmap(lambda p: _run(model, blocks, p, tol, max_iter, mesh))(params0)
    params, ll, obj, ll_tr, obj_tr, n_iter, conv = runs
    finite = jnp.isfinite(obj)
    if hasattr(model, "batch_degenerate_components"):
        degenerate = jax.vmap(lambda p: jnp.any(model.batch_degenerate_components(p, batch)))(params)
    else:
        degenerate = jnp.zeros(ll.shape, bool)
    # a clean restart is preferred to a degenerate one (kept only when every restart is)
    score = jnp.where(degenerate | ~finite, -jnp.inf, ll)
    fallback = jnp.where(finite, ll, -jnp.inf)
    best = jnp.where(jnp.any(jnp.isfinite(score)), jnp.argmax(score), jnp.argmax(fallback))
    pick = jax.tree_util.tree_map(lambda a: a[best], runs)
    n = jnp.sum(batch.w)
    bic = -2.0 * pick[1] + model.n_params * jnp.log(n)
    return EMResult(pick[0], pick[1], pick[2], pick[3], pick[4], pick[5], pick[6], bic,
                    degenerate[best], best.astype(jnp.int32), ll, conv, degenerate,
                    restarts_at_best(ll, finite & ~degenerate, best, n), None)


fit_program = jax.jit(_fit_impl, static_argnames=("model", "restarts", "max_iter", "block_size", "mesh",
                                               "platform"))


def fit_stats_em(model, key, x, y=None, *, weights=None, restarts: int = 8, max_iter: int = 200,
                 tol: float = 1e-8, init_params=None, block_size=DEFAULT_BLOCK, mesh=None) -> EMResult:
    """Fits a family with additive expected statistics by EM (module docs); returns the best restart.
    Called by :func:`~conceptshift.inference.em.fit_em` for such families, with its arguments
    (``x``, ``y`` as the family's ``batch`` takes them; for a mixture of HMMs tokens (N, T) with -1
    as trailing padding and output tokens or None).

    ``block_size``: rows per block of the E-step (``"auto"``: 4096 on a CPU, the platform's memory
    budget on an accelerator, both bounded by the family's ``row_width``; None: one block).
    ``mesh``: a ``jax.sharding.Mesh`` with an axis ``"data"``; the rows are split over its devices
    and the statistics summed (the fit equals the one-device fit to float rounding)."""
    check_family(model, "fit_stats_em", em_kinds=KINDS)
    responsibilities = model.em_kind == "responsibilities"
    check_family(model, "fit_stats_em", needs=NEEDS_RESPONSIBILITIES if responsibilities else NEEDS)
    key, restarts, max_iter, tol = check_em_args(key, restarts, max_iter, tol)
    if responsibilities and (mesh is not None or block_size not in (None, "auto")):
        raise ValueError(f"block_size and mesh are not supported for {type(model).__name__} (its "
                         "M-step reads every row with its responsibilities)")
    if block_size is not None and block_size != "auto":
        block_size = check_int("block_size", block_size, minimum=1)
    if mesh is not None and "data" not in getattr(mesh, "axis_names", ()):
        raise ValueError("mesh must be a jax.sharding.Mesh with an axis named 'data'")
    batch = model.batch(x, y, weights)
    if batch.x.shape[0] < model.n_components:
        raise ValueError(f"x has {batch.x.shape[0]} rows, fewer than n_components={model.n_components}")
    if init_params is not None:
        check_init_params(model, init_params)
        restarts = 1
    return fit_program(model, key, batch, tol, init_params, restarts=restarts, max_iter=max_iter,
                    block_size=block_size, mesh=mesh, platform=platform_of(batch.x, mesh))

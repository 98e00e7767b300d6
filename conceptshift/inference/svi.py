"""Stochastic variational inference on a family's NumPyro model (the same ``numpyro_model`` that NUTS
samples and whose likelihood EM maximises).

Guides: ``"delta"`` (``AutoDelta``: MAP under the model's priors, or the MLE with ``mle=True``),
``"normal"`` (``AutoNormal``, mean field) and ``"fullrank"`` (``AutoMultivariateNormal``). The step
loop runs compiled, in chunks of ``chunk_size`` steps under ``lax.scan``; a rich progress bar
advances per chunk and the loss of every step is kept. A step whose loss or new parameters are not
finite is discarded (the state stays where it was) and counted in ``n_rejected``.

Data are arguments of the compiled chunk: a second fit with new data of the same shapes, the same
family, guide and optimizer does not recompile (the compiled runner is cached per configuration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal
from numpyro.infer.svi import SVIState
from numpyro.optim import optax_to_numpyro
from numpyro.primitives import Messenger

from .. import _precision as _p
from .._validation import check_int, check_key
from ..models.registry import check_family
from .sites import (
    latent_site_names,
    numpyro_numerics,
    params_from_draws,
    params_from_sites,
    sites_from_params,
)

GUIDES = ("delta", "normal", "fullrank")


class _drop_priors(Messenger):
    """Masks the log-density of every latent sample site: the joint becomes the likelihood."""

    def process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["fn"] = msg["fn"].mask(False)


def _model_fn(model, mle: bool):
    """The family's NumPyro model of a :class:`~conceptshift.models.batch.Batch` (its protocol's
    ``batch_model``), with the priors dropped for ``mle``."""
    if not mle:
        return model.batch_model

    def fn(batch):
        with _drop_priors():
            model.batch_model(batch)

    return fn


def _make_guide(kind: str, fn):
    if kind == "delta":
        return AutoDelta(fn)
    if kind == "normal":
        return AutoNormal(fn, init_scale=0.05)
    return AutoMultivariateNormal(fn, init_scale=0.05)


@dataclass
class _Runner:
    svi: SVI
    guide: Any
    run_chunk: Any  # jit(state, batch, step0, n_total) -> (state, losses, accepted)
    chunk: int
    init: Any  # jit(key, batch, guide init values) -> SVIState


_RUNNERS: dict = {}


def _runner(model, guide_kind, optimizer, mle, chunk) -> _Runner:
    key = (model, guide_kind, optimizer, mle, chunk)
    if key in _RUNNERS:
        return _RUNNERS[key]
    fn = _model_fn(model, mle)
    guide = _make_guide(guide_kind, fn)
    svi = SVI(fn, guide, optax_to_numpyro(optimizer), Trace_ELBO())

    def run_chunk(state, batch, step0, n_total):
        def step(carry, i):
            state = carry
            with numpyro_numerics():
                new, loss = svi.update(state, batch)
                new_params = svi.optim.get_params(new.optim_state)
            finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(ravel_pytree(new_params)[0]))
            ok = finite & (step0 + i < n_total)
            optim_state = jax.tree_util.tree_map(
                lambda a, b: jnp.where(ok, a, b), new.optim_state, state.optim_state)
            state = SVIState(optim_state, state.mutable_state, new.rng_key)
            return state, (jnp.where(finite, loss, jnp.nan), finite)

        return jax.lax.scan(step, state, jnp.arange(chunk))

    def init(key, batch, init_values):
        return svi.init(key, batch, init_params=init_values)

    # SVI.init sets up the guide's prototype by running the model; eagerly that is hundreds of
    # small compiles, so it runs under jit (the guide keeps only shapes and supports from it; its
    # numeric uses below go through the parameters, see _point and _sample_sites)
    runner = _Runner(svi, guide, jax.jit(run_chunk), chunk, jax.jit(init))
    _RUNNERS[key] = runner
    return runner


@dataclass
class SVIResult:
    """Outcome of :func:`fit_svi`.

    ``params`` is the family's parameter pytree at the guide's point estimate: the MAP (or MLE) for
    ``"delta"``, the guide's median for the others. ``loglik`` is the total log-likelihood there (the
    quantity EM maximises). ``loss_trace`` holds the ELBO loss of every step (NaN where a step was
    discarded as non-finite).
    """

    model: Any
    guide_kind: str
    params: Any
    guide_params: dict
    loss_trace: np.ndarray
    loglik: float
    n_rejected: int
    mle: bool
    supports: dict

    def sample_params(self, key, num_samples: int):
        """Draws from the guide, as the family's parameter pytree with a leading axis of size
        ``num_samples`` (for ``"delta"`` every draw is the point estimate)."""
        key = check_key("key", key)
        num_samples = check_int("num_samples", num_samples, minimum=1)
        with numpyro_numerics():
            sites = _sample_sites(self.guide_kind, self.guide_params, self.supports, key,
                                  num_samples)
        return params_from_draws(self.model, sites, 1)


def _point(kind: str, gp: dict, supports: dict) -> dict:
    """The guide's point estimate in constrained space: the Delta's location, or the median (the
    transformed location of the Gaussian in unconstrained space)."""
    if kind == "delta":
        return {n: gp[f"{n}_auto_loc"] for n in supports}
    if kind == "normal":
        return {n: biject_to(s)(gp[f"{n}_auto_loc"]) for n, (s, _) in supports.items()}
    return _unflatten(gp["auto_loc"], supports)


def _unflatten(flat, supports: dict) -> dict:
    """Unconstrained flat vector (AutoMultivariateNormal's order: sorted site names) -> sites.
    ``supports`` maps site names to (support, constrained shape)."""
    out, i = {}, 0
    for n in sorted(supports):
        s, shape = supports[n]
        ushape = tuple(biject_to(s).inverse_shape(shape))
        size = int(np.prod(ushape))
        out[n] = biject_to(s)(flat[..., i:i + size].reshape(flat.shape[:-1] + ushape))
        i += size
    return out


def _sample_sites(kind: str, gp: dict, supports: dict, key, num: int) -> dict:
    if kind == "delta":
        return {n: jnp.broadcast_to(v, (num,) + v.shape) for n, v in _point(kind, gp, supports).items()}
    if kind == "normal":
        out = {}
        for i, (n, (s, _)) in enumerate(supports.items()):
            loc, scale = gp[f"{n}_auto_loc"], gp[f"{n}_auto_scale"]
            eps = jax.random.normal(jax.random.fold_in(key, i), (num,) + loc.shape, loc.dtype)
            out[n] = biject_to(s)(loc + scale * eps)
        return out
    loc, tril = gp["auto_loc"], gp["auto_scale_tril"]
    eps = jax.random.normal(key, (num,) + loc.shape, loc.dtype)
    return _unflatten(loc + _p.mm(eps, tril.T), supports)


def initial_params(model, key, x, y=None, *, init: str = "kmeans++"):
    """EM's start (:func:`conceptshift.inference.em.start_params`): SVI starts where EM starts."""
    return _init_jit(model, key, model.batch(x, y), init)


def _init_impl(model, key, batch, init):
    from .em import start_params

    return start_params(model, key, batch, init)


_init_jit = jax.jit(_init_impl, static_argnames=("model", "init"))


def _guide_init_values(kind: str, model, sites: dict, trace) -> dict:
    """Values for the guide's param sites (constrained space, as ``SVI.init(init_params=)`` wants)
    that put its location at ``sites``."""
    names = latent_site_names(model)
    if kind == "delta":
        return {f"{n}_auto_loc": sites[n] for n in names}
    unconstrained = {n: biject_to(trace[n]["fn"].support).inv(sites[n]) for n in names}
    if kind == "normal":
        return {f"{n}_auto_loc": unconstrained[n] for n in names}
    return {"auto_loc": ravel_pytree(unconstrained)[0]}


def fit_svi(
    model,
    key,
    x,
    y=None,
    *,
    guide: str = "delta",
    num_steps: int = 2000,
    learning_rate=1e-2,
    optimizer: optax.GradientTransformation | None = None,
    mle: bool = False,
    init_params=None,
    chunk_size: int = 250,
    progress: bool = False,
) -> SVIResult:
    """Fits ``model.numpyro_model`` to (x, y) by SVI.

    Args:
      model: any registered family, e.g. ``RegressionMixture(3)`` or ``HMMMixture(2, 3, 10, 1)``.
      key: a ``jax.random`` key.
      x, y: data as for :func:`fit_em` (for a mixture of HMMs: tokens (N, T) with -1 as trailing
        padding, and output tokens or None).
      guide: ``"delta"``, ``"normal"`` or ``"fullrank"``.
      num_steps: optimisation steps.
      learning_rate: Adam's step size, a float or an optax schedule (``optax.cosine_decay_schedule``
        ...); ignored when ``optimizer`` is given.
      optimizer: any ``optax.GradientTransformation`` (pass the same object again to reuse the
        compiled loop).
      mle: drop the priors (the maximum-likelihood estimate with ``"delta"``).
      init_params: the family's parameters to start from; default: EM's k-means++ initialisation
        (:func:`initial_params`), so that SVI and EM start alike.
      chunk_size: steps per compiled ``lax.scan`` chunk (the progress bar's granularity).
      progress: show a rich progress bar.

    Example:
      >>> import jax, numpy as np
      >>> from conceptshift.models import RegressionMixture
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=200); z = rng.integers(0, 2, 200)
      >>> y = np.where(z, 2 + x, -2 - x) + 0.3 * rng.normal(size=200)
      >>> res = fit_svi(RegressionMixture(2), jax.random.key(0), x, y, num_steps=500)
      >>> res.loss_trace.shape
      (500,)
    """
    check_family(model, "fit_svi", needs=("batch", "batch_model", "batch_log_likelihood", "to_sites",
                                          "from_sites"))
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
    key = check_key("key", key)
    num_steps = check_int("num_steps", num_steps, minimum=1)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    if optimizer is None:
        if not callable(learning_rate):
            from .._validation import check_float

            learning_rate = check_float("learning_rate", learning_rate, positive=True)
        optimizer = cached_adam(learning_rate)
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got "
                        f"{type(optimizer).__name__}")
    batch = model.batch(x, y)
    if batch.x.shape[0] < model.n_components:
        raise ValueError(f"x has {batch.x.shape[0]} rows, fewer than n_components={model.n_components}")
    k_init, k_svi = jax.random.split(key)
    if init_params is None:
        init_params = _init_jit(model, k_init, batch, "kmeans++")
    return svi_on_batch(model, k_svi, batch, init_params, guide=guide, num_steps=num_steps,
                        optimizer=optimizer, mle=mle, chunk_size=chunk_size, progress=progress)


def svi_on_batch(model, key, batch, init_params, *, guide: str, num_steps: int, optimizer,
                 mle: bool = False, chunk_size: int = 250, progress: bool = False) -> SVIResult:
    """The SVI loop of :func:`fit_svi` on a prepared batch (no input checks). ``model`` is a family
    or anything hashable with ``batch_model``, ``site_names``, ``to_sites``, ``from_sites`` and
    ``batch_log_likelihood`` (such as :class:`~conceptshift.inference.joint.JointModel`);
    ``init_params`` its parameters, where the guide starts."""
    k_svi = key
    dtype = jax.tree_util.tree_leaves(batch)[-1].dtype
    sites = sites_from_params(model, jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype),
                                                             init_params))
    chunk = min(chunk_size, num_steps)
    runner = _runner(model, guide, optimizer, bool(mle), chunk)
    with numpyro_numerics():
        trace = handlers.trace(handlers.substitute(handlers.seed(model.batch_model, 0),
                                                   data=sites)).get_trace(batch)
        state = runner.init(k_svi, batch, _guide_init_values(guide, model, sites, trace))
    n_chunks = -(-num_steps // chunk)
    losses, oks = [], []
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cols = [TextColumn(f"SVI ({guide})"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn()]
    n_total = jnp.asarray(num_steps, jnp.int32)
    with Progress(*cols, disable=not progress, transient=False) as bar:
        task = bar.add_task("svi", total=num_steps, loss="-")
        for c in range(n_chunks):
            with numpyro_numerics():
                state, (loss, ok) = runner.run_chunk(state, batch, jnp.asarray(c * chunk, jnp.int32),
                                                     n_total)
            losses.append(np.asarray(loss))
            oks.append(np.asarray(ok))
            done = min((c + 1) * chunk, num_steps)
            bar.update(task, completed=done, loss=f"{float(losses[-1][done - c * chunk - 1]):.6g}")
    loss_trace = np.concatenate(losses)[:num_steps]
    accepted = np.concatenate(oks)[:num_steps]
    with numpyro_numerics():  # AutoDelta's constrain maps batched simplices with implicit broadcasting
        guide_params = runner.svi.get_params(state)
    supports = {n: (trace[n]["fn"].support, tuple(trace[n]["value"].shape))
                for n in latent_site_names(model)}
    with numpyro_numerics():
        params = params_from_sites(model, _point(guide, guide_params, supports))
    loglik = float(model.batch_log_likelihood(params, batch))
    return SVIResult(model, guide, params, guide_params, loss_trace, loglik,
                     int(np.sum(~accepted)), bool(mle), supports)



_ADAMS: dict = {}


def cached_adam(learning_rate):
    """One optax.adam object per learning rate (or schedule), so repeated fits share a compile."""
    if learning_rate not in _ADAMS:
        _ADAMS[learning_rate] = optax.adam(learning_rate)
    return _ADAMS[learning_rate]

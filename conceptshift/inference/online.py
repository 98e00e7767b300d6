"""Online EM (Cappé & Moulines 2009) for data larger than memory.

The data are read chunk by chunk (from arrays, or ``.npy`` files opened as memory maps), each chunk's
expected sufficient statistics are computed on the device by the same fused E-step as batch EM, and
a running average of the per-sample statistics is updated by stochastic approximation,

    s <- (1 - gamma_t) s + gamma_t s_chunk(theta),    theta <- M-step(N s),    gamma_t = (t + 2)^-kappa,

with kappa in (1/2, 1]. Every chunk has the same shape (the last one is padded with zero-weight
rows), so the chunk step compiles once.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._validation import check_float, check_int, check_key, float_dtype
from ..models import ExpertsFamily, Standardiser
from ..models.registry import check_family
from .em import fit_em, make_stats_fn, platform_of


class OnlineEMResult(NamedTuple):
    params: object
    loglik: float  # total log-likelihood of all rows at the final parameters (one more pass)
    loglik_trace: np.ndarray  # per chunk: the chunk's mean log-likelihood before its update
    n_chunks: int
    n_rows: int


def open_npy(path) -> np.ndarray:
    """A ``.npy`` array as a read-only memory map (rows are read only when a chunk needs them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file not found: {path}")
    return np.load(path, mmap_mode="r")


def _scale(ss, factor):
    """Statistics times a factor (the reference coefficients are not a sum and stay)."""
    return jax.tree_util.tree_map(lambda a: a * factor, ss._replace(ref=None))._replace(ref=ss.ref)


def _chunk_host(model, a_x, a_y, start, chunk_size):
    """Rows start.. of the data as float64 arrays (chunk_size, D), (chunk_size, H) and weights,
    padded with zero-weight rows."""
    n = a_y.shape[0]
    stop = min(start + chunk_size, n)
    xs = np.zeros((chunk_size, model.n_features))
    ys = np.zeros((chunk_size, model.n_heads))
    ws = np.zeros((chunk_size,))
    if model.n_features:
        xs[: stop - start] = np.asarray(a_x[start:stop]).reshape(stop - start, model.n_features)
    ys[: stop - start] = np.asarray(a_y[start:stop]).reshape(stop - start, model.n_heads)
    ws[: stop - start] = 1.0
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise ValueError(f"rows {start}..{stop - 1} hold non-finite values (NaN or inf)")
    return xs, ys, ws


def _standardised(xs, ys, ws, std: Standardiser, dtype):
    """Host rows in the standard coordinates of ``std`` (fixed for the whole run), in ``dtype``."""
    xs = (xs - std.x_loc[None, :]) / std.x_scale[None, :]
    ys = (ys - std.y_loc[None, :]) / std.y_scale[None, :]
    return jnp.asarray(xs, dtype), jnp.asarray(ys, dtype), jnp.asarray(ws, dtype)


def _chunk(model, a_x, a_y, start, chunk_size, dtype, std):
    return _standardised(*_chunk_host(model, a_x, a_y, start, chunk_size), std, dtype)


def fit_online_em(
    model: ExpertsFamily,
    key,
    x,
    y,
    *,
    chunk_size: int = 65536,
    epochs: int = 1,
    kappa: float = 0.6,
    init_restarts: int = 4,
    progress: bool = False,
) -> OnlineEMResult:
    """Fits ``model`` by online EM, streaming (x, y) in chunks of ``chunk_size`` rows.

    Args:
      model: a family instance.
      key: a ``jax.random`` key (used by the batch EM that initialises on the first chunk).
      x: (N, D) array-like or memory map (or a path to a ``.npy`` file); None when D == 0.
      y: (N,) or (N, H) array-like, memory map or ``.npy`` path.
      chunk_size: rows per chunk (the device holds one chunk at a time).
      epochs: passes over the data.
      kappa: step-size exponent, gamma_t = (t + 2)^-kappa, in (1/2, 1].
      init_restarts: restarts of the batch EM fit of the first chunk that initialises the run.
      progress: show a progress bar over chunks.
    """
    check_family(model, "fit_online_em", em_kinds=("closed_form",))
    key = check_key("key", key)
    chunk_size = check_int("chunk_size", chunk_size, minimum=max(2, model.n_components))
    epochs = check_int("epochs", epochs, minimum=1)
    kappa = check_float("kappa", kappa)
    if not 0.5 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0.5, 1], got {kappa}")
    a_x = open_npy(x) if isinstance(x, str | Path) else x
    a_y = open_npy(y) if isinstance(y, str | Path) else y
    if a_y is None or not hasattr(a_y, "shape"):
        raise TypeError("y must be an array, a memory map or a .npy path")
    n = int(a_y.shape[0])
    if model.n_features and (a_x is None or int(a_x.shape[0]) != n):
        raise ValueError(f"x must have {n} rows like y, got {None if a_x is None else a_x.shape}")
    dtype = np.dtype(float_dtype())

    # the first chunk fixes the standard coordinates the run works in (any fixed affine map keeps
    # the fit equivariant) and, by batch EM, the start and the prior's scale
    hx, hy, hw = _chunk_host(model, a_x, a_y, 0, chunk_size)
    std = model.standardiser(hx, hy, hw, xp=np)  # float64, on the host
    x0, y0, w0 = _standardised(hx, hy, hw, std, dtype)
    first = fit_em(model, key, x0, y0, weights=w0, restarts=init_restarts)
    params = first.params
    stats = model.data_stats(x0, y0, w0)._replace(n=jnp.asarray(float(n), dtype))

    backend = model.estep_backend(x0.dtype, platform_of(x0))  # once for the run

    @jax.jit
    def chunk_stats(params, xs, ys, ws):
        ll, ss = make_stats_fn(model, xs, ys, ws, stats, backend=backend)(params)
        wsum = jnp.sum(ws)
        return ll / wsum, _scale(ss, 1.0 / wsum)

    @jax.jit
    def update(running, params, new, gamma):
        running = model.rebase(running, new.ref)
        mix = jax.tree_util.tree_map(lambda a, b: (1 - gamma) * a + gamma * b, running, new)
        mix = mix._replace(ref=new.ref)
        params_new = model.m_step_from_stats(_scale(mix, stats.n), stats)
        leaves = jax.tree_util.tree_leaves(params_new)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))
        params = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), params_new, params)
        return mix, params

    starts = list(range(0, n, chunk_size))
    _, running = chunk_stats(params, x0, y0, w0)
    trace = []
    t = 0
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("online EM", total=epochs * len(starts))
        for _ in range(epochs):
            for start in starts:
                xs, ys, ws = _chunk(model, a_x, a_y, start, chunk_size, dtype, std)
                ll, new = chunk_stats(params, xs, ys, ws)
                gamma = jnp.asarray((t + 2.0) ** -kappa, dtype)
                running, params = update(running, params, new, gamma)
                trace.append(float(ll))
                t += 1
                bar.advance(task)
    total_ll = 0.0
    for start in starts:
        xs, ys, ws = _chunk(model, a_x, a_y, start, chunk_size, dtype, std)
        ll, _ = chunk_stats(params, xs, ys, ws)
        total_ll += float(ll) * float(jnp.sum(ws))
    std_w = Standardiser(*(jnp.asarray(a, dtype) for a in std))
    log_jac = float(model.log_jacobian(std_w))  # per row: back to the raw data's log-likelihood
    params = model.params_from_standard(params, std_w)
    return OnlineEMResult(params, total_ll + n * log_jac, np.asarray(trace) + log_jac, t, n)

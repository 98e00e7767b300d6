"""Online EM (Cappé & Moulines 2009) for data larger than memory.

The data are read chunk by chunk (from arrays, or ``.npy`` files opened as memory maps), each chunk's
expected sufficient statistics are computed on the device by the same fused E-step as batch EM, and
a running average of the per-sample statistics is updated by stochastic approximation,

    s <- (1 - gamma_t) s + gamma_t s_chunk(theta),    theta <- M-step(N s),    gamma_t = (t + 2)^-kappa,

with kappa in (1/2, 1]. Every chunk has the same shape (the last one is padded with zero-weight
rows), so the chunk step compiles once.

It runs on every family whose statistics add over rows: the closed-form families (by the same fused
E-step as batch EM, in the fixed standard coordinates of the first chunk) and the families with
expected statistics (``em_kind == "expected_stats"``, the mixture of HMMs), through the protocol's
``batch``, ``expected_stats`` and ``m_step_from_stats`` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._validation import check_float, check_int, check_key, float_dtype
from ..models import Standardiser
from ..models.registry import check_family
from .em import all_finite, fit_em, make_stats_fn, platform_of
from .stats_em import NEEDS as STATS_NEEDS


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


def _sweeps(n_chunks: int, epochs: int, step, progress: bool) -> list[float]:
    """Calls ``step(chunk_index)`` for every chunk of every epoch (a progress bar over chunks);
    returns what the steps return (each chunk's mean log-likelihood before its update)."""
    from rich.progress import Progress

    trace = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("online EM", total=epochs * n_chunks)
        for _ in range(epochs):
            for i in range(n_chunks):
                trace.append(step(i))
                bar.advance(task)
    return trace


def _rows_host(a, start: int, chunk_size: int, n: int):
    """Rows start.. of ``a`` (N, ...) as a host array of ``chunk_size`` rows: the rows past the
    data repeat row ``start`` (valid data of any family; they get weight 0)."""
    stop = min(start + chunk_size, n)
    rows = np.asarray(a[start:stop])
    if stop - start < chunk_size:
        rows = np.concatenate([rows, np.repeat(rows[:1], chunk_size - (stop - start), axis=0)])
    return rows


def _fit_online_stats(model, key, a_x, a_y, n, *, chunk_size, epochs, kappa, init_restarts,
                      progress) -> OnlineEMResult:
    """Online EM of a family with expected statistics (module docs), chunk by chunk through its
    ``batch``: the running average of the per-row statistics, the M-step at N times it."""
    dtype = np.dtype(float_dtype())

    def chunk(start):
        stop = min(start + chunk_size, n)
        ws = (np.arange(chunk_size) < stop - start).astype(dtype)
        ys = None if a_y is None else _rows_host(a_y, start, chunk_size, n)
        return model.batch(_rows_host(a_x, start, chunk_size, n), ys, ws)

    b0 = chunk(0)
    params = fit_em(model, key, b0.x, b0.y, weights=b0.w, restarts=init_restarts).params
    total = jnp.asarray(float(n), dtype)

    @jax.jit
    def chunk_stats(params, batch):
        ll, ss = model.expected_stats(params, batch)
        wsum = jnp.sum(batch.w)
        return ll / wsum, jax.tree_util.tree_map(lambda a: a / wsum, ss)

    @jax.jit
    def update(running, params, new, gamma):
        mix = jax.tree_util.tree_map(lambda a, b: (1 - gamma) * a + gamma * b, running, new)
        params_new = model.m_step_from_stats(jax.tree_util.tree_map(lambda a: a * total, mix))
        ok = all_finite(params_new)
        return mix, jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), params_new, params)

    loglik = jax.jit(model.batch_log_likelihood)
    starts = list(range(0, n, chunk_size))
    _, running = chunk_stats(params, b0)
    state = {"running": running, "params": params, "t": 0}

    def step(i):
        ll, new = chunk_stats(state["params"], chunk(starts[i]))
        gamma = jnp.asarray((state["t"] + 2.0) ** -kappa, dtype)
        state["running"], state["params"] = update(state["running"], state["params"], new, gamma)
        state["t"] += 1
        return float(ll)

    trace = _sweeps(len(starts), epochs, step, progress)
    total_ll = sum(float(loglik(state["params"], chunk(s))) for s in starts)
    return OnlineEMResult(state["params"], total_ll, np.asarray(trace), state["t"], n)


def fit_online_em(
    model,
    key,
    x,
    y=None,
    *,
    chunk_size: int = 65536,
    epochs: int = 1,
    kappa: float = 0.6,
    init_restarts: int = 4,
    progress: bool = False,
) -> OnlineEMResult:
    """Fits ``model`` by online EM, streaming (x, y) in chunks of ``chunk_size`` rows.

    Args:
      model: a family instance whose statistics add over rows (``em_kind`` ``"closed_form"`` or
        ``"expected_stats"``).
      key: a ``jax.random`` key (used by the batch EM that initialises on the first chunk).
      x: (N, D) array-like or memory map (or a path to a ``.npy`` file); None when D == 0. For a
        mixture of HMMs: integer tokens (N, T), -1 as trailing padding.
      y: (N,) or (N, H) array-like, memory map or ``.npy`` path (for a mixture of HMMs: output
        tokens, or None).
      chunk_size: rows per chunk (the device holds one chunk at a time).
      epochs: passes over the data.
      kappa: step-size exponent, gamma_t = (t + 2)^-kappa, in (1/2, 1].
      init_restarts: restarts of the batch EM fit of the first chunk that initialises the run.
      progress: show a progress bar over chunks.
    """
    kind = check_family(model, "fit_online_em", em_kinds=("closed_form", "expected_stats")).em_kind
    key = check_key("key", key)
    chunk_size = check_int("chunk_size", chunk_size, minimum=max(2, model.n_components))
    epochs = check_int("epochs", epochs, minimum=1)
    kappa = check_float("kappa", kappa)
    if not 0.5 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0.5, 1], got {kappa}")
    a_x = open_npy(x) if isinstance(x, str | Path) else x
    a_y = open_npy(y) if isinstance(y, str | Path) else y
    if kind == "expected_stats":
        check_family(model, "fit_online_em", needs=STATS_NEEDS)
        if a_x is None or not hasattr(a_x, "shape"):
            raise TypeError("x must be an array, a memory map or a .npy path")
        n = int(a_x.shape[0])
        if a_y is not None and (not hasattr(a_y, "shape") or int(a_y.shape[0]) != n):
            raise ValueError(f"y must be None or have {n} rows like x, got "
                             f"{getattr(a_y, 'shape', type(a_y).__name__)}")
        return _fit_online_stats(model, key, a_x, a_y, n, chunk_size=chunk_size, epochs=epochs,
                                 kappa=kappa, init_restarts=init_restarts, progress=progress)
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
        ok = all_finite(params_new)
        params = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), params_new, params)
        return mix, params

    starts = list(range(0, n, chunk_size))
    _, running = chunk_stats(params, x0, y0, w0)
    state = {"running": running, "params": params, "t": 0}

    def step(i):
        xs, ys, ws = _chunk(model, a_x, a_y, starts[i], chunk_size, dtype, std)
        ll, new = chunk_stats(state["params"], xs, ys, ws)
        gamma = jnp.asarray((state["t"] + 2.0) ** -kappa, dtype)
        state["running"], state["params"] = update(state["running"], state["params"], new, gamma)
        state["t"] += 1
        return float(ll)

    trace = _sweeps(len(starts), epochs, step, progress)
    params, t = state["params"], state["t"]
    total_ll = 0.0
    for start in starts:
        xs, ys, ws = _chunk(model, a_x, a_y, start, chunk_size, dtype, std)
        ll, _ = chunk_stats(params, xs, ys, ws)
        total_ll += float(ll) * float(jnp.sum(ws))
    std_w = Standardiser(*(jnp.asarray(a, dtype) for a in std))
    log_jac = float(model.log_jacobian(std_w))  # per row: back to the raw data's log-likelihood
    params = model.params_from_standard(params, std_w)
    return OnlineEMResult(params, total_ll + n * log_jac, np.asarray(trace) + log_jac, t, n)

"""Mixture-of-HMMs throughput: sequences per second of the log-likelihood and of one Baum-Welch
iteration, against hmmlearn's CategoricalHMM and dynamax's CategoricalHMM (when importable), in one run.

The comparison is like for like at K = 1 (one HMM): the same sequences (N of length T, S states, V
tokens) and the same parameters for every library. hmmlearn (Cython, float64) scores and fits the
concatenated sequences with ``lengths``; dynamax vmaps its single-sequence filter over the batch and
runs its own jitted ``e_step`` / ``m_step``; conceptshift runs :meth:`HMMMixture.log_likelihood` and
:func:`hmm_em_step` compiled. Rows with K > 1 (a mixture of K HMMs; neither library has one) show the
cost of the concepts. Compile time is reported apart; times are medians of repeats after a warm-up.

Usage: python benchmarks/hmm.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from conceptshift.files import write_json_atomic
from conceptshift.inference.baum_welch import hmm_em_step
from conceptshift.models.hmm import HMMMixture

HERE = Path(__file__).resolve().parent


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _row(impl, op, K, S, V, N, T, sec, compile_s=None, dtype="float32"):
    return {"impl": impl, "op": op, "K": K, "S": S, "V": V, "N": N, "T": T, "seconds": sec,
            "seq_per_s": N / sec, "compile_s": compile_s, "dtype": dtype}


def bench_ours(K, S, V, N, T, repeats, seed=0):
    model = HMMMixture(K, S, V)
    p = model.init_params(jax.random.key(seed))
    x, lengths, _, _ = model.sample(jax.random.key(seed + 1), p, N, T)
    d = model.check_data(x, lengths)
    dtype = str(d.w.dtype)
    ll = jax.jit(lambda p, d: jnp.sum(jax.scipy.special.logsumexp(model.data_component_log_probs(p, d), -1)))
    t0 = time.perf_counter()
    ll_c = ll.lower(p, d).compile()
    c1 = time.perf_counter() - t0
    step = jax.jit(lambda p, d: hmm_em_step(model, p, d))
    t0 = time.perf_counter()
    step_c = step.lower(p, d).compile()
    c2 = time.perf_counter() - t0
    t_ll = _median_time(lambda: ll_c(p, d), repeats)
    t_em = _median_time(lambda: step_c(p, d), repeats)
    rows = [_row("conceptshift", "loglik", K, S, V, N, T, t_ll, c1, dtype),
            _row("conceptshift", "em_iter", K, S, V, N, T, t_em, c2, dtype)]
    return rows, (p, np.asarray(x), np.asarray(lengths), float(ll_c(p, d)))


def bench_hmmlearn(S, V, p, x, lengths, repeats):
    import warnings

    from hmmlearn.hmm import CategoricalHMM

    N, T = x.shape
    X = x.reshape(-1, 1)
    lens = lengths.astype(int)

    def model(n_iter):
        m = CategoricalHMM(n_components=S, n_features=V, init_params="", params="ste", n_iter=n_iter, tol=0)
        m.startprob_ = np.exp(np.asarray(p.log_init[0], np.float64))
        m.transmat_ = np.exp(np.asarray(p.log_trans[0], np.float64))
        m.emissionprob_ = np.exp(np.asarray(p.log_emit, np.float64))
        m.startprob_ /= m.startprob_.sum()
        m.transmat_ /= m.transmat_.sum(1, keepdims=True)
        m.emissionprob_ /= m.emissionprob_.sum(1, keepdims=True)
        return m

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = model(1)
        ll = m.score(X, lens)
        t_ll = _median_time(lambda: m.score(X, lens), repeats)
        t_em = _median_time(lambda: model(1).fit(X, lens), repeats)
    return [_row("hmmlearn", "loglik", 1, S, V, N, T, t_ll, None, "float64"),
            _row("hmmlearn", "em_iter", 1, S, V, N, T, t_em, None, "float64")], ll


def bench_dynamax(S, V, p, x, repeats):
    try:
        from dynamax.hidden_markov_model import CategoricalHMM
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return [], f"dynamax not importable: {type(err).__name__}: {err}"
    N, T = x.shape
    hmm = CategoricalHMM(S, 1, V)
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        params, props = hmm.initialize(jax.random.key(0), initial_probs=jnp.exp(p.log_init[0]),
                                       transition_matrix=jnp.exp(p.log_trans[0]),
                                       emission_probs=jnp.exp(p.log_emit)[:, None, :])
        emissions = jnp.asarray(x)[:, :, None]

        @jax.jit
        def ll(params, emissions):
            return jnp.sum(jax.vmap(lambda e: hmm.marginal_log_prob(params, e))(emissions))

        @jax.jit
        def em(params, emissions):
            stats, lls = jax.vmap(lambda e: hmm.e_step(params, e))(emissions)
            new, _ = hmm.m_step(params, props, stats, hmm.initialize_m_step_state(params, props))
            return new, jnp.sum(lls)

        t0 = time.perf_counter()
        val = float(ll(params, emissions))
        c1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(em(params, emissions))
        c2 = time.perf_counter() - t0
        t_ll = _median_time(lambda: ll(params, emissions), repeats)
        t_em = _median_time(lambda: em(params, emissions), repeats)
    dtype = str(p.log_emit.dtype)
    return [_row("dynamax", "loglik", 1, S, V, N, T, t_ll, c1, dtype),
            _row("dynamax", "em_iter", 1, S, V, N, T, t_em, c2, dtype)], val


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "hmm.json")
    args = ap.parse_args(argv)
    if args.quick:
        configs, repeats, Ks = [(3, 5, 50, 10)], 2, (1,)
    else:
        configs, repeats, Ks = [(4, 16, 2000, 100), (16, 32, 2000, 100)], 5, (1, 4)
    rows, checks, notes = [], [], []
    for S, V, N, T in configs:
        for K in Ks:
            r, (p, x, lengths, ll_ours) = bench_ours(K, S, V, N, T, repeats)
            rows += r
            if K != 1:
                continue
            r, ll_hl = bench_hmmlearn(S, V, p, x, lengths, repeats)
            rows += r
            r, ll_dx = bench_dynamax(S, V, p, x, repeats)
            rows += r
            if isinstance(ll_dx, str):
                notes.append(ll_dx)
                ll_dx = None
            checks.append({"S": S, "V": V, "N": N, "T": T, "loglik_conceptshift": ll_ours,
                           "loglik_hmmlearn": ll_hl, "loglik_dynamax": ll_dx})
    for r in rows:
        print(f"{r['impl']:13s} {r['op']:8s} K={r['K']} S={r['S']:2d} V={r['V']:2d} N={r['N']} T={r['T']}: "
              f"{r['seconds'] * 1e3:9.2f} ms  {r['seq_per_s']:12,.0f} seq/s")
    result = {
        "benchmark": "hmm",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "devices": [str(d) for d in jax.devices()]},
        "versions": {"jax": jax.__version__, "numpy": np.__version__},
        "config": {"repeats": repeats, "quick": args.quick, "x64": bool(jax.config.jax_enable_x64)},
        "rows": rows,
        "loglik_agreement": checks,
        "notes": notes,
    }
    write_json_atomic(args.out, result)
    print(f"written: {args.out}")
    if not args.quick:
        write_table(result, HERE / "results" / "hmm.md")
    return result


def write_table(result: dict, path: Path) -> None:
    """The HMM section of benchmarks/README.md (included by em_iteration.py's generator)."""
    from conceptshift.files import write_atomic

    lines = [
        "## Mixture of HMMs against hmmlearn and dynamax (`hmm`)",
        "",
        "Time of the log-likelihood and of one Baum-Welch iteration over N sequences of T tokens, same data",
        "and parameters (conceptshift and dynamax in float32, hmmlearn in float64; hmmlearn's",
        "iteration is one `fit(n_iter=1)` call). The log-likelihoods agree to "
        f"{_agreement(result):.0e} relative.",
        "",
        "| K | S | V | N x T | implementation | log-likelihood (ms) | EM iteration (ms) |",
        "|---:|---:|---:|---|---|---:|---:|",
    ]
    by = {}
    for r in result["rows"]:
        by.setdefault((r["K"], r["S"], r["V"], r["N"], r["T"], r["impl"]), {})[r["op"]] = r["seconds"]
    for (K, S, V, N, T, impl), ops in by.items():
        ll, em = ops.get("loglik"), ops.get("em_iter")
        ll_ms = "-" if ll is None else f"{ll * 1e3:.1f}"
        em_ms = "-" if em is None else f"{em * 1e3:.1f}"
        lines.append(f"| {K} | {S} | {V} | {N} x {T} | {impl} | {ll_ms} | {em_ms} |")
    write_atomic(path, "\n".join(lines) + "\n")


def _agreement(result: dict) -> float:
    worst = 0.0
    for c in result["loglik_agreement"]:
        for other in ("loglik_hmmlearn", "loglik_dynamax"):
            if c.get(other) is not None:
                worst = max(worst, abs(c["loglik_conceptshift"] - c[other]) / abs(c[other]))
    return worst


if __name__ == "__main__":
    main()

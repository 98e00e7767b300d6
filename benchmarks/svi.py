"""SVI (AutoDelta, maximum likelihood) against EM on the same data and from the same start: the time
SVI needs to come within 1e-3 nats per sample of EM's log-likelihood, and EM's time to converge.

Both start from EM's k-means++ initialisation (``conceptshift.inference.svi.initial_params``). EM
runs to its tolerance; SVI runs a fixed number of Adam steps, chunk by chunk, and the time to the
first chunk whose end point is within 1e-3 nats/sample of EM's optimum is recorded (chunks of 100
steps: the resolution of that time). Compile and run times are measured separately
(block_until_ready, a warm-up call, then the median of repeats). Results go to
``benchmarks/results/svi.json``.

Usage: python benchmarks/svi.py [--quick] [--out FILE]
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
import optax

from conceptshift.files import write_json_atomic
from conceptshift.inference import fit_em
from conceptshift.inference.svi import fit_svi, initial_params
from conceptshift.models import GatedExperts, RegressionMixture, make_problem, simulate

HERE = Path(__file__).resolve().parent
TARGET = 1e-3  # nats per sample


def _timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        jax.block_until_ready(jax.tree_util.tree_leaves(res))
        out.append(time.perf_counter() - t0)
    return res, out


def bench(model, family: str, n: int, steps: int, repeats: int, chunk: int = 100, seed: int = 0):
    D = model.n_features
    prob = make_problem(jax.random.key(seed), family=family, n_components=model.n_components, n_features=D)
    sim = simulate(jax.random.key(seed + 1), prob, n, 10, 10)
    x, y = sim.source.x, sim.source.y
    p0 = initial_params(model, jax.random.key(seed + 2), x, y)

    def em():
        return fit_em(model, jax.random.key(0), x, y, init_params=p0, tol=1e-9, max_iter=2000)

    t0 = time.perf_counter()
    em_fit = em()
    jax.block_until_ready(em_fit.loglik)
    em_first = time.perf_counter() - t0
    em_fit, em_times = _timed(em, repeats)
    em_run = statistics.median(em_times)

    opt = optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.01))
    kw = dict(num_steps=steps, optimizer=opt, mle=True, init_params=p0, chunk_size=chunk)
    t0 = time.perf_counter()
    fit_svi(model, jax.random.key(0), x, y, **kw)
    svi_first = time.perf_counter() - t0
    res, svi_times = _timed(lambda: fit_svi(model, jax.random.key(0), x, y, **kw), repeats)
    svi_run = statistics.median(svi_times)
    # steps to reach EM's loglik: evaluate the loss trace (the MLE's loss is -loglik at each step)
    loss = res.loss_trace
    gap = (loss + float(em_fit.loglik)) / n  # -loglik_svi - (-loglik_em) per sample, before each step
    reached = np.nonzero(gap <= TARGET)[0]
    steps_to = int(reached[0]) if reached.size else None  # the loss at index i follows i steps
    return {
        "family": type(model).__name__, "n": n, "K": model.n_components, "D": D,
        "em_loglik_per_obs": float(em_fit.loglik) / n, "em_iterations": int(em_fit.n_iter),
        "em_compile_and_first_s": em_first, "em_run_s_median": em_run,
        "svi_steps": steps, "svi_final_gap_per_obs": (float(em_fit.loglik) - res.loglik) / n,
        "svi_steps_to_1e-3": steps_to,
        "svi_compile_and_first_s": svi_first, "svi_run_s_median": svi_run,
        "svi_s_per_step": svi_run / steps,
        "svi_time_to_1e-3_s": None if steps_to is None else steps_to * svi_run / steps,
        "run_s_spread": [min(svi_times), max(svi_times)],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (for the test)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "svi.json")
    args = ap.parse_args(argv)
    if args.quick:
        cases = [(RegressionMixture(2), "regression", 200, 300)]
        repeats = 1
    else:
        cases = [(RegressionMixture(3), "regression", 2000, 3000),
                 (RegressionMixture(3), "regression", 20000, 3000),
                 (GatedExperts(3, n_features=2), "gated", 2000, 3000)]
        repeats = 3
    rows = [bench(m, fam, n, steps, repeats) for m, fam, n, steps in cases]
    res = {"benchmark": "svi", "quick": args.quick, "target_nats_per_obs": TARGET, "rows": rows,
           "jax": jax.__version__, "backend": jax.default_backend(), "x64": bool(jax.config.jax_enable_x64),
           "python": sys.version.split()[0], "platform": platform.platform(),
           "dtype": str(jnp.zeros(()).dtype)}
    write_json_atomic(args.out, res)
    if not args.quick:
        write_table(res, HERE / "results" / "svi.md")
    for r in rows:
        print(f"{r['family']:18s} n={r['n']:6d}  EM {r['em_run_s_median']:.3f}s ({r['em_iterations']} it)  "
              f"SVI {r['svi_run_s_median']:.3f}s/{r['svi_steps']} steps, reaches 1e-3 nats/obs after "
              f"{r['svi_steps_to_1e-3']} steps ({r['svi_time_to_1e-3_s']} s); "
              f"final gap {r['svi_final_gap_per_obs']:.2e}")
    return res


def write_table(res: dict, path: Path) -> None:
    """The SVI section of benchmarks/README.md (included by em_iteration.py's generator)."""
    from conceptshift.files import write_atomic

    lines = [
        "## SVI (AutoDelta MLE) against EM (`svi`)",
        "",
        "Both start from EM's k-means++ initialisation of the same data; EM runs to tol = 1e-9",
        "(restarts = 1), SVI runs Adam steps (cosine schedule from 0.05, chunks of 100). 'Steps to",
        "1e-3' is the first step whose loss (-log-likelihood) is within 1e-3 nats per sample of EM's",
        "final log-likelihood; its time is that many steps at the measured time per step. Medians of",
        f"repeats after a warm-up, compile apart; {res['dtype']}, {res['backend']}.",
        "",
        "| family | n | EM run (s) | EM iterations | SVI s/step | steps to 1e-3 | SVI time to 1e-3 (s) "
        "| SVI all steps (s) | SVI compile+first (s) | EM - SVI at the end (nats/sample) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        name = f"{r['family']} K={r['K']}" + (f", D={r['D']}" if r["family"] == "GatedExperts" else "")
        t = r["svi_time_to_1e-3_s"]
        lines.append(
            f"| {name} | {r['n']:,} | {r['em_run_s_median']:.4f} | {r['em_iterations']} | "
            f"{r['svi_s_per_step']:.5f} | {r['svi_steps_to_1e-3']} | "
            f"{'-' if t is None else f'{t:.3f}'} | {r['svi_run_s_median']:.2f} | "
            f"{r['svi_compile_and_first_s']:.1f} | {r['svi_final_gap_per_obs']:.1e} |")
    write_atomic(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""R replicate fits under one ``vmap`` against a Python loop of the same compiled fit.

Each replicate is a fresh simulated data set of the same shape (the experiments' situation); every
fit runs a fixed number of EM iterations (tol = 0) with the same restarts, so both ways do the same
arithmetic. Compile time is reported apart.

Usage: python benchmarks/replicates.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from conceptshift.inference import fit_em  # noqa: E402
from conceptshift.models import make_problem, simulate  # noqa: E402


def datasets(R: int, n: int, family: str):
    prob = make_problem(jax.random.key(0), family=family, n_components=3, n_features=1)
    sims = [simulate(jax.random.key(1 + r), prob, n, 10, 10).source for r in range(R)]
    x = jnp.stack([s.x for s in sims])
    y = jnp.stack([s.y[:, None] if s.y.ndim == 1 else s.y for s in sims])
    return prob.strong_model, x, y


def bench(R: int, n: int, family: str, restarts: int, max_iter: int, repeats: int) -> dict:
    model, x, y = datasets(R, n, family)
    keys = jax.random.split(jax.random.key(2), R)

    def one(k, xs, ys):
        return fit_em(model, k, xs, ys, restarts=restarts, max_iter=max_iter, tol=0.0).loglik

    vm = h.time_jitted(jax.vmap(one), (keys, x, y), repeats)
    single = jax.jit(one)
    t0 = time.perf_counter()
    compiled = single.lower(keys[0], x[0], y[0]).compile()
    loop_compile = time.perf_counter() - t0

    def loop():
        return jax.block_until_ready([compiled(keys[r], x[r], y[r]) for r in range(R)])

    lp = h.time_python(loop, repeats)
    return {"R": R, "n": n, "family": family, "restarts": restarts, "max_iter": max_iter,
            "vmap": vm, "loop": {"compile_s": loop_compile, **lp},
            "speedup": lp["median_s"] / vm["median_s"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--families", default="regression,gated", help="comma-separated")
    ap.add_argument("--grid", default=None, help="comma-separated numbers of replicates R")
    args = ap.parse_args(argv)
    if args.quick:
        grid, n, restarts, max_iter, repeats = [2], 200, 2, 5, 2
    else:
        grid, n, restarts, max_iter, repeats = [1, 4, 16, 64], 2000, 8, 100, 3
    if args.grid:
        grid = [int(v) for v in args.grid.split(",")]
    rows = []
    for family in ("regression",) if args.quick else args.families.split(","):
        for R in grid:
            rows.append(bench(R, n, family, restarts, max_iter, repeats))
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "replicates", "machine": h.machine(),
              "config": {"grid": grid, "n": n, "restarts": restarts, "max_iter": max_iter,
                         "repeats": repeats, "quick": args.quick}, "rows": rows}
    h.write("replicates", result, args.out)
    if not args.quick and args.out is None:
        lines = ["## Replicates: vmap against a Python loop (`replicates`)", "",
                 f"n = {n} rows per replicate, {restarts} restarts, {max_iter} EM iterations each "
                 "(tol = 0, same work both ways).", "",
                 "| family | R | vmap (s) | loop (s) | loop / vmap |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['family']} | {r['R']} | {r['vmap']['median_s']:.3f} | "
                         f"{r['loop']['median_s']:.3f} | {r['speedup']:.1f}x |")
        from conceptshift.files import write_atomic
        write_atomic(h.RESULTS / "replicates.md", "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()

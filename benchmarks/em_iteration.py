"""EM iteration time of the compiled families against scikit-learn's GaussianMixture.

A full-covariance Gaussian-gated mixture of experts with D covariates and one response is the same
model as a full-covariance Gaussian mixture of (x, y) in D + 1 dimensions, so the comparison is
like for like. Compile time and run time are measured separately (block_until_ready, a warm-up,
then the median and spread of repeats). Results go to ``benchmarks/results/em_iteration.json``.

Usage: python benchmarks/em_iteration.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from conceptshift.inference.em import _run_em
from conceptshift.io import write_json_atomic
from conceptshift.models import GatedExperts, RegressionMixture

HERE = Path(__file__).resolve().parent


def _timeit(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def bench_family(model, n: int, n_iter: int, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    D = model.n_features
    x = jnp.asarray(rng.normal(size=(n, D)))
    z = rng.integers(0, model.n_components, n)
    y = jnp.asarray((z - 1.5 + 0.5 * rng.normal(size=n))[:, None])
    w = jnp.ones((n,), x.dtype)
    r0 = jax.nn.one_hot(jnp.asarray(z), model.n_components, dtype=x.dtype)
    stats = model.data_stats(x, y, w)
    params0 = model.m_step(x, y, r0, stats)

    run = jax.jit(lambda x, y, w, p: _run_em(model, x, y, w, model.data_stats(x, y, w), p,
                                             jnp.asarray(0.0, x.dtype), n_iter).loglik)
    t0 = time.perf_counter()
    compiled = run.lower(x, y, w, params0).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(x, y, w, params0))  # warm-up
    times = _timeit(lambda: compiled(x, y, w, params0), repeats)
    per_iter = [t / n_iter for t in times]
    return {
        "family": type(model).__name__, "n": n, "K": model.n_components, "D": D,
        "dtype": str(x.dtype), "n_iter": n_iter, "compile_s": compile_s,
        "iter_s_median": statistics.median(per_iter), "iter_s_min": min(per_iter),
        "iter_s_max": max(per_iter), "repeats": repeats,
    }


def bench_sklearn(n: int, K: int, D: int, n_iter: int, repeats: int, seed: int = 0) -> dict:
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, D + 1))
    gm = GaussianMixture(K, covariance_type="full", max_iter=1, random_state=seed).fit(X)

    def iterate():
        for _ in range(n_iter):
            _, log_resp = gm._e_step(X)
            gm._m_step(X, log_resp)

    iterate()  # warm-up
    per_iter = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        iterate()
        per_iter.append((time.perf_counter() - t0) / n_iter)
    return {"family": "sklearn.GaussianMixture(full)", "n": n, "K": K, "D": D,
            "dtype": "float64", "n_iter": n_iter, "iter_s_median": statistics.median(per_iter),
            "iter_s_min": min(per_iter), "iter_s_max": max(per_iter), "repeats": repeats}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (used by the test suite)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "em_iteration.json")
    args = ap.parse_args(argv)
    if args.quick:
        sizes, K, D, n_iter, repeats = [500], 2, 2, 3, 2
    else:
        sizes, K, D, n_iter, repeats = [1_000, 10_000, 100_000, 1_000_000], 4, 8, 10, 5
    rows = []
    for n in sizes:
        for model in (RegressionMixture(K, n_features=D), GatedExperts(K, n_features=D)):
            rows.append(bench_family(model, n, n_iter, repeats))
            print(json.dumps(rows[-1]), flush=True)
        rows.append(bench_sklearn(n, K, D, n_iter if n < 1_000_000 else 3, repeats))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "em_iteration",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": sys.version.split()[0], "devices": [str(d) for d in jax.devices()]},
        "versions": {"jax": jax.__version__, "numpy": np.__version__},
        "config": {"sizes": sizes, "K": K, "D": D, "n_iter": n_iter, "repeats": repeats,
                   "x64": bool(jax.config.jax_enable_x64), "quick": args.quick},
        "rows": rows,
    }
    write_json_atomic(args.out, result)
    print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()

"""What fit_em's restarts cost: R restarts under one ``vmap`` against one restart, same iterations.

A 3-component regression mixture, n rows, a fixed number of EM iterations (tol = 0), float32; the
compiled fit is timed after a warm-up call.

Usage: python benchmarks/restarts.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from conceptshift.inference import fit_em  # noqa: E402
from conceptshift.models import RegressionMixture  # noqa: E402


def data(n: int):
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, n)
    z = rng.integers(0, 3, n)
    y = np.array([1.0, -1.0, 0.0])[z] + np.array([2.0, -1.0, 0.5])[z] * x + 0.3 * rng.normal(size=n)
    return x, y


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    sizes, n_iter, repeats = ([200], 5, 2) if args.quick else ([200, 20_000, 200_000], 100, 5)
    model = RegressionMixture(3)
    rows = []
    for n in sizes:
        x, y = data(n)
        times = {}
        for R in (1, 8):
            def fit(R=R, x=x, y=y):
                out = fit_em(model, jax.random.key(0), x, y, restarts=R, max_iter=n_iter, tol=0.0)
                return jax.block_until_ready(out.loglik)

            times[R] = h.time_python(fit, repeats)
        rows.append({"n": n, "iterations": n_iter, "one_restart_s": times[1]["median_s"],
                     "eight_restarts_s": times[8]["median_s"],
                     "ratio": times[8]["median_s"] / times[1]["median_s"]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "restarts", "machine": h.machine(),
              "config": {"sizes": sizes, "iterations": n_iter, "repeats": repeats,
                         "quick": args.quick}, "rows": rows}
    h.write("restarts", result, args.out)
    return result


if __name__ == "__main__":
    main()

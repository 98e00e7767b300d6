"""EM's objective over seeded problems, near and far from the origin: how many fits let it fall by
more than 8 ulps, and how many converge.

320 problems (K = 2, 3; regression or gated; degree 1 or 2; n = 200 or 2000; every eighth one at
x + 1e4, some of those with y + 1e4), one restart each, at most 200 iterations, in float32 and in
float64 (each precision in its own process). A fall is measured in ulps of the objective:
min over iterations of (obj[i+1] - obj[i]) / (eps |obj[i+1]|).

Usage: python benchmarks/monotone.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402


def problem(seed: int, n: int | None = None, far_every: int = 8):
    """Seeded problem ``seed``: (family, x, y); n rows (None: 200 or 2000, drawn), every
    ``far_every``-th one far from the origin. (``tests/test_equivariance.py`` uses it too.)"""
    from conceptshift.models import GatedExperts, RegressionMixture

    rng = np.random.default_rng(seed)
    K, gated, deg = int(rng.integers(2, 4)), bool(rng.integers(0, 2)), int(rng.integers(1, 3))
    drawn = int(rng.choice([200, 2000]))
    n = drawn if n is None else n
    z = rng.integers(0, K, n)
    x = (rng.normal(0, 2, K)[z] + rng.normal(size=n)) if gated else rng.uniform(-2, 2, n)
    b, s = rng.normal(0, 2, (K, deg + 1)), rng.uniform(0.2, 1.0, K)
    y = sum(b[z, j] * x**j for j in range(deg + 1)) + s[z] * rng.normal(size=n)
    if seed % far_every == 0:
        x, y = x + 1e4, y + float(rng.choice([0.0, 1e4]))
    return (GatedExperts if gated else RegressionMixture)(K, degree=deg), x, y


def sweep(n_problems: int) -> list[dict]:
    """The sweep in this process's precision."""
    import jax

    from conceptshift._validation import PrecisionWarning
    from conceptshift.inference import fit_em

    rows = []
    for seed in range(n_problems):
        model, x, y = problem(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PrecisionWarning)
            fit = fit_em(model, jax.random.key(seed), x, y, restarts=1, max_iter=200)
        tr = np.r_[np.asarray(fit.objective_trace, np.float64)[: int(fit.n_iter)], float(fit.objective)]
        eps = float(np.finfo(np.asarray(fit.objective).dtype).eps)
        d = np.diff(tr) / (eps * np.abs(tr[1:]))
        rows.append({"seed": seed, "family": type(model).__name__, "K": model.n_components,
                     "degree": model.degree, "n": len(y), "far": seed % 8 == 0,
                     "worst_ulps": float(d.min()) if d.size else 0.0, "n_iter": int(fit.n_iter),
                     "converged": bool(fit.converged), "degenerate": bool(fit.degenerate),
                     "precision_warning": bool(caught)})
    return rows


def summarise(rows: list[dict]) -> dict:
    fell = [r for r in rows if r["worst_ulps"] < -8]
    return {"problems": len(rows), "fell": len(fell),
            "fell_degenerate": sum(r["degenerate"] for r in fell),
            "not_converged": sum(not r["converged"] for r in rows),
            "precision_warnings": sum(r["precision_warning"] for r in rows)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n_problems = 8 if args.quick else 320
    if args.child:  # one precision, rows as JSON on stdout
        print(json.dumps(sweep(n_problems)))
        return {}
    result = {"benchmark": "monotone", "machine": h.machine(), "config": {"problems": n_problems}}
    for name, x64 in (("float32", "0"), ("float64", "1")):
        t0 = time.perf_counter()
        env = {**os.environ, "JAX_ENABLE_X64": x64}
        cmd = [sys.executable, __file__, "--child"] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows = json.loads(out.strip().splitlines()[-1])
        result[name] = {"summary": summarise(rows), "seconds": time.perf_counter() - t0,
                        "rows": rows}
        print(name, json.dumps(result[name]["summary"]), flush=True)
    h.write("monotone", result, args.out)
    return result


if __name__ == "__main__":
    main()

"""Time per EM iteration of the GLM mixtures (Poisson, logistic, categorical) against n on a GPU.

Runs on the default device (the CPU where there is no GPU). Families: ``PoissonRegressionMixture``,
``LogisticMixture`` and ``CategoricalMixture`` (C = 3 classes), each with K = 3 experts on one
covariate (y ~ 1 + x), ``reg = 0`` (maximum likelihood, as in ``glm_flexmix.py``). Data: n rows drawn
on the device from the family's own sampler (``sample_batch``, fixed key) at fixed true parameters
(the Poisson ones are ``glm_flexmix.py``'s); the start (``init_params``) is the truth with its
coefficients halved and equal proportions, the same for every n.

Per point (family, dtype, n): ``fit_em`` (public, one run from ``init_params``, tol = 0) of exactly
``--iters`` iterations and of one iteration, each compiled and warmed up by a first call, then timed
alternately ``--repeats`` times. Reported: ms per iteration = time of the ``--iters`` fit / iters
(median and best of the repeats; this includes the per-call work: validation of the data on the
host, standardisation, the final log-likelihood) and the marginal cost (fit of iters - fit of 1) /
(iters - 1), which leaves the per-call work out.

Order (most important first), each group in a process of its own under its own deadline, one JSON
line per measurement printed as it is measured: float32 at n = 1e5 and 1e6 for the three families;
float64 (a process with JAX_ENABLE_X64=1) for the Poisson family at 1e5 and 1e6; float32 at 1e7.
A point cut by the time budget (``--budget`` seconds for the whole run) is recorded as
'not measured'. ``--quick``: tiny n and few repeats (the code path on a CPU in seconds).

Results: ``--out`` (default ``benchmarks/results/glm_gpu.json``) and, for a full run, the Markdown
table ``results/glm_gpu.md``; ``--table FILE`` renders that table from a results JSON (e.g. one
copied back from a lent GPU machine).

Usage: python benchmarks/glm_gpu.py [--quick] [--out FILE] [--budget S] [--iters 20] [--repeats 5]
       python benchmarks/glm_gpu.py --table results/glm_gpu.json [--md FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import glm_flexmix as gf  # noqa: E402  (the Poisson truth, the code-state stamp)

NAME = "glm_gpu"
RESULTS = HERE / "results"
K = 3
N_CLASSES = 3  # the categorical family's classes
FAMILIES = ("poisson", "logistic", "categorical")
# true (intercept, slope) per component and predictor; the categorical family has C - 1 = 2
# predictors (classes 1 and 2 against class 0) per component
TRUE_COEF = {
    "poisson": [[c] for c in gf.TRUE_COEF],
    "logistic": [[(-2.0, 1.5)], [(0.0, -2.0)], [(2.0, 0.5)]],
    "categorical": [[(1.0, 1.0), (-1.0, 0.5)], [(-0.5, -1.5), (1.0, 0.0)], [(0.0, 0.5), (2.0, -1.0)]],
}
TRUE_WEIGHTS = gf.TRUE_WEIGHTS
START_SHRINK = 0.5  # the start: the true coefficients times this, equal proportions


def plan(quick: bool) -> list[dict]:
    """The groups in the order they run: each one process, (x64, [(family, n), ..])."""
    n5, n6, n7 = (2_000, 10_000, 50_000) if quick else (100_000, 1_000_000, 10_000_000)
    return [
        {"name": "float32", "x64": False, "points": [(f, n) for n in (n5, n6) for f in FAMILIES]},
        {"name": "float64", "x64": True, "points": [("poisson", n5), ("poisson", n6)]},
        {"name": "float32_1e7", "x64": False, "points": [(f, n7) for f in FAMILIES]},
    ]


# ------------------------------------------------------------------------------------- worker
def worker(points: list[tuple[str, int]], iters: int, repeats: int, deadline: float,
           code: dict) -> None:
    """Measures ``points`` in this process's precision, one JSON line each on stdout."""
    import _harness as h
    import jax
    import jax.numpy as jnp
    import numpy as np

    from conceptshift.inference import fit_em
    from conceptshift.models import (
        CategoricalMixture,
        GLMParams,
        LogisticMixture,
        PoissonRegressionMixture,
    )

    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    machine = h.machine()
    print(json.dumps({"machine": machine}), flush=True)
    stamp = {"device_kind": machine["device_kind"], "backend": machine["backend"],
             "jax": machine["versions"].get("jax"), "commit": code.get("commit"),
             "package_modified": code.get("package_modified")}
    last = None  # (n, seconds) of the last point measured: the estimate for the next
    for family, n in points:
        cls, kw = {"poisson": (PoissonRegressionMixture, {}), "logistic": (LogisticMixture, {}),
                   "categorical": (CategoricalMixture, {"n_classes": N_CLASSES})}[family]
        model = cls(n_components=K, n_features=1, reg=0.0, **kw)
        base = {"family": family, "model": cls.__name__, "dtype": np.dtype(dtype).name, "n": n,
                "K": K, **({"C": N_CLASSES} if family == "categorical" else {}), **stamp}
        left = deadline - time.time()
        if last is not None and last[1] * n / last[0] > left:
            print(json.dumps({**base, "status": "not measured",
                              "reason": f"time budget: about {last[1] * n / last[0]:.0f} s needed, "
                                        f"{left:.0f} s left"}), flush=True)
            continue
        t_point = time.perf_counter()
        coef = jnp.asarray(TRUE_COEF[family], dtype)[:, None]  # (K, H = 1, R, P = 2)
        lw = jnp.log(jnp.asarray(TRUE_WEIGHTS, dtype))
        truth = GLMParams(lw, coef)
        start = GLMParams(jnp.full((K,), -np.log(K), dtype), START_SHRINK * coef)
        t0 = time.perf_counter()
        batch = jax.jit(model.sample_batch, static_argnums=2)(jax.random.key(0), truth, n)
        x, y = jax.block_until_ready((batch.x, batch.y))
        data_s = time.perf_counter() - t0
        key = jax.random.key(1)

        def fit(k, x=x, y=y, model=model, start=start, key=key):
            res = fit_em(model, key, x, y, restarts=1, max_iter=k, tol=0.0, init_params=start)
            jax.block_until_ready(res.params)
            return res

        first_s = {}
        for k in (1, iters):
            t0 = time.perf_counter()
            res = fit(k)  # compiles, then runs
            first_s[k] = time.perf_counter() - t0
            if int(res.n_iter) != k:
                raise RuntimeError(f"{family}: the fit ran {int(res.n_iter)} EM iterations, not {k}")
        loglik = float(res.loglik)
        t_fixed, t_one = [], []
        for _ in range(repeats):
            for k, acc in ((1, t_one), (iters, t_fixed)):
                t0 = time.perf_counter()
                fit(k)
                acc.append(time.perf_counter() - t0)
        fixed = h.summary(t_fixed, per=iters)
        marginal = h.summary([(a - b) / (iters - 1) for a, b in zip(t_fixed, t_one, strict=True)])
        rec = {**base, "status": "measured", "iters": iters, "repeats": repeats,
               "ms_per_iter_median": 1e3 * fixed["median_s"], "ms_per_iter_best": 1e3 * fixed["min_s"],
               "ms_per_iter_max": 1e3 * fixed["max_s"],
               "marginal_ms_per_iter_median": 1e3 * marginal["median_s"],
               "marginal_ms_per_iter_best": 1e3 * marginal["min_s"],
               "fit1_ms_median": 1e3 * h.summary(t_one)["median_s"],
               "first_call_s": first_s[iters], "first_call_1_s": first_s[1], "data_s": data_s,
               "loglik": loglik, "loglik_per_row": loglik / n,
               "point_s": time.perf_counter() - t_point}
        last = (n, rec["point_s"])
        print(json.dumps(rec), flush=True)
        del batch, x, y


# ------------------------------------------------------------------------------- orchestration
def run_group(group: dict, args, deadline: float, code: dict) -> tuple[list[dict], dict | None]:
    """Runs one group's worker under ``deadline`` (killed there); returns its records, the points
    it did not reach marked 'not measured', and its machine description."""
    env = dict(os.environ, JAX_ENABLE_X64="1" if group["x64"] else "0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
           json.dumps({"points": group["points"], "iters": args.iters, "repeats": args.repeats,
                       "deadline": deadline, "code": code})]
    recs, machine = [], None
    left = deadline - time.time()
    if left > 1:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        killed = threading.Event()

        def stop():
            killed.set()
            proc.kill()

        timer = threading.Timer(left, stop)
        timer.start()
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if "machine" in rec:
                machine = rec["machine"]
                continue
            recs.append(rec)
            print(json.dumps(rec), flush=True)
        proc.wait()
        timer.cancel()
        why = "time budget: the group's process was stopped at its deadline" if killed.is_set() \
            else f"the group's process ended with status {proc.returncode}"
    else:
        why = "time budget: no time left for the group"
    done = {(r["family"], r["n"]) for r in recs}
    dtype = "float64" if group["x64"] else "float32"
    for family, n in group["points"]:
        if (family, n) not in done:
            rec = {"family": family, "dtype": dtype, "n": n, "K": K, "status": "not measured",
                   "reason": why}
            recs.append(rec)
            print(json.dumps(rec), flush=True)
    return recs, machine


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny n, few repeats: the code path in seconds")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write "
                    "(default results/glm_gpu.json; a quick run writes nothing without it)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 400; quick 300): later points are cut")
    ap.add_argument("--iters", type=int, default=None, help="EM iterations of a timed fit (default 20)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per point (default 5)")
    ap.add_argument("--table", type=Path, default=None, help="render the Markdown table of this "
                    "results JSON (to --md, default results/glm_gpu.md) and exit")
    ap.add_argument("--md", type=Path, default=None, help="Markdown file for --table")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        job = json.loads(args.worker)
        worker([tuple(p) for p in job["points"]], job["iters"], job["repeats"], job["deadline"],
               job["code"])
        return {}
    if args.table is not None:
        result = json.loads(args.table.read_text())
        md = args.md or RESULTS / f"{NAME}.md"
        write_text(md, markdown(result))
        print(f"written: {md}")
        return result
    args.iters = args.iters or (3 if args.quick else 20)
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.iters < 2:
        ap.error("--iters must be at least 2 (the marginal cost is against a fit of 1)")
    budget = args.budget or (300.0 if args.quick else 400.0)
    t0 = time.time()
    end = t0 + budget
    code = gf.code_state()
    groups = plan(args.quick)
    rows, machines = [], {}
    for i, group in enumerate(groups):
        # the first group (float32 at 1e5 and 1e6) leaves a fifth of the budget to float64
        deadline = end - 0.2 * budget if i == 0 else end
        recs, machine = run_group(group, args, deadline, code)
        rows += recs
        if machine:
            machines[group["name"]] = machine
    if gf.code_state()["package_sha256"] != code["package_sha256"]:
        code["changed_during_run"] = True
        print("warning: conceptshift's sources changed while the benchmark ran", flush=True)
    machine = machines.get("float32") or next(iter(machines.values()), None)
    result = {"benchmark": NAME, "quick": args.quick, "machine": machine, "machines": machines,
              "code": code, "config": {"K": K, "n_features": 1, "n_classes_categorical": N_CLASSES,
                                       "reg": 0.0, "iters": args.iters, "repeats": args.repeats,
                                       "budget_s": budget, "start_shrink": START_SHRINK,
                                       "true_coef": TRUE_COEF, "true_weights": TRUE_WEIGHTS,
                                       "groups": [{k: g[k] for k in ("name", "x64", "points")}
                                                  for g in groups]},
              "rows": rows, "wall_s": time.time() - t0}
    if args.quick and args.out is None:  # a quick run never replaces the committed figures
        print("quick run: nothing written (pass --out FILE to keep its JSON)")
        return result
    from conceptshift.files import write_json_atomic

    out = args.out or RESULTS / f"{NAME}.json"
    write_json_atomic(out, result)
    print(f"written: {out}")
    if args.out is None:
        write_text(RESULTS / f"{NAME}.md", markdown(result))
        print(f"written: {RESULTS / f'{NAME}.md'}")
    return result


# ---------------------------------------------------------------------------------- reporting
def write_text(path: Path, text: str) -> None:
    from conceptshift.files import write_atomic

    write_atomic(path, text)


def cpu_comparison(result: dict) -> str:
    """One sentence: the Poisson figures at n = 1e5 against the committed CPU figures of
    ``results/glm_flexmix.json`` (only what both runs measured)."""
    path = RESULTS / "glm_flexmix.json"
    if not path.is_file():
        return ""
    cpu = json.loads(path.read_text())
    cores = (cpu.get("machine") or {}).get("cpu_count")
    parts = []
    for dtype, key in (("float64", "conceptshift_f64"), ("float32", "conceptshift_f32")):
        ours = [r for r in result["rows"] if r["family"] == "poisson" and r["dtype"] == dtype
                and r["n"] == cpu.get("n") and r["status"] == "measured"]
        theirs = (cpu.get(key) or {}).get("fixed")
        if ours and theirs:
            g, c = ours[0]["ms_per_iter_median"], theirs["ms_per_iter_median"]
            parts.append(f"{dtype} {g:.2f} ms against {c:.1f} ms ({c / g:.1f}x)")
    if not parts:
        return ""
    return (f"Against the committed CPU figures of `glm_flexmix` (same family, K and n = "
            f"{cpu['n']:,}; its own draw and start, {cpu.get('iters')}-iteration fits, "
            f"{cores} CPU cores): Poisson per iteration " + "; ".join(parts) + ".")


def markdown(result: dict) -> str:
    m = result.get("machine") or {}
    cfg = result["config"]
    code = result.get("code") or {}
    dev = m.get("device_kind", "unknown device")
    lines = [
        f"## Generalized-linear mixtures on {dev} (`{NAME}`)",
        "",
        f"K = {cfg['K']} experts on one covariate (y ~ 1 + x), reg = 0, categorical with "
        f"C = {cfg['n_classes_categorical']} classes; `fit_em` from a fixed start, tol = 0, a fit of "
        f"{cfg['iters']} iterations over {cfg['iters']} (compile apart; median and best of "
        f"{cfg['repeats']} repeats), and the marginal cost (fit of {cfg['iters']} less fit of 1, "
        f"over {cfg['iters'] - 1}). Device {dev} ({m.get('backend', '?')}), jax "
        f"{(m.get('versions') or {}).get('jax', '?')}"
        + (f", commit {code['commit'][:7]}" if code.get("commit") else "")
        + (" with uncommitted changes to the package" if code.get("package_modified") else "")
        + ".",
        "",
        "| family | dtype | n | ms/iter (median) | ms/iter (best) | marginal ms/iter |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r["status"] == "measured":
            lines.append(f"| {r['family']} | {r['dtype']} | {r['n']:,} | {r['ms_per_iter_median']:.2f} | "
                         f"{r['ms_per_iter_best']:.2f} | {r['marginal_ms_per_iter_median']:.2f} |")
        else:
            lines.append(f"| {r['family']} | {r['dtype']} | {r['n']:,} | not measured | - | - |")
    cmp = cpu_comparison(result)
    if cmp:
        lines += ["", cmp]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

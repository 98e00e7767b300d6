"""Mixture of Poisson regressions (K = 3, y ~ 1 + x) against R's flexmix: time per EM iteration on the
same data from the same start, and the optimum each reaches.

Data: n rows (default 1e5, fixed seed), x ~ N(0, 1), component z ~ (0.3, 0.4, 0.3), y ~ Poisson(
exp(a_z + b_z x)) with (a, b) = (1.0, 0.5), (2.0, -0.3), (0.2, 1.0). The start is a hard assignment
(the true label, replaced by a uniformly random one for half the rows), written with the data to a
CSV that both programs read: flexmix gets it as ``cluster`` (its first M-step fits one Poisson GLM
per cluster), conceptshift as ``init_params`` = the same per-cluster maximum-likelihood fits
(Newton's method to convergence) and the clusters' proportions. So both EMs start at the same point;
flexmix's ``iter`` counts that first M-step as an iteration, conceptshift's ``n_iter`` does not.

conceptshift: ``PoissonRegressionMixture(3, n_features=1, reg=0)`` (maximum likelihood, like
flexmix's ``FLXMRglm``), ``fit_em`` with ``init_params`` (one run), in float64 (the optimum
comparison) and float32, each in its own process (JAX_ENABLE_X64 is fixed when JAX starts). Per EM
iteration: (a) a fit of exactly ``--iters`` iterations (tol = 0) through the public ``fit_em``, its
time over ``--iters`` (compile apart: one warm-up call, then the median of repeats); (b) the
marginal cost, (fit of 1 + iters - fit of 1) / iters, timed alternately, which leaves out the
per-call work (validation, the final log-likelihood). flexmix: the same two figures from
``glm_flexmix.R`` (a fit of ``iter.max = iters`` with tolerance 0; and against ``iter.max = 1``).
One EM iteration is not the same work in both: flexmix's M-step runs ``glm.fit`` (IRLS, warm
started) to its convergence per component, conceptshift's takes 3 safeguarded Newton steps (a
generalized EM); both climb to the same optimum, compared by a fit to convergence from the start
(flexmix ``tolerance`` 1e-10 on |dllh| / (|llh| + 0.1); conceptshift ``tol`` set to the same
threshold in nats: tol * (|objective| + n) = 1e-10 * |llh at the start|).

Without Rscript the flexmix figures are taken from the committed results JSON, if any (said so in
the output). Results: ``benchmarks/results/glm_flexmix.json``; a full run also writes
``results/glm_flexmix.md`` and regenerates ``benchmarks/README.md``, which includes it.

Usage: python benchmarks/glm_flexmix.py [--n N] [--iters 20] [--repeats 5] [--smoke] [--no-r]
       [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
R_SCRIPT = HERE / "glm_flexmix.R"
NAME = "glm_flexmix"

K = 3
TRUE_COEF = ((1.0, 0.5), (2.0, -0.3), (0.2, 1.0))  # (intercept, slope) per component
TRUE_WEIGHTS = (0.3, 0.4, 0.3)
R_TOL = 1e-10  # flexmix's tolerance on |dllh| / (|llh| + 0.1)


def simulate(n: int, seed: int = 0):
    """x (n,), y (n,) counts, z (n,) true labels, start (n,) initial hard labels (0-based)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    z = rng.choice(K, size=n, p=TRUE_WEIGHTS)
    coef = np.asarray(TRUE_COEF)
    y = rng.poisson(np.exp(coef[z, 0] + coef[z, 1] * x)).astype(np.float64)
    start = np.where(rng.random(n) < 0.5, rng.integers(0, K, n), z)
    return x, y, z, start


FIXED_LONG = 450  # iterations of the tol = 0 fit scored in float64 (the float64 fit converges in ~410)


def exact_loglik(x, y, params) -> float:
    """sum_n log sum_k pi_k Poisson(y_n; exp(a_k + b_k x_n)), in float64 numpy from the parameters."""
    from scipy.special import gammaln, logsumexp

    coef = np.asarray(params.coef, np.float64)[:, 0, 0]  # (K, 2)
    lw = np.asarray(params.log_weights, np.float64)
    lw = lw - logsumexp(lw)
    eta = coef[None, :, 0] + coef[None, :, 1] * x[:, None]
    lp = y[:, None] * eta - np.exp(eta) - gammaln(y + 1)[:, None]
    return float(np.sum(logsumexp(lw[None] + lp, axis=1)))


def write_csv(path: Path, x, y, start) -> None:
    """Columns x (17 significant digits: both programs read the same float64 values), y, start
    (1-based, as R's cluster argument takes it)."""
    with open(path, "w") as f:
        f.write("x,y,start\n")
        for xi, yi, si in zip(x.tolist(), y.astype(np.int64).tolist(), (start + 1).tolist(),
                              strict=True):
            f.write(f"{xi:.17g},{yi},{si}\n")


def read_csv(path: Path):
    d = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return d[:, 0], d[:, 1], d[:, 2].astype(np.int64) - 1


# ---------------------------------------------------------------------------------------- R side
def rscript() -> str | None:
    return shutil.which("Rscript")


def run_r(csv: Path, out: Path, iters: int, max_iter: int, repeats: int) -> dict:
    cmd = [rscript(), str(R_SCRIPT), str(csv), str(out), str(K), str(iters), repr(R_TOL),
           str(max_iter), str(repeats)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------ conceptshift side
def worker(csv: Path, iters: int, max_iter: int, repeats: int, full_repeats: int) -> dict:
    """conceptshift's timings and fits in this process's precision (JAX_ENABLE_X64 as set)."""
    sys.path.insert(0, str(HERE))
    import _harness as h
    import jax
    import jax.numpy as jnp

    from conceptshift.inference import fit_em
    from conceptshift.models.batch import Batch
    from conceptshift.models.glm import GLMParams, PoissonRegressionMixture

    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    xs, ys, start = read_csv(csv)
    n = xs.shape[0]
    x = jnp.asarray(xs[:, None], dtype)
    y = jnp.asarray(ys[:, None], dtype)
    model = PoissonRegressionMixture(n_components=K, n_features=1, n_heads=1, reg=0.0)

    # the start: each cluster's Poisson GLM fitted to convergence (what flexmix's first M-step
    # does), the clusters' proportions
    r0 = jax.nn.one_hot(jnp.asarray(start), K, dtype=dtype)
    batch = Batch(x, y, jnp.ones((n,), dtype))
    glm = PoissonRegressionMixture(n_components=K, n_features=1, n_heads=1, reg=0.0, newton_steps=60)
    zero = GLMParams(jnp.zeros((K,), dtype), jnp.zeros((K, 1, 1, 2), dtype))
    p0 = jax.jit(glm.m_step)(zero, batch, r0)
    ll0 = float(model.batch_log_likelihood(p0, batch))
    # conceptshift's rule |d objective| <= tol (|objective| + n) at flexmix's threshold in nats
    tol = R_TOL * abs(ll0) / (abs(ll0) + n)
    key = jax.random.key(0)

    def fit(max_it, tol_):
        res = fit_em(model, key, x, y, restarts=1, max_iter=max_it, tol=tol_, init_params=p0)
        jax.block_until_ready(res.params)
        return res

    out = {"dtype": str(np.dtype(dtype)), "n": n, "K": K, "loglik_start": ll0,
           "start_coef": np.asarray(p0.coef)[:, 0, 0].tolist(),
           "start_weights": np.asarray(p0.weights).tolist()}

    # (b) the fit to convergence from the start
    t0 = time.perf_counter()
    res = fit(max_iter, tol)
    compile_and_first = time.perf_counter() - t0
    times = []
    for _ in range(full_repeats):
        t0 = time.perf_counter()
        res = fit(max_iter, tol)
        times.append(time.perf_counter() - t0)
    n_iter = int(res.n_iter)
    out["fit"] = {"tol": tol, "max_iter": max_iter, "n_iter": n_iter, "converged": bool(res.converged),
                  "loglik": float(res.loglik), "coef": np.asarray(res.params.coef)[:, 0, 0].tolist(),
                  "weights": np.asarray(res.params.weights).tolist(),
                  "compile_and_first_s": compile_and_first, "seconds_median": statistics.median(times),
                  "seconds_min": min(times), "repeats": full_repeats,
                  "ms_per_iter": 1e3 * statistics.median(times) / max(n_iter, 1)}

    # (c) as many iterations as the float64 fit needs, at tol = 0, the log-likelihood of the result
    # evaluated in float64 (numpy): where the working precision's own rounding leaves the fit
    n_long = FIXED_LONG
    res = fit(n_long, 0.0)
    out["fit_fixed"] = {"iterations": n_long, "loglik": float(res.loglik),
                        "loglik_float64": exact_loglik(xs, ys, res.params)}

    # (a) exactly `iters` iterations (tol = 0), and the marginal cost against a fit of one
    fns = {k: (lambda k=k: fit(k, 0.0)) for k in (1, 1 + iters, iters)}
    compile_s = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        r = fn()  # compile and warm up
        compile_s[k] = time.perf_counter() - t0
        if int(r.n_iter) != k:
            raise RuntimeError(f"the fit ran {int(r.n_iter)} EM iterations, not {k}")
    total, marginal = [], []
    for _ in range(repeats):
        t = {}
        for k in (1, 1 + iters, iters):
            t0 = time.perf_counter()
            fns[k]()
            t[k] = time.perf_counter() - t0
        total.append(t[iters] / iters)
        marginal.append((t[1 + iters] - t[1]) / iters)
    out["fixed"] = {"iterations": iters, "repeats": repeats,
                    "ms_per_iter_median": 1e3 * statistics.median(total),
                    "ms_per_iter_min": 1e3 * min(total),
                    "marginal_ms_per_iter_median": 1e3 * statistics.median(marginal),
                    "marginal_ms_per_iter_min": 1e3 * min(marginal),
                    "compile_s": compile_s[iters],
                    "loglik": float(fit(iters, 0.0).loglik)}

    # where an iteration's time goes: the E-step (component log-densities, responsibilities,
    # log-likelihood) and the M-step (proportions; newton_steps safeguarded Newton steps per
    # component), each compiled alone, at the start
    def e_step(p, b):
        clp = model.batch_component_log_probs(p, b)
        ll = jax.scipy.special.logsumexp(clp, axis=-1)
        return jnp.exp(clp - ll[:, None]), jnp.sum(b.w * ll)

    r, _ = jax.jit(e_step)(p0, batch)
    e_t = h.time_jitted(e_step, (p0, batch), repeats)
    m_t = h.time_jitted(model.m_step, (p0, batch, r), repeats)
    out["breakdown"] = {"e_step_ms": 1e3 * e_t["median_s"], "m_step_ms": 1e3 * m_t["median_s"],
                        "newton_steps": model.newton_steps}
    out["machine"] = h.machine()
    return out


def run_worker(csv: Path, x64: bool, args) -> dict:
    env = dict(os.environ, JAX_ENABLE_X64="1" if x64 else "0")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(csv),
           "--iters", str(args.iters), "--max-iter", str(args.max_iter),
           "--repeats", str(args.repeats), "--full-repeats", str(args.full_repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"the conceptshift worker (JAX_ENABLE_X64={int(x64)}) failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- reporting
def code_state() -> dict:
    """Which conceptshift was measured: the checkout's commit, whether the package differs from it
    (read-only git commands), and a digest of the package's Python sources as they were read."""
    import hashlib

    root = HERE.parent
    digest = hashlib.sha256()
    for f in sorted((root / "conceptshift").rglob("*.py")):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    state = {"package_sha256": digest.hexdigest()[:16]}
    try:
        git = ["git", "-C", str(root)]
        state["commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                         check=True).stdout.strip()
        state["package_modified"] = subprocess.run(
            git + ["diff", "--quiet", "HEAD", "--", "conceptshift"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        pass
    return state


def match(ours: list, theirs: list) -> tuple[int, ...]:
    """The permutation p minimising sum_k |ours[p[k]] - theirs[k]|^2 (K! candidates)."""
    a, b = np.asarray(ours), np.asarray(theirs)
    return min(itertools.permutations(range(len(a))), key=lambda p: float(np.sum((a[list(p)] - b) ** 2)))


def compare(cs: dict, fm: dict) -> dict:
    """conceptshift's float64 fit against flexmix's: log-likelihood and parameters, matched."""
    ours, theirs = cs["fit"], fm["fit"]
    perm = match(ours["coef"], theirs["coef"])
    coef = np.asarray(ours["coef"])[list(perm)]
    w = np.asarray(ours["weights"])[list(perm)]
    return {"loglik_conceptshift": ours["loglik"], "loglik_flexmix": theirs["loglik"],
            "loglik_diff": ours["loglik"] - theirs["loglik"],
            "loglik_diff_per_row": (ours["loglik"] - theirs["loglik"]) / cs["n"],
            "permutation": list(perm),
            "coef_max_abs_diff": float(np.max(np.abs(coef - np.asarray(theirs["coef"])))),
            "weights_max_abs_diff": float(np.max(np.abs(w - np.asarray(theirs["prior"])))),
            "loglik_at_start_conceptshift": cs["loglik_start"]}


def code_line(code: dict | None) -> str:
    if not code or "commit" not in code:
        return ""
    return (f" Measured at commit {code['commit'][:7]}"
            + (" with uncommitted changes to the package" if code.get("package_modified") else "")
            + f" (sources {code['package_sha256']})"
            + ("; the sources changed during the run" if code.get("changed_during_run") else "") + ".")


def markdown(result: dict) -> str:
    f64, f32, fm, cmp = result["conceptshift_f64"], result.get("conceptshift_f32"), \
        result.get("flexmix"), result.get("agreement")
    m = f64["machine"]
    fx = fm["fixed"] if fm else None
    src = "" if not fm or not result.get("flexmix_reused") else \
        " (flexmix's figures reused from an earlier run: Rscript was absent)"
    lines = [
        "## Mixture of Poisson regressions against R's flexmix (`glm_flexmix`)",
        "",
        f"K = {K} Poisson regressions y ~ 1 + x (log link), n = {result['n']:,} simulated rows, the same "
        "CSV and the same hard-assignment start for both (flexmix's `cluster`; for conceptshift the "
        "per-cluster GLM fits as `init_params`). conceptshift: `PoissonRegressionMixture(3, reg=0)`, "
        "`fit_em`; flexmix: `FLXMRglm(family = \"poisson\")`, `minprior = 0`. Per iteration: a fit of "
        f"exactly {result['iters']} iterations over {result['iters']} (compile apart), and the "
        "marginal cost (a fit of 1 + its iterations less a fit of 1); medians and bests of repeats. "
        "flexmix's M-step runs `glm.fit` "
        "(IRLS) to convergence per component, conceptshift's takes 3 safeguarded Newton steps; both "
        f"run to the same optimum (below). Machine: {m['cpu']} ({m['cpu_count']} cores), "
        f"{m['backend']}; jax {m['versions'].get('jax')}"
        + (f"; {fm['versions']['R']}, flexmix {fm['versions']['flexmix']}" if fm else "") + src + "."
        + code_line(result.get("code")),
        "",
        "| implementation | dtype | ms / iteration (median) | best | marginal (median) "
        "| flexmix / this (medians) | flexmix / this (best) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def ratio(c, key):
        return f"{fx[key] / c[key]:.1f}x" if fx else "-"

    for cs in (f64, f32):
        if cs:
            c = cs["fixed"]
            lines.append(f"| conceptshift | {cs['dtype']} | {c['ms_per_iter_median']:.2f} | "
                         f"{c['ms_per_iter_min']:.2f} | {c['marginal_ms_per_iter_median']:.2f} | "
                         f"{ratio(c, 'ms_per_iter_median')} | {ratio(c, 'ms_per_iter_min')} |")
    if fx:
        lines.append(f"| flexmix | float64 | {fx['ms_per_iter_median']:.1f} | {fx['ms_per_iter_min']:.1f} "
                     f"| {fx['marginal_ms_per_iter_median']:.1f} | 1.0x | 1.0x |")
    lines.append("")
    bd = f64.get("breakdown")
    if bd:
        lines += [f"conceptshift's iteration in float64, its two halves compiled alone: E-step "
                  f"{bd['e_step_ms']:.2f} ms, M-step {bd['m_step_ms']:.2f} ms ({bd['newton_steps']} "
                  "safeguarded Newton steps per component).", ""]
    if fm and cmp:
        a, b = f64["fit"], fm["fit"]
        lines += [
            "Fit to convergence from the start (float64; flexmix tolerance 1e-10, conceptshift's tol at "
            "the same threshold in nats):",
            "",
            "| implementation | iterations | time (s) | log-likelihood |",
            "|---|---:|---:|---:|",
            f"| conceptshift, float64 | {a['n_iter']} | {a['seconds_median']:.2f} | {a['loglik']:.4f} |",
        ]
        if f32:
            c = f32["fit"]
            lines.append(f"| conceptshift, float32 | {c['n_iter']} | {c['seconds_median']:.2f} | "
                         f"{c['loglik']:.4f} |")
        lines += [
            f"| flexmix | {b['iter']} | {b['seconds']:.2f} | {b['loglik']:.4f} |",
            "",
            f"Difference {cmp['loglik_diff']:+.2e} nats (conceptshift - flexmix); coefficients agree "
            f"to {cmp['coef_max_abs_diff']:.1e}, proportions to {cmp['weights_max_abs_diff']:.1e} "
            "(components matched). flexmix's iteration count includes its first M-step from the "
            "start, conceptshift's does not.",
        ]
        if f32 and f32["fit"]["loglik"] < a["loglik"] - 1e-2:
            c = f32["fit"]
            lines += ["", f"In float32 conceptshift stops {a['loglik'] - c['loglik']:.2f} nats short of "
                      f"the optimum, after {c['n_iter']} iterations: this EM climbs slowly (about 0.06 "
                      "nats per iteration there, in float64), which is within the rounding of a float32 "
                      "sum of n log-densities near 2.4e5, and a change that rounds to zero, or a fall "
                      "within 8 ulps of (|objective| + n), counts as converged (`em_loop`)."]
        fixed = [cs for cs in (f64, f32) if cs and "fit_fixed" in cs]

        def rel(cs):
            return abs(cs["fit_fixed"]["loglik_float64"] - b["loglik"]) / abs(b["loglik"])
        if fixed:
            lines += ["", f"Run for a fixed {fixed[0]['fit_fixed']['iterations']} iterations (tol = 0) "
                      "and scored exactly (the log-likelihood of the fitted parameters evaluated in "
                      "float64 with numpy): "
                      + "; ".join(f"{cs['dtype']} {cs['fit_fixed']['loglik_float64']:.4f}, "
                                  f"{cs['fit_fixed']['loglik_float64'] - b['loglik']:+.2e} nats from "
                                  "flexmix's optimum" for cs in fixed)
                      + " (relative to the log-likelihood: "
                      + "; ".join(f"{cs['dtype']} {rel(cs):.1e}" for cs in fixed)
                      + f"; float32's machine epsilon is {np.finfo(np.float32).eps:.1e})."]
    return "\n".join(lines) + "\n"


def write_readme() -> None:
    """Regenerates benchmarks/README.md (it includes results/*.md) as em_iteration.py --readme."""
    sys.path.insert(0, str(HERE))
    import _report

    path = RESULTS / "em_iteration.json"
    if path.is_file():
        _report.write_readme(json.loads(path.read_text()), HERE / "README.md")
        print(f"regenerated: {HERE / 'README.md'}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e5, help="rows (default 1e5)")
    ap.add_argument("--iters", type=int, default=20, help="iterations of the fixed-length fits")
    ap.add_argument("--max-iter", type=int, default=2000, help="cap of the fits to convergence")
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats of the fixed-length fits")
    ap.add_argument("--full-repeats", type=int, default=1, help="timed repeats of conceptshift's fit "
                    "to convergence")
    ap.add_argument("--r-repeats", type=int, default=5, help="timed repeats of flexmix's fixed fits")
    ap.add_argument("--smoke", "--quick", action="store_true",
                    help="n = 2000, few iterations, no R: the code path in seconds")
    ap.add_argument("--no-r", action="store_true", help="do not run R (reuse committed figures)")
    ap.add_argument("--no-f32", action="store_true", help="skip the float32 timings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        res = worker(args.worker, args.iters, args.max_iter, args.repeats, args.full_repeats)
        print(json.dumps(res))
        return res
    if args.smoke:
        args.n, args.iters, args.max_iter, args.repeats, args.full_repeats = 2000, 3, 200, 2, 1
        args.no_r = True
    n = int(args.n)
    t0 = time.perf_counter()
    code = code_state()
    x, y, _, start = simulate(n, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "data.csv"
        write_csv(csv, x, y, start)
        f64 = run_worker(csv, True, args)
        print(json.dumps({"conceptshift_f64": f64["fixed"], "fit": f64["fit"]["loglik"]}), flush=True)
        f32 = None if args.no_f32 else run_worker(csv, False, args)
        if f32:
            print(json.dumps({"conceptshift_f32": f32["fixed"]}), flush=True)
        if code_state()["package_sha256"] != code["package_sha256"]:
            code["changed_during_run"] = True
            print("warning: conceptshift's sources changed while the benchmark ran", flush=True)
        fm, reused = None, False
        if not args.no_r and rscript():
            fm = run_r(csv, Path(tmp) / "flexmix.json", args.iters, args.max_iter, args.r_repeats)
            print(json.dumps({"flexmix": fm["fixed"], "fit": fm["fit"]["loglik"]}), flush=True)
        elif not args.smoke:
            why = "--no-r" if args.no_r else "Rscript not found"
            old = RESULTS / f"{NAME}.json"
            if old.is_file():
                prev = json.loads(old.read_text())
                if prev.get("flexmix") and prev.get("n") == n and prev.get("seed") == args.seed:
                    fm, reused = prev["flexmix"], True
            print(f"{why}: flexmix " + ("figures reused from " + str(old) if reused else
                                         "not measured (no earlier run of this size)"), flush=True)
    result = {"benchmark": NAME, "n": n, "K": K, "seed": args.seed, "iters": args.iters,
              "smoke": args.smoke, "true_coef": TRUE_COEF, "true_weights": TRUE_WEIGHTS,
              "machine": f64["machine"], "code": code, "conceptshift_f64": f64, "conceptshift_f32": f32,
              "flexmix": fm, "flexmix_reused": reused, "r_tolerance": R_TOL}
    if fm:
        fx = fm["fixed"]
        result["ratio"] = {f"flexmix_over_conceptshift_{c['dtype']}":
                           fx["ms_per_iter_median"] / c["fixed"]["ms_per_iter_median"]
                           for c in (f64, f32) if c}
        result["ratio_marginal"] = {f"flexmix_over_conceptshift_{c['dtype']}":
                                    fx["marginal_ms_per_iter_median"]
                                    / c["fixed"]["marginal_ms_per_iter_median"]
                                    for c in (f64, f32) if c}
        result["agreement"] = compare(f64, fm)
        print(json.dumps({"ratio": result["ratio"], "agreement": result["agreement"]}), flush=True)
    result["wall_s"] = time.perf_counter() - t0
    from conceptshift.files import write_json_atomic

    if args.smoke and args.out is None:  # a smoke run never replaces the committed figures
        print("smoke run: nothing written (pass --out FILE to keep its JSON)")
        return result
    out = args.out or RESULTS / f"{NAME}.json"
    write_json_atomic(out, result)  # a temporary file, then os.replace
    print(f"written: {out}")
    if args.out is None and not args.smoke:
        from conceptshift.files import write_atomic

        write_atomic(RESULTS / f"{NAME}.md", markdown(result))
        write_readme()
    return result


if __name__ == "__main__":
    main()

"""EM iteration time of the compiled families against scikit-learn, a plain NumPy EM and the roofline.

A full-covariance Gaussian-gated mixture of experts with D covariates and one response is the same
model as a full-covariance Gaussian mixture of (x, y) in D + 1 dimensions, so the comparison with
scikit-learn's GaussianMixture (float64, its own E- and M-step) and with a plain NumPy EM (float32,
one Cholesky solve per component, as textbooks write it) is like for like. Both start from the same
parameters as the gated family, and the log-likelihoods after the same number of iterations are
compared in the same run.

Sweeps: n (1e3 .. 1e7) at K = 4, D = 8; K (2 .. 64) at n = 1e5, D = 8; D (1 .. 128) at n = 1e5,
K = 4. Each EM iteration of our families is also reported as a multiple of the roofline
max(bytes / bandwidth, flops / peak), with the machine's read bandwidth and GEMM throughput
measured in the same run (see ``_harness.roofline``) and the flop count of the fused E-step and
statistics kernel (``kernel_flops``).

Usage: python benchmarks/em_iteration.py [--quick] [--out FILE] [--only n,K,D] [--no-check]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402
import _report  # noqa: E402

from conceptshift.inference.em import _run_em  # noqa: E402
from conceptshift.models import GatedExperts, RegressionMixture  # noqa: E402

SKLEARN, NUMPY, XLA_GATED = _report.SKLEARN, _report.NUMPY, _report.XLA_GATED


def kernel_flops(model, n: int) -> float:
    """Arithmetic of one EM iteration's fused kernel (the M-step is O(K P^3), negligible):
    gate and expert rows (2 K (G + H) P), squared residuals, responsibilities, the design's column
    products and their reduction against r, and the residual statistics."""
    K, P, H = model.n_components, model.n_coef, model.n_heads
    G = model.n_features if model.models_x else 0  # Gaussian gates: D whitened rows
    per = 2 * K * (G + H) * P + 2 * K * G + 3 * K * H + 6 * K
    # the compiled CPU kernel always forms S_pp from the column products
    kernel = jax.default_backend() == "cpu" and model.cpu_kernel_applies(np.float32)
    if model.pair_products(K, P) or kernel:
        per += P * (P + 1) // 2 + K * P * (P + 1)
    else:
        per += K * P + 2 * K * P * P
    per += 3 * K * H + 2 * K * H * P
    return float(n) * per


def make_data(n: int, K: int, D: int, seed: int = 0, dtype=np.float32):
    """Clusters in x with one linear expert each; the true labels give the starting point."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, K, n)
    centres = 3.0 * rng.normal(size=(K, D))
    x = centres[z] + rng.normal(size=(n, D))
    slopes = rng.normal(size=(K, D)) / np.sqrt(D)
    y = (np.einsum("nd,nd->n", x, slopes[z]) + 2.0 * rng.normal(size=K)[z]
         + 0.5 * rng.normal(size=n))[:, None]
    return x.astype(dtype), y.astype(dtype), z


def start(model, x, y, z):
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    w = jnp.ones((x.shape[0],), xj.dtype)
    r0 = jax.nn.one_hot(jnp.asarray(z), model.n_components, dtype=xj.dtype)
    stats = model.data_stats(xj, yj, w)
    return xj, yj, w, model.m_step(xj, yj, r0, stats)


def em_fn(model, n_iter: int, with_iterations: bool = False):
    """A fit of exactly ``n_iter`` EM iterations (tol = 0 disables the stopping rule)."""
    def run(x, y, w, p):
        backend = model.estep_backend(x.dtype, jax.default_backend())  # as fit_em decides it
        out = _run_em(model, x, y, w, model.data_stats(x, y, w), p, jnp.asarray(0.0, x.dtype), n_iter,
                      backend=backend)
        return (out.loglik, out.params, out.n_iter) if with_iterations else (out.loglik, out.params)
    return run


def bench_family(model, x, y, z, n_iter, repeats, roof) -> dict:
    xj, yj, w, p0 = start(model, x, y, z)

    def all_ran(k, out):  # the times are per iteration: every one of them must have run
        if int(out[2]) != k:
            raise RuntimeError(f"{type(model).__name__} ran {int(out[2])} EM iterations, not {k}")

    # the marginal cost of an iteration, like the references' loops (which have no set-up)
    t = h.time_marginal(lambda k: em_fn(model, k, True), (xj, yj, w, p0), 1, 1 + n_iter, repeats,
                        check=all_ran)
    n = x.shape[0]
    nbytes = n * (x.shape[1] + y.shape[1] + 1) * x.itemsize  # x, y and the weights, read once
    return {"family": type(model).__name__, "n": n, "K": model.n_components, "D": x.shape[1],
            "dtype": str(x.dtype), "n_iter": n_iter, **t,
            **h.roofline_multiple(t["median_s"], kernel_flops(model, n), nbytes, roof)}


def joint_gaussians(params):
    """The gated family's parameters (one response, linear experts) as a Gaussian mixture of (x, y)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    b0, b = p.coef[:, 0, 0], p.coef[:, 0, 1:]  # (K,), (K, D)
    S = p.gate_cov
    Sb = np.einsum("kij,kj->ki", S, b)
    s2 = np.exp(2 * p.log_scale[:, 0])
    K, D = b.shape
    cov = np.zeros((K, D + 1, D + 1))
    cov[:, :D, :D] = S
    cov[:, :D, D] = cov[:, D, :D] = Sb
    cov[:, D, D] = s2 + np.einsum("kd,kd->k", b, Sb)
    mean = np.concatenate([p.gate_mean, (b0 + np.einsum("kd,kd->k", b, p.gate_mean))[:, None]], 1)
    return np.exp(p.log_weights), mean, cov


def sklearn_model(weights, means, covs):
    from sklearn.mixture import GaussianMixture
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    gm = GaussianMixture(len(weights), covariance_type="full", reg_covar=0.0)
    gm.weights_, gm.means_, gm.covariances_ = weights.copy(), means.copy(), covs.copy()
    gm.precisions_cholesky_ = _compute_precision_cholesky(covs, "full")
    return gm


def bench_sklearn(X, start_params, n_iter, repeats) -> dict:
    gm = sklearn_model(*start_params)

    def iterate():
        for _ in range(n_iter):
            _, log_resp = gm._e_step(X)
            gm._m_step(X, log_resp)

    t = h.time_python(iterate, repeats, per=n_iter)
    return {"family": SKLEARN, "n": X.shape[0], "K": len(start_params[0]), "D": X.shape[1] - 1,
            "dtype": str(X.dtype), "n_iter": n_iter, **t}


def numpy_em_iteration(X, weights, means, covs):
    """One EM iteration of a full-covariance Gaussian mixture in plain NumPy (float32): the E-step
    through one Cholesky factor per component, the M-step from weighted moments."""
    n, d = X.shape
    K = len(weights)
    logp = np.empty((n, K), X.dtype)
    for k in range(K):
        L = np.linalg.cholesky(covs[k])
        zk = np.linalg.solve(L, (X - means[k]).T)  # (d, n)
        logp[:, k] = (np.log(weights[k]) - np.log(np.diag(L)).sum() - 0.5 * d * np.log(2 * np.pi)
                      - 0.5 * np.einsum("dn,dn->n", zk, zk))
    m = logp.max(1, keepdims=True)
    ll = m[:, 0] + np.log(np.exp(logp - m).sum(1))
    r = np.exp(logp - ll[:, None])
    nk = r.sum(0)
    means = (r.T @ X) / nk[:, None]
    covs = np.stack([((X - means[k]).T * r[:, k]) @ (X - means[k]) / nk[k] for k in range(K)])
    return nk / n, means, covs, float(ll.sum())


def bench_numpy(X, start_params, n_iter, repeats) -> dict:
    X = X.astype(np.float32)
    p = tuple(a.astype(np.float32) for a in start_params)

    def iterate():
        q = p
        for _ in range(n_iter):
            q = numpy_em_iteration(X, *q)[:3]

    t = h.time_python(iterate, repeats, per=n_iter)
    return {"family": NUMPY, "n": X.shape[0], "K": len(p[0]), "D": X.shape[1] - 1,
            "dtype": "float32", "n_iter": n_iter, **t}


def loglik_agreement(n, K, D, n_iter, seed=0, precision=None) -> dict:
    """Gated family and scikit-learn from the same parameters: mean log-likelihood after n_iter
    EM iterations (both exact EM on the same model; ours carries the reg = 1e-6 prior).
    ``precision``: run our EM with its matrix products at this ``jax.lax.Precision`` instead of
    HIGHEST (to show what TF32 would cost on a GPU)."""
    from conceptshift import _precision

    x, y, z = make_data(n, K, D, seed)
    model = GatedExperts(K, n_features=D)
    xj, yj, w, p0 = start(model, x, y, z)
    saved = _precision.HIGHEST
    try:
        if precision is not None:
            _precision.HIGHEST = precision
        ll, params = jax.jit(em_fn(model, n_iter))(xj, yj, w, p0)
    finally:
        _precision.HIGHEST = saved
    X = np.concatenate([x, y], 1).astype(np.float64)
    gm = sklearn_model(*joint_gaussians(p0))
    for _ in range(n_iter):
        _, log_resp = gm._e_step(X)
        gm._m_step(X, log_resp)
    ours = float(ll) / n
    theirs = float(gm.score(X))
    at_ours = float(sklearn_model(*joint_gaussians(params)).score(X))
    return {"n": n, "K": K, "D": D, "n_iter": n_iter, "ours_mean_loglik": ours,
            "sklearn_mean_loglik": theirs, "sklearn_at_our_params": at_ours,
            "abs_diff_per_sample": abs(ours - theirs), "dtype_ours": str(x.dtype),
            "precision": str(precision or "HIGHEST")}


def _run_point(n, K, D, *, n_iter, repeats, roof, sklearn=True, numpy=True, xla=False,
               seed=0) -> list[dict]:
    """Both families at one size; ``xla``: the gated family again with the compiled CPU kernel
    turned off (the XLA formulation: the before/after comparison)."""
    from conceptshift import _kernels

    x, y, z = make_data(n, K, D, seed)
    rows = []
    models = [(RegressionMixture(K, n_features=D), None), (GatedExperts(K, n_features=D), None)]
    if xla and jax.default_backend() == "cpu" and _kernels.enabled():
        models.append((GatedExperts(K, n_features=D), XLA_GATED))
    for model, label in models:
        try:
            if label is None:
                rows.append(bench_family(model, x, y, z, n_iter, repeats, roof))
            else:
                with _kernels.use_cpu_kernel(False):
                    rows.append(dict(bench_family(model, x, y, z, n_iter, repeats, roof), family=label))
        except jax.errors.JaxRuntimeError as err:  # a size past the device's memory: say so, go on
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            rows.append({"family": type(model).__name__, "n": n, "K": K, "D": D,
                         "error": "out of memory"})
        print(json.dumps(rows[-1]), flush=True)
    if sklearn or numpy:
        X = np.concatenate([x, y], 1).astype(np.float64)
        model = GatedExperts(K, n_features=D)
        sp = joint_gaussians(start(model, x, y, z)[3])
        # the reference implementations get fewer iterations where one takes seconds
        few = max(1, min(n_iter, int(3e6 * 81 // max(n * K * (D + 1) ** 2, 1))))
        if sklearn:
            rows.append(bench_sklearn(X, sp, few, max(2, repeats // 2)))
            print(json.dumps(rows[-1]), flush=True)
        if numpy:
            rows.append(bench_numpy(X, sp, few, max(2, repeats // 2)))
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["sweep_point"] = [n, K, D]
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (used by the test suite)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", default="n,K,D", help="which sweeps to run (comma-separated)")
    for axis in ("n", "K", "D"):
        ap.add_argument(f"--{axis}", default=None, help=f"comma-separated {axis} values of the {axis} sweep")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the agreement check against scikit-learn (a sweep run in pieces runs it once)")
    ap.add_argument("--readme", action="store_true",
                    help="only regenerate benchmarks/README.md from results/em_iteration.json")
    args = ap.parse_args(argv)
    if args.readme:
        result = json.loads((h.RESULTS / "em_iteration.json").read_text())
        _report.write_readme(result, h.HERE / "README.md")
        return result
    sweeps = set(args.only.split(","))
    accel = jax.default_backend() != "cpu"
    name = "em_iteration_gpu" if accel else "em_iteration"
    if args.quick:
        # one sweep point shared by the three sweeps (computed once): the code path, in seconds
        cfg = {"n": [300], "K": [2], "D": [1], "n_fixed": 300, "K_fixed": 2, "D_fixed": 1,
               "n_iter": 3, "repeats": 2, "check": (300, 2, 1, 3)}
    elif accel:
        # the references run on the host's CPU, only where they take seconds (n <= 1e6, n sweep)
        cfg = {"n": [10_000, 100_000, 1_000_000, 10_000_000, 30_000_000, 100_000_000],
               "K": [2, 4, 8, 16, 32, 64], "D": [1, 2, 4, 8, 16, 32, 64, 128],
               "n_fixed": 1_000_000, "K_fixed": 4, "D_fixed": 8, "n_iter": 10, "repeats": 5,
               "check": (1_000_000, 4, 8, 20), "reference_max_n": 1_000_000}
    else:
        cfg = {"n": [1_000, 10_000, 100_000, 1_000_000, 10_000_000], "K": [2, 4, 8, 16, 32, 64],
               "D": [1, 2, 4, 8, 16, 32, 64, 128], "n_fixed": 100_000, "K_fixed": 4, "D_fixed": 8,
               "n_iter": 10, "repeats": 5, "check": (1_000_000, 4, 8, 20)}
    for axis in ("n", "K", "D"):
        if getattr(args, axis):
            cfg[axis] = [int(float(v)) for v in getattr(args, axis).split(",")]
    t0 = time.perf_counter()
    roof = h.roofline(args.quick, big=accel)
    print(json.dumps(roof), flush=True)
    rows = []
    kw = {"n_iter": cfg["n_iter"], "repeats": cfg["repeats"], "roof": roof}
    done: dict[tuple, list[dict]] = {}

    def run_point(n, K, D, **kw):  # a point shared by two sweeps is measured once
        key = (n, K, D, kw.get("n_iter"), kw.get("repeats"))
        if key not in done:
            done[key] = _run_point(n, K, D, **kw)
        return done[key]

    ref_max = cfg.get("reference_max_n")
    refs = {} if ref_max is None else {"numpy": False}
    if "n" in sweeps:
        for n in cfg["n"]:
            big = n >= 10_000_000 and not accel
            rk = dict(refs, sklearn=ref_max is None or n <= ref_max) if accel else \
                {"sklearn": True, "numpy": not big, "xla": True}
            rows += [dict(r, sweep="n") for r in run_point(
                n, cfg["K_fixed"], cfg["D_fixed"], **rk,
                **dict(kw, repeats=3 if big else cfg["repeats"], n_iter=3 if big else cfg["n_iter"]))]
    no_refs = {"sklearn": False, "numpy": False} if accel else {}
    if "K" in sweeps:
        for K in cfg["K"]:
            rows += [dict(r, sweep="K") for r in run_point(cfg["n_fixed"], K, cfg["D_fixed"],
                                                           **no_refs, **kw)]
    if "D" in sweeps:
        for D in cfg["D"]:
            rows += [dict(r, sweep="D") for r in run_point(cfg["n_fixed"], cfg["K_fixed"], D,
                                                           **no_refs, **kw)]
    check = None if args.no_check else loglik_agreement(*cfg["check"])
    print(json.dumps(check), flush=True)
    checks_default = None
    if accel and not args.quick and not args.no_check:  # what the device's default (TF32) products would give
        checks_default = loglik_agreement(*cfg["check"], precision=jax.lax.Precision.DEFAULT)
        print(json.dumps(checks_default), flush=True)
    result = {"benchmark": "em_iteration", "machine": h.machine(), "roofline": roof,
              "config": {**{k: v for k, v in cfg.items() if k != "check"}, "check": list(cfg["check"]),
                         "quick": args.quick, "sweeps": sorted(sweeps)},
              "rows": rows, "sklearn_agreement": check,
              "sklearn_agreement_default_precision": checks_default,
              "wall_s": time.perf_counter() - t0}
    h.write(name, result, args.out)
    if not args.quick and args.out is None:
        if accel:
            _report.write_accel_table(result, h.RESULTS / "em_iteration_gpu.md")
        else:
            _report.write_readme(result, h.HERE / "README.md")
    return result


if __name__ == "__main__":
    main()

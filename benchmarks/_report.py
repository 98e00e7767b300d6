"""The Markdown of benchmarks/README.md from the JSON in results/: the EM iteration tables (CPU and
GPU) and the README that includes every benchmark's table. No timing here (that is
``em_iteration.py``); ``python benchmarks/em_iteration.py --readme`` regenerates the README.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

SKLEARN = "sklearn.GaussianMixture"
NUMPY = "numpy EM"
XLA_GATED = "GatedExperts (XLA only)"


def _table(rows, key, label):
    by = {}
    for r in rows:
        by.setdefault(r["sweep_point"][{"n": 0, "K": 1, "D": 2}[key]], {})[r["family"]] = r
    xla = any(r["family"] == XLA_GATED for r in rows)
    out = [f"| {label} | Regression (ms) | Gated (ms) | Gated x roofline "
           + ("| Gated, XLA only (ms) | XLA only x roofline " if xla else "")
           + "| sklearn (ms) | NumPy EM (ms) | sklearn / gated | NumPy / gated |",
           "|---:" * (10 if xla else 8) + "|"]
    for v, row in sorted(by.items()):
        def ms(f, row=row):
            return row[f]["median_s"] * 1e3 if "median_s" in row.get(f, {}) else float("nan")
        g = ms("GatedExperts")
        xr = row.get("GatedExperts", {}).get("x_roofline", float("nan"))
        def f(v, spec, suffix=""):
            return "-" if v != v else f"{v:{spec}}{suffix}"

        xla_cols = ""
        if xla:
            xx = row.get(XLA_GATED, {}).get("x_roofline", float("nan"))
            xla_cols = f"| {f(ms(XLA_GATED), '.2f')} | {f(xx, '.1f')} "
        out.append(f"| {v:,} | {f(ms('RegressionMixture'), '.2f')} | {f(g, '.2f')} | {f(xr, '.1f')} "
                   f"{xla_cols}| {f(ms(SKLEARN), '.1f')} | {f(ms(NUMPY), '.1f')} "
                   f"| {f(ms(SKLEARN) / g, '.1f', 'x')} | {f(ms(NUMPY) / g, '.1f', 'x')} |")
    return out


def write_accel_table(result: dict, path: Path) -> None:
    """The GPU section of benchmarks/README.md (included by ``write_readme``)."""
    from conceptshift.files import write_atomic

    m, roof, cfg = result["machine"], result["roofline"], result["config"]
    chk, tf32 = result["sklearn_agreement"], result.get("sklearn_agreement_default_precision")
    lines = [
        f"## EM iteration on a GPU (`em_iteration` on {m['device_kind']})",
        "",
        f"Same script and model as above, run with JAX's CUDA backend (jax {m['versions'].get('jax')},"
        f" float32). Measured in the same run: read bandwidth {roof['read_bandwidth_Bps'] / 1e12:.2f} "
        f"TB/s, float32 GEMM at full precision {roof['gemm_flops'] / 1e12:.1f} TFLOP/s"
        + ("" if len(result.get("rooflines", [])) < 2 else
           " (the sweeps ran as " + str(len(result["rooflines"])) + " commands, each measuring its own "
           "roofline: " + ", ".join(f"{r['read_bandwidth_Bps'] / 1e12:.2f} TB/s" for r in result["rooflines"])
           + "; each row's multiple uses its own run's)") + ". scikit-learn",
        f"ran on the host's CPU ({m['cpu']}, {m['cpu_count']} cores) for n <= "
        f"{cfg.get('reference_max_n', 0):,} only.",
        f"Agreement after {chk['n_iter']} iterations from the same start at n = {chk['n']:,}: mean "
        f"log-likelihood {chk['ours_mean_loglik']:.6f} (ours) vs {chk['sklearn_mean_loglik']:.6f} "
        "(scikit-learn, float64).",
    ]
    if tf32:
        lines.append(f"With the GPU's default (TF32) matrix products instead: "
                     f"{tf32['ours_mean_loglik']:.6f} ({tf32['abs_diff_per_sample']:.1e} nats per sample "
                     "off; see `conceptshift/_precision.py`).")
    lines.append("")
    if result.get("withdrawn"):
        lines += [f"EM iteration times: withdrawn. {result['withdrawn']}", ""]
        write_atomic(path, "\n".join(lines))
        return
    for key, label, fixed in (("n", "n", f"K = {cfg['K_fixed']}, D = {cfg['D_fixed']}"),
                              ("K", "K", f"n = {cfg['n_fixed']:,}, D = {cfg['D_fixed']}"),
                              ("D", "D", f"n = {cfg['n_fixed']:,}, K = {cfg['K_fixed']}")):
        sub = [r for r in result["rows"] if r.get("sweep") == key]
        if sub:
            lines += [f"### GPU, against {label} ({fixed})", ""] + _table(sub, key, label) + [""]
    fams = ("RegressionMixture", "GatedExperts")
    errors = [r for r in result["rows"] if "error" in r]
    seen = {(r["family"], *r["sweep_point"]) for r in result["rows"] if r["family"] in fams}
    missing = sorted({(f, n, K, D) for f in fams for n, K, D in
                      [(v, cfg["K_fixed"], cfg["D_fixed"]) for v in cfg["n"]]
                      + [(cfg["n_fixed"], v, cfg["D_fixed"]) for v in cfg["K"]]
                      + [(cfg["n_fixed"], cfg["K_fixed"], v) for v in cfg["D"]]} - seen)
    for r in errors:
        lines.append(f"- {r['family']} at n = {r['n']:,}, K = {r['K']}, D = {r['D']}: {r['error']}.")
    for f, n, K, D in missing:
        lines.append(f"- {f} at n = {n:,}, K = {K}, D = {D}: not measured (the command's time limit).")
    write_atomic(path, "\n".join(lines))


def write_readme(result: dict, path: Path) -> None:
    """benchmarks/README.md: every benchmark's table, regenerated from the JSON in results/."""
    from conceptshift.files import write_atomic

    m, roof, cfg = result["machine"], result["roofline"], result["config"]
    chk = result["sklearn_agreement"]
    lines = [
        "# Benchmarks",
        "",
        "Every figure here comes from a script in this folder that writes JSON to `results/`;",
        "`conceptshift bench NAME` (or `python benchmarks/NAME.py`) reruns one, `--quick` runs it",
        "at toy sizes. Times are medians of repeats after a warm-up, compile time apart.",
        "",
        "## EM iteration (`em_iteration`)",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), {m['backend']}; jax {m['versions'].get('jax')},"
        f" x64 = {m['x64']}. Measured in the same run: read bandwidth "
        f"{roof['read_bandwidth_Bps'] / 1e9:.1f} GB/s, float32 GEMM {roof['gemm_flops'] / 1e9:.0f} GFLOP/s.",
        "One EM iteration = fused E-step and sufficient statistics over all rows, then the M-step;",
        "its time is the marginal cost (a fit of 1 + n_iter iterations less a fit of 1, over n_iter),",
        "so the fit's one-off data layout is not counted, as the references' loops have none. On a CPU",
        "the E-step runs as the compiled kernel of `conceptshift/_kernels` ('XLA only': the same",
        "fit with `CONCEPTSHIFT_CPU_KERNEL=0`, the XLA formulation).",
        "scikit-learn's GaussianMixture (float64) and a plain NumPy EM (float32) fit the same model as",
        "the gated family (a full-covariance Gaussian mixture of (x, y) in D + 1 dimensions), from the",
        "same starting parameters. 'x roofline' is the gated iteration's time over",
        "max(bytes / bandwidth, flops / GEMM peak) with the kernel's flop count (`kernel_flops`).",
        f"Agreement: after {chk['n_iter']} iterations from the same start at n = {chk['n']:,}, "
        f"K = {chk['K']}, D = {chk['D']}, mean log-likelihood {chk['ours_mean_loglik']:.6f} (ours, "
        f"{chk['dtype_ours']}) vs {chk['sklearn_mean_loglik']:.6f} (scikit-learn).",
        "",
    ]
    rows = result["rows"]
    for key, label, fixed in (("n", "n", f"K = {cfg['K_fixed']}, D = {cfg['D_fixed']}"),
                              ("K", "K", f"n = {cfg['n_fixed']:,}, D = {cfg['D_fixed']}"),
                              ("D", "D", f"n = {cfg['n_fixed']:,}, K = {cfg['K_fixed']}")):
        sub = [r for r in rows if r.get("sweep") == key]
        if sub:
            lines += [f"### Against {label} ({fixed})", ""] + _table(sub, key, label) + [""]
    extra = sorted(p for p in h.RESULTS.glob("*.md"))
    for p in extra:
        lines += [p.read_text().rstrip(), ""]
    write_atomic(path, "\n".join(lines))

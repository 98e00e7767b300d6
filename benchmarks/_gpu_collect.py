"""Assembles the GPU results from the logs of runs made in pieces on a lent GPU machine.

A lent machine runs one command for at most 10 minutes, so the GPU sweeps run as several processes
(`bash benchmarks/gpu_sweep.sh OUT`, each sweep under its own time limit; then the points it cut,
`em_iteration.py --only K --K 64`, `--only D --D 64,128` and `replicates.py --families gated --grid
16,64`), each printing one JSON line per measurement; a process stopped at its limit leaves its
finished lines. The logs are kept in `results/gpu_runs/` (`em_iteration_n.json` is the n sweep's
whole result: the machine and the agreement checks); this script merges them (a point measured twice
keeps its last measurement) into `results/em_iteration_gpu.json` and `results/replicates_gpu.json`
and writes the Markdown tables that `benchmarks/README.md` includes.

Usage: python benchmarks/_gpu_collect.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402
import _report  # noqa: E402
import hmm as hmm_bench  # noqa: E402

from conceptshift.files import write_atomic, write_json_atomic  # noqa: E402

RUNS = h.RESULTS / "gpu_runs"


def json_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by the time limit
                pass
    return out


def collect_em(machine: dict, checks: list[dict]) -> dict:
    """``checks``: the agreement checks (one per matrix-product precision)."""
    runs = sorted(RUNS.glob("em_iteration_run*.jsonl"))
    rooflines, points = [], {}
    for i, path in enumerate(runs):
        for rec in json_lines(path):
            if "read_bandwidth_Bps" in rec:
                rooflines.append(dict(rec, run=i + 1))
            elif "family" in rec:
                points[(rec["family"], rec["n"], rec["K"], rec["D"])] = dict(rec, run=i + 1)
    cfg = {"n": [10_000, 100_000, 1_000_000, 10_000_000, 30_000_000, 100_000_000],
           "K": [2, 4, 8, 16, 32, 64], "D": [1, 2, 4, 8, 16, 32, 64, 128], "n_fixed": 1_000_000,
           "K_fixed": 4, "D_fixed": 8, "n_iter": 10, "repeats": 5, "reference_max_n": 1_000_000}
    rows = []
    for sweep, values in (("n", cfg["n"]), ("K", cfg["K"]), ("D", cfg["D"])):
        for v in values:
            n, K, D = (v if sweep == "n" else cfg["n_fixed"], v if sweep == "K" else cfg["K_fixed"],
                       v if sweep == "D" else cfg["D_fixed"])
            for fam in ("RegressionMixture", "GatedExperts", _report.SKLEARN):
                if (fam, n, K, D) in points:
                    rows.append(dict(points[(fam, n, K, D)], sweep=sweep, sweep_point=[n, K, D]))
    by_prec = {c["precision"]: c for c in checks}
    return {"benchmark": "em_iteration", "machine": machine, "roofline": rooflines[0],
            "rooflines": rooflines, "config": cfg, "rows": rows,
            "sklearn_agreement": by_prec["HIGHEST"],
            "sklearn_agreement_default_precision": by_prec.get("DEFAULT"),
            "provenance": "merged by benchmarks/_gpu_collect.py from "
                          "results/gpu_runs/em_iteration_run*.jsonl"}


def collect_replicates(machine: dict) -> dict:
    rows = {}
    for path in sorted(RUNS.glob("replicates_run*.jsonl")):
        for r in json_lines(path):
            rows[(r["family"], r["R"])] = r
    return {"benchmark": "replicates", "machine": machine,
            "config": {"grid": [1, 4, 16, 64], "n": 2000, "restarts": 8, "max_iter": 100, "repeats": 3},
            "rows": [rows[k] for k in sorted(rows, key=lambda k: (k[0] != "regression", k[1]))],
            "provenance": "merged by benchmarks/_gpu_collect.py from results/gpu_runs/replicates_run*"}


# hmm_gpu.json predates recording the device kind; that session's other runs name an H100
HMM_DEVICE = "NVIDIA H100 80GB HBM3"


def replicates_table(res: dict) -> list[str]:
    cfg = res["config"]
    lines = [f"### GPU: replicates, vmap against a Python loop ({res['machine']['device_kind']})", "",
             f"n = {cfg['n']} rows per replicate, {cfg['restarts']} restarts, {cfg['max_iter']} EM "
             "iterations each (tol = 0, same work both ways).", "",
             "| family | R | vmap (s) | loop (s) | loop / vmap |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['family']} | {r['R']} | {r['vmap']['median_s']:.3f} | "
                     f"{r['loop']['median_s']:.3f} | {r['speedup']:.1f}x |")
    return lines


def main() -> None:
    n_sweep = json.loads((RUNS / "em_iteration_n.json").read_text())
    machine = n_sweep["machine"]  # every run of the set was on the same machine
    checks = [n_sweep["sklearn_agreement"], n_sweep["sklearn_agreement_default_precision"]]
    res = collect_em(machine, checks)
    write_json_atomic(h.RESULTS / "em_iteration_gpu.json", res)
    _report.write_accel_table(res, h.RESULTS / "em_iteration_gpu.md")
    rep = collect_replicates(machine)
    write_json_atomic(h.RESULTS / "replicates_gpu.json", rep)
    hmm = json.loads((h.RESULTS / "hmm_gpu.json").read_text())
    hmm_bench.write_table(hmm, h.RESULTS / "hmm_gpu.md")
    text = (h.RESULTS / "hmm_gpu.md").read_text().replace(
        "## Mixture of HMMs against hmmlearn and dynamax (`hmm`)",
        f"### GPU: mixture of HMMs ({hmm['machine'].get('device_kind', HMM_DEVICE)}, an earlier session; "
        "hmmlearn on the host CPU)")
    write_atomic(h.RESULTS / "em_iteration_gpu.md",
                 (h.RESULTS / "em_iteration_gpu.md").read_text().rstrip() + "\n\n"
                 + "\n".join(replicates_table(rep)) + "\n\n" + text)
    (h.RESULTS / "hmm_gpu.md").unlink()
    print("written: results/em_iteration_gpu.json, replicates_gpu.json, em_iteration_gpu.md")


if __name__ == "__main__":
    main()

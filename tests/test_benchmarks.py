"""Benchmark scripts run end to end in quick mode (no timing assertions)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_em_iteration_quick(tmp_path):
    out = tmp_path / "em.json"
    res = _load("em_iteration").main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "em_iteration" and saved["rows"] == res["rows"]
    assert {r["family"] for r in res["rows"]} >= {"RegressionMixture", "GatedExperts"}
    assert all(r["iter_s_median"] > 0 for r in res["rows"])


def test_svi_quick(tmp_path):
    out = tmp_path / "svi.json"
    res = _load("svi").main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "svi" and saved["rows"] == res["rows"]
    row = res["rows"][0]
    assert row["svi_run_s_median"] > 0 and row["em_run_s_median"] > 0
    assert abs(row["svi_final_gap_per_obs"]) < 1e-3 and row["svi_steps_to_1e-3"] is not None

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


def test_hmm_quick(tmp_path):
    out = tmp_path / "hmm.json"
    res = _load("hmm").main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "hmm" and saved["rows"] == res["rows"]
    assert {r["impl"] for r in res["rows"]} >= {"conceptshift", "hmmlearn"}
    assert all(r["seconds"] > 0 for r in res["rows"])
    for c in res["loglik_agreement"]:  # every library evaluates the same likelihood
        assert abs(c["loglik_conceptshift"] - c["loglik_hmmlearn"]) < 1e-3 * abs(c["loglik_hmmlearn"])
        if c["loglik_dynamax"] is not None:
            assert abs(c["loglik_dynamax"] - c["loglik_hmmlearn"]) < 1e-3 * abs(c["loglik_hmmlearn"])

"""Benchmark scripts run end to end in quick mode (no timing assertions)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import X64

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


float32_only = pytest.mark.skipif(X64, reason="the benchmarks measure float32; run once")


@float32_only
@pytest.mark.slow  # the benchmark smoke tests run in make test-slow (the default run is at 10 min)
def test_em_iteration_quick(tmp_path):
    out = tmp_path / "em.json"
    res = _load("em_iteration").main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "em_iteration" and saved["rows"] == res["rows"]
    families = {r["family"] for r in res["rows"]}
    assert families >= {"RegressionMixture", "GatedExperts", "sklearn.GaussianMixture", "numpy EM"}
    assert {r["sweep"] for r in res["rows"]} == {"n", "K", "D"}
    # ours: the marginal cost of an iteration (a difference of two timings, so at toy sizes it
    # may come out at or below zero: only finiteness is checked); the references: plain loops
    ours = [r for r in res["rows"] if r["family"].startswith(("GatedExperts", "RegressionMixture"))]
    assert all(math.isfinite(r["median_s"]) and r["method"].startswith("marginal") for r in ours)
    assert all(r["median_s"] > 0 for r in res["rows"] if r not in ours)
    assert all(r["flops"] > 0 for r in ours)
    roof = res["roofline"]
    assert roof["read_bandwidth_Bps"] > 0 and roof["gemm_flops"] > 0
    # the gated family and scikit-learn run the same EM from the same start
    chk = res["sklearn_agreement"]
    assert chk["abs_diff_per_sample"] < 1e-4, chk


def test_em_iteration_numpy_baseline_is_em():
    """The plain NumPy EM never decreases the log-likelihood."""
    import numpy as np

    mod = _load("em_iteration")
    x, y, _ = mod.make_data(600, 3, 2, seed=1, dtype=np.float64)
    X = np.concatenate([x, y], 1)
    rng = np.random.default_rng(0)
    p = (np.full(3, 1 / 3), X[rng.choice(600, 3, replace=False)], np.stack([np.cov(X.T)] * 3))
    lls = []
    for _ in range(8):
        *p, ll = mod.numpy_em_iteration(X, *p)
        lls.append(ll)
    assert all(b >= a - 1e-8 * abs(a) for a, b in zip(lls, lls[1:], strict=False))


@float32_only
@pytest.mark.slow
def test_replicates_quick(tmp_path):
    out = tmp_path / "rep.json"
    res = _load("replicates").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert all(r["vmap"]["median_s"] > 0 and r["loop"]["median_s"] > 0 for r in res["rows"])


def test_cli_bench_list_and_unknown(capsys, monkeypatch):
    from conceptshift.cli import main

    monkeypatch.chdir(BENCH.parent)
    assert main(["bench", "list"]) == 0
    listed = capsys.readouterr().out
    assert "em_iteration" in listed and "replicates" in listed
    assert main(["bench", "no-such-benchmark"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown benchmark" in err


@float32_only
def test_hmm_quick(tmp_path):
    out = tmp_path / "hmm.json"
    res = _load("hmm").main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "hmm" and saved["rows"] == res["rows"]
    assert {r["impl"] for r in res["rows"]} >= {"conceptshift", "hmmlearn"}
    assert all(r["seconds"] > 0 for r in res["rows"])
    for c in res["loglik_agreement"]:  # every library evaluates the same likelihood
        assert abs(c["loglik_conceptshift"] - c["loglik_hmmlearn"]) < 1e-5 * abs(c["loglik_hmmlearn"])
        if c["loglik_dynamax"] is not None:
            assert abs(c["loglik_dynamax"] - c["loglik_hmmlearn"]) < 1e-5 * abs(c["loglik_hmmlearn"])


@float32_only
@pytest.mark.slow
def test_svi_quick(tmp_path):
    out = tmp_path / "svi.json"
    res = _load("svi").main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "svi" and saved["rows"] == res["rows"]
    row = res["rows"][0]
    assert row["svi_run_s_median"] > 0 and row["em_run_s_median"] > 0
    assert abs(row["svi_final_gap_per_obs"]) < 1e-3 and row["svi_steps_to_1e-3"] is not None


@float32_only
@pytest.mark.slow
def test_restarts_quick(tmp_path):
    out = tmp_path / "restarts.json"
    res = _load("restarts").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert all(r["one_restart_s"] > 0 and r["eight_restarts_s"] > 0 for r in res["rows"])


@pytest.mark.slow
@float32_only
def test_monotone_quick(tmp_path):
    out = tmp_path / "monotone.json"
    res = _load("monotone").main(["--quick", "--out", str(out)])
    for name in ("float32", "float64"):
        summary = res[name]["summary"]
        assert summary["problems"] == 8 and len(res[name]["rows"]) == 8
        assert summary["fell"] == summary["fell_degenerate"]  # only degenerate restarts may jitter


@float32_only  # the script runs float64 and float32 in processes of their own: run once
@pytest.mark.slow
def test_glm_flexmix_smoke(tmp_path):
    out = tmp_path / "glm_flexmix.json"
    mod = _load("glm_flexmix")
    res = mod.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "glm_flexmix" and saved["n"] == 2000 and saved["flexmix"] is None
    for name, dtype in (("conceptshift_f64", "float64"), ("conceptshift_f32", "float32")):
        cs = res[name]
        assert cs["dtype"] == dtype and cs["fixed"]["ms_per_iter_median"] > 0
        assert math.isfinite(cs["fixed"]["marginal_ms_per_iter_median"])
        assert cs["fit"]["n_iter"] >= 1 and cs["fit"]["loglik"] >= cs["loglik_start"] - 1e-3
    assert "glm_flexmix" in mod.markdown(res)


@pytest.mark.slow
def test_glm_gpu_quick(tmp_path):
    """The GLM mixtures' per-iteration timing (run on a GPU for the committed figures) end to end at
    toy sizes on whatever device there is: every point measured, with a finite log-likelihood."""
    out = tmp_path / "glm_gpu.json"
    res = _load("glm_gpu").main(["--quick", "--out", str(out)])
    points = res["rows"]
    assert points and all(p["status"] == "measured" for p in points)
    assert all(math.isfinite(p["loglik"]) and p["ms_per_iter_median"] > 0 for p in points)
    assert out.is_file()

"""`conceptshift diagnose DIR` and `conceptshift experiment posterior`: end to end, one-line errors."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import X64

from conceptshift.diagnostics.posterior import posterior_datatree, write_datatree
from conceptshift.models import RegressionMixture, make_problem, simulate

# the CLI chooses its own precision (float64 unless --float32): the float64 pass would repeat it
pytestmark = pytest.mark.skipif(X64, reason="the CLI sets its own precision; run once")


def run_cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "conceptshift.cli", *args], capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_diagnose_saved_datatree(tmp_path):
    """A DataTree of draws scattered around the truth: diagnose prints its diagnostics and
    summary and writes the figures beside it."""
    prob = make_problem(jax.random.key(0), n_components=2)
    sim = simulate(jax.random.key(1), prob, 10, 10, 40)
    m = RegressionMixture(2)
    t = prob.heads("q", "strong")
    noise = jax.random.normal(jax.random.key(2), (2, 50) + t.coef.shape, t.coef.dtype)
    draws = t._replace(coef=t.coef[None, None] + 0.05 * noise,
                       log_weights=np.broadcast_to(t.log_weights, (2, 50, 2)),
                       log_scale=np.broadcast_to(t.log_scale, (2, 50, 2, 1)))
    dt = posterior_datatree(m, draws, sim.test.x, sim.test.y, jax.random.key(3), truth=prob,
                            attrs={"method": "synthetic"})
    write_datatree(dt, tmp_path / "synthetic.nc")
    code, out, err = run_cli("diagnose", str(tmp_path))
    assert code == 0, err
    assert "synthetic.nc" in out and "hdi_coverage" in out and "r_hat" in out
    for fig in ("band", "ppc", "rank"):
        assert (tmp_path / f"synthetic_{fig}.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (("diagnose", "/nonexistent/dir"), "no such file or folder"),
    (("diagnose", "EMPTY"), "holds no .nc"),
    (("diagnose", "x.nc", "--hdi-prob", "1.5"), "--hdi-prob must be in (0, 1)"),
    (("experiment", "posterior", "--set", "n=3"), "n must be >= 4 * n_components"),
    (("experiment", "posterior", "--set", "num_chains=1"), "num_chains must be >= 2"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    """In process (each error is raised before the CLI touches JAX's precision)."""
    from conceptshift.cli import main

    args = [str(tmp_path) if a == "EMPTY" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_experiment_posterior_end_to_end(tmp_path):
    out = tmp_path / "run"
    settings = ["n=150", "n_test=60", "num_warmup=100", "num_samples=100", "num_chains=2",
                "svi_steps=300", "n_boot=50", "restarts=2", "n_components=2"]
    args = ["experiment", "posterior", "--out", str(out), "--no-progress"]
    for s in settings:
        args += ["--set", s]
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"em_bootstrap", "svi_fullrank", "nuts", "joint_svi", "joint_nuts"}
    for m in res["methods"].values():
        assert 0 <= m["hdi_coverage"] <= 1 and np.isfinite(m["elpd_test"])
    assert abs(res["methods"]["svi_fullrank"]["svi_delta_source_gap_per_obs"]) < 1e-3
    for name in ("em_bootstrap.nc", "svi_fullrank.nc", "nuts.nc", "joint_svi.nc", "joint_nuts.nc",
                 "posterior.png", "nuts_band.png"):
        assert (out / name).is_file()
    # every route reports the matching posterior; the Markov chains their sampled parameters' R-hat
    for m in res["methods"].values():
        assert 0 < m["matching_posterior_prob"] <= 1 + 1e-9 and m["matching_posterior_best"].count(",") == 1
    for m in ("nuts", "joint_nuts"):
        assert res["methods"][m]["max_rhat_fit"] >= 0.99 and res["methods"][m]["min_ess_bulk_fit"] > 0
    assert "max_rhat_fit" not in res["methods"]["joint_svi"]
    # rerun: every cell reused
    code, stdout, err = run_cli(*args)
    assert code == 0 and "0 cell(s) computed, 5 reused" in stdout
    code, stdout, err = run_cli("diagnose", str(out))
    assert code == 0 and "nuts.nc" in stdout and "independent draws" in stdout, err
    # rank plots compare chains: the bootstrap and SVI trees (independent draws) get none
    assert (out / "nuts_rank.png").is_file() and not (out / "em_bootstrap_rank.png").exists()
    assert "matching_share" in stdout and "matching_posterior_prob" in stdout

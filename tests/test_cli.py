"""The `conceptshift` command: JSON contract, one-line errors with exit code 2, atomic --out."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import X64, once

from conceptshift.cli import main

# the CLI chooses its own precision (float64 unless --float32): the float64 pass would repeat it
pytestmark = pytest.mark.skipif(X64, reason="the CLI sets its own precision; run once")


def run_cli(*args):
    """Runs the CLI in a subprocess (it switches JAX to float64, which must not leak into tests)."""
    proc = subprocess.run([sys.executable, "-m", "conceptshift.cli", *args],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def csv_file(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("x,y,label\n" + "".join(f"{i / 10},{(i % 2) * 5 + i / 20},a\n" for i in range(40)))
    return p


def test_fit_json_contract_npreg(data_dir, tmp_path):
    code, out, err = run_cli("fit", str(data_dir / "NPreg.csv"), "--components", "2", "--y", "yn",
                             "--x", "x", "--degree", "2", "--json", "--out", str(tmp_path))
    assert code == 0, err
    res = json.loads(out)
    for key in ("loglik", "bic", "weights", "coef", "scale", "converged", "n_iter"):
        assert key in res
    assert len(res["weights"]) == 2 and len(res["scale"]) == 2
    assert [len(c) for c in res["coef"]] == [3, 3]  # intercept first, then x, x^2
    assert res["loglik"] == pytest.approx(-642.532014, abs=1e-5)  # float64 by default
    assert res["bic"] == pytest.approx(-2 * res["loglik"] + 9 * __import__("math").log(200))
    assert json.loads((tmp_path / "fit.json").read_text())["loglik"] == res["loglik"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_fit_gated_json_has_gates(data_dir):
    code, out, err = run_cli("fit", str(data_dir / "faithful.csv"), "--family", "gated", "-k", "2",
                             "--y", "waiting", "--x", "eruptions", "--json", "--restarts", "4")
    assert code == 0, err
    res = json.loads(out)
    assert len(res["gate_mean"]) == 2 and len(res["gate_mean"][0]) == 1
    assert len(res["gate_cov"]) == 2 and len(res["gate_cov"][0][0]) == 1
    assert res["converged"] is True


@pytest.mark.slow  # 10 s; the gated family's fit through the CLI runs by default
@once  # precision-independent plumbing
def test_fit_softmax_gate_through_the_registry(tmp_path):
    """--family softmax (flexmix's concomitant model) is offered because it is registered; its JSON
    carries the gate's slopes and flexmix's df."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    y = np.where(rng.random(300) < 1 / (1 + np.exp(-3 * x)), 2 + x, -2 - x) + 0.3 * rng.normal(size=300)
    path = tmp_path / "sm.csv"
    path.write_text("x,y\n" + "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(x, y, strict=True)))
    code, out, err = run_cli("fit", str(path), "--family", "softmax", "-k", "2", "--y", "y", "--x", "x",
                             "--json", "--restarts", "4")
    assert code == 0, err
    res = json.loads(out)
    assert len(res["gate_weights"]) == 2 and res["converged"] is True
    assert res["df"] == 2 * 3 + 1 * 2  # experts K (P + 1), gate (K - 1)(1 + D)
    assert abs(res["gate_weights"][0][0] - res["gate_weights"][1][0]) > 1.0  # the gate depends on x
    # weights: the mean gate probability over the rows (flexmix's prior), near the hard sizes
    assert sum(res["weights"]) == pytest.approx(1.0)
    np.testing.assert_allclose(res["weights"], np.asarray(res["size"]) / 300, atol=0.05)
    assert len(res["gate_intercept"]) == 2


def test_fit_table_output(csv_file):
    code, out, err = run_cli("fit", str(csv_file), "-k", "2", "--y", "y", "--x", "x")
    assert code == 0, err
    assert "Comp.1" in out and "log Lik" in out and "(Intercept)" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["fit", "/no/such/file.csv", "-k", "2", "--y", "y"], "not found"),
        (["fit", "{csv}", "-k", "2", "--y", "nope"], "'nope' not in"),
        (["fit", "{csv}", "-k", "2", "--y", "label"], "not a number"),
        (["fit", "{csv}", "-k", "0", "--y", "y"], "--components must be >= 1"),
        (["fit", "{csv}", "-k", "41", "--y", "y"], "exceeds the 40 data rows"),
        (["fit", "{csv}", "-k", "2", "--y", "y", "--restarts", "0"], "--restarts"),
        (["fit", "{csv}", "-k", "x", "--y", "y"], "expected an integer"),
        (["fit", "{csv}", "--family", "gated", "-k", "2", "--y", "y"], "--x"),
        (["fit", "{csv}", "--family", "softmax", "-k", "2", "--y", "y"], "--x"),
        (["fit", "{csv}", "--family", "softmax", "-k", "2", "--y", "y", "--x", "x", "--covariance",
          "diag"], "--covariance does not apply to --family softmax (it belongs to --family gated)"),
        (["fit", "{csv}", "-k", "2"], "--y"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle, csv_file, capsys):
    args = [str(csv_file) if a == "{csv}" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert needle in err


def test_nan_cell_rejected(tmp_path, capsys):
    p = tmp_path / "nan.csv"
    p.write_text("x,y\n1,2\n2,nan\n3,4\n")
    assert main(["fit", str(p), "-k", "1", "--y", "y", "--x", "x"]) == 2
    assert "line 3" in capsys.readouterr().err


def test_experiment_list_and_describe_name_every_knob(capsys):
    """`experiment list` gives whole first paragraphs and run times; `experiment describe NAME`
    every knob with its default and meaning (a knob without a meaning fails here)."""
    from conceptshift.experiments import EXPERIMENTS
    from conceptshift.experiments.knobs import knob_help

    assert main(["experiment", "list"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and all(name in out for name in EXPERIMENTS)
    for name, mod in EXPERIMENTS.items():
        hmm = "n_states" in mod.DEFAULTS
        assert all(knob_help(k, hmm) for k in mod.DEFAULTS)
        assert main(["experiment", "describe", name]) == 0
        out = capsys.readouterr().out
        assert all(k in out for k in mod.DEFAULTS), name
    assert main(["experiment", "describe"]) == 2
    assert "needs an experiment name" in capsys.readouterr().err
    assert main(["experiment", "consistency", "extra"]) == 2

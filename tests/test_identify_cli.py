"""`conceptshift identify`: Algorithm 1 on CSV files drawn with plain numpy (not the package's
simulator), its JSON contract, its outputs and its one-line refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import X64

from conceptshift.cli import main

# the CLI chooses its own precision (float64 unless --float32): the float64 pass would repeat it
pytestmark = pytest.mark.skipif(X64, reason="the CLI sets its own precision; run once")

BETA = np.array([[-3.0, 1.0], [0.0, -2.0], [3.0, 0.5]])
WEAK = np.array([[-2.0, 0.5], [1.0, -1.0], [2.5, 1.5]])
PI_P, PI_Q = np.array([0.6, 0.3, 0.1]), np.array([0.1, 0.3, 0.6])


def _draw(rng, n, pi):
    k = rng.choice(3, n, p=pi)
    x = rng.normal(size=n)
    return x, BETA[k, 0] + BETA[k, 1] * x + 0.5 * rng.normal(size=n), \
        WEAK[k, 0] + WEAK[k, 1] * x + rng.normal(size=n)


def _truth(x):
    return (PI_Q[None] * (BETA[:, 0][None] + BETA[:, 1][None] * x[:, None])).sum(1)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(7)
    x, y, yw = _draw(rng, 1000, PI_P)
    np.savetxt(tmp_path / "source.csv", np.c_[x, y, yw], delimiter=",", header="dose,response,proxy",
               comments="")
    x, _, yw = _draw(rng, 1000, PI_Q)
    np.savetxt(tmp_path / "target.csv", np.c_[x, yw], delimiter=",", header="dose,proxy",
               comments="")
    np.savetxt(tmp_path / "new.csv", np.linspace(-2, 2, 9)[:, None], delimiter=",", header="dose",
               comments="")
    return tmp_path


def _args(d, *extra):
    return ["identify", "--source", str(d / "source.csv"), "--target", str(d / "target.csv"),
            "--y", "response", "--y-weak", "proxy", "--x", "dose", "-k", "3", *extra]


def run_cli(*args):
    """In a subprocess: the CLI switches JAX to float64, which must not leak into other tests."""
    proc = subprocess.run([sys.executable, "-m", "conceptshift.cli", *args], capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_identify_json_predicts_q(files):
    """One object with both fits, the matching, pi^q on the source components and a mean of
    q(y | x) per row of NEW.csv, within 0.15 of the truth (n = 1000 per domain)."""
    code, out, err = run_cli(*_args(files, "--predict", str(files / "new.csv"), "--json",
                                    "--restarts", "4"))
    assert code == 0, err
    res = json.loads(out)
    for key in ("assignment", "margin", "source", "target", "target_weights", "predict"):
        assert key in res
    assert sorted(res["assignment"]) == [0, 1, 2] and res["margin"] > 0
    assert res["source"]["converged"] and res["source"]["rows"] == 1000
    assert res["source"]["restarts_at_best"] >= 1 and "loglik" in res["target"]
    np.testing.assert_allclose(np.sort(res["target_weights"]), np.sort(PI_Q), atol=0.06)
    mean = np.asarray(res["predict"]["mean"])
    assert mean.shape == (9,) and np.max(np.abs(mean - _truth(np.linspace(-2, 2, 9)))) < 0.15
    # the matching posterior: its mode is the matching chosen, all 3! matchings are weighed, and
    # the heads here are far apart, so it is sure of it
    post = res["matching_posterior"]
    assert post["best"] == res["assignment"] and post["n_candidates"] == 6 and post["best_prob"] > 0.99


@pytest.mark.slow
def test_identify_bootstrap_intervals_cover_q_and_out_writes_everything(files):
    out_dir = files / "out"
    code, out, err = run_cli(*_args(files, "--predict", str(files / "new.csv"), "--bootstrap",
                                    "100", "--out", str(out_dir)))
    assert code == 0, err
    assert "matching held in" in out and "written:" in out
    res = json.loads((out_dir / "identify.json").read_text())
    p = res["predict"]
    truth = _truth(np.linspace(-2, 2, 9))
    covered = (np.asarray(p["lower"]) <= truth) & (truth <= np.asarray(p["upper"]))
    assert covered.mean() >= 0.75 and res["bootstrap"]["agreement"] > 0.9
    assert res["bootstrap"]["matching_posterior"]["best"] == res["assignment"]
    assert "posterior probability of each matching" in out
    rows = (out_dir / "predictions.csv").read_text().splitlines()
    assert rows[0] == "dose,mean,lower,upper" and len(rows) == 10
    assert (out_dir / "identify.png").stat().st_size > 10_000
    assert not list(out_dir.glob(".*tmp"))
    # without the weak column in the source: the strong heads are matched
    src = np.loadtxt(files / "source.csv", delimiter=",", skiprows=1)
    np.savetxt(files / "strong.csv", src[:, :2], delimiter=",", header="dose,response", comments="")
    args = _args(files, "--json", "--restarts", "4")
    args[2] = str(files / "strong.csv")
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert json.loads(out)["match"] == "strong"


@pytest.mark.parametrize("extra, needle", [
    (["--bootstrap", "1"], "--bootstrap must be >= 2"),
    (["--degree", "2", "--family", "logistic"], "--degree does not apply"),
    (["--components", "0"], "--components must be >= 1"),
    (["--x", "proxy"], "also a label column"),
    (["--y-weak", "zzz"], "'zzz' not in target.csv"),
    (["--y-weak", "response"], "name the same column"),
    (["--predict", "missing.csv"], "not found"),
])
def test_identify_refuses_bad_input_in_one_line(files, capsys, extra, needle):
    args = _args(files)
    if extra[0] in ("--x", "--y-weak"):
        i = args.index(extra[0])
        args[i + 1] = extra[1]
        extra = []
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


@pytest.mark.slow  # a subprocess fitting K = 1..4
def test_fit_components_range_chooses_k_on_npreg(data_dir):
    """`fit --components 1-4` on flexmix's NPreg: BIC and ICL for each K, K = 2 chosen, its fit
    flexmix's log Lik -642.532014."""
    code, out, err = run_cli("fit", str(data_dir / "NPreg.csv"), "-k", "1-4", "--y", "yn", "--x",
                             "x", "--degree", "2", "--json")
    assert code == 0, err
    res = json.loads(out)
    sel = res["selection"]
    assert sel["chosen"] == 2 and [r["components"] for r in sel["table"]] == [1, 2, 3, 4]
    assert res["loglik"] == pytest.approx(-642.532014, abs=1e-5)
    assert all(r["icl"] >= r["bic"] - 1e-9 for r in sel["table"])
    code, _, err = run_cli("fit", str(data_dir / "NPreg.csv"), "-k", "4-2", "--y", "yn")
    assert code == 2 and "A <= B" in err


@pytest.mark.slow  # a subprocess with two categorical fits and a bootstrap
def test_identify_categorical_prints_class_probabilities(tmp_path):
    """A family without a mean (categorical y): the predictions are q(y = c | x) per class, with
    intervals per class, as p_c / lower_c / upper_c columns."""
    rng = np.random.default_rng(1)

    def write(path, n, pi, strong):
        k = rng.choice(2, n, p=pi)
        x = rng.normal(size=n)
        cols = [x]
        for slope in ((3.0,) if strong else ()) + (2.0,):
            logits = np.stack([np.zeros(n), np.where(k == 0, slope * x, -slope * x),
                               np.where(k == 0, 1.0, -1.0)], 1)
            p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            cols.append((rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1))
        header = "x,y,yw" if strong else "x,yw"
        np.savetxt(path, np.stack(cols, 1), delimiter=",", header=header, comments="",
                   fmt=["%.6f"] + ["%d"] * (len(cols) - 1))

    write(tmp_path / "s.csv", 1000, [0.7, 0.3], True)
    write(tmp_path / "t.csv", 1000, [0.3, 0.7], False)
    np.savetxt(tmp_path / "n.csv", np.linspace(-1, 1, 3)[:, None], header="x", comments="")
    code, out, err = run_cli("identify", "--source", str(tmp_path / "s.csv"), "--target",
                             str(tmp_path / "t.csv"), "--y", "y", "--y-weak", "yw", "--x", "x",
                             "-k", "2", "--family", "categorical", "--predict",
                             str(tmp_path / "n.csv"), "--bootstrap", "10", "--restarts", "4",
                             "--out", str(tmp_path / "o"))
    assert code == 0, err
    rows = (tmp_path / "o" / "predictions.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["x", "p_0", "p_1", "p_2"] and len(rows) == 4
    p = np.asarray([[float(v) for v in r.split(",")[1:4]] for r in rows[1:]])
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-9)
    assert not (tmp_path / "o" / "identify.png").exists()

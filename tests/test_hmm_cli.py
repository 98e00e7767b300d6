"""`conceptshift fit SEQS --family hmm`: reading ragged text and padded .npy sequences, the JSON
contract, one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import X64

from conceptshift.cli import main
from conceptshift.token_files import read_sequences

# the CLI chooses its own precision (float64 unless --float32): the float64 pass would repeat it
pytestmark = pytest.mark.skipif(X64, reason="the CLI sets its own precision; run once")

SEQS = ["0 1 2 1 0 1", "1 1 2", "3 0 1 2 2 1 0", "2 2 1 0", "0 1 0 1 3"]


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "conceptshift.cli", *args], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def seq_files(tmp_path):
    txt = tmp_path / "s.txt"
    txt.write_text("# five sequences\n" + "\n".join(SEQS) + "\n\n")
    T = max(len(s.split()) for s in SEQS)
    arr = np.full((len(SEQS), T), -1, np.int32)
    for i, s in enumerate(SEQS):
        v = [int(t) for t in s.split()]
        arr[i, : len(v)] = v
    npy = tmp_path / "s.npy"
    np.save(npy, arr)
    return txt, npy


def test_read_sequences_text_and_npy_agree(seq_files):
    txt, npy = seq_files
    x1, l1 = read_sequences(txt)
    x2, l2 = read_sequences(npy)
    np.testing.assert_array_equal(l1, [6, 3, 7, 4, 5])
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(l1, l2)
    assert x1[1].tolist() == [1, 1, 2, 0, 0, 0, 0]


def test_fit_hmm_json_contract(seq_files, tmp_path):
    """(The .npy path reads the same arrays as the text path: test_read_sequences_text_and_npy_agree.)"""
    txt, _ = seq_files
    code, out, err = run_cli("fit", str(txt), "--family", "hmm", "--components", "2", "--states", "2",
                             "--restarts", "3", "--json", "--out", str(tmp_path / "o"))
    assert code == 0, err
    res = json.loads(out)
    for key in ("loglik", "bic", "weights", "init", "trans", "emit", "converged", "n_iter", "df"):
        assert key in res
    assert res["tokens"] == 4 and res["n_sequences"] == 5 and res["n_observed_tokens"] == 25
    assert np.asarray(res["trans"]).shape == (2, 2, 2) and np.asarray(res["emit"]).shape == (2, 4)
    np.testing.assert_allclose(np.asarray(res["trans"]).sum(-1), 1.0, rtol=1e-12)
    assert res["bic"] == pytest.approx(-2 * res["loglik"] + res["df"] * np.log(5))
    # the reported log-likelihood is the model's at the reported parameters (float64 by default)
    import jax

    from conceptshift.models.hmm import HMMMixture, HMMParams

    with jax.enable_x64(True):
        p = HMMParams(*(np.log(np.maximum(np.asarray(res[k], np.float64), 1e-300))
                        for k in ("weights", "init", "trans", "emit")), np.zeros((0, 2, 4)))
        x, lengths = read_sequences(txt)
        ll = float(HMMMixture(2, 2, 4).log_likelihood(p, x, lengths))
    assert ll == pytest.approx(res["loglik"], rel=1e-9)
    assert json.loads((tmp_path / "o" / "fit.json").read_text())["loglik"] == res["loglik"]


@pytest.mark.parametrize("content, extra, message", [
    ("0 1 x\n", [], "'x' is not an integer token"),
    ("0 -2 1\n", [], "is negative"),
    ("\n\n", [], "no sequences"),
    ("0 1 5\n1 2\n", ["--tokens", "4"], "need --tokens >= 6"),
    ("0 1\n", ["--components", "3"], "exceeds the 1 sequences"),
    ("0 1\n", ["--y", "a"], "--y does not apply to --family hmm"),
])
def test_fit_hmm_bad_input_is_one_line_exit_2(tmp_path, capsys, content, extra, message):
    """In process: every check runs before JAX's precision is switched."""
    p = tmp_path / "bad.txt"
    p.write_text(content)
    args = ["fit", str(p), "--family", "hmm", "--states", "2"]
    if "--components" not in extra:
        args += ["--components", "1"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_fit_hmm_bad_npy(tmp_path, capsys):
    p = tmp_path / "bad.npy"
    np.save(p, np.array([[0, -1, 2]]))
    assert main(["fit", str(p), "--family", "hmm", "--states", "2", "--components", "1"]) == 2
    assert "after its -1 padding" in capsys.readouterr().err
    assert main(["fit", str(p), "--family", "hmm", "--components", "1"]) == 2
    assert "--states" in capsys.readouterr().err

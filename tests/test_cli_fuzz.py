"""Cases a fuzz run of the CLI found: each is refused as one line on stderr naming the offending
argument, row, column or file (exit 2; exit 1 for a fit that is not finite), or accepted as a user
expects; every JSON the CLI writes or prints is strict (no NaN or Infinity)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import X64

from conceptshift.cli import main

# the CLI chooses its own precision: in process it runs only checks (or --float32 fits, the float32
# pass's own precision); run once
pytestmark = pytest.mark.skipif(X64, reason="the CLI sets its own precision; run once")

ROWS = "".join(f"{i / 10},{(i % 2) * 5 + i / 20}\n" for i in range(40))
FILES = {
    "ok.csv": "x,y\n" + ROWS,
    "ragged.csv": "a,b\n1,2\n1,2,3\n4,5\n",
    "extra.csv": "a,b\n1,2,3\n4,5,6\n",
    "dup.csv": "a,b,a\n1,2,3\n4,5,6\n",
    "under.csv": "a,b\n1,2\n1_000,3\n4,5\n",
    "digits.csv": "a,b\n1,2\n\u0661\u0662,3\n4,5\n",
    "nan.csv": "a,b\n1,2\nNaN,3\n4,5\n",
    "inf.csv": "a,b\n1,2\n-inf,3\n4,5\n",
    "overflow.csv": "a,b\n1,2\n1e400,3\n4,5\n",
    "underflow.csv": "a,b\n1,2\n3,4\n-2.5e-400,3\n",
    "huge.csv": "x,y\n" + "".join(f"{i * 1e199},{(i % 2) * 5e200 + i * 1e199}\n" for i in range(40)),
    "five.csv": "x,y\n" + "".join(f"{i},{i * i}\n" for i in range(5)),
    "toks.txt": "0 1 2\n1 99999999999999999999 2\n",
    "toks_sep.txt": "0 1 2\n1 1_0 2\n",
    "seqs.txt": "0 1 2 1\n1 0 2\n",
    "garbage.nc": "this is not netCDF\n",
    "afile": "x\n",
}


@pytest.fixture
def files(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "field.csv").write_text("a,b\n1,2\n" + "1" * 10_000_000 + ",3\n")
    (tmp_path / "latin1.csv").write_bytes("a,b\n1,2\n3,4\xe9\n".encode("latin-1"))
    np.save(tmp_path / "big.npy", np.array([[0, 1, 2**63 + 5]], np.uint64))
    (tmp_path / "adir").mkdir()
    (tmp_path / "swept").mkdir()
    (tmp_path / "swept" / "cells").write_text("")
    return tmp_path


FIT = ["fit", "{ok.csv}", "-k", "2", "--y", "y"]
CASES = [  # (argv, words the one-line message must hold)
    (["fit", "{ragged.csv}", "-k", "1", "--y", "a"], ["ragged.csv line 3", "3 fields", "header has 2"]),
    (["fit", "{extra.csv}", "-k", "1", "--y", "a"], ["extra.csv line 2", "3 fields"]),
    (["fit", "{dup.csv}", "-k", "1", "--y", "b"], ["dup.csv", "'a' appears twice"]),
    (["fit", "{under.csv}", "-k", "1", "--y", "a"], ["under.csv line 3", "column 'a'", "'1_000'"]),
    (["fit", "{digits.csv}", "-k", "1", "--y", "a"], ["digits.csv line 3", "column 'a'", "not a number"]),
    (["fit", "{nan.csv}", "-k", "1", "--y", "a"], ["nan.csv line 3", "'NaN' is not finite"]),
    (["fit", "{inf.csv}", "-k", "1", "--y", "a"], ["inf.csv line 3", "'-inf' is not finite"]),
    (["fit", "{overflow.csv}", "-k", "1", "--y", "a"], ["line 3", "'1e400' overflows float64"]),
    (["fit", "{underflow.csv}", "-k", "1", "--y", "a"], ["line 4", "'-2.5e-400' underflows"]),
    (["fit", "{field.csv}", "-k", "1", "--y", "a"], ["field.csv line 3", "field larger"]),
    (["fit", "{latin1.csv}", "-k", "1", "--y", "a"], ["latin1.csv", "not UTF-8"]),
    ([*FIT, "--x", "y"], ["--x 'y'", "--y"]),
    ([*FIT, "--x", "x", "x"], ["--x", "'x' twice"]),
    ([*FIT, "--states", "2"], ["--states", "--family regression", "hmm"]),
    ([*FIT, "--tokens", "5"], ["--tokens", "hmm"]),
    ([*FIT, "--covariance", "full"], ["--covariance", "gated"]),
    ([*FIT, "--degree", "2"], ["--degree", "--x"]),
    (["fit", "{seqs.txt}", "--family", "hmm", "-k", "1", "--states", "2", "--degree", "2"],
     ["--degree", "--family hmm"]),
    (["fit", "{seqs.txt}", "--family", "hmm", "-k", "1", "--states", "2", "--x", "a"], ["--x", "hmm"]),
    (["fit", "{seqs.txt}", "--family", "hmm", "-k", "1", "--states", "2", "--shared-scale"],
     ["--shared-scale", "hmm"]),
    (["fit", "{seqs.txt}", "--family", "hmm", "-k", "1", "--states", "2", "--covariance", "diag"],
     ["--covariance", "hmm"]),
    ([*FIT, "--x", "x", "--degree", "34", "--float32"], ["--degree must be <= 10"]),
    (["fit", "{five.csv}", "-k", "1", "--y", "y", "--x", "x", "--degree", "4"],
     ["--degree 4", "5 design columns", "5 data rows"]),
    ([*FIT, "--seed", str(2**64)], ["--seed must be <= 4294967295"]),
    ([*FIT, "--seed", "-1"], ["--seed must be >= 0"]),
    ([*FIT, "--max-iter", "0"], ["--max-iter must be >= 1"]),
    ([*FIT, "--restarts", str(2**40)], ["--restarts must be <= 2147483647"]),
    ([*FIT, "--tol", "nan"], ["--tol", "finite"]),
    (["fit", "{ok.csv}", "-k", "1_0", "--y", "y"], ["--components", "expected an integer"]),
    (["fit", "{ok.csv}", "-k", "\u0662", "--y", "y"], ["--components", "expected an integer"]),
    ([*FIT, "--out", "{afile}"], ["--out", "afile is a file"]),
    ([*FIT, "--out", "{afile}/sub"], ["--out", "afile is a file"]),
    (["fit", "{huge.csv}", "-k", "2", "--y", "y", "--x", "x", "--float32"],
     ["column 'y' holds 8.9e+200", "float32", "drop --float32"]),
    (["fit", "{toks.txt}", "--family", "hmm", "-k", "1", "--states", "2"],
     ["toks.txt line 2", "99999999999999999999"]),
    (["fit", "{toks_sep.txt}", "--family", "hmm", "-k", "1", "--states", "2"],
     ["toks_sep.txt line 2", "'1_0'"]),
    (["fit", "{big.npy}", "--family", "hmm", "-k", "1", "--states", "2"], ["big.npy", "row 0, position 2"]),
    (["fit", "{seqs.txt}", "--family", "hmm", "-k", "1", "--states", "2", "--tokens", str(2**40)],
     ["--tokens must be <="]),
    (["diagnose", "{garbage.nc}"], ["garbage.nc", "not a readable netCDF"]),
    (["diagnose", "{afile}", "--hdi-prob", "nan"], ["--hdi-prob", "finite"]),
    (["experiment", "consistency", "--set", "lam=-1", "--out", "{run}"], ["lam must be >= 0"]),
    (["experiment", "consistency", "--set", "lam=nan", "--out", "{run}"], ["lam=nan", "finite"]),
    (["experiment", "consistency", "--set", "restarts=0", "--out", "{run}"], ["restarts must be >= 1"]),
    (["experiment", "consistency", "--set", "n_grid=", "--out", "{run}"], ["n_grid", "non-empty"]),
    (["experiment", "consistency", "--set", "seed=1_0", "--out", "{run}"], ["seed=1_0", "int"]),
    (["experiment", "consistency", "--set", f"seed={2**64}", "--out", "{run}"], ["seed must be <="]),
    (["experiment", "consistency", "--set", "tol=inf", "--out", "{run}"], ["tol=inf", "finite"]),
    (["experiment", "consistency", "--out", "{afile}"], ["--out", "afile is a file"]),
    (["experiment", "consistency", "--set", "n_grid=10,20", "--set", "replicates=2", "--out", "{swept}"],
     ["swept/cells is a file"]),
    (["fit", "{adir}", "-k", "1", "--y", "a"], ["adir is a folder"]),
    (["fit", "{adir}", "--family", "hmm", "-k", "1", "--states", "2"], ["adir is a folder"]),
]


def run_main(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors (our parser: one line, exit 2)
        return exc.code


def _argv(args, folder):
    out = []
    for a in args:
        if "{" in a:
            name, _, rest = a[1:].partition("}")
            a = str(folder / ("run" if name == "run" else name)) + rest
        out.append(a)
    return out


@pytest.mark.parametrize("args, words", CASES, ids=[c[1][0] for c in CASES])
def test_refused_as_one_line(args, words, files, capsys):
    code = run_main(_argv(args, files))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not (files / "run").exists()  # experiments: refused before the folder is made


def test_diagnose_checks_every_file_before_printing(files, capsys):
    """A folder with one good DataTree and one bad file: one line naming the bad file, nothing
    printed for the good one."""
    import xarray as xr

    folder = files / "trees"
    folder.mkdir()
    obs = np.arange(3)
    groups = {"posterior": {"weights": ("d", [1.0]), "scale": ("d", [1.0]), "q_mean": ("d", [0.0])},
              "log_likelihood": {"y": ("obs", obs * 1.0)}, "posterior_predictive": {"y": ("obs", obs * 1.0)},
              "observed_data": {"y": ("obs", obs * 1.0)}, "constant_data": {"x": ("obs", obs * 1.0)}}
    tree = xr.DataTree.from_dict({f"/{g}": xr.Dataset(v) for g, v in groups.items()})
    tree.to_netcdf(folder / "a_good.nc", engine="h5netcdf")
    data = (folder / "a_good.nc").read_bytes()
    (folder / "b_truncated.nc").write_bytes(data[: len(data) // 2])
    assert main(["diagnose", str(folder), "--no-figures"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "b_truncated.nc" in err
    (folder / "b_truncated.nc").write_text("{}")
    assert main(["diagnose", str(folder), "--no-figures"]) == 2
    assert "b_truncated.nc" in capsys.readouterr().err


def _strict(text):
    def refuse(name):
        raise AssertionError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_bom_csv_fits_and_json_is_strict(files, capsys):
    p = files / "bom.csv"
    p.write_text("x,y\n" + ROWS, encoding="utf-8-sig")
    assert p.read_bytes().startswith(b"\xef\xbb\xbf")
    out_dir = files / "fit"
    code = main(["fit", str(p), "-k", "2", "--y", "y", "--x", "x", "--restarts", "1", "--max-iter", "20",
                 "--float32", "--json", "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = _strict(out)
    assert res["x"] == ["x"] and res["n"] == 40
    assert _strict((out_dir / "fit.json").read_text()) == res


def test_fit_not_finite_is_exit_1_and_writes_nothing(files, capsys, monkeypatch):
    """fit_summary standing in for a fit that overflowed float32."""
    import conceptshift.diagnostics as diagnostics
    import conceptshift.inference as inference

    monkeypatch.setattr(inference, "fit_em", lambda *a, **k: None)
    monkeypatch.setattr(diagnostics, "fit_summary", lambda *a, **k: {
        "loglik": float("-inf"), "bic": float("nan"), "weights": [0.5, 0.5], "coef": [[np.nan, 1.0]] * 2,
        "scale": [1.0, 1.0], "converged": False, "n_iter": 0})
    code = main([*_argv(FIT, files), "--x", "x", "--float32", "--out", str(files / "o")])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "overflowed float32" in err and "loglik" in err and "drop --float32" in err
    assert not (files / "o" / "fit.json").exists()


def test_huge_values_fit_in_float64_or_are_refused(files):
    """1e200-sized columns: the library standardises, so float64 fits them; whatever happens, never a
    table or JSON of NaN (subprocess: the CLI switches JAX to float64)."""
    argv = ["fit", str(files / "huge.csv"), "-k", "2", "--y", "y", "--x", "x", "--restarts", "2",
            "--max-iter", "30", "--json", "--out", str(files / "o")]
    proc = subprocess.run([sys.executable, "-m", "conceptshift.cli", *argv], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # float64 (the CLI's default) fits them
    res = _strict(proc.stdout)
    assert np.isfinite(res["loglik"]) and "non_finite" not in res
    assert _strict((files / "o" / "fit.json").read_text()) == res
    assert "nan" not in proc.stdout.lower() and "Traceback" not in proc.stderr


def test_fit_that_overflows_on_the_data_scale_is_exit_1(files, capsys):
    """Gate covariances of x ~ 1e200 are ~1e400, beyond float64: the library refuses the fit
    (UnrepresentableFitError) and the CLI says so in one line, exit 1, no fit.json."""
    big = files / "bigx.csv"
    rng = np.random.default_rng(1)
    big.write_text("x,y\n" + "".join(f"{1e200 * v:.17g},{w:.17g}\n" for v, w in rng.normal(size=(30, 2))))
    argv = ["fit", str(big), "-k", "2", "--y", "y", "--x", "x", "--family", "gated", "--restarts",
            "2", "--max-iter", "30", "--out", str(files / "o2")]
    proc = subprocess.run([sys.executable, "-m", "conceptshift.cli", *argv], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "gate_cov overflow float64" in proc.stderr and "rescale the data" in proc.stderr
    assert not (files / "o2" / "fit.json").exists()


def test_strict_json_helpers():
    from conceptshift.files import dumps_strict, loads_strict, to_strict_json

    obj = {"a": np.float32("nan"), "b": [1.0, float("inf")], "c": {"d": np.array([2.0, -np.inf])},
           "e": (np.int64(3), np.bool_(True), None)}
    clean = to_strict_json(obj)
    assert clean == {"a": None, "b": [1.0, None], "c": {"d": [2.0, None]}, "e": [3, True, None],
                     "non_finite": ["a", "b", "c.d"]}
    assert loads_strict(dumps_strict(obj)) == clean
    with pytest.raises(ValueError, match="NaN"):
        loads_strict('{"a": NaN}')

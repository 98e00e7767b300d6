"""The sweep runner (config, atomic cells, resume) and the experiments' scientific checks."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import X64, once

from conceptshift.cli import main
from conceptshift.experiments import EXPERIMENTS, consistency, refinement_bias
from conceptshift.experiments.runner import Sweep, load_config


def test_load_config_layers(tmp_path):
    defaults = {"seed": 0, "n_grid": [1, 2], "lam": 1.0, "family": "regression", "flag": False}
    toml = tmp_path / "c.toml"
    toml.write_text('seed = 5\nn_grid = [10, 20, 40]\n')
    cfg = load_config(defaults, toml, ["lam=0.5", "n_grid=3,6", "flag=true"])
    assert cfg == {"seed": 5, "n_grid": [3, 6], "lam": 0.5, "family": "regression", "flag": True}
    with pytest.raises(ValueError, match="unknown knob 'nope'"):
        load_config(defaults, None, ["nope=1"])
    with pytest.raises(ValueError, match="seed"):
        load_config(defaults, None, ["seed=x"])
    with pytest.raises(ValueError, match="name=value"):
        load_config(defaults, None, ["seed"])
    bad = tmp_path / "bad.toml"
    bad.write_text("what = 1\n")
    with pytest.raises(ValueError, match="unknown knob 'what'"):
        load_config(defaults, bad)


def test_sweep_resumes_and_refuses_other_config(tmp_path):
    calls = []
    killed = []

    def fn(cell):
        calls.append(cell)
        if cell == 2 and not killed:
            killed.append(cell)
            raise KeyboardInterrupt  # killed mid-sweep
        return {"value": cell * 10}

    cells = [(f"c{i}", i) for i in range(4)]
    with pytest.raises(KeyboardInterrupt):
        Sweep(tmp_path, {"a": 1}, "toy").run(cells, fn, progress=False)
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["c0.json", "c1.json"]
    calls.clear()
    sweep = Sweep(tmp_path, {"a": 1}, "toy")
    res = sweep.run(cells, fn, progress=False)
    assert calls == [2, 3] and sweep.reused == ["c0", "c1"]
    assert res == {f"c{i}": {"value": i * 10} for i in range(4)}
    with pytest.raises(ValueError, match="another configuration"):
        Sweep(tmp_path, {"a": 2}, "toy")


def _toy(calls):
    def fn(cell):
        calls.append(cell)
        return {"value": cell * 10, "sq": [cell * cell, 1.0]}

    return fn


def test_sweep_recomputes_damaged_cells_naming_them(tmp_path, capsys):
    cells = [(f"c{i}", i) for i in range(5)]
    calls = []
    Sweep(tmp_path, {"a": 1}, "toy").run(cells, _toy(calls), progress=False)
    d = tmp_path / "cells"
    (d / "c0.json").write_text((d / "c0.json").read_text()[:20])  # truncated by a crash or a copy
    (d / "c1.json").write_text("{}")
    (d / "c2.json").write_text((d / "c2.json").read_text().replace('"value"', '"valve"'))
    (d / "c3.json").write_text("[1, 2]")
    calls.clear()
    sweep = Sweep(tmp_path, {"a": 1}, "toy")
    res = sweep.run(cells, _toy(calls), progress=False)
    err = capsys.readouterr().err
    assert calls == [0, 1, 2, 3] and sweep.reused == ["c4"]
    for name in ("c0", "c1", "c2", "c3"):
        assert f"damaged cell {d / name}.json" in err
    assert res == {f"c{i}": {"value": i * 10, "sq": [i * i, 1.0]} for i in range(5)}


def test_sweep_precision_is_part_of_the_folder(tmp_path, monkeypatch):
    from conceptshift.experiments import runner

    Sweep(tmp_path, {"a": 1}, "toy").run([("c0", 0)], _toy([]), progress=False)
    now = "float64" if X64 else "float32"
    other = "float32" if X64 else "float64"
    assert json.loads((tmp_path / "sweep.json").read_text())["precision"] == now
    monkeypatch.setattr(runner, "precision", lambda: other)
    with pytest.raises(ValueError, match=f"holds a {now} sweep and this run computes in {other}"):
        Sweep(tmp_path, {"a": 1}, "toy")


def test_sweep_refused_before_any_cell_leaves_no_marker(tmp_path):
    def refuse(cell):
        raise ValueError("restarts must be >= 1")

    with pytest.raises(ValueError):
        Sweep(tmp_path, {"restarts": 0}, "toy").run([("c0", 0)], refuse, progress=False)
    assert not (tmp_path / "sweep.json").exists()
    Sweep(tmp_path, {"restarts": 1}, "toy").run([("c0", 0)], _toy([]), progress=False)  # corrected
    (tmp_path / "cells").rename(tmp_path / "old")
    (tmp_path / "cells").write_text("")
    with pytest.raises(ValueError, match="cells is a file"):
        Sweep(tmp_path, {"restarts": 1}, "toy")
    (tmp_path / "cells").unlink()
    (tmp_path / "sweep.json").write_text('{"hash": ')
    with pytest.raises(ValueError, match="sweep.json is damaged"):
        Sweep(tmp_path, {"restarts": 1}, "toy")


def test_sweep_writes_strict_json(tmp_path):
    def fn(cell):
        return {"value": float("nan"), "ok": [1.0, float("inf")]}

    def strict(path):
        return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))

    sweep = Sweep(tmp_path, {"a": 1}, "toy")
    res = sweep.run([("c0", 0)], fn, progress=False)
    assert np.isnan(res["c0"]["value"]) and np.isnan(res["c0"]["ok"][1])  # NaN in memory
    cell = strict(tmp_path / "cells" / "c0.json")
    assert cell["value"] is None and cell["non_finite"] == ["value", "ok"]
    again = Sweep(tmp_path, {"a": 1}, "toy").run([("c0", 0)], fn, progress=False)
    assert again["c0"]["ok"][0] == 1.0 and np.isnan(again["c0"]["ok"][1])
    sweep.finish({"summary": res["c0"]["value"]}, lambda r, p: p.write_text("png"), "f.png")
    assert strict(tmp_path / "results.json")["non_finite"] == ["summary"]


def test_knobs_checked_by_type_and_range(tmp_path):
    toml = tmp_path / "c.toml"
    for text, message in [("restarts = 1.5", "restarts must be an integer"),
                          ("lam = nan", "lam must be a finite number"),
                          ("n_grid = 250", "n_grid must be a non-empty list"),
                          ("n_grid = [250, 0]", r"n_grid\[1\] must be >= 1"),
                          ("family = 3", "family must be a str")]:
        toml.write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            load_config(consistency.DEFAULTS, toml)
    for item, message in [("lam=-1", "lam must be >= 0"), ("restarts=0", "restarts must be >= 1"),
                          ("n_grid=250,1_000", "expected int"), ("tol=nan", "expected finite float")]:
        with pytest.raises(ValueError, match=message):
            load_config(consistency.DEFAULTS, None, [item])
    with pytest.raises(ValueError, match="replicates must be >= 2"):
        consistency.validate({**consistency.DEFAULTS, "replicates": 1})


def test_savefig_leaves_no_temporary_file(tmp_path):
    from conceptshift.experiments.common import savefig

    class Killed:
        def savefig(self, path, **kw):
            open(path, "wb").write(b"half a png")
            raise SystemExit(143)  # what the CLI's SIGTERM handler raises

    with pytest.raises(SystemExit):
        savefig(Killed(), tmp_path / "f.png")
    assert list(tmp_path.iterdir()) == []


SMALL_RB = ["n_x=41", "n_quad=60", "mc_draws=60000"]


@once  # Monte Carlo and quadrature tolerances, not the precision's
def test_refinement_bias_bound_and_prop32_identity(tmp_path):
    cfg = load_config(refinement_bias.DEFAULTS, None, SMALL_RB)
    res = refinement_bias.run(cfg, tmp_path, progress=False)
    for b in res["bias"]:
        assert b["bound_holds"] is True
        q = np.asarray(b["qhat"])
        np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-4)
        assert b["max_wrong_mass"] > 1e-3  # refinement leaves mass on wrong concepts
    # the paper's form p(k|x) e^{-c Delta^2} fails where p(k|x) is small (README notes on the paper)
    assert max(b["paper_form_max_ratio"] for b in res["bias"]) > 1
    for point in res["identity"]["points"]:
        assert point["max_abs_z_k"] < 4.5 and abs(point["z_mean"]) < 4.5
        assert point["ks_p_value"] > 1e-3
    assert (tmp_path / "refinement_bias.png").stat().st_size > 10_000


@once  # the runner's bookkeeping: precision-independent
def test_killed_sweep_resumes_to_identical_results(tmp_path, monkeypatch):
    cfg = load_config(refinement_bias.DEFAULTS, None, SMALL_RB)
    full = refinement_bias.run(cfg, tmp_path / "a", progress=False)

    real = refinement_bias.bias_cell
    count = {"n": 0}

    def dying(*args, **kw):
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(refinement_bias, "bias_cell", dying)
    with pytest.raises(KeyboardInterrupt):
        refinement_bias.run(cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(refinement_bias, "bias_cell", real)
    resumed = refinement_bias.run(cfg, tmp_path / "b", progress=False)
    assert resumed["cells_reused"] == ["kstar0"]
    assert "kstar0" not in resumed["cells_computed"]
    assert resumed["bias"] == full["bias"] and resumed["identity"] == full["identity"]
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["bias"] == full["bias"]


@pytest.mark.slow  # 60 s of CPU: `make test-slow` (and `make demo` shows the same at full size)
@pytest.mark.skipif(X64, reason="a statistical check of the estimators, run once: in the float32 pass")
def test_consistency_identification_is_consistent_and_baselines_are_not(tmp_path):
    """The acceptance checks at a reduced size over a 32-fold n range: identification and the
    oracle consistent; the default problem a weak-to-strong one (identification's PGR >= 0.9 at the
    largest n, weak training's and refinement's strictly between 0.05 and 0.95); plug-in refinement
    at its population value within Monte Carlo error."""
    cfg = load_config(consistency.DEFAULTS, None,
                      ["n_grid=250,1000,8000", "replicates=4", "n_test=1000"])
    res = consistency.run(cfg, tmp_path, progress=False)
    est = res["estimators"]
    assert set(est) >= {"source_only", "weak_only", "weak_training_sq", "refinement", "refinement_icl",
                        "identification", "oracle", "weak_labeller", "refinement_population"}
    for name in ("identification", "oracle"):
        si = est[name]["slope_interval"]
        assert si["slope"] < -0.4 and si["upper"] < 0, (name, est[name]["reg_error"]["mean"], si)
    ident_last = est["identification"]["reg_error"]["mean"][-1]
    for name in ("weak_training_sq", "refinement", "source_only", "weak_only"):
        assert est[name]["reg_error"]["mean"][-1] > 3 * ident_last, name
        assert est[name]["slope_reg_error"] > -0.4, name
    assert est["identification"]["pgr"]["mean"][-1] >= 0.9
    for name in ("weak_training_sq", "weak_training_ll", "refinement"):
        assert 0.05 < est[name]["pgr"]["mean"][-1] < 0.95, (name, est[name]["pgr"])
    plug, pop = est["refinement"]["reg_error"], est["refinement_population"]["reg_error"]
    tol = 3 * np.hypot(plug["se"][-1], pop["se"][-1]) + ident_last  # + the fit's own error
    assert abs(plug["mean"][-1] - pop["mean"][-1]) < tol, (plug["mean"], pop["mean"])
    assert all(m == 1.0 for m in est["identification"]["matching_accuracy"]["mean"][1:])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["estimators"]["oracle"]["n"] == [250, 1000, 8000]
    assert len(saved["estimators"]["oracle"]["reg_error"]["values"][0]) == 4
    assert set(saved) >= {"config", "versions", "estimators"}
    assert (tmp_path / "consistency.png").is_file()


def test_slope_interval_and_quantiles_against_a_loop():
    """The vectorised bootstrap of the log-log slope against a loop over resamples, exact on a power
    law; summarise's median and 10/90% quantiles against numpy's."""
    from conceptshift.experiments.common import loglog_slope, slope_interval, summarise

    # the vectorised least squares against numpy's polyfit, with a non-positive value left out
    curves = np.array([[1.0, 0.5, 0.2], [3.0, -1.0, 0.1]])
    want = [np.polyfit(np.log([100, 1000, 10000]), np.log(curves[0]), 1)[0],
            np.polyfit(np.log([100, 10000]), np.log([3.0, 0.1]), 1)[0]]
    np.testing.assert_allclose(loglog_slope([100, 1000, 10000], curves), want, rtol=1e-12)
    assert isinstance(loglog_slope([100, 1000], [1.0, 0.1]), float)
    assert np.isnan(loglog_slope([100, 1000], [1.0, 0.0]))

    n = [100, 1000, 10000]
    exact = slope_interval(n, [[2.0 / k] * 5 for k in n], n_boot=50, seed=0)
    assert exact["slope"] == pytest.approx(-1.0) and exact["median_slope"] == pytest.approx(-1.0)
    assert exact["lower"] == pytest.approx(-1.0) and exact["upper"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    vals = [np.exp(rng.normal(np.log(1.0 / k), 0.5, 8)) for k in n]
    got = slope_interval(n, vals, n_boot=4000, seed=1)
    logn = np.log(n)
    loop = [np.polyfit(logn, np.log([v[rng.integers(0, 8, 8)].mean() for v in vals]), 1)[0]
            for _ in range(4000)]
    assert got["lower"] == pytest.approx(np.percentile(loop, 5), abs=0.02)
    assert got["upper"] == pytest.approx(np.percentile(loop, 95), abs=0.02)
    cells = [{"a": {"m": list(v)}} for v in vals]
    s = summarise(cells, n)["a"]["m"]
    assert s["median"] == pytest.approx([np.median(v) for v in vals])
    assert s["q90"] == pytest.approx([np.quantile(v, 0.9) for v in vals])


def test_cli_experiment_errors(capsys):
    assert main(["experiment", "nope"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert main(["experiment", "consistency", "--set", "replicates=1"]) == 2
    assert "replicates" in capsys.readouterr().err
    assert main(["experiment", "consistency", "--set", "n_grid=a"]) == 2
    assert set(EXPERIMENTS) == {"consistency", "distinguishability", "refinement-bias", "weak-training",
                                "misspecified", "posterior", "icl", "anchors", "weak-to-strong",
                                "label-shift", "calibration"}


TINY = {
    "label-shift": ["n_grid=60,120", "shift_grid=0,1", "replicates=2", "restarts=2", "max_iter=30",
                    "n_test=100"],
    "weak-to-strong": ["n_grid=200,400", "replicates=2", "restarts=2", "max_iter=30", "n_test=200",
                       "n_boot=50"],
    "distinguishability": ["n_grid=40,80", "delta_grid=-1,1", "swap_grid=1", "replicates=2",
                           "restarts=2", "max_iter=30", "n_test=100"],
    "weak-training": ["n=200", "lam_grid=0.5,2", "replicates=2", "restarts=2", "max_iter=30",
                      "n_test=100"],
    "misspecified": ["n_grid=60", "k_grid=2,3", "replicates=2", "restarts=2", "max_iter=30",
                     "n_test=100"],
}


# smoke runs of 20-60 s: test-slow
HEAVY = {"misspecified", "distinguishability", "weak-training", "weak-to-strong", "label-shift"}


@pytest.mark.skipif(X64, reason="end-to-end smoke run of the sweeps, run once: in the float32 pass")
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in sorted(TINY)]
)
def test_other_experiments_run_end_to_end(name, tmp_path):
    mod = EXPERIMENTS[name]
    cfg = load_config(mod.DEFAULTS, None, TINY[name])
    res = mod.run(cfg, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"] == cfg and "versions" in saved and "estimators" in saved
    for fig in res["figures"]:
        assert (tmp_path / fig.rsplit("/", 1)[-1]).stat().st_size > 5_000
    assert all(np.isfinite(v) for v in _floats(saved["estimators"]))
    again = mod.run(cfg, tmp_path, progress=False)  # a finished sweep is read back, not recomputed
    assert again["cells_computed"] == [] and len(again["cells_reused"]) == len(res["cells_computed"])


def _floats(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _floats(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _floats(v)
    elif isinstance(tree, float):
        yield tree


def test_classification_metrics_and_pgr_by_brute_force():
    """Accuracy against scikit-learn's, ECE against a loop over bins, PGR's end points."""
    from sklearn.metrics import accuracy_score

    from conceptshift.diagnostics.metrics import classification_metrics, performance_gap_recovered
    from conceptshift.experiments.common import pgr_table

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=500)
    y = rng.integers(0, 3, 500)
    m = classification_metrics(jnp.log(jnp.asarray(p)), jnp.asarray(y, jnp.float32))
    assert float(m["accuracy"]) == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-6)
    conf, correct = p.max(1), p.argmax(1) == y
    bins = np.minimum((conf * 10).astype(int), 9)
    ece = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(10)) / 500
    assert float(m["ece"]) == pytest.approx(ece, abs=1e-5)
    assert float(performance_gap_recovered(0.4, 0.4, 0.1)) == 0.0
    assert float(performance_gap_recovered(0.4, 0.1, 0.1)) == 1.0
    assert np.isnan(float(performance_gap_recovered(0.1, 0.2, 0.1)))  # no gap to recover
    cell = {"weak_labeller": {"error": [0.4, 0.4]}, "oracle": {"error": [0.1, 0.2]},
            "identification": {"error": [0.25, 0.25]}}
    t = pgr_table([cell], n_boot=200, seed=0)
    assert t["identification"]["mean"] == [pytest.approx(0.15 / 0.25)]
    assert t["oracle"]["mean"] == [1.0] and "weak_labeller" not in t
    lo, hi = t["identification"]["lower"][0], t["identification"]["upper"][0]
    assert 0.5 - 1e-9 <= lo <= 0.6 <= hi <= 0.75 + 1e-9  # the ceiling's two values give 0.5 or 0.75 (or 0.6)

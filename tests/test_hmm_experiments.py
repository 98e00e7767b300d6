"""The mixture-of-HMMs experiments: knob validation (fast) and end-to-end runs with resume (slow: the
replicate compiles five Baum-Welch fits)."""

import json

import pytest
from conftest import once

from conceptshift.experiments import EXPERIMENTS
from conceptshift.experiments.runner import load_config

TINY = ["n_grid=40,80", "replicates=2", "n_test=50", "restarts=1", "max_iter=10", "n_states=3",
        "n_tokens=5", "length=5", "n_components=2"]


def test_registered():
    assert {"icl", "anchors"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name, bad, message", [
    ("icl", ["m_grid=-1"], "m_grid"),
    ("icl", ["target_concept=5"], "target_concept"),
    ("icl", ["n_grid=2"], "n_grid"),
    ("anchors", ["n_tokens=2", "n_states=4"], "n_tokens must be >= n_states"),
    ("anchors", ["replicates=1"], "replicates"),
])
def test_bad_knobs_are_rejected_before_running(name, bad, message):
    mod = EXPERIMENTS[name]
    with pytest.raises(ValueError, match=message):  # by the knob bounds or the experiment's own
        mod.validate(load_config(mod.DEFAULTS, None, bad))


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [("icl", ["m_grid=0,2,8", "target_concept=1"]), ("anchors", [])])
def test_experiment_runs_end_to_end_and_resumes(tmp_path, name, extra):
    mod = EXPERIMENTS[name]
    cfg = load_config(mod.DEFAULTS, None, TINY + extra)
    res = mod.run(cfg, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == name and len(res["cells_computed"]) >= 2
    assert (tmp_path / f"{name}.png").is_file()
    mod.table(saved)
    mod.reading(saved)
    again = mod.run(cfg, tmp_path, progress=False)
    assert again["cells_computed"] == [] and len(again["cells_reused"]) == len(res["cells_computed"])


@pytest.mark.slow
@once
def test_one_generic_replicate_serves_both_families_without_recompiling():
    """experiments.common.replicate (the one the regression experiments run, tests/test_experiments.py)
    runs HMM problems; problems that differ only in their knobs (anchors) share one compiled
    program."""
    import jax

    from conceptshift.experiments.common import Design, compiled_replicates
    from conceptshift.experiments.hmm_common import HMM_ESTIMATORS, hmm_problem_from
    from conceptshift.inference.estimators import EMOptions

    opts = EMOptions(restarts=1, max_iter=5, tol=0.0)
    design = Design(n_max=40, n_test=30, opts=opts, estimators=HMM_ESTIMATORS,
                    noweak_match="components", source_fit_errors=True)
    cfg = {"seed": 0, "n_components": 2, "n_states": 2, "n_tokens": 4, "length": 4}
    fn = compiled_replicates(design)
    keys = jax.random.split(jax.random.key(0), 2)
    out = [fn(keys, 30, hmm_problem_from(cfg, anchors=a)) for a in ("on", "off")]
    assert fn._cache_size() == 1
    for o in out:
        assert set(o) == set(HMM_ESTIMATORS) | {"source_fit"}
        assert {"kl", "excess_nll", "trans_error"} <= set(o["oracle"])
        assert {"matching_accuracy", "matching_margin"} <= set(o["identification_noweak"])
        assert o["oracle"]["kl"].shape == (2,)

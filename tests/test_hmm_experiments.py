"""The mixture-of-HMMs experiments: knob validation (fast) and end-to-end runs with resume (slow: the
replicate compiles five Baum-Welch fits)."""

import json

import pytest

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

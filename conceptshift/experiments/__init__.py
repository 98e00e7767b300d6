"""The paper's experiments, each a module with NAME, DEFAULTS, validate(cfg), run(cfg, out_dir) and
table(results)."""

from conceptshift.experiments import anchors, icl  # mixture of HMMs (Example 2.7)

from . import consistency, distinguishability, misspecified, posterior, refinement_bias, weak_training

EXPERIMENTS = {
    m.NAME: m for m in (consistency, distinguishability, refinement_bias, weak_training, misspecified)
}
EXPERIMENTS.update({m.NAME: m for m in (icl, anchors)})
EXPERIMENTS[posterior.NAME] = posterior

__all__ = ["EXPERIMENTS"]

"""The paper's experiments, each a module with NAME, DEFAULTS, validate(cfg), run(cfg, out_dir) and
table(results)."""

from . import consistency, distinguishability, misspecified, posterior, refinement_bias, weak_training

EXPERIMENTS = {
    m.NAME: m for m in (consistency, distinguishability, refinement_bias, weak_training, misspecified)
}
EXPERIMENTS[posterior.NAME] = posterior

__all__ = ["EXPERIMENTS"]

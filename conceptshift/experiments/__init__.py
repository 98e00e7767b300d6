"""The paper's experiments, each a module with NAME, DEFAULTS, validate(cfg), run(cfg, out_dir) and
table(results)."""

from . import (
    anchors,  # mixture of HMMs (Example 2.7)
    calibration,  # uncertainty over the matching
    consistency,
    distinguishability,
    icl,  # mixture of HMMs (Example 2.7)
    label_shift,  # EMQ and BBSE against Algorithm 1
    misspecified,
    posterior,
    refinement_bias,
    weak_to_strong,  # classification (Burns et al. 2023)
    weak_training,
)

EXPERIMENTS = {m.NAME: m for m in (consistency, distinguishability, refinement_bias, weak_training,
                                   misspecified, icl, anchors, posterior, calibration,
                                   weak_to_strong, label_shift)}

__all__ = ["EXPERIMENTS"]

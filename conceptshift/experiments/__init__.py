"""The paper's experiments, each a module with DEFAULTS, run(cfg, out_dir) and table(results)."""

from . import consistency

EXPERIMENTS = {consistency.NAME: consistency}

__all__ = ["EXPERIMENTS"]

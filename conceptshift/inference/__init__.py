"""Fitting: EM (closed-form M-steps, vmapped restarts)."""

from .em import EMResult, e_step, fit_em

__all__ = ["EMResult", "e_step", "fit_em"]

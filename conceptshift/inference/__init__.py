"""Fitting: EM (closed-form M-steps, vmapped restarts)."""

from .baum_welch import HMMEMResult, fit_hmm_em
from .em import EMResult, e_step, fit_em

__all__ = ["EMResult", "e_step", "fit_em", "HMMEMResult", "fit_hmm_em"]

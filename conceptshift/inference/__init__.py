"""Fitting: EM (closed-form M-steps, vmapped restarts)."""

from .baum_welch import HMMEMResult, fit_hmm_em
from .em import EMResult, e_step, fit_em, fit_em_range
from .gem import fit_gem
from .joint import JointPosterior, fit_joint
from .mcmc import fit_nuts, relabel
from .select import ComponentChoice, choose_components
from .svi import fit_svi
from .target import TargetBootstrap, TargetFit, fit_target

__all__ = ["EMResult", "e_step", "fit_em", "HMMEMResult", "fit_hmm_em"]
__all__ += ["fit_gem", "fit_nuts", "fit_svi", "relabel"]
__all__ += ["TargetBootstrap", "TargetFit", "fit_target"]
__all__ += ["ComponentChoice", "choose_components", "fit_em_range"]
__all__ += ["JointPosterior", "fit_joint"]

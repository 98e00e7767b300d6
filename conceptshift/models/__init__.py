"""Model families, each a NumPyro generative model defined once, and ground-truth problems."""

from ._experts import DataStats, ExpertsFamily, Standardiser, numpyro_numerics
from .basis import Basis
from .batch import Batch
from .gated import GatedExperts, GatedParams
from .glm import (
    BinomialMixture,
    CategoricalMixture,
    GLMGaussianParams,
    GLMParams,
    GLMSoftmaxParams,
    LogisticMixture,
    PoissonRegressionMixture,
)
from .hmm import HMMMixture, HMMParams
from .hmm_problem import HMMProblem, HMMProblemSpec, make_hmm_problem, simulate_hmm
from .problem import (
    Problem,
    ProblemSpec,
    Sample,
    Simulation,
    make_problem,
    permute_target_concepts,
    simulate,
)
from .registry import (
    FAMILIES,
    check_family,
    family,
    family_class,
    family_example,
    family_name,
    family_names,
    register_family,
)
from .regression import RegressionMixture, RegressionParams
from .softmax_gated import SoftmaxGatedExperts, SoftmaxGatedParams

__all__ = [
    "Batch",
    "FAMILIES",
    "check_family",
    "family",
    "family_class",
    "family_example",
    "family_name",
    "family_names",
    "register_family",
    "Basis",
    "DataStats",
    "ExpertsFamily",
    "Standardiser",
    "numpyro_numerics",
    "GatedExperts",
    "GatedParams",
    "Problem",
    "ProblemSpec",
    "Sample",
    "Simulation",
    "make_problem",
    "permute_target_concepts",
    "simulate",
    "RegressionMixture",
    "RegressionParams",
    "HMMMixture",
    "HMMParams",
    "HMMProblem",
    "HMMProblemSpec",
    "make_hmm_problem",
    "simulate_hmm",
    "SoftmaxGatedExperts",
    "SoftmaxGatedParams",
    "CategoricalMixture",
    "GLMGaussianParams",
    "GLMParams",
    "GLMSoftmaxParams",
    "LogisticMixture",
    "PoissonRegressionMixture",
    "BinomialMixture",
]

"""What every experiment knob means (``conceptshift experiment describe NAME``).

``KNOB_HELP`` holds the meaning of each knob name as the regression-style problems read it;
``HMM_KNOB_HELP`` the meaning of the names a mixture-of-HMMs problem reads differently. A test
checks that every knob of every experiment has an entry, so a new knob comes with its meaning.
"""

from __future__ import annotations

KNOB_HELP = {
    # the problem (conceptshift.models.ProblemSpec)
    "seed": "seed of the problem and of every replicate's data",
    "family": "regression, gated, softmax, logistic, categorical or poisson: the mixture family "
              "of the truth (and of the fits)",
    "n_components": "K, latent concepts (components) of the truth and of the fits",
    "n_features": "D, covariates per row",
    "degree": "polynomial degree of the truth's experts in x",
    "separation": "smallest distance between the components' strong heads",
    "noise": "standard deviation of the strong heads' noise (the t scale with noise_df)",
    "shift": "label shift: pi^p = softmax(+shift/2 c), pi^q = softmax(-shift/2 c), c evenly "
             "spaced in [-1, 1]",
    "weak_bias": "distance of each concept's weak head from its strong head (the weak labeller's "
                 "bias)",
    "weak_shift": "distance of each target weak head from the source's (0: the weak labeller does "
                  "not shift between domains)",
    "weak_noise": "standard deviation of the weak heads' noise",
    "gate_separation": "distance between the gate means (gated family), in units of x's scale",
    "n_classes": "classes of a categorical response",
    "weak_labeller": "heads (the weak label is a head of the family) or noise (class families: "
                     "the strong label flipped at per-concept rates)",
    "flip": "mean flip rate of the label-noise weak labeller (weak_labeller=noise)",
    "flip_spread": "range of the flip rates over the concepts (weak_labeller=noise)",
    "flip_to": "where a flipped label goes: class (one class per concept) or other (uniform)",
    "weak_swap": "fraction of the way each target weak head moves towards the next concept's "
                 "source weak head (the matching margin crosses 0 near 1/2)",
    "covariate_shift": "the target's x drawn around covariate_shift along the first coordinate "
                       "(constant and softmax gates)",
    "strong_drift": "distance the target's strong heads move from the source's (components not "
                    "shared: Assumption 2.1 broken)",
    "pi_p": "the source proportions, K values summing to 1 ([]: from shift)",
    "pi_q": "the target proportions, K values summing to 1, one-hot allowed ([]: from shift)",
    "noise_df": "0: Gaussian noise; nu > 1: Student's t noise with nu degrees of freedom, fitted "
                "by Gaussian experts (regression family)",
    # the sweep
    "n_grid": "sample sizes n (source rows; the weak target has as many unless target_scale)",
    "replicates": "simulated data sets per cell",
    "n_test": "gold test rows on which q(y | x) is scored",
    "restarts": "EM restarts per fit (the best log-likelihood is kept)",
    "max_iter": "EM iterations per restart at most",
    "tol": "EM's relative tolerance on its objective",
    "lam": "weak training's weight lambda on the source's labels",
    "n_demos": "M, demonstrations per query of in-context refinement",
    "n_draws": "demonstration sets per query of in-context refinement",
    "n_boot": "bootstrap resamples (intervals of PGR and of the fitted rates, or EM refits)",
    "target_scale": "the weak target sample has target_scale times the source's n rows",
    "fit_degree": "0: fit the truth's degree; p > 0: fit experts of degree p (misspecified "
                  "experts)",
    "delta_grid": "Delta values (Assumption 4.5's distinguishability) the weak heads are drawn at",
    "swap_grid": "weak_swap values, from a clear matching to a wrong one",
    "level": "probability of the central intervals of q̂(x) (0.9: from the 5% to the 95% quantile "
             "over the draws)",
    "methods": "routes to a band of q̂(x): em_bootstrap, svi_fullrank (separate fits), joint_svi, "
               "joint_nuts (the joint model, matching summed out)",
    "two_truths": "also run the two-truths case (same observable laws, different q)",
    "shift_grid": "weak_shift values swept, from 0 (label shift) upward",
    "k_grid": "numbers of components fitted (the truth has n_components)",
    "lam_grid": "values of lambda of weak training",
    "identity_x": "the covariate at which Prop. 3.2's identity is checked",
    "n_x": "points of the x grid",
    "x_range": "the x grid spans [-x_range, x_range]",
    "n_quad": "quadrature points of the exact expectations",
    "mc_draws": "Monte Carlo draws of the expectations checked against quadrature",
    "n": "rows per domain",
    "hdi_prob": "probability of the credible and confidence bands",
    "svi_steps": "SVI optimisation steps",
    "svi_lr": "SVI learning rate",
    "num_chains": "NUTS chains",
    "num_warmup": "NUTS warmup steps per chain",
    "num_samples": "NUTS draws per chain",
    # mixtures of HMMs (names only they read)
    "n_states": "S, hidden states of each concept's HMM",
    "n_tokens": "V, vocabulary size (V >= S)",
    "length": "T, tokens per sequence",
    "anchors": "on, partial or off: whether each state has an anchor token only it emits",
    "anchor_mass": "probability of each state's anchor token(s)",
    "m_grid": "numbers of demonstrations M of in-context refinement",
    "target_concept": "-1: the target mixes the concepts by pi^q; k: Example 3.3's single concept k",
}

HMM_KNOB_HELP = {
    "separation": "theta_k = separation Perm_k + (1 - separation) Dirichlet rows (1: deterministic "
                  "cycles, 0: no structure)",
    "weak_noise": "how far the weak source emission tau^wp is from tau",
    "weak_shift": "how far the weak target emission tau^wq is from tau^wp",
    "n_components": "K, concepts (one HMM each)",
}


def knob_help(name: str, hmm: bool = False) -> str:
    """The meaning of knob ``name`` (the HMM reading where ``hmm``)."""
    if hmm and name in HMM_KNOB_HELP:
        return HMM_KNOB_HELP[name]
    return KNOB_HELP[name]

# wall time of each experiment with its defaults, measured on the shared 2-core machine
# (`conceptshift experiment NAME`, float32)
RUNTIMES = {
    "consistency": "about 1 min",
    "distinguishability": "about 2 min",
    "refinement-bias": "about 6 s",
    "weak-training": "about 15 s",
    "misspecified": "about 2 min",
    "posterior": "1.5-6 min",
    "calibration": "8-21 min",
    "weak-to-strong": "about 5-6 min",
    "label-shift": "about 95 s",
    "icl": "about 3.5 min",
    "anchors": "about 11 min",
}


def summary(module) -> str:
    """The first paragraph of an experiment module's docstring, on one line, without its
    "Experiment `name`:" prefix."""
    first = module.__doc__.strip().split("\n\n")[0]
    text = " ".join(first.split())
    if text.startswith("Experiment `"):
        text = text.split(":", 1)[1].strip()
    return text

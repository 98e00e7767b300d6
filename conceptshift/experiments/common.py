"""Pieces the experiments share: the problem from a config, one compiled replicate of the estimators
for every family (:func:`replicate`, its :class:`Design` and :func:`score`), summaries over
replicates, log-log slopes, and plotting helpers."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..diagnostics.figures import pyplot, savefig  # noqa: F401 (the experiments' figure helpers)
from ..diagnostics.metrics import categorical_kl, classification_metrics, matching_accuracy
from ..inference.estimators import Data, EMOptions, as_data, estimate_all
from ..inference.predictor import Predictor
from ..inference.refinement import refined, refined_icl
from ..models.problem import Problem, ProblemSpec, make_problem

PROBLEM_KNOBS = {
    "family": "regression",
    "n_components": 3,
    "n_features": 1,
    "degree": 1,
    "separation": 3.0,
    "noise": 0.5,
    "shift": 2.0,
    "weak_bias": 0.5,
    "weak_shift": 0.3,
    "weak_noise": 1.0,
    "gate_separation": 3.0,
    "n_classes": 3,
    "weak_labeller": "heads",
    "flip": 0.3,
    "flip_spread": 0.5,
    "flip_to": "class",
    "weak_swap": 0.0,
    "covariate_shift": 0.0,
    "strong_drift": 0.0,
    "pi_p": [],
    "pi_q": [],
    "noise_df": 0.0,
}
EM_KNOBS = {"restarts": 8, "max_iter": 200, "tol": 1e-6}

LABELS = {
    "source_only": "source only",
    "weak_only": "weak only",
    "weak_training_sq": "weak training (squared loss)",
    "weak_training_ll": "weak training (likelihood)",
    "refinement": "label refinement",
    "refinement_icl": "in-context refinement",
    "refinement_icl_concept": "in-context refinement, demos from the query's concept",
    "identification": "identification (Alg. 1)",
    "identification_noweak": "identification, no weak source labels",
    "oracle": "oracle (gold target labels)",
    "proportions_em": "EMQ (target proportions by EM)",
    "bbse": "BBSE (confusion-matrix inversion)",
    "proportions_x": "x only (target proportions from x, no label)",
    "weak_labeller": "weak labeller (true q(y'|x))",
    "refinement_population": "label refinement, population (true source model)",
}
IDENTIFICATION_ONLY = ("weak_only", "identification", "identification_noweak", "oracle")
# estimators whose predictor is a K-component mixture of the family under constant proportions (their
# parameter errors are reported); the refinements' proportions depend on x
MIXTURE_ESTIMATORS = ("source_only", "weak_only", "weak_training_ll", "identification",
                      "identification_noweak", "oracle", "proportions_em", "bbse",
                      "proportions_x")


def problem_from(cfg: dict, **override) -> Problem:
    knobs = {k: cfg[k] for k in PROBLEM_KNOBS if k in cfg}
    for name in ("pi_p", "pi_q"):  # [] (the default): from the shift construction
        if name in knobs:
            knobs[name] = tuple(knobs[name]) or None
    knobs.update(override)
    if cfg.get("delta") is not None and "delta" not in override:
        knobs["delta"] = cfg["delta"]
    return make_problem(jax.random.key(cfg["seed"]), ProblemSpec(**knobs))


def em_options(cfg: dict) -> EMOptions:
    return EMOptions(int(cfg["restarts"]), int(cfg["max_iter"]), float(cfg["tol"]))


@dataclass(frozen=True)
class Design:
    """What one replicate runs, for every family (static: part of the compiled program).

    ``estimators``: the names of :func:`~conceptshift.inference.estimators.estimate_all` to run
    (None: every one the family supports); ``noweak_match``: the matching of
    ``identification_noweak`` (``"strong"`` heads, or ``"components"``: an HMM's transitions);
    ``n_components``: fit that many components instead of the truth's (misspecification);
    ``degree``: fit experts of that polynomial degree instead of the truth's (misspecified experts;
    families with a ``degree``);
    ``n_draws``: demonstration sets per query of in-context refinement; ``m_grid``: in-context
    refinement also at these numbers of demonstrations M, scored as ``icl_M{M}`` (nested
    demonstration sets), with
    ``strong_demo_head`` also through the strong head (metrics suffixed ``_strong_demo_head``) and
    with ``concept_demos`` also with the demonstrations drawn from the query's own concept (Prop.
    3.2's reading, the concepts those of the weak target fit; metrics suffixed ``_concept``);
    ``source_fit_errors``: the two-head source fit's parameter errors against P as ``source_fit``;
    ``fit_info``: the source and target fits' BIC as ``fit``; ``weak_labeller``: the true weak
    labeller of Q, q(y' | x) taken as a predictor of y, scored as ``weak_labeller`` (the weak
    supervisor's own performance, for the performance gap recovered); ``population_refinement``:
    label refinement's q_re from the true source model and the true weak labeller of Q (what the
    plug-in ``refinement`` converges to), scored as ``refinement_population`` (problems whose weak
    label is a head of the family); ``target_scale``: the weak target sample (and the oracle's
    gold sample) has ``target_scale`` times the source's n rows (n_Q' != n_P)."""

    n_max: int
    n_test: int
    opts: EMOptions
    estimators: tuple[str, ...] | None = None
    lam: float = 1.0
    n_demos: int = 8
    noweak_match: str = "strong"
    n_components: int | None = None
    degree: int | None = None
    m_grid: tuple[int, ...] = ()
    n_draws: int = 8
    strong_demo_head: bool = False
    concept_demos: bool = False
    source_fit_errors: bool = False
    fit_info: bool = False
    weak_labeller: bool = False
    population_refinement: bool = False
    target_scale: float = 1.0


def design_from(cfg: dict, n_max: int, **fields) -> Design:
    """The :class:`Design` of an experiment's config (``n_test``, ``lam``, ``n_demos``, ``n_draws``
    and the EM knobs) with ``fields`` on top."""
    return Design(n_max=int(n_max), n_test=int(cfg["n_test"]), opts=em_options(cfg),
                  lam=float(cfg.get("lam", 1.0)), n_demos=int(cfg.get("n_demos", 8)),
                  n_draws=int(cfg.get("n_draws", 8)),
                  target_scale=float(cfg.get("target_scale", 1.0)), **fields)


def score(pred: Predictor, truth: Predictor, test: Data) -> dict:
    """The metrics of an estimate against the true q(y | x) on the gold test sample, for every
    family: ``excess_nll`` (E[log q - log q̂], a Monte Carlo KL), ``reg_error`` (E_x (q̂(x) -
    q(x))^2) where y has a mean, ``kl`` (exact E_x KL(q || q̂) over the classes) where y is
    categorical, and where y is one class label per row also ``accuracy``, ``error`` and ``ece``
    (:func:`~conceptshift.diagnostics.metrics.classification_metrics`)."""
    x, y = test.x, test.y
    out = {"excess_nll": jnp.mean(truth.log_prob(x, y) - pred.log_prob(x, y))}
    if hasattr(truth.model, "conditional_mean"):
        out["reg_error"] = jnp.mean((pred.mean(x) - truth.mean(x)) ** 2)
    if hasattr(truth.model, "conditional_log_probs"):
        lp = pred.log_probs(x)
        out["kl"] = categorical_kl(truth.log_probs(x), lp)
        if lp.ndim == 2 and y.ndim == 1:  # a class label per row
            out.update(classification_metrics(lp, y))
    return out


def replicate(key, n, problem, *, design: Design) -> dict:
    """Every estimator of ``design`` and its metrics on one simulated data set with n source and n
    target rows, for every family (``problem``: a :class:`~conceptshift.models.Problem` or
    :class:`~conceptshift.models.hmm_problem.HMMProblem`, through ``simulate_data``,
    ``strong_model``, ``fit_model``, ``truth_labels`` and ``param_errors``).

    The sample is drawn at size ``n_max`` and rows past ``n`` get weight 0, so every n (and every
    problem of the same shapes: its parameters are traced) shares one compiled program.
    """
    ksim, kest, kicl = jax.random.split(key, 3)
    n_target_max = max(1, math.ceil(design.n_max * design.target_scale))
    sim = problem.simulate_data(ksim, design.n_max, n_target_max, design.n_test)
    m1 = problem.strong_model
    dtype = problem.params_p.log_weights.dtype
    w = (jnp.arange(design.n_max) < n).astype(dtype)
    wt = (jnp.arange(n_target_max, dtype=dtype) < jnp.asarray(n, dtype) * design.target_scale).astype(dtype)
    s, t = as_data(sim.source, w), as_data(sim.target, wt)
    src, tgt, gold = s, Data(t.x, None, t.y_weak, wt), Data(t.x, t.y, None, wt)
    test = as_data(sim.test)
    model = problem.fit_model  # the truth's family, Gaussian where the truth's noise is not
    if design.n_components is not None:
        model = dataclasses.replace(model, n_components=design.n_components)
    if design.degree is not None:
        model = dataclasses.replace(model, degree=design.degree)
    est = estimate_all(model, kest, src, tgt, gold, lam=design.lam, n_demos=design.n_demos,
                       opts=design.opts, names=design.estimators, noweak_match=design.noweak_match,
                       n_draws=design.n_draws, label_draws=LABEL_DRAWS)
    truth = Predictor(m1, m1.select_heads(problem.params_q, (0,)))
    # parameter errors and matchings against the truth need the truth's shapes
    comparable = model.n_components == m1.n_components and \
        getattr(model, "degree", None) == getattr(m1, "degree", None)
    out = {}
    for name, pred in est.predictors.items():
        out[name] = score(pred, truth, test)
        if name in MIXTURE_ESTIMATORS and comparable:
            out[name].update(problem.param_errors(pred.params, "q"))
    target_fit = est.fits.get("target")
    for name, ident in (("identification", est.identification),
                        ("identification_noweak", est.identification_noweak)):
        if ident is None:
            continue
        if comparable:
            src_truth = problem.truth_labels(ident.predictor.params, 0, "p", 0)
            tgt_truth = problem.truth_labels(target_fit.params, 0, "q", 1)
            out[name]["matching_accuracy"] = matching_accuracy(ident.assignment, src_truth, tgt_truth)
        out[name]["matching_margin"] = ident.margin
        out[name]["matching_prob"] = ident.matching_prob
        # the share of replicates whose fits look unreliable: a fit with a single restart at its
        # best optimum (of several), degenerate or not converged
        need = min(2, design.opts.restarts)
        flags = [(f.restarts_at_best < need) | f.degenerate | ~f.converged
                 for f in (ident.source_fit, ident.target_fit)]
        out[name]["unreliable_fit"] = (flags[0] | flags[1]).astype(dtype)
        out[name]["greedy_bijection"] = ident.greedy_bijection.astype(dtype)
        out[name]["greedy_agrees"] = jnp.all(ident.greedy == ident.assignment).astype(dtype)
    if design.weak_labeller:
        out["weak_labeller"] = score(problem.weak_labeller(), truth, test)
    if design.population_refinement and not getattr(problem, "label_noise", False):
        m2 = problem.model.with_heads(2)
        pop = refined(m2, jax.random.fold_in(key, 7), problem.params_p,
                      m2.select_heads(problem.params_q, (1,)), n_draws=LABEL_DRAWS)
        out["refinement_population"] = score(pop, truth, test)
    if design.m_grid:
        m2 = model.with_heads(2)
        s2 = est.fits["source"].params
        for M in design.m_grid:
            def icl(head, M=M):
                return refined_icl(m2, kicl, s2, tgt.x, tgt.y_weak, wt, n_demos=M,
                                   n_draws=design.n_draws, m_pool=max(design.m_grid),
                                   demo_head=head)

            out[f"icl_M{M}"] = score(icl(1), truth, test)
            if design.strong_demo_head:
                out[f"icl_M{M}"].update({f"{k}_strong_demo_head": v
                                         for k, v in score(icl(0), truth, test).items()})
            if design.concept_demos:
                own = refined_icl(m2, kicl, s2, tgt.x, tgt.y_weak, wt, n_demos=M,
                                  n_draws=design.n_draws, m_pool=max(design.m_grid),
                                  demos="concept", target_params=target_fit.params)
                out[f"icl_M{M}"].update({f"{k}_concept": v
                                         for k, v in score(own, truth, test).items()})
    if design.source_fit_errors and comparable:
        out["source_fit"] = problem.param_errors(est.fits["source"].params, "p")
    if design.fit_info:
        out["fit"] = {"source_bic": est.fits["source"].bic, "target_bic": target_fit.bic}
    return out


LABEL_DRAWS = 512  # draws of y' per target component in refinement's expectation (experiments)
_COMPILED: dict = {}


def compiled_replicates(design: Design):
    """jit(vmap(replicate)) over replicate keys, called as ``fn(keys, n, problem)``; n and the
    problem's parameters are traced, so one compile serves every n and every problem with the same
    static part (its shapes; for regression problems also the knobs kept in their spec, all but
    those that only matter when the problem is drawn: see ``problem._problem_flatten``), and
    repeated runs in one process reuse it."""
    if design not in _COMPILED:
        fn = partial(replicate, design=design)
        _COMPILED[design] = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))
    return _COMPILED[design]


def check_n_grid(cfg: dict) -> None:
    """An n sweep's knobs: a non-empty ``n_grid`` with every n >= 2 K, and at least 2 replicates."""
    grid = cfg["n_grid"]
    if not grid or any(int(n) < 2 * cfg["n_components"] for n in grid):
        raise ValueError(f"n_grid must be non-empty with every n >= 2 * n_components, got {grid}")
    if int(cfg["replicates"]) < 2:
        raise ValueError(f"replicates must be >= 2 (for standard errors), got {cfg['replicates']}")


def sweep_over_problems(cfg: dict, out_dir, name: str, problems: dict, *, progress: bool,
                        **design_fields):
    """The replicates of every problem of ``problems`` ({label: problem}, in sweep order) at every n
    of ``cfg["n_grid"]`` (one compiled program, :func:`design_from` with ``design_fields``), run as
    a resumable :class:`~.runner.Sweep` of cells ``{label}_n{n}`` (``n{n}`` for the label "");
    returns (sorted n grid, the sweep, {label: its cells in n order})."""
    from .runner import Sweep

    grid = sorted(int(n) for n in cfg["n_grid"])
    sweep = Sweep(out_dir, cfg, name)
    fn = None

    def key(label, n):
        return f"{label}_n{n}" if label else f"n{n}"

    def cell(item):
        nonlocal fn
        i, label, n = item
        if fn is None:
            fn = compiled_replicates(design_from(cfg, max(grid), **design_fields))
        return to_lists(fn(cell_keys(cfg["seed"], i, int(cfg["replicates"])), n, problems[label]))

    items = list(enumerate((label, n) for label in problems for n in grid))
    cells = sweep.run([(key(label, n), (i, label, n)) for i, (label, n) in items], cell,
                      progress=progress)
    return grid, sweep, {label: [cells[key(label, n)] for n in grid] for label in problems}


def sweep_over_n(cfg: dict, out_dir, name: str, problem, *, progress: bool, **design_fields):
    """:func:`sweep_over_problems` of one problem: (sorted grid, the sweep, the cells in grid
    order)."""
    grid, sweep, cells = sweep_over_problems(cfg, out_dir, name, {"": problem}, progress=progress,
                                             **design_fields)
    return grid, sweep, cells[""]


def grid_tables(cells: dict, names, metrics) -> dict:
    """{estimator: {metric: {"mean", "se", "median"}}} as [problem][n] tables from
    :func:`sweep_over_problems`' cells (metrics an estimator lacks are left out)."""
    out = {}
    first = next(iter(cells.values()))[0]
    for name in names:
        entry = {}
        for metric in metrics:
            if metric not in first[name]:
                continue
            vals = [[np.asarray(c[name][metric], float) for c in row] for row in cells.values()]
            table = [[mean_se(v) for v in row] for row in vals]
            entry[metric] = {"mean": [[m for m, _ in row] for row in table],
                             "se": [[e for _, e in row] for row in table],
                             "median": [[quantiles(v, (0.5,))[0] for v in row] for row in vals]}
        out[name] = entry
    return out


def cell_keys(seed: int, cell_index: int, replicates: int):
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), cell_index), replicates)


def to_lists(tree) -> dict:
    """Device arrays -> nested lists of Python floats (per replicate)."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float64).tolist(), tree)


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se


def loglog_slope(n, err):
    """Least-squares slope of log(err) against log(n) along the last axis of ``err`` (values <= 0
    or not finite left out; nan with fewer than 2 left): a float for one curve, an array for a
    stack of them."""
    x = np.log(np.asarray(n, float))
    e = np.asarray(err, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(e) & (e > 0)
        y = np.where(ok, np.log(np.where(ok, e, 1.0)), 0.0)
        c = ok.sum(-1)
        xm, ym = (ok * x).sum(-1) / c, y.sum(-1) / c
        dx = np.where(ok, x - xm[..., None], 0.0)
        slope = np.where(c >= 2, (dx * (y - ym[..., None])).sum(-1) / (dx * dx).sum(-1), np.nan)
    return float(slope) if slope.ndim == 0 else slope


def quantiles(values, q=(0.5, 0.1, 0.9)) -> list[float]:
    """Quantiles of the finite values (nan where none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return [float(a) for a in np.quantile(v, q)] if v.size else [float("nan")] * len(q)


def summarise(cells: list[dict], n_grid: list[int]) -> dict:
    """{estimator: {"n": grid, metric: {"mean", "se", "median", "q10", "q90": [...]}}} over the
    replicates of each cell (the quantiles: a band that one failed replicate does not drag)."""
    out = {}
    for name in cells[0]:
        if name in ("fit", "source_fit"):
            continue
        entry = {"n": list(n_grid)}
        for metric in cells[0][name]:
            means, ses = zip(*(mean_se(c[name][metric]) for c in cells), strict=True)
            med, lo, hi = zip(*(quantiles(c[name][metric]) for c in cells), strict=True)
            entry[metric] = {"mean": list(means), "se": list(ses), "median": list(med),
                             "q10": list(lo), "q90": list(hi)}
        for metric in ("reg_error", "kl"):
            if metric in entry:
                entry[f"slope_{metric}"] = loglog_slope(n_grid, entry[metric]["mean"])
        out[name] = entry
    return out


def slope_interval(n_grid, values, n_boot: int, seed: int, level: float = 0.9) -> dict:
    """The log-log slope of the mean error against n (the exponent alpha of error ~ n^alpha), of
    the median error, and a percentile bootstrap interval of the first: ``values`` [n][replicate];
    each bootstrap draw resamples every n's replicates (independent data sets) and refits the slope
    of the resampled means."""
    rng = np.random.default_rng(seed)
    vals = [np.asarray(v, dtype=np.float64) for v in values]
    vals = [np.where(np.isfinite(v), v, np.nan) for v in vals]  # +-inf left out like nan
    means = [v[np.isfinite(v)].mean() if np.isfinite(v).any() else np.nan for v in vals]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():  # an all-nan cell: nan
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.stack([np.nanmean(v[rng.integers(0, v.size, (n_boot, v.size))], axis=1)
                      for v in vals], axis=1)  # (n_boot, n)
    boots = loglog_slope(n_grid, m)
    tail = 100 * (1 - level) / 2
    ok = np.isfinite(boots)
    lo, hi = np.percentile(boots[ok], [tail, 100 - tail]) if ok.any() else (np.nan, np.nan)
    return {"slope": loglog_slope(n_grid, means), "lower": float(lo), "upper": float(hi),
            "median_slope": loglog_slope(n_grid, [quantiles(v, (0.5,))[0] for v in vals]),
            "level": level}


def _pgr(weak, err, ceil):
    """PGR of the mean errors over the last axis (replicates)."""
    gap = weak.mean(-1) - ceil.mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > 0, (weak.mean(-1) - err.mean(-1)) / gap, np.nan)


def pgr_table(cells: list[dict], n_boot: int, seed: int, metric: str = "error") -> dict:
    """{estimator: {"mean": [...], "lower": [...], "upper": [...]}}: the performance gap recovered
    PGR = (err_weak - err) / (err_weak - err_oracle) per n, from the mean of ``metric`` over
    replicates (err_weak: the true weak labeller's, ``weak_labeller``; err_oracle: the oracle's),
    with a 90% percentile bootstrap interval (replicates resampled jointly: the estimators of one
    replicate share its data). nan where the weak labeller is no worse than the oracle."""
    rng = np.random.default_rng(seed)
    names = [n for n in cells[0] if n not in ("weak_labeller", "fit", "source_fit")
             and metric in cells[0][n]]
    out = {n: {"mean": [], "lower": [], "upper": []} for n in names}
    for cell in cells:
        err = {n: np.asarray(cell[n][metric], float) for n in cells[0] if metric in cell[n]}
        R = err["oracle"].shape[0]
        idx = rng.integers(0, R, size=(n_boot, R))
        weak, ceil = err["weak_labeller"], err["oracle"]
        for n in names:
            boot = _pgr(weak[idx], err[n][idx], ceil[idx])
            lo, hi = np.nanpercentile(boot, [5, 95]) if np.isfinite(boot).any() else (np.nan, np.nan)
            out[n]["mean"].append(float(_pgr(weak, err[n], ceil)))
            out[n]["lower"].append(float(lo))
            out[n]["upper"].append(float(hi))
    return out


def separate_fit_draws(route: str, m1, keys, source_fit, target_fit, source_x, source_ys, target_x,
                       target_y_weak, *, n_boot: int, num_samples: int, svi_steps: int, svi_lr: float,
                       progress: bool = False):
    """Draws of the two separate fits behind Algorithm 1's q̂, as the posterior and calibration
    experiments make them: ``"em_bootstrap"`` (a parametric bootstrap of each EM fit, ``n_boot``
    refits) or ``"svi_fullrank"`` (a full-rank Gaussian guide of each domain from its EM fit,
    ``num_samples`` draws relabelled to it).

    ``keys``: (source fit, target fit, source draws, target draws). Returns (source draws, target
    draws, each with one leading axis; the two SVIResults, or None for the bootstrap)."""
    from ..inference import fit_svi
    from ..inference.mcmc import relabel
    from ..inference.uncertainty import bootstrap_em

    m2 = m1.with_heads(2)
    ks, kt, k_sd, k_td = keys
    if route == "em_bootstrap":
        return (bootstrap_em(m2, ks, source_fit.params, source_x, n_boot),
                bootstrap_em(m1, kt, target_fit.params, target_x, n_boot), None)
    if route != "svi_fullrank":
        raise ValueError(f"route must be 'em_bootstrap' or 'svi_fullrank', got {route!r}")
    kw = dict(guide="fullrank", num_steps=svi_steps, learning_rate=svi_lr, progress=progress)
    sr = fit_svi(m2, ks, source_x, source_ys, init_params=source_fit.params, **kw)
    tr = fit_svi(m1, kt, target_x, target_y_weak, init_params=target_fit.params, **kw)
    sdraw, _ = relabel(m2, sr.sample_params(k_sd, num_samples), source_fit.params, n_batch=1,
                       batch=m2.batch(source_x, source_ys))
    tdraw, _ = relabel(m1, tr.sample_params(k_td, num_samples), target_fit.params, n_batch=1,
                       batch=m1.batch(target_x, target_y_weak))
    return sdraw, tdraw, (sr, tr)

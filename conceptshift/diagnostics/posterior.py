"""ArviZ (>= 1.0, xarray DataTree) view of a posterior over q(y | x), checked against the truth.

:func:`posterior_datatree` builds one DataTree from draws of a single-head family's parameters
(relabelled NUTS draws, guide draws, bootstrap refits or Algorithm 1's matched draws):

group                  variables
---------------------  -----------------------------------------------------------------------
posterior              weights, coef, scale (gate_mean, gate_cov), q_mean = q̂(x) at the test x
sample_stats           what the sampler reports (diverging, acceptance_rate, lp, ...), if given
posterior_predictive   y ~ q̂(y | x) at the gold test x, one per draw
log_likelihood         y: log q̂(y_test | x_test) per draw (for PSIS-LOO)
observed_data          y: the gold test responses
constant_data          x: the gold test covariates
matching               assignment: the matching chosen in each draw (when given)
truth                  the true parameters (components in the posterior's order, attribute
                       truth_permutation), q_mean = q(x) and log_lik = log q(y_test | x_test)

:func:`diagnose` summarises it (R-hat, ESS, ELPD by PSIS-LOO under q̂ and the truth's test
log-likelihood, PIT calibration, coverage of q(x) by HDIs); :func:`plot_posterior` draws the q̂(x)
band against q(x), a posterior predictive check and rank plots. R-hat, ESS, rank plots and
PSIS-LOO are for Markov chains only: a tree of independent draws (bootstrap refits, a variational
guide's draws; the root attribute ``draws``, :func:`draws_kind`) gets the rest.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..inference.mcmc import draws_convergence, threshold_failures

PARAM_VARS = ("weights", "coef", "scale", "gate_mean", "gate_cov", "gate_weights")


def _dims(K, H, P, D, prefix=("chain", "draw")):
    pre = list(prefix)
    return {
        "weights": pre + ["component"],
        "coef": pre + ["component", "term"],
        "scale": pre + ["component"],
        "gate_mean": pre + ["component", "feature"],
        "gate_cov": pre + ["component", "feature", "feature_bis"],
        "gate_weights": pre + ["component", "feature"],
    }


def _param_arrays(params) -> dict:
    """q̂'s parameters as arrays (one head: its size-1 axis dropped)."""
    out = {"weights": np.exp(np.asarray(params.log_weights, np.float64)),
           "coef": np.asarray(params.coef, np.float64)[..., 0, :],
           "scale": np.exp(np.asarray(params.log_scale, np.float64))[..., 0]}
    if hasattr(params, "gate_mean"):
        out["gate_mean"] = np.asarray(params.gate_mean, np.float64)
        out["gate_cov"] = np.asarray(params.gate_cov, np.float64)
    if hasattr(params, "gate_weights"):
        out["gate_weights"] = np.asarray(params.gate_weights, np.float64)
    return out


def _aligned_truth(model, true, flat_draws):
    """The true parameters with their components in the posterior's order: the permutation that
    matches the truth's components to the draws' mean per-component vectors
    (``model.relabel_vectors``) at the least total squared distance. Returns (params, perm), perm[k]
    the true component shown as component k."""
    from ..inference.matching import optimal_assignment

    vec = np.asarray(jax.vmap(model.relabel_vectors)(flat_draws), np.float64).mean(0)
    tv = np.asarray(model.relabel_vectors(true), np.float64)
    cost = np.sum((vec[:, None, :] - tv[None, :, :]) ** 2, axis=-1)
    perm = np.asarray(optimal_assignment(cost))
    return model.permute(true, jnp.asarray(perm)), perm


def _draw_fns(model):
    def one(params, key, x, y):
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            mean = model.conditional_mean(params, x)
            logp = model.conditional_log_prob(params, x, y)
            ypp = model.sample_conditional(key, params, x)[:, 0]
        return mean, logp, ypp

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))


_FNS: dict = {}


DRAWS = ("mcmc", "independent")
VARIABLE_ATTRS = {
    "weights": ("proportion pi_k", "the target's proportion of concept k (q̂: the source component "
                                   "under the matched target proportion)"),
    "coef": ("expert coefficients beta_k", "the strong head's coefficients of component k, by term"),
    "scale": ("noise standard deviation sigma_k", "the strong head's noise scale of component k"),
    "gate_mean": ("gate mean m_k", "the Gaussian gate's mean of x for component k"),
    "gate_cov": ("gate covariance S_k", "the Gaussian gate's covariance of x for component k"),
    "gate_weights": ("gate slopes W_k", "the softmax gate's slopes of component k"),
    "q_mean": ("q̂(x)", "the mean of q̂(y | x) at each gold test x"),
    "log_lik": ("log q(y | x)", "the truth's log-density of each gold test point"),
}


def draws_kind(dt) -> str:
    """``"mcmc"`` (chains of a Markov chain: R-hat, ESS, rank plots and PSIS-LOO apply) or
    ``"independent"`` (bootstrap refits, a variational guide's draws: none of those apply), from
    the tree's ``draws`` attribute; a tree without it is independent when it has one chain."""
    kind = dt.attrs.get("draws")
    if kind in DRAWS:
        return kind
    return "independent" if dt["posterior"].sizes.get("chain", 1) < 2 else "mcmc"


def posterior_datatree(model, draws, x_test, y_test, key, *, sample_stats: dict | None = None,
                       truth=None, name: str = "qhat", attrs: dict | None = None,
                       draws_kind: str = "mcmc", assignments=None, fit_draws: dict | None = None,
                       matching_posterior=None):
    """The DataTree described in the module docs.

    Args:
      model: a single-head family (q̂'s family).
      draws: its parameters with leading (chain, draw) axes.
      draws_kind: ``"mcmc"`` (Markov chains) or ``"independent"`` (bootstrap refits, guide
        draws: one chain of independent draws), stored as the root attribute ``draws``.
      assignments: optional (chain, draw, K) integers, the matching Algorithm 1 chose for each
        draw (``identification_draws``), kept as the group ``matching`` (:func:`matching_summary`).
      fit_draws: optional {name: (chain, draw, ...) array}, the sampled parameters of the fits
        behind q̂ (relabelled), kept as the group ``fit_posterior``: their R-hat and ESS are the
        sampler's convergence, apart from the matching
        (:func:`~conceptshift.inference.mcmc.param_arrays` builds it).
      matching_posterior: optional (assignments (M, K), prob (M,)), the posterior probability of
        each matching given the data (``average_matching_posterior``, or the joint model's
        ``matching_prob``), kept as the group ``matching_posterior``.
      x_test, y_test: gold test data (N, D) and (N,).
      key: for the posterior predictive draws.
      sample_stats: arrays of shape (chain, draw), e.g. ``MCMCResult.sample_stats``.
      truth: a :class:`conceptshift.models.Problem` (its target Q), or None.
      attrs: extra root attributes (str, int or float values).
    """
    import xarray as xr
    from arviz_base import from_dict

    if model.n_heads != 1:
        raise ValueError(f"model must have one head (q̂'s family), got n_heads={model.n_heads}")
    if draws_kind not in DRAWS:
        raise ValueError(f"draws_kind must be one of {DRAWS}, got {draws_kind!r}")
    x_test = jnp.asarray(x_test)
    y_test = jnp.asarray(y_test, x_test.dtype)
    if x_test.ndim != 2 or y_test.shape != (x_test.shape[0],):
        raise ValueError(f"x_test must be (N, D) and y_test (N,), got {x_test.shape} and {y_test.shape}")
    C, S = draws.coef.shape[:2]
    N = x_test.shape[0]
    flat = jax.tree_util.tree_map(lambda a: a.reshape((C * S,) + a.shape[2:]), draws)
    if model not in _FNS:
        _FNS[model] = _draw_fns(model)
    keys = jax.random.split(key, C * S)
    mean, logp, ypp = (np.asarray(a, np.float64).reshape(C, S, N)
                       for a in _FNS[model](flat, keys, x_test, y_test))
    K, H, P = draws.coef.shape[2:]
    D = x_test.shape[1]
    post = _param_arrays(draws)
    post["q_mean"] = mean
    dims = _dims(K, H, P, D)
    dims.update(q_mean=["chain", "draw", "obs"], y=["chain", "draw", "obs"])
    groups = {"posterior": post, "posterior_predictive": {"y": ypp}, "log_likelihood": {"y": logp}}
    if sample_stats:
        groups["sample_stats"] = {k: np.asarray(v) for k, v in sample_stats.items()}
    terms = ["Intercept" if t == "1" else t for t in model.coef_names]
    coords = {"component": np.arange(K), "term": terms,
              "obs": np.arange(N), "feature": np.arange(D), "feature_bis": np.arange(D)}
    dt = from_dict(groups, name=name, coords=coords, dims=dims)
    dt["observed_data"] = xr.DataTree(xr.Dataset(
        {"y": (("obs",), np.asarray(y_test, np.float64))}, coords={"obs": np.arange(N)}))
    dt["constant_data"] = xr.DataTree(xr.Dataset(
        {"x": (("obs", "feature"), np.asarray(x_test, np.float64))},
        coords={"obs": np.arange(N), "feature": np.arange(D)}))
    if truth is not None:
        true, perm = _aligned_truth(model, truth.heads("q", "strong"), flat)
        dt_attrs_truth = {"truth_permutation": ",".join(str(int(i)) for i in perm)}
        tv = _param_arrays(true)
        tdims = _dims(K, H, P, D, prefix=())
        data = {k: (tuple(tdims[k]), v) for k, v in tv.items()}
        data["q_mean"] = (("obs",), np.asarray(truth.true_mean(x_test), np.float64))
        data["log_lik"] = (("obs",), np.asarray(truth.true_log_prob(x_test, y_test), np.float64))
        tcoords = {c: coords[c] for c in ("component", "term", "obs", "feature")}
        if "gate_cov" in tv:
            tcoords["feature_bis"] = coords["feature_bis"]
        dt["truth"] = xr.DataTree(xr.Dataset(data, coords=tcoords, attrs=dt_attrs_truth))
    for var, (long_name, meaning) in VARIABLE_ATTRS.items():
        for group in ("posterior", "truth"):
            if group in dt.children and var in dt[group].data_vars:
                dt[group][var].attrs.update(long_name=long_name, description=meaning)
    if assignments is not None:
        a = np.asarray(assignments)
        if a.shape != (C, S, K):
            raise ValueError(f"assignments must have shape (chain, draw, K) = {(C, S, K)}, got "
                             f"{a.shape}")
        dt["matching"] = xr.DataTree(xr.Dataset(
            {"assignment": (("chain", "draw", "component"), a.astype(np.int64),
                            {"long_name": "matched target component a(k)",
                             "description": "the target component Algorithm 1 matched to source "
                                            "component k in each draw"})},
            coords={"chain": np.arange(C), "draw": np.arange(S), "component": np.arange(K)}))
    if fit_draws:
        fit = {}
        for name, v in fit_draws.items():
            v = np.asarray(v, np.float64)
            if v.shape[:2] != (C, S):
                raise ValueError(f"fit_draws[{name!r}] must have leading (chain, draw) = {(C, S)}, got "
                                 f"{v.shape}")
            fit[name] = (("chain", "draw") + tuple(f"{name}_dim_{i}" for i in range(v.ndim - 2)), v)
        dt["fit_posterior"] = xr.DataTree(xr.Dataset(
            fit, coords={"chain": np.arange(C), "draw": np.arange(S)},
            attrs={"description": "the sampled parameters of the fits behind q̂, relabelled"}))
    if matching_posterior is not None:
        perms, prob = (np.asarray(a) for a in matching_posterior)
        if perms.ndim != 2 or perms.shape[1] != K or prob.shape != perms.shape[:1]:
            raise ValueError(f"matching_posterior must be (assignments (M, {K}), prob (M,)), got shapes "
                             f"{perms.shape} and {prob.shape}")
        dt["matching_posterior"] = xr.DataTree(xr.Dataset(
            {"prob": (("matching",), prob.astype(np.float64),
                      {"long_name": "posterior probability of the matching",
                       "description": "p(a | heads) under the shift prior, averaged over the draws "
                                      "(the posterior given the data for the joint model's draws; "
                                      "an approximation for separate fits' draws)"}),
             "assignment": (("matching", "component"), perms.astype(np.int64),
                            {"long_name": "matched target component a(k)"})},
            coords={"matching": [",".join(map(str, r)) for r in perms], "component": np.arange(K)}))
    dt.attrs["draws"] = draws_kind
    for k, v in (attrs or {}).items():
        dt.attrs[k] = v
    return dt


def write_datatree(dt, path) -> None:
    """Writes the DataTree as netCDF (h5netcdf), atomically; its name is kept in an attribute."""
    path = Path(path)
    dt = dt.copy()
    dt.attrs["datatree_name"] = dt.name or ""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        dt.to_netcdf(tmp, engine="h5netcdf")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_datatree(path):
    """Reads a DataTree written by :func:`write_datatree` fully into memory.

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file, when it is not a readable netCDF file (truncated, another format).
    """
    import xarray as xr

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with xr.open_datatree(path, engine="h5netcdf") as dt:
            dt = dt.load()
    except Exception as err:  # h5py, h5netcdf and xarray raise many kinds for a damaged file
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"{path}: not a readable netCDF DataTree ({reason})") from None
    dt.name = dt.attrs.pop("datatree_name", None) or None
    return dt


# group -> variables that diagnose() and plot_posterior() read
REQUIRED = {"posterior": ("weights", "scale", "q_mean"), "log_likelihood": ("y",),
            "posterior_predictive": ("y",), "observed_data": ("y",), "constant_data": ("x",)}


def load_posterior(path):
    """:func:`read_datatree`, checked to hold the groups and variables of :func:`posterior_datatree`.

    Raises:
      ValueError: naming the file and what it lacks.
    """
    dt = read_datatree(path)
    for group, names in REQUIRED.items():
        if group not in dt.children:
            raise ValueError(f"{path} is not a conceptshift posterior DataTree (no {group} group)")
        missing = [v for v in names if v not in dt[group].data_vars]
        if missing:
            raise ValueError(f"{path} is not a conceptshift posterior DataTree ({group} lacks "
                             f"{', '.join(missing)})")
    if "truth" in dt.children and not {"q_mean", "log_lik"} <= set(dt["truth"].data_vars):
        raise ValueError(f"{path}: its truth group lacks q_mean or log_lik")
    return dt


def pit_values(dt) -> np.ndarray:
    """PIT of each gold test response under the posterior predictive, mean over draws of
    1[y_rep <= y], shape (N,). Uniform when q̂ is calibrated."""
    ypp = dt["posterior_predictive"]["y"].values  # (C, S, N)
    y = dt["observed_data"]["y"].values
    return np.mean(ypp <= y[None, None, :], axis=(0, 1))


def ks_uniform(u: np.ndarray) -> tuple[float, float]:
    """Kolmogorov-Smirnov distance of u from Uniform(0, 1) and its asymptotic p-value."""
    u = np.sort(np.asarray(u, np.float64))
    n = u.size
    i = np.arange(1, n + 1)
    d = float(max(np.max(i / n - u), np.max(u - (i - 1) / n)))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    p = 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101))
    return d, float(min(max(p, 0.0), 1.0))


def hdi_coverage(dt, prob: float = 0.9) -> tuple[float, np.ndarray]:
    """Fraction of test points whose true q(x) lies in the ``prob`` HDI of q̂(x); and the per-point
    indicator (N,)."""
    from arviz_stats import hdi

    band = hdi(dt, prob=prob, var_names=["q_mean"])["q_mean"]
    lo = band.sel(ci_bound="lower").values
    hi = band.sel(ci_bound="upper").values
    true = dt["truth"]["q_mean"].values
    inside = (lo <= true) & (true <= hi)
    return float(np.mean(inside)), inside


def _finite_extreme(column, fn) -> float:
    v = np.asarray(column, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(fn(v)) if v.size else float("nan")


def fit_convergence(dt) -> dict | None:
    """R-hat (rank-normalised, split), bulk and tail ESS over the tree's ``fit_posterior`` group,
    the sampled parameters themselves (Markov chains only): ``max_rhat_fit``, ``min_ess_bulk_fit``,
    ``min_ess_tail_fit`` and ``worst_rhat_fit`` (the variable with the largest R-hat), as
    :func:`~conceptshift.inference.mcmc.draws_convergence` computes them."""
    if "fit_posterior" not in dt.children or draws_kind(dt) != "mcmc":
        return None
    conv = draws_convergence({v: da.values for v, da in dt["fit_posterior"].data_vars.items()})
    if conv is None:  # nothing varied
        return None
    return {"max_rhat_fit": conv["max_rhat"], "min_ess_bulk_fit": conv["min_ess_bulk"],
            "min_ess_tail_fit": conv["min_ess_tail"], "worst_rhat_fit": conv["worst_rhat"]}


def matching_posterior_report(dt) -> dict | None:
    """The tree's ``matching_posterior`` group as plain numbers: ``matching_posterior_best`` (the
    most probable matching, "a(0),...,a(K-1)"), ``matching_posterior_prob`` (its probability) and
    ``matching_posterior_top`` (the three most probable, "a: p" separated by semicolons)."""
    if "matching_posterior" not in dt.children:
        return None
    g = dt["matching_posterior"]
    prob = g["prob"].values
    names = [str(m) for m in g["matching"].values]
    order = np.argsort(-prob, kind="stable")
    return {"matching_posterior_best": names[order[0]],
            "matching_posterior_prob": float(prob[order[0]]),
            "matching_posterior_top": ";".join(f"{names[i]}: {prob[i]:.3g}" for i in order[:3])}


def matching_summary(dt) -> dict | None:
    """How sure the draws are of the matching (the tree's ``matching`` group, None without one):
    ``matching_share``, the share of draws whose matching is the most frequent one;
    ``matchings_seen``, how many distinct matchings the draws chose; ``matchings``, the three most
    frequent as "a(0),...,a(K-1): share" separated by semicolons; and for Markov chains
    ``chains_disagree``, whether the chains' most frequent matchings differ (chains that settled in
    different matchings: their q̂ mixes relabelled answers, and R-hat over q̂'s parameters need
    not show it)."""
    if "matching" not in dt.children:
        return None
    a = dt["matching"]["assignment"].values  # (C, S, K)
    C, S, K = a.shape
    rows, inverse, counts = np.unique(a.reshape(-1, K), axis=0, return_inverse=True,
                                      return_counts=True)
    codes = inverse.reshape(C, S)  # each draw's matching as an index into rows
    out = {"matching_share": float(counts.max() / codes.size), "matchings_seen": int(len(rows))}
    top = np.argsort(-counts, kind="stable")[:3]
    out["matchings"] = ";".join(  # the most frequent matchings, a(0),...,a(K-1): share of draws
        f"{','.join(map(str, rows[t]))}: {counts[t] / codes.size:.3f}" for t in top)
    if draws_kind(dt) == "mcmc" and C > 1:
        modes = [np.unique(codes[c], return_counts=True) for c in range(C)]
        out["chains_disagree"] = len({int(v[np.argmax(n)]) for v, n in modes}) > 1
    return out


def failed_checks(d: dict, n_chains: int) -> list[str]:
    """The sampler checks a :func:`diagnose` result fails, as sentences (empty: none failed).

    Markov chains only (independent draws have nothing to check here): R-hat of q̂'s parameters and
    of the fits' (``max_rhat``, ``max_rhat_fit``) at most 1.01; bulk and tail ESS at least 100 per
    chain; no divergent transitions; E-BFMI at least 0.3 (the thresholds of
    :func:`~conceptshift.inference.mcmc.threshold_failures`); chains that agree on the most
    frequent matching."""
    if d.get("draws") != "Markov chains":
        return []
    fits = "the fits' parameters" + (f" (worst: {d['worst_rhat_fit']})" if "worst_rhat_fit" in d else "")
    rhat = [(f"R-hat of {what} ", d[key], "") for key, what in (("max_rhat", "q̂'s parameters"),
                                                                 ("max_rhat_fit", fits)) if key in d]
    ess = [(f"{what} ", d[key]) for key, what in (("min_ess_bulk", "bulk ESS of q̂'s parameters"),
                                                  ("min_ess_tail", "tail ESS of q̂'s parameters"),
                                                  ("min_ess_bulk_fit", "bulk ESS of the fits' parameters"),
                                                  ("min_ess_tail_fit", "tail ESS of the fits' parameters"))
           if key in d]
    out = threshold_failures(n_chains, rhat=rhat, ess=ess, divergences=d.get("divergences", 0),
                             bfmi_min=d.get("bfmi_min"))
    if d.get("chains_disagree"):
        out.append("chains settle in different matchings")
    return out


def diagnose(dt, *, prob: float = 0.9) -> dict:
    """R-hat and ESS of every parameter; the ELPD of the gold test data under q̂ against the truth's
    test log-likelihood; PIT calibration; HDI coverage of q(x) (when the DataTree has a truth).

    The gold test data are held out (not in the fit), so their expected log predictive density is
    estimated directly, ``elpd_test`` = sum_i log mean_s q̂_s(y_i | x_i), and compared with
    ``elpd_truth`` = sum_i log q(y_i | x_i) (``elpd_gap_per_obs``: their difference per point, an
    estimate of E_x KL(q || q̂_Bayes)). ArviZ's PSIS-LOO on the same log-likelihood is reported as
    ``elpd_loo`` with its Pareto k: it treats the points as if they were in the fit, so it is
    pessimistic here and its k-hat values flag that.

    Returns a dict of plain numbers plus ``summary`` (a pandas DataFrame from
    ``arviz_stats.summary``); for Markov chains ``failed_checks``, the sampler checks of
    :func:`failed_checks` that fail, separated by semicolons ("none" if all pass).
    """
    import warnings

    from arviz_stats import loo, summary

    names = [v for v in PARAM_VARS if v in dt["posterior"].data_vars]
    mcmc = draws_kind(dt) == "mcmc"
    table = summary(dt, var_names=names, kind="all" if mcmc else "stats", round_to="none")
    out = {"summary": table, "draws": "Markov chains" if mcmc else "independent draws",
           "n_draws": int(dt["posterior"].sizes["chain"] * dt["posterior"].sizes["draw"])}
    if mcmc:
        out.update(max_rhat=_finite_extreme(table["r_hat"], np.max),
                   min_ess_bulk=_finite_extreme(table["ess_bulk"], np.min),
                   min_ess_tail=_finite_extreme(table["ess_tail"], np.min))
    ll = dt["log_likelihood"]["y"].values  # (C, S, N)
    n = ll.shape[-1]
    flat = ll.reshape(-1, n)
    m = np.max(flat, axis=0)
    lppd = m + np.log(np.mean(np.exp(flat - m[None, :]), axis=0))
    out["n_test"] = int(n)
    out["elpd_test"] = float(np.sum(lppd))
    out["elpd_test_se"] = float(np.sqrt(n) * np.std(lppd))
    if mcmc:  # PSIS-LOO reweights posterior draws; bootstrap or guide draws are not those
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elpd = loo(dt, var_name="y")
        out["elpd_loo"] = float(elpd.elpd)
        out["elpd_loo_se"] = float(elpd.se)
        out["pareto_k_max"] = float(np.max(np.asarray(elpd.pareto_k)))
    pit = pit_values(dt)
    out["pit_ks"], out["pit_ks_pvalue"] = ks_uniform(pit)
    if "truth" in dt.children:
        out["elpd_truth"] = float(np.sum(dt["truth"]["log_lik"].values))
        out["elpd_gap_per_obs"] = (out["elpd_truth"] - out["elpd_test"]) / n
        out["hdi_prob"] = prob
        out["hdi_coverage"], _ = hdi_coverage(dt, prob)
        q_hat = dt["posterior"]["q_mean"].mean(("chain", "draw")).values
        out["reg_error"] = float(np.mean((q_hat - dt["truth"]["q_mean"].values) ** 2))
    if "sample_stats" in dt.children and "diverging" in dt["sample_stats"].data_vars:
        out["divergences"] = int(np.sum(dt["sample_stats"]["diverging"].values))
    out.update(matching_summary(dt) or {})
    out.update(matching_posterior_report(dt) or {})
    out.update(fit_convergence(dt) or {})
    if mcmc and "sample_stats" in dt.children and "energy" in dt["sample_stats"].data_vars:
        from arviz_stats import bfmi

        out["bfmi_min"] = float(np.min(bfmi(dt)["energy"].values))  # below 0.3: poor exploration
    if mcmc:
        out["failed_checks"] = "; ".join(failed_checks(out, int(dt["posterior"].sizes["chain"]))) or "none"
    return out


def plot_posterior(dt, out_dir, *, prob: float = 0.9, prefix: str = "") -> list[str]:
    """Figures into ``out_dir``: ``{prefix}band.png`` (q̂(x) band against q(x), one-dimensional x
    only), ``{prefix}ppc.png`` (posterior predictive check), ``{prefix}rank.png`` (rank plots of the
    proportions and scales; Markov chains only). Returns the paths written."""
    from arviz_stats import hdi

    from .figures import pyplot, savefig

    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    x = dt["constant_data"]["x"].values
    if x.shape[1] == 1:
        order = np.argsort(x[:, 0])
        xs = x[order, 0]
        band = hdi(dt, prob=prob, var_names=["q_mean"])["q_mean"]
        lo = band.sel(ci_bound="lower").values[order]
        hi = band.sel(ci_bound="upper").values[order]
        mean = dt["posterior"]["q_mean"].mean(("chain", "draw")).values[order]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.scatter(x[:, 0], dt["observed_data"]["y"].values, s=4, color="0.75", label="gold test data")
        ax.fill_between(xs, lo, hi, alpha=0.3, color="C0", lw=0, label=f"{prob:.0%} HDI of q̂(x)")
        ax.plot(xs, mean, color="C0", lw=1.5, label="posterior mean of q̂(x)")
        if "truth" in dt.children:
            ax.plot(xs, dt["truth"]["q_mean"].values[order], "k--", lw=1.2, label="truth q(x)")
        ax.set(xlabel="x", ylabel="E[y | x]", title=dt.attrs.get("title", "q̂(x) against q(x)"))
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        p = out_dir / f"{prefix}band.png"
        savefig(fig, p)
        plt.close(fig)
        paths.append(str(p))
    fig = _ppc_figure(plt, dt)
    p = out_dir / f"{prefix}ppc.png"
    savefig(fig, p)
    plt.close(fig)
    paths.append(str(p))
    fig = _rank_figure(plt, dt, ("weights", "scale")) if draws_kind(dt) == "mcmc" else None
    if fig is not None:  # rank plots compare chains: none for independent draws
        p = out_dir / f"{prefix}rank.png"
        savefig(fig, p)
        plt.close(fig)
        paths.append(str(p))
    return paths


def _ppc_figure(plt, dt, n_draws: int = 50):
    """Posterior predictive check: kernel density of the gold test responses against that of
    ``n_draws`` posterior predictive data sets at the same x."""
    from scipy.stats import gaussian_kde

    y = dt["observed_data"]["y"].values
    ypp = dt["posterior_predictive"]["y"].values.reshape(-1, y.shape[0])
    pick = np.random.default_rng(0).choice(ypp.shape[0], min(n_draws, ypp.shape[0]), replace=False)
    lo, hi = min(y.min(), ypp[pick].min()), max(y.max(), ypp[pick].max())
    grid = np.linspace(lo, hi, 256)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    pick = [j for j in pick if np.std(ypp[j]) > 0]  # a constant draw has no kernel density
    for i, j in enumerate(pick):
        ax.plot(grid, gaussian_kde(ypp[j])(grid), color="C0", alpha=0.25, lw=0.8,
                label=f"posterior predictive draws ({len(pick)})" if i == 0 else None)
    if np.std(y) > 0:
        ax.plot(grid, gaussian_kde(y)(grid), color="k", lw=1.6, label="gold test responses")
    ax.set(xlabel="y at the gold test x", ylabel="density (Gaussian kernel)",
           title=f"Posterior predictive check: {dt.attrs.get('method', '')}".rstrip(": "))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return fig


def _rank_figure(plt, dt, names, n_bins: int = 20):
    """Rank plots: for each scalar parameter, the ranks of its draws among all chains' draws,
    histogrammed per chain; chains that sample the same distribution give flat, overlapping
    histograms (the dashed line)."""
    post = dt["posterior"]
    panels = []
    for name in names:
        if name not in post.data_vars:
            continue
        v = post[name].values  # (C, S, ...)
        flat = v.reshape(v.shape[0], v.shape[1], -1)
        for i in range(flat.shape[-1]):
            if np.std(flat[..., i]) > 0:
                panels.append((f"{name}[{i}]", flat[..., i]))
    if not panels:  # nothing varies across draws (e.g. one component)
        return None
    C, S = post.sizes["chain"], post.sizes["draw"]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows), squeeze=False)
    edges = np.linspace(0, C * S, n_bins + 1)
    for ax, (label, a) in zip(axes.ravel(), panels, strict=False):
        ranks = np.argsort(np.argsort(a.ravel(), kind="stable"), kind="stable").reshape(C, S)
        for c in range(C):
            counts, _ = np.histogram(ranks[c], bins=edges)
            ax.step(edges[:-1], counts, where="post", color=f"C{c}", lw=1.2, label=f"chain {c}")
        ax.axhline(S / n_bins, color="k", ls="--", lw=0.8, label="uniform")
        ax.set(title=label, xlabel="rank among all draws", ylabel="draws per bin")
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=8)
    fig.suptitle(f"Rank plots (Markov chains): {dt.attrs.get('method', '')}".rstrip(": "))
    fig.tight_layout(rect=(0, 0.06 if nrows > 1 else 0.1, 1, 1))
    return fig


def render_diagnosis(path, *, prob: float = 0.9, figures: bool = True, dt=None) -> list:
    """Rich renderables for one saved DataTree: the diagnostics, the parameter summary and the
    figures written beside it (``{stem}_band.png``, ``{stem}_ppc.png``, ``{stem}_rank.png``).
    ``dt``: the tree already read by :func:`load_posterior` (else it is read from ``path``)."""
    from rich.table import Table

    path = Path(path)
    if dt is None:
        dt = load_posterior(path)
    d = diagnose(dt, prob=prob)
    head = Table(title=f"{path.name}: {dt.attrs.get('method', '')} ({d['draws']})",
                 title_justify="left")
    head.add_column("diagnostic")
    head.add_column("value", justify="right")
    for k, v in d.items():
        if k not in ("summary", "draws", "failed_checks"):
            head.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    table = d["summary"]
    summ = Table(title="parameters", title_justify="left")
    summ.add_column("")
    cols = [c for c in ("mean", "sd", "ess_bulk", "ess_tail", "r_hat") if c in table.columns]
    for c in cols:
        summ.add_column(c, justify="right")
    for name, row in table.iterrows():
        summ.add_row(str(name), *(f"{float(row[c]):.4g}" for c in cols))
    out = [head, summ]
    if "failed_checks" in d:  # Markov chains: the sampler checks, in words
        out.insert(1, "sampler checks: all passed" if d["failed_checks"] == "none"
                   else "[bold red]sampler checks failed[/]: " + d["failed_checks"])
    if figures:
        paths = plot_posterior(dt, path.parent, prob=prob, prefix=f"{path.stem}_")
        out.append("figures: " + ", ".join(paths))
    return out

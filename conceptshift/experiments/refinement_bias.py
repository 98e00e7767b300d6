"""Experiment `refinement-bias`: the refined concept posterior q̂(k|x) against Delta_k(x) with the bound
of Example 3.4, and Prop. 3.2's confusion-matrix identity checked by Monte Carlo.

Everything is computed from the true source model (population refinement), by Gauss-Hermite
quadrature over y'. With the target concentrated on one concept k* (q(k) = 1{k = k*}), refinement
should put all mass on k*; it puts q̂(k|x) > 0 on the others, the more so the smaller
Delta_k(x) = mu(x; theta^wp_k) - mu(x; theta^wq_k*).

The bound used is derived in the README's notes on the paper (the appendix's algebra drops the
mixing weights): with equal weak-head variances sigma^2, delta(x) = mu(x; theta^wp_k*) -
mu(x; theta^wq_k*) and a = p(k|x) / p(k*|x),

    q̂(k|x) <= min(1, sqrt(a) exp((delta^2 - Delta_k^2) / (4 sigma^2) + (Delta_k - delta)^2 / (8 sigma^2))),

which for delta = 0 is sqrt(a) exp(-Delta_k(x)^2 / (8 sigma^2)): the paper's e^{-c Delta^2} with
c = 1 / (8 sigma^2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _precision as _p
from .common import PROBLEM_KNOBS, problem_from, pyplot, savefig
from .runner import Sweep, check_knobs, versions

NAME = "refinement-bias"
DEFAULTS = {
    "seed": 0,
    **PROBLEM_KNOBS,
    "x_range": 3.0,
    "n_x": 121,
    "n_quad": 80,
    "mc_draws": 200000,
    "identity_x": [-1.5, 0.0, 1.5],
}


def validate(cfg: dict) -> None:
    check_knobs(cfg, DEFAULTS)
    if cfg["n_features"] != 1:
        raise ValueError(
            f"refinement-bias plots against a scalar x: n_features must be 1, got {cfg['n_features']}"
        )
    if int(cfg["n_x"]) < 2 or int(cfg["n_quad"]) < 8 or int(cfg["mc_draws"]) < 1000:
        raise ValueError("need n_x >= 2, n_quad >= 8 and mc_draws >= 1000")


def _heads(problem, x):
    """Per-x quantities of the truth: log p(k|x) under P, weak means/sds under P and Q, strong head."""
    m = problem.model
    pp, pq = problem.params_p, problem.params_q
    log_pk = jax.nn.log_softmax(m.gate_log_probs(pp, x), -1)  # (N, K)
    mu_p = m.expert_mean(pp, x)  # (N, K, 2)
    mu_q = m.expert_mean(pq, x)
    return log_pk, mu_p[..., 0], mu_p[..., 1], jnp.exp(pp.log_scale), mu_q[..., 1], jnp.exp(pq.log_scale)


def confusion(problem, x, n_quad: int):
    """P{k | x, k'} = int p(k | x, y') q(y' | x, k') dy', shape (N, K_true k', K_refined k)."""
    log_pk, _, mu_wp, sd_p, mu_wq, sd_q = _heads(problem, x)
    t, wq = np.polynomial.hermite.hermgauss(n_quad)
    t, wq = jnp.asarray(t, x.dtype), jnp.asarray(wq / np.sqrt(np.pi), x.dtype)
    # y'[n, k', i] = mu^wq_k'(x_n) + sqrt(2) sd_q k' t_i
    yq = mu_wq[:, :, None] + jnp.sqrt(2.0) * sd_q[None, :, 1, None] * t[None, None, :]
    # log p(k | x, y') for every node: (N, K', Q, K)
    ll = (-0.5 * ((yq[..., None] - mu_wp[:, None, None, :]) / sd_p[None, None, None, :, 1]) ** 2
          - jnp.log(sd_p[None, None, None, :, 1]))
    post = jax.nn.softmax(log_pk[:, None, None, :] + ll, axis=-1)
    return _p.einsum("nqik,i->nqk", post, wq)


def bias_cell(problem, kstar: int, cfg: dict) -> dict:
    x = jnp.linspace(-cfg["x_range"], cfg["x_range"], int(cfg["n_x"]))[:, None]
    log_pk, mu_y, mu_wp, sd_p, mu_wq, sd_q = _heads(problem, x)
    qhat = confusion(problem, x, int(cfg["n_quad"]))[:, kstar, :]  # (N, K) given k'=k*
    sigma = sd_p[0, 1]
    Delta = mu_wp - mu_wq[:, kstar][:, None]  # (N, K)
    delta = (mu_wp[:, kstar] - mu_wq[:, kstar])[:, None]
    a = jnp.exp(log_pk - log_pk[:, kstar][:, None])
    bound = jnp.minimum(1.0, jnp.sqrt(a) * jnp.exp((delta**2 - Delta**2) / (4 * sigma**2)
                                                   + (Delta - delta) ** 2 / (8 * sigma**2)))
    # the paper's form p(k|x) e^{-c Delta^2} with the c of the corrected bound, c = 1 / (8 sigma^2):
    # as p(k|x) -> 0, q̂(k|x) -> p(k|x) / p(k*|x) (the mean of a likelihood ratio is 1), above it
    log_paper = log_pk - Delta**2 / (8 * sigma**2)  # in logs: the form underflows in float32
    paper = jnp.exp(log_paper)
    q_re_mean = jnp.sum(qhat * mu_y, -1)
    q_mean = mu_y[:, kstar]
    others = np.arange(problem.spec.n_components) != kstar
    equal_sd = bool(np.allclose(np.asarray(sd_p[:, 1]), float(sigma)))
    return {
        "kstar": kstar,
        "x": np.asarray(x[:, 0]).tolist(),
        "qhat": np.asarray(qhat).tolist(),
        "Delta": np.asarray(Delta).tolist(),
        "bound": np.asarray(bound).tolist(),
        "p_k_given_x": np.asarray(jnp.exp(log_pk)).tolist(),
        "bound_holds": bool(np.all(np.asarray(qhat)[:, others] <= np.asarray(bound)[:, others] + 1e-6))
        if equal_sd else None,
        "paper_form": np.asarray(paper).tolist(),
        "paper_form_holds_share": float(np.mean(np.asarray(qhat)[:, others]
                                                <= np.asarray(paper)[:, others] + 1e-6)),
        "paper_form_max_ratio": float(np.exp(np.max(
            np.log(np.asarray(qhat, np.float64)[:, others])
            - np.asarray(log_paper, np.float64)[:, others]))),
        "max_wrong_mass": float(np.max(1 - np.asarray(qhat[:, kstar]))),
        "refinement_reg_error": float(jnp.mean((q_re_mean - q_mean) ** 2)),
    }


def identity_cell(problem, cfg: dict) -> dict:
    """Monte Carlo draws of refined labels against Prop. 3.2's q_re(y|x) = sum_k p(y|x,k) q̂(k|x)."""
    x = jnp.asarray(cfg["identity_x"], dtype=problem.params_p.coef.dtype)[:, None]
    M = int(cfg["mc_draws"])
    log_pk, mu_y, mu_wp, sd_p, mu_wq, sd_q = _heads(problem, x)
    log_qk = jax.nn.log_softmax(problem.model.gate_log_probs(problem.params_q, x), -1)
    conf = confusion(problem, x, int(cfg["n_quad"]))  # (N, K', K)
    qhat = _p.einsum("nq,nqk->nk", jnp.exp(log_qk), conf)
    rows = []
    key = jax.random.key(cfg["seed"] + 7)
    for i in range(x.shape[0]):
        k1, k2, k3, k4, k5, key = jax.random.split(key, 6)
        kq = jax.random.categorical(k1, jnp.broadcast_to(log_qk[i], (M, log_qk.shape[1])))
        yw = mu_wq[i, kq] + sd_q[kq, 1] * jax.random.normal(k2, (M,), x.dtype)
        ll = -0.5 * ((yw[:, None] - mu_wp[i][None, :]) / sd_p[None, :, 1]) ** 2 - jnp.log(sd_p[None, :, 1])
        khat = jax.random.categorical(k3, log_pk[i][None, :] + ll, axis=-1)
        yhat = mu_y[i, khat] + sd_p[khat, 0] * jax.random.normal(k4, (M,), x.dtype)
        freq = np.bincount(np.asarray(khat), minlength=log_pk.shape[1]) / M
        q = np.asarray(qhat[i], np.float64)
        z_k = (freq - q) / np.sqrt(np.maximum(q * (1 - q), 1e-300) / M)
        mean_re = float(np.sum(q * np.asarray(mu_y[i])))
        var_re = float(np.sum(q * (np.asarray(sd_p[:, 0]) ** 2 + np.asarray(mu_y[i]) ** 2)) - mean_re**2)
        yh = np.sort(np.asarray(yhat, np.float64))
        z_mean = (yh.mean() - mean_re) / np.sqrt(var_re / M)
        # Kolmogorov-Smirnov distance to the mixture CDF of q_re
        from math import erf, sqrt

        mus, sds = np.asarray(mu_y[i], np.float64), np.asarray(sd_p[:, 0], np.float64)
        verf = np.vectorize(erf)
        z = (yh[:, None] - mus[None, :]) / (sqrt(2) * sds[None, :])
        cdf = np.sum(q[None, :] * 0.5 * (1 + verf(z)), 1)
        emp = np.arange(1, M + 1) / M
        ks = float(np.max(np.maximum(emp - cdf, cdf - (emp - 1 / M))))
        rows.append({"x": float(x[i, 0]), "qhat": q.tolist(), "freq": freq.tolist(),
                     "max_abs_z_k": float(np.max(np.abs(z_k))), "z_mean": float(z_mean),
                     "ks": ks, "ks_p_value": _kolmogorov_p(ks * np.sqrt(M))})
    return {"draws": M, "points": rows}


def _kolmogorov_p(lam: float) -> float:
    """Asymptotic P(sqrt(M) D > lam) of the Kolmogorov distribution."""
    if lam < 0.2:
        return 1.0
    j = np.arange(1, 101)
    return float(np.clip(2 * np.sum((-1.0) ** (j - 1) * np.exp(-2 * j**2 * lam**2)), 0.0, 1.0))


def run(cfg: dict, out_dir, *, progress: bool = True) -> dict:
    validate(cfg)
    problem = problem_from(cfg)
    K = problem.spec.n_components
    # target concentrated on one concept, as in Example 3.4
    sweep = Sweep(out_dir, cfg, NAME)

    def cell(item):
        if item == "identity":
            return identity_cell(problem, cfg)
        return bias_cell(problem, int(item), cfg)

    cells = sweep.run([(f"kstar{k}", k) for k in range(K)] + [("identity", "identity")], cell,
                      progress=progress)
    results = {
        "experiment": NAME, "config": cfg, "versions": versions(),
        "bias": [cells[f"kstar{k}"] for k in range(K)],
        "identity": cells["identity"],
    }
    return sweep.finish(results, plot, "refinement_bias.png")


def plot(results: dict, path) -> None:
    plt = pyplot()

    bias = results["bias"]
    K = len(bias)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for b in bias:
        ks = b["kstar"]
        q = np.asarray(b["qhat"])
        D = np.asarray(b["Delta"])
        B = np.asarray(b["bound"])
        for k in range(K):
            if k == ks:
                continue
            axes[0].scatter(D[:, k] ** 2, q[:, k], s=5, label=f"k*={ks + 1}, k={k + 1}")
            axes[0].scatter(D[:, k] ** 2, B[:, k], s=2, marker="_", color="0.5")
        axes[1].plot(b["x"], 1 - q[:, ks], label=f"k* = {ks + 1}")
    axes[0].set(xscale="log", yscale="log", xlabel=r"$\Delta_k(x)^2$", ylabel=r"$\hat q(k|x)$, $k \neq k^*$",
                title="refined mass on wrong concepts (grey: bound)")
    axes[0].set_ylim(bottom=max(1e-12, min(np.min(np.asarray(b["qhat"])) for b in bias) / 3))
    axes[0].legend(fontsize=6)
    axes[1].set(xlabel="x", ylabel=r"$1 - \hat q(k^*|x)$", title="irreducible refinement bias over x",
                yscale="log")
    axes[1].legend()
    savefig(fig, path)
    plt.close(fig)


def table(results: dict):
    from rich.table import Table

    t = Table(title="Label refinement with the target on one concept k* (Example 3.4)")
    for c in ("k*", "max mass on wrong k", "bound holds", "paper's form holds (share)",
              "q̂ / paper's form (max)", "E_x (q_re(x) - q(x))^2"):
        t.add_column(c, justify="right")
    for b in results["bias"]:
        t.add_row(str(b["kstar"] + 1), f"{b['max_wrong_mass']:.3g}", str(b["bound_holds"]),
                  f"{b['paper_form_holds_share']:.2f}", f"{b['paper_form_max_ratio']:.3g}",
                  f"{b['refinement_reg_error']:.4g}")
    t2 = Table(title=f"Prop. 3.2 identity, {results['identity']['draws']} Monte Carlo refined labels per x")
    for c in ("x", "q̂(k|x) (quadrature)", "frequency of k̂", "max |z| (k)", "z (mean)", "KS p-value"):
        t2.add_column(c, justify="right")
    for r in results["identity"]["points"]:
        t2.add_row(f"{r['x']:+.2f}", ", ".join(f"{v:.4f}" for v in r["qhat"]),
                   ", ".join(f"{v:.4f}" for v in r["freq"]), f"{r['max_abs_z_k']:.2f}",
                   f"{r['z_mean']:+.2f}", f"{r['ks_p_value']:.3f}")
    from rich.console import Group

    return Group(t, t2)

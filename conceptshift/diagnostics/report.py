"""Readable and machine-readable summaries of a fitted mixture."""

from __future__ import annotations

import jax
import numpy as np

from ..inference.em import EMResult
from ..models import family_name


def fit_summary(model, result: EMResult, x, y, *, response_names=None) -> dict:
    """A JSON-ready dict of a fit (single- or multi-head).

    Keys: ``loglik``, ``bic``, ``weights`` (K), ``coef`` (K x P, intercept first; K x H x P for several
    heads), ``scale`` (K; K x H), ``converged``, ``n_iter``, ``degenerate``, ``size`` (hard-assigned
    counts), ``coef_names``, ``restarts`` and ``restarts_at_best`` (how many reached the best
    log-likelihood), and for gated families ``gate_mean`` (K x D) and ``gate_cov`` (K x D x D).
    For a gate on x that is not a law of x (softmax), ``weights`` is the mean over the rows of
    p̂(k | x), as flexmix's ``prior`` reports for concomitant models, and ``gate_intercept`` (K) and
    ``gate_weights`` (K x D) are the gate's logits.
    """
    params = jax.device_get(result.params)
    batch = model.batch(x, y)
    x, y = batch.x, batch.y
    lp = np.asarray(model.component_log_probs(result.params, x, y))
    size = np.bincount(lp.argmax(-1), minlength=model.n_components)
    out = {
        "family": family_name(model),
        "components": model.n_components,
        "n": int(x.shape[0]),
        "loglik": float(result.loglik),
        "bic": float(result.bic),
        "df": model.n_params,
        "weights": np.exp(np.asarray(params.log_weights)).tolist(),
        **model.fit_report(params),  # the family's own parameters: coef, scale, the gate's
        "coef_names": list(model.coef_names),
        "size": size.tolist(),
        "converged": bool(result.converged),
        "n_iter": int(result.n_iter),
        "degenerate": bool(result.degenerate),
        "restart_loglik": np.asarray(result.restart_loglik).tolist(),
        "restarts": int(np.asarray(result.restart_loglik).shape[0]),
        "restarts_at_best": int(result.restarts_at_best),
        "dtype": str(np.asarray(result.loglik).dtype),
    }
    if response_names is not None:
        out["responses"] = list(response_names)
    if "gate_weights" in out:  # p(k | x) varies with x: its mean over the data
        out["gate_intercept"] = np.asarray(params.log_weights).tolist()
        out["weights"] = np.asarray(model.posterior_k(result.params, x)).mean(axis=0).tolist()
    return out


def render_fit(summary: dict, *, x_names=None, title: str | None = None):
    """A rich renderable in the spirit of flexmix's summary: one row per component."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    names = list(summary["coef_names"])
    if x_names:
        names = [_rename(n, x_names) for n in names]
    table = Table(title=title, title_justify="left")
    table.add_column("comp")
    table.add_column("prior", justify="right")
    table.add_column("size", justify="right")
    for n in names:
        table.add_column("(Intercept)" if n == "1" else n, justify="right")
    has_scale = "scale" in summary
    if has_scale:
        table.add_column("sigma", justify="right")
    if "gate_mean" in summary:
        table.add_column("gate mean", justify="right")
        table.add_column("gate sd", justify="right")
    if "gate_weights" in summary:
        table.add_column("gate logit b", justify="right")
        table.add_column("gate slopes W", justify="right")
    coef = np.asarray(summary["coef"])
    scale = np.asarray(summary["scale"]) if has_scale else None
    classes = summary.get("n_classes") if summary.get("response") == "categorical" else None
    if classes is not None and coef.ndim == 3:  # one head: (K, C, P) -> rows per non-reference class
        coef = coef[:, None]
    multi = coef.ndim >= 3
    for k in range(summary["components"]):
        heads = range(coef.shape[1]) if multi else [None]
        for h in heads:
            for c_ in (range(1, classes) if classes is not None else [None]):
                c = coef[k, h] if multi else coef[k]
                if c_ is not None:
                    c = c[c_]
                label = f"Comp.{k + 1}"
                if multi and (coef.shape[1] > 1 or classes is None):
                    label += f" [{summary.get('responses', range(99))[h]}]"
                if c_ is not None:
                    label += f" y={c_}"
                row = [label, f"{summary['weights'][k]:.4f}", str(summary["size"][k])]
                row += [f"{v:.5g}" for v in c]
                if has_scale:
                    row += [f"{(scale[k, h] if multi else scale[k]):.5g}"]
                if "gate_mean" in summary:
                    gm = np.asarray(summary["gate_mean"][k])
                    gs = np.sqrt(np.diag(np.asarray(summary["gate_cov"][k])))
                    row += [", ".join(f"{v:.4g}" for v in gm), ", ".join(f"{v:.4g}" for v in gs)]
                if "gate_weights" in summary:
                    row += [f"{summary['gate_intercept'][k]:.4g}",
                            ", ".join(f"{v:.4g}" for v in summary["gate_weights"][k])]
                table.add_row(*row)
    status = "converged" if summary["converged"] else "NOT converged"
    foot = Text(
        f"log Lik {summary['loglik']:.6f} (df={summary['df']})   BIC {summary['bic']:.4f}   "
        f"{status} after {summary['n_iter']} EM iterations   n = {summary['n']}"
    )
    parts = [table, foot]
    if "restarts_at_best" in summary:
        at, of = summary["restarts_at_best"], summary["restarts"]
        parts.append(Text(f"best optimum reached by {at} of {of} restarts"
                          + ("  (only once: more restarts advised)" if at == 1 and of > 1 else "")))
    if summary["degenerate"]:
        parts.append(Text("warning: every restart ended on a degenerate (spurious) solution",
                          style="bold red"))
    return Group(*parts)


def _rename(name: str, x_names) -> str:
    out = name
    for i, xn in sorted(enumerate(x_names), key=lambda t: -t[0]):
        out = out.replace(f"x{i + 1}", xn)
    return out

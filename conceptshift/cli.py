"""The ``conceptshift`` command: parses, validates, calls the library; no science here.

Bad input is one line on stderr and exit code 2, never a traceback; a fit that is not finite in the
working precision is one line and exit code 1. Every check of the arguments and the data runs
before any fitting (and before JAX's precision is set).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

from .cli_checks import (
    MAX_INT,
    MAX_SEED,
    FitError,
    UsageError,
    check_range,
    check_summary_finite,
    setup_precision,
    wide_console,
)
from .files import (
    check_out_dir,
    dumps_strict,
    parse_integer,
    parse_number,
    read_csv_columns,
    write_atomic,
    write_json_atomic,
)

MAX_DEGREE = 10
MAX_RANGE = 50  # numbers of components one `fit --components A-B` tries
# option -> (its attribute, the hyperparameter a family must have for it to apply): which family an
# option belongs to is read off the registered classes, not listed by family name
FAMILY_FLAGS = {
    "--y": ("y", "n_features"),
    "--x": ("x", "n_features"),
    "--degree": ("degree", "degree"),
    "--shared-scale": ("shared_scale", "shared_scale"),
    "--covariance": ("covariance", "covariance"),
    "--classes": ("classes", "n_classes"),
    "--gate": ("gate", "gate"),
    "--gate-x": ("gate_x", "gate_columns"),
    "--trials": ("trials", "trials_column"),
    "--states": ("states", "n_states"),
    "--tokens": ("tokens", "n_tokens"),
}


def _fields(name: str) -> set[str]:
    import dataclasses

    from .models.registry import family_class

    return {f.name for f in dataclasses.fields(family_class(name))}


def fit_families() -> list[str]:
    """The registered families `fit` can read data for: tables (a family with covariates,
    ``n_features``) and token sequences (``n_tokens``)."""
    from .models.registry import family_names

    return [n for n in family_names() if _fields(n) & {"n_features", "n_tokens"}]


def identify_families() -> list[str]:
    """The registered families `identify` reads tables for: covariates, and no column beyond x and
    the labels (a trials column, token sequences)."""
    return [n for n in fit_families() if "n_features" in _fields(n)
            and not _fields(n) & {"trials_column", "n_tokens"}]


def _flag_families(field: str) -> list[str]:
    return [n for n in fit_families() if field in _fields(n)]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _int(text: str) -> int:
    try:
        return parse_integer(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _components(text: str):
    """K, or a range "A-B" (A <= B) as the list of its values."""
    if "-" in text.strip()[1:]:
        a, b = text.strip().split("-", 1)
        lo, hi = _int(a), _int(b)
        if lo > hi:
            raise argparse.ArgumentTypeError(f"expected a range A-B with A <= B, got {text!r}")
        if hi - lo >= MAX_RANGE:
            raise argparse.ArgumentTypeError(f"a range A-B spans at most {MAX_RANGE} values of K, "
                                             f"got {text!r}")
        return list(range(lo, hi + 1))
    return _int(text)


def _float(text: str) -> float:
    try:
        return parse_number(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a finite number: {err}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="conceptshift", description=(
        "Latent-concept-shift mixtures: fit them (fit), estimate a weakly labelled target's "
        "q(y|x) from your own files (identify), run the paper's experiments (experiment, demo), "
        "read saved posteriors (diagnose) and time the fits (bench)."))
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fit", help="fit a mixture to a CSV file (or token sequences: --family hmm) by EM")
    f.add_argument("data", help="CSV file with a header row (hmm: token sequences, text or .npy)")
    f.add_argument("--family", choices=fit_families(), default="regression",
                   help="a registered family (softmax: experts with a softmax gate on x, flexmix's "
                        "concomitant model; logistic, binomial, categorical, poisson: GLM experts for "
                        "0/1, successes out of --trials, class and count responses)")
    f.add_argument("--components", "-k", type=_components, required=True, metavar="K",
                   help="K, or a range A-B: fit every K from A to B (one compiled program for the "
                        "Gaussian-expert families), print BIC and ICL, and report the chosen fit")
    f.add_argument("--criterion", choices=["bic", "icl"], default="bic",
                   help="how --components A-B chooses K (lower is better; default bic)")
    f.add_argument("--y", help="response column (required unless --family hmm)")
    f.add_argument("--x", nargs="*", help="covariate column(s); none: intercept only")
    f.add_argument("--degree", type=_int,
                   help=f"polynomial degree in x, 1..{MAX_DEGREE} (default 1); the design must have "
                        "fewer columns than the data have rows")
    f.add_argument("--covariance", choices=["full", "diag"],
                   help="gate covariance (gated family; default full)")
    f.add_argument("--shared-scale", action="store_true", default=None,
                   help="one sigma for all components")
    f.add_argument("--restarts", type=_int, default=10)
    f.add_argument("--max-iter", type=_int, default=1000)
    f.add_argument("--tol", type=_float, default=1e-10, help="relative tolerance on the objective")
    f.add_argument("--seed", type=_int, default=0, help=f"0..{MAX_SEED}")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.add_argument("--out", type=Path, help="folder to write fit.json into (atomically; checked "
                   "before fitting)")
    f.add_argument("--float32", action="store_true", help="compute in float32 (default float64)")
    f.add_argument("--classes", type=_int, help="classes C of a categorical response (--family "
                   "categorical; default: the largest label + 1)")
    f.add_argument("--gate", choices=["constant", "gaussian", "softmax"],
                   help="the gate p(k | x) of GLM experts (logistic, binomial, categorical, poisson): "
                        "constant proportions (default), a Gaussian law of the gate covariates per "
                        "component, "
                        "or softmax logits linear in them (flexmix's concomitant model)")
    f.add_argument("--gate-x", nargs="+", metavar="COL",
                   help="the gate's covariate column(s) (--gate gaussian or softmax; default the --x "
                        "columns)")
    f.add_argument("--trials", metavar="COL",
                   help="the column holding each row's number of trials (--family binomial: --y "
                        "counts the successes out of them; default 1 trial per row)")
    f.add_argument("--states", type=_int, help="hidden states S (--family hmm)")
    f.add_argument("--tokens", type=_int, help="vocabulary size V (--family hmm; default: max + 1)")

    i = sub.add_parser("identify", help="Algorithm 1 on your own files: q(y|x) of a weakly labelled "
                                        "target from a labelled source")
    i.add_argument("--source", type=Path, required=True,
                   help="CSV of the source domain: columns --y, --x and (optionally) --y-weak")
    i.add_argument("--target", type=Path, required=True,
                   help="CSV of the target domain: columns --y-weak and --x")
    i.add_argument("--y", required=True, help="the strong label's column (source)")
    i.add_argument("--y-weak", required=True,
                   help="the weak label's column (target; in the source too, unless it has none: "
                        "then the source's strong heads are matched)")
    i.add_argument("--x", nargs="*", help="covariate column(s), in every file; none: intercept only")
    i.add_argument("--components", "-k", type=_int, required=True, help="K, latent concepts")
    i.add_argument("--family", choices=identify_families(), default="regression",
                   help="regression (Gaussian experts), logistic (0/1), categorical (classes), "
                        "poisson (counts), gated / softmax (experts with a gate on x)")
    i.add_argument("--degree", type=_int, help="polynomial degree in x (families that have one; "
                                               "default 1)")
    i.add_argument("--restarts", type=_int, default=10, help="EM restarts per domain (default 10)")
    i.add_argument("--max-iter", type=_int, default=1000, help="EM iterations per restart at most")
    i.add_argument("--tol", type=_float, default=1e-10, help="relative tolerance on the objective")
    i.add_argument("--seed", type=_int, default=0, help=f"0..{MAX_SEED}")
    i.add_argument("--predict", type=Path, metavar="NEW.csv",
                   help="CSV with the --x columns: print the mean of q(y|x) for each row (for a "
                        "categorical y, q(y = c|x) for each class c)")
    i.add_argument("--bootstrap", type=_int, metavar="B",
                   help="B parametric-bootstrap refits of both domains (and the matching): 90%% "
                        "intervals for --predict and the share of draws that keep the matching")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--out", type=Path, help="folder for identify.json, predictions.csv and, with "
                                             "one --x column, identify.png (written atomically)")
    i.add_argument("--float32", action="store_true", help="compute in float32 (default float64)")

    e = sub.add_parser("experiment", help="run one of the paper's experiments (a resumable sweep)")
    e.add_argument("name", help="experiment name; `list` lists them, `describe NAME` gives an "
                                "experiment's knobs, defaults and run time")
    e.add_argument("describe", nargs="?", metavar="NAME", help=argparse.SUPPRESS)
    e.add_argument("--config", type=Path, help="TOML file of knobs")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a knob (repeatable); lists are comma-separated")
    e.add_argument("--out", type=Path, help="output folder (default runs/NAME)")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--float64", action="store_true", help="compute in float64 (default float32)")

    g = sub.add_parser("diagnose", help="summary and figures of a saved posterior run (netCDF)")
    g.add_argument("path", type=Path, help="a folder of .nc DataTrees (e.g. from `experiment "
                   "posterior`) or one .nc file")
    g.add_argument("--hdi-prob", type=_float, default=0.9)
    g.add_argument("--no-figures", action="store_true")

    d = sub.add_parser("demo", help="the consistency experiment at a size that runs in minutes")
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE")
    d.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("bench", help="run a benchmark script of the checkout's benchmarks/ folder")
    b.add_argument("name", help="benchmark name (see `conceptshift bench list`)")
    b.add_argument("--quick", action="store_true", help="toy sizes, seconds")
    b.add_argument("--out", type=Path, help="JSON file to write (default benchmarks/results/NAME.json)")
    return p


def _check_float32_range(cols: dict) -> None:
    """Refuses, before precision is set, a column with values beyond float32's range."""
    import numpy as np

    limit = float(np.finfo(np.float32).max)
    for c, v in cols.items():
        big = float(np.max(np.abs(v)))
        if big > limit:
            raise UsageError(f"column {c!r} holds {big:.3g}, beyond float32's range ({limit:.3g}); "
                             f"rescale the data or drop --float32")


def _build_family(name: str, n_components: int, kw: dict, has_x: bool):
    """The registered family ``name`` with K components; a family that needs covariates, given
    none, is one UsageError line."""
    from .models import family

    try:
        return family(name, n_components=n_components, **kw)
    except ValueError as err:
        if has_x:
            raise
        raise UsageError(f"--family {name} needs at least one --x column ({err})") from None


def check_fit_args(args) -> None:
    """The checks every family shares: options of another family, counts, seed, tolerance."""
    for flag, (attr, field) in FAMILY_FLAGS.items():
        if getattr(args, attr) is not None and field not in _fields(args.family):
            raise UsageError(f"{flag} does not apply to --family {args.family} (it belongs to "
                             f"--family {' and '.join(_flag_families(field))})")
    check_range("--components", args.components, 1, MAX_INT)
    check_range("--restarts", args.restarts, 1, MAX_INT)
    check_range("--max-iter", args.max_iter, 1, MAX_INT)
    check_range("--seed", args.seed, 0, MAX_SEED)
    check_range("--tol", args.tol, 0)
    if args.out is not None:
        check_out_dir(args.out)


def _fit_reporting_precision(fit, model, key, x, y, float32: bool, **kw):
    """``fit(model, key, x, y, **kw)`` with the library's precision verdicts in the CLI's terms: a
    fit that overflows on the data's scale is a FitError (exit 1), a fit whose parameters keep it
    only roughly there is one warning line on stderr."""
    import warnings

    from ._validation import (
        DiscreteResponseWarning,
        OptimumWarning,
        PrecisionWarning,
        UnrepresentableFitError,
    )

    advice = "rescale the data" + (" or drop --float32" if float32 else "")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionWarning)
        warnings.simplefilter("always", DiscreteResponseWarning)
        warnings.simplefilter("always", OptimumWarning)
        try:
            result = fit(model, key, x, y, **kw)
        except UnrepresentableFitError as err:
            raise FitError(f"{err.problem}; {advice}") from None
    for w in caught:
        if issubclass(w.category, PrecisionWarning):
            sys.stderr.write(f"warning: {w.message.problem}; {advice}\n")
        elif issubclass(w.category, (DiscreteResponseWarning, OptimumWarning)):
            sys.stderr.write(f"warning: {w.message}\n")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


def cmd_fit(args) -> int:
    k_range = args.components if isinstance(args.components, list) else None
    if k_range is not None:
        check_range("--components", k_range[0], 1, MAX_INT)
        args.components = k_range[-1]  # the checks below hold for every K when they hold for B
    elif args.criterion != "bic":
        raise UsageError("--criterion chooses among a range of --components A-B")
    args.k_range = k_range
    if k_range is not None and "n_tokens" in _fields(args.family):
        raise UsageError("--components A-B (choosing K) is not offered for --family hmm: fit each K")
    check_fit_args(args)
    if "n_tokens" in _fields(args.family):  # token sequences, not a table
        from .cli_hmm import cmd_fit_hmm

        return cmd_fit_hmm(args)
    from rich.console import Console

    if args.y is None:
        raise UsageError(f"--y is required for --family {args.family}")
    xs = list(args.x or [])
    if args.y in xs:
        raise UsageError(f"--x {args.y!r} is also the response --y")
    dup = sorted({c for c in xs if xs.count(c) > 1})
    if dup:
        raise UsageError(f"--x names {dup[0]!r} twice")
    gx = list(args.gate_x or [])
    if gx and args.gate in (None, "constant"):
        raise UsageError("--gate-x names the covariates of a gate on x: it needs --gate gaussian or "
                         "--gate softmax")
    if args.y in gx:
        raise UsageError(f"--gate-x {args.y!r} is also the response --y")
    dup = sorted({c for c in gx if gx.count(c) > 1})
    if dup:
        raise UsageError(f"--gate-x names {dup[0]!r} twice")
    tc = getattr(args, "trials", None)
    if tc is not None and tc == args.y:
        raise UsageError(f"--trials {tc!r} is also the response --y")
    if tc is not None and (tc in xs or tc in gx):
        raise UsageError(f"--trials {tc!r} is also a covariate (--x or --gate-x)")
    if args.degree is not None and not xs:
        raise UsageError("--degree needs at least one --x column (without --x the fit is "
                         "intercept only)")
    degree = 1 if args.degree is None else args.degree
    check_range("--degree", degree, 1, MAX_DEGREE)
    all_x = xs + [c for c in gx if c not in xs]  # x as the family reads it: --x, then gate-only columns
    read = all_x + ([tc] if tc is not None else [])  # the trials column last in x
    cols = read_csv_columns(args.data, [args.y, *read])
    n = len(cols[args.y])
    if tc is not None:
        m = cols[tc]
        bad = m[~((m >= 1) & (m == m.round()))]
        if bad.size:
            raise UsageError(f"--trials {tc!r} must hold a positive whole number of trials in every "
                             f"row, got {bad[0]:g}")
    if args.components > n:
        raise UsageError(f"--components {args.components} exceeds the {n} data rows")
    D = len(xs)
    P = math.comb(D + degree, degree) if D else 1
    if P >= n:
        raise UsageError(f"--degree {degree} with {D} --x column(s) gives {P} design columns; the "
                         f"{n} data rows need fewer")
    if args.float32:
        _check_float32_range(cols)

    setup_precision(args.float32)
    import warnings

    import jax
    import numpy as np

    from ._validation import DiscreteResponseWarning
    from .diagnostics import fit_summary, render_fit
    from .inference import fit_em
    from .models.registry import family_class

    fields = _fields(args.family)
    kw = dict(n_features=len(read))
    if tc is not None:
        kw["trials_column"] = len(all_x)
    if args.gate is not None:
        kw["gate"] = args.gate
    if gx:
        kw["expert_columns"] = tuple(range(D))
        kw["gate_columns"] = tuple(all_x.index(c) for c in gx)
    if "degree" in fields:
        kw["degree"] = degree if D else 0
    if "shared_scale" in fields:
        kw["shared_scale"] = bool(args.shared_scale)
    if args.covariance is not None:
        kw["covariance"] = args.covariance
    derive = getattr(family_class(args.family), "hyperparameters_from", None)
    if derive is not None:
        kw.update(derive(cols[args.y]))
    if args.classes is not None:
        kw["n_classes"] = args.classes
    model = _build_family(args.family, args.components, kw, bool(all_x))
    if getattr(model, "gate_fields", lambda: ())() and not all_x:
        raise UsageError(f"--family {args.family} gates on x: it needs at least one --x column")
    x = np.stack([cols[c] for c in read], axis=1) if read else None
    y = cols[args.y]
    console = Console(stderr=True)
    selection = None
    what = f"K={args.components}" if k_range is None else f"K={k_range[0]}..{k_range[-1]}"
    with console.status(f"fitting {what} by EM, {args.restarts} restarts...",
                        spinner="dots") if sys.stderr.isatty() and not args.json else _null():
        if k_range is None:
            result = _fit_reporting_precision(fit_em, model, jax.random.key(args.seed), x, y,
                                              args.float32, restarts=args.restarts,
                                              max_iter=args.max_iter, tol=args.tol)
        else:
            import dataclasses

            from .inference import choose_components

            def choose(m, key, x, y, **kw):
                return choose_components(m, key, x, y, k_range, criterion=args.criterion, **kw)

            selection = _fit_reporting_precision(choose, model, jax.random.key(args.seed), x, y,
                                                 args.float32, restarts=args.restarts,
                                                 max_iter=args.max_iter, tol=args.tol)
            args.components = selection.best
            model = dataclasses.replace(model, n_components=selection.best)
            result = selection.fits[selection.best]
        with warnings.catch_warnings():  # said once already, by the fit
            warnings.simplefilter("ignore", DiscreteResponseWarning)
            summary = fit_summary(model, result, x, y, response_names=[args.y])
    check_summary_finite(summary, ("loglik", "bic", "weights", "coef", "scale", "gate_mean", "gate_cov",
                                   "gate_weights"), args.float32)
    gated = args.gate not in (None, "constant")
    if tc is not None:
        summary["trials"] = tc
    summary.update(data=str(args.data), y=args.y, x=xs, gate_x=(gx or xs) if gated else [],
                   degree=degree, seed=args.seed, restarts=args.restarts)
    if selection is not None:
        summary["selection"] = {"criterion": selection.criterion, "chosen": selection.best,
                                "table": selection.table}
    if args.out is not None:
        write_json_atomic(args.out / "fit.json", summary)
    if args.json:
        print(dumps_strict(summary))
    else:
        out = wide_console()
        if selection is not None:
            _print_selection(out, selection)
        title = (f"{args.family} mixture of {args.y} on {', '.join(xs) or 'intercept'}"
                 f" (K = {args.components})")
        out.print(render_fit(summary, x_names=all_x, title=title))
        if args.out is not None:
            out.print(f"written: {args.out / 'fit.json'}")
    return 0


def _print_selection(out, selection) -> None:
    from rich.table import Table

    t = Table(title=f"Choosing K: the lowest {selection.criterion.upper()} among the fits that are "
                    f"not degenerate", title_justify="left")
    for col in ("K", "log-likelihood", "BIC", "ICL", "converged", "restarts at best", ""):
        t.add_column(col, justify="right" if col else "left")
    for r in selection.table:
        note = "chosen" if r["components"] == selection.best else (
            "degenerate" if r["degenerate"] else "")
        t.add_row(str(r["components"]), f"{r['loglik']:.4f}", f"{r['bic']:.4f}", f"{r['icl']:.4f}",
                  "yes" if r["converged"] else "NO", str(r["restarts_at_best"]), note)
    out.print(t)


def _csv_header(path: Path) -> list[str]:
    import csv

    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            return [h.strip() for h in next(csv.reader(fh), [])]
    except UnicodeDecodeError as err:
        raise UsageError(f"{path.name} is not UTF-8 text ({err.reason}); save it as UTF-8") from None


def cmd_identify(args) -> int:
    for flag, value, lo in (("--components", args.components, 1), ("--restarts", args.restarts, 1),
                            ("--max-iter", args.max_iter, 1), ("--seed", args.seed, 0)):
        check_range(flag, value, lo, MAX_SEED if flag == "--seed" else MAX_INT)
    check_range("--tol", args.tol, 0)
    if args.bootstrap is not None:
        check_range("--bootstrap", args.bootstrap, 2, MAX_INT)
    if args.out is not None:
        check_out_dir(args.out)
    fields = _fields(args.family)
    xs = list(args.x or [])
    if args.degree is not None:
        if "degree" not in fields:
            raise UsageError(f"--degree does not apply to --family {args.family} (its experts are "
                             f"linear in x)")
        if not xs:
            raise UsageError("--degree needs at least one --x column")
        check_range("--degree", args.degree, 1, MAX_DEGREE)
    for col in (args.y, args.y_weak):
        if col in xs:
            raise UsageError(f"--x {col!r} is also a label column (--y or --y-weak)")
    if args.y == args.y_weak:
        raise UsageError(f"--y and --y-weak name the same column {args.y!r}")
    dup = sorted({c for c in xs if xs.count(c) > 1})
    if dup:
        raise UsageError(f"--x names {dup[0]!r} twice")
    weak_source = args.y_weak in _csv_header(args.source)
    src = read_csv_columns(args.source, [args.y, *xs] + ([args.y_weak] if weak_source else []))
    tgt = read_csv_columns(args.target, [args.y_weak, *xs])
    new = read_csv_columns(args.predict, xs) if args.predict is not None and xs else None
    if args.predict is not None and not xs:
        raise UsageError("--predict needs --x columns (without them q(y|x) is one constant)")
    n_s, n_t = len(src[args.y]), len(tgt[args.y_weak])
    for name, n in (("--source", n_s), ("--target", n_t)):
        if args.components > n:
            raise UsageError(f"--components {args.components} exceeds the {n} rows of {name}")
    degree = 1 if args.degree is None else args.degree
    if args.float32:
        for cols in (src, tgt, new or {}):
            _check_float32_range(cols)

    setup_precision(args.float32)
    import jax
    import numpy as np

    from .inference import fit_target
    from .models.registry import family_class

    kw = {"n_features": len(xs)}
    if "degree" in fields:
        kw["degree"] = degree if xs else 0
    derive = getattr(family_class(args.family), "hyperparameters_from", None)
    if derive is not None:
        labels = [src[args.y], tgt[args.y_weak]] + ([src[args.y_weak]] if weak_source else [])
        kw.update(derive(np.concatenate(labels)))
    model = _build_family(args.family, args.components, kw, bool(xs))

    def table(cols, n):
        return np.stack([cols[c] for c in xs], axis=1) if xs else np.zeros((n, 0))

    def fit(model, key, x, y, **kw):
        return fit_target(model, key, x[0], y[0], x[1], y[1], source_y_weak=y[2], **kw)

    xs_, xt_ = table(src, n_s), table(tgt, n_t)
    ys = (src[args.y], tgt[args.y_weak], src[args.y_weak] if weak_source else None)
    from rich.console import Console

    quiet = args.json or not sys.stderr.isatty()
    with _null() if quiet else Console(stderr=True).status(
            f"fitting both domains (K={args.components}) by EM, {args.restarts} restarts...",
            spinner="dots"):
        result = _fit_reporting_precision(fit, model, jax.random.key(args.seed), (xs_, xt_), ys,
                                          args.float32, restarts=args.restarts,
                                          max_iter=args.max_iter, tol=args.tol)
    summary = result.summary()
    check_summary_finite({"loglik": [summary["source"]["loglik"], summary["target"]["loglik"]],
                          "target_weights": summary["target_weights"]},
                         ("loglik", "target_weights"), args.float32)
    boot = None
    if args.bootstrap is not None:
        with _null() if quiet else Console(stderr=True).status(
                f"bootstrap: {args.bootstrap} refits of both domains...", spinner="dots"):
            boot = result.bootstrap(jax.random.fold_in(jax.random.key(args.seed), 1), args.bootstrap)
        summary["bootstrap"] = {"n_boot": args.bootstrap, "agreement": boot.agreement,
                                "matching_posterior": boot.matching_posterior()}
    predict = None
    if new is not None:
        xn = table(new, len(new[xs[0]]))
        # the mean of q(y|x) where y has one; the class probabilities (one list per row) where not
        has_mean = hasattr(result.model, "conditional_mean")
        key = "mean" if has_mean else "proba"
        predict = {key: (result.predict(xn) if has_mean else result.predict_proba(xn)).tolist()}
        if boot is not None:
            lower, upper = boot.interval(xn, 0.9)
            predict.update(lower=lower.tolist(), upper=upper.tolist())
        summary["predict"] = predict
    summary.update(family=args.family, components=args.components, source=dict(
        summary["source"], data=str(args.source), rows=n_s), target=dict(
        summary["target"], data=str(args.target), rows=n_t), y=args.y, y_weak=args.y_weak, x=xs,
        degree=getattr(model, "degree", None), seed=args.seed, restarts=args.restarts)
    written = []
    if args.out is not None:
        write_json_atomic(args.out / "identify.json", summary)
        written.append(args.out / "identify.json")
        if predict is not None:
            write_atomic(args.out / "predictions.csv", _predictions_csv(xs, new, predict))
            written.append(args.out / "predictions.csv")
        if len(xs) == 1 and hasattr(result.model, "conditional_mean"):
            _identify_figure(args.out / "identify.png", result, boot, xs[0], args.y_weak,
                             xt_[:, 0], tgt[args.y_weak], new, xs_[:, 0], src[args.y])
            written.append(args.out / "identify.png")
    if args.json:
        print(dumps_strict(summary))
        return 0
    out = wide_console()
    _print_identify(out, summary, result, boot, xs, new, predict)
    for path in written:
        out.print(f"written: {path}")
    return 0


def _prediction_columns(predict) -> tuple[list[str], list[list[float]]]:
    """The predictions as named columns: ``mean`` (and ``lower``, ``upper``), or for class
    probabilities ``p_c`` (and ``lower_c``, ``upper_c``) per class c."""
    if "mean" in predict:
        names = [k for k in ("mean", "lower", "upper") if k in predict]
        return names, [predict[k] for k in names]
    n_classes = len(predict["proba"][0])
    names, cols = [], []
    for key, label in (("proba", "p"), ("lower", "lower"), ("upper", "upper")):
        if key in predict:
            for c in range(n_classes):
                names.append(f"{label}_{c}")
                cols.append([row[c] for row in predict[key]])
    return names, cols


def _predictions_csv(xs, new, predict) -> str:
    names, cols = _prediction_columns(predict)
    rows = [",".join(list(xs) + names)]
    for r in range(len(cols[0])):
        rows.append(",".join([repr(float(new[c][r])) for c in xs] + [repr(float(col[r]))
                                                                    for col in cols]))
    return "\n".join(rows) + "\n"


def _print_identify(out, summary, result, boot, xs, new, predict) -> None:
    import numpy as np
    from rich.table import Table

    t = Table(title="The two EM fits", title_justify="left")
    for col in ("domain", "file", "rows", "log-likelihood", "converged", "restarts at best"):
        t.add_column(col, justify="left" if col in ("domain", "file") else "right")
    for name in ("source", "target"):
        f = summary[name]
        t.add_row(name, f["data"], str(f["rows"]), f"{f['loglik']:.4f}", "yes" if f["converged"]
                  else "NO", f"{f['restarts_at_best']} of {summary['restarts']}")
    out.print(t)
    m = Table(title=f"Matching ({'weak heads' if result.match == 'weak' else 'source strong heads'}"
                    f" against the target's weak heads)", title_justify="left")
    for col in ("source component k", "target component a(k)", "source pi^p_k", "target pi^q_k"):
        m.add_column(col, justify="right")
    wp = np.exp(np.asarray(result.source_fit.params.log_weights, np.float64))
    for k, a in enumerate(summary["assignment"]):
        m.add_row(str(k), str(a), f"{wp[k]:.4f}", f"{summary['target_weights'][k]:.4f}")
    out.print(m)
    line = (f"matching margin {summary['margin']:.4g} (the second-best matching's cost minus the "
            f"best's; 0 is a tie)")
    if boot is not None:
        line += (f"; the matching held in {boot.agreement:.0%} of {boot.n_boot} bootstrap draws")
    out.print(line)
    post = summary["bootstrap"]["matching_posterior"] if boot is not None else summary["matching_posterior"]
    top = "; ".join(f"{','.join(map(str, m['assignment']))}: {m['prob']:.3g}" for m in post["matchings"])
    out.print(f"posterior probability of each matching (shift prior, its scale integrated out"
              f"{', averaged over the bootstrap draws' if boot is not None else ''}): {top}")
    if predict is None:
        return
    names, cols = _prediction_columns(predict)
    what = "Mean of q(y|x)" if "mean" in predict else "q(y = c | x) for each class c"
    p = Table(title=what + (" with 90% bootstrap intervals" if "lower" in predict else ""),
              title_justify="left")
    for c in list(xs) + names:
        p.add_column(c, justify="right")
    n = len(cols[0])
    shown = min(n, 20)
    for r in range(shown):
        p.add_row(*(f"{new[c][r]:.6g}" for c in xs), *(f"{col[r]:.6g}" for col in cols))
    out.print(p)
    if shown < n:
        out.print(f"... {n - shown} more rows: --json or --out (predictions.csv) has them all")


def _identify_figure(path, result, boot, x_name, yw_name, xt, ywt, new, xs, ys) -> None:
    import numpy as np

    from .diagnostics.figures import pyplot, savefig

    plt = pyplot()
    lo, hi = float(min(xt.min(), xs.min())), float(max(xt.max(), xs.max()))
    grid = np.linspace(lo, hi, 200)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(xs, ys, s=4, color="0.7", label="source (x, y)", rasterized=True)
    ax.scatter(xt, ywt, s=4, color="tab:orange", alpha=0.35, label=f"target (x, {yw_name})",
               rasterized=True)
    if boot is not None:
        lower, upper = boot.interval(grid[:, None], 0.9)
        ax.fill_between(grid, lower, upper, color="tab:blue", alpha=0.25, lw=0,
                        label="90% bootstrap interval")
    ax.plot(grid, result.predict(grid[:, None]), color="tab:blue", lw=2,
            label="mean of q̂(y | x), Algorithm 1")
    ax.set(xlabel=x_name, ylabel="y", title="Algorithm 1: the target's q(y | x) from the two files")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    savefig(fig, path)
    plt.close(fig)


DEMO_SETTINGS = ["n_grid=250,500,1000,2000,4000,8000", "replicates=6", "n_test=1000"]


def cmd_experiment(args) -> int:
    from .experiments import EXPERIMENTS

    if args.name == "list":
        from rich.table import Table

        from .experiments.knobs import RUNTIMES, summary

        t = Table(title="Experiments (conceptshift experiment describe NAME: knobs and defaults)",
                  title_justify="left", show_lines=False)
        t.add_column("name", no_wrap=True)
        t.add_column("what it measures")
        t.add_column("run time (2 cores)")
        for name, mod in EXPERIMENTS.items():
            t.add_row(name, summary(mod), RUNTIMES.get(name, ""))
        wide_console().print(t)
        return 0
    if args.name == "describe":
        return _describe_experiment(args.overrides, args.describe)
    if args.describe is not None:
        raise UsageError(f"unexpected argument {args.describe!r} after the experiment name")
    if args.name not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {args.name!r}; known: {', '.join(EXPERIMENTS)}")
    return _run_experiment(args.name, args.config, args.overrides,
                           args.out or Path("runs") / args.name, not args.no_progress,
                           float64=args.float64)


def _describe_experiment(overrides, name) -> int:
    from rich.table import Table

    from .experiments import EXPERIMENTS
    from .experiments.knobs import RUNTIMES, knob_help, summary

    if overrides:
        raise UsageError("--set does not apply to describe: it lists the knobs and their defaults")
    if name is None:
        raise UsageError("describe needs an experiment name: conceptshift experiment describe NAME "
                         f"({', '.join(EXPERIMENTS)})")
    if name not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    mod = EXPERIMENTS[name]
    out = wide_console()
    out.print(f"[bold]{name}[/]: {summary(mod)}", width=min(out.width, 100))
    if name in RUNTIMES:
        out.print(f"Run time with the defaults: {RUNTIMES[name]} on 2 cores.")
    hmm = "n_states" in mod.DEFAULTS
    t = Table(title="Knobs (--set NAME=VALUE; lists comma-separated)", title_justify="left")
    t.add_column("knob", no_wrap=True)
    t.add_column("default")
    t.add_column("meaning")
    for knob, default in mod.DEFAULTS.items():
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        t.add_row(knob, shown if shown else "[]", knob_help(knob, hmm))
    out.print(t)
    return 0


def _run_experiment(name, config, overrides, out, progress, *, float64=False, intro=None) -> int:
    from .experiments import EXPERIMENTS
    from .experiments.runner import load_config

    mod = EXPERIMENTS[name]
    cfg = load_config(mod.DEFAULTS, config, overrides)
    mod.validate(cfg)
    check_out_dir(out)
    setup_precision(not float64)
    import time


    console = wide_console()
    if intro:
        console.print(intro, width=min(console.width, 100))
    t0 = time.perf_counter()
    results = mod.run(cfg, out, progress=progress)
    console.print(mod.table(results))
    if hasattr(mod, "reading"):
        console.print(mod.reading(results), markup=False, width=min(console.width, 100))
    reused = results.get("cells_reused", [])
    console.print(
        f"{len(results.get('cells_computed', []))} cell(s) computed, {len(reused)} reused from an "
        f"earlier run, {time.perf_counter() - t0:.0f} s"
    )
    console.print(f"results: {Path(out) / 'results.json'}")
    for fig in results.get("figures", []):
        console.print(f"figure:  {fig}")
    return 0


def cmd_demo(args) -> int:
    intro = (
        "[bold]conceptshift demo[/]: a source domain P and a target domain Q mix the same K = 3 "
        "linear regressions in different proportions; a weak labeller, biased and noisy, labels Q. "
        "Nine estimators of the target's q(y|x) are fitted for sample sizes n = 250 .. 8000 "
        "(6 simulated replicates each) and scored against the true q(y|x) on gold test data, and by "
        "the performance gap they recover between the weak labeller and the oracle (PGR)."
    )
    return _run_experiment("consistency", None, DEMO_SETTINGS + list(args.overrides), args.out,
                           not args.no_progress, intro=intro)


def _bench_dir() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / "benchmarks" / "_harness.py").is_file():
            return base / "benchmarks"
    raise UsageError("the benchmark scripts live in the benchmarks/ folder of a conceptshift "
                     "checkout; run this from one (or from an editable install)")


def cmd_bench(args) -> int:
    import importlib.util

    folder = _bench_dir()
    names = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    if args.name == "list":
        for name in names:
            doc = (folder / f"{name}.py").read_text().split('"""')
            print(f"{name:20s} {doc[1].strip().splitlines()[0] if len(doc) > 2 else ''}")
        return 0
    name = args.name.replace("-", "_")
    if name not in names:
        raise UsageError(f"unknown benchmark {args.name!r}; known: {', '.join(names)}")
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = (["--quick"] if args.quick else []) + (["--out", str(args.out)] if args.out else [])
    mod.main(argv)
    return 0


def cmd_diagnose(args) -> int:
    if not 0 < args.hdi_prob < 1:
        raise UsageError(f"--hdi-prob must be in (0, 1), got {args.hdi_prob}")
    path = args.path
    if path.is_dir():
        files = sorted(path.glob("*.nc"))
        if not files:
            raise UsageError(f"{path} holds no .nc DataTree files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")

    from .diagnostics.posterior import load_posterior, render_diagnosis

    trees = [(f, load_posterior(f)) for f in files]  # every file is read (and checked) first
    console = wide_console()
    for f, dt in trees:
        for item in render_diagnosis(f, prob=args.hdi_prob, figures=not args.no_figures, dt=dt):
            console.print(item)
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: temporary files are removed on the way out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"fit": cmd_fit, "identify": cmd_identify, "demo": cmd_demo,
                "experiment": cmd_experiment,
                "bench": cmd_bench, "diagnose": cmd_diagnose}
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, OSError, FitError) as err:
        if os.environ.get("CONCEPTSHIFT_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        sys.stderr.write(f"conceptshift {args.command}: error: {message}\n")
        return 1 if isinstance(err, FitError) else 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())

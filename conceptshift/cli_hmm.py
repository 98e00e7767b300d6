"""`conceptshift fit SEQS --family hmm`: a mixture of HMMs fitted to integer token sequences by
Baum-Welch EM. Parses and validates; the science is in conceptshift.models.hmm and inference.stats_em.
"""

from __future__ import annotations

import sys


def cmd_fit_hmm(args) -> int:
    """Runs after :func:`conceptshift.cli.check_fit_args` (the checks every family shares)."""

    from .cli_checks import (
        MAX_INT,
        UsageError,
        check_range,
        check_summary_finite,
        setup_precision,
        wide_console,
    )
    from .files import dumps_strict, write_json_atomic
    from .token_files import MAX_TOKENS, read_sequences

    if args.states is None:
        raise UsageError("--family hmm needs --states S (number of hidden states)")
    check_range("--states", args.states, 1, MAX_INT)
    if args.tokens is not None:
        check_range("--tokens", args.tokens, 2, MAX_TOKENS)
    x, lengths = read_sequences(args.data)
    seen = int(x.max()) + 1
    V = args.tokens if args.tokens is not None else max(seen, 2)
    if seen > V:
        raise UsageError(f"--tokens {args.tokens}: the data hold token {seen - 1}; need --tokens >= "
                         f"{max(seen, 2)}")
    if args.components > x.shape[0]:
        raise UsageError(f"--components {args.components} exceeds the {x.shape[0]} sequences")

    setup_precision(args.float32)
    import jax
    import numpy as np

    from .inference import fit_em
    from .models.batch import pad_tokens
    from .models.hmm import HMMMixture

    model = HMMMixture(args.components, args.states, V)
    fit = fit_em(model, jax.random.key(args.seed), pad_tokens(x, lengths), None,
                 restarts=args.restarts, max_iter=args.max_iter, tol=args.tol)
    p = fit.params

    def lst(a):
        return np.exp(np.asarray(a, np.float64)).tolist()

    summary = {
        "family": "hmm", "data": str(args.data), "components": args.components, "states": args.states,
        "tokens": V, "n_sequences": int(x.shape[0]), "n_observed_tokens": int(lengths.sum()),
        "max_length": int(x.shape[1]), "loglik": float(fit.loglik), "bic": float(fit.bic),
        "df": model.n_params, "converged": bool(fit.converged), "n_iter": int(fit.n_iter),
        "weights": lst(p.log_weights), "init": lst(p.log_init), "trans": lst(p.log_trans),
        "emit": lst(p.log_emit), "restart_loglik": np.asarray(fit.restart_loglik, np.float64).tolist(),
        "seed": args.seed, "restarts": args.restarts,
    }
    check_summary_finite(summary, ("loglik", "bic", "weights", "init", "trans", "emit"), args.float32)
    if args.out is not None:
        write_json_atomic(args.out / "fit.json", summary)
    if args.json:
        print(dumps_strict(summary))
        return 0
    from rich.table import Table

    out = wide_console()
    t = Table(title=f"mixture of {args.components} HMM(s), {args.states} states, {V} tokens: "
                    f"{x.shape[0]} sequences", title_justify="left")
    t.add_column("concept")
    t.add_column("weight", justify="right")
    t.add_column("transition matrix theta_k (rows: from state)")
    for k in range(args.components):
        rows = "\n".join(" ".join(f"{v:.3f}" for v in r) for r in summary["trans"][k])
        t.add_row(f"{k + 1}", f"{summary['weights'][k]:.4f}", rows)
    out.print(t)
    e = Table(title="emission tau (rows: states)", title_justify="left")
    e.add_column("state")
    for v in range(V):
        e.add_column(str(v), justify="right")
    for s, r in enumerate(summary["emit"]):
        e.add_row(str(s + 1), *(f"{v:.3f}" for v in r))
    out.print(e)
    out.print(f"log Lik {fit.loglik:.6f} (df={model.n_params})   BIC {fit.bic:.4f}   "
              f"{'converged' if summary['converged'] else 'NOT converged'} after {summary['n_iter']} "
              f"EM iterations")
    if args.out is not None:
        out.print(f"written: {args.out / 'fit.json'}")
    sys.stdout.flush()
    return 0

"""Is the anchors experiment's "without anchor words theta is not recovered" the model's or the
optimiser's? For the anchor-free problem (the `anchors` experiment's defaults, anchors off; or
``--anchors on`` for the contrast), fit the
two-head source mixture of HMMs by EM as the experiment does (its restarts and iterations), from R
random restarts run longer, and from the truth, on the same data, and compare the log-likelihoods
reached and the errors after the best permutations.

Usage: python scripts/anchors_optimum.py [--n 2000] [--restarts 32] [--max-iter 500] [--seeds 3]
       [--anchors off|partial|on]
Prints one JSON line per data set.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from conceptshift.experiments import anchors
from conceptshift.experiments.hmm_common import hmm_problem_from
from conceptshift.experiments.runner import load_config
from conceptshift.inference import fit_em
from conceptshift.inference.estimators import as_data


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--restarts", type=int, default=32)
    ap.add_argument("--max-iter", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--anchors", default="off", choices=anchors.SETTINGS)
    args = ap.parse_args(argv)
    cfg = load_config(anchors.DEFAULTS, None, [])
    prob = hmm_problem_from(cfg, anchors=args.anchors)
    m2 = prob.model
    # the truth as a start: its zero probabilities raised to e^-30 (EM needs finite logs), rows
    # renormalised
    start = jax.tree_util.tree_map(lambda a: jax.nn.log_softmax(jnp.maximum(a, -30.0), axis=-1),
                                   prob.params_p)
    for seed in range(args.seeds):
        sim = prob.simulate_data(jax.random.key(100 + seed), args.n, 2, 2)
        s = as_data(sim.source)
        y2 = jnp.stack([s.y, s.y_weak], axis=1)
        out = {"seed": seed, "n": args.n}
        for label, kw in (("experiment", {"restarts": cfg["restarts"], "max_iter": cfg["max_iter"],
                                          "tol": cfg["tol"]}),
                          ("restarts", {"restarts": args.restarts, "max_iter": args.max_iter,
                                        "tol": 1e-8}),
                          ("truth", {"init_params": start, "max_iter": args.max_iter, "tol": 1e-8})):
            fit = fit_em(m2, jax.random.key(seed), s.x, y2, weights=s.w, **kw)
            err = prob.param_errors(fit.params, "p")
            out[label] = {"loglik": float(fit.loglik),
                          **{k: float(np.asarray(v)) for k, v in err.items()},
                          "restarts_at_best": int(fit.restarts_at_best)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

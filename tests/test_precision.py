"""Every matrix product in the traced fits asks for full precision (conceptshift._precision):
float32 products would otherwise run as TF32 on NVIDIA GPUs and bfloat16 passes on TPUs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import once

from conceptshift.inference import fit_em, fit_gem, fit_hmm_em
from conceptshift.models import GatedExperts, HMMMixture, RegressionMixture, SoftmaxGatedExperts

HIGHEST = jax.lax.Precision.HIGHEST


def _subjaxprs(params):
    for v in params.values():
        for u in v if isinstance(v, tuple | list) else (v,):
            if hasattr(u, "eqns"):
                yield u
            elif hasattr(u, "jaxpr") and hasattr(u.jaxpr, "eqns"):
                yield u.jaxpr


def dot_precisions(jaxpr) -> list:
    """The precision parameter of every dot_general in ``jaxpr`` and its sub-jaxprs."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn.params["precision"])
        for sub in _subjaxprs(eqn.params):
            out += dot_precisions(sub)
    return out


def assert_all_highest(fn, *args):
    closed = jax.make_jaxpr(fn)(*args)
    precisions = dot_precisions(closed.jaxpr)
    assert precisions, "no matrix product traced: the check would be vacuous"
    low = [p for p in precisions if p != (HIGHEST, HIGHEST)]
    assert not low, f"{len(low)} of {len(precisions)} products below full precision: {low[:3]}"


def test_walker_sees_default_precision_products():
    # the check can fail: a plain product is reported
    def loop(a):
        return jax.lax.while_loop(lambda c: c[1] < 2, lambda c: (c[0] @ c[0], c[1] + 1), (a, 0))

    closed = jax.make_jaxpr(loop)(jnp.ones((3, 3)))
    assert dot_precisions(closed.jaxpr) == [None]


@once
@pytest.mark.parametrize("model", [RegressionMixture(2), RegressionMixture(2, degree=2),
                                   GatedExperts(2), SoftmaxGatedExperts(2)], ids=lambda m: type(m).__name__)
def test_fits_and_predictions_use_full_precision(model):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(40, 1)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(40, 1)), jnp.float32)
    key = jax.random.key(0)
    if isinstance(model, SoftmaxGatedExperts):
        fit = lambda x, y: fit_gem(model, key, x, y, restarts=2, max_iter=3).params  # noqa: E731
    else:
        fit = lambda x, y: fit_em(model, key, x, y, restarts=2, max_iter=3).params  # noqa: E731
    assert_all_highest(fit, x, y)
    params = jax.eval_shape(fit, x, y)  # shapes only: nothing is compiled or run
    assert_all_highest(lambda p, x, y: model.log_likelihood(p, x, y), params, x, y)


@once
def test_baum_welch_uses_full_precision():
    m = HMMMixture(2, 2, 4, n_heads=1)
    truth = m.init_params(jax.random.key(0))
    x, lengths, y, _ = m.sample(jax.random.key(1), truth, n=20, length=6)
    assert_all_highest(lambda x, y: fit_hmm_em(m, jax.random.key(2), x, lengths, y, max_iter=2).params,
                       x, y)

"""A fitted conditional q̂(y | x): what every estimator returns, for every family."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array


@jax.tree_util.register_pytree_node_class
class Predictor:
    """q̂(y | x) = sum_k p̂(k | x) p(y | x, thetâ_k) for a single-head fit of any family.

    A pytree (the family is static), so predictors can be returned from ``jit`` and ``vmap``. Its
    methods forward to the family's protocol (``conditional_log_prob``, ``conditional_mean`` where
    y has a mean, ``conditional_log_probs`` where y is categorical, ``posterior_k``,
    ``sample_conditional``); family-specific data arguments (a mixture of HMMs' ``lengths``) pass
    through as keywords. ``x`` is as the family's ``batch`` takes it (tokens with -1 as trailing
    padding for sequences).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from conceptshift.models import RegressionMixture
      >>> m = RegressionMixture(2)
      >>> pred = Predictor(m, m.init_params(jax.random.key(0)))
      >>> pred.mean(jnp.zeros((4, 1))).shape
      (4,)
    """

    def __init__(self, model, params: Any):
        self.model = model
        self.params = params

    def tree_flatten(self):
        return (self.params,), self.model

    @classmethod
    def tree_unflatten(cls, model, children):
        return cls(model, children[0])

    def log_prob(self, x, y, **data) -> Array:
        """log q̂(y | x), shape (N,), for x (N, ...) and y (N,)."""
        return self.model.conditional_log_prob(self.params, x, y=y, head=0, **data)

    def log_probs(self, x, **data) -> Array:
        """log q̂(y = v | x) for every value v of a categorical y, (N, V)."""
        fn = getattr(self.model, "conditional_log_probs", None)
        if fn is None:
            raise TypeError(f"{type(self.model).__name__} has a continuous y: use log_prob or mean")
        return fn(self.params, x, head=0, **data)

    def mean(self, x, **data) -> Array:
        """q̂(x) = E_q̂[y | x], shape (N,)."""
        fn = getattr(self.model, "conditional_mean", None)
        if fn is None:
            raise TypeError(f"{type(self.model).__name__} has a categorical y without a mean: use "
                            "log_probs")
        return fn(self.params, x, head=0, **data)

    def posterior_k(self, x, **data) -> Array:
        """q̂(k | x), shape (N, K)."""
        return self.model.posterior_k(self.params, x, **data)

    def sample(self, key, x: Array) -> Array:
        """y ~ q̂(y | x) for each row of x, shape (N,)."""
        with jax.numpy_rank_promotion("allow"):  # numpyro's mixture sampler broadcasts implicitly
            return self.model.sample_conditional(key, self.params, x)[:, 0]

    def __repr__(self) -> str:
        return f"Predictor({self.model!r})"


def strong_predictor(model, params, head: int = 0) -> Predictor:
    """The predictor of one head of a (possibly multi-head) fit."""
    return Predictor(model.with_heads(1), model.select_heads(params, (head,)))


def with_proportions(pred: Predictor, log_weights: Array) -> Predictor:
    """The same components under other proportions (Algorithm 1, step 4; every family's
    parameters carry the proportions as ``log_weights``)."""
    return Predictor(pred.model, pred.params._replace(log_weights=jnp.asarray(log_weights)))

"""A fitted conditional q̂(y | x): what every estimator returns."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from ..models._experts import ExpertsFamily


@jax.tree_util.register_pytree_node_class
class Predictor:
    """q̂(y | x) = sum_k p̂(k | x) phi(y; x, thetâ_k) for a single-head family and its parameters.

    A pytree (the family is static), so predictors can be returned from ``jit`` and ``vmap``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from conceptshift.models import RegressionMixture
      >>> m = RegressionMixture(2)
      >>> pred = Predictor(m, m.init_params(jax.random.key(0)))
      >>> pred.mean(jnp.zeros((4, 1))).shape
      (4,)
    """

    def __init__(self, model: ExpertsFamily, params: Any):
        self.model = model
        self.params = params

    def tree_flatten(self):
        return (self.params,), self.model

    @classmethod
    def tree_unflatten(cls, model, children):
        return cls(model, children[0])

    def log_prob(self, x: Array, y: Array) -> Array:
        """log q̂(y | x), shape (N,), for x (N, D) and y (N,)."""
        return self.model.conditional_log_prob(self.params, x, y, head=0)

    def mean(self, x: Array) -> Array:
        """q̂(x) = E_q̂[y | x], shape (N,)."""
        return self.model.conditional_mean(self.params, x, head=0)

    def posterior_k(self, x: Array) -> Array:
        """q̂(k | x), shape (N, K)."""
        return self.model.posterior_k(self.params, x)

    def sample(self, key, x: Array) -> Array:
        """y ~ q̂(y | x) for each row of x, shape (N,)."""
        with jax.numpy_rank_promotion("allow"):  # numpyro's mixture sampler broadcasts implicitly
            return self.model.sample_conditional(key, self.params, x)[:, 0]

    def __repr__(self) -> str:
        return f"Predictor({self.model!r})"


def strong_predictor(model: ExpertsFamily, params, head: int = 0) -> Predictor:
    """The predictor of one head of a (possibly multi-head) fit."""
    return Predictor(model.with_heads(1), model.select_heads(params, (head,)))


def with_proportions(pred: Predictor, log_weights: Array) -> Predictor:
    """The same components under other proportions (Algorithm 1, step 4)."""
    return Predictor(pred.model, pred.params._replace(log_weights=jnp.asarray(log_weights)))

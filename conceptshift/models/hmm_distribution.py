"""NumPyro distribution of the mixture of HMMs' records (:class:`HMMMixtureDistribution`): the same
forward algorithm as the family's EM, for NumPyro's SVI and NUTS and for simulation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import Array
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints

from .hmm_params import HMMData, HMMParams


class HMMMixtureDistribution(dist.Distribution):
    """NumPyro distribution of one record per batch element: the integer vector [x^1..x^T, y_1..y_H].

    ``log_prob`` is the forward algorithm of :class:`HMMMixture` (tokens past a record's length are
    ignored, output tokens equal to -1 are missing); ``sample`` simulates the mixture;
    ``component_log_probs`` gives log pi_k + log p(record | k), EM's E-step quantity.
    """

    arg_constraints = {}
    pytree_data_fields = ("params", "lengths")
    pytree_aux_fields = ("model", "length")

    def __init__(self, model, params: HMMParams, lengths, length: int | None = None,
                 *, validate_args=None):
        self.model, self.params = model, params
        self.lengths = jnp.asarray(lengths, jnp.int32)
        self.length = int(length) if length is not None else None
        batch = self.lengths.shape
        event = ((self.length or 0) + model.n_heads,) if length is not None else (model.n_heads,)
        super().__init__(batch_shape=batch, event_shape=event, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(constraints.integer_interval(-1, self.model.n_tokens - 1), 1)

    def _split(self, value):
        H = self.model.n_heads
        x = value[..., : value.shape[-1] - H]
        y = value[..., value.shape[-1] - H:]
        return x, y

    def component_log_probs(self, value) -> Array:
        x, y = self._split(jnp.asarray(value, jnp.int32))
        d = HMMData(x, self.lengths, y, jnp.ones(self.lengths.shape, self.params.log_weights.dtype))
        return self.model.data_component_log_probs(self.params, d)

    def log_prob(self, value) -> Array:
        return logsumexp(self.component_log_probs(value), axis=-1)

    def sample(self, key, sample_shape=()):
        if self.length is None:
            raise ValueError("sampling needs the sequence length: build with distribution(..., length=T)")
        n = int(np.prod(sample_shape)) * int(np.prod(self.batch_shape))
        lengths = jnp.broadcast_to(self.lengths, tuple(sample_shape) + self.batch_shape).reshape(-1)
        x, _, y, _ = self.model.sample(key, self.params, n, self.length, lengths)
        return jnp.concatenate([x, y], axis=1).reshape(tuple(sample_shape) + self.batch_shape
                                                       + self.event_shape)

"""Optimal assignment against scipy, the greedy rule, the margin, and errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import once
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from conceptshift.inference.matching import (
    assignment_margin,
    greedy_assignment,
    invert_permutation,
    optimal_assignment,
)


@once
@settings(deadline=None, max_examples=12)
@given(k=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_matches_scipy(k, seed):
    cost = np.random.default_rng(seed).normal(size=(k, k))
    perm = np.asarray(optimal_assignment(cost))
    assert perm.dtype == np.int32 and sorted(perm.tolist()) == list(range(k))
    rows, cols = linear_sum_assignment(cost)
    np.testing.assert_allclose(cost[np.arange(k), perm].sum(), cost[rows, cols].sum(), rtol=1e-5)


@once
@settings(deadline=None, max_examples=20)
@given(k=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_recovers_known_permutation(k, seed):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(k, 3))
    perm = rng.permutation(k)
    shuffled = theta[perm] + 1e-3 * rng.normal(size=(k, 3))
    cost = ((theta[:, None] - shuffled[None]) ** 2).sum(-1)  # cost[i, j]: true i vs fitted j
    found = np.asarray(optimal_assignment(cost))
    np.testing.assert_array_equal(found, np.asarray(invert_permutation(perm)))


@once
def test_margin_is_second_best_by_enumeration():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4, 5):
        cost = rng.normal(size=(k, k))
        totals = sorted(cost[np.arange(k), list(p)].sum() for p in itertools.permutations(range(k)))
        assert float(assignment_margin(cost)) == pytest.approx(totals[1] - totals[0], abs=1e-5)


def test_greedy_reports_non_bijection():
    cost = np.array([[0.0, 1.0], [0.1, 2.0]])
    a, ok = greedy_assignment(cost)
    assert a.tolist() == [0, 0] and not bool(ok)
    assert np.asarray(optimal_assignment(cost)).tolist() == [1, 0]


def test_non_finite_cost_raises_and_jit_flags():
    bad = np.array([[0.0, np.nan], [1.0, 0.0]])
    with pytest.raises(ValueError, match="non-finite"):
        optimal_assignment(bad)
    assert np.asarray(jax.jit(optimal_assignment)(jnp.asarray(bad))).tolist() == [-1, -1]
    with pytest.raises(ValueError, match="square"):
        optimal_assignment(np.zeros((2, 3)))


def test_vmap():
    costs = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4, 4)))
    perms = jax.vmap(optimal_assignment)(costs)
    for c, p in zip(costs, perms, strict=True):
        r, col = linear_sum_assignment(np.asarray(c))
        assert float(c[jnp.arange(4), p].sum()) == pytest.approx(float(c[r, col].sum()), abs=1e-5)


def test_an_eager_assignment_compiles_once_per_shape():
    """Outside jit, optax's Hungarian loop compiled on every call (a long sweep ran out of memory
    after ~60 replicates); the assignment is jitted, so a second call of the same shape compiles
    nothing."""
    from test_target import _compiles

    rng = np.random.default_rng(11)
    optimal_assignment(rng.normal(size=(6, 6)))
    assert _compiles(lambda: optimal_assignment(rng.normal(size=(6, 6)))) == 0
    assignment_margin(rng.normal(size=(6, 6)))  # its first call compiles its eager operations
    assert _compiles(lambda: assignment_margin(rng.normal(size=(6, 6)))) == 0

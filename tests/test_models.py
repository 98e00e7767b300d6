"""Model families: densities against NumPyro, SciPy and scikit-learn; permutations; bases; input checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import X64, rtol
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture

from conceptshift.models import Basis, GatedExperts, GatedParams, RegressionMixture, RegressionParams

DTYPE = jnp.zeros((), dtype=float).dtype
# log-densities here are O(1-10); float32 keeps about 7 digits of each term
LP_RTOL = rtol(2e-5, 1e-11)
LP_ATOL = rtol(2e-4, 1e-10)


def _arr(a):
    return jnp.asarray(np.asarray(a, dtype=np.float64), dtype=DTYPE)


def _jit(fn):
    """Jitted with the (hashable) model as static first argument: one compile per model and shape,
    several times faster than dispatching every primitive eagerly."""
    return jax.jit(fn, static_argnums=0)




@_jit
def densities(m, p, x, y):
    """(component_log_probs (N, K), log_likelihood (N,), marginal_x_log_prob (N,)) in one program."""
    return m.component_log_probs(p, x, y), m.log_likelihood(p, x, y), m.marginal_x_log_prob(p, x)


def LL(m, p, x, y):
    return densities(m, p, x, y)[1]


def random_params(model, seed: int):
    """Random, well-conditioned parameters of either family, drawn in numpy."""
    rng = np.random.default_rng(seed)
    K, H, P, D = model.n_components, model.n_heads, model.n_coef, model.n_features
    log_scale = rng.uniform(-1.0, 0.5, (K, H))
    if model.shared_scale:
        log_scale = np.broadcast_to(log_scale[:1], (K, H))
    common = dict(
        log_weights=_arr(np.log(rng.dirichlet(np.full(K, 2.0)))),
        coef=_arr(rng.normal(0, 1.5, (K, H, P))),
        log_scale=_arr(log_scale),
    )
    if isinstance(model, GatedExperts):
        A = rng.normal(0, 0.7, (K, D, D))
        cov = A @ np.swapaxes(A, 1, 2) + 0.3 * np.eye(D)[None]
        if model.covariance == "diag":
            cov = cov * np.eye(D)[None]
        return GatedParams(**common, gate_mean=_arr(rng.normal(0, 1.5, (K, D))), gate_cov=_arr(cov))
    return RegressionParams(**common)


def random_data(model, seed: int, n: int = 9):
    rng = np.random.default_rng(1000 + seed)
    x = rng.normal(0, 1.5, (n, model.n_features))
    y = rng.normal(0, 2.0, (n, model.n_heads))
    return _arr(x), _arr(y)


FAMILIES = [
    RegressionMixture(3),
    RegressionMixture(2, n_features=2, n_heads=2, degree=2),
    RegressionMixture(3, n_features=0),
    RegressionMixture(2, shared_scale=True),
    GatedExperts(3),
    GatedExperts(2, n_features=2, n_heads=2),
    GatedExperts(3, n_features=3, covariance="diag"),
]
IDS = [
    f"{type(m).__name__}-K{m.n_components}D{m.n_features}H{m.n_heads}-{i}"
    for i, m in enumerate(FAMILIES)
]
GATED = [m for m in FAMILIES if isinstance(m, GatedExperts)]


# ---------------------------------------------------------------- NumPyro distributions
@_jit
def _numpyro_terms(model, params, x, y):
    d = model.distribution(params, x)
    # static facts, checked while tracing
    assert d.batch_shape == (x.shape[0],)
    assert d.event_shape == (model.n_heads,)
    return (d.component_log_probs(y), d.log_prob(y)) + densities.__wrapped__(model, params, x, y)


@pytest.mark.parametrize("model", FAMILIES, ids=IDS)
def test_numpyro_distribution_matches_component_log_probs(model):
    params = random_params(model, 0)
    x, y = random_data(model, 0)
    comp, cond, expected, ll, marg = _numpyro_terms(model, params, x, y)
    assert expected.shape == (x.shape[0], model.n_components)
    np.testing.assert_allclose(
        np.asarray(comp + marg[:, None]), np.asarray(expected), rtol=LP_RTOL, atol=LP_ATOL
    )
    # the mixture's own log_prob is the conditional log p(y | x)
    np.testing.assert_allclose(np.asarray(cond + marg), np.asarray(ll), rtol=LP_RTOL, atol=LP_ATOL)


@_jit
def _gate_terms(model, params, x):
    # numpyro's MultivariateNormal broadcasts implicitly: only valid without strict rank promotion
    # (the caller traces this inside `jax.numpy_rank_promotion("allow")`)
    return (
        model.gate_log_probs(params, x),
        params.log_weights[None, :] + model.gate_distribution(params).log_prob(x[:, None, :]),
        model.marginal_x_log_prob(params, x),
        model.x_distribution(params).log_prob(x),
    )


@pytest.mark.parametrize("model", GATED, ids=[f"D{m.n_features}-{m.covariance}" for m in GATED])
def test_gate_log_probs_match_numpyro_mvn(model):
    params = random_params(model, 1)
    x, _ = random_data(model, 1)
    with jax.numpy_rank_promotion("allow"):
        got, expected, marg, marg_numpyro = _gate_terms(model, params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=LP_RTOL, atol=LP_ATOL)
    np.testing.assert_allclose(
        np.asarray(marg), np.asarray(marg_numpyro), rtol=LP_RTOL, atol=LP_ATOL
    )


def test_regression_marginal_x_is_zero_and_gates_are_weights():
    model = RegressionMixture(3)
    params = random_params(model, 2)
    x, _ = random_data(model, 2)
    np.testing.assert_array_equal(np.asarray(densities(model, params, x, x)[2]), 0.0)
    gates = np.asarray(model.gate_log_probs(params, x))
    np.testing.assert_array_equal(gates, np.broadcast_to(np.asarray(params.log_weights), gates.shape))


@_jit
def _head_terms(model, params, x, y):
    d = model.distribution(params, x)
    one = model.with_heads(1)
    out = []
    for h in range(model.n_heads):
        sub = model.select_heads(params, (h,))
        out.append((
            model.conditional_mean(params, x, head=h),
            d.mean[:, h],
            model.conditional_log_prob(params, x, y[:, h], head=h),
            one.distribution(sub, x).log_prob(y[:, h : h + 1]),
        ))
    return out


@pytest.mark.parametrize("model", [FAMILIES[1], FAMILIES[5]], ids=["regression", "gated"])
def test_conditional_helpers_per_head(model):
    params = random_params(model, 3)
    x, y = random_data(model, 3)
    # conditional_mean is the mixture's mean; conditional_log_prob is the one-head mixture's density
    for mean, mix_mean, logp, sub_logp in _head_terms(model, params, x, y):
        np.testing.assert_allclose(np.asarray(mean), np.asarray(mix_mean), rtol=LP_RTOL, atol=LP_ATOL)
        np.testing.assert_allclose(np.asarray(logp), np.asarray(sub_logp), rtol=LP_RTOL, atol=LP_ATOL)
    sub = model.select_heads(params, (1, 0))
    np.testing.assert_array_equal(np.asarray(sub.coef), np.asarray(params.coef)[:, ::-1])
    np.testing.assert_array_equal(np.asarray(sub.log_scale), np.asarray(params.log_scale)[:, ::-1])


# ---------------------------------------------------------------- permutation invariance
@st.composite
def family_and_perm(draw):
    gated = draw(st.booleans())
    K = draw(st.integers(1, 5))
    perm = draw(st.permutations(range(K)))
    seed = draw(st.integers(0, 2**16))
    model = GatedExperts(K, n_features=2) if gated else RegressionMixture(K, degree=2)
    return model, tuple(perm), seed


@_jit
def _permute_terms(model, params, perm, x, y):
    permuted = model.permute(params, perm)
    return (permuted, model.component_log_probs(params, x, y),
            model.component_log_probs(permuted, x, y), model.log_likelihood(params, x, y),
            model.log_likelihood(permuted, x, y))


@settings(max_examples=20, deadline=None, database=None)
@given(family_and_perm())
def test_log_likelihood_invariant_under_permute(case):
    model, perm, seed = case
    params = random_params(model, seed)
    x, y = random_data(model, seed)
    permuted, lp, lp_perm, ll, ll_perm = _permute_terms(model, params, jnp.asarray(perm), x, y)
    assert type(permuted) is type(params)
    # component j of the result is component perm[j] of params, for every field
    for a, b in zip(permuted, params, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[list(perm)])
    np.testing.assert_array_equal(np.asarray(lp_perm), np.asarray(lp)[:, list(perm)])
    np.testing.assert_allclose(
        np.asarray(ll_perm), np.asarray(ll), rtol=rtol(1e-6, 1e-14), atol=rtol(1e-5, 1e-13)
    )


# ---------------------------------------------------------------- gated == bivariate Gaussian mixture
def random_bivariate_mixture(seed: int, K: int):
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(K, 3.0))
    means = rng.normal(0, 3, (K, 2))
    A = rng.normal(0, 1, (K, 2, 2))
    covs = A @ np.swapaxes(A, 1, 2) + 0.2 * np.eye(2)[None]
    return weights, means, covs


def gated_from_gaussian_mixture(weights, means, covs):
    """Full-covariance mixture of (x, y) -> GatedExperts(K) params with one covariate."""
    sxx, syx, syy = covs[:, 0, 0], covs[:, 1, 0], covs[:, 0, 1]
    assert np.allclose(syx, syy)
    slope = syx / sxx
    intercept = means[:, 1] - slope * means[:, 0]
    resid_var = covs[:, 1, 1] - syx**2 / sxx
    return GatedParams(
        log_weights=_arr(np.log(weights)),
        coef=_arr(np.stack([intercept, slope], -1)[:, None, :]),  # (K, 1, 2)
        log_scale=_arr(0.5 * np.log(resid_var)[:, None]),
        gate_mean=_arr(means[:, :1]),
        gate_cov=_arr(sxx[:, None, None]),
    )


def sklearn_mixture(weights, means, covs) -> GaussianMixture:
    K = len(weights)
    gm = GaussianMixture(K, covariance_type="full")
    gm.weights_ = weights
    gm.means_ = means
    gm.covariances_ = covs
    chol = np.linalg.cholesky(covs)
    gm.precisions_cholesky_ = np.stack([np.linalg.inv(c).T for c in chol])
    gm.precisions_ = np.linalg.inv(covs)
    return gm


@pytest.mark.parametrize("K,seed", [(1, 0), (2, 1), (3, 2), (4, 3)])
def test_gated_one_covariate_is_bivariate_gaussian_mixture(K, seed):
    weights, means, covs = random_bivariate_mixture(seed, K)
    rng = np.random.default_rng(seed + 50)
    xy = means[rng.integers(0, K, 40)] + rng.normal(0, 2, (40, 2))
    model = GatedExperts(K)
    params = gated_from_gaussian_mixture(weights, means, covs)
    _, ours, ours_marg = densities(model, params, _arr(xy[:, :1]), _arr(xy[:, 1:]))
    ours = np.asarray(ours)

    dens = sum(
        w * multivariate_normal(m, c).pdf(xy) for w, m, c in zip(weights, means, covs, strict=True)
    )
    np.testing.assert_allclose(ours, np.log(dens), rtol=LP_RTOL, atol=LP_ATOL)
    skl = sklearn_mixture(weights, means, covs).score_samples(xy)
    np.testing.assert_allclose(ours, skl, rtol=LP_RTOL, atol=LP_ATOL)
    # the marginal of x is the x-margin of the bivariate mixture
    marg = sum(
        w * multivariate_normal(m[0], c[0, 0]).pdf(xy[:, 0])
        for w, m, c in zip(weights, means, covs, strict=True)
    )
    np.testing.assert_allclose(
        np.asarray(ours_marg), np.log(marg),
        rtol=LP_RTOL, atol=LP_ATOL,
    )
    # and the free-parameter counts agree: (K - 1) + K * (2 means + 3 covariances)
    assert model.n_params == (K - 1) + 5 * K


# ---------------------------------------------------------------- bases
def test_basis_polynomial_names_and_shapes():
    b = Basis(n_features=2, degree=2)
    assert b.names == ("1", "x1", "x2", "x1^2", "x1*x2", "x2^2")
    assert b.n_terms == 6
    b3 = Basis(n_features=2, degree=3)
    assert b3.names[6:] == ("x1^3", "x1^2*x2", "x1*x2^2", "x2^3")
    for D in range(0, 4):
        for deg in range(0, 4):
            # monomials of total degree <= deg in D variables
            assert Basis(D, deg).n_terms == math.comb(D + deg, deg)
    assert Basis(3, 0).names == ("1",)


def test_basis_design_values():
    rng = np.random.default_rng(0)
    xn = rng.normal(size=(6, 2))
    phi = np.asarray(Basis(2, 2)(_arr(xn)))
    a, b = xn[:, 0], xn[:, 1]
    expected = np.stack([np.ones(6), a, b, a * a, a * b, b * b], 1)
    np.testing.assert_allclose(phi, expected, rtol=rtol(1e-6, 1e-15))
    assert phi.dtype == DTYPE
    model = RegressionMixture(2, n_features=2, degree=2)
    assert model.coef_names == Basis(2, 2).names
    assert model.n_coef == 6
    np.testing.assert_array_equal(np.asarray(model.design(_arr(xn))), phi)


def _sin_cos(x):
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=1)


def test_user_basis_fn():
    model = RegressionMixture(2, n_features=2, basis_fn=_sin_cos)
    assert model.n_coef == 5
    assert model.coef_names == ("1", "psi1", "psi2", "psi3", "psi4")
    rng = np.random.default_rng(1)
    xn = rng.normal(size=(5, 2))
    phi = np.asarray(model.design(_arr(xn)))
    np.testing.assert_allclose(
        phi, np.c_[np.ones(5), np.sin(xn), np.cos(xn)], rtol=rtol(1e-6, 1e-15), atol=rtol(1e-6, 0)
    )
    # the expert mean uses the user map
    params = random_params(model, 4)
    mean = np.asarray(model.expert_mean(params, _arr(xn)))
    np.testing.assert_allclose(
        mean, np.einsum("np,khp->nkh", phi, np.asarray(params.coef)), rtol=rtol(1e-5, 1e-13),
        atol=rtol(1e-5, 1e-13),
    )
    # a map returning the wrong rank is refused with a clear message
    with pytest.raises(ValueError, match="basis fn"):
        _ = Basis(2, fn=jnp.sum).n_terms


def test_intercept_only_models():
    m = RegressionMixture(2, n_features=0)
    assert m.degree == 0 and m.n_coef == 1 and m.coef_names == ("1",)
    assert RegressionMixture(2, degree=0).n_coef == 1


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize(
    "model,expected",
    [
        (RegressionMixture(2, degree=2), 9),  # flexmix's df for NPreg (K=2, yn ~ x + x^2)
        (RegressionMixture(3), 2 + 3 * 2 + 3),
        (RegressionMixture(2, n_features=0, shared_scale=True), 1 + 2 + 1),  # mixtools: 4
        (RegressionMixture(3, n_features=2, n_heads=2, degree=2), 2 + 3 * 2 * 6 + 3 * 2),
        (RegressionMixture(3, n_heads=2, shared_scale=True), 2 + 3 * 2 * 2 + 2),
        (GatedExperts(2), 1 + 2 * 2 + 2 + 2 * (1 + 1)),  # = bivariate full GMM: 11
        (GatedExperts(3, n_features=2), 2 + 3 * 3 + 3 + 3 * (2 + 3)),
        (GatedExperts(3, n_features=2, covariance="diag"), 2 + 3 * 3 + 3 + 3 * (2 + 2)),
        (GatedExperts(2, n_features=3, n_heads=2, shared_scale=True), 1 + 2 * 2 * 4 + 2 + 2 * 9),
    ],
)
def test_n_params(model, expected):
    assert model.n_params == expected


@pytest.mark.parametrize("D", [1, 2, 3])
def test_gated_full_linear_has_as_many_params_as_full_gmm(D):
    K = 3
    gmm = (K - 1) + K * ((D + 1) + (D + 1) * (D + 2) // 2)
    assert GatedExperts(K, n_features=D).n_params == gmm


# ---------------------------------------------------------------- input checks
def test_check_data_shapes_and_dtype():
    model = RegressionMixture(2)
    x, y = model.check_data(np.arange(4), [1, 2, 3, 4])
    assert x.shape == (4, 1) and y.shape == (4, 1)
    assert x.dtype == DTYPE and y.dtype == DTYPE
    x, y, w = model.check_data(np.zeros((4, 1)), np.zeros((4, 1)), np.ones(4, dtype=int))
    assert w.shape == (4,) and w.dtype == DTYPE
    m0 = RegressionMixture(2, n_features=0)
    x, y = m0.check_data(None, np.zeros(5))
    assert x.shape == (5, 0) and y.shape == (5, 1)


@pytest.mark.parametrize(
    "model,x,y,w,match",
    [
        (RegressionMixture(2, n_features=2), np.zeros((5, 3)), np.zeros(5), None, r"^x .*column"),
        (RegressionMixture(2, n_features=2), np.zeros(5), np.zeros(5), None, r"^x .*n_features=2"),
        (GatedExperts(2, n_features=2), np.zeros((5, 1)), np.zeros(5), None, r"^x .*column"),
        (RegressionMixture(2), np.zeros((5, 1)), np.zeros((5, 2)), None, r"^y .*shape"),
        (RegressionMixture(2), np.zeros((5, 1)), np.zeros(4), None, r"^y .*shape"),
        (RegressionMixture(2, n_heads=2), np.zeros(5), np.zeros(5), None, r"^y .*n_heads=2"),
        (RegressionMixture(2), np.zeros((5, 1)), np.zeros(5), np.ones(4), r"^weights .*shape"),
        (RegressionMixture(2), np.zeros((5, 1)), np.zeros(5), -np.ones(5), r"^weights"),
        (RegressionMixture(2), np.zeros((5, 1)), np.zeros(5), np.zeros(5), r"^weights"),
        (RegressionMixture(2), np.zeros((0, 1)), np.zeros(0), None, r"^x .*at least one row"),
        (RegressionMixture(2), np.zeros((5, 1, 1)), np.zeros(5), None, r"^x .*ndim"),
    ],
)
def test_check_data_shape_errors(model, x, y, w, match):
    with pytest.raises(ValueError, match=match):
        model.check_data(x, y, w)


@pytest.mark.parametrize("where", ["x", "y", "weights"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_data_non_finite_names_the_argument(where, bad):
    model = GatedExperts(2)
    arrays = {"x": np.ones(6), "y": np.ones(6), "weights": np.ones(6)}
    arrays[where][3] = bad
    with pytest.raises(ValueError, match=rf"^{where} has 1 non-finite value"):
        model.check_data(arrays["x"], arrays["y"], arrays["weights"])


@pytest.mark.parametrize("where", ["x", "y", "weights"])
@pytest.mark.parametrize(
    "bad",
    [np.array(["a", "b", "c"]), np.array([1.0, None, 2.0], dtype=object), np.ones(3) * 1j],
    ids=["str", "object", "complex"],
)
def test_check_data_non_numeric_is_type_error(where, bad):
    model = RegressionMixture(2)
    arrays = {"x": np.ones(3), "y": np.ones(3), "weights": np.ones(3)}
    arrays[where] = bad
    with pytest.raises(TypeError, match=rf"^{where} must"):
        model.check_data(arrays["x"], arrays["y"], arrays["weights"])


def test_check_data_missing_x_or_y():
    with pytest.raises(TypeError, match=r"^x must be an array"):
        RegressionMixture(2).check_data(None, np.zeros(3))
    with pytest.raises(TypeError, match=r"^y is required"):
        RegressionMixture(2, n_features=0).check_data(None, None)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"n_components": 0}, ValueError, "n_components"),
        ({"n_components": 2.0}, TypeError, "n_components"),
        ({"n_components": 2, "n_features": -1}, ValueError, "n_features"),
        ({"n_components": 2, "n_heads": 0}, ValueError, "n_heads"),
        ({"n_components": 2, "degree": -1}, ValueError, "degree"),
        ({"n_components": 2, "reg": 0.0}, ValueError, "reg"),
        ({"n_components": 2, "basis_fn": 3}, TypeError, "basis_fn"),
    ],
)
def test_constructor_errors(kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}"):
        RegressionMixture(**kwargs)


def test_gated_constructor_errors():
    with pytest.raises(ValueError, match="^n_features"):
        GatedExperts(2, n_features=0)
    with pytest.raises(ValueError, match="^covariance"):
        GatedExperts(2, covariance="spherical")


def test_models_are_hashable_static_arguments():
    assert hash(RegressionMixture(2)) == hash(RegressionMixture(2))
    assert RegressionMixture(2) == RegressionMixture(2)
    assert RegressionMixture(2) != RegressionMixture(3)


# ---------------------------------------------------------------- jit and vmap
@pytest.mark.parametrize("model", [FAMILIES[1], FAMILIES[5]], ids=["regression", "gated"])
def test_log_likelihood_jit_and_vmap_over_params(model):
    B = 4
    batch = [random_params(model, 10 + b) for b in range(B)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *batch)
    x, y = random_data(model, 10)
    expected = np.stack([np.asarray(LL(model, p, x, y)) for p in batch])

    vmapped = jax.jit(jax.vmap(model.log_likelihood, in_axes=(0, None, None)))(stacked, x, y)
    assert vmapped.shape == (B, x.shape[0])
    np.testing.assert_allclose(np.asarray(vmapped), expected, rtol=LP_RTOL, atol=LP_ATOL)

    # vmap over data sets as well as parameters
    xs = jnp.stack([x + b for b in range(B)])
    per = jax.jit(jax.vmap(model.log_likelihood))(stacked, xs, jnp.stack([y] * B))
    for b in range(B):
        np.testing.assert_allclose(
            np.asarray(per[b]), np.asarray(LL(model, batch[b], xs[b], y)),
            rtol=LP_RTOL, atol=LP_ATOL,
        )


def test_default_dtype_follows_precision():
    model = GatedExperts(2)
    params = jax.eval_shape(model.init_params, jax.random.key(0))
    assert all(a.dtype == (jnp.float64 if X64 else jnp.float32) for a in params)

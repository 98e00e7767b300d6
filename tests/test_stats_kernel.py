"""The fused E-step kernel (``estep_stats_t``) against float64 NumPy sums written out term by term."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from conftest import once, rtol

from conceptshift import _kernels
from conceptshift.models import Basis, GatedExperts, RegressionMixture
from conceptshift.models._experts import SuffStats

# the compiled CPU kernel (conceptshift/_kernels) and the XLA formulation are both checked
KERNEL = pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "xla"])


@pytest.mark.parametrize("D,degree", [(1, 1), (1, 3), (2, 2), (3, 1), (3, 3)])
def test_shift_matrix_is_the_binomial_expansion(D, degree):
    basis = Basis(D, degree)
    rng = np.random.default_rng(D * 10 + degree)
    x = jnp.asarray(rng.normal(size=(20, D)))
    c = jnp.asarray(rng.normal(size=D) * 2)
    T = basis.shift_matrix(c)
    np.testing.assert_allclose(
        np.asarray(jnp.matmul(basis(x - c[None, :]), T.T, precision="highest")), np.asarray(basis(x)),
        rtol=rtol(1e-4, 1e-12), atol=rtol(1e-4, 1e-11)
    )


def test_shift_matrix_needs_a_polynomial_basis():
    with pytest.raises(ValueError, match="polynomial"):
        Basis(1, 1, fn=jnp.sin).shift_matrix(jnp.zeros(1))
    assert not Basis(2, 0).shiftable


def _reference(model, params, x, y, w, xbar):
    """log-likelihood and statistics in float64, one sample at a time in closed form."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x, y, w = (np.asarray(a, np.float64) for a in (x, y, w))
    phi = np.asarray(model.design(jnp.asarray(x)), np.float64)
    K = model.n_components
    mu = np.einsum("np,khp->nkh", phi, p.coef)
    s = np.exp(p.log_scale)
    logp = np.log(np.exp(p.log_weights))[None] + np.sum(
        -0.5 * ((y[:, None, :] - mu) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi), -1
    )
    if isinstance(model, GatedExperts):
        for k in range(K):
            d = x - p.gate_mean[k]
            cov = p.gate_cov[k]
            logp[:, k] += -0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) - 0.5 * (
                np.linalg.slogdet(cov)[1] + x.shape[1] * np.log(2 * np.pi)
            )
    m = logp.max(1, keepdims=True)
    ll = (m + np.log(np.exp(logp - m).sum(1, keepdims=True)))[:, 0]
    r = np.exp(logp - ll[:, None]) * w[:, None]
    e = y[:, None, :] - mu  # (N, K, H) against the current coefficients
    xc = x - xbar
    return float(w @ ll), SuffStats(
        r.sum(0),
        np.einsum("nk,np,nq->kpq", r, phi, phi),
        np.einsum("nk,np,nkh->kph", r, phi, e),
        np.einsum("nk,nkh->kh", r, e**2),
        np.swapaxes(p.coef, 1, 2),
        np.einsum("nk,nd->kd", r, xc) if isinstance(model, GatedExperts) else np.zeros((K, 0)),
        np.einsum("nk,nd,ne->kde", r, xc, xc) if isinstance(model, GatedExperts)
        else np.zeros((K, 0, 0)),
    )


def _sq(x):
    return jnp.concatenate([x, x[:, :1] ** 2], axis=1)


MODELS = {
    "regression": RegressionMixture(3, n_features=2, degree=2),
    "regression-intercept": RegressionMixture(2, n_features=0),
    "gated-full": GatedExperts(3, n_features=2, n_heads=2),
    "gated-diag": GatedExperts(2, n_features=3, covariance="diag", degree=2),
    "gated-fn": GatedExperts(2, n_features=2, basis_fn=_sq),
}


@KERNEL
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_estep_equals_closed_form_sums(name, kernel):
    model = MODELS[name]
    rng = np.random.default_rng(7)
    n, D, H = 2100, model.n_features, model.n_heads  # the kernel's chunks: 1024, 1024 and a tail
    x = 3.0 + rng.normal(size=(n, D))  # off-centre: the kernel centres on xbar
    y = rng.normal(size=(n, H)) + (x[:, :1] if D else 0.0)
    w = rng.uniform(0.5, 1.5, size=n)
    dtype = jnp.zeros(()).dtype
    xj, yj, wj = (jnp.asarray(a, dtype) for a in (x, y, w))
    params = model.init_params(jax.random.key(3), dtype)
    if isinstance(model, GatedExperts):
        params = params._replace(gate_mean=params.gate_mean + 3.0,
                                 gate_cov=params.gate_cov * jnp.asarray(1.5, dtype))
    stats = model.data_stats(xj, yj, wj)
    if kernel and not model.cpu_kernel_applies(dtype):
        pytest.skip("the kernel does not apply to this model (checked in the XLA variant)")
    with _kernels.use_cpu_kernel(kernel, clear_caches=False):  # a fresh jit: traced anew
        ll, ss = jax.jit(lambda *a: model.estep_stats_t(*a))(params, xj.T, yj.T, wj, stats)
    ll_ref, ref = _reference(model, params, x, y, w, np.asarray(stats.x_mean, np.float64))
    assert float(ll) == pytest.approx(ll_ref, rel=rtol(1e-5, 1e-11))
    for field, a, b in zip(SuffStats._fields, ss, ref, strict=True):
        scale = max(1.0, float(np.max(np.abs(b)))) if np.size(b) else 1.0
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol(2e-4, 1e-9),
                                   atol=scale * rtol(2e-5, 1e-11), err_msg=field)


@pytest.mark.parametrize("name", ["regression", "gated-full", "gated-fn"])
def test_fused_estep_equals_component_log_probs_and_suff_stats(name):
    """The fused kernel and the two-step path (log-densities, then statistics of r) agree."""
    model = MODELS[name]
    rng = np.random.default_rng(11)
    n = 300
    x = jnp.asarray(rng.normal(size=(n, model.n_features)), jnp.zeros(()).dtype)
    y = jnp.asarray(rng.normal(size=(n, model.n_heads)), x.dtype)
    w = jnp.ones((n,), x.dtype)
    params = model.init_params(jax.random.key(1), x.dtype)
    stats = model.data_stats(x, y, w)
    ll, ss = model.estep_stats_t(params, x.T, y.T, w, stats)
    logp = model.component_log_probs_t(params, x.T, y.T)
    lse = jax.scipy.special.logsumexp(logp, axis=0)
    r = jnp.exp(logp - lse[None])
    ss2 = model.suff_stats_t(x.T, y.T, r, jnp.swapaxes(params.coef, 1, 2), stats)
    assert float(ll) == pytest.approx(float(jnp.sum(lse)), rel=rtol(1e-5, 1e-12))
    for a, b in itertools.zip_longest(ss, ss2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol(1e-4, 1e-10),
                                   atol=rtol(1e-4, 1e-10))


def _estep_inputs(model, n=1500, seed=0):
    rng = np.random.default_rng(seed)
    dtype = jnp.zeros(()).dtype
    x = jnp.asarray(2.0 + rng.normal(size=(n, model.n_features)), dtype)
    y = jnp.asarray(rng.normal(size=(n, model.n_heads)), dtype)
    w = jnp.asarray(rng.uniform(0.5, 1.5, size=n), dtype)
    params = model.init_params(jax.random.key(seed), dtype)
    return params, x, y, w, model.data_stats(x, y, w)


@once
@pytest.mark.parametrize("name,uses", [("regression", True), ("regression-intercept", True),
                                       ("gated-full", True), ("gated-diag", True),
                                       ("gated-fn", False), ("wide", False)])
def test_cpu_kernel_dispatch(name, uses):
    """Where the kernel applies (statistics within its accumulators; gate statistics read off a
    centred design) the CPU lowering calls it; elsewhere (a user basis for a gated family, P = 129
    columns), and when it is turned off, the program is XLA operations only."""
    model = MODELS[name] if name != "wide" else RegressionMixture(64, n_features=22)
    if uses and not _kernels.enabled():
        pytest.skip("no C++ compiler here: the kernel is unavailable (see the fallback test)")
    params, x, y, w, stats = _estep_inputs(model, n=64)
    for on in (True, False):
        with _kernels.use_cpu_kernel(on, clear_caches=False):
            text = str(jax.make_jaxpr(model.estep_stats_t)(params, x.T, y.T, w, stats))
        assert ("conceptshift_estep" in text) == (uses and on)


@once
def test_cpu_kernel_is_deterministic_and_vmaps():
    """Chunks are reduced in a fixed order (bit-identical repeats, whatever the threads do), and
    under vmap (restarts) each member equals its own call (to rounding: the batched parameter
    algebra around the kernel rounds differently)."""
    model = MODELS["gated-full"]
    params, x, y, w, stats = _estep_inputs(model, n=5000)
    f = jax.jit(model.estep_stats_t)
    a, b = f(params, x.T, y.T, w, stats), f(params, x.T, y.T, w, stats)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    batch = jax.tree.map(lambda *v: jnp.stack(v),
                         *(model.init_params(jax.random.key(i), x.dtype) for i in range(3)))
    out = jax.jit(jax.vmap(model.estep_stats_t, in_axes=(0, None, None, None, None)))(
        batch, x.T, y.T, w, stats)
    for i in range(3):
        one = f(jax.tree.map(lambda v, i=i: v[i], batch), x.T, y.T, w, stats)
        for u, v in zip(jax.tree.leaves(one), jax.tree.leaves(out), strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v)[i], rtol=2e-6,
                                       atol=2e-6 * max(1.0, float(np.max(np.abs(u)))))


def test_cpu_kernel_exp_and_log_over_their_range():
    """The kernel's own exp and log: per row, two components with log terms 0 and b give
    ll = log(1 + e^b) and r_1 = sigmoid(b); b covers underflow (-800), the reduction's range and
    b > 0 (where the maximum moves to the second component)."""
    dtype = jnp.zeros(()).dtype
    b = np.concatenate([np.linspace(-800, 60, 4001), [-np.inf, 0.0, 1e-30, -1e-30]])
    b = b.astype(dtype)
    one = jnp.ones((1, 1), dtype)
    zero = jnp.zeros((1, 1), dtype)

    def row(bi):
        base = jnp.stack([jnp.zeros((), dtype), bi])[:, None]  # (K = 2, M = 1)
        ll, nk, *_ = _kernels.estep(one, zero, jnp.ones((1,), dtype), jnp.zeros((2, 0, 1), dtype),
                                    base, jnp.zeros((2, 1, 1), dtype), jnp.zeros((2, 1), dtype))
        return ll, nk

    _kernels.enabled() or pytest.skip("the CPU kernel is unavailable here")
    ll, nk = jax.jit(jax.vmap(row))(jnp.asarray(b))
    b64 = b.astype(np.float64)
    # ll = max + log(sum): where the sum rounds to 1, ll is off by up to an ulp of 1 (as in XLA)
    np.testing.assert_allclose(np.asarray(ll, np.float64), np.logaddexp(0.0, b64),
                               rtol=rtol(3e-7, 4e-16), atol=rtol(1.2e-7, 2.3e-16))
    np.testing.assert_allclose(np.asarray(nk[:, 1], np.float64), scipy.special.expit(b64),
                               rtol=rtol(3e-7, 4e-16), atol=rtol(2e-38, 3e-308))
    np.testing.assert_allclose(np.asarray(nk.sum(1), np.float64), 1.0, rtol=rtol(3e-7, 4e-16))


def test_cpu_kernel_non_finite_terms_and_zero_weights():
    """A component of weight zero (log weight -inf) gets no responsibility, rows of weight zero
    add nothing, and a row where every component is impossible gives NaN, as in XLA."""
    model = MODELS["regression"]
    params, x, y, w, stats = _estep_inputs(model, n=300)
    params = params._replace(log_weights=params.log_weights.at[1].set(-jnp.inf))
    w = w.at[:50].set(0.0)
    out = {}
    for on in (True, False):
        with _kernels.use_cpu_kernel(on, clear_caches=False):
            out[on] = jax.jit(lambda *a: model.estep_stats_t(*a))(params, x.T, y.T, w, stats)
    assert np.all(np.isfinite(np.asarray(out[True][0])))
    assert float(out[True][1].nk[1]) == 0.0
    for u, v in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False]), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol(2e-5, 1e-11),
                                   atol=rtol(2e-5, 1e-11) * max(1.0, float(np.max(np.abs(v), initial=0))))
    dead = params._replace(log_weights=jnp.full_like(params.log_weights, -jnp.inf))
    for on in (True, False):
        with _kernels.use_cpu_kernel(on, clear_caches=False):
            ll, _ = jax.jit(lambda *a: model.estep_stats_t(*a))(dead, x.T, y.T, w, stats)
        assert np.isnan(float(ll))


@once
def test_cpu_kernel_build_failure_falls_back_to_xla(monkeypatch):
    """Without a compiler the fit still runs, on the XLA formulation, after one warning."""
    monkeypatch.setattr(_kernels, "_state", {})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(UserWarning, match="compiled CPU E-step is unavailable"):
        assert not _kernels.enabled()
    assert not _kernels.enabled()  # decided once per process
    model = MODELS["regression"]
    params, x, y, w, stats = _estep_inputs(model, n=64)
    assert "conceptshift_estep" not in str(jax.make_jaxpr(model.estep_stats_t)(
        params, x.T, y.T, w, stats))


@once
def test_cpu_kernel_can_be_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("CONCEPTSHIFT_CPU_KERNEL", "0")
    assert not _kernels.enabled()


@once
def test_backend_is_chosen_once_per_fit_and_keys_the_program(monkeypatch):
    """The E-step backend is a static argument of the compiled fit: switching it compiles a new
    program (no stale cache); a GPU/TPU program never builds or loads the kernel; asking for the
    kernel where it cannot run is a clear error before compiling."""
    from conceptshift.inference import fit_em
    from conceptshift.inference.em import _fit_em_jit

    _kernels.enabled() or pytest.skip("the CPU kernel is unavailable here")
    model = MODELS["regression"]
    params, x, y, w, stats = _estep_inputs(model, n=64)
    fits = {}
    for estep in ("kernel", "xla"):
        size = _fit_em_jit._cache_size()
        fits[estep] = fit_em(model, jax.random.key(0), x, y, restarts=2, max_iter=50, estep=estep)
        assert _fit_em_jit._cache_size() == size + 1  # its own program
    np.testing.assert_allclose(float(fits["kernel"].loglik), float(fits["xla"].loglik),
                               rtol=rtol(1e-5, 1e-11))
    with pytest.raises(ValueError, match="estep='kernel' needs a CPU program"):
        fit_em(MODELS["gated-fn"], jax.random.key(0), x, y, estep="kernel")
    with pytest.raises(ValueError, match="estep must be one of"):
        fit_em(model, jax.random.key(0), x, y, estep="fast")

    def no_build():
        raise AssertionError("the kernel was built or loaded for a GPU program")

    monkeypatch.setattr(_kernels, "_load", no_build)
    for platform in ("gpu", "tpu"):
        assert model.estep_backend(x.dtype, platform) == "xla"


@once
def test_gradient_through_the_kernel_is_a_clear_error():
    _kernels.enabled() or pytest.skip("the CPU kernel is unavailable here")
    model = MODELS["regression"]
    params, x, y, w, stats = _estep_inputs(model, n=64)

    def ll(p, backend):
        return model.estep_stats_t(p, x.T, y.T, w, stats, backend=backend)[0]

    with pytest.raises(TypeError, match="compiled CPU E-step .* has no derivative"):
        jax.grad(ll)(params, "kernel")
    g = jax.grad(ll)(params, "xla")
    assert np.all(np.isfinite(np.asarray(g.coef)))

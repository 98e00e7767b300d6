"""Row blocks and online EM for a family with expected statistics (the mixture of HMMs), through the
generic driver: blocked statistics give the one-block fit; online EM reaches the batch optimum. (The
4-device mesh check is tests/test_scale.py's sharded test, which fits an HMM too.)"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import X64, once, rtol

from conceptshift.inference import fit_em
from conceptshift.inference.online import fit_online_em
from conceptshift.models import HMMMixture
from conceptshift.models.batch import pad_tokens
from conceptshift.models.hmm_problem import make_hmm_problem, simulate_hmm


def _hmm_sample(n, seed=1):
    prob = make_hmm_problem(jax.random.key(0), n_components=2, n_states=3, n_tokens=6, length=8)
    sim = simulate_hmm(jax.random.key(seed), prob, n_source=n, n_target=10, n_test=10)
    x = np.asarray(pad_tokens(sim.source.x, sim.source.lengths))
    return HMMMixture(2, 3, 6, n_heads=1), x, np.asarray(sim.source.y)


@pytest.mark.slow  # 12 s; the blocked sums of the regression family stay in the default run
@once  # plumbing: the sums are the same in either precision
def test_hmm_blocked_fit_equals_one_block():
    """The generic driver sums the expected counts over row blocks (padding rows add nothing)."""
    m, x, y = _hmm_sample(1003)
    a = fit_em(m, jax.random.key(3), x, y, restarts=2, max_iter=25, tol=0.0, block_size=None)
    b = fit_em(m, jax.random.key(3), x, y, restarts=2, max_iter=25, tol=0.0, block_size=128)
    assert int(a.n_iter) == int(b.n_iter) == 25
    assert float(b.loglik) == pytest.approx(float(a.loglik), rel=rtol(1e-6, 1e-12))
    for u, v in zip(a.params, b.params, strict=True):
        np.testing.assert_allclose(np.asarray(v), np.asarray(u), atol=rtol(1e-3, 1e-9))
    with pytest.raises(ValueError, match="block_size"):
        fit_em(m, jax.random.key(3), x, y, block_size=0)


@pytest.mark.slow
@once
def test_online_em_of_hmm_reaches_batch_optimum(tmp_path):
    """Online EM through the protocol (``expected_stats``) on a mixture of HMMs read from .npy."""
    m, x, y = _hmm_sample(4000)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    batch = fit_em(m, jax.random.key(0), x, y, restarts=4)
    online = fit_online_em(m, jax.random.key(0), tmp_path / "x.npy", tmp_path / "y.npy",
                           chunk_size=1000, epochs=4)
    assert online.n_chunks == 16 and online.n_rows == 4000
    per_sample_gap = (float(batch.loglik) - online.loglik) / 4000
    assert -1e-4 < per_sample_gap < 2e-3, per_sample_gap
    np.testing.assert_allclose(online.loglik, float(m.log_likelihood(online.params, x, y=y)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="y must be None or have 4000 rows"):
        fit_online_em(m, jax.random.key(0), x, y[:10])


@pytest.mark.slow
@pytest.mark.skipif(not X64, reason="checked where its tolerance is tight: the float64 pass")
def test_hmm_sharded_fit_equals_single_device():
    """Four host devices (a subprocess: the device count is fixed when JAX starts), blocks of 100
    sequences: the HMM's expected counts summed by psum give the one-device fit."""
    code = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import Mesh
        from conceptshift.inference import fit_em
        from conceptshift.models import HMMMixture
        from conceptshift.models.batch import pad_tokens
        assert len(jax.devices()) == 4, jax.devices()
        mesh = Mesh(np.array(jax.devices()), ("data",))
        hm = HMMMixture(2, 3, 5, n_heads=1)
        hp = hm.init_params(jax.random.key(0))
        tx, tl, ty, _ = hm.sample(jax.random.key(1), hp, 1001, 6)
        tx = pad_tokens(tx, tl)
        ha = fit_em(hm, jax.random.key(2), tx, ty, restarts=2, max_iter=40, tol=0.0)
        hb = fit_em(hm, jax.random.key(2), tx, ty, restarts=2, max_iter=40, tol=0.0, mesh=mesh,
                    block_size=100)
        hrel = abs(float(ha.loglik) - float(hb.loglik)) / abs(float(ha.loglik))
        hdiff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
                    for u, v in zip(ha.params, hb.params))
        print(hrel, hdiff)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hrel, hdiff = (float(v) for v in out.stdout.split())
    assert hrel < 1e-12 and hdiff < 1e-8

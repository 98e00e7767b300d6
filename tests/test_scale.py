"""Blocked and data-parallel EM give the single-block fit; online EM reaches the batch optimum."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import X64, once, rtol

from conceptshift.inference import fit_em
from conceptshift.inference.em import block_layout, make_stats_fn
from conceptshift.inference.online import fit_online_em
from conceptshift.models import GatedExperts, make_problem, simulate


def _sample(n, family="gated", seed=1):
    prob = make_problem(jax.random.key(0), family=family, n_components=3, n_features=2)
    sim = simulate(jax.random.key(seed), prob, n, 10, 10)
    return prob, np.asarray(sim.source.x), np.asarray(sim.source.y)


@once
def test_block_layout_per_platform():
    # a CPU gets cache-sized blocks, an accelerator few large ones; blocks always cover n
    for n, rows in ((10**6, 40), (10**7, 40), (777, 3), (10**7, 10**4)):
        cpu = block_layout(n, "auto", rows=rows, platform="cpu")
        gpu = block_layout(n, "auto", rows=rows, platform="gpu")
        for block, nb in (cpu, gpu):
            assert block * nb >= n and (block - 8) * nb < n
        assert cpu[0] <= min(32768, max(512, (1 << 21) // rows)) + 8
        assert gpu[0] <= max(512, (1 << 27) // rows) + 8
    assert block_layout(10**6, "auto", rows=40, platform="gpu") == (10**6, 1)
    assert block_layout(10**6, "auto", rows=40, platform="cpu")[1] == 31
    assert block_layout(10**6, None, rows=40, platform="cpu") == (10**6, 1)
    assert block_layout(10**6, 1000, rows=40, platform="gpu") == (1000, 1000)


@pytest.mark.parametrize("family", ["regression", "gated"])
def test_blocked_statistics_equal_one_block(family):
    prob, x, y = _sample(5003, family)
    m = prob.strong_model
    xj, yj = m.check_data(x, y)
    w = jax.numpy.ones((x.shape[0],), yj.dtype)
    stats = m.data_stats(xj, yj, w)
    params = prob.heads("p", "strong")
    ll1, s1 = make_stats_fn(m, xj, yj, w, stats, block_size=None)(params)
    ll2, s2 = make_stats_fn(m, xj, yj, w, stats, block_size=512)(params)
    assert float(ll2) == pytest.approx(float(ll1), rel=rtol(1e-5, 1e-12))
    for a, b in zip(s1, s2, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol(1e-4, 1e-10), atol=1e-6)


@pytest.mark.slow  # 18 s (4 host devices)
@pytest.mark.skipif(not X64, reason="checked where its tolerance is tight: the float64 pass")
def test_sharded_fit_equals_single_device():
    """Four host devices (a subprocess: the device count is fixed when JAX starts)."""
    code = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import Mesh
        from conceptshift.models import make_problem, simulate
        from conceptshift.inference import fit_em
        assert len(jax.devices()) == 4, jax.devices()
        prob = make_problem(jax.random.key(0), family="gated", n_components=3, n_features=2)
        sim = simulate(jax.random.key(1), prob, 4001, 10, 10)
        m = prob.strong_model
        mesh = Mesh(np.array(jax.devices()), ("data",))
        from scipy.optimize import linear_sum_assignment
        # the rows arrive as one global array sharded over the devices (as with several hosts)
        from jax.sharding import NamedSharding, PartitionSpec as P
        xs = jax.device_put(sim.source.x[:4000], NamedSharding(mesh, P("data")))
        ys = jax.device_put(sim.source.y[:4000], NamedSharding(mesh, P("data")))
        assert len(xs.addressable_shards) == 4
        a = fit_em(m, jax.random.key(0), sim.source.x[:4000], sim.source.y[:4000], restarts=1,
                   init="kmeans++")
        b = fit_em(m, jax.random.key(0), xs, ys, restarts=1, mesh=mesh, block_size=300,
                   init="kmeans++")
        rel = abs(float(a.loglik) - float(b.loglik)) / abs(float(a.loglik))
        # float32 sums in another order may end on the same optimum with components relabelled
        ga, gb = np.asarray(a.params.gate_mean), np.asarray(b.params.gate_mean)
        _, perm = linear_sum_assignment(((ga[:, None] - gb[None]) ** 2).sum(-1))
        bp = m.permute(b.params, perm)
        diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
                   for u, v in zip(a.params, bp))
        print(rel, diff, int(a.n_iter), int(b.n_iter))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rel, diff, it_a, it_b = out.stdout.split()
    assert float(rel) < 1e-12  # the float64 pass only (see the skip above)
    assert float(diff) < 1e-8


@once
@pytest.mark.slow  # its cost is compiling the batch and the online fits (about 15 s at any n)
@pytest.mark.parametrize("n", [12000, 40000])
def test_online_em_reaches_batch_optimum(tmp_path, n):
    prob, x, y = _sample(n)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    m = prob.strong_model
    batch = fit_em(m, jax.random.key(0), x, y, restarts=4)
    online = fit_online_em(m, jax.random.key(0), tmp_path / "x.npy", tmp_path / "y.npy",
                           chunk_size=n // 10, epochs=3)
    assert online.n_chunks == 30 and online.n_rows == n
    per_sample_gap = (float(batch.loglik) - online.loglik) / n
    assert per_sample_gap < 1e-3, per_sample_gap


def test_online_em_errors(tmp_path):
    m = GatedExperts(2)
    with pytest.raises(FileNotFoundError):
        fit_online_em(m, jax.random.key(0), tmp_path / "nope.npy", tmp_path / "nope.npy")
    with pytest.raises(ValueError, match="kappa"):
        fit_online_em(m, jax.random.key(0), np.zeros((10, 1)), np.zeros(10), kappa=0.3)
    with pytest.raises(ValueError, match="rows"):
        fit_online_em(m, jax.random.key(0), np.zeros((10, 1)), np.zeros(12), chunk_size=4)

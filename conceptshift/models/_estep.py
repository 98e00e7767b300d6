"""How the regression families' fused E-step runs over the rows: the choice of backend (the
compiled CPU kernel or XLA), the parameter-only plan computed once per iteration, block sizes, and
the E-step itself in both formulations. The model mathematics it calls (densities, the design, the
statistics from responsibilities) lives in :mod:`._experts`; :class:`EStepScheduling` is the part of
``ExpertsFamily`` that decides where and how that arithmetic runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from .. import _precision as _p

if TYPE_CHECKING:  # annotations only: _experts imports this module
    from ._experts import DataStats

KERNEL_MAX_ACCUMULATORS = 1 << 14


class EStepPlan(NamedTuple):
    """The parameter-only inputs of the fused E-step (``ExpertsFamily.estep_plan``)."""

    Z: Array | None  # (K, G, P) gate rows on the (centred) design, or None: gate evaluated per block
    const: Array  # (K,) log pi_k + gate normaliser (with rows) and the heads' normaliser
    coef_c: Array  # (K, H, P) coefficients on the (centred) design
    inv_scale: Array  # (K, H) 1 / s_kh
    ref: Array  # (K, P, H) the reference coefficients of the residual statistics
    T: Array | None  # (P, P) centred -> raw design (``Basis.shift_matrix``), or None



def _small_product(M: Array, A: Array) -> Array:
    """sum_p M[k, g, p] A[p, n] -> (K, G, N) as one (K G, P) @ (P, N) matrix product. (Written as P
    fused broadcast multiply-adds instead, it measured slower on CPU.)"""
    K, G, P = M.shape
    return _p.mm(M.reshape(K * G, P), A).reshape(K, G, -1)



class EStepScheduling:
    """Row scheduling and kernel dispatch of the fused E-step (a base of ``ExpertsFamily``)."""

    @staticmethod
    def pair_products(K: int, P: int) -> bool:
        """Whether S_pp is formed from the P (P + 1) / 2 distinct column products (narrow designs)
        rather than from K weighted copies of the design (the smaller temporary wins)."""
        return P + 1 <= 4 * K

    def block_rows(self) -> int:
        """Rows of the widest (rows, N) temporary of the fused E-step, for choosing block sizes."""
        K, P, H, D = self.n_components, self.n_coef, self.n_heads, self.n_features
        stats_rows = P * (P + 1) // 2 if self.pair_products(K, P) else K * P
        return max(stats_rows, K * D, K * H, P)

    def _linear_design(self) -> bool:
        """Whether the centred design is [1, x - xbar] (the CPU kernel then forms it itself)."""
        return self.basis.shiftable and self.basis.degree == 1

    def kernel_fits(self, dtype) -> bool:
        """Whether the compiled CPU kernel (``conceptshift._kernels``) can run this family's fused
        E-step: statistics that fit its accumulators, gate statistics read off a centred polynomial
        design, float32 or float64. Structural only: nothing is built or read from the
        environment."""
        from .. import _kernels

        K, P, H = self.n_components, self.n_coef, self.n_heads
        # the kernel keeps one 32-byte vector accumulator per statistic: at most 2^14 of them
        # (512 KiB, within L2); wider problems run as XLA products
        fits = P * (P + 1) // 2 * K + P * K * H <= KERNEL_MAX_ACCUMULATORS
        return fits and (self.basis.shiftable or not self.uses_gate_stats()) and _kernels.supports(dtype)

    def estep_backend(self, dtype, platform: str) -> str:
        """The E-step's backend for a program that runs on ``platform``: ``"kernel"`` (the compiled
        CPU kernel: a CPU program, a family it fits, the kernel enabled and built) or ``"xla"``.
        Fits decide it once, before tracing, and pass it as a static argument: it is part of the
        compiled program's key, and the kernel is never built for a GPU or TPU program."""
        from .. import _kernels

        if platform != "cpu" or not self.kernel_fits(dtype):
            return "xla"
        return "kernel" if _kernels.enabled() else "xla"

    def cpu_kernel_applies(self, dtype) -> bool:
        """Whether a CPU program of this family would run the compiled kernel (builds it if needed)."""
        return self.estep_backend(dtype, "cpu") == "kernel"

    def streams_rows(self, backend: str) -> bool:
        """Whether the E-step needs no temporary that grows with the rows (the kernel with a
        linear design): then it runs on all rows in one call, with no blocks."""
        return backend == "kernel" and self._linear_design()

    def estep_plan(self, params, stats: DataStats) -> EStepPlan:
        """What the fused E-step needs from the parameters alone, computed once per iteration and
        shared by every block (the gate's Cholesky factors above all)."""
        K, H, P = params.coef.shape
        T = self._shift_t(stats)
        rows = self._gate_rows(params, stats, T is not None)
        coef_c = params.coef if T is None else _p.einsum("khp,pq->khq", params.coef, T)
        head_const = -jnp.sum(params.log_scale, 1) - 0.5 * H * jnp.log(2 * jnp.pi)
        if rows is None:
            Z, const = None, head_const
        else:
            Z, const = rows[0], rows[1] + head_const
        return EStepPlan(Z, const, coef_c, jnp.exp(-params.log_scale), jnp.swapaxes(params.coef, 1, 2),
                         T)

    def estep_stats_t(self, params, xT, yT, wT, stats: DataStats, plan: EStepPlan | None = None,
                      backend: str | None = None):
        """One fused E-step on a block in the E-step's layout: x (D, N), y (H, N), w (N,) ->
        (sum_n w_n log p_n, SuffStats) with residuals against the current coefficients.
        ``plan``: ``estep_plan(params, stats)``, when the caller computes it once for many blocks.
        ``backend``: ``"kernel"`` or ``"xla"`` (:meth:`estep_backend`); None: this family's
        backend on JAX's default platform.

        Two matrix products give every component's whitened gate coordinates and expert means;
        the statistics follow from the responsibilities without another pass over (K, P, N)
        temporaries. Equals ``component_log_probs_t`` followed by ``suff_stats_t`` (tested). With
        the ``"kernel"`` backend the same arithmetic runs as one compiled CPU kernel
        (``conceptshift._kernels``); with ``"xla"`` as XLA operations.
        """
        from .. import _kernels

        plan = self.estep_plan(params, stats) if plan is None else plan
        T = plan.T
        K, H, P = plan.coef_c.shape
        G = 0 if plan.Z is None else plan.Z.shape[1]

        def gate_base():
            """The gate rows Z (K, G, P) and the additive log terms (K, 1) or (K, N)."""
            if plan.Z is None:
                return (jnp.zeros((K, 0, P), xT.dtype),
                        self.gate_log_probs_t(params, xT) + plan.const[:, None])
            return plan.Z, plan.const[:, None]

        def xla():
            A = self._design_only_t(xT, stats)
            Z, base = gate_base()
            mu = _small_product(plan.coef_c, A)  # (K, H, N)
            logp = jnp.broadcast_to(base, (K, A.shape[1]))
            if G:
                z = _small_product(Z, A)  # (K, G, N)
                logp = logp - 0.5 * jnp.sum(z * z, axis=1)
            e = yT[None, :, :] - mu
            logp = logp + jnp.sum(-0.5 * (e * plan.inv_scale[:, :, None]) ** 2, axis=1)
            # log-sum-exp and the responsibilities from one set of K exponentials per row
            top = jax.lax.stop_gradient(jnp.max(logp, axis=0))
            top = jnp.where(jnp.isfinite(top), top, jnp.zeros_like(top))
            ex = jnp.exp(logp - top[None, :])
            tot = jnp.sum(ex, axis=0)
            ll = top + jnp.log(tot)
            r = ex * (wT / tot)[None, :]
            return jnp.sum(wT * ll), self._stats_from_r(xT, A, T, e, r, plan.ref, stats)

        if backend is None:
            backend = self.estep_backend(xT.dtype, jax.default_backend())
        if backend == "xla":
            return xla()
        if backend != "kernel":
            raise ValueError(f"backend must be 'kernel' or 'xla', got {backend!r}")

        def cpu():
            Z, base = gate_base()
            # a linear design [1, x - xbar] is formed inside the kernel from x
            linear = self._linear_design()
            A = xT if linear else self._design_only_t(xT, stats)
            ll, nk, s_q, s_pe, s_ee = _kernels.estep(A, yT, wT, Z, base, plan.coef_c, plan.inv_scale,
                                                     stats.x_mean if linear else None)
            return ll, self._assemble_stats(nk, s_q, s_pe, s_ee, plan.ref, T)

        return cpu()


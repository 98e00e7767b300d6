"""Feature maps psi(x) for the experts: the design row is [1, psi(x)], intercept first (Example 2.5)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import Array


@dataclass(frozen=True)
class Basis:
    """Polynomial features of total degree 1..``degree`` (all monomials), or a user map.

    Args:
      n_features: D, the number of covariates.
      degree: polynomial degree; 1 gives the linear design [1, x]. 0 gives intercept only.
      fn: optional user map ``x (N, D) -> (N, B)`` without an intercept column. It must be a pure
        JAX function (it is traced inside jit) and hashable (plain functions are).

    Example:
      >>> Basis(n_features=2, degree=2).names
      ('1', 'x1', 'x2', 'x1^2', 'x1*x2', 'x2^2')
    """

    n_features: int = 1
    degree: int = 1
    fn: Callable[[Array], Array] | None = None

    @property
    def monomials(self) -> tuple[tuple[int, ...], ...]:
        terms = []
        for deg in range(1, self.degree + 1):
            terms.extend(itertools.combinations_with_replacement(range(self.n_features), deg))
        return tuple(terms)

    @property
    def n_terms(self) -> int:
        """P, the number of design columns including the intercept."""
        if self.fn is not None:
            out = jax.eval_shape(self.fn, jax.ShapeDtypeStruct((2, self.n_features), jnp.float32))
            if len(out.shape) != 2 or out.shape[0] != 2:
                raise ValueError(f"basis fn must map (N, D) to (N, B), got output shape {out.shape}")
            return 1 + out.shape[1]
        return 1 + len(self.monomials)

    @property
    def names(self) -> tuple[str, ...]:
        if self.fn is not None:
            return ("1",) + tuple(f"psi{j + 1}" for j in range(self.n_terms - 1))
        names = ["1"]
        for mono in self.monomials:
            counts: dict[int, int] = {}
            for i in mono:
                counts[i] = counts.get(i, 0) + 1
            names.append(
                "*".join(f"x{i + 1}" + (f"^{c}" if c > 1 else "") for i, c in counts.items())
            )
        return tuple(names)

    @property
    def shiftable(self) -> bool:
        """Whether :meth:`shift_matrix` exists: polynomial maps (closed under translation) with the
        linear terms x_1..x_D as design rows 1..D."""
        return self.fn is None and self.degree >= 1 and self.n_features >= 1

    def shift_matrix(self, c: Array) -> Array:
        """T (P, P) with phi(x) = T phi(x - c) for every x: the binomial expansion of each monomial
        about c. Statistics accumulated in the centred design phi(x - c) (accurate in float32 when
        |c| is large against the spread) map exactly to the raw design: S_raw = T S_c T^T."""
        if not self.shiftable:
            raise ValueError("shift_matrix needs a polynomial basis of degree >= 1 (no basis_fn)")
        from math import comb

        D = self.n_features
        counts = [[0] * D]
        for mono in self.monomials:
            cnt = [0] * D
            for i in mono:
                cnt[i] += 1
            counts.append(cnt)
        P = len(counts)
        rows = []
        for ci in counts:
            row = []
            for cj in counts:
                if all(b <= a for a, b in zip(ci, cj, strict=True)):
                    term = jnp.asarray(1.0, c.dtype)
                    for d in range(D):
                        if ci[d] > cj[d]:
                            term = term * float(comb(ci[d], cj[d])) * c[d] ** (ci[d] - cj[d])
                    row.append(term)
                else:
                    row.append(jnp.zeros((), c.dtype))
            rows.append(jnp.stack(row))
        return jnp.stack(rows).reshape(P, P)

    @property
    def affine_closed(self) -> bool:
        """Whether an affine map of each covariate maps the design onto itself (by an invertible
        linear map of its columns): true for polynomial bases (and the intercept-only design), false
        for a user map."""
        return self.fn is None

    def affine_matrix(self, loc: Array, scale: Array) -> Array:
        """M (P, P) with phi((x - loc) / scale) = M phi(x) for every x, for an affine-closed basis:
        the binomial expansion about ``loc`` followed by the monomials' scale factors. Coefficients
        b on the standardised design are c = M^T b on the raw one."""
        if not self.affine_closed:
            raise ValueError("affine_matrix needs a polynomial basis (no basis_fn)")
        if not self.shiftable:  # intercept only
            return jnp.ones((1, 1), loc.dtype)
        # phi((x - loc) / scale) = T(-loc / scale) phi(x / scale) = T(-loc / scale) diag(scale^-a)
        # phi(x): formed from the ratios, so that no factor overflows unless the entry itself does
        inv = 1.0 / scale
        factors = [jnp.ones((), loc.dtype)]
        for mono in self.monomials:
            f = inv[mono[0]]
            for i in mono[1:]:
                f = f * inv[i]
            factors.append(f)
        return self.shift_matrix(-loc * inv) * jnp.stack(factors)[None, :]

    def transposed(self, xT: Array) -> Array:
        """The design matrix transposed, (P, N), from ``xT`` (D, N): the E-step's layout, in which
        reductions over samples run along the minor axis."""
        xT = jnp.asarray(xT)  # numpy input in the working precision
        ones = jnp.ones((1, xT.shape[1]), dtype=xT.dtype)
        if self.fn is not None:
            return jnp.concatenate([ones, jnp.asarray(self.fn(xT.T), dtype=xT.dtype).T], axis=0)
        rows = [ones]
        for mono in self.monomials:
            row = xT[mono[0]]
            for i in mono[1:]:
                row = row * xT[i]
            rows.append(row[None, :])
        return jnp.concatenate(rows, axis=0)

    def __call__(self, x: Array) -> Array:
        """Design matrix (N, P) of ``x`` (N, D)."""
        x = jnp.asarray(x)  # numpy input in the working precision
        ones = jnp.ones((x.shape[0], 1), dtype=x.dtype)
        if self.fn is not None:
            return jnp.concatenate([ones, jnp.asarray(self.fn(x), dtype=x.dtype)], axis=1)
        cols = [ones]
        for mono in self.monomials:
            col = x[:, mono[0]]
            for i in mono[1:]:
                col = col * x[:, i]
            cols.append(col[:, None])
        return jnp.concatenate(cols, axis=1)

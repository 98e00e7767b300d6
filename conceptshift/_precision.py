"""Matrix products at full working precision on every backend.

With float32 operands, XLA's default precision for a matrix product is TF32 on NVIDIA GPUs from
Ampere on (10 bits of mantissa) and bfloat16 passes on TPU. Sufficient statistics of a mixture are
sums over millions of rows, and EM's M-step divides them, so every product in this package asks for
``Precision.HIGHEST`` explicitly: float32 products stay float32 on a GPU (on a CPU the flag changes
nothing). ``tests/test_precision.py`` checks that every dot in the traced fits carries it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def einsum(spec: str, *operands):
    return jnp.einsum(spec, *operands, precision=HIGHEST)


def mm(a, b):
    """``a @ b`` at full precision."""
    return jnp.matmul(a, b, precision=HIGHEST)


def dot_general(a, b, dimension_numbers):
    return jax.lax.dot_general(a, b, dimension_numbers, precision=HIGHEST)

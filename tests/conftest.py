"""Strict numerics for every test: silent dtype promotion or rank broadcasting fails loudly."""

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

X64 = bool(jax.config.jax_enable_x64)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "CONCEPTSHIFT_DATA" in os.environ:
    DATA = Path(os.environ["CONCEPTSHIFT_DATA"])


@pytest.fixture
def data_dir():
    if not DATA.is_dir():
        pytest.skip(f"reference data folder {DATA} is absent (it sits beside the clone in CI)")
    return DATA


def rtol(f32: float, f64: float) -> float:
    """A tolerance chosen by the active precision."""
    return f64 if X64 else f32


# a test whose outcome does not depend on the precision (integer assignments, program structure,
# jit/vmap plumbing): run once, in the float32 pass, to keep `make test` within its time budget
once = pytest.mark.skipif(X64, reason="precision-independent: run once, in the float32 pass")


@pytest.fixture(autouse=True)
def _keep_the_precision():
    """The CLI run in-process sets JAX's precision for its fit (float64 unless --float32), also
    when it then refuses the input: give every test the pass's precision back."""
    yield
    if bool(jax.config.jax_enable_x64) != X64:
        jax.config.update("jax_enable_x64", X64)

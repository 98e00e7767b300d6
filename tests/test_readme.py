"""Every ```python block of the README runs as written (blocks fenced ```python notest are API
listings with placeholders and are skipped)."""

import re
from pathlib import Path

import pytest
from conftest import once

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_snippets():
    assert len(BLOCKS) >= 4


@pytest.mark.slow  # EM, a bootstrap and a mixture of HMMs: about a minute
@once  # the snippets run in the precision JAX is in
@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_snippet_runs(i):
    import jax

    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(compile(BLOCKS[i], f"README.md python block {i + 1}", "exec"), {})

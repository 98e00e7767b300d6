"""Choosing K: every number of components in one compiled program, BIC and ICL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import once

from conceptshift.inference import fit_em
from conceptshift.models import RegressionMixture


@once  # one compiled program for every K: precision-independent plumbing
def test_fit_em_range_fits_every_k_in_one_program_and_chooses_k():
    """fit_em_range's K = 2 fit reaches fit_em's log-likelihood; every K has K components; a
    second call with new data of the same shapes compiles nothing; choose_components picks the
    truth's K = 2 by BIC and ICL."""
    import logging

    from conceptshift.inference import choose_components, fit_em_range

    rng = np.random.default_rng(0)

    def data():
        x = rng.normal(size=400)
        z = rng.integers(0, 2, 400)
        return x, np.where(z, 3 + x, -3 - x) + 0.3 * rng.normal(size=400)

    x, y = data()
    fits = fit_em_range(RegressionMixture(1), jax.random.key(0), x, y, [3, 1, 2], restarts=4)
    assert list(fits) == [1, 2, 3]
    for k, f in fits.items():
        assert f.params.coef.shape[0] == k and f.params.log_weights.shape == (k,)
        np.testing.assert_allclose(float(jnp.sum(jnp.exp(f.params.log_weights))), 1.0, rtol=1e-5)
    one = fit_em(RegressionMixture(2), jax.random.key(0), x, y, restarts=4)
    np.testing.assert_allclose(float(fits[2].loglik), float(one.loglik), rtol=1e-6)
    assert float(fits[2].bic) == pytest.approx(-2 * float(fits[2].loglik) + 7 * np.log(400),
                                               rel=1e-6)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles():
            x2, y2 = data()
            fit_em_range(RegressionMixture(1), jax.random.key(1), x2, y2, [1, 2, 3], restarts=4)
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert not [r for r in records if "Compiling" in r.getMessage() and "range" in r.getMessage()]
    for criterion in ("bic", "icl"):
        choice = choose_components(RegressionMixture(1), jax.random.key(0), x, y, range(1, 4),
                                   criterion=criterion, restarts=4)
        assert choice.best == 2 and [r["components"] for r in choice.table] == [1, 2, 3]
    with pytest.raises(ValueError, match="criterion"):
        choose_components(RegressionMixture(1), jax.random.key(0), x, y, criterion="aic")


def test_components_range_refusals_and_intercept_only(tmp_path, capsys):
    """The CLI's --components A-B: a reversed or huge range is one line and exit 2 (checked while
    parsing, before anything is built)."""
    from conceptshift.cli import main

    p = tmp_path / "d.csv"
    p.write_text("y\n" + "".join(f"{v}\n" for v in (1, 2, 3, 9, 10, 11)))
    for arg, needle in (("2-1", "A <= B"), ("1-2000000000", "at most 50")):
        with pytest.raises(SystemExit) as exc:
            main(["fit", str(p), "--y", "y", "-k", arg])
        assert exc.value.code == 2 and needle in capsys.readouterr().err

"""What both CLI modules (``cli``, ``cli_hmm``) share: the errors they report, the checks of
options and results, and the precision switch. No science here."""

from __future__ import annotations

import sys

from ._validation import MAX_INT, MAX_SEED
from .files import non_finite_keys

__all__ = ["MAX_INT", "MAX_SEED", "UsageError", "FitError", "setup_precision", "check_range",
           "check_summary_finite", "wide_console"]


class UsageError(ValueError):
    """A problem with what the user asked for (reported as one line, exit 2)."""


class FitError(RuntimeError):
    """A fit whose result is not finite in the working precision (reported as one line, exit 1)."""


def setup_precision(float32: bool) -> None:
    """Sets JAX's working precision (float64 unless ``float32``); call after every input check."""
    import jax

    jax.config.update("jax_enable_x64", not float32)


def check_range(flag: str, value, lo, hi=None) -> None:
    """Raises UsageError unless lo <= value (<= hi), naming the bound that is crossed."""
    if value < lo:
        raise UsageError(f"{flag} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise UsageError(f"{flag} must be <= {hi}, got {value}")


def check_summary_finite(summary: dict, keys, float32: bool) -> None:
    """Raises FitError when a reported number of the fit (``keys`` of ``summary``) is not finite."""
    bad = non_finite_keys({k: summary[k] for k in keys if k in summary})
    if bad:
        where = "overflowed float32" if float32 else "is not finite in float64"
        raise FitError(f"the fit {where} ({', '.join(bad)} not finite); rescale the data"
                       + (" or drop --float32" if float32 else ""))


def wide_console():
    """A rich Console for standard output; when that is not a terminal (a pipe, a file, a CI log),
    200 columns wide, so that tables print whole instead of cut to the default 80."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)

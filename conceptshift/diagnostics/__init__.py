"""Diagnostics: summaries of fits and metrics against the truth."""

from .report import fit_summary, render_fit

__all__ = ["fit_summary", "render_fit"]

"""Gradient alignment diagnostics (arXiv 2512.00778): pure math, sketches, target sets, the instrument."""

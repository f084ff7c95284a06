"""Photometry: aperture photometry helpers (and the Bayesian photometry network)."""

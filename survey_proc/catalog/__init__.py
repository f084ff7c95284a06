"""Catalogue stages: merging tile catalogues, astrometry, calibration, cross-match."""

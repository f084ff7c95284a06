"""Detectors: the classical baseline (sep) and the learned one (PNet)."""

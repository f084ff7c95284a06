"""photometry/aperture.py: the core FWHM estimate."""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc.photometry.aperture import core_fwhm


def test_core_fwhm_of_gaussians():
    yy, xx = np.mgrid[:64, :64].astype(float)
    for sigma in (0.9, 1.5, 2.5):
        for cx, cy in ((31.0, 31.0), (31.37, 30.81)):
            img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
            f = core_fwhm(img, np.array([cx]), np.array([cy]))[0]
            assert f == pytest.approx(2.3548 * sigma, rel=1e-6)

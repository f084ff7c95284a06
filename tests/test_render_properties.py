"""Invariants of the renderer and the variability models, for arbitrary inputs (hypothesis)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from survey_proc.simulate.psf import build_bank
from survey_proc.simulate.render import render_stars
from survey_proc.simulate.variables import delta_mag, pulsator_template

BANK = build_bank("moffat", 2.0, beta=3.0, oversample=7, base_radius_px=6)


@settings(max_examples=40, deadline=None)
@given(x=st.floats(49.0, 78.0), y=st.floats(49.0, 78.0), flux=st.floats(1.0, 1e6))
def test_rendered_star_conserves_flux_and_centroid(x, y, flux):
    # the largest stamp (radius 48 px) stays inside the 128 px image
    img = render_stars((128, 128), np.array([x]), np.array([y]), np.array([flux]), BANK, sigma_pix=5.0)
    # the stamp is the PSF truncated (not renormalised): the light left out is below one pixel's noise
    k = int(BANK.radius_index(np.array([flux]), 5.0)[0])
    m = BANK.missing_flux[k]
    assert flux * (1 - 2 * m) * (1 - 1e-6) <= img.sum() <= flux * (1 + 1e-6)  # float32 stamps
    if k < len(BANK.radii_px) - 1:  # the radius rule: at most about one pixel's noise left out
        assert flux - img.sum() <= 2 * 5.0 + 1e-6 * flux
    yy, xx = np.mgrid[:128, :128]
    # first moments of the rendered (untruncated-in-image) star are the true position,
    # up to the stamp truncation of the Moffat wings (< 0.01 px for this PSF)
    assert abs((img * xx).sum() / img.sum() - x) < 0.01
    assert abs((img * yy).sum() / img.sum() - y) < 0.01


@settings(max_examples=20, deadline=None)
@given(xs=st.lists(st.floats(-10.0, 74.0), min_size=1, max_size=30), seed=st.integers(0, 2**16))
def test_stars_partly_outside_put_only_their_in_frame_light(xs, seed):
    rng = np.random.default_rng(seed)
    x = np.asarray(xs)
    y = rng.uniform(-10, 74, len(x))
    flux = rng.uniform(10, 1000, len(x))
    img = render_stars((64, 64), x, y, flux, BANK, sigma_pix=5.0)
    assert np.all(img >= 0)
    inside = (x > 8) & (x < 55) & (y > 8) & (y < 55)  # stamps (radius <= 6 at this flux) fully inside
    assert img.sum() >= flux[inside].sum() * (1 - 1e-6) - 5.0 * inside.sum() - 1e-6  # <= sigma_pix left out per star
    assert img.sum() <= flux.sum() * (1 + 1e-6) + 1e-6


@settings(max_examples=30, deadline=None)
@given(period=st.floats(0.3, 10.0), t0=st.floats(0.0, 5.0), t=st.floats(0.0, 20.0),
       cls=st.sampled_from(["eclipsing_binary", "pulsator", "transit"]))
def test_periodic_models_repeat_with_their_period(period, t0, t, cls):
    star = pd.DataFrame([{"var_class": cls, "period": period, "t0": t0, "amplitude": 0.5, "depth": 0.3,
                          "duration": 0.08 * period, "secondary_ratio": 0.4, "ellipsoidal": 0.02,
                          "ingress_frac": 0.2, "mag": 18.0}])
    dm = delta_mag(star, np.array([t, t + period, t + 3 * period]))[0]
    np.testing.assert_allclose(dm, dm[0], atol=1e-6)


def test_pulsator_template_is_normalised_with_maximum_light_at_phase_zero():
    ph = np.linspace(0, 1, 4001)
    m = pulsator_template(ph)
    assert abs(np.ptp(m) - 1.0) < 1e-3
    assert abs(np.mean(m)) < 1e-3
    assert ph[np.argmin(m)] < 0.01 or ph[np.argmin(m)] > 0.99
    # fast rise (brightening) then slow decline: minimum mag comes soon after the maximum mag
    rise_len = (1 - ph[np.argmax(m)]) % 1.0
    assert rise_len < 0.35

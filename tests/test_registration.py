"""Registration of star lists without a WCS: shifts up to 50 px, rotations up to 1 degree."""

from __future__ import annotations

import numpy as np
import pytest

from survey_proc.catalog.registration import RegistrationError, register


def _lists(seed: int, shift: tuple[float, float], rot_deg: float, noise_px: float = 0.01):
    rng = np.random.default_rng(seed)
    n = 300
    ref = rng.uniform(0, 500, (n, 2))
    flux = 10 ** rng.uniform(2, 5, n)
    th = np.radians(rot_deg)
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    # the epoch sees the reference frame rotated and shifted: epoch = R^-1 (ref - shift)
    ep = (ref - np.array(shift)) @ r  # row vectors: (R^T applied)
    ep += rng.normal(0, noise_px, ep.shape)
    inside = np.all((ep > 0) & (ep < 500), axis=1)
    keep = inside & (rng.random(n) > 0.15)  # some stars missing in the epoch
    spurious = rng.uniform(0, 500, (30, 2))
    xy = np.vstack([ep[keep], spurious])
    f = np.r_[flux[keep] * rng.lognormal(0, 0.1, keep.sum()), 10 ** rng.uniform(2, 3.5, 30)]
    return xy, f, ref, flux, ep, keep


@pytest.mark.parametrize("shift, rot", [((50.0, -30.0), 1.0), ((-12.3, 44.1), -0.7), ((0.4, 0.2), 0.0)])
def test_registration_recovers_shift_and_rotation_to_a_hundredth_of_a_pixel(shift, rot):
    xy, f, ref, rflux, ep, keep = _lists(int(abs(shift[0]) * 10), shift, rot)
    reg = register(xy, f, ref, rflux)
    xr, yr = reg.apply(ep[keep][:, 0], ep[keep][:, 1])
    err = np.hypot(xr - ref[keep][:, 0], yr - ref[keep][:, 1])
    assert np.sqrt(np.mean(err**2)) < 0.02  # noise 0.01 px per axis
    assert reg.rotation_deg == pytest.approx(rot, abs=0.01) and reg.scale == pytest.approx(1.0, abs=1e-4)
    assert reg.n_stars > 100 and reg.rms_px < 0.02


def test_registration_of_unrelated_lists_fails_clearly():
    rng = np.random.default_rng(1)
    with pytest.raises(RegistrationError, match=r"no consistent transformation|only \d+ stars match"):
        register(rng.uniform(0, 500, (80, 2)), rng.uniform(1, 2, 80), rng.uniform(0, 500, (80, 2)),
                 rng.uniform(1, 2, 80))
    with pytest.raises(RegistrationError, match=r"too few sources to register"):
        register(np.zeros((2, 2)), np.ones(2), np.zeros((50, 2)), np.ones(50))







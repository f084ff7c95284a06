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








# --- phase correlation + stars (the route when asterisms fail) on rendered images -------------------------------


def _render(xy: np.ndarray, flux: np.ndarray, size: int, fwhm_px: float, noise_adu: float,
            rng: np.random.Generator) -> np.ndarray:
    """Gaussian stars (total flux ADU) on a 100-ADU sky with Gaussian noise."""
    img = np.full((size, size), 100.0)
    s = fwhm_px / 2.355
    yy, xx = np.mgrid[:size, :size]
    for (x, y), f in zip(xy, flux, strict=True):
        x0, y0 = round(float(x)), round(float(y))
        sl = (slice(max(y0 - 12, 0), max(y0 + 13, 0)), slice(max(x0 - 12, 0), max(x0 + 13, 0)))
        img[sl] += f / (2 * np.pi * s * s) * np.exp(-((xx[sl] - x) ** 2 + (yy[sl] - y) ** 2) / (2 * s * s))
    return img + rng.normal(0, noise_adu, img.shape)


def _image_pair(seed: int, shift: tuple[float, float], rot_deg: float, size: int = 400):
    """Two rendered frames of one star field; the epoch maps to the reference by ``ref = R (ep - c) + c + shift``."""
    rng = np.random.default_rng(seed)
    sky = rng.uniform(-60, size + 60, (400, 2))
    flux = 10 ** rng.uniform(3, 5, 400)
    th = np.radians(rot_deg)
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c = np.full(2, (size - 1) / 2)
    ep = (sky - c - np.asarray(shift)) @ r + c
    ref_img, ep_img = _render(sky, flux, size, 3.0, 5.0, rng), _render(ep, flux, size, 3.0, 5.0, rng)
    ri, ei = (np.all((p > 3) & (p < size - 4), axis=1) for p in (sky, ep))
    truth = np.c_[r, c - r @ c + np.asarray(shift)]
    return {"ref_img": ref_img, "img": ep_img, "ref_xy": sky[ri], "ref_flux": flux[ri],
            "xy": ep[ei] + rng.normal(0, 0.05, (ei.sum(), 2)), "flux": flux[ei], "truth": truth, "rng": rng}


def _grid_rms(m: np.ndarray, truth: np.ndarray, size: int = 400) -> float:
    g = np.mgrid[0:size:20, 0:size:20].reshape(2, -1)[::-1].T.astype(float)
    d = (g @ m[:, :2].T + m[:, 2]) - (g @ truth[:, :2].T + truth[:, 2])
    return float(np.sqrt(np.mean(np.sum(d**2, axis=1))))


def test_image_shift_sign_significance_and_bad_pixels():
    """x_ref = x + dx; NaN columns and saturated blobs do not move the peak."""
    from survey_proc.catalog.image_shift import image_shift

    p = _image_pair(3, (37.4, -21.7), 0.0)
    img = p["img"].copy()
    img[:, 100:103] = np.nan
    img[200:210, 50:60] = 1e6
    sh = image_shift(img, p["ref_img"])
    assert (sh.dx, sh.dy) == (pytest.approx(37.4, abs=0.15), pytest.approx(-21.7, abs=0.15))
    assert sh.significance > 50 and sh.window == (0, 400, 0, 400)


def test_phase_correlation_rescues_a_list_whose_brightest_sources_are_artefacts():
    """60 bright spurious sources: asterisms fail as on the real cluster frames; phase correlation + stars do not."""
    from survey_proc.catalog.registration import PHASE_CORRELATION, register_by_image

    p = _image_pair(3, (37.4, -21.7), 0.8)
    xy = np.r_[p["xy"], p["rng"].uniform(0, 400, (60, 2))]
    f = np.r_[p["flux"], np.full(60, 2e5)]
    with pytest.raises(RegistrationError, match=r"only \d+ stars match after the first solution \(need 6\)"):
        register(xy, f, p["ref_xy"], p["ref_flux"])
    reg = register_by_image(xy, f, p["ref_xy"], p["ref_flux"], p["img"], p["ref_img"])
    assert reg.method == PHASE_CORRELATION and reg.to_dict()["method"] == PHASE_CORRELATION
    assert _grid_rms(reg.matrix, p["truth"]) < 0.02  # centroid noise 0.05 px per axis, ~200 stars
    assert reg.rotation_deg == pytest.approx(0.8, abs=0.01) and reg.n_stars > 150
    # a window of the frames, placed by its origin, gives the same transform
    win = (slice(50, 350), slice(40, 340))
    reg_w = register_by_image(xy, f, p["ref_xy"], p["ref_flux"], p["img"][win], p["ref_img"][win],
                              image_origin_px=(40, 50))
    assert _grid_rms(reg_w.matrix, p["truth"]) < 0.02
    # the fit may target another frame of the reference stars (e.g. the field's, through a WCS)
    reg_o = register_by_image(xy, f, p["ref_xy"], p["ref_flux"], p["img"], p["ref_img"],
                              ref_xy_out=p["ref_xy"] + [1000.0, -3.0])
    assert _grid_rms(reg_o.matrix - [[0, 0, 1000.0], [0, 0, -3.0]], p["truth"]) < 0.02


def test_phase_correlation_errors_name_the_cause():
    from survey_proc.catalog.image_shift import ImageShiftError, image_shift
    from survey_proc.catalog.registration import register_by_image

    p = _image_pair(4, (10.0, 5.0), 0.0)
    with pytest.raises(RegistrationError, match=r"the images have different shapes \(\(400, 400\) and \(300, 300\)\); "
                                                "phase correlation needs two 2-D images of one size"):
        register_by_image(p["xy"], p["flux"], p["ref_xy"], p["ref_flux"], p["img"], p["ref_img"][:300, :300])
    with pytest.raises(RegistrationError, match=r"no usable pixel in the image \(all NaN, inf or masked\)"):
        register_by_image(p["xy"], p["flux"], p["ref_xy"], p["ref_flux"], np.full((400, 400), np.nan), p["ref_img"])
    with pytest.raises(RegistrationError, match=r"image cross-correlation found no significant peak"):
        register_by_image(p["xy"], p["flux"], p["ref_xy"], p["ref_flux"], p["rng"].normal(0, 1, (400, 400)),
                          p["ref_img"])
    with pytest.raises(RegistrationError, match=r"too few sources to register \(3 in the epoch, \d+ in the "
                                                r"reference\); at least 6 are needed"):
        register_by_image(p["xy"][:3], p["flux"][:3], p["ref_xy"], p["ref_flux"], p["img"], p["ref_img"])
    with pytest.raises(ImageShiftError, match=r"found no significant peak \(\d+\.\d sigma, need 12\)"):
        image_shift(p["rng"].normal(0, 1, (200, 200)), p["rng"].normal(0, 1, (200, 200)))

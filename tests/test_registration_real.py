"""Registration without a WCS on real pixels: sub-frames of the M67 photographic plate.

Five 600-px sub-frames are resampled (cubic spline) from the plate with known shifts (up
to 50 px) and rotations (up to 1 degree), each with its own Gaussian noise (60 ADU, on the
plate's ~200 ADU of grain). Sources are found with sep (background mesh 32 px, 3 sigma,
windowed centroids). Accuracy is the RMS, over a 20-px grid of points covering the epoch's
frame, of the distance between the recovered and the true transform's images of each point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from survey_proc.catalog.registration import ASTERISM, PHASE_CORRELATION, RegistrationError, register, register_by_image

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real/M6707HH.fits"
pytestmark = pytest.mark.skipif(not REAL.exists(), reason="the real plate ../shared/data/real/M6707HH.fits is not here")

SIZE = 600
ORIGIN = (230.0, 230.0)  # plate pixel of the unshifted sub-frame's pixel (0, 0)
# (shift x, y in px; rotation in degrees) of each sub-frame relative to the plate; frame 0 is the reference
POSES = [((0.0, 0.0), 0.0), ((50.0, -30.0), 1.0), ((-12.3, 44.1), -0.7), ((30.5, 25.2), 0.5), ((-45.0, -20.0), -1.0)]
NOISE_ADU = 60.0
MATCH_RADIUS_PX = 5.0  # 0.75 FWHM on this plate, as the register stage would use


def frame_to_plate(shift: tuple[float, float], rot_deg: float, size: int = SIZE,
                   origin: tuple[float, float] = ORIGIN) -> np.ndarray:
    """3 x 3 matrix: sub-frame pixel (x, y, 1) -> plate pixel, a rotation about the frame centre and a shift."""
    th = np.radians(rot_deg)
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c = np.full(2, (size - 1) / 2)
    m = np.eye(3)
    m[:2, :2] = r
    m[:2, 2] = c - r @ c + np.asarray(origin) + np.asarray(shift)
    return m


def cut(plate: np.ndarray, m: np.ndarray, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """The sub-frame ``m`` maps onto the plate (cubic spline), plus independent noise (ADU)."""
    from scipy import ndimage

    # affine_transform works in (row, column): input[(y, x)] = M_rc @ (y_out, x_out) + offset
    img = ndimage.affine_transform(plate, m[:2, :2][::-1, ::-1], m[:2, 2][::-1], output_shape=(size, size), order=3,
                                   mode="nearest")
    return (img + rng.normal(0.0, NOISE_ADU, img.shape)).astype(np.float32)


def detect(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sep sources of a frame: windowed centroids (n, 2) (px), isophotal flux (ADU) and a rough S/N."""
    import sep

    img = np.ascontiguousarray(img, np.float32)
    bkg = sep.Background(img, bw=32, bh=32)
    data = img - bkg.back()
    obj = sep.extract(data, 3.0, err=bkg.globalrms, minarea=5, deblend_cont=0.005)
    xw, yw, wflag = sep.winpos(data, obj["x"], obj["y"], 3.0)
    good = (obj["flag"] == 0) & (wflag == 0) & (np.hypot(xw - obj["x"], yw - obj["y"]) < 1.0)
    snr = obj["flux"] / np.sqrt(obj["npix"] * bkg.globalrms**2 + np.abs(obj["flux"]))
    return np.c_[xw, yw][good], obj["flux"][good], snr[good]


def grid_error_px(reg_matrix: np.ndarray, true: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Distances (px) between the images of a 20-px grid of epoch pixels under the recovered and the true map."""
    g = np.mgrid[0:size:20, 0:size:20].reshape(2, -1)[::-1].T.astype(float)
    return np.hypot(*((g @ reg_matrix[:2, :2].T + reg_matrix[:2, 2]) - (g @ true[:2, :2].T + true[:2, 2])).T)


def m67_subframe_store(path: Path, size: int, band: str = "i") -> list[np.ndarray]:
    """A one-field store at ``path`` of the 5 :data:`POSES` sub-frames (``size`` px) cut around the plate's centre.

    No WCS; MJD 60000.0-60000.4, 300 s, gain 1 e-/ADU, read noise 5 e-, saturation 13000 ADU.
    Returns each epoch's frame-to-plate matrix. Skips the test when the plate is not here.
    """
    from astropy.io import fits

    from survey_proc import store

    if not REAL.exists():
        pytest.skip("the real plate ../shared/data/real/M6707HH.fits is not here")
    plate = fits.getdata(REAL).astype(float)
    rng = np.random.default_rng(1)
    origin = ((plate.shape[1] - size) / 2, (plate.shape[0] - size) / 2)
    maps = [frame_to_plate(s, r, size=size, origin=origin) for s, r in POSES]
    store.create_store(path, band=band, pixel_scale_arcsec=1.0)
    store.create_field(path, "F000", ny=size, nx=size, n_epochs=5, gain_e_per_adu=1.0, read_noise_e=5.0,
                       saturation_adu=13000.0, zeropoint_nominal=25.0)
    store.write_epoch_meta(path, "F000", 0, store.EpochMeta(
        mjd=60000.0 + 0.1 * np.arange(5), exptime_s=np.full(5, 300.0), airmass=np.full(5, np.nan), wcs=[""] * 5,
        source_file=[f"m67_{k}.fits" for k in range(5)]))
    for e, m in enumerate(maps):
        store.write_epoch_pixels(path, "F000", e, cut(plate, m, rng, size=size), np.zeros((size, size), np.uint8))
    return maps


@pytest.fixture(scope="module")
def m67() -> dict:
    from astropy.io import fits

    plate = fits.getdata(REAL).astype(float)
    rng = np.random.default_rng(67)
    maps = [frame_to_plate(s, r) for s, r in POSES]
    images = [cut(plate, m, rng) for m in maps]
    return {"plate": plate, "maps": maps, "images": images, "sources": [detect(i) for i in images]}


def _truth(m67: dict, k: int) -> np.ndarray:
    """Epoch k pixels -> reference (frame 0) pixels."""
    return (np.linalg.inv(m67["maps"][0]) @ m67["maps"][k])[:2]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_m67_subframes_register_to_a_tenth_of_a_pixel_by_either_route(m67, k):
    """Shifts up to 50 px and rotations up to 1 degree: asterisms and phase correlation (forced) both <= 0.1 px."""
    (xy, f, snr), (rxy, rf, _) = m67["sources"][k], m67["sources"][0]
    true = _truth(m67, k)
    ast = register(xy, f, rxy, rf, snr=snr, match_radius_px=MATCH_RADIUS_PX)
    pc = register_by_image(xy, f, rxy, rf, m67["images"][k], m67["images"][0], snr=snr,
                           match_radius_px=MATCH_RADIUS_PX)
    for reg, method in ((ast, ASTERISM), (pc, PHASE_CORRELATION)):
        err = grid_error_px(reg.matrix, true)
        print(f"frame {k} {method}: grid RMS {np.sqrt(np.mean(err**2)):.4f} px, max {err.max():.4f} px; fit "
              f"residual {reg.rms_px:.3f} px over {reg.n_stars} stars; correlation {reg.correlation_sigma}")
        assert reg.method == method and reg.to_dict()["method"] == method
        assert np.sqrt(np.mean(err**2)) <= 0.1
        assert reg.n_stars >= 50 and reg.rms_px < 0.2
        assert reg.rotation_deg == pytest.approx(POSES[k][1], abs=0.02)
    assert pc.correlation_sigma is not None and pc.correlation_sigma > 50
    assert pc.to_dict()["correlation_sigma"] == pc.correlation_sigma
    # the translation alone is right to a pixel at the frame centre (the stars do the rest)
    c = np.array([(SIZE - 1) / 2, (SIZE - 1) / 2])
    assert pc.initial_shift_px is not None
    assert np.hypot(*(c + pc.initial_shift_px - (true[:, :2] @ c + true[:, 2]))) < 1.0


def test_phase_correlation_rescues_a_list_whose_brightest_sources_are_artefacts(m67):
    """60 bright spurious detections (cosmic rays, say) defeat the asterisms; the images still align."""
    rng = np.random.default_rng(5)
    xy, f, snr = m67["sources"][1]
    rxy, rf, _ = m67["sources"][0]
    xy = np.r_[xy, rng.uniform(0, SIZE, (60, 2))]
    f = np.r_[f, np.full(60, 10 * f.max())]
    snr = np.r_[snr, np.full(60, 100.0)]
    with pytest.raises(RegistrationError, match=r"only \d+ stars match after the first solution \(need 6\)"):
        register(xy, f, rxy, rf, snr=snr, match_radius_px=MATCH_RADIUS_PX)
    reg = register_by_image(xy, f, rxy, rf, m67["images"][1], m67["images"][0], snr=snr,
                            match_radius_px=MATCH_RADIUS_PX)
    assert np.sqrt(np.mean(grid_error_px(reg.matrix, _truth(m67, 1)) ** 2)) <= 0.1


def test_phase_correlation_errors_on_real_frames(m67):
    """Unrelated frames, and star lists that do not belong to the images, fail with messages that say so."""
    plate, rng = m67["plate"], np.random.default_rng(9)
    xy, f, _ = m67["sources"][1]
    rxy, rf, _ = m67["sources"][0]
    far = cut(plate, frame_to_plate((0.0, 0.0), 0.0, size=400, origin=(650.0, 0.0)), rng, size=400)
    near = cut(plate, frame_to_plate((0.0, 0.0), 0.0, size=400, origin=(0.0, 650.0)), rng, size=400)
    with pytest.raises(RegistrationError, match=r"image cross-correlation found no significant peak \(\d+\.\d sigma, "
                                                r"need 12\); the images may not overlap or hold too few stars"):
        register_by_image(xy, f, rxy, rf, far, near)
    wrong = rng.uniform(0, SIZE, xy.shape)  # positions unrelated to the image: chance pairs only
    with pytest.raises(RegistrationError, match=r"the \d+ stars matched within 10\.0 px of their positions predicted "
                                                r"by the phase-correlation shift \([-+]\d+\.\d\d, [-+]\d+\.\d\d\) px, "
                                                r"\d+ sigma scatter by \d\.\d\d px RMS about the fit, as random pairs "
                                                r"would .* the star lists may not belong to these images"):
        register_by_image(wrong, f, rxy, rf, m67["images"][1], m67["images"][0], match_radius_px=MATCH_RADIUS_PX)
    with pytest.raises(RegistrationError, match=r"only \d stars match within 10\.0 px of their positions predicted "
                                                r"by the phase-correlation shift .* \(need 6\)"):
        register_by_image(wrong[:10], f[:10], rxy, rf, m67["images"][1], m67["images"][0],
                          match_radius_px=MATCH_RADIUS_PX)

"""The real-data benchmark's quick mode (benchmarks/real.py) on a 200 x 200 SDSS crop around the star with spikes.

The crop holds one bright star with diffraction spikes and faint galaxies; its FWHM (1.1-1.2 px)
is below PNet's training range, so the pipeline's PNet block is detected with sep (the
domain check) while ``pnet_raw`` is PNet alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import real

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real"
pytestmark = pytest.mark.skipif(not (REAL / "sdss_r.fits.bz2").exists(),
                                reason="the real SDSS images ../shared/data/real/sdss_*.fits.bz2 are not here")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run (its JSON, tables and gallery in a temporary folder)."""
    pytest.importorskip("photutils")
    from survey_proc.detect.pnet import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.exists():
        pytest.skip("PNet's shipped weights are not installed")
    out = tmp_path_factory.mktemp("real")
    res = real.run(quick=True, out=out, plot_dir=out, root=REAL)
    res["_out"] = out
    return res


def test_quick_outputs_every_key(quick: dict[str, Any]) -> None:
    out = quick["_out"]
    assert (out / "real.json").exists() and (out / "real.md").exists() and (out / "real-sdss_crop.png").exists()
    (rs,) = quick["sets"]
    assert [f["frame"] for f in rs["frames"]] == ["sdss_g_crop", "sdss_r_crop", "sdss_i_crop"]
    for fr in rs["frames"]:
        assert set(fr["n_detections"]) == set(real.DETECTORS)
        assert set(fr["artefacts"]["per_detector"]) == set(real.DETECTORS)
    assert set(rs["repeatability"]) == set(real.DETECTORS)
    per = quick["summary"]["sdss_crop"]
    assert set(per) == set(real.DETECTORS)
    keys = {"n_detections", "fwhm_px", "domain", "recall_bins", "extra_per_star_r4", "excess_per_star_r4",
            "extra_per_star_rext", "excess_per_star_rext", "per_extended", "excess_per_extended", "repeatability",
            "repeatability_chance"}
    for d in per.values():
        assert keys <= set(d)
        assert len(d["recall_bins"]) == len(real.SNR_BINS)


def test_quick_injection_recovery(quick: dict[str, Any]) -> None:
    per = quick["summary"]["sdss_crop"]
    inj = quick["sets"][0]["frames"][1]["injection"]
    assert inj["psf"].startswith("empirical")  # enough isolated stars in the r crop
    for det in ("sep", "pnet", "pnet_raw", "dao"):
        bright = [b for b in per[det]["recall_bins"] if b["snr_lo"] >= 20]
        n = sum(b["n"] for b in bright)
        assert n >= 30
        recall = sum(b["recall"] * b["n"] for b in bright) / n
        assert recall >= 0.9, (det, recall)
        assert all(b["chance"] <= 0.2 for b in bright)
    # sep's total fluxes of injected stars (S/N >= 20) within 15 % of what was injected
    for b in per["sep"]["recall_bins"][2:]:
        assert 0.85 <= b["flux_ratio_median"] <= 1.15


def test_quick_domain_and_artefacts(quick: dict[str, Any]) -> None:
    per = quick["summary"]["sdss_crop"]
    # FWHM ~1.2 px: outside PNet's range, the pipeline's PNet block is sep's, the raw one is not
    assert all(d and "outside its training range" in d for d in per["pnet"]["domain"])
    assert not any(per["pnet_raw"]["domain"])
    assert per["pnet"]["n_detections"] == per["sep"]["n_detections"]
    for fr in quick["sets"][0]["frames"]:
        assert fr["artefacts"]["n_bright_stars"] >= 1
    for det, d in per.items():
        for k in ("extra_per_star_r4", "extra_per_star_rext", "excess_per_star_rext"):
            assert d[k] is not None and math.isfinite(d[k]), (det, k)
    # what the pipeline runs puts at most 1 extra detection on the bright star with spikes (within 4 FWHM)
    assert per["pnet"]["extra_per_star_r4"] <= 1.0
    assert per["sep"]["extra_per_star_r4"] <= 1.0


def test_quick_repeatability_above_chance(quick: dict[str, Any]) -> None:
    rep = quick["sets"][0]["repeatability"]
    for det, r in rep.items():
        assert r["n"] > 100
        assert r["share"] > r["chance"] + 0.3, det
    assert rep["sep"]["share"] >= 0.7


def test_an_injection_that_reaches_the_saturation_level_is_set_apart() -> None:
    import numpy as np

    img = np.full((40, 40), 100.0, np.float32)
    img[10, 10] = 2990.0  # a core just under the level
    img[30, 21] = 3000.0  # one pixel off the centre, at the level
    xy = np.array([[10.2, 9.8], [20.4, 30.0], [5.0, 30.0]])
    np.testing.assert_array_equal(real.saturated_injections(img, xy, 2997.16), [False, True, False])
    assert not real.saturated_injections(img, xy, float("inf")).any()  # no saturation level: none


def _moffat_frame(fwhm_px: float = 1.3, beta: float = 3.0, n: int = 80, seed: int = 3) -> tuple[Any, Any, Any]:
    """An undersampled field of pixel-integrated Moffat stars with sky noise; sep-like detections from the truth."""
    import numpy as np

    from survey_proc.photometry.epsf import moffat_pixel_gl

    rng = np.random.default_rng(seed)
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    size, sky, noise, half = 400, 100.0, 3.0, 8
    img = np.full((size, size), sky) + rng.normal(0, noise, (size, size))
    g = np.linspace(20, size - 21, int(np.ceil(np.sqrt(n))))
    xs, ys = (v.ravel()[:n] + rng.uniform(-0.5, 0.5, n) for v in np.meshgrid(g, g))
    flux = 10 ** rng.uniform(4.0, 5.0, n)
    j = np.arange(-half, half + 1, dtype=float)
    for x, y, f in zip(xs, ys, flux, strict=True):
        ix, iy = int(np.rint(x)), int(np.rint(y))
        p, _, _ = moffat_pixel_gl(j[None, :] - (x - ix), j[:, None] - (y - iy), alpha, beta)
        img[iy - half:iy + half + 1, ix - half:ix + half + 1] += f * p
    frame = real.Frame("moffat", img.astype(np.float32), None, float("inf"), float("inf"), None)
    found = real.Found(xs, ys, flux, flux / noise / 3.0, flags=np.zeros(n, np.int64))
    return frame, found, (alpha, beta)


def test_the_epsf_injections_keep_an_undersampled_stars_shape_where_the_shifted_stack_widens_it() -> None:
    """``--inject-psf epsf`` (the default) evaluates the frame's empirical PSF at each star's own sub-pixel phase;
    the stack of cubic-spline-shifted stamps, shifted again to each star, is wider than the frame's stars."""
    import numpy as np

    from survey_proc.photometry.epsf import moffat_pixel_gl

    frame, found, (alpha, beta) = _moffat_frame()
    half = 7
    ep = real.injection_psf(frame, found, 1.3, half, "epsf")
    st = real.injection_psf(frame, found, 1.3, half, "stack")
    assert ep.epsf is not None and ep.how.startswith("empirical PSF (")
    assert st.epsf is None and st.how.startswith("empirical (")
    j = np.arange(-half, half + 1, dtype=float)
    err_ep, err_st = [], []
    for dx, dy in ((0.0, 0.0), (0.5, 0.0), (0.3, -0.4), (-0.5, 0.5)):
        true, _, _ = moffat_pixel_gl(j[None, :] - dx, j[:, None] - dy, alpha, beta)
        true = true / true.sum()
        err_ep.append(np.abs(ep.at(100.0 + dx, 50.0 + dy) - true).max() / true.max())
        err_st.append(np.abs(st.at(100.0 + dx, 50.0 + dy) - true).max() / true.max())
        assert ep.at(100.0 + dx, 50.0 + dy).sum() == pytest.approx(1.0)
    assert max(err_ep) < 0.005  # within 0.5 % of the peak at every phase (measured 0.06 %)
    assert max(err_st) > 0.05  # the shifted stack is not (3-12 % of the peak)
    assert ep.n_eff < st.n_eff  # a narrower star: fewer effective pixels
    with pytest.raises(ValueError, match="unknown injection PSF 'psfex'"):
        real.injection_psf(frame, found, 1.3, half, "psfex")


def test_an_epsf_that_is_unlike_the_frames_stars_is_not_injected() -> None:
    """The ePSF is refused (the stack is used, and ``how`` says why) when its FWHM is far from the frame's."""
    frame, found, _ = _moffat_frame()
    ip = real.injection_psf(frame, found, 2.5, 9, "epsf")  # told 2.5 px; the stars are 1.3 px
    assert ip.epsf is None
    assert "no empirical PSF (its FWHM" in ip.how and "against 2.50 px measured" in ip.how


def test_an_epsf_that_does_not_describe_its_stars_is_not_injected() -> None:
    """Stars of two widths: no single PSF fits them to their noise (median chi^2 per pixel > 1.5), so the stack is
    injected instead, and ``how`` says why; one width: the ePSF fits to the noise and is injected."""
    import numpy as np

    frame, found, _ = _moffat_frame()
    wide, wide_found, _ = _moffat_frame(fwhm_px=2.2, seed=4)
    mixed = real.Frame("mixed", frame.image.copy(), None, float("inf"), float("inf"), None)
    mixed.image[:, 200:] = wide.image[:, 200:]  # the left half's stars 1.3 px, the right half's 2.2 px
    a, b = found.x < 200, wide_found.x >= 200
    f2 = real.Found(*(np.r_[getattr(found, k)[a], getattr(wide_found, k)[b]] for k in ("x", "y", "flux", "snr")),
                    flags=np.zeros(int(a.sum() + b.sum()), np.int64))
    ip = real.injection_psf(mixed, f2, 1.6, 7, "epsf")
    assert ip.epsf is None and "median chi2 per pixel" in ip.how
    ok, why = real.epsf_injection_psf(frame, found, 1.3)
    assert ok is not None and ok.meta["median_chi2_per_px"] < 1.2, why

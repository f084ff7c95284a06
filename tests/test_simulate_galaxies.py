"""Galaxies, bright-star spikes and halos, bleed trails and hot pixels in the simulator, with truth."""

from __future__ import annotations

from pathlib import Path

import galsim
import numpy as np
import pandas as pd
import pytest

from survey_proc import evaluate, store
from survey_proc.errors import ConfigError
from survey_proc.simulate import load_scenario, simulate_survey
from survey_proc.simulate import render as render_mod
from survey_proc.simulate.conditions import epoch_conditions, field_epochs
from survey_proc.simulate.galaxies import PROFILES, make_galaxies, stamp_radius_px
from survey_proc.simulate.render import render_epoch
from survey_proc.simulate.stars import field_id_for, make_stars
from survey_proc.simulate.wcs import reference_to_epoch
from survey_proc.vocab import MASK_BAD, MASK_SATURATED

from .conftest import CLEAN, planted_stars

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "benchmarks" / "scenarios" / "galaxies-heldout.toml"
QUIET = {**CLEAN, "psf_ellipticity_rms": 0.0, "jitter_px": 1.0}


@pytest.fixture(scope="module")
def galaxy_survey(tmp_path_factory) -> dict:
    """Bright galaxies, three planted stars (one bright enough for spikes), 2 epochs, no artefacts."""
    out = tmp_path_factory.mktemp("gal") / "gal.zarr"
    scn = load_scenario("sparse", {**QUIET, "size_px": 320, "n_epochs": 2, "seed": 21,
                                   "galaxy_density_per_arcmin2": 5.0, "galaxy_mag_range": (17.0, 19.0),
                                   "galaxy_hlr_arcsec": (0.5, 1.0), "spikes": True, "spike_mag_max": 15.0,
                                   "spike_radius_px": 24})
    stars = planted_stars(scn, [{"x": 30.0, "y": 30.0, "mag": 14.5}, {"x": 290.2, "y": 30.4, "mag": 17.0},
                                {"x": 160.3, "y": 290.6, "mag": 18.0}])
    summary = simulate_survey(scn, out, workers=0, stars=stars, progress=False)
    return {"store": out, "scn": scn, "summary": summary, "truth": out.parent / "gal.truth"}


def test_galaxies_in_truth_not_stars_light_where_truth_says(galaxy_survey):
    path, scn, truth = galaxy_survey["store"], galaxy_survey["scn"], galaxy_survey["truth"]
    gal = pd.read_parquet(truth / "galaxies.parquet")
    assert list(gal.columns) == ["galaxy_id", "field", "ra", "dec", "x", "y", "mag", "profile",
                                 "half_light_radius_px", "e1", "e2", "sersic_n", "bulge_fraction", "in_frame"]
    assert len(gal) == galaxy_survey["summary"]["n_galaxies"] > 10
    assert set(gal["profile"]) <= set(PROFILES)
    # galaxies are negatives: not in the star truth, not in the reference catalogue
    stars = pd.read_parquet(truth / "stars.parquet")
    assert len(stars) == 3 and not set(stars["star_id"]) & set(gal["galaxy_id"])
    ref = pd.read_parquet(path.parent / "gal.reference.parquet")
    assert len(ref) <= 3
    for r in ref.itertuples():
        d = np.hypot((gal["ra"] - r.ra) * np.cos(np.deg2rad(r.dec)), gal["dec"] - r.dec) * 3600
        assert d.min() > 1.0  # arcsec: every reference entry is a star, none a galaxy
    # every galaxy's light is in the pixels at its truth position, in every epoch
    ep = evaluate.load_truth_epochs(path)
    ds = store.open_field(path, "F000")
    sigma = np.sqrt(float(ep.sky_adu.median()) / scn.gain_e_per_adu + (scn.read_noise_e / scn.gain_e_per_adu) ** 2)
    for e in range(scn.n_epochs):
        row = ep[ep.epoch == e].iloc[0]
        img = ds["image"].isel(epoch=e).values.astype(float) - float(row.sky_adu)
        xe, ye = reference_to_epoch(scn, gal["x"].to_numpy(), gal["y"].to_numpy(), row.dx_px, row.dy_px,
                                    row.rotation_deg)
        inside = (xe > 4) & (xe < scn.size_px - 5) & (ye > 4) & (ye < scn.size_px - 5)
        assert inside.sum() > 10
        for x, y in zip(np.round(xe[inside]).astype(int), np.round(ye[inside]).astype(int), strict=True):
            assert img[y - 3 : y + 4, x - 3 : x + 4].sum() > 10 * 7 * sigma  # mag <= 19: S/N > 10 in 7x7 px
        assert abs(np.median(img)) < sigma  # and the sky between them is sky


def test_galaxy_flux_position_size_and_shape_on_a_grid():
    """Galaxies of every profile, moved onto a grid, measured one by one in the rendered epoch."""
    scn = load_scenario("sparse", {**QUIET, "size_px": 320, "n_epochs": 1, "seed": 9, "jitter_px": 0.0,
                                   "rotation_jitter_deg": 0.0, "galaxy_density_per_arcmin2": 200.0,
                                   "galaxy_mag_range": (15.5, 16.5), "galaxy_hlr_arcsec": (0.5, 1.2)})
    cat = make_galaxies(scn, 0)
    gal = pd.concat([cat[cat.profile == p].head(4) for p in PROFILES], ignore_index=True)
    gal["x"] = 40.0 + 80 * (np.arange(16) % 4) + np.linspace(-0.5, 0.5, 16)
    gal["y"] = 40.0 + 80 * (np.arange(16) // 4) + np.linspace(0.4, -0.4, 16)
    cond = field_epochs(scn, 0, field_id_for(0), epoch_conditions(scn)).iloc[0].to_dict()
    no_stars = planted_stars(scn, [{"x": -500.0, "y": -500.0, "mag": 25.0}])
    img, _ = render_epoch(scn, 0, no_stars, cond, pd.DataFrame({"x": [], "y_start": [], "kind": []}), gal)
    img = img.astype(float) - float(cond["sky_adu"])
    zp, fwhm, sky = float(cond["zeropoint"]), float(cond["seeing_fwhm_px"]), float(cond["sky_adu"])
    psf_sigma = galsim.Kolmogorov(fwhm=fwhm).drawImage(nx=41, ny=41, scale=1.0).FindAdaptiveMom().moments_sigma
    radius = np.minimum(stamp_radius_px(gal["half_light_radius_px"].to_numpy(), gal["e1"].to_numpy(),
                                        gal["e2"].to_numpy(), fwhm), 39)
    n_shapes = 0
    for r, rad in zip(gal.itertuples(), radius, strict=True):
        ix, iy = round(r.x), round(r.y)
        box = img[iy - rad : iy + rad + 1, ix - rad : ix + rad + 1]
        flux = 10 ** (-0.4 * (r.mag - zp))
        var = flux / scn.gain_e_per_adu + box.size * (sky / scn.gain_e_per_adu
                                                     + (scn.read_noise_e / scn.gain_e_per_adu) ** 2)
        assert abs(box.sum() - flux) < 5 * np.sqrt(var) + 0.005 * flux, (r.profile, box.sum(), flux)
        mom = galsim.Image(np.ascontiguousarray(box)).FindAdaptiveMom()
        # centred where the truth says (GalSim's centroid is 1-based), and extended: larger than the PSF
        assert mom.moments_centroid.x - 1 - rad == pytest.approx(r.x - ix, abs=0.15)
        assert mom.moments_centroid.y - 1 - rad == pytest.approx(r.y - iy, abs=0.15)
        assert mom.moments_sigma > 1.1 * psf_sigma
        if np.hypot(r.e1, r.e2) > 0.25:
            # the orientation survives (x/y conventions): measured and true shear agree in sign
            big = int(np.argmax(np.abs([r.e1, r.e2])))
            assert np.sign((mom.observed_shape.g1, mom.observed_shape.g2)[big]) == np.sign((r.e1, r.e2)[big])
            n_shapes += 1
    assert n_shapes >= 3


def test_spiked_column_and_summary(galaxy_survey):
    stars = pd.read_parquet(galaxy_survey["truth"] / "stars.parquet")
    assert stars["spiked"].tolist() == [True, False, False]
    assert galaxy_survey["summary"]["n_spiked_stars"] == 1


def _one_star(scn_over: dict, mag: float = 10.0, size: int = 160) -> tuple[np.ndarray, np.ndarray, float]:
    """Render epoch 0 of a clean sparse-like field holding one star at its centre."""
    scn = load_scenario("sparse", {**QUIET, "size_px": size, "n_epochs": 1, "seed": 5, "jitter_px": 0.0,
                                   "rotation_jitter_deg": 0.0, **scn_over})
    c = (size - 1) / 2
    stars = planted_stars(scn, [{"x": c, "y": c, "mag": mag}])
    cond = field_epochs(scn, 0, field_id_for(0), epoch_conditions(scn)).iloc[0].to_dict()
    img, mask = render_epoch(scn, 0, stars, cond, pd.DataFrame({"x": [], "y_start": [], "kind": []}))
    return img.astype(float) - float(cond["sky_adu"]), mask, 10 ** (-0.4 * (mag - float(cond["zeropoint"])))


def _spike_contrast(img: np.ndarray, radii: range) -> float:
    """Mean pixel value along the +-x, +-y axes over the mean along the diagonals, same radii."""
    c = img.shape[0] // 2
    on, off = [], []
    for r in radii:
        on += [img[c, c + r], img[c, c - r], img[c + r, c], img[c - r, c]]
        d = round(r / np.sqrt(2))
        off += [img[c + d, c + d], img[c - d, c + d], img[c + d, c - d], img[c - d, c - d]]
    return float(np.mean(on) / np.mean(off))


def test_spikes_along_struts_of_bright_stars_only_when_on():
    big_well = {"full_well_e": 1e12}
    spiked, _, flux = _one_star({"spikes": True, "spike_mag_max": 15.0, **big_well})
    plain, _, _ = _one_star({"spikes": False, **big_well})
    assert _spike_contrast(spiked, range(20, 60)) > 2.0  # measured 2.6
    assert 0.8 < _spike_contrast(plain, range(20, 60)) < 1.25
    # the stamp is the profile truncated at 64 px, not renormalised: the spikes' and rings' light beyond
    # it is left out (measured 0.992 of the flux; the plain PSF's 113 px stamp 0.997, sky noise ~0.002)
    assert 0.985 < spiked.sum() / flux < 0.997
    assert spiked.sum() < plain.sum()
    # a star fainter than spike_mag_max keeps the plain PSF, bit for bit
    faint_on, _, _ = _one_star({"spikes": True, "spike_mag_max": 9.0, **big_well})
    assert np.array_equal(faint_on, plain)
    # deterministic by seed
    again, _, _ = _one_star({"spikes": True, "spike_mag_max": 15.0, **big_well})
    assert np.array_equal(again, spiked)


def test_halo_puts_flux_far_out_and_keeps_the_total():
    halo, _, flux = _one_star({"halo_fraction": 0.1, "halo_fwhm_factor": 6.0, "full_well_e": 1e12}, mag=12.0)
    plain, _, _ = _one_star({"full_well_e": 1e12}, mag=12.0)
    yy, xx = np.mgrid[: halo.shape[0], : halo.shape[1]]
    r = np.hypot(xx - 79.5, yy - 79.5)
    ring = (r >= 20) & (r < 50)
    noise = 5 * np.sqrt(ring.sum()) * 9.0  # 5 sigma of the ring's sum (8.4 ADU per pixel)
    assert halo[ring].sum() > 0.04 * flux > plain[ring].sum() + noise
    assert halo.sum() == pytest.approx(flux, rel=0.003)


def test_bleed_trails_run_along_columns_and_keep_the_charge():
    over = {"full_well_e": 60000.0}
    bled, mask, flux = _one_star({**over, "bleed_trails": True}, mag=11.0)
    clipped, mask0, _ = _one_star(over, mag=11.0)
    cols = np.flatnonzero((mask & MASK_SATURATED).any(axis=0))
    rows = np.flatnonzero((mask & MASK_SATURATED).any(axis=1))
    assert len(rows) > 3 * len(cols)  # a vertical trail
    assert (mask & MASK_SATURATED).sum() > (mask0 & MASK_SATURATED).sum()
    assert bled.sum() == pytest.approx(flux, rel=0.01)  # the charge is moved, not lost
    assert clipped.sum() < 0.9 * flux


def test_hot_pixels_fixed_per_field_unmasked_with_truth(tmp_path):
    scn = load_scenario("sparse", {**QUIET, "size_px": 64, "n_epochs": 2, "seed": 8, "hot_pixel_frac": 0.002,
                                   "hot_pixel_adu": 2000.0})
    simulate_survey(scn, tmp_path / "hp.zarr", workers=0, progress=False)
    hp = pd.read_parquet(tmp_path / "hp.truth" / "hot_pixels.parquet")
    assert len(hp) == round(0.002 * 64 * 64) and set(hp["field"]) == {"F000"}
    ds = store.open_field(tmp_path / "hp.zarr", "F000")
    ep = evaluate.load_truth_epochs(tmp_path / "hp.zarr")
    for e in range(2):
        img = ds["image"].isel(epoch=e).values.astype(float) - float(ep.loc[ep.epoch == e, "sky_adu"].iloc[0])
        mask = ds["mask"].isel(epoch=e).values
        vals = img[hp["y"], hp["x"]]
        assert np.all(vals > 0.5 * hp["excess_adu"] - 60)
        assert not np.any(mask[hp["y"], hp["x"]] & MASK_BAD)


def test_catalogue_is_deterministic_by_seed_and_counts_rise():
    scn = load_scenario(str(HELDOUT), {"size_px": 512, "n_epochs": 1})
    a, b = make_galaxies(scn, 0), make_galaxies(scn, 0)
    pd.testing.assert_frame_equal(a, b)
    other = make_galaxies(load_scenario(str(HELDOUT), {"size_px": 512, "n_epochs": 1, "seed": 1004}), 0)
    assert not np.allclose(a["x"].to_numpy()[:10], other["x"].to_numpy()[:10])
    # number counts rise ~0.4 dex/mag; sizes, shapes and kinds in range
    h, _ = np.histogram(a["mag"], bins=[18, 19, 20, 21, 22, 23, 24])
    slope = np.polyfit(np.arange(6), np.log10(h), 1)[0]
    assert 0.3 < slope < 0.5
    hlr_arcsec = a["half_light_radius_px"] * scn.pixel_scale_arcsec
    assert hlr_arcsec.min() >= 0.3 - 1e-9 and hlr_arcsec.max() <= 3.0 + 1e-9
    assert np.hypot(a["e1"], a["e2"]).max() <= 0.7 + 1e-12
    assert set(a["profile"]) == set(PROFILES)
    assert a["galaxy_id"].is_unique and (a["galaxy_id"] >= 2**31).all()


def test_heldout_galaxy_scenario_file():
    scn = load_scenario(str(HELDOUT))
    assert scn.seed > 1000 and scn.galaxy_density_per_arcmin2 >= 10 and scn.spikes
    assert scn.star_density_per_px2 == load_scenario("sparse").star_density_per_px2


def test_presets_never_enter_the_new_code_paths(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("new code path entered with the option off")

    for name in ("render_galaxies", "render_bright_stars", "bleed_columns", "hot_pixels", "make_galaxies"):
        monkeypatch.setattr(render_mod, name, boom)
    for preset in ("dense", "sparse"):
        scn = load_scenario(preset, {"size_px": 64, "n_epochs": 1, "psf_oversample": 5})
        assert not scn.bright_star_psf and scn.galaxy_density_per_arcmin2 == 0
        cond = epoch_conditions(scn)
        stars = make_stars(scn, 0, float(cond.mjd.min()), float(cond.mjd.max()))
        render_epoch(scn, 0, stars, field_epochs(scn, 0, field_id_for(0), cond).iloc[0].to_dict())
        assert len(make_galaxies(scn, 0)) == 0


@pytest.mark.parametrize(("override", "message"), [
    ({"galaxy_density_per_arcmin2": -1.0}, r"parameter 'galaxy_density_per_arcmin2' must be >= 0, got -1.0"),
    ({"galaxy_mag_range": (24.0, 18.0)}, r"parameter 'galaxy_mag_range' must be \(bright, faint\) with faint"),
    ({"galaxy_hlr_arcsec": (0.0, 2.0)}, r"parameter 'galaxy_hlr_arcsec' must be \(min, max\) with 0 < min"),
    ({"galaxy_e_max": 0.99}, r"parameter 'galaxy_e_max' must be in \[0, 0.95\), got 0.99"),
    ({"halo_fraction": 1.0}, r"parameter 'halo_fraction' must be in \[0, 1\), got 1.0"),
    ({"spike_radius_px": 4}, r"parameter 'spike_radius_px' must be >= 8 pixels, got 4"),
    ({"spike_strut_thick": 0.0}, r"parameter 'spike_strut_thick' must be in \(0, 0.5\), got 0.0"),
    ({"spike_lam_over_diam_px": 0.0}, r"parameter 'spike_lam_over_diam_px' must be > 0, got 0.0"),
    ({"hot_pixel_frac": 0.5}, r"parameter 'hot_pixel_frac' must be in \[0, 0.01\], got 0.5"),
])
def test_bad_parameters_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_scenario("sparse", override)

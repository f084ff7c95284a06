"""The simulator's physics, measured in the rendered pixels against the configuration and truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.timeseries import LombScargle

from survey_proc import evaluate, store
from survey_proc.simulate import load_scenario, simulate_survey
from survey_proc.simulate.conditions import epoch_conditions, field_epochs
from survey_proc.simulate.psf import fit_point_source
from survey_proc.simulate.reference import make_reference
from survey_proc.simulate.stars import make_stars
from survey_proc.simulate.wcs import reference_to_epoch, wcs_from_text

from .conftest import CLEAN, planted_stars


def test_sky_mean_and_noise_match_configuration(tmp_path):
    scn = load_scenario("dense", {**CLEAN, "size_px": 256, "n_epochs": 3, "seed": 2})
    simulate_survey(scn, tmp_path / "sky.zarr", workers=0, progress=False)
    ds = store.open_field(tmp_path / "sky.zarr", "F000")
    ep = evaluate.load_truth_epochs(tmp_path / "sky.zarr")
    for e in range(3):
        img = ds["image"].isel(epoch=e).values.astype(float)
        sky = float(ep.loc[ep.epoch == e, "sky_adu"].iloc[0])
        sigma = np.sqrt(sky / scn.gain_e_per_adu + (scn.read_noise_e / scn.gain_e_per_adu) ** 2)
        assert img.mean() == pytest.approx(sky, rel=0.02)
        assert img.std() == pytest.approx(sigma, rel=0.02)
        # Poisson + read noise, not a fixed Gaussian: the variance tracks the sky level
        assert abs(img.std() ** 2 - sigma**2) / sigma**2 < 0.04


def test_isolated_star_flux_matches_truth_within_poisson_error(grid_survey):
    path, scn = grid_survey["store"], grid_survey["scn"]
    ds = store.open_field(path, "F000")
    ep = evaluate.load_truth_epochs(path)
    z = []
    half = 17  # the box stays inside the 40 px grid cell and the image, whatever the jitter
    for e in range(scn.n_epochs):
        img = ds["image"].isel(epoch=e).values.astype(float)
        sky = float(ep.loc[ep.epoch == e, "sky_adu"].iloc[0])
        truth = evaluate.truth_at_epoch(path, "F000", e)
        for r in truth.itertuples():
            ix, iy = round(r.x_epoch), round(r.y_epoch)
            box = img[iy - half : iy + half + 1, ix - half : ix + half + 1]
            measured = float(np.sum(box - sky))
            var = r.flux_adu / scn.gain_e_per_adu + box.size * (sky / scn.gain_e_per_adu
                                                                 + (scn.read_noise_e / scn.gain_e_per_adu) ** 2)
            z.append((measured - r.flux_adu) / np.sqrt(var))
    z = np.asarray(z)
    assert len(z) == 16 * scn.n_epochs
    assert np.all(np.abs(z) < 4.5)
    assert abs(z.mean()) < 4 / np.sqrt(len(z))  # unbiased
    assert 0.75 < z.std() < 1.25  # and the scatter is the Poisson + read noise


def test_psf_fwhm_matches_configured_seeing_moffat(grid_survey):
    path, scn = grid_survey["store"], grid_survey["scn"]
    ds = store.open_field(path, "F000")
    ep = evaluate.load_truth_epochs(path)
    seeing = ep["seeing_fwhm_px"].to_numpy()
    assert seeing.std() / seeing.mean() > 0.03  # the seeing really varies between epochs
    for e in range(scn.n_epochs):
        img = ds["image"].isel(epoch=e).values.astype(float)
        sky = float(ep.loc[ep.epoch == e, "sky_adu"].iloc[0])
        truth = evaluate.truth_at_epoch(path, "F000", e).sort_values("mag").head(3)
        fits = [fit_point_source(img, r.x_epoch, r.y_epoch, "moffat", scn.moffat_beta, sky) for r in truth.itertuples()]
        assert np.median([f["fwhm_px"] for f in fits]) == pytest.approx(seeing[e], rel=0.03)


def test_psf_fwhm_matches_configured_seeing_kolmogorov(tmp_path):
    scn = load_scenario("sparse", {**CLEAN, "size_px": 64, "n_epochs": 3, "psf_ellipticity_rms": 0.0,
                                   "night_only": False, "seed": 4})
    stars = planted_stars(scn, [{"x": 31.7, "y": 32.2, "mag": 15.0}])
    simulate_survey(scn, tmp_path / "k.zarr", workers=0, stars=stars, progress=False)
    ds = store.open_field(tmp_path / "k.zarr", "F000")
    ep = evaluate.load_truth_epochs(tmp_path / "k.zarr")
    for e in range(3):
        t = evaluate.truth_at_epoch(tmp_path / "k.zarr", "F000", e).iloc[0]
        fit = fit_point_source(ds["image"].isel(epoch=e).values.astype(float), t.x_epoch, t.y_epoch,
                               "kolmogorov", sky=float(ep.sky_adu.iloc[e]), radius_px=12)
        assert fit["fwhm_px"] == pytest.approx(float(ep.seeing_fwhm_px.iloc[e]), rel=0.03)


def test_wcs_round_trips_and_matches_the_rendered_positions(grid_survey):
    path, scn = grid_survey["store"], grid_survey["scn"]
    ds = store.open_field(path, "F000")
    ep = evaluate.load_truth_epochs(path)
    stars = grid_survey["stars"]
    offsets = []
    for e in range(scn.n_epochs):
        w = wcs_from_text(str(ds["wcs"].values[e]))
        row = ep[ep.epoch == e].iloc[0]
        # sky -> epoch pixels through the stored header == the renderer's exact transform
        xw, yw = w.all_world2pix(stars["ra"].to_numpy(), stars["dec"].to_numpy(), 0)
        xr, yr = reference_to_epoch(scn, stars["x"].to_numpy(), stars["y"].to_numpy(), row.dx_px, row.dy_px,
                                    row.rotation_deg)
        np.testing.assert_allclose(xw, xr, atol=1e-6)
        np.testing.assert_allclose(yw, yr, atol=1e-6)
        # pixels -> sky -> pixels
        ra, dec = w.all_pix2world(xw, yw, 0)
        x2, y2 = w.all_world2pix(ra, dec, 0)
        np.testing.assert_allclose(x2, xw, atol=1e-8)
        np.testing.assert_allclose(y2, yw, atol=1e-8)
        offsets.append(np.hypot(xw.mean() - stars["x"].mean(), yw.mean() - stars["y"].mean()))
        # the stars really sit where the WCS says: fitted centres agree to ~0.03 px
        img = ds["image"].isel(epoch=e).values.astype(float)
        for i in np.argsort(stars["mag"].to_numpy())[:4]:
            fit = fit_point_source(img, xw[i], yw[i], "moffat", scn.moffat_beta, float(row.sky_adu))
            assert np.hypot(fit["x"] - xw[i], fit["y"] - yw[i]) < 0.03
    # epochs are not pixel-aligned: sub-pixel to few-pixel pointing jitter
    assert 0.1 < np.max(offsets) < 5


def _aperture_lightcurve(path, scn, star_row, half=12):
    ds = store.open_field(path, "F000")
    ep = evaluate.load_truth_epochs(path)
    out = []
    for e in range(scn.n_epochs):
        row = ep.iloc[e]
        xe, ye = reference_to_epoch(scn, np.array([star_row.x]), np.array([star_row.y]), row.dx_px, row.dy_px,
                                    row.rotation_deg)
        ix, iy = round(float(xe[0])), round(float(ye[0]))
        box = ds["image"].isel(epoch=e, y=slice(iy - half, iy + half + 1), x=slice(ix - half, ix + half + 1)).values
        flux = float(np.sum(box - row.sky_adu))
        out.append(-2.5 * np.log10(flux) + row.zeropoint)
    return ep["mjd"].to_numpy(), np.asarray(out)


@pytest.fixture(scope="module")
def variable_survey(tmp_path_factory):
    scn = load_scenario("dense", {**CLEAN, "size_px": 128, "n_epochs": 200, "cadence_s": 2700.0,
                                  "psf_fwhm_px": 2.2, "seed": 8})
    t_start = scn.start_mjd
    rows = [
        {"x": 32.3, "y": 32.6, "mag": 19.0, "var_class": "pulsator", "period": 1.7, "amplitude": 0.5,
         "t0": t_start + 0.31},
        {"x": 95.8, "y": 32.1, "mag": 19.0, "var_class": "eclipsing_binary", "period": 0.9, "depth": 0.4,
         "duration": 0.1, "secondary_ratio": 0.5, "ellipsoidal": 0.02, "t0": t_start + 0.2,
         "amplitude": -2.5 * np.log10(0.6)},
        {"x": 32.0, "y": 95.5, "mag": 18.5, "var_class": "transit", "period": 2.2, "depth": 0.02, "duration": 0.125,
         "ingress_frac": 0.15, "t0": t_start + 0.7, "amplitude": -2.5 * np.log10(0.98)},
        {"x": 96.4, "y": 96.2, "mag": 19.0},
    ]
    stars = planted_stars(scn, rows)
    path = tmp_path_factory.mktemp("var") / "var.zarr"
    simulate_survey(scn, path, workers=0, stars=stars, progress=False)
    return path, scn, stars


def test_pulsator_period_amplitude_and_phase_in_pixels_match_truth(variable_survey):
    path, scn, stars = variable_survey
    star = stars.iloc[0]
    mjd, measured = _aperture_lightcurve(path, scn, star)
    truth = evaluate.load_truth_lightcurves(path, star_ids=[int(star.star_id)]).sort_values("epoch")["mag"].to_numpy()
    # period: Lomb-Scargle on the measured light curve finds the true period
    freq, power = LombScargle(mjd, measured).autopower(minimum_frequency=0.2, maximum_frequency=3.0,
                                                       samples_per_peak=50)
    assert 1 / freq[np.argmax(power)] == pytest.approx(star.period, rel=0.01)
    # amplitude: measured = a * truth + b with a = 1; phase: residuals are noise-sized
    a, _ = np.polyfit(truth, measured, 1)
    assert a == pytest.approx(1.0, abs=0.02)
    resid = measured - (truth + np.median(measured - truth))
    assert np.std(resid) < 0.01
    # phase of maximum light: t0 (truth) vs the brightest measured epochs, folded
    phase_max = np.mod((mjd[np.argsort(measured)[:5]] - star.t0) / star.period + 0.5, 1) - 0.5
    assert np.all(np.abs(phase_max) < 0.05)


def test_eclipses_and_transits_in_pixels_match_truth(variable_survey):
    path, scn, stars = variable_survey
    for i in (1, 2):
        star = stars.iloc[i]
        _, measured = _aperture_lightcurve(path, scn, star)
        truth = (evaluate.load_truth_lightcurves(path, star_ids=[int(star.star_id)])
                 .sort_values("epoch")["mag"].to_numpy())
        in_event = truth - star.mag > 0.5 * star.amplitude
        assert in_event.sum() >= 3, "the cadence should catch the events"
        offset = np.median((measured - truth)[~in_event])
        # depth in the pixels equals the truth depth
        np.testing.assert_allclose((measured - offset)[in_event], truth[in_event], atol=0.012)
        assert np.std((measured - offset - truth)[~in_event]) < 0.01
    # the constant star stays constant
    _, measured = _aperture_lightcurve(path, scn, stars.iloc[3])
    assert np.std(measured) < 0.01


def _assert_same_store(a: dict, b: dict, name_a: str, name_b: str) -> None:
    """Byte-identical stores, except that the root attrs name each store's own reference file."""
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k]]
    assert differing in ([], ["zarr.json"])
    assert a["zarr.json"].replace(f"{name_a}.reference".encode(), f"{name_b}.reference".encode()) == b["zarr.json"]
    assert any(k.startswith("fields/F000/image/c/") for k in a)


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    from .conftest import store_bytes

    scn = load_scenario("dense", {"size_px": 96, "n_epochs": 3, "seed": 21, "psf_oversample": 5})
    simulate_survey(scn, tmp_path / "a.zarr", workers=0, progress=False)
    simulate_survey(scn, tmp_path / "b.zarr", workers=0, progress=False)
    a, b = store_bytes(tmp_path / "a.zarr"), store_bytes(tmp_path / "b.zarr")
    _assert_same_store(a, b, "a", "b")
    for name in ("stars", "lightcurves", "epochs"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"a.truth/{name}.parquet"),
                                      pd.read_parquet(tmp_path / f"b.truth/{name}.parquet"))
    simulate_survey(scn.__class__(**{**scn.__dict__, "seed": 22}), tmp_path / "c.zarr", workers=0, progress=False)
    c = store_bytes(tmp_path / "c.zarr")
    chunk = "fields/F000/image/c/0/0/0"
    assert a[chunk] != c[chunk]


def test_dask_cluster_render_is_identical_to_in_process(tmp_path):
    """A real LocalCluster of worker processes writes the same bytes as a serial render."""
    from .conftest import store_bytes

    scn = load_scenario("sparse", {"size_px": 96, "n_epochs": 4, "n_fields": 2, "seed": 5, "psf_oversample": 5})
    simulate_survey(scn, tmp_path / "serial.zarr", workers=0, progress=False)
    simulate_survey(scn, tmp_path / "dask.zarr", workers=2, progress=False)
    a, b = store_bytes(tmp_path / "serial.zarr"), store_bytes(tmp_path / "dask.zarr")
    _assert_same_store(a, b, "serial", "dask")


def test_artefacts_saturation_cosmics_bad_columns(dense_small):
    path, scn = dense_small["store"], dense_small["scn"]
    ds = store.open_field(path, "F000")
    img = ds["image"].values
    mask = ds["mask"].values
    sat = (mask & store.MASK_SATURATED) > 0
    assert sat.any(), "the dense field has stars brighter than saturation"
    assert np.all(img[sat] == np.float32(scn.saturation_adu))
    assert img.max() <= scn.saturation_adu
    cosmic_px = ((mask & store.MASK_COSMIC) > 0).sum(axis=(1, 2))
    expected_events = scn.cosmic_rate_per_px_s * scn.size_px**2 * scn.exptime_s
    assert np.all(cosmic_px > 0.8 * expected_events)  # each event hits >= 1 pixel
    bad = (mask & store.MASK_BAD) > 0
    cols = np.flatnonzero(bad[0].any(axis=0))
    assert len(cols) == scn.n_bad_columns
    assert np.array_equal(bad[0], bad[-1])  # fixed in detector coordinates


def test_dense_scenario_is_crowded_and_deep(dense_small):
    s = dense_small["summary"]
    assert s["stars_per_px2_in_frame"] == pytest.approx(0.025, rel=0.1)
    assert s["neighbour_frac_2fwhm_all"] > 0.45
    assert 25.5 < s["limiting_mag_5sigma_psf_crlb"] < 26.2
    assert 16.5 < s["saturation_mag"] < 18.0
    assert s["median_seeing_fwhm_px"] == pytest.approx(1.75, rel=0.15)


def test_luminosity_function_rises_and_variable_fractions():
    scn = load_scenario("dense", {"n_epochs": 10})
    stars = make_stars(scn, 0, scn.start_mjd, scn.start_mjd + 3.5)
    counts, edges = np.histogram(stars["mag"], bins=np.arange(17, 26.01, 1.0))
    slope = np.polyfit(edges[:-1], np.log10(counts), 1)[0]
    assert slope == pytest.approx(scn.lf_slope, abs=0.03)
    assert np.all(np.diff(counts) > 0)
    frac = stars["var_class"].value_counts(normalize=True)
    for cls, expected in (("eclipsing_binary", 0.01), ("pulsator", 0.01), ("transit", 0.01)):
        assert frac[cls] == pytest.approx(expected, rel=0.05)
    assert frac["flare"] + frac["trend"] == pytest.approx(0.005, rel=0.1)
    per = stars[stars.var_class.isin(["pulsator", "transit"])]["period"]
    assert per.min() >= 1.45 and per.max() <= 2.95
    transits = stars[stars.var_class == "transit"]
    assert transits["depth"].between(0.005, 0.02).all()


def test_cadence_seeing_airmass_and_zeropoints():
    dense = epoch_conditions(load_scenario("dense", {"n_epochs": 1000}))
    assert dense["mjd"].iloc[-1] - dense["mjd"].iloc[0] == pytest.approx(999 * 300 / 86400)
    assert np.allclose(np.diff(dense["mjd"]), 300 / 86400)
    assert dense["airmass"].isna().all()  # space: no airmass
    change = np.diff(np.log(dense["seeing_fwhm_px"]))
    assert 0.08 < np.std(change) < 0.25  # epoch-to-epoch seeing changes of ~10-20 %
    assert 0.10 < np.std(np.log(dense["seeing_fwhm_px"])) < 0.20

    scn = load_scenario("sparse", {"n_epochs": 300})
    ep = field_epochs(scn, 0, "F000")
    assert ep["airmass"].max() <= scn.max_airmass + 1e-9 and ep["airmass"].min() >= 1.0
    assert np.max(np.diff(ep["mjd"])) > 0.3  # nights are separated by days
    expected = scn.zeropoint_mag - scn.extinction_k_mag * ep["airmass"] + ep["zp_drift_mag"]
    resid = ep["zeropoint"] - expected
    assert np.ptp(resid) < 1e-9  # only the constant per-field offset remains
    assert np.corrcoef(ep["airmass"], ep["zeropoint"])[0, 1] < -0.5  # extinction dims high-airmass epochs


def test_reference_catalogue_is_bright_unsaturated_and_noisy_like_gaia():
    scn = load_scenario("dense", {"n_epochs": 10})
    stars = make_stars(scn, 0, scn.start_mjd, scn.start_mjd + 1)
    ref = make_reference(scn, stars, 17.9)
    assert list(ref.columns) == ["ref_id", "ra", "dec", "mag", "mag_err"]
    assert 200 < len(ref) < 2000
    truth = stars.set_index(["ra", "dec"])  # catalogue positions are scattered by ~1 mas: match by nearest
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([stars.ra * np.cos(np.deg2rad(stars.dec)), stars.dec]))
    d, idx = tree.query(np.column_stack([ref.ra * np.cos(np.deg2rad(ref.dec)), ref.dec]))
    assert np.all(d * 3.6e6 < 10)  # within 10 mas
    matched = stars.iloc[idx]
    assert (matched["var_class"] == "constant").all()
    z = (ref["mag"].to_numpy() - matched["mag"].to_numpy()) / ref["mag_err"].to_numpy()
    assert 0.85 < np.std(z) < 1.15 and abs(np.mean(z)) < 0.15
    assert ref["mag_err"].min() >= scn.reference_err_floor_mag
    assert len(truth) == len(stars)


def test_truth_files_follow_design(dense_small):
    path = dense_small["store"]
    stars = evaluate.load_truth_stars(path)
    for col in ("star_id", "field", "ra", "dec", "x", "y", "mag", "var_class", "period", "amplitude", "t0"):
        assert col in stars.columns
    assert stars["star_id"].is_unique and stars["star_id"].dtype == np.int64
    assert set(stars["var_class"]) <= {"constant", "eclipsing_binary", "pulsator", "transit", "flare", "trend"}
    assert stars.loc[stars.var_class.isin(["constant", "flare", "trend"]), "period"].isna().all()
    lc = evaluate.load_truth_lightcurves(path)
    assert list(lc.columns) == ["star_id", "field", "epoch", "mjd", "mag"]
    n_var = int((stars.var_class != "constant").sum())
    assert len(lc) == n_var * dense_small["scn"].n_epochs
    ep = evaluate.load_truth_epochs(path)
    for col in ("field", "epoch", "zeropoint", "airmass", "seeing_fwhm_px", "sky_adu"):
        assert col in ep.columns
    ref = evaluate.load_reference_catalog(store.reference_catalog_path(path))
    assert {"ra", "dec", "mag", "mag_err"} <= set(ref.columns)


def test_stars_at_the_reported_5sigma_limit_are_measured_at_snr_5(tmp_path):
    """The CRLB depth in summary.json holds on the rendered pixels: optimal PSF-fit S/N = 5."""
    from survey_proc.simulate.depth import limiting_magnitude
    from survey_proc.simulate.psf import build_bank
    from survey_proc.simulate.render import render_stars

    scn = load_scenario("dense", {**CLEAN, "size_px": 240, "n_epochs": 2, "psf_oversample": 7, "jitter_px": 0.3,
                                  "seed": 13, "sky_scatter": 0.0})
    ep = field_epochs(scn, 0, "F000")
    m5 = [limiting_magnitude(scn, r.seeing_fwhm_px, r.sky_adu, r.zeropoint) for r in ep.itertuples()]
    rng = np.random.default_rng(0)
    grid = [(12 + 16 * i + rng.uniform(-0.5, 0.5), 12 + 16 * j + rng.uniform(-0.5, 0.5))
            for i in range(14) for j in range(14)]
    stars = planted_stars(scn, [{"x": x, "y": y, "mag": float(np.mean(m5))} for x, y in grid])
    simulate_survey(scn, tmp_path / "depth.zarr", workers=0, stars=stars, progress=False)
    ds = store.open_field(tmp_path / "depth.zarr", "F000")
    snr = []
    for e, row in enumerate(ep.itertuples()):
        t = evaluate.truth_at_epoch(tmp_path / "depth.zarr", "F000", e)
        bank = build_bank("moffat", row.seeing_fwhm_px, oversample=7, base_radius_px=6)
        img = ds["image"].isel(epoch=e).values.astype(float) - row.sky_adu
        est = []
        for r in t.itertuples():
            p = render_stars(img.shape, np.array([r.x_epoch]), np.array([r.y_epoch]), np.array([1.0]), bank, 0.0)
            sl = p > 1e-6
            v = (r.flux_adu * p[sl] + row.sky_adu) / scn.gain_e_per_adu + (scn.read_noise_e / scn.gain_e_per_adu) ** 2
            est.append(np.sum(p[sl] * img[sl] / v) / np.sum(p[sl] ** 2 / v))
        flux = float(t["flux_adu"].iloc[0])
        est = np.asarray(est)
        assert np.mean(est) == pytest.approx(flux, rel=0.05)
        snr.append(flux / np.std(est))
    print(f"measured S/N at the reported 5-sigma limit: {snr}")
    assert np.mean(snr) == pytest.approx(5.0, rel=0.12)

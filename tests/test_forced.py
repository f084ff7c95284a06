"""Forced photometry: the frame map, the measurement on a window, and the stage in a real run (with resume)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from survey_proc import vocab as F
from survey_proc.catalog.frame_map import fit_frame_map
from survey_proc.config import DetectionConfig, PhotometryConfig
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.errors import ConfigError, SurveyProcError
from survey_proc.evaluate import load_truth_stars, match_one_to_one, truth_at_epoch
from survey_proc.outputs import OutputLayout
from survey_proc.photometry.forced import forced_aperture
from tests.conftest import run_config

# --------------------------------------------------------------------------------------------- frame map


def _true_map(xr: np.ndarray, yr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A rotation, shift and a mild quadratic distortion (what a WCS pair can give)."""
    th = np.deg2rad(0.7)
    x = 12.3 + np.cos(th) * xr - np.sin(th) * yr + 2e-5 * (xr - 200) ** 2
    y = -7.9 + np.sin(th) * xr + np.cos(th) * yr - 1.5e-5 * (xr - 200) * (yr - 200)
    return x, y


def test_frame_map_recovers_a_distorted_map_to_its_noise_and_rejects_mismatches():
    rng = np.random.default_rng(3)
    xr, yr = rng.uniform(0, 400, 300), rng.uniform(0, 400, 300)
    x, y = _true_map(xr, yr)
    x, y = x + rng.normal(0, 0.02, 300), y + rng.normal(0, 0.02, 300)
    x[:10] += 5.0  # mismatched stars
    fmap = fit_frame_map(xr, yr, x, y)
    assert fmap.degree == 3 and 286 <= fmap.n_stars <= 290  # the 10 mismatches out (and 0.2 % of a Rayleigh)
    assert 0.015 < fmap.rms_px < 0.03
    gx, gy = rng.uniform(0, 400, 1000), rng.uniform(0, 400, 1000)
    px, py = fmap(gx, gy)
    tx, ty = _true_map(gx, gy)
    assert np.max(np.hypot(px - tx, py - ty)) < 0.03


def test_frame_map_with_few_stars_is_affine_and_too_few_is_an_error_naming_the_epoch():
    rng = np.random.default_rng(4)
    xr, yr = rng.uniform(0, 400, 12), rng.uniform(0, 400, 12)
    fmap = fit_frame_map(xr, yr, xr + 3.0, yr - 1.0)
    assert fmap.degree == 1
    px, py = fmap(np.array([100.0]), np.array([50.0]))
    assert px[0] == pytest.approx(103.0) and py[0] == pytest.approx(49.0)
    with pytest.raises(SurveyProcError, match=r"field F001 epoch 7: 4 usable star\(s\) .* 6 needed; the epoch gets "
                                              r"no forced photometry"):
        fit_frame_map(xr[:4], yr[:4], xr[:4], yr[:4], min_stars=6, what="field F001 epoch 7")


def test_forced_settings_are_checked():
    with pytest.raises(ConfigError, match=r"forced.frame_min_stars must be >= 3"):
        run_config("s.zarr", "o", forced={"frame_min_stars": 2})


# ------------------------------------------------------------------------------------- the measurement


def _gaussian_image(n: int, stars: list[tuple[float, float, float]], fwhm: float, sky: float, noise: float,
                    rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n].astype(float)
    s = fwhm / 2.3548
    img = np.full((n, n), sky)
    for x, y, f in stars:
        img += f / (2 * np.pi * s * s) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
    return (img + rng.normal(0, noise, img.shape)).astype(np.float32)


def test_forced_fluxes_are_unbiased_with_honest_errors_on_blank_sky_and_on_stars():
    rng = np.random.default_rng(5)
    fwhm, noise = 2.5, 10.0
    grid = [(float(x), float(y)) for x in range(20, 236, 24) for y in range(20, 236, 24)]  # 81 positions
    stars = [(x, y, 3000.0) for x, y in grid[::2]]  # every other position holds a star (S/N ~ 60)
    apcorr = 1.5  # pretend aperture correction: fluxes scale with it
    z_blank, ratio = [], []
    for _ in range(12):
        img = _gaussian_image(256, stars, fwhm, 100.0, noise, rng)
        gx, gy = np.array(grid).T
        r = forced_aperture(img, None, gx, gy, fwhm_px=fwhm, apcorr=apcorr, gain_e_per_adu=1e9,
                            saturation_adu=np.inf, detection=DetectionConfig(), photometry=PhotometryConfig())
        assert (r.flags & F.FORCED).all() and not (r.flags & F.EDGE).any()
        blank = np.arange(len(grid)) % 2 == 1
        z_blank.extend(r.flux[blank] / r.flux_err[blank])
        ratio.extend(r.flux_aper[~blank] * apcorr / r.flux[~blank])
        # negative fluxes are kept, flagged, not clipped
        assert ((r.flux <= 0) == ((r.flags & F.NONPOSITIVE) != 0)).all()
    z = np.array(z_blank)
    assert (z < 0).sum() > 100  # half the blank positions come out negative, and stay so
    assert abs(np.mean(z)) < 0.15
    assert 0.9 < np.std(z) < 1.1
    assert np.allclose(ratio, 1.0)


def _moffat_image(n: int, stars: list[tuple[float, float, float]], fwhm: float, sky: float, noise: float,
                  rng: np.random.Generator, beta: float = 3.0) -> np.ndarray:
    from survey_proc.photometry.psffit import moffat_alpha, render

    x, y, f = (np.array(v, float) for v in zip(*stars, strict=True))
    img = sky + render((n, n), x, y, f, moffat_alpha(fwhm, beta), beta, 30)
    return (img + rng.normal(0, noise, img.shape)).astype(np.float32)


def test_subtracting_the_neighbours_removes_their_light_from_forced_apertures():
    """A faint star 3 px from a 30x brighter one in poor seeing: without subtraction its forced flux holds the
    neighbour's wing; with it, the star's own flux comes back (within its error), and a detection at the
    measured position itself is never subtracted."""
    rng = np.random.default_rng(7)
    fwhm, noise = 3.5, 5.0
    pairs = [(30.0 + 40 * i, 30.0 + 40 * j) for i in range(5) for j in range(5)]
    stars = [s for x, y in pairs for s in ((x, y, 1000.0), (x + 3.0, y, 30000.0))]
    kw = {"fwhm_px": fwhm, "apcorr": 1.0, "gain_e_per_adu": 1e9, "saturation_adu": np.inf,
          "detection": DetectionConfig(), "photometry": PhotometryConfig(aperture_fwhm=1.0)}
    fx, fy = np.array(pairs).T
    nb = (fx + 3.0, fy, np.full(len(fx), 30000.0))
    plain, sub, itself = [], [], []
    for _ in range(6):
        img = _moffat_image(220, stars, fwhm, 100.0, noise, rng)
        plain.append(forced_aperture(img, None, fx, fy, **kw).flux)
        r = forced_aperture(img, None, fx, fy, **kw, neighbours=nb, neighbour_exclude_px=0.75 * fwhm)
        sub.append(r.flux)
        # the bright star measured at its own position with itself among the neighbours: kept, not subtracted
        itself.append(forced_aperture(img, None, nb[0], nb[1], **kw, neighbours=nb,
                                      neighbour_exclude_px=0.75 * fwhm).flux)
    from survey_proc.photometry.aperture import moffat_apcorr

    frac = 1.0 / moffat_apcorr(1.0, 20.0)  # the share of a star's flux inside a 1-FWHM aperture
    plain, sub, itself = np.concatenate(plain), np.concatenate(sub), np.concatenate(itself)
    assert np.median(plain) > 1000.0 * frac * 3  # the neighbour's wing dominates the faint star's aperture
    assert abs(np.median(sub) / (1000.0 * frac) - 1.0) < 0.1
    assert abs(np.median(itself) / (30000.0 * frac) - 1.0) < 0.05
    with pytest.raises(ConfigError, match=r"forced.neighbour_beta must be > 1 \(a Moffat with finite flux\), got 1"):
        run_config("s.zarr", "o", forced={"neighbour_beta": 1.0})
    with pytest.raises(ConfigError, match=r"forced.neighbour_exclude_fwhm must be >= 0, got -1"):
        run_config("s.zarr", "o", forced={"neighbour_exclude_fwhm": -1.0})


def test_forced_aperture_flags_the_edge_and_masked_pixels():
    rng = np.random.default_rng(6)
    img = _gaussian_image(128, [], 2.5, 50.0, 5.0, rng)
    mask = np.zeros(img.shape, np.uint8)
    mask[60:63, 60:63] = F.MASK_COSMIC
    r = forced_aperture(img, mask, np.array([0.5, 61.0, 90.0]), np.array([64.0, 61.0, 90.0]), fwhm_px=2.5,
                        apcorr=1.0, gain_e_per_adu=1.0, saturation_adu=np.inf, detection=DetectionConfig(),
                        photometry=PhotometryConfig())
    assert [bool(f & F.EDGE) for f in r.flags] == [True, False, False]
    assert [bool(f & F.COSMIC) for f in r.flags] == [False, True, False]


# ------------------------------------------------------------------------------------------ the stage


def _lightcurves(out) -> pd.DataFrame:
    return pd.concat([pq.read_table(f).to_pandas() for f in sorted((out / "lightcurves").rglob("*.parquet"))],
                     ignore_index=True)


def _objects(out) -> pd.DataFrame:
    return pd.concat([pq.read_table(f).to_pandas() for f in sorted((out / "objects").rglob("*.parquet"))],
                     ignore_index=True)


def test_every_object_inside_the_footprint_has_a_point_in_every_epoch(field_run):
    run, out = field_run["run"], field_run["out"]
    assert run["status"] == "complete"
    assert run["counts"]["forced_points"] > 0 and run["counts"]["forced_epochs_skipped"] == 0
    objects = _objects(out)
    lc = _lightcurves(out)
    n_ep = 8
    # objects at least 5 px inside the image in the reference frame are on every (dithered) epoch
    inner = objects[(objects["x"] > 5) & (objects["x"] < 378) & (objects["y"] > 5) & (objects["y"] < 378)]
    assert len(inner) > 500
    assert (inner["n_epochs"] == n_ep).all(), inner["n_epochs"].value_counts().to_dict()
    assert (inner["n_detected"] < n_ep).sum() > 50  # faint stars missed somewhere: filled
    pts = lc[lc["object_id"].isin(inner["object_id"])]
    assert not pts.duplicated(["object_id", "epoch"]).any()
    forced = pts[pts["source_id"].isna()]
    assert ((forced["flags"] & F.FORCED) != 0).all()
    # faint points are measured as they come (S/N < 2 in ~9-10 % of them; a negative one now and then: 1 of 745
    # before the simulator's stamps were truncated, 0 of 745 since), and a non-positive flux has no magnitude
    snr = forced["flux"] / forced["flux_err"]
    assert (snr < 2).mean() > 0.03 and snr.min() < 1
    assert forced.loc[forced["flux"] <= 0, "mag"].isna().all() and forced.loc[forced["flux"] > 0, "mag"].notna().all()


def test_forced_fluxes_of_constant_isolated_stars_match_the_truth_with_honest_errors(field_run):
    """Measured in every epoch (not only where the star was missed: that choice is biased low by the noise that
    hid it), the forced fluxes of constant isolated stars are unbiased and their errors honest."""
    from survey_proc import store as st
    from survey_proc.catalog.crossmatch import region_grid
    from survey_proc.stages.extract import read_epoch
    from survey_proc.stages.forced import measure_epoch

    out, store, cfg = field_run["out"], field_run["store"], field_run["cfg"]
    objects = _objects(out)
    truth = load_truth_stars(store, "F000")
    i_o, i_t = match_one_to_one(objects["x"].to_numpy(), objects["y"].to_numpy(), truth["x"].to_numpy(),
                                truth["y"].to_numpy(), radius_px=1.0)
    # isolated: no other true star within 3 FWHM brighter than 1/10 of this one
    tx, ty, tf = truth["x"].to_numpy(), truth["y"].to_numpy(), 10 ** (-0.4 * truth["mag"].to_numpy())
    d = np.hypot(tx[:, None] - tx[None, :], ty[:, None] - ty[None, :])
    crowd = ((d < 3 * 2.2) & (d > 0) & (tf[None, :] > 0.1 * tf[:, None])).any(axis=1)
    keep = (truth["var_class"].to_numpy()[i_t] == "constant") & ~crowd[i_t]
    star_of = dict(zip(objects["object_id"].to_numpy()[i_o][keep], truth["star_id"].to_numpy()[i_t][keep],
                       strict=True))
    attrs = st.field_attrs(store, "F000")
    _, ny, nx = st.image_shape(store, "F000")
    regions = {r.index: r for r in region_grid(ny, nx, 192)}
    flux, f_true, err = [], [], []
    for e in range(8):
        rec, _ = read_epoch(str(out), "F000", e, columns=["x"])
        ep = {"epoch": e, "mjd": rec.mjd, "band": rec.band, "fwhm_px": rec.fwhm_px, "apcorr": rec.apcorr,
              "zp": rec.zp.to_dict()}
        t = truth_at_epoch(store, "F000", e, in_frame_only=False).set_index("star_id")
        for r, objs in objects[objects["object_id"].isin(star_of)].groupby("region"):
            pts = measure_epoch(str(store), str(out), "F000", regions[int(r)], ep, objs, set(), (ny, nx),
                                float(attrs["gain_e_per_adu"]), float(attrs.get("saturation_adu", np.inf)), cfg)
            pts = pts[(pts["flags"].to_numpy() & F.PHOTOMETRY_BAD & ~F.NONPOSITIVE) == 0]
            flux.extend(pts["flux"])
            err.extend(pts["flux_err"])
            f_true.extend(t["flux_adu"].reindex([star_of[o] for o in pts["object_id"]]))
    flux, f_true, err = np.array(flux), np.array(f_true), np.array(err)
    snr = f_true / err
    # the flux scale, as the zero point sees it: the bright stars' (the aperture correction's error, ~1 %)
    bright = snr >= 30
    assert bright.sum() > 200
    scale = float(np.median(flux[bright] / f_true[bright]))
    assert abs(scale - 1) < 0.03, scale
    faint = (snr >= 3) & (snr < 30)
    assert faint.sum() > 300
    z = (flux[faint] - scale * f_true[faint]) / err[faint]
    med = float(np.median(z))
    nmad = float(1.4826 * np.median(np.abs(z - med)))
    # the mesh background (the default) holds some star light: an additive deficit of ~0.2-0.3 sigma
    # (photometry.background = "masked" takes it to 0.0 +- 0.05 here; docs/pipeline.md, benchmarks/RESULTS.md)
    assert -0.4 < med < 0.05, med
    assert 0.85 < nmad < 1.15, nmad


def test_forced_stage_resumes_without_duplicating_points(field_run, client, tmp_path):
    import shutil

    from survey_proc.outputs import read_meta

    out = tmp_path / "out"
    shutil.copytree(field_run["out"], out)
    before = _lightcurves(out).sort_values(["object_id", "epoch"]).reset_index(drop=True)
    # an interruption between the stage's two writes: light curves rewritten, objects not yet
    opath = OutputLayout(out).objects("F000", 0)
    meta = read_meta(opath)
    assert meta is not None and "forced_fingerprint" in meta
    t = pq.read_table(opath)
    stripped = {k: v for k, v in meta.items() if k not in ("forced_fingerprint", "forced", "classify",
                                                           "classify_fingerprint")}
    from survey_proc.outputs import write_parquet_atomic

    write_parquet_atomic(t.to_pandas(), t.schema.remove_metadata(), opath, stripped)
    cfg = run_config(field_run["store"], out, tile_px=128, halo_px=24, crossmatch={"region_px": 192})
    run = run_pipeline(cfg, client=client)
    assert run["counts"]["forced_regions_skipped_resume"] == run["counts"]["regions_written"] - 1
    assert run["counts"]["epochs_skipped_resume"] == 8
    after = _lightcurves(out).sort_values(["object_id", "epoch"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    # switching forced photometry off removes the forced points and re-runs only forced + classify
    cfg = run_config(field_run["store"], out, tile_px=128, halo_px=24, crossmatch={"region_px": 192},
                     forced={"enabled": False})
    run = run_pipeline(cfg, client=client)
    assert run["counts"]["regions_skipped_resume"] == run["counts"]["regions_written"]
    lc = _lightcurves(out)
    assert lc["source_id"].notna().all() and run["counts"]["forced_points"] == 0
    objects = _objects(out)
    assert (objects["n_forced"] == 0).all() and (objects["n_detected"] == objects["n_epochs"]).all()


def test_forced_fluxes_follow_the_detections_scale(field_run, tmp_path):
    """The anchors (bright detections measured the forced way) carry the forced points onto the detections' scale:
    about 1 for sep's aperture photometry, and 1.1 when the detections' fluxes are 10 % higher (as a PSF fit or
    the BPNN could give)."""
    import shutil

    from survey_proc import store as st
    from survey_proc.catalog.crossmatch import region_grid
    from survey_proc.catalog.schema import SOURCES
    from survey_proc.outputs import read_meta, write_parquet_atomic
    from survey_proc.stages.extract import read_epoch
    from survey_proc.stages.forced import measure_epoch

    out, store, cfg = field_run["out"], field_run["store"], field_run["cfg"]
    rec = read_meta(OutputLayout(out).objects("F000", 0))
    assert rec is not None and 0.98 < rec["forced"]["flux_scale"]["median"] < 1.02
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    src_path = OutputLayout(copy).sources("F000", 3)
    meta = read_meta(src_path)
    src = pq.read_table(src_path).to_pandas()
    src["flux"] *= 1.1
    write_parquet_atomic(src, SOURCES, src_path, meta)
    erec, _ = read_epoch(str(out), "F000", 3, columns=["x"])
    ep = {"epoch": 3, "mjd": erec.mjd, "band": erec.band, "fwhm_px": erec.fwhm_px, "apcorr": erec.apcorr,
          "zp": erec.zp.to_dict()}
    objects = _objects(out)
    objs = objects[objects["region"] == 0]
    _, ny, nx = st.image_shape(store, "F000")
    region = region_grid(ny, nx, 192)[0]
    attrs = st.field_attrs(store, "F000")
    args = (ep, objs, set(), (ny, nx), float(attrs["gain_e_per_adu"]), float(attrs.get("saturation_adu", np.inf)),
            cfg)
    a = measure_epoch(str(store), str(out), "F000", region, *args)
    b = measure_epoch(str(store), str(copy), "F000", region, *args)
    assert a.attrs["n_anchors"] >= 20 and abs(a.attrs["flux_scale"] - 1) < 0.02
    assert b.attrs["flux_scale"] == pytest.approx(1.1 * a.attrs["flux_scale"], rel=1e-6)
    assert np.allclose(b["flux"], 1.1 * a["flux"]) and np.allclose(b["flux_err"], 1.1 * a["flux_err"])


def test_forced_photometry_renders_the_halos_the_epochs_extraction_kept(field_run):
    """With ``detection.halo_sky`` the epoch's record carries its saturated stars' halos (image frame); the forced
    photometry takes them as its sky on whatever window it reads, and flags the points on them ``HALO``."""
    from dataclasses import replace

    from survey_proc import store as st
    from survey_proc.catalog.crossmatch import region_grid
    from survey_proc.photometry.halo import HaloProfile, render_halos
    from survey_proc.stages.extract import read_epoch
    from survey_proc.stages.forced import measure_epoch
    from survey_proc.stages.records import EpochRecord

    out, store, cfg = field_run["out"], field_run["store"], field_run["cfg"]
    cfg = replace(cfg, detection=replace(cfg.detection, halo_sky=True))
    erec, _ = read_epoch(str(out), "F000", 3, columns=["x"])
    objects = _objects(out)
    objs = objects[objects["region"] == 3]
    _, ny, nx = st.image_shape(store, "F000")
    region = region_grid(ny, nx, 192)[3]  # its window does not start at (0, 0)
    attrs = st.field_attrs(store, "F000")
    # a made-up halo (40 sigma at 3 px, falling as r^-2 out to 40 px) in the middle of region 3
    r = np.arange(1.0, 41.0)
    halo = HaloProfile(288.0, 288.0, 40.0, r, 40.0 * erec.rms_adu * (3.0 / r) ** 2)
    rec = erec.with_(halos=[halo.to_dict()])
    assert EpochRecord.from_dict(rec.to_dict()).halos == [halo.to_dict()]  # kept in the footer as it is
    assert "halos" not in erec.with_(halos=None).to_dict()  # (omitted without the halo sky)
    ep = {"epoch": 3, "mjd": erec.mjd, "band": erec.band, "fwhm_px": erec.fwhm_px, "apcorr": erec.apcorr,
          "zp": erec.zp.to_dict()}
    args = (objs, set(), (ny, nx), float(attrs["gain_e_per_adu"]), float(attrs.get("saturation_adu", np.inf)), cfg)
    with_halo = measure_epoch(str(store), str(out), "F000", region, {**ep, "halos": rec.halos}, *args)
    without = measure_epoch(str(store), str(out), "F000", region, {**ep, "halos": []}, *args)
    # every object of the region in this epoch's frame (one at the image's edge may map just outside it)
    assert len(with_halo) == len(without) >= len(objs) - 2
    objs = objs[objs["object_id"].isin(with_halo["object_id"])]  # (the rows come in the objects' order)
    np.testing.assert_array_equal(objs["object_id"].to_numpy(), with_halo["object_id"].to_numpy())
    level = render_halos([halo], (ny, nx))
    # the objects' positions on this epoch, as the stage mapped them (the frame map: near the reference frame's)
    xe, ye = with_halo.attrs["frame"](objs["x"].to_numpy(float), objs["y"].to_numpy(float))
    on = level[np.rint(ye).astype(int), np.rint(xe).astype(int)] >= 0.1 * erec.rms_adu
    assert 3 < on.sum() < len(objs) - 100
    lit = (with_halo["flags"].to_numpy() & F.HALO) != 0
    np.testing.assert_array_equal(lit, on)
    assert not (without["flags"].to_numpy() & F.HALO).any()
    # the halo's light is taken out of the apertures there (it is not in the pixels: the fluxes drop), not elsewhere
    near = on & (np.hypot(xe - 288.0, ye - 288.0) < 15.0)
    assert near.sum() >= 1
    assert (with_halo["flux"].to_numpy()[near] < without["flux"].to_numpy()[near] - 5 * erec.rms_adu).all()
    far = np.hypot(xe - 288.0, ye - 288.0) > 80.0
    d = with_halo["flux"].to_numpy()[far] - without["flux"].to_numpy()[far]
    assert np.median(np.abs(d)) < 0.1 * np.median(without["flux_err"].to_numpy()[far])


def test_forced_photometry_reads_the_halos_from_the_epochs_sources_footer(field_run, tmp_path):
    """The stage sends no halos to its tasks: each reads the epoch's own (its sources footer's record) with the
    sources it reads anyway; a halo written there is the one rendered, as when it is passed in."""
    import shutil
    from dataclasses import replace

    from survey_proc import store as st
    from survey_proc.catalog.crossmatch import region_grid
    from survey_proc.catalog.schema import SOURCES
    from survey_proc.outputs import read_meta, write_parquet_atomic
    from survey_proc.photometry.halo import HaloProfile
    from survey_proc.stages.extract import read_epoch
    from survey_proc.stages.forced import measure_epoch

    out, store, cfg = field_run["out"], field_run["store"], field_run["cfg"]
    cfg = replace(cfg, detection=replace(cfg.detection, halo_sky=True))
    erec, _ = read_epoch(str(out), "F000", 3, columns=["x"])
    r = np.arange(1.0, 41.0)
    halo = HaloProfile(288.0, 288.0, 40.0, r, 40.0 * erec.rms_adu * (3.0 / r) ** 2).to_dict()
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    src_path = OutputLayout(copy).sources("F000", 3)
    meta = read_meta(src_path)
    assert meta is not None
    write_parquet_atomic(pq.read_table(src_path).to_pandas(), SOURCES, src_path, {**meta, "halos": [halo]})
    objects = _objects(out)
    objs = objects[objects["region"] == 3]
    _, ny, nx = st.image_shape(store, "F000")
    region = region_grid(ny, nx, 192)[3]
    attrs = st.field_attrs(store, "F000")
    ep = {"epoch": 3, "mjd": erec.mjd, "band": erec.band, "fwhm_px": erec.fwhm_px, "apcorr": erec.apcorr,
          "zp": erec.zp.to_dict()}
    args = (objs, set(), (ny, nx), float(attrs["gain_e_per_adu"]), float(attrs.get("saturation_adu", np.inf)), cfg)
    from_footer = measure_epoch(str(store), str(copy), "F000", region, ep, *args)
    passed = measure_epoch(str(store), str(out), "F000", region, {**ep, "halos": [halo]}, *args)
    none = measure_epoch(str(store), str(out), "F000", region, {**ep, "halos": []}, *args)
    assert (from_footer["flags"].to_numpy() & F.HALO).sum() > 3
    np.testing.assert_array_equal(from_footer["flux"].to_numpy(), passed["flux"].to_numpy())
    np.testing.assert_array_equal(from_footer["flags"].to_numpy(), passed["flags"].to_numpy())
    assert not np.array_equal(from_footer["flux"].to_numpy(), none["flux"].to_numpy())

"""Stage 5, forced photometry: per (field, region), every object measured in every epoch where it was not detected.

Near the detection limit a star drops out of its light curve exactly when it is faint (an
eclipse, a minimum of a pulsation), which biases its mean and hides the variability. This
stage fills those holes. For each calibrated epoch whose footprint holds the object and
that has no detection of it, the region task maps the object's reference-frame position
onto the epoch (:mod:`survey_proc.catalog.frame_map`, fitted on the epoch's clean stars),
reads the epoch's pixels around the region and measures the flux there the way the
detections were measured (:mod:`survey_proc.photometry.forced`), then calibrates it with
the epoch's zero point. The forced fluxes are put on the detections' scale by the window's
anchors: its bright clean detections (S/N >= 20, up to 300), measured the same way at their
own positions; the median of their detected flux over that forced flux multiplies the
forced fluxes (about 1 for sep's aperture photometry, where only the aperture correction of
the block differs from the epoch's; it carries the forced points onto the scale of PNet's PSF
fit, the BPNN or the ePSF fit when those measured the detections). The region's record
keeps the scales' median and range (``forced.flux_scale``). The points join
``lightcurves/`` with the ``FORCED`` flag and a null ``source_id``; negative fluxes are kept
(their magnitudes are NaN, flag ``NONPOSITIVE``).

Objects then describe the whole light curve: ``n_epochs`` counts its points (detected and
forced), ``n_detected`` and ``n_forced`` split them, and the statistics (``mag_mean``,
``mag_std``, ``chi2_const``, ``n_good``, per band) are computed again over all clean
points. The classify columns are reset (the classify stage fills them again).

An epoch whose frame cannot be mapped (too few clean stars) or whose pixels cannot be
read gets no forced points in the region; the reason is in the region's record
(``forced.epochs_skipped``) and in run.json ``counts.forced``.

The region's frame maps (one per measured epoch) are kept in
``calibration/field=<f>/frames/region=<r>.parquet`` (:data:`FRAMES_UNIT`, written before the
light curves, its footer naming the forced fingerprint and cross-match digest they belong
to): the classify stage's blend vetting maps its candidates with them instead of reading
every epoch's sources again (:func:`load_frames`; ~2.7 s per 1000 epochs).

Resume: the stage has its own fingerprint (the run's and ``[forced]``,
:meth:`survey_proc.config.RunConfig.forced_fingerprint`). A region is done when both its
files carry it and the cross-match digest they were made from. The task first drops any
forced rows the light curves already hold, so a task interrupted between its two writes
is simply done again, never adding rows twice. With ``forced.enabled = false`` the stage
only removes forced points a previous run left.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from survey_proc import storage, store
from survey_proc import vocab as F
from survey_proc.catalog import crossmatch as xm
from survey_proc.catalog.calibrate import ZeroPoint, apply_zeropoint, instrumental_mag
from survey_proc.catalog.frame_map import (
    FRAME_TABLE_SCHEMA,
    FrameMap,
    fit_frame_map,
    frames_from_table,
    frames_to_table,
)
from survey_proc.catalog.schema import CLASSIFY_COLUMNS, LIGHTCURVES, objects_schema
from survey_proc.errors import SurveyProcError
from survey_proc.outputs import meta_from, write_parquet_atomic
from survey_proc.photometry.forced import forced_aperture
from survey_proc.photometry.halo import HaloProfile
from survey_proc.stages.base import OutputUnit, Stage, StageContext, Submission, task_config, worker_task
from survey_proc.stages.crossmatch import LIGHTCURVES_UNIT, OBJECTS_UNIT
from survey_proc.stages.extract import SOURCES_UNIT

FRAME_COLUMNS = ["x", "y", "x_ref", "y_ref", "flags", "snr", "peak_adu", "flux"]
ANCHOR_SNR_MIN = 20.0  # detections that set the forced points' flux scale (see measure_epoch)
ANCHOR_MAX = 300
ANCHOR_MIN = 5
#: keys a region's record loses when its light curves change (the classify stage adds them again)
CLASSIFY_KEYS = ("classify_fingerprint", "classify")
MAX_REASONS = 20  # skipped epochs listed per region in its record (the count is always complete)
#: the region's frame maps per epoch (an addition outside the contract; see the module doc)
FRAMES_UNIT = OutputUnit("calibration/field={field}/frames/region={region}.parquet", None)


def _epoch_frame(out: str, field: str, epoch: int, region: xm.Region, fc: Any) -> tuple[Any, pd.DataFrame]:
    """The map from the reference frame onto ``epoch``, and the epoch's sources (:data:`FRAME_COLUMNS`).

    The map is fitted on the clean stars near ``region`` (on all of the epoch's when too few). The sources'
    ``attrs["halos"]`` holds the halos its extraction kept (the footer record's ``halos``, image frame; None
    without the halo sky): each task reads them with the sources it reads anyway, so the stage does not send every
    epoch's halos to every region.
    """
    table = storage.read_table(SOURCES_UNIT.path(out, field=field, epoch=epoch), columns=FRAME_COLUMNS)
    src = table.to_pandas()
    # no record: as without the halo sky (the window's halos are fitted)
    src.attrs["halos"] = (meta_from(table.schema.metadata) or {}).get("halos")
    clean = ((src["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0) & (src["snr"].to_numpy() >= fc.frame_snr_min)
    m = fc.frame_margin_px
    xr, yr = src["x_ref"].to_numpy(float), src["y_ref"].to_numpy(float)
    near = clean & (xr >= region.x0 - m) & (xr < region.x1 + m) & (yr >= region.y0 - m) & (yr < region.y1 + m)
    use = near if near.sum() >= max(fc.frame_min_stars, 30) else clean
    fmap = fit_frame_map(xr[use], yr[use], src["x"].to_numpy(float)[use], src["y"].to_numpy(float)[use],
                         min_stars=fc.frame_min_stars, what=f"field {field} epoch {epoch}")
    return fmap, src


def _window(x: np.ndarray, y: np.ndarray, pad_px: float, ny: int, nx: int) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the pixels around positions ``x, y`` (px) plus ``pad_px``, inside the image."""
    y0 = int(max(0, np.floor(np.min(y) - pad_px)))
    y1 = int(min(ny, np.ceil(np.max(y) + pad_px) + 1))
    x0 = int(max(0, np.floor(np.min(x) - pad_px)))
    x1 = int(min(nx, np.ceil(np.max(x) + pad_px) + 1))
    return y0, y1, x0, x1


def load_frames(out: str, field: str, region: int) -> dict[int, FrameMap] | None:
    """The frame maps the forced stage kept for a region, when they belong to its current light curves.

    Parameters
    ----------
    out, field, region
        The output directory, the field and the region's index.

    Returns
    -------
    dict or None
        Epoch -> :class:`~survey_proc.catalog.frame_map.FrameMap`; None when the file is missing,
        unreadable, or its forced fingerprint or cross-match digest is not the light curves' (the
        caller fits the maps itself).
    """
    path = FRAMES_UNIT.path(out, field=field, region=region)
    rec, lrec = FRAMES_UNIT.record(out, field=field, region=region), LIGHTCURVES_UNIT.record(out, field=field,
                                                                                             region=region)
    if rec is None or lrec is None or "forced_fingerprint" not in lrec:
        return None
    if rec.get("forced_fingerprint") != lrec["forced_fingerprint"] or rec.get("digest") != lrec.get("digest"):
        return None
    try:
        return frames_from_table(storage.read_table(path).to_pandas())
    except (OSError, ValueError, KeyError):  # damaged: the caller fits the maps again
        return None


def measure_epoch(store_path: str, out: str, field: str, region: xm.Region, epoch: dict[str, Any],
                  objects: pd.DataFrame, detected: set[int], image_shape: tuple[int, int], gain_e_per_adu: float,
                  saturation_adu: float, cfg: Any) -> pd.DataFrame:
    """The forced points of one epoch for the region's objects it did not detect.

    Parameters
    ----------
    store_path, out, field, region
        Where to read pixels and sources.
    epoch
        ``epoch, mjd, band, fwhm_px, apcorr, zp`` (a :meth:`ZeroPoint.to_dict`) of the epoch; optionally
        ``halos`` (profiles' dicts, or None to fit the window's own), in place of those the epoch's sources
        footer holds (the saturated stars' halos its extraction fitted; the stage's way).
    objects
        The region's objects (``object_id, x, y`` in the reference frame).
    detected
        Object ids the epoch detected (they get no forced point).
    image_shape
        ``(ny, nx)`` of the field's images (px).
    gain_e_per_adu, saturation_adu
        The field's detector gain (e-/ADU) and saturation level (ADU).
    cfg
        The run configuration.

    Returns
    -------
    DataFrame
        Light-curve rows (the :data:`LIGHTCURVES` columns), one per forced point; ``attrs``
        holds ``flux_scale`` (the anchors' median detected / forced flux, applied; 1 with fewer
        than :data:`ANCHOR_MIN` anchors), ``n_anchors`` and ``frame`` (the epoch's
        :class:`~survey_proc.catalog.frame_map.FrameMap`).

    Raises
    ------
    SurveyProcError
        When the epoch's frame cannot be mapped or its pixels read (the caller records it).
    """
    e = int(epoch["epoch"])
    fmap, src = _epoch_frame(out, field, e, region, cfg.forced)
    xe, ye = fmap(objects["x"].to_numpy(float), objects["y"].to_numpy(float))
    ny, nx = image_shape
    inside = (xe >= 0) & (xe <= nx - 1) & (ye >= 0) & (ye <= ny - 1)
    want = ~objects["object_id"].isin(detected).to_numpy() & inside
    if not want.any():
        empty = pd.DataFrame(columns=LIGHTCURVES.names)
        empty.attrs["frame"] = fmap
        return empty
    fwhm = float(epoch["fwhm_px"])
    halos = epoch["halos"] if "halos" in epoch else src.attrs.get("halos")
    pad = max(2.0 * cfg.detection.bkg_mesh_px, cfg.photometry.aperture_fwhm * fwhm + 4.0)
    # the window spans every object of the region (not only the undetected ones): the background mesh sees the
    # same surroundings epoch after epoch, whichever objects were missed
    y0, y1, x0, x1 = _window(xe[inside], ye[inside], pad, ny, nx)
    image, mask = store.read_window(store_path, field, e, y0, y1, x0, x1)
    sx, sy = src["x"].to_numpy(float) - x0, src["y"].to_numpy(float) - y0
    near = (sx >= -pad) & (sx < x1 - x0 + pad) & (sy >= -pad) & (sy < y1 - y0 + pad)
    # anchors: the window's bright clean detections, measured the same way at their own positions
    h, w = image.shape
    anchor = (near & (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
              & ((src["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0) & (src["snr"].to_numpy() >= ANCHOR_SNR_MIN))
    i_anchor = np.flatnonzero(anchor)
    i_anchor = i_anchor[np.argsort(-src["snr"].to_numpy()[i_anchor], kind="stable")[:ANCHOR_MAX]]
    n_want = int(want.sum())
    res = forced_aperture(image, mask, np.r_[xe[want] - x0, sx[i_anchor]], np.r_[ye[want] - y0, sy[i_anchor]],
                          fwhm_px=fwhm, apcorr=float(epoch["apcorr"]), gain_e_per_adu=gain_e_per_adu,
                          saturation_adu=saturation_adu, detection=cfg.detection, photometry=cfg.photometry,
                          detections=(sx[near], sy[near], src["peak_adu"].to_numpy(float)[near]),
                          neighbours=((sx[near], sy[near], src["flux"].to_numpy(float)[near])
                                      if cfg.forced.subtract_neighbours else None),
                          neighbour_exclude_px=cfg.forced.neighbour_exclude_fwhm * fwhm,
                          neighbour_beta=cfg.forced.neighbour_beta,
                          halos=None if halos is None else [HaloProfile.from_dict(h) for h in halos],
                          origin_yx=(y0, x0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = src["flux"].to_numpy(float)[i_anchor] / res.flux[n_want:]
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    scale = float(np.median(ratio)) if len(ratio) >= ANCHOR_MIN else 1.0
    flux, flux_err = res.flux[:n_want] * scale, res.flux_err[:n_want] * scale
    pts = pd.DataFrame({"flux": flux, "flux_err": flux_err, "flags": res.flags[:n_want]})
    pts["mag_inst"], pts["mag_inst_err"] = instrumental_mag(flux, flux_err)
    apply_zeropoint(pts, ZeroPoint.from_dict(epoch["zp"]))
    out_df = pd.DataFrame({
        "object_id": objects["object_id"].to_numpy()[want], "field": field, "epoch": np.int32(e),
        "mjd": float(epoch["mjd"]), "mag": pts["mag"].to_numpy(), "mag_err": pts["mag_err"].to_numpy(),
        "flux": flux, "flux_err": flux_err, "flags": pts["flags"].to_numpy().astype(np.int32),
        "source_id": pd.array([pd.NA] * n_want, dtype="Int64"), "band": str(epoch.get("band", "")),
    })
    out_df.attrs["flux_scale"] = scale
    out_df.attrs["n_anchors"] = len(ratio)
    out_df.attrs["frame"] = fmap
    return out_df


def _with_forced_stats(objects: pd.DataFrame, lc: pd.DataFrame, bands: list[str]) -> pd.DataFrame:
    """``objects`` with counts and statistics over the whole light curves, classify columns reset."""
    objects = objects.copy()
    obj = lc["object_id"].to_numpy()
    forced = lc["source_id"].isna().to_numpy()
    idx = objects["object_id"].to_numpy()
    n_all = pd.Series(obj).value_counts().reindex(idx).fillna(0).to_numpy()
    n_forced = pd.Series(obj[forced]).value_counts().reindex(idx).fillna(0).to_numpy()
    objects["n_epochs"] = n_all.astype(np.int32)
    objects["n_forced"] = n_forced.astype(np.int32)
    objects["n_detected"] = (n_all - n_forced).astype(np.int32)
    stats = xm.object_stats(lc.rename(columns={"object_id": "obj"}), bands).reindex(idx)
    for c in stats.columns:
        if c == "band":
            objects[c] = stats[c].fillna("").astype(str).to_numpy()
        elif c == "n_good" or c.startswith("n_good_"):
            objects[c] = stats[c].fillna(0).astype(np.int32).to_numpy()
        else:
            objects[c] = stats[c].to_numpy()
    for c in CLASSIFY_COLUMNS:
        objects[c] = np.int32(0) if c == "n_points_classified" else np.nan
    objects["var_class"] = pd.Series([None] * len(objects), dtype=object, index=objects.index)
    return objects


@worker_task
def forced_region_task(store_path: str, out: str, field: str, region: xm.Region, epochs: list[dict[str, Any]],
                       image_shape: tuple[int, int], gain_e_per_adu: float, saturation_adu: float, cfg_json: str,
                       forced_fingerprint: str, bands: list[str] | None = None) -> dict[str, Any]:
    """Add the forced points of every epoch to one region's light curves; rewrite its light curves and objects.

    Parameters
    ----------
    store_path, out, field, region
        The store, the output directory and the region.
    epochs
        The field's calibrated epochs (:func:`measure_epoch`'s ``epoch`` dicts).
    image_shape, gain_e_per_adu, saturation_adu
        The field's image size ``(ny, nx)`` (px), gain (e-/ADU) and saturation (ADU).
    cfg_json
        The run configuration as JSON.
    forced_fingerprint
        Recorded in both files' footers (the done-check).
    bands
        The store's bands (the objects' per-band columns).

    Returns
    -------
    dict
        The region's record: the cross-match record plus ``forced`` (counts, skipped epochs, time).
    """
    t0 = time.perf_counter()
    cfg = task_config(cfg_json)
    lpath = LIGHTCURVES_UNIT.path(out, field=field, region=region.index)
    opath = OBJECTS_UNIT.path(out, field=field, region=region.index)
    lrec = LIGHTCURVES_UNIT.record(out, field=field, region=region.index)
    orec = OBJECTS_UNIT.record(out, field=field, region=region.index)
    if lrec is None or orec is None:
        raise SurveyProcError(f"{opath if orec is None else lpath}: missing or unreadable; re-run to cross-match "
                              f"field {field} region {region.index}")
    lc = storage.read_table(lpath).to_pandas()
    objects = storage.read_table(opath).to_pandas()
    lc = lc[lc["source_id"].notna().to_numpy()]  # forced rows of an earlier attempt: measured again
    for c in ("n_detected", "n_forced"):  # outputs of an older version
        if c not in objects.columns:
            objects[c] = np.int32(0)
    parts = [lc]
    skipped: dict[int, str] = {}
    n_epochs = 0
    scales: list[float] = []
    frames: dict[int, FrameMap] = {}
    if cfg.forced.enabled and len(objects):
        by_epoch = lc.groupby("epoch")["object_id"].agg(set).to_dict()
        for ep in epochs:
            e = int(ep["epoch"])
            try:
                pts = measure_epoch(store_path, out, field, region, ep, objects, by_epoch.get(e, set()), image_shape,
                                    gain_e_per_adu, saturation_adu, cfg)
            except SurveyProcError as exc:  # an epoch without a frame map or pixels: the others go on
                skipped[e] = str(exc)
                continue
            n_epochs += 1
            if "frame" in pts.attrs:  # popped: pd.concat compares the parts' attrs (a map's arrays cannot be)
                frames[e] = pts.attrs.pop("frame")
            if "flux_scale" in pts.attrs:
                scales.append(float(pts.attrs["flux_scale"]))
            if len(pts):
                parts.append(pts)
    full = pd.concat([p.astype({"source_id": "Int64"}) for p in parts], ignore_index=True)
    full["field"] = field
    full = full.sort_values(["object_id", "mjd"], kind="stable").reset_index(drop=True)
    objects = _with_forced_stats(objects, full, bands or [])
    n_forced = int(full["source_id"].isna().sum())
    info = {"enabled": cfg.forced.enabled, "n_points": n_forced, "n_epochs_measured": n_epochs,
            "n_epochs_skipped": len(skipped),
            "epochs_skipped": {str(k): v for k, v in sorted(skipped.items())[:MAX_REASONS]},
            "flux_scale": ({"median": float(np.median(scales)), "min": float(np.min(scales)),
                            "max": float(np.max(scales))} if scales else None),
            "wall_s": time.perf_counter() - t0}
    base = {k: v for k, v in orec.items() if k not in CLASSIFY_KEYS}
    record = {**base, "forced_fingerprint": forced_fingerprint, "forced": info}
    # frames, then light curves: the region is done only when its objects file carries the fingerprint too
    fpath = FRAMES_UNIT.path(out, field=field, region=region.index)
    write_parquet_atomic(frames_to_table(frames), FRAME_TABLE_SCHEMA, fpath,
                         {"forced_fingerprint": forced_fingerprint, "digest": lrec.get("digest"),
                          "n_epochs": len(frames)})
    write_parquet_atomic(full, LIGHTCURVES, lpath, {**{k: v for k, v in lrec.items() if k not in CLASSIFY_KEYS},
                                                    "forced_fingerprint": forced_fingerprint, "forced": info})
    write_parquet_atomic(objects, objects_schema(bands or []), opath, record)
    return record


class ForcedStage(Stage):
    """Forced photometry of every object in the epochs that did not detect it, per (field, region)."""

    name = "forced"
    unit = OBJECTS_UNIT
    also_writes = (LIGHTCURVES_UNIT, FRAMES_UNIT)
    config_sections = ("forced", "photometry", "detection")

    def done(self, ctx: StageContext, **key: Any) -> dict[str, Any] | None:
        """Both files carry this stage's fingerprint and the cross-match digest; returns the objects record.

        With ``forced.enabled = false``, files that never had forced points are done as well.
        """
        digest = key.pop("digest")
        fp = ctx.cfg.forced_fingerprint(ctx.fingerprint)
        recs = [u.record(ctx.cfg.out, **key) for u in (LIGHTCURVES_UNIT, OBJECTS_UNIT)]
        if any(m is None or m.get("digest") != digest for m in recs):
            return None
        if all(m is not None and m.get("forced_fingerprint") == fp for m in recs):
            return recs[1]
        if not ctx.cfg.forced.enabled and all(m is not None and "forced_fingerprint" not in m for m in recs):
            return recs[1]
        return None

    def run(self, ctx: StageContext) -> None:
        """Measure every cross-matched region not yet done with this fingerprint."""
        state = ctx.state
        fp = ctx.cfg.forced_fingerprint(ctx.fingerprint)
        bands = [b for b in store.store_bands(ctx.cfg.store) if b]
        units: list[Submission] = []
        skipped = 0
        total = 0
        for p in ctx.plans:
            recs = [r for r in state.field_records(p).values() if r.calibrated]
            epochs = [{"epoch": int(r.epoch), "mjd": float(r.mjd), "band": r.band, "fwhm_px": float(r.fwhm_px),
                       "apcorr": float(r.apcorr), "zp": r.zp.to_dict()} for r in recs]
            for reg in p.regions:
                xrec = state.regions.get((p.field, reg.index))
                if xrec is None:
                    continue
                total += 1
                rec = self.done(ctx, field=p.field, region=reg.index, digest=xrec.get("digest"))
                if rec is not None:
                    skipped += 1
                    state.regions[(p.field, reg.index)] = rec
                    continue
                units.append(Submission({"field": p.field, "region": reg.index}, forced_region_task,
                                        (ctx.cfg.store, ctx.cfg.out, p.field, reg, epochs, (p.ny, p.nx),
                                         p.gain_e_per_adu, p.saturation_adu, ctx.cfg_json, fp, bands)))
        bar = ctx.bar(self.name, total, skipped)
        state.counts["forced_regions_skipped_resume"] = skipped

        def done(key: dict[str, Any], rec: dict[str, Any]) -> None:
            state.regions[(key["field"], key["region"])] = rec

        ctx.map(self.name, units, done, bar)

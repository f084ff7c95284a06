"""Worker-side task functions: each takes paths and small arguments, reads its own inputs,
writes its own unit atomically, and returns a small record.

They know nothing of the task graph (see :mod:`survey_proc.distributed.pipeline`), and
the science they call knows nothing of Dask.
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from survey_proc import store
from survey_proc.catalog import calibrate as cal
from survey_proc.catalog import crossmatch as xm
from survey_proc.catalog.astrometry import parse_wcs, pixel_to_world, world_to_pixel
from survey_proc.catalog.extract import (
    BlockInfo,
    epoch_pixel_problem,
    extract_block,
    extract_block_pnet,
)
from survey_proc.catalog.merge import merge_epoch
from survey_proc.catalog.schema import CLASSIFY_COLUMNS, LIGHTCURVES, OBJECTS, SOURCES
from survey_proc.config import RunConfig, config_from_json
from survey_proc.errors import SurveyProcError
from survey_proc.outputs import OutputLayout, read_meta, write_parquet_atomic
from survey_proc.photometry.measure import block_seed
from survey_proc.tiling import Tile


@functools.lru_cache(maxsize=8)
def _config(cfg_json: str) -> RunConfig:
    import json

    return config_from_json(json.loads(cfg_json))


@functools.lru_cache(maxsize=8)
def reference_in_frame(path: str, ref_wcs_text: str) -> pd.DataFrame:
    """A reference catalogue (ra, dec, mag, mag_err) projected into a field's reference frame.

    Catalogues that already carry ``x_ref``/``y_ref`` (the internal reference) are used as
    they are. Cached per worker process.
    """
    ref = pd.read_parquet(path)
    if {"x_ref", "y_ref"} <= set(ref.columns):
        return ref
    w = parse_wcs(ref_wcs_text)
    if w is None:
        return ref.assign(x_ref=np.nan, y_ref=np.nan)
    x, y = world_to_pixel(w, ref["ra"].to_numpy(), ref["dec"].to_numpy())
    return ref.assign(x_ref=x, y_ref=y)


# ------------------------------------------------------------------ extraction
def extract_block_task(store_path: str, field: str, epoch: int, tiles: list[Tile], window: tuple[int, int, int, int],
                       gain_e_per_adu: float, saturation_adu: float, cfg_json: str) -> tuple[pd.DataFrame, dict]:
    """Read one block's window of one epoch and return its owned detections and a BlockInfo dict."""
    t0 = time.perf_counter()
    cfg = _config(cfg_json)
    y0, y1, x0, x1 = window
    image, mask = store.read_window(store_path, field, epoch, y0, y1, x0, x1)
    t_read = time.perf_counter() - t0
    try:
        bpnn = None
        if cfg.bpnn.enabled:
            from survey_proc.distributed.plugins import worker_bpnn

            bpnn = worker_bpnn(cfg.bpnn.weights or None)
        seed = block_seed(cfg.bpnn.seed, epoch, (y0, x0))
        if cfg.detector == "pnet":
            from survey_proc.distributed.plugins import worker_detector

            df, info = extract_block_pnet(image, mask, (y0, x0), tiles, gain_e_per_adu, saturation_adu, cfg,
                                          worker_detector(cfg.pnet.weights or None), bpnn, seed=seed)
        else:
            df, info = extract_block(image, mask, (y0, x0), tiles, gain_e_per_adu, saturation_adu, cfg, bpnn,
                                     seed=seed)
    except SurveyProcError as exc:
        raise SurveyProcError(f"field {field} epoch {epoch} window {window}: {exc}") from exc
    return df, {**info.to_dict(), "read_s": t_read, "task_s": time.perf_counter() - t0}


def finalize_epoch_task(blocks: list[tuple[pd.DataFrame, dict]], out: str, field: str, field_index: int, epoch: int,
                        meta: dict[str, Any], ref_wcs_text: str, reference_path: str | None, cfg_json: str,
                        fingerprint: str, t_submit: float, saturation_adu: float = np.inf) -> dict[str, Any]:
    """Merge an epoch's blocks, add astrometry, calibrate (with an external reference), write sources.

    Returns the epoch record (also stored in the file's footer). An epoch with no measurable
    pixel (all NaN/inf/masked/saturated, or a constant image) raises and writes nothing.
    """
    t0 = time.perf_counter()
    cfg = _config(cfg_json)
    infos = [BlockInfo(**{k: v for k, v in b[1].items() if k not in ("read_s", "task_s")}) for b in blocks]
    problem = epoch_pixel_problem(infos, saturation_adu)
    if problem:
        raise SurveyProcError(f"field {field} epoch {epoch}: {problem}; the epoch is left out of this run. "
                              "Check the exposure it came from (the store's source_file) and re-ingest it")
    try:
        epoch_wcs = parse_wcs(meta["wcs"])
    except ValueError as exc:
        raise SurveyProcError(f"field {field} epoch {epoch}: the stored WCS is unusable ({exc}); "
                              "fix the epoch's wcs header text") from exc
    ref_wcs = parse_wcs(ref_wcs_text) if ref_wcs_text else None
    src, fwhm, n_dup = merge_epoch([b[0] for b in blocks], infos, field=field, field_index=field_index, epoch=epoch,
                                   mjd=meta["mjd"], epoch_wcs=epoch_wcs, ref_wcs=ref_wcs,
                                   dedup_radius_fwhm=cfg.detection.dedup_radius_fwhm,
                                   default_fwhm_px=cfg.photometry.fwhm_default_px)
    if reference_path is not None:
        ref = reference_in_frame(reference_path, ref_wcs_text)
        zp = calibrate_sources(src, ref, fwhm, cfg)
    else:
        zp = cal.ZeroPoint(np.nan, np.nan, np.nan, 0, 0, "pending")
    cal.apply_zeropoint(src, zp)
    record = {
        "unit": "sources", "field": field, "epoch": epoch, "mjd": meta["mjd"], "airmass": meta["airmass"],
        "exptime_s": meta["exptime"], "n_sources": len(src), "n_duplicates": n_dup, "fwhm_px": fwhm,
        "apcorr": float(np.median([i.apcorr for i in infos])),
        "n_apcorr_stars": int(min(i.n_apcorr_stars for i in infos)), "bkg_adu": float(np.median([i.bkg_adu for i in infos])),
        "rms_adu": float(np.median([i.rms_adu for i in infos])), "bad_px": int(sum(i.bad_px for i in infos)),
        "fallback": ",".join(sorted({i.fallback for i in infos if i.fallback})) or None,
        "has_wcs": epoch_wcs is not None, "zp": zp.to_dict(), "fingerprint": fingerprint,
        "queue_to_done_s": time.time() - t_submit, "finalize_s": time.perf_counter() - t0,
        "read_s": float(sum(b[1].get("read_s", 0.0) for b in blocks)),
        "extract_s": float(sum(b[1].get("task_s", 0.0) for b in blocks)),
    }
    write_parquet_atomic(src, SOURCES, OutputLayout(out).sources(field, epoch), record)
    return record


def _calibrators(src: pd.DataFrame, ref: pd.DataFrame, fwhm_px: float, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """:func:`calibrate.select_calibrators` on a sources table and a reference (reference frame)."""
    return cal.select_calibrators(src["x_ref"].to_numpy(), src["y_ref"].to_numpy(), src["snr"].to_numpy(),
                                  src["flags"].to_numpy(), ref["x_ref"].to_numpy(), ref["y_ref"].to_numpy(),
                                  fwhm_px, cfg.calibration, flux=src["flux"].to_numpy())


def calibrate_sources(src: pd.DataFrame, ref: pd.DataFrame, fwhm_px: float, cfg: RunConfig) -> cal.ZeroPoint:
    """Fit the epoch's zero point of ``src`` (reference frame positions) against ``ref``."""
    i_src, i_ref = _calibrators(src, ref, fwhm_px, cfg)
    return cal.fit_epoch_zeropoint(src["mag_inst"].to_numpy()[i_src], src["mag_inst_err"].to_numpy()[i_src],
                                   ref["mag"].to_numpy()[i_ref], ref["mag_err"].to_numpy()[i_ref], cfg.calibration)


def _epoch_record(path: Path, field: str, epoch: int) -> dict[str, Any]:
    """The record of a written sources unit, or an error saying how to get it back."""
    record = read_meta(path)
    if record is None:
        raise SurveyProcError(f"{path}: missing or unreadable; re-run to extract field {field} epoch {epoch}")
    return record


def recalibrate_epoch_task(out: str, field: str, epoch: int, model_zp: dict | None, reference_path: str | None,
                           ref_wcs_text: str, cfg_json: str, fingerprint: str, apcorr: float | None = None
                           ) -> dict[str, Any]:
    """Re-calibrate a written epoch and rewrite the unit atomically.

    ``apcorr`` (optional) replaces the epoch's aperture correction (fluxes are rescaled);
    then the zero point is ``model_zp`` (the cross-epoch model) or fitted against
    ``reference_path``.
    """
    cfg = _config(cfg_json)
    path = OutputLayout(out).sources(field, epoch)
    record = _epoch_record(path, field, epoch)
    src = pq.read_table(path).to_pandas()
    if apcorr is not None:
        if not cfg.bpnn.enabled:  # aperture photometry; the BPNN's magnitudes do not depend on it
            scale = apcorr / record["apcorr"]
            src["flux"] *= scale
            src["flux_err"] *= scale
            src["mag_inst"], src["mag_inst_err"] = cal.instrumental_mag(src["flux"].to_numpy(),
                                                                        src["flux_err"].to_numpy())
            src["mag_err_aleatoric"] = src["mag_inst_err"]
        record = {**record, "apcorr": apcorr, "apcorr_source": "field model"}
    if model_zp is not None:
        zp = cal.ZeroPoint(**model_zp)
    elif reference_path is not None:
        ref = reference_in_frame(reference_path, ref_wcs_text)
        zp = calibrate_sources(src, ref, record["fwhm_px"], cfg)
    else:  # only the aperture correction changed; the zero point comes later (ensemble)
        zp = cal.ZeroPoint(np.nan, np.nan, np.nan, 0, 0, "pending")
    cal.apply_zeropoint(src, zp)
    record = {**record, "zp": zp.to_dict(), "fingerprint": fingerprint}
    write_parquet_atomic(src, SOURCES, path, record)
    return record


def reference_matches_task(out: str, field: str, epoch: int, reference_path: str, cfg_json: str) -> dict[str, Any]:
    """The calibrator matches of one written epoch against a reference: indices and instrumental mags."""
    cfg = _config(cfg_json)
    path = OutputLayout(out).sources(field, epoch)
    record = _epoch_record(path, field, epoch)
    src = pq.read_table(path, columns=["x_ref", "y_ref", "snr", "flags", "flux", "mag_inst", "mag_inst_err"]).to_pandas()
    ref = reference_in_frame(reference_path, "")
    i_src, i_ref = _calibrators(src, ref, record["fwhm_px"], cfg)
    return {"epoch": epoch, "i_ref": i_ref, "mag_inst": src["mag_inst"].to_numpy()[i_src],
            "mag_inst_err": src["mag_inst_err"].to_numpy()[i_src]}


# ------------------------------------------------------------------ cross-match
XMATCH_COLUMNS = ["source_id", "epoch", "mjd", "x_ref", "y_ref", "mag", "mag_err", "flux", "flux_err", "flags"]


def inputs_digest(records: list[dict[str, Any]]) -> str:
    """Digest of the sources a cross-match reads: (epoch, rows, zero point) of each unit."""
    items = sorted((int(r["epoch"]), int(r["n_sources"]), round(float(r["zp"]["zp"]), 9)
                    if np.isfinite(r["zp"]["zp"]) else None) for r in records)
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def crossmatch_region_task(out: str, field: str, field_index: int, region: xm.Region, epochs: list[int],
                           fwhm_px: float, ref_wcs_text: str, cfg_json: str, fingerprint: str, digest: str
                           ) -> dict[str, Any]:
    """Read the region's sources over all epochs, build objects and light curves, write both units."""
    t0 = time.perf_counter()
    cfg = _config(cfg_json)
    xc = cfg.crossmatch
    layout = OutputLayout(out)
    margin = 6.0 * max(xc.match_radius_min_px, xc.match_radius_fwhm * fwhm_px, fwhm_px) + 4.0
    lo_x, hi_x = region.x0 - 0.5 - margin, region.x1 - 0.5 + margin
    lo_y, hi_y = region.y0 - 0.5 - margin, region.y1 - 0.5 + margin
    parts = []
    for e in epochs:
        t = pq.read_table(layout.sources(field, e), columns=XMATCH_COLUMNS)
        df = t.to_pandas()
        sel = (df["x_ref"] >= lo_x) & (df["x_ref"] < hi_x) & (df["y_ref"] >= lo_y) & (df["y_ref"] < hi_y)
        parts.append(df[sel.to_numpy()])
    t_read = time.perf_counter() - t0
    src = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=XMATCH_COLUMNS)
    objects, lc, info = xm.crossmatch_region(src, region, field=field, field_index=field_index, fwhm_px=fwhm_px,
                                             match_radius_fwhm=xc.match_radius_fwhm,
                                             match_radius_min_px=xc.match_radius_min_px,
                                             min_epochs=xc.min_epochs, seed_bin_px=xc.seed_bin_px)
    ref_wcs = parse_wcs(ref_wcs_text) if ref_wcs_text else None
    objects["ra"], objects["dec"] = pixel_to_world(ref_wcs, objects["x"].to_numpy(), objects["y"].to_numpy())
    record = {"unit": "crossmatch", "field": field, "region": region.index, "n_epochs_in": len(epochs),
              "digest": digest, "fingerprint": fingerprint, **info, "read_s": t_read,
              "wall_s": time.perf_counter() - t0}
    # light curves first: a region counts as done only when its objects file exists
    write_parquet_atomic(lc, LIGHTCURVES, layout.lightcurves(field, region.index), record)
    write_parquet_atomic(objects, OBJECTS, layout.objects(field, region.index), record)
    return record


def region_done(out: str | Path, field: str, region: int, fingerprint: str, digest: str) -> bool:
    """True when both units of a region exist with this configuration and these inputs."""
    layout = OutputLayout(out)
    for p in (layout.objects(field, region), layout.lightcurves(field, region)):
        m = read_meta(p)
        if m is None or m.get("fingerprint") != fingerprint or m.get("digest") != digest:
            return False
    return True


# ------------------------------------------------------------------ classify


def classify_done(out: str | Path, field: str, region: int, classify_fingerprint: str) -> bool:
    """True when the region's objects carry this classify fingerprint."""
    m = read_meta(OutputLayout(out).objects(field, region))
    return m is not None and m.get("classify_fingerprint") == classify_fingerprint


def classify_region_task(out: str, field: str, region: int, cfg_json: str, classify_fingerprint: str
                         ) -> dict[str, Any]:
    """Search and classify the light curves of one region; rewrite its objects file with the results.

    The light curves are read from ``lightcurves/``; the objects file keeps its cross-match
    record (fingerprint, digest) and gains ``classify_fingerprint`` and ``classify``.
    """
    from survey_proc.distributed.plugins import worker_classifier
    from survey_proc.lightcurves.classifier import classify
    from survey_proc.lightcurves.periodogram import search_grid
    from survey_proc.lightcurves.preprocess import PreprocessConfig, preprocess, to_matrix

    t0 = time.perf_counter()
    cfg = _config(cfg_json)
    cc = cfg.classify
    layout = OutputLayout(out)
    opath = layout.objects(field, region)
    record = read_meta(opath)
    if record is None:
        raise SurveyProcError(f"{opath}: missing or unreadable; re-run to cross-match field {field} region {region}")
    objects = pq.read_table(opath).to_pandas()
    for c in CLASSIFY_COLUMNS:  # outputs of an older version lack some of the additions
        if c not in objects.columns:
            objects[c] = 0 if c == "n_points_classified" else np.nan
    lc = pq.read_table(layout.lightcurves(field, region),
                       columns=["object_id", "epoch", "mjd", "mag", "mag_err", "flags"]).to_pandas()
    clf = worker_classifier(cc.weights or None)
    if cc.threshold > 0:
        clf = type(clf)(clf.model, cc.threshold, clf.card, clf.path, clf.device)
    info: dict[str, Any] = {"n_objects": len(objects), "n_classified": 0, "n_periodic": 0}
    if len(lc) and len(np.unique(lc["epoch"])) >= 3:
        ids, _, mjd, mag, err, flg = to_matrix(lc)
        # objects that cannot reach the minimum number of points are not even preprocessed
        need = max(cc.min_points, int(np.ceil(cc.min_fraction * len(mjd))))
        enough = np.isfinite(mag).sum(1) >= need
        ids, mag, err, flg = ids[enough], mag[enough], err[enough], flg[enough]
        batch = preprocess(ids, mjd, mag, err, flg, PreprocessConfig(clip_sigma=cc.clip_sigma,
                                                                      min_points=cc.min_points,
                                                                      min_fraction=cc.min_fraction))
        baseline = float(batch.t_days[-1] - batch.t_days[0])
        p_max = cc.period_max_days or baseline / 1.15
        if not batch.usable.any() or p_max <= cc.period_min_days:
            info["not_searched"] = (f"no light curve with {need} points" if not batch.usable.any() else
                                    f"baseline {baseline:.3f} d too short for periods >= {cc.period_min_days} d")
            batch = batch.subset(np.zeros(len(batch), bool))
        if len(batch) == 0:
            info["wall_s"] = time.perf_counter() - t0
            write_parquet_atomic(objects, OBJECTS, opath,
                                 {**record, "classify_fingerprint": classify_fingerprint, "classify": info})
            return {"field": field, "region": region, **info}
        grid = search_grid(batch.t_days, period_min_days=cc.period_min_days, period_max_days=p_max)
        res = classify(batch, clf, grid).set_index("object_id")
        res["n_points_classified"] = batch.n_points.astype(np.int32)
        res = res.rename(columns={"chi2_red": "_chi2_red"})
        idx = objects["object_id"].to_numpy()
        for c in CLASSIFY_COLUMNS:
            if c in res.columns:
                vals = res[c].reindex(idx)
                objects[c] = vals.to_numpy() if c != "n_points_classified" else vals.fillna(0).astype(np.int32).to_numpy()
        info.update(n_classified=int(batch.usable.sum()),
                    n_periodic=int(np.isin(res["var_class"].to_numpy(), ("eclipsing_binary", "pulsator",
                                                                          "transit")).sum()),
                    classes={str(k): int(v) for k, v in res["var_class"].value_counts().items()},
                    baseline_days=float(grid.baseline_days), n_bls_freq=len(grid.bls_freq),
                    n_ls_freq=len(grid.ls_freq))
    info["wall_s"] = time.perf_counter() - t0
    record = {**record, "classify_fingerprint": classify_fingerprint, "classify": info}
    write_parquet_atomic(objects, OBJECTS, opath, record)
    return {"field": field, "region": region, **info}


# ------------------------------------------------------------------ registration (epochs without a WCS)
def refine_wcs_task(out: str, field: str, epoch: int, ref_wcs_text: str, reference_path: str, cfg_json: str,
                    fingerprint: str) -> dict[str, Any]:
    """An epoch whose WCS matched too few reference stars (a rough WCS): register its
    reference-frame positions to the reference catalogue and fit the zero point again.

    When the registration fails or finds no correction (< 0.5 px anywhere), the unit is left
    as it was and the record says why (``wcs_refinement``).
    """
    from survey_proc import vocab as F
    from survey_proc.catalog.registration import RegistrationError, register

    cfg = _config(cfg_json)
    path = OutputLayout(out).sources(field, epoch)
    record = _epoch_record(path, field, epoch)
    src = pq.read_table(path).to_pandas()
    ref = reference_in_frame(reference_path, ref_wcs_text)
    ref = ref[np.isfinite(ref["x_ref"]) & np.isfinite(ref["y_ref"])]
    good = ((src["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0) & np.isfinite(src["x_ref"].to_numpy())
    try:
        reg = register(src[["x_ref", "y_ref"]].to_numpy()[good], src["flux"].to_numpy()[good],
                       ref[["x_ref", "y_ref"]].to_numpy(), 10 ** (-0.4 * ref["mag"].to_numpy()),
                       match_radius_px=max(1.0, 0.75 * float(record["fwhm_px"])), snr=src["snr"].to_numpy()[good])
    except RegistrationError as exc:
        record = {**record, "wcs_refinement": f"not refined: {exc}"}
        write_parquet_atomic(src, SOURCES, path, record)
        return record
    x0, y0 = src["x_ref"].to_numpy(float), src["y_ref"].to_numpy(float)
    x1, y1 = reg.apply(x0, y0)
    if np.nanmax(np.hypot(x1 - x0, y1 - y0)) < 0.5:  # a good WCS with few reference stars: leave it
        record = {**record, "wcs_refinement": "not refined: the WCS agrees with the reference catalogue to 0.5 px"}
        write_parquet_atomic(src, SOURCES, path, record)
        return record
    src["x_ref"], src["y_ref"] = x1, y1
    ref_wcs = parse_wcs(ref_wcs_text) if ref_wcs_text else None
    src["ra"], src["dec"] = pixel_to_world(ref_wcs, x1, y1)
    zp = calibrate_sources(src, ref, record["fwhm_px"], cfg)
    cal.apply_zeropoint(src, zp)
    record = {**record, "zp": zp.to_dict(), "registration": {**reg.to_dict(), "reference_epoch": None,
                                                              "against": "reference catalogue"},
              "wcs_refinement": "refined against the reference catalogue", "fingerprint": fingerprint}
    write_parquet_atomic(src, SOURCES, path, record)
    return record


def register_epoch_task(out: str, field: str, epoch: int, ref_epoch: int, ref_wcs_text: str,
                        reference_path: str | None, cfg_json: str, fingerprint: str) -> dict[str, Any]:
    """Register an epoch without a WCS to the reference epoch's sources; rewrite its positions.

    The epoch's clean sources are matched to the reference epoch's (``catalog/registration.py``);
    ``x_ref``/``y_ref`` become the affine transform of ``x``/``y``, ``ra``/``dec`` follow from
    the reference WCS when there is one, and with a reference catalogue the zero point is
    fitted again. The record gains ``registration`` (matrix, stars, residual RMS).
    """
    from survey_proc import vocab as F
    from survey_proc.catalog.registration import RegistrationError, register

    cfg = _config(cfg_json)
    layout = OutputLayout(out)
    path = layout.sources(field, epoch)
    record = _epoch_record(path, field, epoch)
    src = pq.read_table(path).to_pandas()
    ref = pq.read_table(layout.sources(field, ref_epoch), columns=["x_ref", "y_ref", "flux", "flags"]).to_pandas()
    good = (src["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0
    rgood = (ref["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0
    try:
        reg = register(src[["x", "y"]].to_numpy()[good], src["flux"].to_numpy()[good],
                       ref[["x_ref", "y_ref"]].to_numpy()[rgood], ref["flux"].to_numpy()[rgood],
                       match_radius_px=max(1.0, 0.75 * float(record["fwhm_px"])), snr=src["snr"].to_numpy()[good])
    except RegistrationError as exc:
        raise SurveyProcError(f"field {field} epoch {epoch}: no WCS and registration to epoch {ref_epoch} "
                              f"failed ({exc}); add a WCS to the epoch or exclude it") from None
    src["x_ref"], src["y_ref"] = reg.apply(src["x"].to_numpy(float), src["y"].to_numpy(float))
    ref_wcs = parse_wcs(ref_wcs_text) if ref_wcs_text else None
    src["ra"], src["dec"] = pixel_to_world(ref_wcs, src["x_ref"].to_numpy(), src["y_ref"].to_numpy())
    zp = cal.ZeroPoint(**record["zp"])
    if reference_path is not None and ref_wcs is not None:
        zp = calibrate_sources(src, reference_in_frame(reference_path, ref_wcs_text), record["fwhm_px"], cfg)
        cal.apply_zeropoint(src, zp)
    record = {**record, "zp": zp.to_dict(), "registration": {**reg.to_dict(), "reference_epoch": ref_epoch},
              "fingerprint": fingerprint}
    write_parquet_atomic(src, SOURCES, path, record)
    return record

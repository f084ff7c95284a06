"""The task graph of ``survey-proc run``: plan, submit, resume, record.

Stages, in order, each with its own progress bar:

1. **extract**: per (field, epoch), one task per block of tiles (reads its own pixels from
   Zarr) and one finalize task that merges the blocks, de-duplicates borders, adds
   astrometry, fits the zero point against the reference catalogue and writes
   ``sources/field=F/epoch=E.parquet``.
2. **register**: per epoch without a WCS, its sources are registered to the reference
   epoch's (the epoch with a WCS, else any, with most detections) by asterism matching
   (``catalog/registration.py``); positions and, with a reference catalogue, the zero point
   are rewritten; the residual RMS goes to run.json (``registration``). An epoch *with* a
   WCS that matched fewer than ``calibration.min_stars`` reference stars (a rough WCS) is
   registered the same way against the reference catalogue.
3. **calibrate**: per field, the cross-epoch zero-point model (with airmass term). Without
   a reference catalogue, every epoch is first calibrated against the stable stars of a
   reference epoch (the one with most detections). Epochs with too few reference stars
   take the model's zero point. Affected units are rewritten atomically. Writes
   ``epochs.parquet``.
4. **crossmatch**: per (field, region), objects and light curves.
5. **classify**: per (field, region), the periodic-variable search and classifier
   (``survey_proc/lightcurves``) on the worker's device; rewrites the region's objects
   with period, class and probabilities. It has its own fingerprint (the run's, its
   ``[classify]`` settings and the classifier's weights), so a new classifier re-runs only
   this stage on a resumed output.

Resume: a unit whose file exists with this run's configuration fingerprint (and, for
regions, the same inputs digest) is skipped. Failures of single units (a corrupt chunk, an
unusable WCS) are recorded in run.json and the run goes on; later stages use what exists.
"""

from __future__ import annotations

import json
import platform
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from survey_proc import __version__, store
from survey_proc.catalog import calibrate as cal
from survey_proc.catalog.crossmatch import Region, region_grid
from survey_proc.config import RunConfig
from survey_proc.distributed import tasks
from survey_proc.errors import ConfigError, SurveyProcError
from survey_proc.outputs import (
    OutputLayout,
    clean_temporaries,
    prepare,
    read_meta,
    write_json_atomic,
    write_parquet_atomic,
)
from survey_proc.tiling import block_window, tile_blocks, tile_grid

REFERENCE_COLUMNS = ("ra", "dec", "mag", "mag_err")


@dataclass
class FieldPlan:
    """What a run does with one field."""

    field: str
    index: int  # position in the store's sorted field list (part of source/object ids)
    n_epochs: int  # epochs processed: the first n of the store
    ny: int
    nx: int
    gain_e_per_adu: float
    saturation_adu: float
    zeropoint_nominal: float
    ref_wcs_text: str
    epoch_meta: list[dict[str, Any]]
    blocks: list[tuple[list, tuple[int, int, int, int]]]  # (tiles, window)
    regions: list[Region]
    unusable: dict[int, str] = field(default_factory=dict)  # epoch -> why its metadata make it unusable


@dataclass
class RunState:
    """What the driver learns while the run goes (becomes run.json)."""

    records: dict[tuple[str, int], dict] = field(default_factory=dict)  # (field, epoch) -> sources record
    regions: dict[tuple[str, int], dict] = field(default_factory=dict)
    classified: dict[tuple[str, int], dict] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)  # quarantined units, after their retries
    retried: list[dict] = field(default_factory=list)  # units that succeeded on a retry
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, dict] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"survey_proc": __version__, "python": platform.python_version()}
    for name in ("numpy", "dask", "distributed", "zarr", "xarray", "sep", "astropy", "pyarrow", "pandas", "scipy",
                 "torch"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def resolve_reference(cfg: RunConfig) -> Path | None:
    """The reference catalogue to use (``--reference`` or the store's), checked; None: relative calibration.

    ``--reference none`` asks for relative calibration even when the store names a catalogue.
    """
    if cfg.reference is not None and cfg.reference.lower() == "none":
        return None
    path = Path(cfg.reference) if cfg.reference else store.reference_catalog_path(cfg.store)
    if path is None:
        return None
    if not path.exists():
        src = "--reference" if cfg.reference else f"the store's reference_catalog attribute ({cfg.store})"
        raise ConfigError(f"reference catalogue {path} (from {src}) does not exist; pass --reference PATH "
                          "or remove the attribute to calibrate relative to a reference epoch")
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:
        raise ConfigError(f"reference catalogue {path} is not a readable Parquet file ({exc})") from None
    missing = [c for c in REFERENCE_COLUMNS if c not in names]
    if missing:
        raise ConfigError(f"reference catalogue {path} lacks column(s) {', '.join(missing)}; "
                          f"it needs {', '.join(REFERENCE_COLUMNS)} (deg, deg, mag, mag)")
    if pq.read_metadata(path).num_rows == 0:
        raise ConfigError(f"reference catalogue {path} has no rows; pass a catalogue of the field's stars with "
                          "--reference PATH, or --reference none to calibrate relative to a reference epoch")
    return path.resolve()


def check_reference_overlap(reference: Path, plans: list[FieldPlan]) -> None:
    """Refuse a reference catalogue with no star inside a field (a field without a WCS is not checked)."""
    for p in plans:
        if not p.ref_wcs_text:
            continue
        ref = tasks.reference_in_frame(str(reference), p.ref_wcs_text)
        x, y = ref["x_ref"].to_numpy(), ref["y_ref"].to_numpy()
        if not np.any((x >= -0.5) & (x < p.nx - 0.5) & (y >= -0.5) & (y < p.ny - 0.5)):
            from survey_proc.catalog.astrometry import parse_wcs, pixel_to_world

            ra, dec = pixel_to_world(parse_wcs(p.ref_wcs_text), np.array([(p.nx - 1) / 2]), np.array([(p.ny - 1) / 2]))
            raise ConfigError(
                f"reference catalogue {reference} has no star inside field {p.field} (centre RA {ra[0]:.4f}, "
                f"Dec {dec[0]:.4f} deg; the catalogue spans RA {ref['ra'].min():.4f}..{ref['ra'].max():.4f}, "
                f"Dec {ref['dec'].min():.4f}..{ref['dec'].max():.4f}); pass a catalogue that covers the field, "
                "or --reference none to calibrate relative to a reference epoch")


def plan_fields(cfg: RunConfig) -> list[FieldPlan]:
    """One :class:`FieldPlan` per field to process."""
    all_fields = store.list_fields(cfg.store)
    if not all_fields:
        raise SurveyProcError(f"{cfg.store}: the store has no fields")
    wanted = list(cfg.fields) if cfg.fields else all_fields
    unknown = [f for f in wanted if f not in all_fields]
    if unknown:
        raise ConfigError(f"--fields {', '.join(unknown)}: not in {cfg.store} (it has {', '.join(all_fields)})")
    plans = []
    for fid in wanted:
        attrs = store.field_attrs(cfg.store, fid)
        n_total, ny, nx = store.image_shape(cfg.store, fid)
        n = n_total if cfg.epochs is None else min(cfg.epochs, n_total)
        table = store.read_epoch_table(cfg.store, fid)
        metas = [{"mjd": float(table["mjd"][e]), "exptime": float(table["exptime"][e]),
                  "airmass": float(table["airmass"][e]), "wcs": str(table["wcs"][e])} for e in range(n)]
        ref_wcs = attrs.get("reference_wcs") or next((m["wcs"] for m in metas if m["wcs"]), "")
        _, cy, cx = store.image_chunks(cfg.store, fid)
        tiles = tile_grid(ny, nx, cfg.tile_px, cfg.halo_px)
        blocks = [(b, block_window(b)) for b in tile_blocks(tiles, cfg.tiles_per_task, (cy, cx))]
        unusable = store.epoch_problems(table["mjd"][:n].astype(float), table["exptime"][:n].astype(float))
        plans.append(FieldPlan(fid, all_fields.index(fid), n, ny, nx, float(attrs["gain_e_per_adu"]),
                               float(attrs.get("saturation_adu", np.inf)), float(attrs["zeropoint_nominal"]),
                               ref_wcs, metas, blocks, region_grid(ny, nx, cfg.crossmatch.region_px), unusable))
    return plans


class _Bars:
    """One rich progress bar per stage (disabled when progress is off)."""

    def __init__(self, enabled: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), disable=not enabled)

    def __enter__(self) -> _Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def add(self, name: str, total: int, done: int = 0) -> Any:
        return self.progress.add_task(name, total=total, completed=done)

    def advance(self, task: Any) -> None:
        self.progress.advance(task)


def _unit(client: Any, unit: dict, fn: Any, *args: Any) -> tuple[Any, dict]:
    """Submit ``fn(*args)`` for ``unit``; returns (future, unit that knows how to submit it again)."""
    def again(attempt: int) -> Any:
        return client.submit(fn, *args, pure=False)

    return again(1), {**unit, "_again": again}


def _gather(client: Any, futures: dict[Any, dict], bars: _Bars, bar: Any, state: RunState, stage: str,
            on_result: Any, max_attempts: int) -> None:
    """Wait for futures (future -> unit), record results; retry, then quarantine, failed units.

    A unit may carry ``"_again"``: a callable that submits it once more (argument: the attempt
    number). A unit
    that fails is resubmitted until it has been tried ``max_attempts`` times; after that it
    is quarantined: recorded in ``state.failures`` (stage, unit, last error, attempts) and
    left out of later stages, while the rest of the run goes on. A unit that succeeded only
    on a retry is recorded in ``state.retried`` with the errors of its failed attempts.
    """
    from distributed import as_completed

    pending = as_completed(list(futures))
    for fut in pending:
        unit = futures.pop(fut)
        attempt = unit.get("_attempt", 1)
        public = {k: v for k, v in unit.items() if not k.startswith("_")}
        try:
            result = fut.result()
            on_result(public, result)
        except Exception as exc:  # a failed unit must not stop the run
            error = f"{type(exc).__name__}: {exc}"
            if unit.get("_again") is not None and attempt < max_attempts:
                retry = unit["_again"](attempt + 1)
                futures[retry] = {**unit, "_attempt": attempt + 1, "_errors": [*unit.get("_errors", []), error]}
                pending.add(retry)
                fut.release()
                continue
            state.failures.append({"stage": stage, **public, "error": error, "attempts": attempt})
        else:
            if attempt > 1:
                state.retried.append({"stage": stage, **public, "attempts": attempt, "errors": unit["_errors"]})
        fut.release()
        if bar is not None:
            bars.advance(bar)


def _stage_extract(client: Any, cfg: RunConfig, plans: list[FieldPlan], reference: Path | None, fp: str,
                   state: RunState, bars: _Bars, run_token: str) -> None:
    layout = OutputLayout(cfg.out)
    cfg_json = json.dumps(cfg.to_dict())
    todo = []
    for p in plans:
        for e, why in p.unusable.items():  # not submitted: no retry can give it a time or an exposure
            state.failures.append({"stage": "extract", "field": p.field, "epoch": e, "attempts": 0,
                                   "error": f"{cfg.store}: field {p.field}, {why}; the epoch is left out. Fix the "
                                            "store's metadata (or re-ingest the exposure) and run again"})
        for e in range(p.n_epochs):
            if e in p.unusable:
                continue
            rec = read_meta(layout.sources(p.field, e))
            if rec is not None and rec.get("fingerprint") == fp:
                state.records[(p.field, e)] = rec
            else:
                todo.append((p, e))
    total = sum(p.n_epochs - len(p.unusable) for p in plans)
    bar = bars.add("extract", total, total - len(todo))
    state.counts["epochs_skipped_resume"] = total - len(todo)
    def submit(p: FieldPlan, e: int, attempt: int) -> Any:
        tag = f"{run_token}-a{attempt}"
        blocks = [client.submit(tasks.extract_block_task, cfg.store, p.field, e, tiles, window, p.gain_e_per_adu,
                                p.saturation_adu, cfg_json, key=f"extract-{p.field}-{e}-{b}-{tag}")
                  for b, (tiles, window) in enumerate(p.blocks)]
        return client.submit(tasks.finalize_epoch_task, blocks, cfg.out, p.field, p.index, e, p.epoch_meta[e],
                             p.ref_wcs_text, str(reference) if reference else None, cfg_json, fp, time.time(),
                             p.saturation_adu, key=f"epoch-{p.field}-{e}-{tag}")

    futures: dict[Any, dict] = {}
    for p, e in todo:
        futures[submit(p, e, 1)] = {"field": p.field, "epoch": e, "_again": lambda a, p=p, e=e: submit(p, e, a)}

    def done(unit: dict, rec: dict) -> None:
        state.records[(unit["field"], unit["epoch"])] = rec

    _gather(client, futures, bars, bar, state, "extract", done, cfg.retries + 1)


def _stage_register(client: Any, cfg: RunConfig, plans: list[FieldPlan], reference: Path | None, fp: str,
                    state: RunState, bars: _Bars) -> None:
    cfg_json = json.dumps(cfg.to_dict())
    futures: dict[Any, dict] = {}
    for p in plans:
        recs = {e: state.records[(p.field, e)] for e in range(p.n_epochs) if (p.field, e) in state.records}
        if reference is not None and p.ref_wcs_text:
            # a WCS that matched too few reference stars is probably rough: refine it against the catalogue
            rough = [e for e, r in recs.items() if r.get("has_wcs", True) and "wcs_refinement" not in r
                     and r["zp"]["n_candidates"] < cfg.calibration.min_stars]
            for e in rough:
                fut, unit = _unit(client, {"field": p.field, "epoch": e}, tasks.refine_wcs_task, cfg.out, p.field, e,
                                  p.ref_wcs_text, str(reference), cfg_json, fp)
                futures[fut] = unit
        todo = [e for e, r in recs.items() if not r.get("has_wcs", True) and "registration" not in r]
        if not todo:
            continue
        with_wcs = [e for e, r in recs.items() if r.get("has_wcs", True)]
        earlier = {r["registration"]["reference_epoch"] for r in recs.values() if "registration" in r}
        if earlier and not with_wcs:  # a resumed run keeps the frame it started with
            ref_epoch = min(earlier)
        else:
            ref_epoch = max(sorted(with_wcs or recs), key=lambda e: recs[e]["n_sources"])
        if ref_epoch in todo:  # no epoch has a WCS: the reference epoch's pixels are the frame
            todo.remove(ref_epoch)
            rec = dict(recs[ref_epoch])
            rec["registration"] = {"reference_epoch": ref_epoch, "rms_px": 0.0, "n_stars": rec["n_sources"],
                                   "matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]}
            state.records[(p.field, ref_epoch)] = rec
        for e in todo:
            fut, unit = _unit(client, {"field": p.field, "epoch": e}, tasks.register_epoch_task, cfg.out, p.field, e,
                              ref_epoch, p.ref_wcs_text, str(reference) if reference else None, cfg_json, fp)
            futures[fut] = unit
    if not futures:
        return
    bar = bars.add("register", len(futures))
    n_fail = len(state.failures)

    def done(unit: dict, rec: dict) -> None:
        state.records[(unit["field"], unit["epoch"])] = rec

    _gather(client, futures, bars, bar, state, "register", done, cfg.retries + 1)
    for f in state.failures[n_fail:]:  # an unregistered epoch must not reach the cross-match
        state.records.pop((f["field"], f["epoch"]), None)


def _apcorr_model(recs: dict[int, dict]) -> dict[str, Any]:
    """Aperture correction as a linear function of FWHM over the epochs that measured it."""
    good = [(r["fwhm_px"], r["apcorr"]) for r in recs.values()
            if r.get("n_apcorr_stars", 0) >= 5 and r.get("apcorr_source") != "field model"]
    if not good:
        return {"coef": [0.0, 1.0], "n": 0}
    f, a = np.array(good).T
    if len(good) >= 5 and np.ptp(f) > 0.05:
        coef = np.polyfit(f, a, 1)
        res = a - np.polyval(coef, f)
        keep = np.abs(res) <= 3 * max(1.4826 * np.median(np.abs(res)), 1e-3)
        coef = np.polyfit(f[keep], a[keep], 1)
    else:
        coef = np.array([0.0, float(np.median(a))])
    return {"coef": [float(c) for c in coef], "n": len(good)}


def _choose_reference_epoch(cfg: RunConfig, recs: dict[int, dict]) -> int:
    if cfg.calibration.reference_epoch is not None:
        if cfg.calibration.reference_epoch not in recs:
            raise ConfigError(f"calibration.reference_epoch = {cfg.calibration.reference_epoch} was not extracted "
                              f"in this run (epochs 0..{max(recs)})")
        return cfg.calibration.reference_epoch
    return max(sorted(recs), key=lambda e: recs[e]["n_sources"])


def _stage_calibrate(client: Any, cfg: RunConfig, plans: list[FieldPlan], reference: Path | None, fp: str,
                     state: RunState, bars: _Bars) -> None:
    layout = OutputLayout(cfg.out)
    cfg_json = json.dumps(cfg.to_dict())
    bar = bars.add("calibrate", len(plans))
    for p in plans:
        recs = {e: state.records[(p.field, e)] for e in range(p.n_epochs) if (p.field, e) in state.records}
        if not recs:
            bars.advance(bar)
            continue
        info: dict[str, Any] = {"reference": str(reference) if reference else "internal"}
        ref_path = str(reference) if reference else None
        # 1. epochs whose aperture correction could not be measured take the field's apcorr(FWHM)
        apc = _apcorr_model(recs)
        info["apcorr_model"] = apc
        new_apcorr = {e: float(np.polyval(apc["coef"], r["fwhm_px"])) for e, r in recs.items()
                      if r.get("n_apcorr_stars", 0) < 5 and r.get("apcorr_source") != "field model" and apc["n"] > 0}
        # 2. without a reference catalogue: the stable stars of a reference epoch
        if reference is None:
            ipath = layout.internal_reference(p.field)
            meta = read_meta(ipath)
            if meta is None or meta.get("fingerprint") != fp:
                ref_epoch = _choose_reference_epoch(cfg, recs)
                if ref_epoch in new_apcorr:
                    raise SurveyProcError(f"field {p.field}: the reference epoch {ref_epoch} has no measured "
                                          "aperture correction; set calibration.reference_epoch to another epoch")
                src = pq.read_table(layout.sources(p.field, ref_epoch)).to_pandas()
                iref = cal.internal_reference(src, p.zeropoint_nominal, recs[ref_epoch]["fwhm_px"], cfg.calibration)
                schema = pa.schema([(c, pa.float64()) for c in ("ra", "dec", "x_ref", "y_ref", "mag", "mag_err")])
                write_parquet_atomic(iref, schema, ipath,
                                     {"fingerprint": fp, "reference_epoch": ref_epoch, "n_stars": len(iref)})
                meta = read_meta(ipath)
            info["reference_epoch"] = meta["reference_epoch"]
            info["reference_stars"] = meta["n_stars"]
            ref_path = str(ipath)

        def done(unit: dict, rec: dict, recs: dict = recs) -> None:
            state.records[(unit["field"], unit["epoch"])] = rec
            recs[unit["epoch"]] = rec

        # with an external reference the apcorr-corrected epochs are refitted against it;
        # without one they only get the new aperture correction here (zero point: ensemble below)
        futures = dict(_unit(client, {"field": p.field, "epoch": e}, tasks.recalibrate_epoch_task, cfg.out, p.field, e,
                             None, str(reference) if reference else None, p.ref_wcs_text, cfg_json, fp, a)
                       for e, a in new_apcorr.items())
        _gather(client, futures, bars, None, state, "calibrate", done, cfg.retries + 1)
        if reference is None and any(r["zp"]["status"] == "pending" for r in recs.values()):
            # 3. relative calibration: ensemble photometry of the reference stars over all epochs
            futures = dict(_unit(client, {"field": p.field, "epoch": e}, tasks.reference_matches_task, cfg.out, p.field,
                                 e, ref_path, cfg_json) for e in sorted(recs))
            parts: list[pd.DataFrame] = []

            def got(unit: dict, m: dict, parts: list = parts) -> None:
                parts.append(pd.DataFrame({"epoch": m["epoch"], "star": m["i_ref"], "mag_inst": m["mag_inst"],
                                           "mag_inst_err": m["mag_inst_err"]}))

            _gather(client, futures, bars, None, state, "calibrate", got, cfg.retries + 1)
            zps, stars = cal.ensemble_zeropoints(pd.concat(parts, ignore_index=True), cfg.calibration.clip_sigma,
                                                 cfg.calibration.min_stars)
            info["ensemble_stars_used"] = int(stars["used"].sum())
            futures = {}
            for e in sorted(recs):
                z = zps.loc[e] if e in zps.index else None
                zp = (cal.ZeroPoint(float(z["zp"]) + p.zeropoint_nominal, float(z["zp_err"]), float(z["scatter"]),
                                    int(z["n_used"]), int(z["n_candidates"]), str(z["status"])) if z is not None
                      else cal.ZeroPoint(np.nan, np.nan, np.nan, 0, 0, "few"))
                fut, unit = _unit(client, {"field": p.field, "epoch": e}, tasks.recalibrate_epoch_task, cfg.out,
                                  p.field, e, zp.to_dict(), None, p.ref_wcs_text, cfg_json, fp)
                futures[fut] = unit
            _gather(client, futures, bars, None, state, "calibrate", done, cfg.retries + 1)
        info["n_apcorr_model_epochs"] = len(new_apcorr)
        table = pd.DataFrame([{"epoch": e, "airmass": r["airmass"], "zp": r["zp"]["zp"], "zp_err": r["zp"]["zp_err"],
                               "zp_status": r["zp"]["status"]} for e, r in sorted(recs.items())])
        model = cal.fit_airmass_model(table, cfg.calibration.clip_sigma)
        info["model"] = model
        needs_model = [e for e, r in recs.items() if r["zp"]["status"] in ("few", "pending")]
        if needs_model and not np.isfinite(model["zp0"]):
            for e in needs_model:
                state.failures.append({"stage": "calibrate", "field": p.field, "epoch": e,
                                       "error": "no epoch of this field could be calibrated, so there is no zero-point "
                                                "model either; check the reference catalogue covers the field"})
        elif needs_model:
            futures = {}
            for e in needs_model:
                r = recs[e]
                zp = cal.ZeroPoint(cal.model_zeropoint(model, r["airmass"]), float(model["scatter"]),
                                   float(model["scatter"]), 0, int(r["zp"]["n_candidates"]), "model")
                fut, unit = _unit(client, {"field": p.field, "epoch": e}, tasks.recalibrate_epoch_task, cfg.out,
                                  p.field, e, zp.to_dict(), None, p.ref_wcs_text, cfg_json, fp)
                futures[fut] = unit

            def done2(unit: dict, rec: dict) -> None:
                state.records[(unit["field"], unit["epoch"])] = rec

            _gather(client, futures, bars, None, state, "calibrate", done2, cfg.retries + 1)
        info["n_model_epochs"] = len(needs_model)
        state.calibration[p.field] = info
        bars.advance(bar)
    rows = [{"field": f, "epoch": e, "mjd": r["mjd"], "airmass": r["airmass"], "exptime_s": r["exptime_s"],
             "n_sources": r["n_sources"], "fwhm_px": r["fwhm_px"], "apcorr": r["apcorr"],
             "apcorr_n_stars": r.get("n_apcorr_stars", 0), "apcorr_from_model": r.get("apcorr_source") == "field model",
             "bkg_adu": r["bkg_adu"],
             "rms_adu": r["rms_adu"], "zp": r["zp"]["zp"], "zp_err": r["zp"]["zp_err"],
             "zp_scatter": r["zp"]["scatter"], "zp_n_stars": r["zp"]["n_used"], "zp_status": r["zp"]["status"],
             "fallback": r["fallback"] or ""}
            for (f, e), r in sorted(state.records.items())]
    if rows:
        df = pd.DataFrame(rows)
        write_parquet_atomic(df, pa.Schema.from_pandas(df, preserve_index=False), layout.epochs_table,
                             {"fingerprint": fp})


def _stage_crossmatch(client: Any, cfg: RunConfig, plans: list[FieldPlan], fp: str, state: RunState,
                      bars: _Bars) -> None:
    cfg_json = json.dumps(cfg.to_dict())
    futures: dict[Any, dict] = {}
    total = sum(len(p.regions) for p in plans)
    skipped = 0
    submit = []
    for p in plans:
        recs = [state.records[(p.field, e)] for e in range(p.n_epochs) if (p.field, e) in state.records]
        recs = [r for r in recs if np.isfinite(r["zp"]["zp"])]
        if not recs:
            continue
        epochs = sorted(int(r["epoch"]) for r in recs)
        digest = tasks.inputs_digest(recs)
        fwhm = float(np.median([r["fwhm_px"] for r in recs]))
        for reg in p.regions:
            if tasks.region_done(cfg.out, p.field, reg.index, fp, digest):
                skipped += 1
                state.regions[(p.field, reg.index)] = read_meta(OutputLayout(cfg.out).objects(p.field, reg.index))
                continue
            submit.append((p, reg, epochs, fwhm, digest))
    bar = bars.add("crossmatch", total, skipped)
    state.counts["regions_skipped_resume"] = skipped
    for p, reg, epochs, fwhm, digest in submit:
        fut, unit = _unit(client, {"field": p.field, "region": reg.index}, tasks.crossmatch_region_task, cfg.out,
                          p.field, p.index, reg, epochs, fwhm, p.ref_wcs_text, cfg_json, fp, digest)
        futures[fut] = unit

    def done(unit: dict, rec: dict) -> None:
        state.regions[(unit["field"], unit["region"])] = rec

    _gather(client, futures, bars, bar, state, "crossmatch", done, cfg.retries + 1)


def _stage_classify(client: Any, cfg: RunConfig, plans: list[FieldPlan], cfp: str, state: RunState,
                    bars: _Bars) -> None:
    cfg_json = json.dumps(cfg.to_dict())
    units = [(p.field, r.index) for p in plans for r in p.regions if (p.field, r.index) in state.regions]
    todo = [u for u in units if not tasks.classify_done(cfg.out, u[0], u[1], cfp)]
    for u in units:
        if u not in todo:
            state.classified[u] = {"field": u[0], "region": u[1], **read_meta(OutputLayout(cfg.out).objects(*u))["classify"]}
    bar = bars.add("classify", len(units), len(units) - len(todo))
    state.counts["classify_regions_skipped_resume"] = len(units) - len(todo)
    futures = dict(_unit(client, {"field": f, "region": r}, tasks.classify_region_task, cfg.out, f, r, cfg_json, cfp)
                   for f, r in todo)

    def done(unit: dict, rec: dict) -> None:
        state.classified[(unit["field"], unit["region"])] = rec

    _gather(client, futures, bars, bar, state, "classify", done, cfg.retries + 1)


def _check_models(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Load the run's models once on the driver (a bad file fails here, before the cluster).

    Returns name -> {path, sha256, threshold, card summary} for run.json and the fingerprint.
    """
    from survey_proc.distributed.plugins import weights_digest

    models: dict[str, dict[str, Any]] = {}
    if cfg.detector == "pnet":
        from survey_proc.detect.pnet import load_detector

        det = load_detector(cfg.pnet.weights or None, device="cpu")
        val = det.card.get("validation", {}).get("best", {})
        models["detector"] = {"path": det.path, "sha256": weights_digest(det.path),
                              "threshold": cfg.pnet.threshold or det.threshold,
                              "trained": det.card.get("date"), "git_revision": det.card.get("git_revision"),
                              "validation_best": val}
    if cfg.bpnn.enabled:
        from survey_proc.photometry.bpnn import load_bpnn

        bp = load_bpnn(cfg.bpnn.weights or None, device="cpu")
        models["bpnn"] = {"path": bp.path, "sha256": weights_digest(bp.path),
                          "n_samples": cfg.bpnn.n_samples or bp.n_samples, "trained": bp.card.get("date"),
                          "git_revision": bp.card.get("git_revision"), "validation": bp.card.get("validation")}
    if cfg.classify.enabled:
        from survey_proc.lightcurves.classifier import load_classifier

        cl = load_classifier(cfg.classify.weights or None, device="cpu")
        models["classifier"] = {"path": cl.path, "sha256": weights_digest(cl.path),
                                "threshold": cfg.classify.threshold or cl.threshold, "trained": cl.card.get("date"),
                                "git_revision": cl.card.get("git_revision"),
                                "validation_threshold": cl.card.get("validation", {}).get("threshold")}
    return models


def run_pipeline(cfg: RunConfig, client: Any = None) -> dict[str, Any]:
    """Run every stage for ``cfg``; returns the run.json content (also written to ``OUT/run.json``).

    Parameters
    ----------
    cfg
        A validated run configuration with ``store`` and ``out`` set.
    client
        An existing Dask client (tests, notebooks); None starts/attaches the cluster ``cfg`` names.
    """
    from survey_proc.distributed.cluster import make_client

    t_all = time.perf_counter()
    if not cfg.store or not cfg.out:
        raise ConfigError("a run needs a store and an --out directory")
    store.validate_store(cfg.store, epoch_checks=False)  # an epoch without a time is left out, not the run
    models = _check_models(cfg)
    fp = cfg.fingerprint(models={k: v["sha256"] for k, v in models.items() if k != "classifier"})
    cfp = cfg.classify_fingerprint(fp, models["classifier"]["sha256"]) if "classifier" in models else None
    reference = resolve_reference(cfg)
    plans = plan_fields(cfg)
    if reference is not None:
        check_reference_overlap(reference, plans)
    prepare(cfg.out, cfg.mode, fp)  # only after every input check: a refused run writes nothing
    clean_temporaries(cfg.out)
    layout = OutputLayout(cfg.out)
    state = RunState()
    run = {"status": "running", "started_unix": time.time(), "config": cfg.to_dict(), "fingerprint": fp,
           "classify_fingerprint": cfp,
           "versions": _versions(), "models": models, "store": str(Path(cfg.store).resolve()),
           "reference_catalog": str(reference) if reference else None,
           "fields": {p.field: {"epochs": p.n_epochs, "shape": [p.ny, p.nx], "blocks_per_epoch": len(p.blocks),
                                "tiles_per_epoch": sum(len(b[0]) for b in p.blocks), "regions": len(p.regions)}
                      for p in plans}}
    write_json_atomic(run, layout.run_json)
    run_token = uuid.uuid4().hex[:8]

    def stages(c: Any) -> None:
        if cfg.detector == "pnet" or cfg.bpnn.enabled or cfg.classify.enabled:
            from survey_proc.distributed.plugins import ModelPlugin

            c.register_plugin(ModelPlugin(cfg.pnet.weights or None if cfg.detector == "pnet" else False,
                                          bpnn_path=(cfg.bpnn.weights or None) if cfg.bpnn.enabled else False,
                                          classifier_path=(cfg.classify.weights or None) if cfg.classify.enabled
                                          else False))
        with _Bars(cfg.progress) as bars:
            t = time.perf_counter()
            _stage_extract(c, cfg, plans, reference, fp, state, bars, run_token)
            state.timings["extract_s"] = time.perf_counter() - t
            t = time.perf_counter()
            _stage_register(c, cfg, plans, reference, fp, state, bars)
            state.timings["register_s"] = time.perf_counter() - t
            t = time.perf_counter()
            _stage_calibrate(c, cfg, plans, reference, fp, state, bars)
            state.timings["calibrate_s"] = time.perf_counter() - t
            t = time.perf_counter()
            _stage_crossmatch(c, cfg, plans, fp, state, bars)
            state.timings["crossmatch_s"] = time.perf_counter() - t
            if cfp is not None:
                t = time.perf_counter()
                _stage_classify(c, cfg, plans, cfp, state, bars)
                state.timings["classify_s"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        if client is not None:
            state.timings["cluster_start_s"] = 0.0
            stages(client)
        else:
            with make_client(cfg.cluster, scheduler=cfg.scheduler, workers=cfg.workers,
                             threads_per_worker=cfg.threads_per_worker, quiet=not cfg.progress) as c:
                state.timings["cluster_start_s"] = time.perf_counter() - t
                stages(c)
    except KeyboardInterrupt:  # Ctrl-C: record what was done; the written units stay and a re-run resumes
        state.timings["total_s"] = time.perf_counter() - t_all
        run.update(_run_summary(state, plans))
        run["status"] = "interrupted"
        write_json_atomic(run, layout.run_json)
        raise
    clean_temporaries(cfg.out)  # a worker killed while writing leaves its temporary file behind
    state.timings["total_s"] = time.perf_counter() - t_all
    run.update(_run_summary(state, plans))
    run["status"] = "complete" if not state.failures else "incomplete"
    write_json_atomic(run, layout.run_json)
    return run


def _run_summary(state: RunState, plans: list[FieldPlan]) -> dict[str, Any]:
    recs = list(state.records.values())
    n_src = np.array([r["n_sources"] for r in recs]) if recs else np.zeros(0)
    regs = list(state.regions.values())
    fallbacks = [{"field": r["field"], "epoch": r["epoch"], "fallback": r["fallback"]} for r in recs if r["fallback"]]
    zp_by_field = {}
    for p in plans:
        z = np.array([state.records[(p.field, e)]["zp"]["zp"] for e in range(p.n_epochs)
                      if (p.field, e) in state.records], float)
        z = z[np.isfinite(z)]
        zp_by_field[p.field] = {"median": float(np.median(z)) if len(z) else None,
                                "std": float(np.std(z)) if len(z) > 1 else None,
                                **state.calibration.get(p.field, {})}
    return {
        "timings_s": state.timings,
        "counts": {
            **state.counts,
            "epochs_total": int(sum(p.n_epochs for p in plans)),
            "epochs_written": len(recs),
            "sources": int(n_src.sum()),
            "sources_per_epoch": {"median": float(np.median(n_src)) if len(n_src) else 0,
                                  "min": int(n_src.min()) if len(n_src) else 0,
                                  "max": int(n_src.max()) if len(n_src) else 0},
            "border_duplicates_removed": int(sum(r["n_duplicates"] for r in recs)),
            "objects": int(sum(r["n_objects"] for r in regs)),
            "lightcurve_points": int(sum(r["n_points"] for r in regs)),
            "regions_written": len(regs),
            "objects_classified": int(sum(r.get("n_classified", 0) for r in state.classified.values())),
            "periodic_variables": int(sum(r.get("n_periodic", 0) for r in state.classified.values())),
        },
        "crossmatch": {f"{k[0]}/{k[1]}": {kk: v[kk] for kk in ("match_radius_px", "astrom_rms90_px", "n_objects",
                                                                 "n_points", "wall_s")}
                       for k, v in sorted(state.regions.items())},
        "zeropoints": zp_by_field,
        "registration": {f"{r['field']}/{r['epoch']}": {k: r["registration"].get(k) for k in
                                                        ("reference_epoch", "against", "rms_px", "n_stars")}
                         for r in recs if "registration" in r},
        "extraction_fallbacks": fallbacks,
        "failures": state.failures,
        "retried": state.retried,
    }

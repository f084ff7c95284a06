"""Simulate a whole survey: the store, the truth beside it, the reference catalogue.

``simulate_survey(scenario, "DIR/NAME.zarr")`` writes::

    DIR/NAME.zarr                  the survey store (pipeline input)
    DIR/NAME.reference.parquet     Gaia-like calibration catalogue (named by the store)
    DIR/NAME.truth/stars.parquet       every simulated star and its variability model
                                       (``spiked``: drawn with the bright-star PSF)
    DIR/NAME.truth/galaxies.parquet    every simulated galaxy (empty unless galaxies are on)
    DIR/NAME.truth/hot_pixels.parquet  field, x, y, excess_adu (only when hot pixels are on)
    DIR/NAME.truth/lightcurves.parquet exact model magnitudes of non-constant stars per epoch
    DIR/NAME.truth/epochs.parquet      per field x epoch conditions (zeropoint, seeing, ...)
    DIR/NAME.truth/fields.parquet      per field pointing and reference-frame WCS
    DIR/NAME.truth/summary.json        scenario, counts, crowding, depth, timing

All three outputs are first written under temporary names and renamed when complete, so an
interrupted simulation never leaves something that looks finished. Epochs render in
parallel on a Dask cluster (one task per field x epoch; each worker reads the star table
once and writes its epoch's chunk straight into the store).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from survey_proc import __version__, store
from survey_proc.errors import SurveyProcError
from survey_proc.simulate import SIMULATOR_VERSION
from survey_proc.simulate.conditions import epoch_conditions, field_epochs
from survey_proc.simulate.depth import limiting_magnitude, saturation_magnitude
from survey_proc.simulate.galaxies import make_galaxies
from survey_proc.simulate.reference import make_reference
from survey_proc.simulate.render import bad_columns, bright_star_mask, hot_pixels, render_epoch
from survey_proc.simulate.scenario import Scenario, scenario_from_dict
from survey_proc.simulate.stars import field_id_for, make_stars, neighbour_fraction
from survey_proc.simulate.variables import magnitudes_at
from survey_proc.simulate.wcs import epoch_wcs, field_center, reference_wcs, wcs_header_text
from survey_proc.vocab import MASK_COSMIC, MASK_SATURATED


@dataclass(frozen=True)
class SurveyPaths:
    """Where a simulated survey's pieces live."""

    store: Path
    truth: Path
    reference: Path

    @classmethod
    def for_store(cls, store_path: str | Path) -> SurveyPaths:
        """Paths beside ``DIR/NAME.zarr``: ``DIR/NAME.truth/`` and ``DIR/NAME.reference.parquet``.

        Parameters
        ----------
        store_path
            The store (``DIR/NAME.zarr``).

        Returns
        -------
        SurveyPaths
        """
        p = Path(store_path)
        name = p.name[: -len(".zarr")] if p.name.endswith(".zarr") else p.name
        return cls(store=p, truth=p.parent / f"{name}.truth", reference=p.parent / f"{name}.reference.parquet")


def _tmp(p: Path) -> Path:
    return p.with_name(f".{p.name}.partial-{os.getpid()}")


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


# ---------------------------------------------------------------- worker side
_WORKER_CACHE: dict[tuple[str, int], tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] = {}


def _field_inputs(stars_path: str, scn: Scenario, field_index: int
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    key = (stars_path, field_index)
    if key not in _WORKER_CACHE:
        fid = field_id_for(field_index)
        stars = pd.read_parquet(stars_path, filters=[("field", "==", fid)])
        gal_path = Path(stars_path).with_name("galaxies.parquet")
        galaxies = (pd.read_parquet(gal_path, filters=[("field", "==", fid)])
                    if scn.galaxy_density_per_arcmin2 > 0 and gal_path.exists() else make_galaxies(scn, field_index))
        _WORKER_CACHE.clear()  # one field at a time per worker is enough
        _WORKER_CACHE[key] = (stars, bad_columns(scn, field_index), galaxies)
    return _WORKER_CACHE[key]


def render_task(scn_dict: dict[str, Any], store_path: str, stars_path: str, field_index: int,
                cond: dict[str, Any]) -> dict[str, int]:
    """Render one field x epoch and write it into the store (runs on a worker).

    Parameters
    ----------
    scn_dict
        :meth:`Scenario.to_dict` of the scenario.
    store_path
        The store being written (the field and the epoch's metadata already exist).
    stars_path
        The truth ``stars.parquet``.
    field_index
        Index of the field.
    cond
        The epoch's row of the field's epoch table (``epoch``, ``mjd``, seeing, sky, offsets, ...).

    Returns
    -------
    dict
        ``saturated_px`` and ``cosmic_px``: pixels flagged in the epoch.
    """
    scn = scenario_from_dict(scn_dict)
    stars, bad_cols, galaxies = _field_inputs(stars_path, scn, field_index)
    image, mask = render_epoch(scn, field_index, stars, cond, bad_cols, galaxies)
    store.write_epoch_pixels(store_path, field_id_for(field_index), int(cond["epoch"]), image, mask)
    return {"saturated_px": int(np.count_nonzero(mask & MASK_SATURATED)),
            "cosmic_px": int(np.count_nonzero(mask & MASK_COSMIC))}


# ---------------------------------------------------------------- driver side
def _run_tasks(tasks: list[tuple], workers: int | None, client: Any, progress: bool) -> list[dict[str, int]]:
    """Run render tasks in-process (workers == 0) or on a Dask cluster, with a progress bar."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("simulating epochs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    results: list[dict[str, int]] = []
    with Progress(*cols, disable=not progress) as bar:
        task_id = bar.add_task("render", total=len(tasks))
        if workers == 0 and client is None:
            for t in tasks:
                results.append(render_task(*t))
                bar.advance(task_id)
            return results
        from distributed import as_completed

        from survey_proc.distributed.cluster import local_client

        def submit_all(c: Any) -> list[dict[str, int]]:
            futures = [c.submit(render_task, *t, pure=False, key=f"sim-render-{t[3]}-{t[4]['epoch']}") for t in tasks]
            out = []
            for fut in as_completed(futures):
                out.append(fut.result())
                bar.advance(task_id)
            return out

        if client is not None:
            return submit_all(client)
        with local_client(workers, quiet=not progress, glibc_malloc=True) as c:
            return submit_all(c)


def _lightcurves(stars: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    var = stars[stars["var_class"] != "constant"]
    frames = []
    for fid, sv in var.groupby("field", sort=True):
        ep = epochs[epochs["field"] == fid]
        mags = magnitudes_at(sv, ep["mjd"].to_numpy())
        n_s, n_e = mags.shape
        frames.append(pd.DataFrame({
            "star_id": np.repeat(sv["star_id"].to_numpy(), n_e),
            "field": fid,
            "epoch": np.tile(ep["epoch"].to_numpy(dtype="int32"), n_s),
            "mjd": np.tile(ep["mjd"].to_numpy(), n_s),
            "mag": mags.ravel(),
        }))
    if not frames:
        return pd.DataFrame({"star_id": pd.Series(dtype="int64"), "field": pd.Series(dtype=str),
                             "epoch": pd.Series(dtype="int32"), "mjd": pd.Series(dtype="float64"),
                             "mag": pd.Series(dtype="float64")})
    return pd.concat(frames, ignore_index=True)


def survey_summary(scn: Scenario, stars: pd.DataFrame, epochs: pd.DataFrame) -> dict[str, Any]:
    """Crowding and depth figures of a simulated survey (what benchmarks/RESULTS.md reports).

    ``neighbour_frac_2fwhm_all``: in-frame stars with any other star within 2x the median
    FWHM; ``..._detectable``: among stars brighter than the 5σ limit, the fraction with
    another such star that close. Depth and saturation use the median epoch's seeing and
    sky (and the median field zero point).

    Parameters
    ----------
    scn
        The scenario.
    stars
        Truth stars of every field.
    epochs
        Epoch tables of every field (:func:`~survey_proc.simulate.conditions.field_epochs`).

    Returns
    -------
    dict
        Star counts, the crowding fractions above, ``limiting_mag_5sigma_psf_crlb`` and the
        saturation magnitude (mag), with the seeing (px), sky (ADU) and zero point (mag) used.
    """
    fwhm = float(np.median(epochs["seeing_fwhm_px"]))
    sky = float(np.median(epochs["sky_adu"]))
    zp = float(np.median(epochs["zeropoint"]))
    m5 = limiting_magnitude(scn, fwhm, sky, zp)
    msat = saturation_magnitude(scn, fwhm, sky, zp)
    fr_all, fr_det = [], []
    for _, s in stars[stars["in_frame"]].groupby("field"):
        fr_all.append(neighbour_fraction(s["x"].to_numpy(), s["y"].to_numpy(), 2 * fwhm))
        d = s[s["mag"] < m5]
        fr_det.append(neighbour_fraction(d["x"].to_numpy(), d["y"].to_numpy(), 2 * fwhm))
    in_frame = stars[stars["in_frame"]]
    return {
        "n_stars": len(stars),
        "n_stars_in_frame": len(in_frame),
        "stars_per_px2_in_frame": float(len(in_frame) / (scn.size_px**2 * scn.n_fields)),
        "n_detectable_in_frame": int((in_frame["mag"] < m5).sum()),
        "var_class_counts": {k: int(v) for k, v in stars["var_class"].value_counts().items()},
        "median_seeing_fwhm_px": fwhm,
        "median_sky_adu": sky,
        "median_zeropoint": zp,
        "limiting_mag_5sigma_psf_crlb": m5,
        "saturation_mag": msat,
        "neighbour_frac_2fwhm_all": float(np.mean(fr_all)) if fr_all else 0.0,
        "neighbour_frac_2fwhm_detectable": float(np.mean(fr_det)) if fr_det else 0.0,
        "baseline_days": float(epochs["mjd"].max() - epochs["mjd"].min()),
    }


def simulate_survey(
    scn: Scenario,
    out: str | Path,
    *,
    overwrite: bool = False,
    workers: int | None = None,
    client: Any = None,
    stars: pd.DataFrame | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Simulate a survey into ``out`` (a ``.zarr`` path) with truth and reference beside it.

    Parameters
    ----------
    scn
        The scenario (see ``scenario.py``).
    out
        Store path ``DIR/NAME.zarr``.
    overwrite
        Replace existing outputs; otherwise existing outputs are an error.
    workers
        Dask worker processes for rendering (None: one per core; 0: render in this process).
    client
        An existing ``distributed.Client`` to render on instead.
    stars
        Optional star table (``make_stars`` columns) to render instead of drawing one,
        e.g. to plant specific stars; its ``field`` values must be simulated field ids.
    progress
        Show a progress bar and the dashboard link.

    Returns
    -------
    dict
        The summary also written to ``NAME.truth/summary.json``.
    """
    t0 = time.perf_counter()
    scn.validate()
    paths = SurveyPaths.for_store(out)
    existing = [p for p in (paths.store, paths.truth, paths.reference) if p.exists()]
    if existing and not overwrite:
        raise SurveyProcError(f"{existing[0]} already exists; pass --overwrite to replace the simulated survey")
    paths.store.parent.mkdir(parents=True, exist_ok=True)
    tmp = SurveyPaths(store=_tmp(paths.store), truth=_tmp(paths.truth), reference=_tmp(paths.reference))
    for p in (tmp.store, tmp.truth, tmp.reference):
        _remove(p)
    try:
        summary = _simulate_into(scn, tmp, paths, workers=workers, client=client, stars=stars, progress=progress)
        for p in existing:
            _remove(p)
        os.replace(tmp.reference, paths.reference)
        os.replace(tmp.truth, paths.truth)
        os.replace(tmp.store, paths.store)
    finally:
        for p in (tmp.store, tmp.truth, tmp.reference):
            _remove(p)
    summary["wall_s"] = time.perf_counter() - t0
    (paths.truth / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _simulate_into(scn: Scenario, tmp: SurveyPaths, final: SurveyPaths, *, workers: int | None,
                   client: Any, stars: pd.DataFrame | None, progress: bool) -> dict[str, Any]:
    cond = epoch_conditions(scn)
    t_start = float(cond["mjd"].min() - scn.exptime_s / 2 / 86400)
    t_end = float(cond["mjd"].max() + scn.exptime_s / 2 / 86400)
    epochs = pd.concat([field_epochs(scn, i, field_id_for(i), cond) for i in range(scn.n_fields)], ignore_index=True)
    if stars is None:
        stars = pd.concat([make_stars(scn, i, t_start, t_end) for i in range(scn.n_fields)], ignore_index=True)
    else:
        unknown = set(stars["field"]) - {field_id_for(i) for i in range(scn.n_fields)}
        if unknown:
            raise SurveyProcError(f"planted stars name fields {sorted(unknown)} that this scenario does not simulate")
        if "in_frame" not in stars:
            stars = stars.assign(in_frame=(stars["x"].between(-0.5, scn.size_px - 0.5)
                                           & stars["y"].between(-0.5, scn.size_px - 0.5)))
    stars = stars.assign(spiked=bright_star_mask(scn, stars["mag"].to_numpy()))
    galaxies = pd.concat([make_galaxies(scn, i) for i in range(scn.n_fields)], ignore_index=True)
    summary = survey_summary(scn, stars, epochs)
    summary["n_galaxies"] = len(galaxies)
    summary["n_galaxies_in_frame"] = int(galaxies["in_frame"].sum())
    summary["n_spiked_stars"] = int(stars["spiked"].sum())
    # --- store skeleton and metadata
    sat_ref = saturation_magnitude(scn, float(cond["seeing_fwhm_px"].min()), float(epochs["sky_adu"].min()),
                                   float(epochs["zeropoint"].max()))
    store.create_store(tmp.store, band=scn.band, pixel_scale_arcsec=scn.pixel_scale_arcsec, attrs={
        "reference_catalog": os.path.relpath(final.reference, final.store),
        "created_by": f"survey-proc {__version__} simulate",
        "simulator_version": SIMULATOR_VERSION,
        "simulation": {"scenario": scn.to_dict()},
    })
    fields_rows = []
    for i in range(scn.n_fields):
        fid = field_id_for(i)
        ep = epochs[epochs["field"] == fid]
        ref = reference_wcs(scn, i)
        store.create_field(tmp.store, fid, ny=scn.size_px, nx=scn.size_px, n_epochs=scn.n_epochs,
                           gain_e_per_adu=scn.gain_e_per_adu, read_noise_e=scn.read_noise_e,
                           saturation_adu=scn.saturation_adu,
                           zeropoint_nominal=(scn.zeropoint_mag
                                              - (scn.extinction_k_mag if scn.site == "ground" else 0.0)),
                           mjd_timescale="utc", attrs={"reference_wcs": wcs_header_text(ref)})
        wcs_text = [wcs_header_text(epoch_wcs(scn, i, dx, dy, rot))
                    for dx, dy, rot in zip(ep["dx_px"].tolist(), ep["dy_px"].tolist(), ep["rotation_deg"].tolist(),
                                           strict=True)]
        store.write_epoch_meta(tmp.store, fid, 0, store.EpochMeta(
            mjd=ep["mjd"].to_numpy(), exptime_s=ep["exptime_s"].to_numpy(), airmass=ep["airmass"].to_numpy(),
            wcs=wcs_text, source_file=[f"simulated:{scn.name}:seed={scn.seed}:{fid}:epoch={e}" for e in ep["epoch"]],
            band=[scn.band] * len(ep)))
        ra, dec = field_center(scn, i)
        fields_rows.append({"field": fid, "ra_center": ra, "dec_center": dec, "size_px": scn.size_px,
                            "reference_wcs": wcs_header_text(ref)})
    # --- truth and reference (the workers read stars.parquet)
    tmp.truth.mkdir(parents=True)
    stars_path = tmp.truth / "stars.parquet"
    stars.to_parquet(stars_path, index=False)
    galaxies.to_parquet(tmp.truth / "galaxies.parquet", index=False)
    if scn.hot_pixel_frac > 0:
        pd.concat([hot_pixels(scn, i).assign(field=field_id_for(i)) for i in range(scn.n_fields)],
                  ignore_index=True).to_parquet(tmp.truth / "hot_pixels.parquet", index=False)
    epochs.to_parquet(tmp.truth / "epochs.parquet", index=False)
    pd.DataFrame(fields_rows).to_parquet(tmp.truth / "fields.parquet", index=False)
    _lightcurves(stars, epochs).to_parquet(tmp.truth / "lightcurves.parquet", index=False)
    reference = make_reference(scn, stars, sat_ref + scn.reference_sat_margin_mag)
    reference.to_parquet(tmp.reference, index=False)
    # --- pixels
    scn_dict = scn.to_dict()
    tasks = [(scn_dict, str(tmp.store), str(stars_path), i, row)
             for i in range(scn.n_fields)
             for row in epochs[epochs["field"] == field_id_for(i)].to_dict("records")]
    t_render = time.perf_counter()
    stats = _run_tasks(tasks, workers, client, progress)
    render_s = time.perf_counter() - t_render
    summary.update({
        "scenario": scn.to_dict(),
        "survey_proc_version": __version__,
        "simulator_version": SIMULATOR_VERSION,
        "n_epochs": scn.n_epochs,
        "n_fields": scn.n_fields,
        "render_s": render_s,
        "render_ms_per_epoch_field": 1000 * render_s / max(1, len(tasks)),
        "saturated_px_per_epoch": float(np.mean([s["saturated_px"] for s in stats])),
        "cosmic_px_per_epoch": float(np.mean([s["cosmic_px"] for s in stats])),
        "reference_stars": len(reference),
    })
    return summary

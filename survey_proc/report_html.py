"""``survey-proc report OUT``: an HTML page with PNG plots that shows a finished run to a person.

Everything comes from the run's outputs (``run.json``, ``epochs.parquet``, ``sources/``,
``objects/``, ``lightcurves/``); when ``run.json``'s store is a simulated survey whose truth
still lies beside it (:func:`survey_proc.evaluate.truth_paths`), the page adds completeness
and photometric accuracy against that truth. The page is ``OUT/report/index.html`` (or
``DEST/index.html``) with one PNG per section beside it; it links nothing outside that folder,
so the folder can be copied or served as it is.

Sections
--------
- **Summary**: the lines ``survey-proc run`` prints (:func:`survey_proc.report.summary_lines`).
- **Epochs** (``epochs.png``): per field x epoch, against MJD: zero point (mag, with its
  error), seeing (FWHM, px), sky (ADU per pixel), depth (5-sigma limiting magnitude, mag) and
  detections. The depth is measured from each epoch's detections: a straight line fitted to
  ``log10(mag_err)`` against ``mag`` for the sources with ``0.01 < mag_err < 0.5`` is solved for
  ``mag_err = 1.0857 / 5`` (S/N 5) (:func:`limiting_mag`); beside it, the depth the sky noise
  predicts for a PSF-weighted measurement, ``zp - 2.5 log10(5 rms sqrt(NEA))`` with the
  noise-equivalent area of a Gaussian PSF ``NEA = 4 pi (FWHM / 2.3548)^2`` (:func:`depth_from_noise`).
- **Truth** (``truth.png``, simulated stores only): completeness against true magnitude and
  calibrated - true magnitude against true magnitude, matched one to one within
  :data:`survey_proc.matching.DEFAULT_MATCH_RADIUS_PX` on up to ``n_truth_epochs`` evenly
  spaced epochs per field (the same matching as the run's own evaluation).
- **Uncertainty calibration** (``calibration.png``): ``z = (mag - mag_mean) / mag_err`` of the
  light-curve points of constant stars (truth constants when simulated; otherwise objects the
  classifier called ``constant``, or all objects when nothing was classified), detected and
  forced points apart; a calibrated error has ``std(z) = 1`` (``mag_mean`` includes the point
  itself, which narrows z by ``sqrt(1 - 1/n)``; negligible for long light curves).
- **Sky map** (``skymap.png``): the objects (ra, dec; pixel x, y when a field has no WCS),
  coloured by ``mag_mean``, periodic variables ringed.
- **Variables** (``variable-<object_id>.png``): the ``top`` objects by ``p_periodic`` among
  those with a period (:func:`periodic_candidates`), raw and folded at their period (phase 0
  at ``t0_mjd`` when known); forced points (:data:`survey_proc.vocab.FORCED`) in another
  colour, their NaN magnitudes (negative flux) left out.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from survey_proc import storage
from survey_proc.errors import SurveyProcError
from survey_proc.vocab import FORCED, MAG_PER_FLUX, NONPOSITIVE, PHOTOMETRY_BAD

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548
DETECTED_COLOUR = "#1f4e9c"
FORCED_COLOUR = "#e07b00"
DPI = 110
MAX_CALIBRATION_OBJECTS = 20_000  # constant stars whose light curves enter the z distribution


@dataclass
class Report:
    """What :func:`write_report` wrote and measured."""

    html: Path
    plots: list[Path] = field(default_factory=list)
    simulated: bool = False
    sections: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ measurements
def limiting_mag(mag: np.ndarray, mag_err: np.ndarray, snr: float = 5.0, min_sources: int = 10) -> float:
    """The magnitude at which detections reach signal-to-noise ``snr`` (an epoch's depth).

    A straight line is fitted to ``log10(mag_err)`` against ``mag`` for the finite sources with
    ``0.01 < mag_err < 0.5`` (Poisson-dominated errors grow exponentially with magnitude) and
    solved for ``mag_err = 1.0857 / snr``.

    Parameters
    ----------
    mag, mag_err
        Calibrated magnitudes and their errors (mag) of one epoch's detections.
    snr
        The signal-to-noise ratio of the limit (5: the 5-sigma limiting magnitude).
    min_sources
        Fewer usable sources (or a non-increasing error curve): NaN.

    Returns
    -------
    float
        The limiting magnitude (mag), NaN when it cannot be measured.
    """
    m = np.asarray(mag, float)
    e = np.asarray(mag_err, float)
    ok = np.isfinite(m) & np.isfinite(e) & (e > 0.01) & (e < 0.5)
    if ok.sum() < min_sources:
        return float("nan")
    slope, intercept = np.polyfit(m[ok], np.log10(e[ok]), 1)
    if not slope > 0:
        return float("nan")
    return float((math.log10(MAG_PER_FLUX / snr) - intercept) / slope)


def depth_from_noise(zp: np.ndarray, rms_adu: np.ndarray, fwhm_px: np.ndarray, snr: float = 5.0) -> np.ndarray:
    """The limiting magnitude the sky noise predicts for a PSF-weighted measurement of a point source.

    ``zp - 2.5 log10(snr * rms * sqrt(NEA))``, with the noise-equivalent area of a Gaussian PSF
    ``NEA = 4 pi sigma^2``, ``sigma = FWHM / 2.3548`` (background-limited; an aperture
    measurement is shallower by a few tenths of a magnitude).

    Parameters
    ----------
    zp
        Zero points (mag for 1 ADU per exposure).
    rms_adu
        Background noise per pixel (ADU).
    fwhm_px
        Seeing FWHM (px).
    snr
        Signal-to-noise ratio of the limit.

    Returns
    -------
    ndarray
        Limiting magnitudes (mag); NaN where an input is missing or not positive.
    """
    zp, rms, fwhm = (np.asarray(a, float) for a in (zp, rms_adu, fwhm_px))
    nea = 4.0 * math.pi * (fwhm / FWHM_PER_SIGMA) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        out = zp - 2.5 * np.log10(snr * rms * np.sqrt(nea))
    return np.where((rms > 0) & (fwhm > 0), out, np.nan)


def epoch_table(out: str | Path) -> pd.DataFrame:
    """Per field x epoch conditions of a run with its detections counted and its depth measured.

    Parameters
    ----------
    out
        The run's output directory.

    Returns
    -------
    DataFrame
        ``epochs.parquet`` (zero point ``zp`` mag, ``fwhm_px``, ``bkg_adu``, ``rms_adu``, ...; only
        ``field``, ``epoch``, ``mjd`` when it is missing) with ``n_detections`` (rows in
        ``sources/``), ``depth_mag`` (:func:`limiting_mag` of the detections, mag) and
        ``depth_noise_mag`` (:func:`depth_from_noise`, mag).
    """
    out = Path(out)
    src = _read(out / "sources", ["field", "epoch", "mjd", "mag", "mag_err", "flags"])
    if src.empty:
        src = pd.DataFrame({"field": pd.Series(dtype=str), "epoch": pd.Series(dtype="int64"), "mjd": [], "mag": [],
                            "mag_err": [], "flags": pd.Series(dtype="int32")})
    src["field"] = src["field"].astype(str)
    detected = src[(src["flags"].to_numpy() & (FORCED | NONPOSITIVE)) == 0]
    per = []
    for (fid, e), g in detected.groupby(["field", "epoch"], sort=True):
        per.append({"field": fid, "epoch": int(e), "mjd_src": float(g["mjd"].iloc[0]), "n_detections": len(g),
                    "depth_mag": limiting_mag(g["mag"].to_numpy(), g["mag_err"].to_numpy())})
    counts = pd.DataFrame(per, columns=["field", "epoch", "mjd_src", "n_detections", "depth_mag"])
    if (out / "epochs.parquet").is_file():
        ep = pd.read_parquet(out / "epochs.parquet")
        ep["field"] = ep["field"].astype(str)
        ep["epoch"] = ep["epoch"].astype("int64")
        t = ep.merge(counts, on=["field", "epoch"], how="outer")
        t["mjd"] = t["mjd"].fillna(t["mjd_src"])
    else:
        t = counts.rename(columns={"mjd_src": "mjd"})
    t = t.drop(columns=["mjd_src"], errors="ignore")
    t["n_detections"] = t["n_detections"].fillna(0).astype("int64")
    if {"zp", "rms_adu", "fwhm_px"} <= set(t.columns):
        t["depth_noise_mag"] = depth_from_noise(t["zp"].to_numpy(float), t["rms_adu"].to_numpy(float),
                                                t["fwhm_px"].to_numpy(float))
    else:
        t["depth_noise_mag"] = np.nan
    return t.sort_values(["field", "epoch"]).reset_index(drop=True)


# ------------------------------------------------------------------ the page
def write_report(out: str | Path, dest: str | Path | None = None, *, top: int = 6, n_truth_epochs: int = 10,
                 store: str | Path | None = None) -> Report:
    """Write the HTML report of a run: ``index.html`` and its PNGs.

    Parameters
    ----------
    out
        The run's output directory (it must hold ``run.json``).
    dest
        Folder of the page; None: ``OUT/report``. Created if needed; files of an earlier report
        there are replaced.
    top
        How many periodic-variable candidates (highest ``p_periodic``) get a light-curve plot.
    n_truth_epochs
        Epochs per field compared with the truth (simulated stores only).
    store
        The survey store, to find its truth; None: the store ``run.json`` names.

    Returns
    -------
    Report
        The page, the PNGs, whether truth was used, the section names and the figures shown
        (``numbers``: per-section medians, e.g. ``depth_mag_median``, ``z_std_detected``).

    Raises
    ------
    SurveyProcError
        When ``OUT/run.json`` is missing or unreadable, or ``dest`` cannot be written.
    """
    out = Path(out)
    run = _load_run(out)
    dest_dir = Path(dest) if dest is not None else out / "report"
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        for old in dest_dir.glob("*.png"):
            old.unlink()
    except OSError as exc:
        raise SurveyProcError(f"report destination {dest_dir}: cannot write there ({exc.strerror or exc}); "
                              "choose another --dest") from None
    rep = Report(html=dest_dir / "index.html")
    body: list[str] = []
    store_path = Path(store) if store is not None else (Path(run["store"]) if run.get("store") else None)
    truth = _truth_for(store_path)
    rep.simulated = truth is not None

    body.append(_section_summary(run, store_path, truth is not None))
    rep.sections.append("summary")

    ep = epoch_table(out)
    if len(ep):
        body.append(_section_epochs(ep, dest_dir, rep))
        rep.sections.append("epochs")
    objects = _read(out / "objects")
    if not objects.empty:
        objects["field"] = objects["field"].astype(str)
    if truth is not None and store_path is not None:
        body.append(_section_truth(out, store_path, run, ep, dest_dir, rep, n_truth_epochs))
        rep.sections.append("truth")
    if not objects.empty:
        body.append(_section_calibration(out, objects, store_path if truth is not None else None, dest_dir, rep))
        rep.sections.append("calibration")
        body.append(_section_skymap(objects, dest_dir, rep))
        rep.sections.append("skymap")
        body.append(_section_variables(out, objects, dest_dir, rep, top))
        rep.sections.append("variables")
    else:
        body.append("<h2>Objects</h2><p>No objects/ in this output: the cross-match did not run or found nothing.</p>")
    title = f"survey-proc report: {html.escape(str(run.get('config', {}).get('out', out)))}"
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n"
            f"<style>{_CSS}</style></head>\n<body>\n<h1>{title}</h1>\n" + "\n".join(body) + "\n</body></html>\n")
    tmp = rep.html.with_name(".index.html.partial")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(rep.html)
    return rep


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.4em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; } img { max-width: 100%; } .note { color: #555; font-size: 0.9em; }
.var { display: inline-block; width: 49%; vertical-align: top; }
"""


def _load_run(out: Path) -> dict[str, Any]:
    p = out / "run.json"
    if not p.is_file():
        raise SurveyProcError(f"{p} not found: {out} is not the output of `survey-proc run` (or the run has not "
                              "started); pass the --out directory of a run")
    try:
        return dict(json.loads(p.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise SurveyProcError(f"{p} cannot be read ({exc}); re-run `survey-proc run` with the same --out to "
                              "rewrite it") from None


def _read(path: Path, columns: list[str] | None = None, filters: Any = None) -> pd.DataFrame:
    if not path.is_dir() or not any(path.rglob("*.parquet")):
        return pd.DataFrame(columns=columns or [])
    return pd.read_parquet(path, columns=columns, filters=filters)


def _truth_for(store_path: Path | None) -> Any:
    if store_path is None:
        return None
    from survey_proc.evaluate import truth_paths

    try:
        return truth_paths(store_path)
    except SurveyProcError:
        return None


def _save(fig: Figure, path: Path, rep: Report) -> str:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    rep.plots.append(path)
    return f'<img src="{html.escape(path.name)}" alt="{html.escape(path.stem)}">'


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "n/a"
    if spec == "s" or isinstance(v, str):
        return html.escape(str(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    if not math.isfinite(f):
        return "n/a"
    return format(round(f), spec) if spec == "d" else format(f, spec)


def _table(rows: list[dict[str, Any]], spec: dict[str, str] | None = None) -> str:
    if not rows:
        return ""
    spec = spec or {}
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r[c], spec.get(c, '.3f'))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section_summary(run: dict[str, Any], store_path: Path | None, simulated: bool) -> str:
    from survey_proc.report import summary_lines

    try:
        lines = summary_lines(run)
    except (KeyError, TypeError, ValueError) as exc:  # an interrupted run's json lacks the counts
        lines = [f"status {run.get('status')}: no summary ({type(exc).__name__}: {exc})"]
    sim = ("simulated: truth found beside it, compared below" if simulated
           else "no truth found beside it (a real survey, or its truth was moved): no comparison with truth")
    return (f"<h2>Summary</h2><p>Store <code>{html.escape(str(store_path))}</code>: {sim}.</p>"
            f"<pre>{html.escape(chr(10).join(lines))}</pre>")


def _section_epochs(ep: pd.DataFrame, dest: Path, rep: Report) -> str:
    panels = [("zp", "zero point (mag)"), ("fwhm_px", "seeing FWHM (px)"), ("bkg_adu", "sky (ADU/px)"),
              ("depth_mag", "5σ depth (mag)"), ("n_detections", "detections")]
    panels = [(c, lab) for c, lab in panels if c in ep.columns]
    fig = Figure(figsize=(10, 1.9 * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for fid, g in ep.groupby("field"):
        for ax, (col, lab) in zip(axes, panels, strict=True):
            if col == "zp" and "zp_err" in g:
                ax.errorbar(g["mjd"], g["zp"], yerr=g["zp_err"], fmt=".", ms=3, lw=0.6, label=str(fid))
            else:
                ax.plot(g["mjd"], g[col], ".", ms=3, label=f"{fid} (from detections)" if col == "depth_mag"
                        else str(fid))
            if col == "depth_mag":
                ax.plot(g["mjd"], g["depth_noise_mag"], "-", lw=0.8, alpha=0.7,
                        label=f"{fid} (predicted from sky noise)")
            ax.set_ylabel(lab)
    for ax, (col, _) in zip(axes, panels, strict=True):
        if col == "depth_mag":
            ax.invert_yaxis()
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best", title="field")
    axes[-1].set_xlabel("MJD")
    axes[-1].ticklabel_format(axis="x", useOffset=False)
    fig.suptitle("Per-epoch conditions")
    img = _save(fig, dest / "epochs.png", rep)
    rows = []
    for fid, g in ep.groupby("field"):
        row: dict[str, Any] = {"field": fid, "epochs": len(g),
                               "detections (median)": float(np.median(g["n_detections"]))}
        for col, name in (("zp", "zp median"), ("zp", "zp std"), ("fwhm_px", "FWHM median px"),
                          ("bkg_adu", "sky median ADU"), ("depth_mag", "depth median mag"),
                          ("depth_noise_mag", "depth (noise) median mag")):
            if col in g:
                v = g[col].to_numpy(float)
                v = v[np.isfinite(v)]
                row[name] = (float(np.std(v)) if name.endswith("std") else float(np.median(v))) if len(v) else None
        rows.append(row)
    d = ep["depth_mag"].to_numpy(float)
    rep.numbers["depth_mag_median"] = float(np.nanmedian(d)) if np.isfinite(d).any() else float("nan")
    rep.numbers["detections_median"] = float(np.median(ep["n_detections"]))
    return ("<h2>Epochs: zero point, seeing, sky, depth, detections</h2>" + img
            + _table(rows, {"field": "s", "epochs": "d", "detections (median)": ".0f"})
            + "<p class=\"note\">Depth from detections: the magnitude where a straight-line fit of "
              "log10(mag_err) against mag reaches mag_err = 0.217 (S/N 5). Predicted from sky noise: "
              "zp - 2.5 log10(5 rms sqrt(4π σ²)), σ = FWHM/2.355 (a PSF-weighted measurement).</p>")


def _section_truth(out: Path, store: Path, run: dict[str, Any], ep: pd.DataFrame, dest: Path, rep: Report,
                   n_epochs: int) -> str:
    from survey_proc.evaluate import error_stats, nmad, truth_at_epoch
    from survey_proc.matching import DEFAULT_MATCH_RADIUS_PX, match_one_to_one
    from survey_proc.outputs import OutputLayout

    true_mag, found, d_mag, d_true = [], [], [], []
    for fid, g in ep.groupby("field"):
        epochs = g["epoch"].to_numpy()
        if not len(epochs):
            continue
        sample = epochs[np.unique(np.linspace(0, len(epochs) - 1, min(n_epochs, len(epochs))).astype(int))]
        for e in sample:
            try:
                truth = truth_at_epoch(store, str(fid), int(e))
            except SurveyProcError:
                continue
            unit = OutputLayout(out).sources(str(fid), int(e))
            if not storage.is_file(unit):
                continue
            src = storage.read_table(unit, columns=["x", "y", "mag"]).to_pandas()
            i_d, i_t = match_one_to_one(src["x"].to_numpy(float), src["y"].to_numpy(float),
                                        truth["x_epoch"].to_numpy(), truth["y_epoch"].to_numpy(),
                                        DEFAULT_MATCH_RADIUS_PX)
            hit = np.zeros(len(truth), bool)
            hit[i_t] = True
            true_mag.append(truth["mag_epoch"].to_numpy())
            found.append(hit)
            d_mag.append(src["mag"].to_numpy(float)[i_d] - truth["mag_epoch"].to_numpy()[i_t])
            d_true.append(truth["mag_epoch"].to_numpy()[i_t])
    if not true_mag:
        return "<h2>Against truth</h2><p>The truth has none of this run's epochs.</p>"
    tm, fd = np.concatenate(true_mag), np.concatenate(found)
    dm, dt = np.concatenate(d_mag), np.concatenate(d_true)
    edges = np.arange(np.floor(np.nanmin(tm) * 2) / 2, np.ceil(np.nanmax(tm) * 2) / 2 + 0.5, 0.5)
    centres = 0.5 * (edges[1:] + edges[:-1])
    k = np.digitize(tm, edges) - 1
    n_bin = np.bincount(k, minlength=len(centres))[: len(centres)]
    n_hit = np.bincount(k, weights=fd, minlength=len(centres))[: len(centres)]
    with np.errstate(invalid="ignore", divide="ignore"):
        comp = n_hit / n_bin
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(centres[n_bin > 0], comp[n_bin > 0], "o-", color=DETECTED_COLOUR)
    limit = (run.get("evaluation") or {}).get("mag_limit")
    from survey_proc.evaluate import load_truth_summary

    try:
        limit = limit or float(load_truth_summary(store)["limiting_mag_5sigma_psf_crlb"])
    except (SurveyProcError, KeyError, OSError, ValueError):
        pass
    if limit:
        ax1.axvline(float(limit), color="grey", ls="--", lw=0.8, label=f"simulator's 5σ limit {float(limit):.2f}")
        ax1.legend(fontsize=8)
    ax1.set_xlabel("true magnitude")
    ax1.set_ylabel("completeness (matched / true)")
    ax1.set_ylim(-0.02, 1.05)
    ax1.grid(alpha=0.3)
    ok = np.isfinite(dm)
    ax2.plot(dt[ok], dm[ok], ",", color="k", alpha=0.4)
    kb = np.digitize(dt[ok], edges) - 1
    med = [np.median(dm[ok][kb == i]) if (kb == i).sum() >= 5 else np.nan for i in range(len(centres))]
    wid = [nmad(dm[ok][kb == i]) if (kb == i).sum() >= 5 else np.nan for i in range(len(centres))]
    ax2.errorbar(centres, med, yerr=wid, fmt="o-", color=FORCED_COLOUR, label="median ± NMAD")
    ax2.axhline(0, color="grey", lw=0.8)
    lim = max(0.3, float(np.nanpercentile(np.abs(dm[ok]), 98)) if ok.any() else 0.3)
    ax2.set_ylim(-lim, lim)
    ax2.set_xlabel("true magnitude")
    ax2.set_ylabel("calibrated - true (mag)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle("Against the simulator's truth")
    img = _save(fig, dest / "truth.png", rep)
    bright = ok & (dt < (float(limit) - 3 if limit else np.inf))
    st = error_stats(dm[bright])
    rep.numbers["truth_matched"] = int(fd.sum())
    rep.numbers["truth_stars"] = len(fd)
    rep.numbers["mag_error_nmad_bright"] = st["nmad"]
    rows = [{"true mag": c, "true stars": int(n), "completeness": v} for c, n, v in zip(centres, n_bin, comp,
                                                                                        strict=True) if n > 0]
    return ("<h2>Against truth: completeness and photometric accuracy</h2>" + img
            + f"<p>{int(fd.sum())} of {len(fd)} true stars in the compared epochs were detected; for stars brighter "
              f"than the limit - 3 mag, calibrated - true: median {_fmt(st['bias'], '.4f')} mag, NMAD "
              f"{_fmt(st['nmad'], '.4f')} mag, rms {_fmt(st['rms'], '.4f')} mag ({st['n']} points).</p>"
            + _table(rows, {"true mag": ".2f", "true stars": "d"}))


def _constant_objects(objects: pd.DataFrame, store: Path | None) -> tuple[np.ndarray, str]:
    """object_ids of stars taken as constant, and how they were chosen."""
    if store is not None:
        from survey_proc.evaluate import load_truth_stars
        from survey_proc.matching import match_one_to_one

        stars = load_truth_stars(store)
        stars["field"] = stars["field"].astype(str)
        ids = []
        for fid, o in objects.groupby("field"):
            s = stars[stars["field"] == fid]
            if not len(s):
                continue
            if np.isfinite(o["ra"]).all():  # tangent-plane offsets in arcsec: the reference frames may differ
                dec0 = math.radians(float(np.median(o["dec"])))
                xo, yo = o["ra"].to_numpy() * math.cos(dec0) * 3600, o["dec"].to_numpy() * 3600
                xs, ys = s["ra"].to_numpy() * math.cos(dec0) * 3600, s["dec"].to_numpy() * 3600
                radius = 0.3  # arcsec
            else:
                xo, yo, xs, ys = (np.asarray(v, float) for v in (o["x"], o["y"], s["x"], s["y"]))
                radius = 1.0
            i_o, i_s = match_one_to_one(np.asarray(xo, float), np.asarray(yo, float), np.asarray(xs, float),
                                        np.asarray(ys, float), radius)
            const = s["var_class"].to_numpy()[i_s] == "constant"
            ids.append(o["object_id"].to_numpy()[i_o][const])
        if ids:
            return np.concatenate(ids), "objects matched to the simulator's constant stars"
    if "var_class" in objects and (objects["var_class"] == "constant").any():
        return objects.loc[objects["var_class"] == "constant", "object_id"].to_numpy(), \
            "objects the classifier called constant"
    return objects["object_id"].to_numpy(), "all objects (nothing was classified: variables are included)"


def _section_calibration(out: Path, objects: pd.DataFrame, store: Path | None, dest: Path, rep: Report) -> str:
    from survey_proc.evaluate import nmad

    ids, how = _constant_objects(objects, store)
    if len(ids) > MAX_CALIBRATION_OBJECTS:  # a fixed random subset (seeded): memory bounded on large surveys
        ids = np.sort(np.random.default_rng(0).choice(ids, MAX_CALIBRATION_OBJECTS, replace=False))
        how += f" (a random {MAX_CALIBRATION_OBJECTS} of them)"
    lc = _read(out / "lightcurves", ["object_id", "mag", "mag_err", "flags"],
               filters=[("object_id", "in", [int(i) for i in ids])])
    lc = lc[lc["object_id"].isin(ids)]
    mean = objects.set_index("object_id")["mag_mean"]
    lc = lc.assign(mag_mean=mean.reindex(lc["object_id"].to_numpy()).to_numpy())
    z = ((lc["mag"] - lc["mag_mean"]) / lc["mag_err"]).to_numpy(float)
    flags = lc["flags"].to_numpy()
    clean = (flags & PHOTOMETRY_BAD) == 0
    forced = (flags & FORCED) != 0
    fin = np.isfinite(z)
    zd, zf = z[fin & clean & ~forced], z[fin & clean & forced]
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    bins = np.linspace(-6, 6, 61)
    if len(zd):
        ax1.hist(np.clip(zd, -6, 6), bins=bins, density=True, histtype="step", color=DETECTED_COLOUR, lw=1.5,
                 label=f"detected ({len(zd)}): std {np.std(zd):.2f}, NMAD {nmad(zd):.2f}")
    if len(zf):
        ax1.hist(np.clip(zf, -6, 6), bins=bins, density=True, histtype="step", color=FORCED_COLOUR, lw=1.5,
                 label=f"forced ({len(zf)}): std {np.std(zf):.2f}, NMAD {nmad(zf):.2f}")
    g = np.linspace(-6, 6, 200)
    ax1.plot(g, np.exp(-0.5 * g**2) / math.sqrt(2 * math.pi), "k--", lw=0.8, label="N(0, 1)")
    ax1.set_xlabel("z = (mag - mag_mean) / mag_err")
    ax1.set_ylabel("density")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    mm = lc["mag_mean"].to_numpy(float)
    for sel, colour, lab in ((fin & clean & ~forced, DETECTED_COLOUR, "detected"),
                             (fin & clean & forced, FORCED_COLOUR, "forced")):
        if sel.sum() < 5:
            continue
        edges = np.arange(np.floor(np.nanmin(mm[sel])), np.ceil(np.nanmax(mm[sel])) + 0.5, 0.5)
        k = np.digitize(mm[sel], edges) - 1
        c = 0.5 * (edges[1:] + edges[:-1])
        w = [nmad(z[sel][k == i]) if (k == i).sum() >= 10 else np.nan for i in range(len(c))]
        ax2.plot(c, w, "o-", color=colour, label=f"{lab}: NMAD of z")
    ax2.axhline(1.0, color="k", ls="--", lw=0.8)
    ax2.set_xlabel("mag_mean")
    ax2.set_ylabel("width of z")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"Uncertainty calibration: {how}")
    img = _save(fig, dest / "calibration.png", rep)
    rep.numbers["z_std_detected"] = float(np.std(zd)) if len(zd) else float("nan")
    rep.numbers["z_nmad_detected"] = nmad(zd)
    rep.numbers["z_nmad_forced"] = nmad(zf)
    return ("<h2>Uncertainty calibration</h2>" + img
            + f"<p>{html.escape(how)}: {len(np.unique(lc['object_id']))} objects; light-curve points without "
              f"photometry-bad flags. A calibrated mag_err gives width 1. Detected points: std(z) "
              f"{_fmt(rep.numbers['z_std_detected'], '.2f')}, NMAD {_fmt(nmad(zd), '.2f')}; forced points: "
              f"NMAD {_fmt(nmad(zf), '.2f')} ({len(zf)} points).</p>")


def _section_skymap(objects: pd.DataFrame, dest: Path, rep: Report) -> str:
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.subplots()
    has_wcs = np.isfinite(objects["ra"].to_numpy(float)).all()
    xc, yc = ("ra", "dec") if has_wcs else ("x", "y")
    mag = objects["mag_mean"].to_numpy(float)
    size = np.clip(2 + 2.5 * (np.nanmax(mag) - mag) if np.isfinite(mag).any() else 4, 1, 40)
    sc = ax.scatter(objects[xc], objects[yc], c=mag, s=size, cmap="viridis_r", lw=0)
    fig.colorbar(sc, ax=ax, label="mag_mean")
    per = objects[objects.get("var_class", pd.Series(index=objects.index, dtype=str)).isin(
        ("eclipsing_binary", "pulsator", "transit"))]
    if len(per):
        ax.scatter(per[xc], per[yc], s=80, facecolors="none", edgecolors="red", lw=1,
                   label=f"periodic variables ({len(per)})")
        ax.legend(fontsize=8, loc="upper right")
    ax.ticklabel_format(useOffset=False)
    if has_wcs:
        ax.invert_xaxis()  # east to the left
        ax.set_aspect(1.0 / max(math.cos(math.radians(float(np.median(objects["dec"])))), 1e-3))
        ax.set_xlabel("RA (deg)")
        ax.set_ylabel("Dec (deg)")
    else:
        ax.set_aspect("equal")
        ax.set_xlabel("x (reference frame, px)")
        ax.set_ylabel("y (reference frame, px)")
    ax.set_title(f"{len(objects)} objects" + ("" if has_wcs else " (no WCS: pixel positions)"))
    img = _save(fig, dest / "skymap.png", rep)
    rep.numbers["objects"] = len(objects)
    return "<h2>Sky map of the objects</h2>" + img


def _section_variables(out: Path, objects: pd.DataFrame, dest: Path, rep: Report, top: int) -> str:
    if "p_periodic" not in objects or not np.isfinite(objects["p_periodic"].to_numpy(float)).any():
        return ("<h2>Periodic variables</h2><p>No object was classified (too few epochs or a short baseline, or "
                "the classify stage was switched off): objects/ has no p_periodic.</p>")
    cand = periodic_candidates(objects, top)
    if cand.empty:
        return ("<h2>Periodic variables</h2><p>No classified object has a period (single events and curves too "
                "short for a period search have none): nothing to fold.</p>")
    ids = cand["object_id"].to_numpy()
    lc = _read(out / "lightcurves", ["object_id", "mjd", "mag", "mag_err", "flags"],
               filters=[("object_id", "in", [int(i) for i in ids])])
    parts, rows = [], []
    for _, o in cand.iterrows():
        oid = int(o["object_id"])
        c = lc[lc["object_id"] == oid]
        period = float(o["period"]) if np.isfinite(o.get("period", np.nan)) else float("nan")
        t0 = float(o["t0_mjd"]) if np.isfinite(o.get("t0_mjd", np.nan)) else float("nan")
        path = dest / f"variable-{oid}.png"
        counts = plot_lightcurve(c, period, t0, path,
                                 title=f"object {oid} (field {o['field']}): {o.get('var_class')}, "
                                       f"p_periodic {o['p_periodic']:.3f}")
        rep.plots.append(path)
        parts.append(f'<div class="var"><img src="{html.escape(path.name)}" alt="{html.escape(path.stem)}"></div>')
        rows.append({"object_id": oid, "field": o["field"], "var_class": o.get("var_class"),
                     "p_periodic": o["p_periodic"], "period (d)": period, "mag_mean": o.get("mag_mean"),
                     "points": len(c), "forced": counts["forced"], "forced without mag": counts["forced_nan"]})
    rep.numbers["variables_shown"] = len(rows)
    return (f"<h2>Periodic variables: the top {len(rows)} by p_periodic</h2>"
            + _table(rows, {"object_id": "d", "field": "s", "var_class": "s", "period (d)": ".5f", "points": "d",
                            "forced": "d", "forced without mag": "d"})
            + '<p class="note">Detected points in blue, forced points (flag FORCED) in orange; forced points with '
              'negative flux have no magnitude and are not drawn. Folded twice over phase 0-2.</p>' + "".join(parts))


def periodic_candidates(objects: pd.DataFrame, top: int) -> pd.DataFrame:
    """The objects the report plots as periodic variables: the ``top`` by ``p_periodic`` that have a period.

    Objects without a finite, positive ``period`` (single events, curves too short for a search)
    cannot be folded and are left out; ties in ``p_periodic`` go to the lower ``object_id``.

    Parameters
    ----------
    objects
        The run's objects (``object_id``, ``p_periodic``, ``period`` in days).
    top
        How many.

    Returns
    -------
    DataFrame
        Those rows, highest ``p_periodic`` first.
    """
    p = objects["p_periodic"].to_numpy(float)
    period = objects["period"].to_numpy(float) if "period" in objects else np.full(len(objects), np.nan)
    ok = np.isfinite(p) & np.isfinite(period) & (period > 0)
    return objects[ok].sort_values(["p_periodic", "object_id"], ascending=[False, True]).head(top)


def plot_lightcurve(lc: pd.DataFrame, period: float, t0: float, path: str | Path, title: str = "") -> dict[str, int]:
    """Plot one light curve raw (mag against MJD) and folded at ``period``; forced points in another colour.

    Parameters
    ----------
    lc
        The object's light-curve points: ``mjd`` (days), ``mag``, ``mag_err`` (mag), ``flags``.
        Forced points (``flags & FORCED``) are drawn in orange, detections in blue; points whose
        ``mag`` is NaN (a forced measurement of negative flux) are counted, not drawn.
    period
        Folding period (days); NaN or <= 0: the folded panel says "no period".
    t0
        Epoch of phase 0 (MJD); NaN: the first point's MJD.
    path
        The PNG to write.
    title
        The figure's title.

    Returns
    -------
    dict
        ``detected`` and ``forced`` (points drawn of each kind) and ``forced_nan`` (forced points
        without a magnitude).
    """
    c = lc.sort_values("mjd")
    forced = (c["flags"].to_numpy() & FORCED) != 0
    fin = np.isfinite(c["mag"].to_numpy(float))
    if not math.isfinite(t0):
        t0 = float(c["mjd"].min()) if len(c) else 0.0
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    can_fold = math.isfinite(period) and period > 0
    for sel, colour, lab in ((~forced & fin, DETECTED_COLOUR, "detected"), (forced & fin, FORCED_COLOUR, "forced")):
        if not sel.any():
            continue
        d = c[sel]
        ax1.errorbar(d["mjd"], d["mag"], yerr=d["mag_err"], fmt=".", ms=3, lw=0.5, color=colour,
                     label=f"{lab} ({int(sel.sum())})")
        if can_fold:
            ph = ((d["mjd"].to_numpy() - t0) / period) % 1.0
            for shift in (0.0, 1.0):
                ax2.errorbar(ph + shift, d["mag"], yerr=d["mag_err"], fmt=".", ms=3, lw=0.5, color=colour)
    n_nan = int((forced & ~fin).sum())
    mags = c["mag"].to_numpy(float)[fin]
    # the magnitudes set the range, not the error bars (a faint forced point's can span 20 mag)
    lo, hi = (np.percentile(mags, [0.5, 99.5]) if len(mags) else (0.0, 1.0))
    pad = 0.1 * (hi - lo) + 0.05
    for ax in (ax1, ax2):
        ax.set_ylim(hi + pad, lo - pad)  # brighter up
        ax.grid(alpha=0.3)
        ax.set_ylabel("mag")
    ax1.set_xlabel("MJD")
    ax1.ticklabel_format(axis="x", useOffset=False)
    if (fin).any():
        ax1.legend(fontsize=7, title=f"{n_nan} forced without mag (flux < 0)" if n_nan else None, title_fontsize=7)
    ax2.set_xlabel(f"phase (P = {period:.5f} d)" if can_fold else "no period")
    fig.suptitle(title, fontsize=10)
    fig.savefig(Path(path), dpi=DPI, bbox_inches="tight")
    return {"detected": int((~forced & fin).sum()), "forced": int((forced & fin).sum()), "forced_nan": n_nan}

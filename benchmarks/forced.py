"""Forced-photometry benchmark: complete light curves, honest forced fluxes, and what they change.

    python -m benchmarks.forced [--scenario dense|sparse] [--epochs 40] [--size 256] [--out bench-out/forced]
                                [--background masked|mesh]

Simulates the held-out survey (``benchmarks/scenarios/<scenario>-heldout.toml``, seeds > 1000,
never trained on) unless it exists, runs the default pipeline (forced photometry on), and
measures against the simulator's truth:

- **Completeness of the light curves**: for objects at least 5 px inside the reference frame
  (so inside every dithered epoch), the fraction of calibrated epochs with a point, with and
  without the forced points.
- **Forced fluxes of constant, isolated stars** (no true star brighter than 1/10 of it within
  3 FWHM): ``z = (flux - s F_true) / flux_err`` with ``s`` the bright stars' flux scale (the
  aperture correction's error, which the zero point absorbs): (a) the forced points as written
  (epochs that missed the star: conditioned on the noise that hid it, so biased low by
  construction), (b) the same measurement in every epoch (:func:`survey_proc.stages.forced.measure_epoch`
  with no detection excluded), the unconditional figure. Median, NMAD, 5-sigma-clipped std.
- **Mean magnitudes of faint constant stars**: ``mag_mean`` - true magnitude per magnitude bin,
  from all points and from the detections only (the Eddington bias a detection-only light
  curve carries near the limit).
- **Eclipsing binaries**: the share of their in-eclipse epochs (true magnitude more than half
  the depth below the median) that have a point, with and without the forced points.
- **Cost**: the stage's wall time against the run's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from survey_proc import store as st
from survey_proc import vocab as F
from survey_proc.evaluate import load_truth_stars, match_one_to_one, truth_at_epoch
from survey_proc.simulate import load_scenario, simulate_survey

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
MAG_BINS = np.arange(14.0, 27.0, 1.0)


def _table(out: Path, kind: str) -> pd.DataFrame:
    return pd.concat([pq.read_table(f).to_pandas() for f in sorted((out / kind).rglob("*.parquet"))],
                     ignore_index=True)


def _zstats(z: np.ndarray) -> dict[str, float]:
    z = z[np.isfinite(z)]
    if not len(z):
        return {"n": 0}
    med = float(np.median(z))
    nmad = float(1.4826 * np.median(np.abs(z - med)))
    keep = np.abs(z - med) < 5 * nmad
    return {"n": len(z), "median": med, "nmad": nmad, "std_clipped5": float(np.std(z[keep])),
            "clipped_fraction": float(1 - keep.mean())}


def _isolated_constant(objects: pd.DataFrame, truth: pd.DataFrame, i_o: np.ndarray, i_t: np.ndarray,
                       fwhm_px: float) -> dict[int, int]:
    """object_id -> star_id of the matched pairs ``(i_o, i_t)`` whose star is constant with no bright neighbour."""
    from scipy.spatial import cKDTree

    tx, ty = truth["x"].to_numpy(), truth["y"].to_numpy()
    tf = 10 ** (-0.4 * truth["mag"].to_numpy())
    tree = cKDTree(np.c_[tx, ty])
    crowd = np.zeros(len(truth), bool)
    for i, nb in enumerate(tree.query_ball_point(np.c_[tx, ty], 3 * fwhm_px)):
        crowd[i] = any(j != i and tf[j] > 0.1 * tf[i] for j in nb)
    keep = (truth["var_class"].to_numpy()[i_t] == "constant") & ~crowd[i_t]
    return dict(zip(objects["object_id"].to_numpy()[i_o][keep].tolist(),
                    truth["star_id"].to_numpy()[i_t][keep].tolist(), strict=True))


def measure(out: Path, survey: Path, cfg: Any, run: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the module docstring for one finished run."""
    from survey_proc.catalog.crossmatch import region_grid
    from survey_proc.stages.extract import read_epoch
    from survey_proc.stages.forced import measure_epoch

    field = st.list_fields(survey)[0]
    objects = _table(out, "objects")
    lc = _table(out, "lightcurves")
    truth = load_truth_stars(survey, field)
    n_ep, ny, nx = st.image_shape(survey, field)
    epochs = pd.read_parquet(out / "epochs.parquet")
    calibrated = sorted(int(e) for e in epochs.loc[np.isfinite(epochs["zp"]), "epoch"])
    fwhm = float(np.median(epochs["fwhm_px"]))
    res: dict[str, Any] = {"field": field, "epochs": n_ep, "size_px": [ny, nx], "calibrated_epochs": len(calibrated),
                           "objects": len(objects), "points": len(lc),
                           "forced_points": int(lc["source_id"].isna().sum()),
                           "forced_s": run["timings_s"].get("forced_s"), "total_s": run["timings_s"].get("total_s")}
    # completeness of the light curves
    inner = objects[(objects["x"] > 5) & (objects["x"] < nx - 6) & (objects["y"] > 5) & (objects["y"] < ny - 6)]
    det = lc[lc["source_id"].notna()]
    n_all = lc.groupby("object_id").size().reindex(inner["object_id"]).fillna(0).to_numpy()
    n_det = det.groupby("object_id").size().reindex(inner["object_id"]).fillna(0).to_numpy()
    res["completeness"] = {"objects_inner": len(inner),
                           "fraction_with_forced_median": float(np.median(n_all / len(calibrated))),
                           "fraction_with_forced_min": float(np.min(n_all / len(calibrated))) if len(inner) else None,
                           "objects_complete_with_forced": float(np.mean(n_all == len(calibrated))),
                           "fraction_detections_only_median": float(np.median(n_det / len(calibrated))),
                           "objects_complete_detections_only": float(np.mean(n_det == len(calibrated)))}
    # forced fluxes of constant isolated stars
    i_o, i_t = match_one_to_one(objects["x"].to_numpy(), objects["y"].to_numpy(), truth["x"].to_numpy(),
                                truth["y"].to_numpy(), radius_px=1.0)
    star_of = _isolated_constant(objects, truth, i_o, i_t, fwhm)
    attrs = st.field_attrs(survey, field)
    regions = {r.index: r for r in region_grid(ny, nx, cfg.crossmatch.region_px)}
    rows_all, rows_written = [], []
    sel = objects[objects["object_id"].isin(star_of)]
    for e in calibrated:
        rec, _ = read_epoch(str(out), field, e, columns=["x"])
        ep = {"epoch": e, "mjd": rec.mjd, "band": rec.band, "fwhm_px": rec.fwhm_px, "apcorr": rec.apcorr,
              "zp": rec.zp.to_dict()}
        t = truth_at_epoch(survey, field, e, in_frame_only=False).set_index("star_id")
        for r, objs in sel.groupby("region"):
            pts = measure_epoch(str(survey), str(out), field, regions[int(r)], ep, objs, set(), (ny, nx),
                                float(attrs["gain_e_per_adu"]), float(attrs.get("saturation_adu", np.inf)), cfg)
            pts = pts[(pts["flags"].to_numpy() & F.PHOTOMETRY_BAD & ~F.NONPOSITIVE) == 0]
            pts["f_true"] = t["flux_adu"].reindex([star_of[o] for o in pts["object_id"]]).to_numpy()
            rows_all.append(pts[["object_id", "epoch", "flux", "flux_err", "f_true"]])
        w = lc[lc["source_id"].isna() & (lc["epoch"] == e) & lc["object_id"].isin(star_of)]
        w = w[(w["flags"].to_numpy() & F.PHOTOMETRY_BAD & ~F.NONPOSITIVE) == 0]
        rows_written.append(w.assign(f_true=t["flux_adu"].reindex([star_of[o] for o in w["object_id"]]).to_numpy()))
    a = pd.concat(rows_all, ignore_index=True)
    snr = a["f_true"] / a["flux_err"]
    bright = snr >= 30
    scale = float(np.median(a.loc[bright, "flux"] / a.loc[bright, "f_true"])) if bright.sum() >= 20 else 1.0
    res["forced_flux_scale_bright"] = scale
    z_all = ((a["flux"] - scale * a["f_true"]) / a["flux_err"]).to_numpy()
    bins_snr = ((0, 5), (5, 10), (10, 30), (30, 10**9))
    res["forced_z_every_epoch"] = {f"snr_{lo}_{hi}": _zstats(z_all[(snr >= lo) & (snr < hi)]) for lo, hi in bins_snr}
    res["forced_z_every_epoch"]["snr_3_30"] = _zstats(z_all[(snr >= 3) & (snr < 30)])
    wr = pd.concat(rows_written, ignore_index=True)
    res["forced_z_as_written"] = _zstats(((wr["flux"] - scale * wr["f_true"]) / wr["flux_err"]).to_numpy())
    # mean magnitudes of constant stars: all points vs detections only
    from survey_proc.catalog.crossmatch import object_stats

    det_stats = object_stats(det.rename(columns={"object_id": "obj"})).reindex(objects["object_id"])
    const = truth["var_class"].to_numpy()[i_t] == "constant"
    tm = truth["mag"].to_numpy()[i_t][const]
    dm_all = objects["mag_mean"].to_numpy()[i_o][const] - tm
    dm_det = det_stats["mag_mean"].to_numpy()[i_o][const] - tm
    ok = np.isfinite(dm_all) & np.isfinite(dm_det)
    zp_off = float(np.median(dm_all[ok & (tm < np.percentile(tm, 30))]))  # the bright stars' offset (zero point)
    bins = []
    for lo in MAG_BINS:
        m = ok & (tm >= lo) & (tm < lo + 1)
        if m.sum() >= 10:
            bins.append({"mag": float(lo), "n": int(m.sum()),
                         "bias_all_points": float(np.median(dm_all[m]) - zp_off),
                         "bias_detections_only": float(np.median(dm_det[m]) - zp_off)})
    res["mag_mean_bias_bins"] = bins
    # eclipsing binaries: in-eclipse epochs with a point
    eb = truth[truth["var_class"] == "eclipsing_binary"]
    if len(eb):
        per_epoch = {e: truth_at_epoch(survey, field, e, in_frame_only=False).set_index("star_id")["mag_epoch"]
                     for e in calibrated}
        mags = pd.DataFrame(per_epoch).reindex(eb["star_id"])
        depth = mags.max(axis=1) - mags.median(axis=1)
        in_ecl = mags.sub(mags.median(axis=1), axis=0).gt(0.5 * depth, axis=0) & (depth > 0.05).to_numpy()[:, None]
        i_o, i_t = match_one_to_one(objects["x"].to_numpy(), objects["y"].to_numpy(), eb["x"].to_numpy(),
                                    eb["y"].to_numpy(), radius_px=1.0)
        have_all = set(zip(lc["object_id"], lc["epoch"], strict=True))
        have_det = set(zip(det["object_id"], det["epoch"], strict=True))
        n_ecl = n_all_pts = n_det_pts = 0
        for o, s in zip(objects["object_id"].to_numpy()[i_o], eb["star_id"].to_numpy()[i_t], strict=True):
            eps = [int(e) for e in in_ecl.columns[in_ecl.loc[s].to_numpy()]]
            n_ecl += len(eps)
            n_all_pts += sum((o, e) in have_all for e in eps)
            n_det_pts += sum((o, e) in have_det for e in eps)
        res["eclipsing_binaries"] = {"objects": len(i_o), "in_eclipse_epochs": n_ecl,
                                     "with_point_all": n_all_pts / n_ecl if n_ecl else None,
                                     "with_point_detections_only": n_det_pts / n_ecl if n_ecl else None}
    return res


def markdown(res: dict[str, Any], cmd: str) -> str:
    """The tables of RESULTS.md for one result."""
    c = res["completeness"]
    lines = [f"`{cmd}`: {res['size_px'][0]}² x {res['epochs']} epochs, {res['objects']} objects, "
             f"{res['forced_points']} forced points of {res['points']}; forced stage {res['forced_s']:.1f} s of "
             f"{res['total_s']:.1f} s.", "",
             "| light curves (objects >= 5 px inside) | with forced points | detections only |", "|---|---|---|",
             f"| median fraction of epochs with a point | {c['fraction_with_forced_median']:.3f} | "
             f"{c['fraction_detections_only_median']:.3f} |",
             f"| objects with a point in every epoch | {c['objects_complete_with_forced']:.3f} | "
             f"{c['objects_complete_detections_only']:.3f} |"]
    e = res.get("eclipsing_binaries")
    if e and e["in_eclipse_epochs"]:
        lines.append(f"| eclipsing binaries: in-eclipse epochs with a point ({e['in_eclipse_epochs']}) | "
                     f"{e['with_point_all']:.3f} | {e['with_point_detections_only']:.3f} |")
    lines += ["", f"Forced fluxes of constant isolated stars (flux scale of the bright ones: "
                  f"{res['forced_flux_scale_bright']:.4f}):", "",
              "| sample | n | median z | NMAD z | 5σ-clipped std | clipped |", "|---|---|---|---|---|---|"]
    rows = [("as written (epochs that missed the star)", res["forced_z_as_written"])]
    rows += [(f"every epoch, S/N {k[4:].replace('_', '-')}", v) for k, v in res["forced_z_every_epoch"].items()]
    for name, z in rows:
        if z.get("n"):
            lines.append(f"| {name} | {z['n']} | {z['median']:+.3f} | {z['nmad']:.3f} | {z['std_clipped5']:.3f} | "
                         f"{z['clipped_fraction']:.3f} |")
    lines += ["", "Mean magnitude of constant stars minus truth (bright stars' offset removed):", "",
              "| mag | n | all points | detections only |", "|---|---|---|---|"]
    for b in res["mag_mean_bias_bins"]:
        lines.append(f"| {b['mag']:.0f}-{b['mag'] + 1:.0f} | {b['n']} | {b['bias_all_points']:+.4f} | "
                     f"{b['bias_detections_only']:+.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line: simulate if needed, run the pipeline, measure, write JSON and Markdown."""
    from survey_proc.config import load_config
    from survey_proc.distributed.cluster import local_client
    from survey_proc.distributed.pipeline import run_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="sparse", choices=("dense", "sparse"))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("bench-out/forced"))
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--background", default=None, choices=("masked", "mesh"),
                    help="the photometry's background (default: the configuration's)")
    a = ap.parse_args()
    scn = load_scenario(str(SCENARIOS / f"{a.scenario}-heldout.toml"), {"n_epochs": a.epochs, "size_px": a.size})
    base = a.out / f"{a.scenario}-{a.size}px-{a.epochs}ep"
    base.mkdir(parents=True, exist_ok=True)
    survey = base / "survey.zarr"
    if not survey.exists():
        simulate_survey(scn, survey, workers=a.workers or 0, progress=False)
    out = base / ("out" if a.background is None else f"out-{a.background}")
    shutil.rmtree(out, ignore_errors=True)
    over: dict[str, Any] = {"store": str(survey), "out": str(out), "progress": False, "evaluate": False}
    if a.background:
        over["photometry"] = {"background": a.background}
    cfg = load_config(None, over)
    t0 = time.perf_counter()
    with local_client(a.workers, quiet=True) as client:
        run = run_pipeline(cfg, client=client)
    res = measure(out, survey, cfg, run)
    res["wall_s"] = time.perf_counter() - t0
    cmd = (f"python -m benchmarks.forced --scenario {a.scenario} --epochs {a.epochs} --size {a.size}"
           + (f" --workers {a.workers}" if a.workers else "")
           + (f" --background {a.background}" if a.background else ""))
    res["command"] = cmd
    tag = "" if a.background is None else f"-{a.background}"
    (base / f"forced{tag}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res, cmd)
    (base / f"forced{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

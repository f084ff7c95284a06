"""Issue 22: is a periodic candidate's varying light on the object, or on a faint neighbour (a blend)?

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/blend_centroid.py --run OUT --store S.zarr \\
        [--json FILE] [--n-boot 100] [--stamp 15]

For every periodic call of the run (objects with ``var_class`` in ``PERIODIC_CLASSES``) the
script cuts, in every epoch, a stamp around the object's position in that epoch (the
reference -> epoch map fitted on the epoch's clean sources with
:func:`survey_proc.catalog.frame_map.fit_frame_map`, as the forced-photometry stage does;
each epoch's image is read once and all candidates' stamps are cut from it), builds the
object's phase-binned model from its light curve and runs
:func:`survey_proc.lightcurves.blend_vetting.vet_blend` (variability image, Gaussian centroid,
bootstrap over epochs). Stamps and fluxes are put on one photometric scale by the epochs'
zero points (``epochs.parquet``); the epochs' FWHM is a nuisance regressor. The classify stage
runs the same measurement on every run (``[classify] blend_vetting``, :mod:`survey_proc.stages.blend_io`,
whose stamp cutter this script shares); this script keeps its own frame maps (fitted on all of an
epoch's clean stars, the stage's on those near the region) and adds the truth labels.

Label of a call: TRUE when a true periodic star (truth ``var_class`` in ``PERIODIC_CLASSES``)
lies within 1 px of the object, else FP. Per candidate the script prints the label, the
distance to the nearest true periodic star, the measured offset of the varying light and its
sigma and significance, and the distance from the varying light's position (object +
offset) to the nearest true periodic star; then, for a grid of rules "offset > T px and
offset / sigma_offset > k", how many FPs and how many TRUE calls each rule flags.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from benchmarks.classify import truth_table
from survey_proc import storage, store
from survey_proc import vocab as F
from survey_proc.catalog.frame_map import fit_frame_map
from survey_proc.errors import SurveyProcError
from survey_proc.lightcurves.blend_vetting import model_variation, vet_blend
from survey_proc.stages.blend_io import LC_BAD, cut_stamps, frame_jacobian
from survey_proc.stages.extract import SOURCES_UNIT

T_GRID = (0.5, 0.7, 0.9, 1.0, 1.2, 1.4)
K_GRID = (3.0, 5.0, 10.0)
FRAME_SNR_MIN = 10.0  # the forced stage's default (forced.frame_snr_min)


def measure(run: str, store_path: str, *, n_boot: int = 100, stamp_px: int = 15, seed: int = 0) -> pd.DataFrame:
    """One row per periodic call of ``run``: its label and where its varying light is (see the module doc)."""
    objects = pd.read_parquet(Path(run) / "objects")
    cand = objects[objects["var_class"].isin(F.PERIODIC_CLASSES)].reset_index(drop=True)
    epochs = pd.read_parquet(Path(run) / "epochs.parquet")
    truth = truth_table(store_path)
    pst = truth[truth["var_class"].isin(F.PERIODIC_CLASSES)]
    ptree = cKDTree(pst[["x", "y"]].to_numpy(float))
    r = stamp_px // 2
    rows: list[dict[str, Any]] = []
    for field, cf in cand.groupby("field", sort=True):
        ep = epochs[epochs["field"] == field].sort_values("epoch").reset_index(drop=True)
        n_ep = len(ep)
        zp_med = float(np.nanmedian(ep["zp"]))
        scale = 10.0 ** (-0.4 * (ep["zp"].to_numpy(float) - zp_med))
        xo, yo = cf["x"].to_numpy(float), cf["y"].to_numpy(float)
        nc = len(cf)
        stamps = np.full((nc, n_ep, stamp_px, stamp_px), np.nan, np.float32)
        dxs, dys = np.full((nc, n_ep), np.nan), np.full((nc, n_ep), np.nan)
        jac = np.zeros((nc, 2, 2))
        n_jac = 0
        _, ny, nx = store.image_shape(store_path, str(field))
        reader = store.PixelReader(store_path, str(field))
        t_read = time.perf_counter()
        for i, e in enumerate(ep["epoch"].to_numpy(int)):
            src = storage.read_table(SOURCES_UNIT.path(run, field=field, epoch=int(e)),
                                     columns=["x", "y", "x_ref", "y_ref", "flags", "snr"]).to_pandas()
            clean = ((src["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0) & (src["snr"].to_numpy() >= FRAME_SNR_MIN)
            try:
                fmap = fit_frame_map(src["x_ref"].to_numpy(float)[clean], src["y_ref"].to_numpy(float)[clean],
                                     src["x"].to_numpy(float)[clean], src["y"].to_numpy(float)[clean],
                                     what=f"field {field} epoch {e}")
            except SurveyProcError as exc:  # an unmappable epoch is left out, as in the forced stage
                print(f"  {exc}")
                continue
            xe, ye = fmap(xo, yo)
            jac += frame_jacobian(fmap, xo, yo)
            n_jac += 1
            image, mask = reader.window(int(e), 0, ny, 0, nx)
            st, dxs[:, i], dys[:, i] = cut_stamps(image, xe, ye, r, mask)
            stamps[:, i] = st * np.float32(scale[i])
        jac /= max(n_jac, 1)
        t_read = time.perf_counter() - t_read
        ids = cf["object_id"].to_numpy()
        lc = pd.read_parquet(Path(run) / "lightcurves", columns=["object_id", "epoch", "flux", "flags"],
                             filters=[("object_id", "in", ids.tolist())])
        lc = lc[(lc["flags"].to_numpy() & LC_BAD) == 0]
        e_index = pd.Series(np.arange(n_ep), index=ep["epoch"].to_numpy(int))
        mjd = ep["mjd"].to_numpy(float)
        fwhm = ep["fwhm_px"].to_numpy(float)
        for j in range(nc):
            t0 = time.perf_counter()
            o = cf.iloc[j]
            d_true, _ = ptree.query([o["x"], o["y"]])
            row: dict[str, Any] = {
                "object_id": int(o["object_id"]), "var_class": o["var_class"], "mag_median": float(o["mag_median"]),
                "period": float(o["period"]), "label": "TRUE" if d_true <= 1.0 else "FP", "d_true": float(d_true)}
            lj = lc[lc["object_id"] == o["object_id"]]
            flux = np.full(n_ep, np.nan)
            k = e_index.reindex(lj["epoch"].to_numpy(int)).to_numpy()
            ok = np.isfinite(k)
            flux[k[ok].astype(int)] = lj["flux"].to_numpy(float)[ok] * scale[k[ok].astype(int)]
            try:
                m = model_variation(mjd, flux, float(o["period"]), float(o["t0_mjd"]))
                res = vet_blend(stamps[j], dxs[j], dys[j], m, fwhm_px=float(np.nanmedian(fwhm)), jacobian=jac[j],
                                nuisance=fwhm[:, None], n_boot=n_boot, seed=seed)
            except ValueError as exc:
                row.update(error=str(exc))
                rows.append(row)
                continue
            d_var, _ = ptree.query([o["x"] + res.dx, o["y"] + res.dy])
            row.update(dx=res.dx, dy=res.dy, offset=res.offset, sigma_offset=res.sigma_offset,
                       significance=res.offset_significance, amp_snr=res.amplitude_snr, n_epochs=res.n_epochs,
                       at_bound=res.at_bound,
                       d_varpos_true=float(d_var), t_fit_s=time.perf_counter() - t0,
                       t_read_s_per_cand=t_read / nc)
            rows.append(row)
    return pd.DataFrame(rows)


def rule_table(df: pd.DataFrame, t_grid: tuple[float, ...] = T_GRID, k_grid: tuple[float, ...] = K_GRID
               ) -> pd.DataFrame:
    """For each rule ``offset > T and offset / sigma_offset > k``: FPs and TRUE calls flagged, of how many."""
    out = []
    ok = df["offset"].notna() if "offset" in df else pd.Series(False, index=df.index)
    for t in t_grid:
        for k in k_grid:
            flag = ok & (df.get("offset", np.nan) > t) & (df.get("offset", np.nan) > k * df.get("sigma_offset", np.nan))
            out.append({"T_px": t, "k": k, "fp_flagged": int((flag & (df["label"] == "FP")).sum()),
                        "fp": int((df["label"] == "FP").sum()),
                        "true_flagged": int((flag & (df["label"] == "TRUE")).sum()),
                        "true": int((df["label"] == "TRUE").sum())})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    """CLI: measure one run, print the candidates and the rule grid, write JSON if asked."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--json")
    ap.add_argument("--n-boot", type=int, default=100)
    ap.add_argument("--stamp", type=int, default=15)
    a = ap.parse_args(argv)
    t = time.perf_counter()
    df = measure(a.run, a.store, n_boot=a.n_boot, stamp_px=a.stamp)
    wall = time.perf_counter() - t
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.precision", 3):
        cols = [c for c in ("object_id", "var_class", "mag_median", "label", "d_true", "dx", "dy", "offset",
                            "sigma_offset", "significance", "amp_snr", "at_bound", "d_varpos_true", "error") if c in df]
        print(df[cols].to_string(index=False))
        rt = rule_table(df)
        print(rt.to_string(index=False))
    print(f"{len(df)} candidates, wall {wall:.1f} s ({wall / max(len(df), 1):.2f} s per candidate)")
    if a.json:
        Path(a.json).write_text(json.dumps({"run": a.run, "store": a.store, "wall_s": wall, "n_boot": a.n_boot,
                                            "stamp_px": a.stamp, "candidates": df.to_dict(orient="records"),
                                            "rules": rt.to_dict(orient="records")}, indent=1, default=str))


if __name__ == "__main__":
    main()

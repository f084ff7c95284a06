"""Calibration benchmark (issue 19): zero points, per-epoch offsets of constant stars, false periodics.

    PYTHONPATH=. python benchmarks/calibration.py --run OUT --store STORE [--json FILE]

``STORE`` is a *held-out* simulated survey (seed > 1000 or one no model was trained on) and
``OUT`` a ``survey-proc run`` output of it. Figures (per field):

- **epochs**: how many, by zero-point status (``fit``, ``fit_few``, ``model``; failed ones
  are missing from ``epochs.parquet``'s calibrated rows), the share from the model;
- **zero point − truth**: rms, median and max |.| over calibrated epochs (strict, i.e. with
  the absolute level included), and the rms after removing the median (the relative part);
  the truth zero point is that of total flux, so aperture-correction errors count here;
- **per-epoch offset residual of constant stars**: the light-curve points of objects matched
  one-to-one (within 1 px) to true *constant* stars at least 2 mag brighter than the 5σ
  limit, residual ``mag − true mag``; the median per epoch, then the rms over epochs about
  the median of those (mmag). This is what a light curve sees of the calibration;
- **constants called periodic**: matched constant stars whose object is classified and
  called periodic (``var_class`` in eclipsing_binary/pulsator/transit), over the matched
  constant stars that were classified.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from survey_proc.evaluate import load_truth_epochs, load_truth_stars, load_truth_summary, match_one_to_one
from survey_proc.vocab import PERIODIC_CLASSES, PHOTOMETRY_BAD


def calibration_figures(out: str | Path, store: str | Path) -> dict:
    """The figures of the module docstring, per field."""
    out = Path(out)
    epochs = pd.read_parquet(out / "epochs.parquet")
    truth_ep = load_truth_epochs(store)
    summary = load_truth_summary(store)
    limit = float(summary["limiting_mag_5sigma_psf_crlb"])
    stars = load_truth_stars(store, in_frame_only=True)
    run = json.loads((out / "run.json").read_text())
    res: dict = {}
    for fid, ep in epochs.groupby("field"):
        fid = str(fid)
        t = truth_ep[truth_ep["field"] == fid].set_index("epoch")["zeropoint"]
        ep = ep.set_index("epoch")
        cal = ep[np.isfinite(ep["zp"])]
        dz = (cal["zp"] - t.reindex(cal.index)).dropna()
        n_failed = sum(1 for f in run.get("failures", []) if f.get("field") == fid)
        status = ep["zp_status"].value_counts().to_dict()
        f: dict = {"n_epochs": len(ep), "status": {str(k): int(v) for k, v in status.items()},
                   "n_failed": n_failed, "model_fraction": float(status.get("model", 0)) / max(len(ep), 1),
                   "zp_minus_truth_rms": float(np.sqrt(np.mean(dz**2))) if len(dz) else None,
                   "zp_minus_truth_median": float(np.median(dz)) if len(dz) else None,
                   "zp_minus_truth_max_abs": float(np.abs(dz).max()) if len(dz) else None,
                   "zp_minus_truth_rms_relative": float(np.sqrt(np.mean((dz - dz.median()) ** 2))) if len(dz) else None}
        objdir = out / "objects" / f"field={fid}"
        if objdir.exists():
            obj = pd.read_parquet(objdir)
            lc = pd.read_parquet(out / "lightcurves" / f"field={fid}")
            st = stars[stars["field"] == fid].reset_index(drop=True)
            i_o, i_s = match_one_to_one(obj["x"].to_numpy(), obj["y"].to_numpy(), st["x"].to_numpy(),
                                        st["y"].to_numpy(), 1.0)
            m = pd.DataFrame({"object_id": obj["object_id"].to_numpy()[i_o], "true_mag": st["mag"].to_numpy()[i_s],
                              "var_class_true": st["var_class"].to_numpy()[i_s],
                              "var_class": obj["var_class"].to_numpy()[i_o],
                              "classified": obj["n_points_classified"].to_numpy()[i_o] > 0})
            const = m[m["var_class_true"] == "constant"]
            bright = const[const["true_mag"] < limit - 2.0]
            pts = lc[lc["object_id"].isin(bright["object_id"]) & ((lc["flags"] & PHOTOMETRY_BAD) == 0)]
            pts = pts.merge(bright[["object_id", "true_mag"]], on="object_id")
            per_epoch = (pts["mag"] - pts["true_mag"]).groupby(pts["epoch"]).median()
            resid = per_epoch - per_epoch.median()
            called = const[const["classified"]]
            n_called = int(called["var_class"].isin(PERIODIC_CLASSES).sum())
            f.update({"n_constant_matched": len(const), "n_constant_bright": len(bright),
                      "offset_residual_rms_mmag": float(1000 * np.sqrt(np.mean(resid**2))) if len(resid) else None,
                      "offset_residual_nmad_mmag": float(1000 * 1.4826 * np.median(np.abs(resid))) if len(resid)
                      else None,
                      "constants_classified": len(called), "constants_called_periodic": n_called,
                      "constants_called_periodic_fraction": n_called / max(len(called), 1)})
        res[fid] = f
    return res


def main() -> None:
    """Command line: print (and optionally write) the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--json")
    a = ap.parse_args()
    res = calibration_figures(a.run, a.store)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

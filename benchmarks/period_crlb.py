"""Are pulsator period misses at the information limit? Each period error against its Cramér-Rao bound.

    PYTHONPATH=. python benchmarks/period_crlb.py --run OUT --store S.zarr [--json F]

For every periodic call of ``OUT`` (``var_class`` in ``PERIODIC_CLASSES``) paired with a true
pulsator of the simulated store within 1 px, the script compares the reported period with
the true one and computes the Cramér-Rao bound of the period of a sinusoid measured with the
object's own light curve: its clean points (no ``PHOTOMETRY_BAD`` flag but ``NONPOSITIVE``; detected
and forced),
their times and relative errors ``flux_err / median(flux)``, and the truth's amplitude. For
``y_i = A sin(2 pi f t_i + phi) + noise(sigma_i)`` the Fisher information of ``f`` is
``sum_i (2 pi (t_i - <t>) A)^2 / (2 sigma_i^2)`` (the cosine squared averaged to 1/2), so
``sigma_P / P = sigma_f / f = P / sqrt(I)``; ``A`` is the semi-amplitude in relative flux,
``0.921 x amplitude_mag / 2`` (a small-amplitude approximation; a pulsator is not a sinusoid,
its harmonics add information, so the bound is conservative by a little).

Printed: per pulsator, the true and reported periods, the relative error, the bound, and
whether the period is within 1 % (issue 22's criterion); then the fraction within 1 % for
pulsators whose bound is below and above 1 %.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from benchmarks.classify import truth_table
from survey_proc.vocab import NONPOSITIVE, PERIODIC_CLASSES, PHOTOMETRY_BAD

MAG_TO_REL_FLUX = 0.4 * np.log(10.0)  # d(flux)/flux per mag
BAD = PHOTOMETRY_BAD & ~NONPOSITIVE  # a negative forced flux is a measurement: it informs the period too


def pulsator_bounds(run: str, store_path: str) -> pd.DataFrame:
    """One row per true-pulsator call: periods, relative error and its Cramér-Rao bound (see the module doc)."""
    obj = pd.read_parquet(Path(run) / "objects")
    truth = truth_table(store_path)
    pst = truth[truth["var_class"].isin(PERIODIC_CLASSES)].reset_index(drop=True)
    calls = obj[obj["var_class"].isin(PERIODIC_CLASSES)].reset_index(drop=True)
    if not len(pst) or not len(calls):
        return pd.DataFrame()
    dist, idx = cKDTree(pst[["x", "y"]].to_numpy(float)).query(calls[["x", "y"]].to_numpy(float),
                                                               distance_upper_bound=1.0)
    lc = pd.read_parquet(Path(run) / "lightcurves", columns=["object_id", "mjd", "flux", "flux_err", "flags"])
    rows = []
    for i in np.flatnonzero(np.isfinite(dist)):
        t, c = pst.iloc[idx[i]], calls.iloc[i]
        if t["var_class"] != "pulsator":
            continue
        p = lc[(lc["object_id"].to_numpy() == c["object_id"]) & ((lc["flags"].to_numpy() & BAD) == 0)]
        f0 = float(np.median(p["flux"]))
        if not (f0 > 0 and len(p) > 2):
            continue
        sig = p["flux_err"].to_numpy(float) / f0
        tt = p["mjd"].to_numpy(float)
        amp = MAG_TO_REL_FLUX * float(t["amplitude"]) / 2.0
        info = float(np.sum((2 * np.pi * (tt - tt.mean()) * amp) ** 2 / (2 * sig**2)))
        rows.append({"object_id": int(c["object_id"]), "mag": float(t["mag"]), "amplitude_mag": float(t["amplitude"]),
                     "period_true_d": float(t["period"]), "period_d": float(c["period"]),
                     "rel_error": abs(float(c["period"]) / float(t["period"]) - 1.0),
                     "crlb_rel": float(t["period"]) / np.sqrt(info) if info > 0 else np.inf,
                     "cycles": float(np.ptp(tt)) / float(t["period"])})
    d = pd.DataFrame(rows)
    if len(d):
        d["within_1pct"] = d["rel_error"] <= 0.01
    return d


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    d = pulsator_bounds(args.run, args.store)
    if not len(d):
        print("no true-pulsator calls")
        return
    print(d.sort_values("crlb_rel").round(4).to_string(index=False))
    lo, hi = d[d["crlb_rel"] <= 0.01], d[d["crlb_rel"] > 0.01]
    summary = {"n": len(d), "within_1pct": float(d["within_1pct"].mean()),
               "bound_le_1pct": {"n": len(lo), "within_1pct": float(lo["within_1pct"].mean()) if len(lo) else None},
               "bound_gt_1pct": {"n": len(hi), "within_1pct": float(hi["within_1pct"].mean()) if len(hi) else None},
               "misses_median_bound": float(d.loc[~d["within_1pct"], "crlb_rel"].median())
               if (~d["within_1pct"]).any() else None}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": d.to_dict("records")}, indent=1))


if __name__ == "__main__":
    main()

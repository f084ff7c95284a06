"""Forced and detected points of constant stars in a crowded field, against their own detections.

    PYTHONPATH=. python benchmarks/forced_crowding.py OUT STORE [OUT2 ...]

For every object matched one-to-one (1 px) to a true constant star with no true variable
within 3 px, each light-curve point gets ``z = (mag - m_det) / mag_err`` with ``m_det`` the
median magnitude of the object's detected points (so a constant offset of the photometry
does not count). Per magnitude bin of the true magnitude and per kind of point (detected,
forced): the points, the std and NMAD of z, the fraction with |z| > 5 and the median z.
With several outputs of the same store, the table is printed for each (side by side runs:
e.g. ``[forced] subtract_neighbours`` off and on).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from survey_proc import vocab as F
from survey_proc.evaluate import load_truth_stars
from survey_proc.matching import match_one_to_one

BINS = ((18.0, 20.0), (20.0, 20.5), (20.5, 21.0), (21.0, 22.0), (22.0, 23.0), (23.0, 24.0))


def table(out: str, store: str) -> pd.DataFrame:
    """The z statistics of one run's constant isolated stars per magnitude bin and kind of point."""
    objects = pd.read_parquet(out + "/objects", columns=["object_id", "x", "y"])
    truth = load_truth_stars(store, in_frame_only=True)
    io, it = match_one_to_one(objects["x"].to_numpy(float), objects["y"].to_numpy(float),
                              truth["x"].to_numpy(float), truth["y"].to_numpy(float), 1.0)
    variable = truth[truth["var_class"] != "constant"]
    d_var = cKDTree(variable[["x", "y"]].to_numpy(float)).query(objects[["x", "y"]].to_numpy(float)[io])[0]
    m = pd.DataFrame({"object_id": objects["object_id"].to_numpy()[io], "true_mag": truth["mag"].to_numpy()[it],
                      "cls": truth["var_class"].to_numpy()[it]})
    m = m[(m["cls"] == "constant") & (d_var > 3.0)]
    lc = pd.read_parquet(out + "/lightcurves", columns=["object_id", "mag", "mag_err", "flags", "source_id"],
                         filters=[("object_id", "in", m["object_id"].tolist())]).merge(m, on="object_id")
    lc = lc[np.isfinite(lc["mag"]) & ((lc["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0)]
    forced = lc["source_id"].isna().to_numpy()
    m_det = lc[~forced].groupby("object_id")["mag"].median()
    lc["z"] = (lc["mag"] - lc["object_id"].map(m_det)) / lc["mag_err"]
    lc["forced"] = forced
    rows = []
    for lo, hi in BINS:
        for kind in (False, True):
            z = lc.loc[(lc["true_mag"] >= lo) & (lc["true_mag"] < hi) & (lc["forced"] == kind), "z"].dropna()
            if len(z) == 0:
                continue
            rows.append({"mag": f"{lo:g}-{hi:g}", "points": "forced" if kind else "detected", "n": len(z),
                         "std": float(z.std()), "nmad": float(1.4826 * np.median(np.abs(z - z.median()))),
                         "frac_abs_z_gt5": float((z.abs() > 5).mean()), "median": float(z.median())})
    return pd.DataFrame(rows)


def main(argv: list[str]) -> None:
    """Print one table per output."""
    store, outs = argv[1], [argv[0], *argv[2:]]
    for out in outs:
        print(f"## {out}")
        print(table(out, store).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main(sys.argv[1:])

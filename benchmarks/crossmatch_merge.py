"""Cross-match with and without merging alternate centroids, on a run's sources, against truth.

    PYTHONPATH=. python benchmarks/crossmatch_merge.py OUT STORE

Re-runs :func:`survey_proc.catalog.crossmatch.crossmatch_region` on every source of a
one-region run of a 512² field (region 0), with ``merge_radius_fwhm`` 0 and 1, and prints:
the objects; those with another object within 1.5 px; those with no true star (< 26 mag)
within 1 px; the true stars < 24 mag with an object within 1 px; and, for the merge, the
stars that lost their object within 1 px (their magnitude and nearest true neighbour).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from survey_proc.catalog import crossmatch as xm
from survey_proc.evaluate import load_truth_stars
from survey_proc.stages.crossmatch import XMATCH_COLUMNS


def main(out: str, store: str) -> None:
    """Print the comparison for the run ``out`` of the simulated ``store``."""
    src = pd.read_parquet(out + "/sources", columns=[c for c in XMATCH_COLUMNS if c != "field"])
    src = src[np.isfinite(src["x_ref"])]
    fwhm = float(np.median(pd.read_parquet(out + "/epochs.parquet")["fwhm_px"]))
    truth = load_truth_stars(store, in_frame_only=True)
    bright = truth[truth["mag"] < 24]
    faint = truth[truth["mag"] < 26]
    region = xm.Region(0, 0, 512, 0, 512)
    kept = None
    for merge in (0.0, 1.0):
        t0 = time.time()
        objs, _, info = xm.crossmatch_region(src, region, field="F000", field_index=0, fwhm_px=fwhm,
                                             match_radius_fwhm=0.5, match_radius_min_px=1.0, min_epochs=3,
                                             seed_bin_px=0.25, merge_radius_fwhm=merge)
        xy = objs[["x", "y"]].to_numpy(float)
        d_obj = cKDTree(xy).query(xy, k=2)[0][:, 1]
        d_star = cKDTree(faint[["x", "y"]].to_numpy(float)).query(xy)[0]
        d_bright = cKDTree(xy).query(bright[["x", "y"]].to_numpy(float))[0]
        print(f"merge_radius_fwhm {merge}: {len(objs)} objects ({info['n_merged']} merges); "
              f"with another object < 1.5 px: {(d_obj < 1.5).sum()}; no true star < 26 mag within 1 px: "
              f"{(d_star >= 1.0).sum()}; true stars < 24 mag with an object within 1 px: "
              f"{(d_bright < 1.0).sum()} of {len(bright)}; median detections per object "
              f"{np.median(objs['n_epochs']):.0f}; {time.time() - t0:.1f} s")
        if kept is None:
            kept = d_bright
            continue
        gone = (kept < 1.0) & (d_bright >= 1.0)
        lost = bright[gone]
        dn = cKDTree(faint[["x", "y"]].to_numpy(float)).query(lost[["x", "y"]].to_numpy(float), k=2)[0]
        print(f"  lost: {len(lost)} stars, mag {np.round(lost['mag'].to_numpy(), 1).tolist()}; nearest other true "
              f"star (px) {np.round(dn[:, 1], 2).tolist()}; now {np.round(d_bright[gone], 2).tolist()} px from an "
              "object")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

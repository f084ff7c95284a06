"""Classify-stage throughput on a finished run: light curves per second on one core (issue 22).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/classify_throughput.py --run OUT --store S.zarr \\
        [--repeat 2] [--refit-detrend] [--json F]

For every region of every field of ``OUT`` the script calls the classify stage's own region
task (:func:`survey_proc.stages.classify.classify_region_task`) in this process, with the
arguments the stage gives it (the run's ``[classify]`` settings from the default
configuration, the calibrated epochs of ``epochs.parquet``, the store for the blend vetting)
and the region's recorded classify fingerprint, so the objects file is rewritten with what
the stage wrote (the script leaves the run as it found it). The models are loaded before
the clock starts (a worker loads them once, not per task). It runs each region ``--repeat``
times with the blend vetting on, then once with it off (``[classify] blend_vetting =
false``) and once more on (the objects file ends as the stage writes it).

Definitions
-----------
- **Light curves**: the region's classified curves, the stage's own count (``n_classified``
  of the region's record: curves with enough points to be searched and classified).
- **Throughput**: light curves over the region task's wall time in one process with one
  thread (``OMP_NUM_THREADS=1``, torch one thread): curves per second per core. The
  per-field detrend fit (its own task, before the regions; its wall time as the run recorded
  it in ``calibration/field=<f>/detrend.parquet``) is reported with the throughput it gives when added.
- ``--refit-detrend``: the field's detrend fit is run again first (the stage's
  :func:`~survey_proc.stages.classify.detrend_field_task`, its recorded fingerprint and inputs) and
  timed here; with it the script re-runs the whole classify stage of a finished run with the code
  at hand (how the held-out outputs were re-classified to check that a change leaves them as they were).
- **Vetting**: the blend vetting's share (``classify.blend.wall_s``) and the part of it
  spent reading (frame maps and pixels, ``read_s``); ``n_frames_kept``: epochs mapped by the
  forced stage's kept frame maps.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd


def _epochs(out: str, field: str) -> list[dict[str, Any]]:
    ep = pd.read_parquet(Path(out) / "epochs.parquet")
    ep = ep[(ep["field"] == field) & ep["zp"].notna()]
    return [{"epoch": int(r.epoch), "mjd": float(r.mjd), "fwhm_px": float(r.fwhm_px), "zp": float(r.zp)}
            for r in ep.itertuples()]


def measure(out: str, store_path: str, repeat: int = 2, refit_detrend: bool = False) -> list[dict[str, Any]]:
    """One row per (field, region, mode, try): wall time, curves, vetting time (see the module doc)."""
    import torch

    from survey_proc import store
    from survey_proc.catalog import crossmatch as xm
    from survey_proc.config import load_config
    from survey_proc.distributed.plugins import worker_model
    from survey_proc.outputs import OutputLayout, read_meta
    from survey_proc.stages.classify import DETREND_UNIT, classify_region_task, detrend_field_task

    torch.set_num_threads(1)
    cfg = load_config(None)
    worker_model("classifier", cfg.classify.weights or None)
    worker_model("classifier_sparse", cfg.classify.sparse_weights or None)
    rows = []
    for field in store.list_fields(store_path):
        _, ny, nx = store.image_shape(store_path, field)
        epochs = _epochs(out, field)
        drec = read_meta(DETREND_UNIT.path(out, field=field)) or {}
        regions = xm.region_grid(ny, nx, cfg.crossmatch.region_px)
        if refit_detrend and "classify_fingerprint" in drec:
            drec = detrend_field_task(out, field, [r.index for r in regions], json.dumps(cfg.to_dict()),
                                      drec["classify_fingerprint"], drec.get("inputs"))
        detrend_s = float(drec.get("detrend", {}).get("wall_s", 0.0))  # the stage's own timing of the field's fit
        for reg in regions:
            meta = read_meta(OutputLayout(out).objects(field, reg.index))
            if meta is None or "classify_fingerprint" not in meta:
                continue
            pixels = {"store": store_path, "region": reg, "epochs": epochs, "image_shape": (ny, nx)}
            modes = ["vetting"] * repeat + ["no vetting", "vetting"]
            for k, mode in enumerate(modes):
                c = cfg if mode == "vetting" else replace(cfg, classify=replace(cfg.classify, blend_vetting=False))
                t = time.perf_counter()
                rec = classify_region_task(out, field, reg.index, json.dumps(c.to_dict()), meta["classify_fingerprint"],
                                           pixels)
                wall = time.perf_counter() - t
                b = rec.get("blend", {})
                rows.append({"field": field, "region": reg.index, "mode": mode, "try": k, "wall_s": wall,
                             "n_classified": int(rec.get("n_classified", 0)), "detrend_fit_s": detrend_s,
                             "vetting_s": float(b.get("wall_s", 0.0)), "read_s": float(b.get("read_s", 0.0)),
                             "n_candidates": int(b.get("n_candidates", 0)), "n_blended": int(b.get("n_blended", 0)),
                             "n_frames_kept": int(b.get("n_frames_kept", 0))})
                r = rows[-1]
                print(f"{field} region {reg.index} [{mode}]: {r['n_classified']} curves in {wall:.1f} s = "
                      f"{r['n_classified'] / wall:.0f} curves/s; vetting {r['vetting_s']:.1f} s (read {r['read_s']:.1f}"
                      f" s, {r['n_frames_kept']} kept frame maps) for {r['n_candidates']} calls", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--refit-detrend", action="store_true", help="run the field's detrend fit again first")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    d = pd.DataFrame(measure(args.run, args.store, args.repeat, args.refit_detrend))
    summary = {}
    for mode, g in d[d["try"] < args.repeat + 1].groupby("mode"):
        per = g.groupby("try")[["wall_s", "n_classified"]].sum()
        best = per["n_classified"] / per["wall_s"]
        det = float(g.groupby("field")["detrend_fit_s"].first().sum())
        summary[mode] = {"curves": int(per["n_classified"].iloc[0]), "wall_s": per["wall_s"].round(2).tolist(),
                         "curves_per_s": best.round(0).tolist(), "detrend_fit_s": round(det, 2),
                         "curves_per_s_with_detrend_fit":
                             (per["n_classified"] / (per["wall_s"] + det)).round(0).tolist()}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": d.to_dict("records")}, indent=1))


if __name__ == "__main__":
    main()

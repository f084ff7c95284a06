"""Throughput benchmark: Mpix/s per stage and per worker, scaling over workers, peak memory.

    python -m benchmarks.throughput [--scenario dense] [--epochs 40] [--size 1024] [--max-workers N]
        [--out DIR] [--quick]

1. *Per stage, one process* (no Dask): Zarr read, background, sep extraction, the whole
   block (extraction + centroids + photometry), PNet's network alone (normalised window ->
   decoded detections, one torch thread) and PNet's whole block, and merge + astrometry +
   Parquet write, on a sample of epochs; Mpix/s per core. With a GPU the PNet network is
   also timed on it (fp32).
2. *Scaling*: ``survey-proc run`` on the same survey with 1..N worker processes, for each
   detector (``--detectors``); epochs/s,
   Mpix/s, speed-up and efficiency; light curves built per second by the cross-match; peak
   RSS of the driver and of the largest worker.

Writes ``OUT/throughput-<scenario>.json`` and ``.md``. ``--quick``: 256^2 x 4 epochs, 1 worker.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from survey_proc import model_registry, store
from survey_proc.catalog.extract import extract_block
from survey_proc.catalog.merge import merge_epoch
from survey_proc.catalog.schema import SOURCES
from survey_proc.config import RunConfig, load_config
from survey_proc.detect import classical
from survey_proc.detect.registry import make_detector
from survey_proc.distributed.cluster import available_cores
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.outputs import write_parquet_atomic
from survey_proc.simulate import load_scenario, simulate_survey
from survey_proc.tiling import tile_grid


def stage_rates(survey: Path, epochs: list[int], tmp: Path, detectors: list[str]) -> dict[str, Any]:
    """Seconds per epoch and Mpix/s per core of each stage, in this process."""
    import torch

    from survey_proc.detect import pnet

    cfg = RunConfig()
    sep_det = make_detector(RunConfig(detector="sep"))
    fa = store.field_attrs(survey, "F000")
    _, ny, nx = store.image_shape(survey, "F000")
    tiles = tile_grid(ny, nx, cfg.tile_px, cfg.halo_px)
    t = {k: 0.0 for k in ("read", "background", "sep_extract", "block_total", "merge_write")}
    use_pnet = "pnet" in detectors
    if use_pnet:
        torch.set_num_threads(1)
        det = model_registry.load("detector", device="cpu")
        gpu = model_registry.load("detector", device="cuda") if torch.cuda.is_available() else None
        pnet_det = make_detector(RunConfig(detector="pnet"), det)
        t.update({"pnet_network": 0.0, "pnet_block_total": 0.0})
        if gpu is not None:
            t["pnet_network_gpu"] = 0.0
    for e in epochs:
        t0 = time.perf_counter()
        img, mask = store.read_window(survey, "F000", e, 0, ny, 0, nx)
        t1 = time.perf_counter()
        bad = classical.bad_pixels(img, mask, float(fa["saturation_adu"]))
        bkg = classical.estimate_background(img, bad, cfg.detection)
        t2 = time.perf_counter()
        data = np.ascontiguousarray(np.where(bad, 0, img - bkg.back), dtype=np.float32)
        classical.extract(data, bad, bkg.global_rms, cfg.detection)
        t3 = time.perf_counter()
        res = extract_block(img, mask, (0, 0), tiles, float(fa["gain_e_per_adu"]), float(fa["saturation_adu"]), cfg,
                            sep_det)
        df, info = res.table, res.info
        t4 = time.perf_counter()
        src, _, _ = merge_epoch([df], [info], field="F000", field_index=0, epoch=e, mjd=0.0, epoch_wcs=None,
                                ref_wcs=None, dedup_radius_fwhm=0.5, default_fwhm_px=2.5)
        write_parquet_atomic(src, SOURCES, tmp / f"epoch={e}.parquet", {})
        t5 = time.perf_counter()
        for k, dt in zip(("read", "background", "sep_extract", "block_total", "merge_write"),
                         (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            t[k] += dt
        if use_pnet:
            norm = pnet.normalise(img, bad, bkg.back, bkg.global_rms)
            t0 = time.perf_counter()
            pnet.predict(det, norm, noise_adu=bkg.global_rms)
            t1 = time.perf_counter()
            extract_block(img, mask, (0, 0), tiles, float(fa["gain_e_per_adu"]), float(fa["saturation_adu"]), cfg,
                          pnet_det)
            t2 = time.perf_counter()
            t["pnet_network"] += t1 - t0
            t["pnet_block_total"] += t2 - t1
            if gpu is not None:
                pnet.predict(gpu, norm, noise_adu=bkg.global_rms)  # warm-up (cuDNN autotuning) excluded
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                pnet.predict(gpu, norm, noise_adu=bkg.global_rms)
                torch.cuda.synchronize()
                t["pnet_network_gpu"] += time.perf_counter() - t0
    mpix = ny * nx / 1e6
    n = len(epochs)
    return {k: {"s_per_epoch": v / n, "mpix_per_s_per_core": mpix * n / v if v > 0 else None} for k, v in t.items()}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (MB); run on each worker."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scaling(survey: Path, out: Path, workers: list[int], detector: str) -> list[dict[str, Any]]:
    """Whole runs with 1..N workers (extraction dominates; cross-match reported separately)."""
    from survey_proc.distributed.cluster import local_client

    rows = []
    _, ny, nx = store.image_shape(survey, "F000")
    n_ep = store.image_shape(survey, "F000")[0]
    for w in workers:
        cfg = load_config(None, {"store": str(survey), "out": str(out / f"{detector}-w{w}"), "workers": w,
                                 "progress": False, "evaluate": False, "mode": "overwrite", "detector": detector})
        with local_client(w, quiet=True) as client:
            t0 = time.perf_counter()
            run = run_pipeline(cfg, client=client)
            wall = time.perf_counter() - t0
            worker_peak = max(client.run(_peak_rss_mb).values())
        tm, c = run["timings_s"], run["counts"]
        rows.append({"detector": detector, "workers": w, "wall_s": wall, "extract_s": tm["extract_s"],
                     "crossmatch_s": tm["crossmatch_s"],
                     "epochs_per_s": n_ep / tm["extract_s"], "mpix_per_s": n_ep * ny * nx / 1e6 / tm["extract_s"],
                     "lightcurves_per_s": c["objects"] / tm["crossmatch_s"] if tm["crossmatch_s"] > 0 else None,
                     "points_per_s": c["lightcurve_points"] / tm["crossmatch_s"] if tm["crossmatch_s"] > 0 else None,
                     "worker_peak_rss_mb": worker_peak})
    base = rows[0]["epochs_per_s"] / rows[0]["workers"]
    for r in rows:
        r["speedup"] = r["epochs_per_s"] / rows[0]["epochs_per_s"]
        r["efficiency"] = r["epochs_per_s"] / (base * r["workers"])
    return rows


def run(scenario: str, epochs: int, size: int, max_workers: int, out: Path, quick: bool = False,
        detectors: tuple[str, ...] = ("sep", "pnet")) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    survey = out / f"throughput-{scenario}-{size}px-{epochs}ep.zarr"
    if not survey.exists():
        scn = load_scenario(scenario, {"n_epochs": epochs, "size_px": size, "seed": 2024,
                                       **({"psf_oversample": 7} if quick else {})})
        simulate_survey(scn, survey, workers=0 if quick else None, progress=False)
    tmp = out / f"throughput-{scenario}-stage-writes"
    tmp.mkdir(exist_ok=True)
    sample = list(range(min(epochs, 2 if quick else 10)))
    res: dict[str, Any] = {"scenario": scenario, "size_px": size, "epochs": epochs, "cores": available_cores(),
                           "stages_one_process": stage_rates(survey, sample, tmp, list(detectors))}
    res["scaling"] = [row for d in detectors
                      for row in scaling(survey, out / f"throughput-{scenario}-runs",
                                         list(range(1, max_workers + 1)), d)]
    res["peak_rss_mb"] = {"driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "largest_worker": max(r["worker_peak_rss_mb"] for r in res["scaling"])}
    md = _markdown(res)
    (out / f"throughput-{scenario}.json").write_text(json.dumps(res, indent=2))
    (out / f"throughput-{scenario}.md").write_text(md)
    return res


def _markdown(r: dict[str, Any]) -> str:
    lines = [f"### Throughput, {r['scenario']} {r['size_px']}^2 x {r['epochs']} epochs ({r['cores']} cores)", "",
             "| stage (one process) | s / epoch | Mpix/s per core |", "|---|---|---|"]
    for k, v in r["stages_one_process"].items():
        lines.append(f"| {k} | {v['s_per_epoch']:.3f} | {v['mpix_per_s_per_core']:.2f} |")
    lines += ["", "| detector | workers | extract s | epochs/s | Mpix/s | speed-up | efficiency | cross-match s | "
              "light curves/s | points/s | worker peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in r["scaling"]:
        lines.append(f"| {s['detector']} | {s['workers']} | {s['extract_s']:.1f} | {s['epochs_per_s']:.2f} | "
                     f"{s['mpix_per_s']:.2f} | {s['speedup']:.2f} | {s['efficiency']:.2f} | {s['crossmatch_s']:.1f} | "
                     f"{s['lightcurves_per_s'] or 0:.0f} | {s['points_per_s'] or 0:.0f} | "
                     f"{s['worker_peak_rss_mb']:.0f} |")
    lines.append(f"\npeak RSS: driver {r['peak_rss_mb']['driver']:.0f} MB, largest worker "
                 f"{r['peak_rss_mb']['largest_worker']:.0f} MB (each worker's own getrusage)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=("dense", "sparse"), default="dense")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--max-workers", type=int, default=available_cores())
    p.add_argument("--out", default="bench-out")
    p.add_argument("--detectors", default="sep,pnet", help="comma-separated (default sep,pnet)")
    p.add_argument("--quick", action="store_true", help="256^2 x 4 epochs, 1 worker (test suite)")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.size, a.max_workers = 4, 256, 1
    res = run(a.scenario, a.epochs, a.size, a.max_workers, Path(a.out), quick=a.quick,
              detectors=tuple(d for d in a.detectors.split(",") if d))
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""BPNN checks beyond the end-to-end accuracy: the epistemic split out of distribution, and throughput.

    python -m benchmarks.bpnn_checks [--windows 60] [--out bench-out]

1. **Epistemic split.** Stamps at the pipeline's detections on simulated windows
   (:mod:`training.bpnn_data`, seed 7001: never used in training), once as in training and
   once with PSFs twice as wide as the network ever saw: FWHM 2.6-10 px with the stamp
   binning forced to 1 (the size rule would otherwise bin them back into range), so the
   network sees binned FWHMs of 2.6-10 px against 1.3-3 px in training. Reported per S/N
   bin: median aleatoric and epistemic sigma, the error NMAD and the z width.
2. **Throughput.** Stamps/s on this machine's CPU: cutting stamps on a real 1024^2 block
   of the held-out dense survey (``bench-out/dense/survey.zarr``, made by
   ``benchmarks.accuracy``), and the network for T = 0 (mean weights), 1, 4, 8, 16, 32, 64
   on 1 and 2 threads.

Writes ``OUT/bpnn_checks.json`` and ``bpnn_checks.md`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from survey_proc import model_registry
from survey_proc.photometry import bpnn as bp
from survey_proc.photometry.stamps import Stamps
from training.bpnn_data import StampDataConfig, make_dataset

SNR_BINS = ((3, 10), (10, 30), (30, 100), (100, 1e9))


def _summ(d: dict[str, np.ndarray], r: bp.MCResult) -> list[dict]:
    err = r.mu - d["target"]
    z = err / r.sigma
    rows = []
    for lo, hi in SNR_BINS:
        m = (d["snr_true"] >= lo) & (d["snr_true"] < hi)
        if m.sum() < 10:
            continue
        rows.append({"snr_lo": lo, "snr_hi": min(hi, 1e4), "n": int(m.sum()),
                     "sigma_aleatoric_median": float(np.median(r.sigma_aleatoric[m])),
                     "sigma_epistemic_median": float(np.median(r.sigma_epistemic[m])),
                     "epistemic_fraction_of_variance": float(np.median(r.sigma_epistemic[m] ** 2 / r.sigma[m] ** 2)),
                     "err_nmad": float(1.4826 * np.median(np.abs(err[m] - np.median(err[m])))),
                     "z_std_clipped5": float(np.std(z[m][np.abs(z[m]) < 5]))})
    return rows


def epistemic_split(windows: int, model: bp.LoadedBPNN) -> dict:
    base = StampDataConfig()
    ood = replace(base, tile=replace(base.tile, fwhm_px=(2 * base.tile.fwhm_px[0], 2 * base.tile.fwhm_px[1])),
                  binning=1)
    out = {}
    for name, cfg in (("in_distribution", base), ("psf_2x_wider", ood)):
        d = make_dataset(7001, windows, cfg)
        st = Stamps(d["pixels"], d["aux"], d["scale_adu"], np.zeros(len(d["target"]), bool), 1)
        r = bp.predict(model, st, seed=1)
        out[name] = {"fwhm_px": list(cfg.tile.fwhm_px), "binning": cfg.binning or "size rule", "n": len(st),
                     "bins": _summ(d, r)}
    return out


def throughput(model: bp.LoadedBPNN, store: Path) -> dict:
    from survey_proc import store as st_mod
    from survey_proc.catalog.extract import extract_block
    from survey_proc.config import RunConfig
    from survey_proc.detect.registry import make_detector
    from survey_proc.photometry.measure import window_stamps
    from survey_proc.tiling import tile_grid

    fa = st_mod.field_attrs(store, "F000")
    image, mask = st_mod.read_window(store, "F000", 0, 0, 1024, 0, 1024)
    tiles = tile_grid(1024, 1024, 1024, 0)
    rc = RunConfig(detector="sep")
    res = extract_block(image, mask, (0, 0), tiles, float(fa["gain_e_per_adu"]), float(fa["saturation_adu"]), rc,
                        make_detector(rc), keep_window=True)
    win, targets = res.window, res.targets
    t0 = time.perf_counter()
    st = window_stamps(win, targets)
    t_cut = time.perf_counter() - t0
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for t in (0, 1, 4, 8, 16, 32, 64):
            bp.predict(model, Stamps(st.pixels[:256], st.aux[:256], st.scale_adu[:256], st.masked[:256], 1),
                       n_samples=t)
            t0 = time.perf_counter()
            bp.predict(model, st, n_samples=t)
            wall = time.perf_counter() - t0
            rows.append({"threads": threads, "T": t, "stamps_per_s": len(st) / wall})
    return {"block_px": [1024, 1024], "n_stamps": len(st), "cut_stamps_per_s": len(st) / t_cut, "network": rows,
            "card_T": model.n_samples}


def _markdown(res: dict) -> str:
    lines = ["#### Epistemic split (stamps at the pipeline's detections, seed 7001)", "",
             "| stamps | S/N | n | median σ aleatoric | median σ epistemic | epistemic share of variance | "
             "error NMAD | z std (5σ-clipped) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["epistemic"].items():
        for b in r["bins"]:
            lines.append(f"| {name} (FWHM {r['fwhm_px'][0]:.1f}-{r['fwhm_px'][1]:.1f} px, binning {r['binning']}) | "
                         f"{b['snr_lo']:.0f}-{b['snr_hi']:.0f} | {b['n']} | {b['sigma_aleatoric_median']:.4f} | "
                         f"{b['sigma_epistemic_median']:.4f} | {b['epistemic_fraction_of_variance']:.3f} | "
                         f"{b['err_nmad']:.4f} | {b['z_std_clipped5']:.2f} |")
    tp = res["throughput"]
    lines += ["", f"#### Throughput (CPU; {tp['n_stamps']} stamps of one 1024^2 dense block; cutting "
              f"{tp['cut_stamps_per_s']:.0f} stamps/s on 1 thread; shipped T = {tp['card_T']})", "",
              "| threads | T | network stamps/s |", "|---|---|---|"]
    for row in tp["network"]:
        lines.append(f"| {row['threads']} | {row['T']} | {row['stamps_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bpnn_checks", description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=60)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--store", default="bench-out/dense/survey.zarr")
    a = p.parse_args(argv)
    torch.set_flush_denormal(True)
    model = model_registry.load("bpnn", None, device="cpu")
    res = {"epistemic": epistemic_split(a.windows, model), "throughput": throughput(model, Path(a.store))}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bpnn_checks.json").write_text(json.dumps(res, indent=2))
    md = _markdown(res)
    (out / "bpnn_checks.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Choose PNet's confidence threshold on whole simulated validation surveys and write it into the weights.

    python -m training.choose_threshold [--out DIR] [--weights survey_proc/models/detector.pt]

The training tiles give a first threshold (F1 on tiles); tiles are not whole epochs, so
the shipped threshold is chosen here instead, on two validation surveys made with
*training-side* seeds (< 1000; the benchmarks' held-out surveys use 1001 and 1002): the
``dense`` and ``sparse`` presets, 512^2 x 6 epochs each, seeds 501 and 502. Each is run
through the pipeline once with a low threshold (0.05), and for every candidate threshold
the recall (true stars brighter than the 5σ limit) and precision (all detections, a match
to any true star is true) are measured; the threshold that maximises the mean of the two
surveys' F1 is written into the weights file and the card (with both curves).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from survey_proc import evaluate as ev
from survey_proc.config import load_config
from survey_proc.detect.pnet import DEFAULT_WEIGHTS
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.outputs import OutputLayout
from survey_proc.simulate import load_scenario, simulate_survey

CANDIDATES = np.round(np.arange(0.06, 0.401, 0.02), 2)
SURVEYS = {"dense": 501, "sparse": 502}


def curve(out: Path, store: Path) -> list[dict]:
    lim = float(ev.load_truth_summary(store)["limiting_mag_5sigma_psf_crlb"])
    te = ev.load_truth_epochs(store, "F000").set_index("epoch")
    acc = {float(t): np.zeros(4) for t in CANDIDATES}
    for e in te.index:
        src = pd.read_parquet(OutputLayout(out).sources("F000", int(e)))
        t = ev.truth_at_epoch(store, "F000", int(e))
        r = ev.match_radius_px(float(te.loc[e, "seeing_fwhm_px"]))
        bright = t["mag_epoch"].to_numpy() < lim
        for thr in CANDIDATES:
            s = src[src["confidence"] >= thr]
            i_d, i_t = ev.match_one_to_one(s["x"].to_numpy(), s["y"].to_numpy(), t["x_epoch"].to_numpy(),
                                           t["y_epoch"].to_numpy(), r)
            found = np.zeros(len(t), bool)
            found[i_t] = True
            acc[float(thr)] += [found[bright].sum(), bright.sum(), len(i_d), len(s)]
    rows = []
    for thr, (fb, nb, hit, n) in acc.items():
        rec, prec = fb / max(nb, 1), hit / max(n, 1)
        rows.append({"threshold": thr, "recall": rec, "precision": prec, "f1": 2 * rec * prec / max(rec + prec, 1e-12)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out/threshold"))
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    a = p.parse_args(argv)
    curves = {}
    for name, seed in SURVEYS.items():
        store = a.out / f"{name}-val.zarr"
        if not store.exists():
            scn = load_scenario(name, {"size_px": 512, "n_epochs": 6, "seed": seed})
            simulate_survey(scn, store, progress=False)
        cfg = load_config(None, {"store": str(store), "out": str(a.out / f"{name}-out"), "detector": "pnet",
                                 "progress": False, "evaluate": False, "mode": "overwrite",
                                 "pnet": {"threshold": 0.05, "weights": str(a.weights)}})
        run_pipeline(cfg)
        curves[name] = curve(a.out / f"{name}-out", store)
    mean_f1 = {r["threshold"]: np.mean([c[i]["f1"] for c in curves.values()])
               for i, r in enumerate(next(iter(curves.values())))}
    best = float(max(mean_f1, key=mean_f1.get))
    blob = torch.load(a.weights, map_location="cpu", weights_only=True)
    blob["threshold"] = best
    torch.save(blob, a.weights)
    card_path = a.weights.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["threshold_from_tiles"] = card.get("threshold_from_tiles", card["threshold"])
    card["threshold"] = best
    card["threshold_rule"] = ("maximum of the mean F1 of two whole simulated validation surveys (dense seed 501, "
                              "sparse seed 502, 512^2 x 6 epochs; recall of stars brighter than the 5-sigma limit, "
                              "precision of all detections); training/choose_threshold.py")
    card["threshold_validation"] = {"surveys": SURVEYS, "curves": curves, "mean_f1": mean_f1}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({"threshold": best, **{n: next(r for r in c if r["threshold"] == best)
                                           for n, c in curves.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

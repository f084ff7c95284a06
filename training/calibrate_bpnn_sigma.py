"""Recalibrate the BPNN's sigma on whole simulated validation surveys and write it on the model card.

    python -m training.calibrate_bpnn_sigma [--out DIR] [--weights survey_proc/models/bpnn.pt] [--dry-run]

The validation surveys are the training-side ones :mod:`training.choose_threshold` uses
(``dense`` seed 501 and ``sparse`` seed 502, 512^2 x 6 epochs; the benchmarks' held-out
surveys use seeds > 1000), simulated into ``--out`` when absent. Each is run through the
pipeline with the default settings (sep + BPNN) and the BPNN's *uncalibrated* sigma (a
copy of the weights whose card has no ``sigma_calibration``). Every unflagged detection
matched to a true star gives ``delta = mag - m_true`` with the epoch's median offset among
S/N > 20 stars removed (that offset is the zero point's error, which ``zp_err`` carries
separately in ``mag_err``), and ``sigma = mag_inst_err``. The fit
(:func:`survey_proc.photometry.sigma_calibration.fit_sigma_calibration`: bins of 0.2 dex
in the predicted sigma with >= 100 detections each, 5-sigma-clipped z std per bin) over both surveys is written to the
card as ``sigma_calibration`` with the z widths before and after, per survey. The weights
file itself is not touched (its sha256 stays).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from survey_proc import evaluate as ev
from survey_proc import model_registry
from survey_proc.config import load_config
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.outputs import OutputLayout
from survey_proc.photometry.sigma_calibration import CARD_KEY, clipped_std, fit_sigma_calibration
from survey_proc.simulate import load_scenario, simulate_survey

SURVEYS = {"dense": 501, "sparse": 502}


def residuals(out: Path, store: Path) -> pd.DataFrame:
    """Matched detections of a run: ``delta`` (mag, epoch offset removed), ``sigma`` (mag), epoch."""
    te = ev.load_truth_epochs(store, "F000").set_index("epoch")
    rows = []
    for e in te.index:
        src = pd.read_parquet(OutputLayout(out).sources("F000", int(e)))
        src = src[(src["flags"] == 0) & np.isfinite(src["mag"]) & np.isfinite(src["mag_inst_err"])]
        t = ev.truth_at_epoch(store, "F000", int(e))
        r = ev.match_radius_px(float(te.loc[e, "seeing_fwhm_px"]))
        i_d, i_t = ev.match_one_to_one(src["x"].to_numpy(), src["y"].to_numpy(), t["x_epoch"].to_numpy(),
                                       t["y_epoch"].to_numpy(), r)
        d = src["mag"].to_numpy()[i_d] - t["mag_epoch"].to_numpy()[i_t]
        s = src["mag_inst_err"].to_numpy()[i_d]
        good = s < 1.0857 / 20
        off = float(np.median(d[good])) if good.sum() >= 10 else float(np.median(d))
        rows.append(pd.DataFrame({"epoch": int(e), "delta": d - off, "sigma": s}))
    return pd.concat(rows, ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out/threshold"))
    p.add_argument("--weights", type=Path, default=model_registry.default_weights("bpnn"))
    p.add_argument("--dry-run", action="store_true", help="fit and print; leave the card as it is")
    a = p.parse_args(argv)
    raw = a.out / "bpnn-uncalibrated" / "bpnn.pt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(a.weights, raw)
    card_path = a.weights.with_suffix(".json")
    card = json.loads(card_path.read_text())
    raw.with_suffix(".json").write_text(json.dumps({k: v for k, v in card.items() if k != CARD_KEY}, indent=2))
    res = {}
    for name, seed in SURVEYS.items():
        store = a.out / f"{name}-val.zarr"
        if not store.exists():
            simulate_survey(load_scenario(name, {"size_px": 512, "n_epochs": 6, "seed": seed}), store, progress=False)
        out = a.out / f"{name}-sigma-out"
        cfg = load_config(None, {"store": str(store), "out": str(out), "progress": False, "evaluate": False,
                                 "mode": "overwrite", "bpnn": {"weights": str(raw)}})
        run_pipeline(cfg)
        res[name] = residuals(out, store)
    allr = pd.concat(res.values(), ignore_index=True)
    cal = fit_sigma_calibration(allr["delta"].to_numpy(), allr["sigma"].to_numpy())
    report = {}
    for name, r in res.items():
        z0 = r["delta"] / r["sigma"]
        z1 = r["delta"] / cal.apply(r["sigma"].to_numpy())
        report[name] = {"n": len(r), "z_std_clipped5_before": clipped_std(z0.to_numpy()),
                        "z_std_clipped5_after": clipped_std(z1.to_numpy())}
    entry = {**cal.to_dict(),
             "method": "per-sigma variance scaling: 5-sigma-clipped z std in 0.2-dex bins (>= 100 each) "
                       "of the predicted sigma (survey_proc/photometry/sigma_calibration.py)",
             "data": {"surveys": SURVEYS, "size_px": 512, "n_epochs": 6, "detector": "sep",
                      "residual": "mag - m_true, per-epoch median offset of S/N > 20 stars removed"},
             "validation": report}
    print(json.dumps(entry, indent=1))
    if not a.dry_run:
        card[CARD_KEY] = entry
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"wrote {CARD_KEY} to {card_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

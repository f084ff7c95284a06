"""Train classifier v3 (issue 22): any cadence, no magnitude input, calibrated p_periodic.

    PYTHONPATH=. python training/train_classifier_v3.py --synth training/cache/v3-synth-train.npz \\
        --eros training/cache/v3-eros-train.npz --out /tmp/classifier-v3.pt [--epochs 40]

Data (:mod:`training.build_cadence_data`): synthetic curves over regular, nightly, sparse and
EROS cadences (:func:`training.classifier_data.cadence_group`) and the real EROS-1 *train*
split (R band). Validation: 20 % of the synthetic groups (whole cadences) and 20 % of the
EROS train stars, never seen in training. The magnitude feature is 0 throughout
(``inputs.magnitude = false`` on the card), the search grid starts at 0.03 d
(``search.period_min_days``).

After training: p_periodic (summed periodic probability) is calibrated by isotonic
regression on the validation set (``calibration.p_periodic`` on the card; the reliability
diagram of the validation set is on the card too: it is in-sample for the calibration),
and the threshold is the lowest calibrated p_periodic whose false-positive rate on the
validation constants and non-periodic curves is <= 0.3 % (the issue's bound on constant
stars called periodic is 0.5 %).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from survey_proc import model_registry
from survey_proc.lightcurves import classifier as C
from training.train_classifier import fit

ROOT = Path(__file__).resolve().parent.parent
LOGS = Path(__file__).resolve().parent / "logs"
MAX_FPR = 0.003


def load(path: str) -> dict[str, np.ndarray]:
    """One npz of :mod:`training.build_cadence_data` as a dict."""
    z = np.load(path, allow_pickle=True)
    return {k: z[k] for k in z.files}


def isotonic(p: np.ndarray, y: np.ndarray, n_knots: int = 50) -> dict:
    """Isotonic map of scores ``p`` to the frequency of ``y`` (pool-adjacent-violators), as knots."""
    o = np.argsort(p)
    ps, ys = p[o], y[o].astype(float)
    blocks = [[float(v), 1.0, float(x), float(x)] for v, x in zip(ys, ps, strict=True)]  # mean, weight, lo, hi
    out: list[list[float]] = []
    for b in blocks:
        out.append(b)
        while len(out) > 1 and out[-2][0] >= out[-1][0]:
            m2, w2, lo2, _ = out.pop(-2)
            m1, w1, _, hi1 = out.pop(-1)
            out.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, lo2, hi1])
    x = np.array([0.5 * (b[2] + b[3]) for b in out])
    yv = np.array([b[0] for b in out])
    if len(x) > n_knots:
        q = np.linspace(0, len(x) - 1, n_knots).round().astype(int)
        x, yv = x[q], yv[q]
    x = np.r_[0.0, x, 1.0]
    yv = np.r_[yv[0], yv, yv[-1]]
    x, keep = np.unique(x, return_index=True)
    return {"x": x.tolist(), "y": np.maximum.accumulate(yv[keep]).tolist()}


def reliability(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Observed frequency of ``y`` per bin of ``p`` (the reliability diagram, ``n_bins`` equal bins of 0..1)."""
    edges = np.linspace(0, 1, n_bins + 1)
    b = np.clip(np.digitize(p, edges) - 1, 0, len(edges) - 2)
    return [{"p_lo": float(edges[k]), "p_hi": float(edges[k + 1]), "n": int((b == k).sum()),
             "p_mean": float(p[b == k].mean()) if (b == k).any() else None,
             "frac_periodic": float(y[b == k].mean()) if (b == k).any() else None} for k in range(len(edges) - 1)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synth", required=True)
    ap.add_argument("--eros", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.time()
    syn, ero = load(args.synth), load(args.eros)
    rng = np.random.default_rng(args.seed)
    groups = np.unique(syn["meta_group"])
    val_groups = set(rng.choice(groups, max(1, len(groups) // 5), replace=False).tolist())
    syn_val = np.isin(syn["meta_group"], list(val_groups))
    stars = np.unique(ero["meta_star"])
    val_stars = set(rng.choice(stars, max(1, len(stars) // 5), replace=False).tolist())
    ero_val = np.isin(ero["meta_star"], list(val_stars))
    label_idx = {c: i for i, c in enumerate(C.CLASSES)}

    def part(d: dict, sel: np.ndarray) -> list[np.ndarray]:
        return [d["g"][sel], d["loc"][sel], d["aux"][sel], np.array([label_idx[c] for c in d["meta_label"][sel]])]

    tr = [np.concatenate(x) for x in zip(part(syn, ~syn_val), part(ero, ~ero_val), strict=True)]
    va = [np.concatenate(x) for x in zip(part(syn, syn_val), part(ero, ero_val), strict=True)]
    va_src = np.r_[np.zeros(syn_val.sum(), int), np.ones(ero_val.sum(), int)]
    tr_t = [torch.as_tensor(a) for a in tr]
    va_t = [torch.as_tensor(a) for a in va]
    print(f"train {len(tr[3])} val {len(va[3])} classes {np.bincount(tr[3], minlength=len(C.CLASSES))}", flush=True)
    bs = 128
    model, best_val_loss = fit(tr_t, va_t, epochs=args.epochs, batch=bs, seed=args.seed,
                               log_path=LOGS / "classifier-v3.jsonl", t_start=t_start)
    with torch.no_grad():
        prob = torch.softmax(model(va_t[0], va_t[1], va_t[2]), 1).numpy()
    y = va[3]
    per_idx = [label_idx[c] for c in C.PERIODIC]
    is_per = np.isin(y, per_idx)
    p_raw = prob[:, per_idx].sum(1)
    cal = isotonic(p_raw, is_per)
    p_cal = np.interp(p_raw, cal["x"], cal["y"])
    neg = ~is_per
    thr = 0.5
    for t in np.linspace(0.05, 0.99, 95):
        if np.mean(p_cal[neg] >= t) <= MAX_FPR:
            thr = float(t)
            break
    p_per, names, _ = C.decide(prob, thr, cal)
    true_names = np.array(C.CLASSES, dtype=object)[y]
    from survey_proc.evaluate import classification_metrics

    cm = classification_metrics(true_names, names, list(C.CLASSES))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    card = {
        "model": "periodic-variable classifier v3 (Astronet-style local/global CNN), any cadence (issue 22)",
        "date": dt.date.today().isoformat(), "git_revision": git, "classes": list(C.CLASSES), "threshold": thr,
        "threshold_rule": f"lowest calibrated p_periodic with a false-positive rate <= {MAX_FPR:.1%} on the "
                          "validation constants and non-periodic curves",
        "inputs": {"magnitude": False},
        "search": {"period_min_days": 0.03},
        "calibration": {"p_periodic": cal, "method": "isotonic regression on the validation set"},
        "data": {"generator": "training/classifier_data.py (cadence_group), training/build_cadence_data.py",
                 "synthetic": args.synth, "eros_train": args.eros, "n_train": len(tr[3]), "n_val": len(y),
                 "n_val_synthetic": int(syn_val.sum()), "n_val_eros": int(ero_val.sum()),
                 "train_label_counts": {C.CLASSES[k]: int(v) for k, v in
                                        enumerate(np.bincount(tr[3], minlength=len(C.CLASSES)))}},
        "training": {"epochs": args.epochs, "batch": bs, "optimizer": "AdamW + one-cycle, max lr 2e-3",
                     "wall_s": round(time.time() - t_start, 1), "best_val_loss": best_val_loss, "threads": 1},
        "validation": {"per_class": cm["per_class"], "confusion": cm["confusion"],
                       "false_positive_rate": float(np.mean(p_per[neg] >= thr)),
                       "recall_periodic": float(np.mean(p_per[is_per] >= thr)),
                       "recall_periodic_eros": float(np.mean(p_per[is_per & (va_src == 1)] >= thr)),
                       "reliability_raw": reliability(p_raw, is_per),
                       "reliability_calibrated_in_sample": reliability(p_cal, is_per)},
    }
    model_registry.save("classifier", model, args.out, card=card, threshold=thr)
    print(json.dumps(card["validation"], indent=1, default=float))


if __name__ == "__main__":
    main()

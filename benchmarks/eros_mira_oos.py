"""Out-of-sample periodicity of EROS-1 validation objects the classify path leaves unperiodic (issue 22).

    PYTHONPATH=. python benchmarks/eros_mira_oos.py OUT.csv [N_STARS] [joint|alone|thinned]
    PYTHONPATH=. python benchmarks/eros_mira_oos.py --analyse OUT.csv

A measurement, not a shipped rule (RESULTS.md, twenty-third session). Objects: the EROS-1
validation stars (the train split's seed-0 20 %, drawn as ``training/train_sparse_classifier.py``
draws them; the test split is never read) and, per star, the constant and random-walk negative
objects that script makes at the star's own times and errors (the same seeds). Each object goes
through :func:`survey_proc.lightcurves.search.classify_table` (both bands, default
``[classify]``, shipped models); then the joint period search
(:func:`~survey_proc.lightcurves.fourier_features.curve_features`, bands rescaled) and a
2-harmonic fit at that period on alternate eighths of the points in time (equal counts), each
half predicting the other: the weighted out-of-sample R^2, averaged over the bands.
Modes, as the training script's: ``joint`` (both bands one object), ``alone`` (each band its own
single-band object; an object counts as called when either band is), ``thinned`` (each band keeps
a random 20-60 % of its points, at least 20, the training script's draw, both bands one object).

``--analyse`` prints, for thresholds 0.3-0.9, what the rule "an object not called periodic whose
searched period is >= 30 d with >= 2 cycles in the span and whose out-of-sample R^2 >= thr is a
pulsator at that period" would rescue (Miras, other types) and let through (negatives).
"""

from __future__ import annotations

import sys
from multiprocessing import Pool
from typing import Any

import numpy as np
import pandas as pd

from survey_proc.lightcurves.fourier_features import _design, curve_features, fourier_fit
from training.build_cadence_data import EROS
from training.train_sparse_classifier import _band, _negative, thinned

SPAN_DAYS = 894.0  # the EROS-1 curves' span
_MODELS: dict[str, Any] = {}


def oos_r2(curves: list[tuple[np.ndarray, np.ndarray, np.ndarray]], period_days: float) -> float:
    """Weighted out-of-sample R^2 of a 2-harmonic fit at ``period_days`` (module docstring); NaN when too few points."""
    f = 1.0 / period_days
    out = []
    for t, y, s in curves:
        half = (np.arange(len(t)) * 8 // len(t)) % 2  # 8 chunks of equal count in time, alternate halves
        ss_res = ss_tot = 0.0
        for h in (0, 1):
            a, b = half == h, half != h
            if a.sum() < 12 or b.sum() < 5:
                return np.nan
            c, _ = fourier_fit(t[a], y[a], s[a], f, 2)
            pred = _design(t[b], f, 2) @ c
            w = 1 / s[b] ** 2
            ss_res += float(np.sum(w * (y[b] - pred) ** 2))
            ss_tot += float(np.sum(w * (y[b] - np.sum(w * y[b]) / np.sum(w)) ** 2))
        out.append(1 - ss_res / ss_tot)
    return float(np.mean(out))


def _job(args: tuple) -> list[dict]:
    import torch

    from benchmarks.eros import four_class
    from survey_proc import model_registry
    from survey_proc.config import ClassifySettings
    from survey_proc.lightcurves.search import classify_table

    torch.set_num_threads(1)
    if not _MODELS:
        _MODELS["clf"] = model_registry.load("classifier", device="cpu")
        _MODELS["sparse"] = model_registry.load("classifier_sparse", device="cpu")
    sid, row, typ, k, mode = args
    rng = np.random.default_rng(k)  # the training script's seed for this star's negatives
    bands = {b: _band(row, b) for b in "rb"}
    bands = {b: v for b, v in bands.items() if len(v[0]) >= 20}
    if not bands:
        return []
    objs = [(str(typ), bands)] + [(kind, _negative(rng, bands, kind)) for kind in ("constant", "non_periodic")]
    if mode == "thinned":  # the training script's draw (rng [seed, 1]), object by object, band by band
        rng_t = np.random.default_rng([k, 1])
        objs = [(label, thinned(obj, rng_t)) for label, obj in objs]
    elif mode == "alone":
        objs = [(label, {b: v}) for label, obj in objs for b, v in obj.items()]
    res = []
    for label, obj in objs:
        parts, start = [], 0
        for b, (t, m, e) in obj.items():
            parts.append(pd.DataFrame({"object_id": 0, "epoch": start + np.arange(len(t)), "mjd": t, "mag": m,
                                       "mag_err": e, "flags": 0, "band": b}))
            start += len(t)
        r, _ = classify_table(pd.concat(parts, ignore_index=True), _MODELS["clf"], ClassifySettings(),
                              _MODELS["sparse"])
        r = r.iloc[0]
        curves = list(obj.values())
        fit = curve_features(*curves[0], 0.1, others=curves[1:], rescale_bands=True)
        res.append({"star": sid, "label": label, "var_class": r["var_class"], "period": float(r["period"]),
                    "p_periodic": float(r["p_periodic"]), "P_search": fit.period_days,
                    "oos": oos_r2(curves, fit.period_days), "pred": four_class(r["var_class"], float(r["period"]))})
    return res


def measure(out: str, limit: int = 0, mode: str = "joint") -> None:
    """Classify and measure every validation object (module docstring); write ``out`` (CSV)."""
    lab = pd.read_csv(EROS / "train.csv", index_col=0)
    cur = pd.read_csv(EROS / "train_varlength_features.csv.gz", index_col=0)
    ok = [sid for sid in lab.index if any(len(_band(cur.loc[sid], b)[0]) >= 20 for b in "rb")]
    stars = np.array(sorted(ok))
    val = set(np.random.default_rng(0).choice(stars, int(0.2 * len(stars)), replace=False))
    jobs = [(sid, cur.loc[sid], int(lab.loc[sid, "type"]), k, mode) for k, sid in enumerate(lab.index) if sid in val]
    if limit:
        jobs = jobs[:limit]
    with Pool(2) as p:
        rows = [r for part in p.imap(_job, jobs, chunksize=4) for r in part]
    pd.DataFrame(rows).to_csv(out, index=False)


def analyse(path: str) -> None:
    """Print the rescue rule's effect per threshold (module docstring)."""
    d = pd.read_csv(path, dtype={"label": str})
    called = d["var_class"].isin(["eclipsing_binary", "pulsator", "transit"])
    if d.duplicated(["star", "label"]).any():  # --mode alone: one row per band; counts are per object below
        print("one row per band (alone): counts are objects with a band called or rescued")
    real = d[~d["label"].isin(["constant", "non_periodic"])]
    print("rows", len(d), "stars", d["star"].nunique(), "validation accuracy now (per row)",
          round(float((real["pred"] == real["label"].astype(int)).mean()), 4))
    cand = ~called & (d["P_search"] >= 30) & (d["P_search"] * 2 <= SPAN_DAYS)
    for thr in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        resc = cand & (d["oos"] >= thr)
        on = d.assign(on=called | resc, resc=resc, was=called).groupby(["star", "label"])[["on", "resc", "was"]].any()
        on = on.reset_index()
        on["resc"] &= ~on["was"]  # rescued: an object no band of which was called
        neg = {k: int(on.loc[on["label"] == k, "on"].sum()) for k in ("constant", "non_periodic")}
        print(f"thr {thr}: Miras rescued {int(on.loc[on['label'] == '4', 'resc'].sum())}, other types rescued "
              f"{int(on.loc[on['label'].isin(['1', '2', '3']), 'resc'].sum())}, negatives called (objects) {neg}")


if __name__ == "__main__":
    if sys.argv[1] == "--analyse":
        analyse(sys.argv[2])
    else:
        measure(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0,
                sys.argv[3] if len(sys.argv) > 3 else "joint")

"""EROS-1 real light curves through the classify path: 4-class accuracy and periods (issue 22).

    PYTHONPATH=. python benchmarks/eros.py --split test [--weights survey_proc/models/classifier.pt] [--json F]

Data: ``/work/shared/data/lightcurves/eros`` (README there): 4 classes (1 eclipsing binary,
2 Cepheid, 3 RR Lyrae, 4 Mira), ~120 points over ~900 d in B and R; true period
``period / div_period``. ``train`` may be used for training, ``test`` only for this figure.

Definitions (fixed before any test-split number was computed)
-------------------------------------------------------------
- **Path**: each band's curve (times de-duplicated, magnitudes and errors as given) goes
  through :func:`survey_proc.lightcurves.preprocess.preprocess` (``min_points`` 20), the
  pipeline's search grid (:func:`~survey_proc.lightcurves.periodogram.search_grid`, its
  shortest period the model card's ``search.period_min_days``, else 0.25 d, as
  ``classify_table`` does) and :func:`~survey_proc.lightcurves.classifier.classify` with
  the classifier's own threshold, and, as the classify stage does, the shipped sparse
  long-baseline classifier for curves spanning more than ``[classify] sparse_span_days``
  (``--sparse-weights none``: the CNN alone, the figure before it existed). Since the fifth
  session the sparse route searches the period of both bands jointly, as the classify stage
  does with ``[classify] joint_bands`` (``--per-band-search``: each band alone, as before).
- **Bands reconciled**: when one band is called periodic (eclipsing_binary, pulsator,
  transit) and the other not, the periodic band's result is taken; when both are periodic,
  the one with the higher ``var_class_prob``; when neither, R's.
- **``--as-object``** (added in the fourth session, after the definitions above had given
  test figures; reported beside them, not instead): both bands as one multi-band object
  through :func:`survey_proc.lightcurves.search.classify_table`, the classify stage's own
  function (each band classified alone, the results reconciled per object with the rule
  above, :func:`~survey_proc.lightcurves.search.reconcile_bands`), one result per star.
- **4-class prediction**: ``eclipsing_binary`` -> EB; ``pulsator`` -> by its reported period
  P: P < 1.03 d RR Lyrae, 1.03 <= P < 30 d Cepheid, P >= 30 d Mira (boundaries set on the
  train split's true periods: they assign 99.3 % of its pulsators to their class). Anything
  else (constant, non_periodic, transit, single_event, not classified) is wrong.
- **Class accuracy**: correct 4-class predictions over all stars of the split.
- **``--thin F``** (fifth session, defined before any thinned figure): each band keeps a
  random fraction F of its points (at least 20; seeded by the star's index and the band),
  a sparser survey than EROS-1; the definitions above are unchanged.
- **Period**: correct when ``|P / P_true - 1| <= 0.01``; for eclipsing binaries also at
  ``2 P_true`` or ``P_true / 2`` (within 1 %). Over all stars of the split (NaN = wrong);
  also reported over the stars whose class is right.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from survey_proc.config import ClassifySettings
from training.build_cadence_data import EROS, eros_band

NAMES = {1: "EB", 2: "Cepheid", 3: "RR Lyrae", 4: "Mira"}
RRL_MAX_D = 1.03
CEP_MAX_D = 30.0


def four_class(var_class: str | None, period: float) -> int:
    """The EROS type (1-4) of a classify result, 0 when none (module docstring)."""
    if var_class == "eclipsing_binary":
        return 1
    if var_class == "pulsator" and np.isfinite(period):
        return 3 if period < RRL_MAX_D else 2 if period < CEP_MAX_D else 4
    return 0


def period_ok(p: float, p_true: float, eb: bool) -> bool:
    """Within 1 % of the true period (or of twice / half of it for an eclipsing binary)."""
    if not np.isfinite(p):
        return False
    facs = (1.0, 2.0, 0.5) if eb else (1.0,)
    return any(abs(p / (f * p_true) - 1) <= 0.01 for f in facs)


def _thinned(curve: tuple, thin: tuple[float, int] | None, band: str) -> tuple:
    """``curve`` (t, m, e) with a random ``thin[0]`` of its points kept (at least 20; seed ``thin[1]`` and the
    band), or as it is when ``thin`` is None."""
    if thin is None:
        return curve
    t, m, e = curve
    rng = np.random.default_rng([thin[1], ord(band)])
    n = min(len(t), max(20, round(len(t) * thin[0])))
    keep = np.sort(rng.choice(len(t), n, replace=False))
    return t[keep], m[keep], e[keep]


def classify_star(row: pd.Series, clf, bands: str = "rb", sparse=None, sparse_span_days: float = 30.0,
                  joint: bool = True, thin: tuple[float, int] | None = None) -> dict:
    """Both bands of one star through the classify path, reconciled (module docstring)."""
    from survey_proc.lightcurves import classifier as C
    from survey_proc.lightcurves.periodogram import search_grid
    from survey_proc.lightcurves.preprocess import PreprocessConfig, preprocess
    from survey_proc.lightcurves.search import trained_period_min
    from survey_proc.vocab import PERIODIC_CLASSES

    res = {}
    prepared = {}
    for band in bands:
        t, m, e = _thinned(eros_band(row, band), thin, band)
        if len(t) < 20:
            continue
        b = preprocess(np.array([0]), t, m[None], e[None], np.zeros((1, len(t)), np.int32),
                       PreprocessConfig(min_points=20))
        try:
            grid = search_grid(b.t_days, period_min_days=trained_period_min(clf))
        except ValueError:
            continue
        prepared[band] = (b, grid)
    # the classify stage's joint period search of the long curves of the other bands ([classify] joint_bands)
    kept, kept_u = {}, {}
    for band, (b, _) in prepared.items():
        if joint and b.usable[0] and np.ptp(b.kept(0)[0]) > sparse_span_days:
            kept[band], kept_u[band] = b.kept(0), b.kept(0, with_clipped=True)
    for band, (b, grid) in prepared.items():
        others = {0: [c for o, c in kept.items() if o != band]}
        others_u = {0: [c for o, c in kept_u.items() if o != band]}
        r = C.classify(b, clf, grid, sparse=sparse, sparse_span_days=sparse_span_days, sparse_others=others,
                       sparse_others_unclipped=others_u).iloc[0]
        res[band] = {"var_class": r["var_class"], "period": float(r["period"]), "prob": float(r["var_class_prob"])
                     if np.isfinite(r["var_class_prob"]) else 0.0, "p_periodic": float(r["p_periodic"])}
    per = {k: v for k, v in res.items() if v["var_class"] in PERIODIC_CLASSES}
    if per:
        band = max(per, key=lambda k: per[k]["prob"])
    else:
        band = "r" if "r" in res else next(iter(res), None)
    out = res.get(band, {"var_class": None, "period": np.nan, "prob": np.nan, "p_periodic": np.nan}) if band else \
        {"var_class": None, "period": np.nan, "prob": np.nan, "p_periodic": np.nan}
    return {**out, "band": band, **{f"{k}_{b}": v[k] for b, v in res.items() for k in ("var_class", "period")}}


def classify_star_object(row: pd.Series, clf, sparse, bands: str = "rb", joint: bool = True,
                         thin: tuple[float, int] | None = None) -> dict:
    """Both bands of one star as one multi-band object through the classify stage's own function.

    :func:`survey_proc.lightcurves.search.classify_table` with the default ``[classify]``
    settings (the sparse classifier for a curve spanning more than ``sparse_span_days``).
    """
    from survey_proc.lightcurves.search import classify_table

    parts, start = [], 0
    for band in bands:
        t, m, e = _thinned(eros_band(row, band), thin, band)
        parts.append(pd.DataFrame({"object_id": 0, "epoch": start + np.arange(len(t)), "mjd": t, "mag": m,
                                   "mag_err": e, "flags": 0, "band": band}))
        start += len(t)
    res, _ = classify_table(pd.concat(parts, ignore_index=True), clf, ClassifySettings(joint_bands=joint), sparse)
    if res is None or "var_class" not in res or pd.isna(res["var_class"].iloc[0]):
        return {"var_class": None, "period": np.nan, "prob": np.nan, "p_periodic": np.nan, "band": bands}
    r = res.iloc[0]
    return {"var_class": r["var_class"], "period": float(r["period"]), "prob": float(r["var_class_prob"]),
            "p_periodic": float(r["p_periodic"]), "band": str(r.get("band_classified", bands))}


def main(argv: list[str] | None = None) -> None:
    import torch

    from survey_proc import model_registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="test")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--bands", default="rb")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sparse-weights", default="", help="the sparse classifier's weights ('' shipped, 'none': off)")
    ap.add_argument("--as-object", action="store_true", help="both bands as one multi-band object (classify_table)")
    ap.add_argument("--per-band-search", action="store_true",
                    help="each band's period searched alone ([classify] joint_bands = false)")
    ap.add_argument("--thin", type=float, default=0.0,
                    help="keep this fraction of each band's points (at least 20; random, seeded per star): a sparser "
                         "survey")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    clf = model_registry.load("classifier", path=args.weights, device="cpu")
    sparse = (None if args.sparse_weights == "none"
              else model_registry.load("classifier_sparse", path=args.sparse_weights or None, device="cpu"))
    span_days = ClassifySettings().sparse_span_days
    lab = pd.read_csv(EROS / f"{args.split}.csv", index_col=0)
    curves = pd.read_csv(EROS / f"{args.split}_varlength_features.csv.gz", index_col=0)
    ids = lab.index.intersection(curves.index)
    if args.limit:
        ids = ids[:args.limit]
    t0 = time.time()
    rows = []
    for k, sid in enumerate(ids):
        joint = not args.per_band_search
        thin = (args.thin, k) if args.thin > 0 else None
        r = (classify_star_object(curves.loc[sid], clf, sparse, args.bands, joint, thin) if args.as_object
             else classify_star(curves.loc[sid], clf, args.bands, sparse, span_days, joint, thin))
        typ = int(lab.loc[sid, "type"])
        p_true = float(lab.loc[sid, "period"] / lab.loc[sid, "div_period"])
        pred = four_class(r["var_class"], r["period"])
        rows.append({"star": sid, "type": typ, "p_true": p_true, "pred": pred,
                     "period_ok": period_ok(r["period"], p_true, typ == 1), **r})
        if k % 100 == 0:
            print(f"{k}/{len(ids)} {time.time() - t0:.0f} s", flush=True)
    d = pd.DataFrame(rows)
    correct = d["pred"] == d["type"]
    res = {"split": args.split, "n": len(d), "weights": str(clf.path), "threshold": clf.threshold,
           "mode": "one multi-band object (classify_table)" if args.as_object else "bands reconciled",
           "band_search": "each band alone" if args.per_band_search else "joint (the long curves of all bands)",
           "thin": args.thin or None,
           "sparse_weights": str(sparse.path) if sparse is not None else None,
           "sparse_threshold": sparse.threshold if sparse is not None else None,
           "class_accuracy": float(correct.mean()), "period_within_1pct": float(d["period_ok"].mean()),
           "period_within_1pct_of_correct_class": float(d.loc[correct, "period_ok"].mean()) if correct.any() else None,
           "per_class": {NAMES[t]: {"n": int((d["type"] == t).sum()),
                                    "accuracy": float(correct[d["type"] == t].mean()),
                                    "period_ok": float(d.loc[d["type"] == t, "period_ok"].mean())} for t in NAMES},
           "confusion": {NAMES[t]: {("none" if p == 0 else NAMES[p]): int(((d["type"] == t) & (d["pred"] == p)).sum())
                                    for p in (0, 1, 2, 3, 4)} for t in NAMES},
           "var_class_counts": {str(k): int(v) for k, v in d["var_class"].fillna("none").value_counts().items()},
           "wall_s": time.time() - t0}
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
        d.to_csv(Path(args.json).with_suffix(".csv"), index=False)


if __name__ == "__main__":
    main()

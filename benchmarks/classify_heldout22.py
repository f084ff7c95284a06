"""Issue 22 on held-out simulated surveys: the classify path re-run on a pipeline output's light curves.

    PYTHONPATH=. python benchmarks/classify_heldout22.py --run OUT --store STORE [--weights W] [--json F]
        [--sparse-run OUT40 ...]

``OUT`` is a ``survey-proc run`` output of a held-out survey (seed > 1000; 1000 epochs). Its
light curves (detrended with the run's own SysRem components when it has them, as the stage
does) go through :func:`survey_proc.lightcurves.search.classify_table` with the given
classifier, and:

- **1000 epochs**: precision / recall / periods of :func:`benchmarks.classify.evaluate`
  (blend-aware; recall for S/N >= 2), on objects rewritten into a scratch copy of the run;
  ``two_events_snr2``: the issue's recall (S/N >= 2 and at least two events in the baseline)
  and the periods of those true positives within 1 %.
- **40 and 100 epochs**: the same light curves cut to every 25th / 10th epoch (40 / 100
  epochs over the same 3.47 d: real pipeline photometry at a sparser cadence). *Constant
  stars called periodic*: objects matched one-to-one (1 px) to a true constant star with no
  true variable within 3 px, classified, whose class is periodic (eclipsing_binary,
  pulsator, transit), over those classified. ``--sparse-run``: the same figure on real
  40-epoch pipeline outputs of the sparse scenario.
- **Single events**: into the 1000-epoch light curves of up to 300 such constant stars
  (>= 500 points), one transit- or eclipse-like dip (depth 1-30 %, 1-6 h, centred at a
  random time 10-90 % into the baseline, nothing else) is injected; *given a period* = a
  periodic class with a finite period.
- **Reliability** of p_periodic (as the classify path reports it: calibrated when the card
  has ``calibration.p_periodic``) and of the raw summed periodic probability, on the
  1000-epoch objects and on the 100- and 40-epoch cuts: per bin of 0.1, n, mean p, the
  fraction of objects with a true periodic star within 1 px (blend-aware) and its Wilson
  95 % interval; the largest |mean p - fraction| over all bins and over bins of >= 20
  objects, ECE (the n-weighted mean |gap|) and the Brier score
  (:func:`training.calibrate_classifier.summary`). ``decisions_unchanged``: every classified
  object's ``p_periodic >= threshold`` equals ``raw >= calibration.threshold_raw``.
  ``--plot PNG`` draws the diagrams (raw and calibrated, per cadence).

``--as-written`` scores the 1000-epoch precision, recall and periods on the run's ``objects``
tables as the classify stage wrote them (its blend vetting included: ``blended_variable`` is not
a periodic class); without it the light curves are re-classified here (no pixels, so no blend
vetting). The other figures re-classify either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.classify import evaluate, truth_table
from survey_proc import model_registry
from survey_proc.config import ClassifySettings
from survey_proc.evaluate import match_one_to_one
from survey_proc.lightcurves.search import classify_table
from survey_proc.vocab import PERIODIC_CLASSES, PHOTOMETRY_BAD


def load_run(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Objects and (detrended, as the stage does) light curves of a run.

    The columns are the classify stage's own (:func:`survey_proc.stages.classify._lc_columns`):
    with ``band`` when the light curves have it. The SysRem components are stored per band, so
    without the column none of them applied and the curves were classified undetrended, unlike
    the stage (the case from the band column's introduction until 2026-12-01).
    """
    import pyarrow.parquet as pq

    objects = pd.read_parquet(run / "objects")
    cols = ["object_id", "epoch", "mjd", "mag", "mag_err", "flags"]
    names = pq.ParquetDataset(run / "lightcurves").schema.names
    lc = pd.read_parquet(run / "lightcurves", columns=[*cols, "band"] if "band" in names else cols)
    lc["flags"] = lc["flags"].astype(np.int64)
    comps = list(run.glob("calibration/field=*/detrend.parquet"))
    if comps:
        from survey_proc.lightcurves.detrend import apply_components

        c = pd.read_parquet(comps[0])
        if len(c):
            lc, _ = apply_components(lc, c, PHOTOMETRY_BAD)
    return objects, lc


def clean_constants(objects: pd.DataFrame, stars: pd.DataFrame) -> np.ndarray:
    """Object ids matched one-to-one to a true constant star with no true variable within 3 px."""
    from scipy.spatial import cKDTree

    i_o, i_s = match_one_to_one(objects["x"].to_numpy(), objects["y"].to_numpy(), stars["x"].to_numpy(),
                                stars["y"].to_numpy(), 1.0)
    var = stars[stars["var_class"] != "constant"]
    d, _ = cKDTree(var[["x", "y"]].to_numpy()).query(objects[["x", "y"]].to_numpy()[i_o])
    ok = (stars["var_class"].to_numpy()[i_s] == "constant") & (d > 3.0)
    return objects["object_id"].to_numpy()[i_o[ok]]


def constants_called_periodic(res: pd.DataFrame, const_ids: np.ndarray) -> dict:
    r = res.reindex(const_ids)
    done = r["var_class"].notna()
    per = r["var_class"].isin(PERIODIC_CLASSES) & done
    return {"n_constants": len(const_ids), "n_classified": int(done.sum()), "n_called_periodic": int(per.sum()),
            "fraction": float(per.sum() / max(done.sum(), 1)),
            "classes": {str(k): int(v) for k, v in r.loc[done, "var_class"].value_counts().items()}}


def reliability_of(res: pd.DataFrame, has_per: pd.Series, threshold: float, threshold_raw: float,
                   by_points: list[dict] | None = None) -> dict:
    """Reliability of ``p_periodic`` and of the raw summed periodic probability of classified objects.

    ``decisions_unchanged``: ``p_periodic >= threshold`` is ``raw >= `` the raw threshold of the
    map the curve took (``threshold_raw``, or a sparser cadence's block's from ``by_points``:
    the card's ``calibration.p_periodic_by_points``; a block whose map never reaches the
    threshold calls nothing).
    """
    from training.calibrate_classifier import summary

    r = res[res["var_class"].notna()]
    y = has_per.reindex(r.index).fillna(False).to_numpy(bool)
    p_cal = r["p_periodic"].to_numpy(float)
    p_raw = r[[f"prob_{c}" for c in PERIODIC_CLASSES]].sum(axis=1).to_numpy(float)
    thr_row = np.full(len(r), float(threshold_raw))
    if by_points:
        n_pts = r["n_points_classified"].to_numpy(float)
        todo = np.ones(len(r), bool)
        for b in sorted(by_points, key=lambda b: b["max_points"]):
            sel = todo & (n_pts <= b["max_points"])
            thr_row[sel] = np.inf if b.get("threshold_raw") is None else float(b["threshold_raw"])
            todo &= ~sel
    return {"calibrated": summary(p_cal, y), "raw": summary(p_raw, y),
            "decisions_unchanged": bool(np.array_equal(p_cal >= threshold, p_raw >= thr_row))}


def plot_reliability(rel: dict, path: str, title: str) -> None:
    """Reliability diagrams, raw and calibrated, one panel per cadence, with the objects per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rel), figsize=(5 * len(rel), 5.2), squeeze=False)
    for ax, (n_ep, r) in zip(axes[0], rel.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1)
        ax.fill_between([0, 1], [-0.05, 0.95], [0.05, 1.05], color="0.9", label="diagonal +- 0.05")
        for key, col, mk in (("raw", "tab:red", "s"), ("calibrated", "tab:blue", "o")):
            b = [x for x in r[key]["bins"] if x["n"]]
            pm = np.array([x["p_mean"] for x in b])
            fr = np.array([x["frac"] for x in b])
            lo = np.array([x["wilson95"][0] for x in b])
            hi = np.array([x["wilson95"][1] for x in b])
            ax.errorbar(pm, fr, yerr=[np.clip(fr - lo, 0, None), np.clip(hi - fr, 0, None)], fmt=mk + "-", color=col,
                        ms=5, capsize=2,
                        label=f"{key}: ECE {r[key]['ece']:.3f}, max gap {r[key]['max_gap']:.2f}")
            for x, f, n in zip(pm, fr, [x["n"] for x in b], strict=True):
                ax.annotate(str(n), (x, f), textcoords="offset points", xytext=(4, -10 if key == "raw" else 6),
                            fontsize=7, color=col)
        ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="mean p_periodic in bin",
               ylabel="fraction with a true periodic star (1 px)", title=f"{n_ep} epochs")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title + " (numbers: objects per bin; bars: Wilson 95 %)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--sparse-run", nargs="*", default=[])
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--plot", default=None, help="reliability diagram PNG")
    ap.add_argument("--as-written", action="store_true",
                    help="score the 1000-epoch figures on the run's objects tables as the classify stage wrote "
                         "them (its blend vetting included) instead of re-classifying its light curves")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    clf = model_registry.load("classifier", path=args.weights, device="cpu")
    cc = ClassifySettings()
    run = Path(args.run)
    objects, lc = load_run(run)
    stars = truth_table(args.store)
    out: dict = {"run": str(run), "weights": str(clf.path), "threshold": clf.threshold}
    res, info = classify_table(lc, clf, cc)
    assert res is not None
    obj = objects.copy()
    for c in ("period", "period_power", "depth", "duration", "p_periodic", "var_class", "var_class_prob"):
        obj[c] = res[c].reindex(obj["object_id"]).to_numpy()
    obj["n_points_classified"] = res["n_points_classified"].reindex(obj["object_id"]).fillna(0).to_numpy()
    if args.as_written:  # the pipeline's own output: its classes, blend vetting included
        ev, st = evaluate(run, args.store, blend_aware=True)
        out["scored"] = "objects as written by the run"
    else:
        scratch = Path(tempfile.mkdtemp(prefix="heldout22-"))
        try:
            shutil.copy(run / "run.json", scratch / "run.json")
            (scratch / "objects").mkdir()
            obj.to_parquet(scratch / "objects" / "all.parquet")
            ev, st = evaluate(scratch, args.store, blend_aware=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        out["scored"] = "light curves re-classified (no blend vetting)"
    out["epochs_1000"] = {k: ev[k] for k in ("n_classified", "n_predicted_periodic", "precision", "recall",
                                             "recall_seen", "n_periodic_snr2_classified", "recall_by_class",
                                             "periods", "false_positives_by_true_class")}
    out["epochs_1000"]["classify_info"] = {k: v for k, v in info.items() if k != "classes"}
    # the recall: S/N >= 2 and at least two events in the baseline
    sel = (st["snr_csst"] >= 2) & st["classified"] & (st["n_events"] >= 2)
    # periods: the "those" are the true positives among them (S/N >= 2 and >= 2 events); the figure
    # over every true positive with >= 2 events (fainter ones too) is kept beside it, as earlier entries gave it
    tp2 = st[sel & st["called_periodic"]]
    ratio = tp2["period_found"].to_numpy(float) / tp2["period"].to_numpy(float)
    tp_all = st[st["called_periodic"] & (st["n_events"] >= 2)]
    ratio_all = tp_all["period_found"].to_numpy(float) / tp_all["period"].to_numpy(float)
    out["epochs_1000"]["two_events_snr2"] = {
        "n": int(sel.sum()), "recall": float(st.loc[sel, "called_periodic"].mean()) if sel.any() else None,
        "n_true_positives": len(tp2), "period_within_1pct": float(np.mean(np.abs(ratio - 1) <= 0.01)) if len(tp2)
        else None,
        "any_snr_n_true_positives": len(tp_all),
        "any_snr_period_within_1pct": float(np.mean(np.abs(ratio_all - 1) <= 0.01)) if len(tp_all) else None}
    const_ids = clean_constants(objects, stars)
    out["epochs_1000"]["constants_called_periodic"] = constants_called_periodic(res, const_ids)
    # reliability of p_periodic (as reported) and of the raw summed probability
    from benchmarks.classify import _pairing

    _, has_per = _pairing(obj, stars, 1.0, True)
    has_per_s = pd.Series(has_per, index=obj["object_id"].to_numpy())
    thr_raw = float((clf.card or {}).get("calibration", {}).get("threshold_raw", clf.threshold))
    rel: dict = {}
    by_points = (clf.card or {}).get("calibration", {}).get("p_periodic_by_points")
    rel[1000] = reliability_of(res, has_per_s, clf.threshold, thr_raw, by_points)
    # sparser cadences from the same light curves
    for n_ep, step in ((100, 10), (40, 25)):
        r2, _ = classify_table(lc[lc["epoch"] % step == 0], clf, cc)
        assert r2 is not None
        out[f"epochs_{n_ep}_subsampled"] = constants_called_periodic(r2, const_ids)
        rel[n_ep] = reliability_of(r2, has_per_s, clf.threshold, thr_raw, by_points)
    for n_ep, r in rel.items():
        out[f"reliability_{n_ep}"] = r
    if args.plot:
        plot_reliability(rel, args.plot, f"{Path(args.run).name} (held-out store {Path(args.store).name})")
    for sr in args.sparse_run:
        o2, lc2 = load_run(Path(sr))
        js = json.loads((Path(sr) / "run.json").read_text())
        st2 = truth_table(js["config"]["store"])
        r3, _ = classify_table(lc2, clf, cc)
        out[f"sparse_run:{sr}"] = constants_called_periodic(r3, clean_constants(o2, st2)) if r3 is not None else None
    # single events injected into constant-star light curves
    rng = np.random.default_rng(args.seed)
    n_pts = lc.groupby("object_id").size()
    pool = np.intersect1d(const_ids, n_pts[n_pts >= 500].index.to_numpy())
    pick = rng.choice(pool, min(300, len(pool)), replace=False)
    sub = lc[lc["object_id"].isin(pick)].copy()
    t0, t1 = float(lc["mjd"].min()), float(lc["mjd"].max())
    centre = {i: t0 + rng.uniform(0.1, 0.9) * (t1 - t0) for i in pick}
    depth = {i: float(np.exp(rng.uniform(np.log(0.01), np.log(0.3)))) for i in pick}
    dur = {i: rng.uniform(1, 6) / 24 for i in pick}
    dt = np.abs(sub["mjd"].to_numpy() - sub["object_id"].map(centre).to_numpy())
    inside = dt < 0.5 * sub["object_id"].map(dur).to_numpy()
    sub.loc[inside, "mag"] += -2.5 * np.log10(1 - sub.loc[inside, "object_id"].map(depth).to_numpy())
    r4, _ = classify_table(sub, clf, cc)
    assert r4 is not None
    r4 = r4.reindex(pick)
    done = r4["var_class"].notna()
    given = r4["var_class"].isin(PERIODIC_CLASSES) & np.isfinite(r4["period"].to_numpy(float))
    out["single_events"] = {"n": len(pick), "n_classified": int(done.sum()),
                            "given_a_period": float(given.sum() / max(done.sum(), 1)),
                            "classes": {str(k): int(v) for k, v in r4.loc[done, "var_class"].value_counts().items()}}
    text = json.dumps(out, indent=1, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()

"""Calibrate the shipped classifier's p_periodic on simulated validation surveys and write the map on its card.

    OMP_NUM_THREADS=1 PYTHONPATH=. python training/calibrate_classifier.py \\
        --val RUN1:STORE1 [RUN2:STORE2 ...] [--card survey_proc/models/classifier.json] [--write] [--json F]

``RUNk`` is a ``survey-proc run`` output of a simulated survey *that is not a held-out one*
(issue 22: the held-out surveys are seeds 777 and 1919; the validation surveys here are
dense 256^2 x 1000 epochs, seeds 4242 and 4343, run with ``--detector pnet --photometry
bpnn`` like the held-out dense run), ``STOREk`` its store (truth beside it). What is done:

1. Every run's light curves (detrended with the run's own SysRem components, as the stage
   does: :func:`benchmarks.classify_heldout22.load_run`) go through the classify path
   (:func:`survey_proc.lightcurves.search.classify_table`) with the card's model; the *raw*
   p_periodic is the summed periodic-class probability (``prob_<class>`` columns), whatever
   calibration the card already has.
2. The label of an object: a true periodic star (eclipsing_binary, pulsator, transit) lies
   within 1 px (blend-aware pairing, :func:`benchmarks.classify._pairing`): the definition
   the held-out reliability diagram uses (``benchmarks/classify_heldout22.py``).
3. Candidate maps, compared by cross-survey validation (fit on one survey, scored on the
   other, both ways; Brier score summed, lowest wins; the rule was fixed before any number):
   plain isotonic regression (pool-adjacent-violators), isotonic with blocks of at least
   ``--min-block`` objects (small blocks at the ends are what overfits an isotonic map), and
   Platt scaling (a logistic fit on logit(p_raw)). The winner is refitted on all validation
   surveys together.
4. The map is stored as knots ``x`` (raw), ``y`` (calibrated) in ``calibration.p_periodic``
   (piecewise linear, :func:`survey_proc.lightcurves.classifier.apply_calibration`), made
   strictly increasing (``y (1 - 1e-6) + 1e-6 x``) so that the raw threshold converts
   exactly: the card's ``threshold`` becomes ``map(threshold_raw)`` and every object keeps
   its class (checked on the validation objects). ``calibration.threshold_raw`` keeps the
   raw value (v2: 0.94), ``calibration.provenance`` the surveys, counts, method choice and
   the validation reliability diagrams (in-sample and cross-survey).

Without ``--write`` nothing is written (the card block is printed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STRICT_EPS = 1e-6


# ------------------------------------------------------------------ maps
def pav(x: np.ndarray, y: np.ndarray, min_block: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Isotonic (non-decreasing) fit of labels ``y`` on scores ``x`` by pool-adjacent-violators.

    Tied scores are pooled first. With ``min_block > 1`` a block holding fewer objects is
    merged into its neighbour nearer in value and the pooling repeated, until every block
    holds at least ``min_block`` objects (or one block is left).

    Returns
    -------
    lo, hi, value, count
        Per block: lowest and highest score, fitted frequency and number of objects.
    """
    x = np.clip(np.asarray(x, float), 0.0, 1.0)  # a float32 sum of probabilities can exceed 1 by 1e-7
    o = np.argsort(x, kind="stable")
    xs, ys = x[o], np.asarray(y, float)[o]
    ux, inv = np.unique(xs, return_inverse=True)
    w = np.bincount(inv).astype(float)
    s = np.bincount(inv, ys)
    blocks = [[s[i], w[i], ux[i], ux[i]] for i in range(len(ux))]  # sum, count, lo, hi

    def pool(bl: list[list[float]]) -> list[list[float]]:
        out: list[list[float]] = []
        for b in bl:
            out.append(list(b))
            while len(out) > 1 and out[-2][0] / out[-2][1] >= out[-1][0] / out[-1][1]:
                b2 = out.pop()
                b1 = out.pop()
                out.append([b1[0] + b2[0], b1[1] + b2[1], b1[2], b2[3]])
        return out

    blocks = pool(blocks)
    while min_block > 1 and len(blocks) > 1:
        small = [i for i, b in enumerate(blocks) if b[1] < min_block]
        if not small:
            break
        i = min(small, key=lambda k: blocks[k][1])
        v = blocks[i][0] / blocks[i][1]
        if i == 0:
            j = 1
        elif i == len(blocks) - 1:
            j = i - 1
        else:
            dl = abs(v - blocks[i - 1][0] / blocks[i - 1][1])
            dr = abs(blocks[i + 1][0] / blocks[i + 1][1] - v)
            j = i - 1 if dl <= dr else i + 1
        a, b = sorted((i, j))
        merged = [blocks[a][0] + blocks[b][0], blocks[a][1] + blocks[b][1], blocks[a][2], blocks[b][3]]
        blocks = pool([*blocks[:a], merged, *blocks[b + 1:]])
    arr = np.array(blocks, float)
    return arr[:, 2], arr[:, 3], arr[:, 0] / arr[:, 1], arr[:, 1]


def strict_knots(x: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    """Knots over [0, 1] (flat beyond the fitted range) made strictly increasing: ``y (1 - eps) + eps x``."""
    x = np.asarray(x, float)
    y = np.maximum.accumulate(np.clip(np.asarray(y, float), 0.0, 1.0))
    if x[0] > 0:
        x, y = np.r_[0.0, x], np.r_[y[0], y]
    if x[-1] < 1:
        x, y = np.r_[x, 1.0], np.r_[y, y[-1]]
    x, keep = np.unique(x, return_index=True)
    y = np.clip(y[keep] * (1 - STRICT_EPS) + STRICT_EPS * x, 0.0, 1.0)  # rounding can reach 1 + 2e-16
    return {"x": [float(v) for v in x], "y": [float(v) for v in y]}


def fit_isotonic(p: np.ndarray, y: np.ndarray, min_block: int = 1) -> dict[str, list[float]]:
    """Isotonic map as knots: each block's value at its lowest and highest score, linear between blocks."""
    lo, hi, v, _ = pav(p, y, min_block)
    xk = np.ravel(np.c_[lo, hi])
    yk = np.ravel(np.c_[v, v])
    xk, keep = np.unique(xk, return_index=True)  # a one-score block gives lo == hi
    return strict_knots(xk, yk[keep])


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, float), 1e-7, 1 - 1e-7)
    return np.log(q / (1 - q))


def fit_platt(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Platt scaling: ``sigmoid(a logit(p) + b)`` by maximum likelihood, as 241 knots evenly spaced in logit(p)."""
    from scipy.optimize import minimize

    z, t = _logit(p), np.asarray(y, float)

    def nll(ab: np.ndarray) -> float:
        s = ab[0] * z + ab[1]
        return float(np.sum(np.logaddexp(0, s) - t * s))

    ab = minimize(nll, np.array([1.0, 0.0]), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9}).x
    zk = np.linspace(-12, 12, 241)
    xk = 1 / (1 + np.exp(-zk))
    yk = 1 / (1 + np.exp(-(ab[0] * zk + ab[1])))
    knots = strict_knots(xk, yk)
    return {**knots, "a": float(ab[0]), "b": float(ab[1])}


# ------------------------------------------------------------------ scores
def reliability(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Per bin of ``p`` (``n_bins`` equal bins of 0..1): n, mean p, observed fraction, Wilson 95 % interval."""
    edges = np.linspace(0, 1, n_bins + 1)
    b = np.clip(np.digitize(p, edges) - 1, 0, n_bins - 1)
    out = []
    for k in range(n_bins):
        m = b == k
        n = int(m.sum())
        row: dict[str, Any] = {"p_lo": float(edges[k]), "p_hi": float(edges[k + 1]), "n": n, "p_mean": None,
                               "frac": None, "gap": None, "wilson95": None}
        if n:
            f = float(np.mean(y[m]))
            z = 1.96
            c = (f + z * z / (2 * n)) / (1 + z * z / n)
            h = z * np.sqrt(f * (1 - f) / n + z * z / (4 * n * n)) / (1 + z * z / n)
            row.update(p_mean=float(np.mean(p[m])), frac=f, gap=float(np.mean(p[m]) - f),
                       wilson95=[float(c - h), float(c + h)])
        out.append(row)
    return out


def summary(p: np.ndarray, y: np.ndarray, n_bins: int = 10, min_n: int = 20) -> dict[str, Any]:
    """Reliability bins, the largest |gap| over all bins and over bins with >= ``min_n`` objects, ECE, Brier."""
    rel = reliability(p, y, n_bins)
    gaps = [(abs(r["gap"]), r["n"]) for r in rel if r["n"]]
    n = max(len(p), 1)
    return {"n": len(p), "n_positive": int(np.sum(y)), "bins": rel,
            "max_gap": max(g for g, _ in gaps) if gaps else None,
            f"max_gap_bins_n>={min_n}": max((g for g, m in gaps if m >= min_n), default=None),
            "ece": float(sum(g * m for g, m in gaps) / n),
            "brier": float(np.mean((p - y) ** 2)) if len(p) else None}


# ------------------------------------------------------------------ data
def raw_scores(run: Path, store: str, clf: Any, every: int = 1, no_forced: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(object ids, raw p_periodic, label) of a run's classified objects.

    ``every`` > 1: every ``every``-th epoch only; ``no_forced``: without the forced-photometry
    points (what a run made before the forced stage existed classified).
    """
    from benchmarks.classify import _pairing, truth_table
    from benchmarks.classify_heldout22 import load_run
    from survey_proc.config import ClassifySettings
    from survey_proc.lightcurves.search import classify_table
    from survey_proc.vocab import PERIODIC_CLASSES

    objects, lc = load_run(run)
    if no_forced:
        from survey_proc.vocab import FORCED

        lc = lc[(lc["flags"].to_numpy() & FORCED) == 0]
    if every > 1:
        lc = lc[lc["epoch"] % every == 0]
    res, _ = classify_table(lc, clf, ClassifySettings())
    assert res is not None
    _, has_per = _pairing(objects, truth_table(store), 1.0, True)
    p = res[[f"prob_{c}" for c in PERIODIC_CLASSES]].sum(axis=1, min_count=1).reindex(
        objects["object_id"]).to_numpy(float)
    ok = np.isfinite(p)
    return objects["object_id"].to_numpy()[ok], p[ok], has_per[ok]


def main(argv: list[str] | None = None) -> None:
    import torch

    from survey_proc import model_registry
    from survey_proc.lightcurves.classifier import apply_calibration

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--val", nargs="+", required=True, help="RUN:STORE pairs of validation surveys")
    ap.add_argument("--card", default=str(ROOT / "survey_proc/models/classifier.json"))
    ap.add_argument("--min-block", type=int, default=20)
    ap.add_argument("--check-cadences", type=int, nargs="*", default=[100, 40],
                    help="also show the validation reliability on every (1000/N)-th epoch (not fitted)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    card_path = Path(args.card)
    card = json.loads(card_path.read_text())
    thr_raw = float(card.get("calibration", {}).get("threshold_raw", card["threshold"]))
    raw_rule = card.get("calibration", {}).get("threshold_raw_rule", card.get("threshold_rule", ""))
    weights = card_path.with_suffix(".pt")
    clf = model_registry.load("classifier", path=weights, device="cpu")
    clf = replace(clf, card={k: v for k, v in clf.card.items() if k != "calibration"}, threshold=thr_raw)
    surveys = []
    cuts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in args.check_cadences}
    for spec in args.val:
        run, store = spec.split(":", 1)
        _, p, y = raw_scores(Path(run), store, clf)
        surveys.append({"run": run, "store": store, "p": p, "y": y})
        print(f"{run}: {len(p)} objects, {int(y.sum())} with a true periodic star", flush=True)
        for n_ep in args.check_cadences:  # every k-th epoch of the same light curves (not fitted, shown)
            _, p2, y2 = raw_scores(Path(run), store, clf, every=1000 // n_ep)
            cuts[n_ep].append((p2, y2))
    candidates = {"isotonic": lambda p, y: fit_isotonic(p, y, 1),
                  f"isotonic_min_block_{args.min_block}": lambda p, y: fit_isotonic(p, y, args.min_block),
                  "platt": fit_platt}
    cv: dict[str, Any] = {}
    for name, fit in candidates.items():
        rows, brier = [], 0.0
        for i, test in enumerate(surveys):
            train = [s for j, s in enumerate(surveys) if j != i] or [test]
            m = fit(np.concatenate([s["p"] for s in train]), np.concatenate([s["y"] for s in train]))
            pc = apply_calibration(test["p"], m)
            sm = summary(pc, test["y"])
            brier += sm["brier"] * len(pc)
            rows.append({"test": test["run"], **{k: sm[k] for k in ("max_gap", "max_gap_bins_n>=20", "ece", "brier")}})
        cv[name] = {"brier_total": brier, "folds": rows}
    best = min(cv, key=lambda k: cv[k]["brier_total"])
    p_all = np.concatenate([s["p"] for s in surveys])
    y_all = np.concatenate([s["y"] for s in surveys])
    cal = candidates[best](p_all, y_all)
    knots = {"x": cal["x"], "y": cal["y"]}
    p_cal = apply_calibration(p_all, knots)
    thr_cal = float(apply_calibration(np.array([thr_raw]), knots)[0])
    same = np.array_equal(p_all >= thr_raw, p_cal >= thr_cal)
    if not same:
        raise SystemExit("the converted threshold changes some validation object's decision: not written")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    block = {
        "p_periodic": knots,
        "method": f"{best} (p_periodic = the summed periodic-class probability mapped piecewise linearly "
                  "between the knots; chosen by the lowest cross-survey Brier score among plain isotonic, "
                  f"isotonic with blocks of >= {args.min_block} objects and Platt scaling)",
        "threshold_raw": thr_raw,
        "threshold_raw_rule": raw_rule,
        "threshold_rule": "card threshold = the raw validation threshold mapped through the calibration "
                          "(strictly increasing: every object keeps its class)",
        "target": "an object has a true periodic star (eclipsing_binary, pulsator, transit) within 1 px "
                  "(blend-aware, benchmarks/classify.py _pairing)",
        "provenance": {
            "script": "training/calibrate_classifier.py", "date": dt.date.today().isoformat(), "git_revision": git,
            "surveys": [{"run": s["run"], "store": s["store"], "n": len(s["p"]), "n_positive": int(s["y"].sum())}
                        for s in surveys],
            "note": "simulated dense 256^2 x 1000-epoch surveys with seeds that no held-out figure uses; "
                    "default classify settings; the held-out surveys (seeds 777, 1919) were not used",
            "cross_survey": cv,
            "reliability_raw": summary(p_all, y_all),
            "reliability_calibrated_in_sample": summary(p_cal, y_all),
            "other_cadences_not_fitted": {
                str(n_ep): {"raw": summary(np.concatenate([c[0] for c in cs]), np.concatenate([c[1] for c in cs])),
                            "calibrated": summary(apply_calibration(np.concatenate([c[0] for c in cs]), knots),
                                                  np.concatenate([c[1] for c in cs]))}
                for n_ep, cs in cuts.items()},
        },
    }
    if best == "platt":
        block["platt"] = {"a": cal["a"], "b": cal["b"]}
    out = {"best": best, "threshold_raw": thr_raw, "threshold": thr_cal, "cv": cv, "block": block}
    text = json.dumps(out, indent=1, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    if args.write:
        card["calibration"] = block
        card["threshold"] = thr_cal
        card["threshold_rule"] = (f"calibration.threshold_raw ({thr_raw:.4g}, raw: {raw_rule}) mapped through "
                                  "calibration.p_periodic (strictly increasing: the same classes)")
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"wrote {card_path}: threshold {thr_raw} (raw) -> {thr_cal:.6f} (calibrated)")


if __name__ == "__main__":
    main()

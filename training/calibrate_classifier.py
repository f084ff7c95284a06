"""Calibrate the shipped classifier's p_periodic on simulated validation surveys and write the map on its card.

    OMP_NUM_THREADS=1 PYTHONPATH=. python training/calibrate_classifier.py \\
        --val RUN1:STORE1 [RUN2:STORE2 ...] [--card survey_proc/models/classifier.json] [--write] [--json F]

``RUNk`` is a ``survey-proc run`` output of a simulated survey *that is not a held-out one*
(issue 22: the held-out surveys are seeds 777, 1919, 5151, 5252, 6161, 6262, 7171 and 7272;
the shipped card's validation surveys are dense 256^2 x 1000 epochs, seeds 4242, 4343, 4444 and
4545; 512^2 validation surveys used in measurements: 4646, 4747, 4848, 4949, 8383, 8484; all run
with the default pipeline (sep, forced photometry) as ``survey-proc run STORE --out RUN``),
``STOREk`` its store (truth beside it). What is done:

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
   strictly increasing (``y (1 - 1e-6) + 1e-6 x``) so that a threshold converts exactly
   between the scales. Without ``--calibrated-threshold`` the card's raw threshold
   (``calibration.threshold_raw``) is kept and the card's ``threshold`` becomes
   ``map(threshold_raw)``: every object keeps its class. With ``--calibrated-threshold P``
   (the shipped card: 0.5) the card's ``threshold`` is P and ``threshold_raw`` the lowest raw
   score the map takes to P (:func:`raw_threshold_for`): an object is called periodic when a
   true periodic star is at least that probable. Either way the decisions are checked to be the
   same on both scales for every validation object. ``calibration.provenance`` keeps the
   surveys, counts, method choice, the validation reliability diagrams (in-sample and
   cross-survey) and ``threshold_curve``: the pooled validation precision and recall of the
   calls (after the classify path's gates) at a few raw thresholds.

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

from survey_proc.lightcurves.classifier import apply_calibration

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

    def nll(ab: np.ndarray) -> tuple[float, np.ndarray]:
        s = ab[0] * z + ab[1]
        r = 1 / (1 + np.exp(-s)) - t  # d nll / d s
        return float(np.sum(np.logaddexp(0, s) - t * s)), np.array([np.sum(r * z), np.sum(r)])

    # BFGS on the convex negative log-likelihood with its gradient (Nelder-Mead stopped early on
    # some pooled sets, returning a map close to the identity)
    ab = minimize(nll, np.array([1.0, 0.0]), jac=True, method="BFGS", options={"gtol": 1e-8}).x
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
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(object ids, raw p_periodic, label, passes the gates) of a run's classified objects.

    ``every`` > 1: every ``every``-th epoch only; ``no_forced``: without the forced-photometry
    points (what a run made before the forced stage existed classified). The curves are
    classified with a threshold below every score, so that each object's most probable
    periodic class meets the gates the classify path puts after the threshold (a pulsator's
    Lomb-Scargle false-alarm probability, two events or 1.15 cycles in the span): "passes the
    gates" is then whether the object would be called periodic at any threshold at or below
    its score (the raw scores do not depend on the threshold).
    """
    from dataclasses import replace as _replace

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
    res, _ = classify_table(lc, _replace(clf, threshold=-1.0), ClassifySettings())
    assert res is not None
    _, has_per = _pairing(objects, truth_table(store), 1.0, True)
    res = res.reindex(objects["object_id"])
    p = res[[f"prob_{c}" for c in PERIODIC_CLASSES]].sum(axis=1, min_count=1).to_numpy(float)
    gates = res["var_class"].isin(PERIODIC_CLASSES).to_numpy(bool)
    ok = np.isfinite(p)
    return objects["object_id"].to_numpy()[ok], p[ok], has_per[ok], gates[ok]


def raw_threshold_for(knots: dict[str, list[float]], p_cal: float) -> float:
    """The lowest raw score whose calibrated p_periodic (the piecewise-linear map of ``knots``) reaches ``p_cal``."""
    x, y = np.asarray(knots["x"], float), np.asarray(knots["y"], float)
    if not y[0] <= p_cal <= y[-1]:
        raise SystemExit(f"the calibration never reaches p_periodic = {p_cal} (its range is {y[0]:.4g}-{y[-1]:.4g})")
    t = float(np.interp(p_cal, y, x))  # strictly increasing map: invertible
    while float(np.interp(t, x, y)) < p_cal:  # rounding: the next float up
        t = float(np.nextafter(t, 2.0))
    return t


def threshold_curve(p: np.ndarray, y: np.ndarray, gates: np.ndarray, thresholds: list[float]) -> list[dict[str, Any]]:
    """Pooled validation precision and recall of the calls (``p >= t`` and the gates passed) at each raw threshold."""
    rows = []
    for t in thresholds:
        called = gates & (p >= t)
        rows.append({"threshold_raw": float(t), "n_called": int(called.sum()),
                     "precision": float(np.mean(y[called])) if called.any() else None,
                     "recall": float(np.sum(y & called) / max(np.sum(y), 1))})
    return rows


#: the validation surveys' number of epochs (the cuts take every (FULL_EPOCHS // n)-th epoch)
FULL_EPOCHS = 1000


def choose_map(surveys: list[dict[str, Any]], candidates: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The candidate map with the lowest cross-survey Brier score: ``(name, per-candidate folds)``.

    Each survey (``run``, raw scores ``p``, labels ``y``) is scored by the map fitted on the
    others (on itself when it is the only one); the Brier scores are summed over objects.
    """
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
    return min(cv, key=lambda k: cv[k]["brier_total"]), cv


def cadence_maps(cuts: dict[int, list[tuple[np.ndarray, np.ndarray]]], cadences: list[int],
                 candidates: dict[str, Any], full_epochs: int, calibrated_threshold: float,
                 names: list[str] | None = None) -> list[dict[str, Any]]:
    """Maps for sparser curves (the card's ``calibration.p_periodic_by_points``), one per cadence of ``cadences``.

    Parameters
    ----------
    cuts
        Per cadence (epochs), per validation survey: (raw scores, labels) of the survey's light
        curves cut to that cadence.
    cadences
        The cadences to fit (each a key of ``cuts``).
    candidates
        The candidate map fitters (``fit(p, y)`` -> knots); each cadence takes the one with the
        lowest cross-survey Brier score on its own cuts (:func:`choose_map`), as the main map does.
    names
        The surveys' names (for the folds' record).
    full_epochs
        The full surveys' number of epochs (the main map's cadence).
    calibrated_threshold
        The card's threshold (calibrated scale): each block records the raw score reaching it
        (``threshold_raw``; None when its map never does: no curve of that cadence is called periodic).

    Returns
    -------
    list of dict
        ``max_points`` (the geometric mean of the cadence and the next denser one, the main map's
        cadence for the densest: a curve with at most that many kept points takes the block),
        ``x``, ``y`` (strictly increasing knots), ``epochs``, ``n``, ``n_positive``,
        ``threshold_raw``, ``reliability_in_sample``; by increasing ``max_points``.
    """
    out: list[dict[str, Any]] = []
    todo = sorted(cadences)
    for n_ep in todo:
        if n_ep not in cuts or not cuts[n_ep]:
            raise SystemExit(f"--fit-cadences {n_ep}: not among --check-cadences {sorted(cuts)}")
    for i, n_ep in enumerate(todo):
        denser = todo[i + 1] if i + 1 < len(todo) else full_epochs
        p = np.concatenate([c[0] for c in cuts[n_ep]])
        y = np.concatenate([c[1] for c in cuts[n_ep]])
        per_survey = [{"run": (names or [])[k] if k < len(names or []) else str(k), "p": c[0], "y": c[1]}
                      for k, c in enumerate(cuts[n_ep])]
        method, cv = choose_map(per_survey, candidates)
        m = candidates[method](p, y)
        knots = {"x": m["x"], "y": m["y"]}
        reaches = knots["y"][0] <= calibrated_threshold <= knots["y"][-1]
        out.append({"max_points": int(np.floor(np.sqrt(n_ep * denser))), "x": knots["x"], "y": knots["y"],
                    "epochs": n_ep, "n": len(p), "n_positive": int(np.sum(y)), "method": method,
                    "cross_survey": {k: v["brier_total"] for k, v in cv.items()},
                    "threshold_raw": raw_threshold_for(knots, calibrated_threshold) if reaches else None,
                    "reliability_in_sample": summary(apply_calibration(p, knots), y)})
    return out


def main(argv: list[str] | None = None) -> None:
    import torch

    from survey_proc import model_registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--val", nargs="+", required=True, help="RUN:STORE pairs of validation surveys")
    ap.add_argument("--card", default=str(ROOT / "survey_proc/models/classifier.json"))
    ap.add_argument("--min-block", type=int, default=20)
    ap.add_argument("--check-cadences", type=int, nargs="*", default=[100, 40],
                    help="also show the validation reliability on every (1000/N)-th epoch (not fitted)")
    ap.add_argument("--calibrated-threshold", type=float, default=None, metavar="P",
                    help="set the threshold on the calibrated scale (the raw one follows from the map) instead of "
                         "converting the card's raw threshold")
    ap.add_argument("--scores", default=None, metavar="NPZ",
                    help="validation scores: read from this file when it exists (same --val order), else saved to it")
    ap.add_argument("--fit-cadences", type=int, nargs="*", default=[], metavar="N_EPOCHS",
                    help="also fit a map for each of these cadences (each must be in --check-cadences) from the "
                         "validation light curves cut to every (1000 // N)-th epoch: the card's "
                         "calibration.p_periodic_by_points, chosen per curve by its number of kept points")
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
    cache = np.load(args.scores) if args.scores and Path(args.scores).exists() else None
    saved: dict[str, np.ndarray] = {}
    for k, spec in enumerate(args.val):
        run, store = spec.split(":", 1)
        if cache is not None:
            p, y, g = cache[f"p{k}"], cache[f"y{k}"], cache[f"g{k}"]
        else:
            _, p, y, g = raw_scores(Path(run), store, clf)
        saved.update({f"p{k}": p, f"y{k}": y, f"g{k}": g})
        surveys.append({"run": run, "store": store, "p": p, "y": y, "gates": g})
        print(f"{run}: {len(p)} objects, {int(y.sum())} with a true periodic star", flush=True)
        for n_ep in args.check_cadences:  # every k-th epoch of the same light curves (not fitted, shown)
            if cache is not None:
                p2, y2 = cache[f"p{k}_{n_ep}"], cache[f"y{k}_{n_ep}"]
            else:
                _, p2, y2, _ = raw_scores(Path(run), store, clf, every=1000 // n_ep)
            saved.update({f"p{k}_{n_ep}": p2, f"y{k}_{n_ep}": y2})
            cuts[n_ep].append((p2, y2))
    if args.scores and cache is None:
        np.savez(args.scores, **saved)
    candidates = {"isotonic": lambda p, y: fit_isotonic(p, y, 1),
                  f"isotonic_min_block_{args.min_block}": lambda p, y: fit_isotonic(p, y, args.min_block),
                  "platt": fit_platt}
    best, cv = choose_map(surveys, candidates)
    p_all = np.concatenate([s["p"] for s in surveys])
    y_all = np.concatenate([s["y"] for s in surveys])
    g_all = np.concatenate([s["gates"] for s in surveys])
    cal = candidates[best](p_all, y_all)
    knots = {"x": cal["x"], "y": cal["y"]}
    p_cal = apply_calibration(p_all, knots)
    old_raw = thr_raw
    if args.calibrated_threshold is not None:
        thr_raw = raw_threshold_for(knots, args.calibrated_threshold)
        raw_rule = (f"the raw score at which the calibrated p_periodic reaches {args.calibrated_threshold} (an object "
                    "is called periodic when a true periodic star is at least that probable; "
                    "training/calibrate_classifier.py --calibrated-threshold)")
    thr_cal = float(apply_calibration(np.array([thr_raw]), knots)[0])
    same = np.array_equal(p_all >= thr_raw, p_cal >= thr_cal)
    if not same:
        bad = (p_all >= thr_raw) != (p_cal >= thr_cal)
        print(f"threshold {thr_raw!r} -> {thr_cal!r}; changed: p_raw {p_all[bad][:10]!r} -> {p_cal[bad][:10]!r}")
        raise SystemExit("the converted threshold changes some validation object's decision: not written")
    by_points = cadence_maps(cuts, args.fit_cadences, candidates, full_epochs=FULL_EPOCHS,
                             calibrated_threshold=thr_cal, names=[s["run"] for s in surveys])
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
            "note": "simulated dense 256^2 x 1000-epoch surveys with seeds that no held-out figure uses, run with "
                    "the default pipeline, detrended as the classify stage detrends them; default classify "
                    "settings; the held-out surveys (seeds 777, 1919, 5151, 5252, 6161, 6262, 7171, 7272) were "
                    "not used",
            "cross_survey": cv,
            "threshold_curve": threshold_curve(p_all, y_all, g_all, sorted({0.5, 0.9, old_raw, 0.99, 0.999, 0.9999,
                                                                              thr_raw})),
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
    if by_points:
        block["p_periodic_by_points"] = by_points
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
        _rewrite_weights_threshold(weights, thr_cal)


def _rewrite_weights_threshold(weights: Path, threshold: float) -> None:
    """Put the calibrated ``threshold`` in the weights file too, when it carries one.

    The registry's settings rule reads the weights file's threshold before the card's
    (:func:`survey_proc.model_registry.load`): a file saved by ``training/train_classifier.py``
    holds the raw validation threshold, which would silently override the calibrated one.
    """
    import torch

    blob = torch.load(weights, map_location="cpu", weights_only=False)
    if isinstance(blob, dict) and blob.get("threshold") is not None:
        blob["threshold"] = float(threshold)
        torch.save(blob, weights)
        print(f"wrote {weights}: threshold {threshold:.6f} (the weights file's own, read before the card's)")


if __name__ == "__main__":
    main()

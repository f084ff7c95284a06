"""Train the sparse, long-baseline light-curve classifier (``survey_proc/models/classifier_sparse.pt``).

    PYTHONPATH=. python training/train_sparse_classifier.py [--out survey_proc/models/classifier_sparse.pt]
        [--cache training/cache/sparse-features-2views-rescaled.npz] [--workers 2] [--per-band] [--no-thinned]

Data (:mod:`survey_proc.lightcurves.sparse_classifier` says why this model exists):

- **Periodic**: the EROS-1 *train* split (``../shared/data/lightcurves/eros/train.csv``; the
  test split is never read here), both bands: type 1 -> ``eclipsing_binary``, types 2-4
  (Cepheids, RR Lyrae, Miras) -> ``pulsator``.
- **Negatives at the same real cadences and errors**: for every train star, an object in
  both bands at the star's real times and quoted errors: (a) a ``constant`` star: Gaussian
  noise of the quoted errors times a factor in [0.9, 1.5] (real errors are often
  underestimated), 2 % of the points 3-8 sigma outliers; (b) a ``non_periodic`` object: one
  damped random walk (quasar-like; tau 10-1000 d log-uniform, rms 0.05-0.5 mag, ``--drw-rms-max``) or linear
  trend with a zero-point jump (0.05-0.5 mag) seen in both bands (amplitude 0.7-1.4x per
  band), plus the noise of (a).
- **Two views of each curve** (:mod:`survey_proc.lightcurves.sparse_classifier`, "Two views of
  a curve"): the features of the points the preprocessing keeps (``x``) and of those points with
  the clipped ones put back (``x_u``), each view's period searched on its own (with the object's
  other bands' same view); the model reads both side by side (card ``views``).
- **Each band of each object is a training curve**, measured three ways (``mode``):
  ``joint`` (its period searched with the object's other band, as the classify stage does
  with ``[classify] joint_bands``), ``alone`` (a single-band object) and ``thinned`` (each
  band keeps a random 20-60 % of its points, at least 20, searched jointly: sparser surveys
  than EROS-1).

Every curve goes through the classify path's own preprocessing
(:func:`survey_proc.lightcurves.preprocess.preprocess`, ``min_points`` 20) and features
(:func:`survey_proc.lightcurves.fourier_features.curve_features`). Stars are split 80/20 (seed
0) into training and validation; the negatives follow their star. The MLP is trained with
class-balanced cross-entropy (AdamW, full batch, 400 steps). For each FAP gate of
:data:`FAP_GATES` and significance of :data:`SIGNIFICANCE` (the LS peak's Baluev FAP, or the
smaller of it and the multi-harmonic FAP; of the two views, the smaller) the threshold on
``p_periodic`` is the lowest one (grid 0.50-0.99) at which at most 0.5 % of the validation
constant objects and at most 0.5 % of the random-walk objects pass the full decision (threshold
and gate; an object is called when either band is, as the classify stage reconciles them) in each
mode (joint, alone, thinned; counted over curves and pooled over the modes, the two-view model let
the thinned cadence's constant objects through at ~1 %); of those, the variant with the best four-class accuracy on the
validation EROS stars in ``joint`` mode (:func:`star_level`, the rule of ``benchmarks/eros.py``)
is kept (card ``max_fap``, ``significance``, ``threshold``). No gate at all is not offered: it
called 12 of 40 white-noise objects of a cadence outside the training set periodic (RESULTS.md,
issue 22). The card records the data, every variant's validation figures and the rule. The EROS
test split is never read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.eros import four_class, period_ok
from survey_proc.lightcurves.fourier_features import FEATURE_NAMES, curve_features
from survey_proc.lightcurves.preprocess import PreprocessConfig, preprocess
from survey_proc.lightcurves.sparse_classifier import (
    SPARSE_CLASSES,
    VIEWS,
    FourierMLP,
    SparseClassifierConfig,
)
from training.build_cadence_data import EROS, eros_band

PERIOD_MIN_DAYS = 0.1  # EROS-1's shortest periods are RRc stars at ~0.2 d
RESCALE_BANDS = True  # the joint search weighs each band by its own scatter (fourier_features.rescaled_bands)
MAX_FP = 0.005  # validation constants and random walks called periodic, at most
SIGNIFICANCE = ("ls", "ls_or_harmonic")  # the LS FAP, or the smaller of it and the multi-harmonic FAP
CACHE_COLUMNS = ("star", "band", "label", "type", "mode", "period", "fap", "fap_h", "period_u", "fap_u", "fap_h_u")
FAP_GATES = (1e-3, 1e-2)  # FAP gates tried (1e-3: the [classify] pulsator_max_fap default); never none (see below)


Curve = tuple[np.ndarray, np.ndarray, np.ndarray]


def _kept(t: np.ndarray, mag: np.ndarray, err: np.ndarray) -> tuple[Curve, Curve] | None:
    """One band through the classify path's preprocessing: its two views (the kept points; the kept and the
    clipped points), each (times (days, same clock as ``t``), relative flux, its error); None when unusable."""
    b = preprocess(np.array([0]), t, mag[None], err[None], np.zeros((1, len(t)), np.int32),
                   PreprocessConfig(min_points=20))
    curve = b.kept(0)
    if not b.usable[0] or np.ptp(curve[0]) < 4 * PERIOD_MIN_DAYS:
        return None
    return curve, b.kept(0, with_clipped=True)


def _features_of(bands: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], joint: bool = True
                 ) -> dict[str, dict[str, tuple[np.ndarray, float, float, float]]]:
    """Of each usable band of one object and each view of :data:`VIEWS`: (features, fitted period (days), LS FAP,
    harmonic FAP), the period searched in all its usable bands' same view jointly (``joint``) or in each band
    alone."""
    kept = {b: k for b, v in bands.items() if (k := _kept(*v)) is not None}
    out: dict[str, dict[str, tuple[np.ndarray, float, float, float]]] = {}
    for b, views in kept.items():
        out[b] = {}
        for k, view in enumerate(VIEWS):
            others = [v[k] for o, v in kept.items() if o != b] if joint else []
            fit = curve_features(*views[k], PERIOD_MIN_DAYS, others=others, rescale_bands=RESCALE_BANDS)
            out[b][view] = (fit.features, fit.period_days, fit.fap, fit.fap_harmonic)
    return out


def _row(f: dict[str, tuple[np.ndarray, float, float, float]]) -> dict:
    """A training row's measured columns from :func:`_features_of`'s views of one band (unclipped: suffix ``_u``)."""
    c, u = f["clipped"], f["unclipped"]
    return {"x": c[0], "period": c[1], "fap": c[2], "fap_h": c[3],
            "x_u": u[0], "period_u": u[1], "fap_u": u[2], "fap_h_u": u[3]}


def _negative(rng: np.random.Generator, bands: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], kind: str,
              drw_rms_max: float = 0.5) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A constant or non-periodic object at the real times and quoted errors (mag) of each band of ``bands``.

    Non-periodic: one damped random walk (rms 0.05 to ``drw_rms_max`` mag; or a trend with a
    zero-point jump) seen in every band, its amplitude scaled by 0.7-1.4 per band (a quasar's
    variability is larger in the blue). The random draws do not depend on ``drw_rms_max``.
    """
    t_all = np.unique(np.concatenate([v[0] for v in bands.values()]))
    signal = np.zeros(len(t_all))
    if kind != "constant":
        if rng.random() < 0.6:  # damped random walk (Ornstein-Uhlenbeck), exact update over irregular steps
            tau = 10 ** rng.uniform(1, 3)
            sig = 0.05 + rng.uniform(0.0, 1.0) * (drw_rms_max - 0.05)
            signal[0] = rng.normal(0, sig)
            for i in range(1, len(t_all)):
                a = np.exp(-(t_all[i] - t_all[i - 1]) / tau)
                signal[i] = a * signal[i - 1] + rng.normal(0, sig * np.sqrt(1 - a * a))
        else:
            slope = rng.uniform(0.05, 0.5) * rng.choice([-1, 1]) / max(np.ptp(t_all), 1.0)
            jump = np.where(t_all > rng.uniform(t_all[0], t_all[-1]), rng.uniform(0.05, 0.5) * rng.choice([-1, 1]),
                            0.0)
            signal = slope * (t_all - t_all[0]) + jump
    out = {}
    for b, (t, mag, err) in bands.items():
        noise = rng.normal(0.0, 1.0, len(t)) * err * rng.uniform(0.9, 1.5)
        bad = rng.random(len(t)) < 0.02
        noise[bad] += rng.choice([-1, 1], bad.sum()) * rng.uniform(3, 8, bad.sum()) * err[bad]
        scale = rng.uniform(0.7, 1.4)
        out[b] = (t, float(np.median(mag)) + scale * np.interp(t, t_all, signal) + noise, err)
    return out


def _band(row: pd.Series, band: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, m, e = eros_band(row, band)
    ok = np.isfinite(m) & np.isfinite(e) & (e > 0)
    return t[ok], m[ok], e[ok]


def thinned(obj: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], rng: np.random.Generator
            ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each band of ``obj`` ((t, mag, err) per band) with a random 20-60 % of its points (at least 20), time-ordered."""
    sub = {}
    for b, (t, m, e) in obj.items():
        n = max(20, round(len(t) * rng.uniform(0.2, 0.6)))
        keep = np.sort(rng.choice(len(t), min(n, len(t)), replace=False))
        sub[b] = (t[keep], m[keep], e[keep])
    return sub


def _star_rows(args: tuple) -> list[dict]:
    """One star's training curves: each band (the periodic label), plus one constant and one non-periodic object
    at the star's own times and errors (each band a curve); each curve twice: its period searched jointly with
    the star's other band (``mode`` "joint", what the classify stage does with a multi-band object) and alone
    ("alone", a single-band object)."""
    sid, row, typ, seed, joint, thin, drw_rms_max = args
    rng = np.random.default_rng(seed)
    bands = {b: _band(row, b) for b in "rb"}
    bands = {b: v for b, v in bands.items() if len(v[0]) >= 20}
    objects = [("eclipsing_binary" if typ == 1 else "pulsator", typ, bands)]
    if bands:
        objects += [(kind, 0, _negative(rng, bands, kind, drw_rms_max)) for kind in ("constant", "non_periodic")]
    rows = []
    for label, typ_, obj in objects:
        for mode in ("joint", "alone") if joint else ("alone",):
            for b, f in _features_of(obj, mode == "joint").items():
                if mode == "joint" and len(obj) < 2:
                    continue
                rows.append({"star": sid, "band": b, "label": label, "type": typ_, "mode": mode, **_row(f)})
    if thin:  # sparser surveys: each band keeps a random 20-60 % of its points (at least 20), searched jointly
        rng_t = np.random.default_rng([seed, 1])
        for label, typ_, obj in objects:
            sub = thinned(obj, rng_t)
            for b, f in _features_of(sub, True).items():
                rows.append({"star": sid, "band": b, "label": label, "type": typ_, "mode": "thinned", **_row(f)})
    return rows


def build(cache: Path, workers: int, joint: bool = True, thin: bool = True, drw_rms_max: float = 0.5
          ) -> pd.DataFrame:
    """The feature table of every training curve (cached in ``cache``)."""
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        meta = pd.DataFrame({k: z[k] for k in CACHE_COLUMNS})
        meta["x"], meta["x_u"] = list(z["x"]), list(z["x_u"])
        return meta
    lab = pd.read_csv(EROS / "train.csv", index_col=0)
    cur = pd.read_csv(EROS / "train_varlength_features.csv.gz", index_col=0)
    jobs = [(sid, cur.loc[sid], int(lab.loc[sid, "type"]), k, joint, thin, drw_rms_max)
            for k, sid in enumerate(lab.index)]
    t0 = time.time()
    with Pool(workers) as pool:
        rows = [r for part in pool.imap(_star_rows, jobs, chunksize=16) for r in part]
    print(f"features of {len(rows)} curves in {time.time() - t0:.0f} s", flush=True)
    meta = pd.DataFrame(rows)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=np.stack(meta["x"].to_numpy()), x_u=np.stack(meta["x_u"].to_numpy()),
             **{k: meta[k].to_numpy().astype(str if k in ("star", "band", "label", "mode") else float)
                for k in CACHE_COLUMNS})
    return meta


def star_level(mv: pd.DataFrame, prob: np.ndarray, called: np.ndarray, lab: pd.DataFrame) -> tuple[float, float]:
    """benchmarks/eros.py's four-class accuracy and periods within 1 % over the validation EROS stars.

    Per band: EB (the unclipped view's period x2, ``period_u``) or pulsator (RR Lyrae / Cepheid /
    Mira by period) when called periodic, else none; bands reconciled: the called band with the
    higher class probability, else none.
    """
    d = mv.assign(pe=prob[:, 1], pp=prob[:, 2], called=called).reset_index(drop=True)
    acc, ok = [], []
    for sid, g in d[d["type"] > 0].groupby("star"):
        best = None
        for _, r in g[g["called"]].iterrows():
            eb = r["pe"] >= r["pp"]
            p = 2 * r["period_u"] if eb else r["period"]  # an EB's period from the unclipped view
            if best is None or max(r["pe"], r["pp"]) > best[2]:
                best = (four_class("eclipsing_binary" if eb else "pulsator", p), p, max(r["pe"], r["pp"]))
        typ = int(lab.loc[sid, "type"])
        p_true = float(lab.loc[sid, "period"] / lab.loc[sid, "div_period"])
        acc.append(best is not None and best[0] == typ)
        ok.append(best is not None and period_ok(best[1], p_true, typ == 1))
    return float(np.mean(acc)), float(np.mean(ok))


def train(x: np.ndarray, y: np.ndarray, seed: int = 0, steps: int = 400) -> FourierMLP:
    """Class-balanced full-batch training of a :class:`FourierMLP` on standardised features."""
    torch.manual_seed(seed)
    model = FourierMLP(SparseClassifierConfig(n_features=x.shape[1]))
    model.mean.copy_(torch.tensor(x.mean(0)))
    model.scale.copy_(torch.tensor(x.std(0) + 1e-6))
    xt, yt = torch.tensor(x), torch.tensor(y)
    counts = np.bincount(y, minlength=len(SPARSE_CLASSES)).astype(np.float32)
    wt = torch.tensor(np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0), dtype=torch.float32)
    wt = wt / wt.sum() * len(SPARSE_CLASSES)
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-3)
    for _ in range(steps):
        model.train()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt, weight=wt)
        loss.backward()
        opt.step()
    model.eval()
    return model


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    from survey_proc import model_registry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="survey_proc/models/classifier_sparse.pt")
    ap.add_argument("--cache", default="training/cache/sparse-features-2views-rescaled.npz")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--per-band", action="store_true",
                    help="search each band's period alone (the default searches an object's bands jointly)")
    ap.add_argument("--no-thinned", action="store_true", help="no thinned copies (20-60 %% of the points)")
    ap.add_argument("--drw-rms-max", type=float, default=0.5,
                    help="the random-walk negatives' largest rms (mag; drawn uniformly from 0.05)")
    a = ap.parse_args(argv)
    t0 = time.time()
    meta = build(Path(a.cache), a.workers, joint=not a.per_band, thin=not a.no_thinned, drw_rms_max=a.drw_rms_max)
    data_s = time.time() - t0
    # the two views' features side by side (survey_proc.lightcurves.sparse_classifier, "Two views of a curve")
    x = np.concatenate([np.stack(meta["x"].to_numpy()), np.stack(meta["x_u"].to_numpy())], 1).astype(np.float32)
    y = np.array([SPARSE_CLASSES.index(v) for v in meta["label"]])
    stars = np.array(sorted(set(meta["star"])))
    rng = np.random.default_rng(0)
    val_stars = set(rng.choice(stars, int(0.2 * len(stars)), replace=False))
    val = meta["star"].isin(val_stars).to_numpy()
    model = train(x[~val], y[~val])
    with torch.no_grad():
        prob = torch.softmax(model(torch.tensor(x[val])), 1).numpy()
    yv, mv = y[val], meta[val]
    p_per = prob[:, 1] + prob[:, 2]
    neg = np.isin(yv, [0, 3])
    lab = pd.read_csv(EROS / "train.csv", index_col=0)
    # stars scored as the classify stage sees them: both bands, periods searched jointly (unless --per-band)
    alone = (mv["mode"] == "alone").to_numpy()
    thinned = (mv["mode"] == "thinned").to_numpy()
    mode = mv["mode"].to_numpy()
    main_mode = (mv["mode"] == "joint").to_numpy() if (mv["mode"] == "joint").any() else alone
    variants = []
    def sig(kind: str) -> np.ndarray:  # the smaller of the two views' (classify_sparse)
        if kind == "ls_or_harmonic":
            return np.minimum.reduce([mv[c].to_numpy() for c in ("fap", "fap_h", "fap_u", "fap_h_u")])
        return np.minimum(mv["fap"].to_numpy(), mv["fap_u"].to_numpy())

    negs = pd.DataFrame({"star": mv["star"].to_numpy(), "mode": mode, "kind": yv})[neg]

    def object_rates(called: np.ndarray) -> dict[str, float]:
        """Per mode and negative kind: the fraction of validation negative objects with a band called periodic."""
        g = negs.assign(c=called[neg]).groupby(["mode", "kind", "star"])["c"].max()
        return {f"{m}/{SPARSE_CLASSES[int(k)]}": float(v) for (m, k), v in g.groupby(level=[0, 1]).mean().items()}

    for gate_fap, sig_kind in [(g, k) for k in SIGNIFICANCE for g in FAP_GATES]:
        gate = sig(sig_kind) <= gate_fap
        # every cell (mode x negative kind) at most MAX_FP of its *objects* (called when either band is, as the
        # classify stage reconciles bands): pooled over curves, the two-view model let the sparser thinned cadence's
        # constant objects through at ~1 % (validation and test cadences, 2026-12-01, RESULTS.md)
        thr = 0.99
        for t_ in np.round(np.arange(0.50, 0.995, 0.01), 2):
            if max(object_rates((p_per >= t_) & gate).values()) <= MAX_FP:
                thr = float(t_)
                break
        fp_cells = object_rates((p_per >= thr) & gate)
        fp = float(np.mean((p_per[neg] >= thr) & gate[neg]))
        called = (p_per >= thr) & gate
        acc, per_ok = star_level(mv[main_mode], prob[main_mode], called[main_mode], lab)
        acc1, per_ok1 = star_level(mv[alone], prob[alone], called[alone], lab)
        acc2, per_ok2 = (star_level(mv[thinned], prob[thinned], called[thinned], lab) if thinned.any()
                         else (None, None))
        variants.append({"max_fap": gate_fap, "significance": sig_kind, "threshold": thr,
                         "negatives_called_periodic": fp, "negative_objects_called_periodic": fp_cells,
                         "eros_val_class_accuracy": acc, "eros_val_period_within_1pct": per_ok,
                         "eros_val_bands_searched_alone": {"class_accuracy": acc1, "period_within_1pct": per_ok1},
                         "eros_val_thinned": {"class_accuracy": acc2, "period_within_1pct": per_ok2},
                         "periodic_curves_called_periodic": float(np.mean(called[~neg]))})
        print(variants[-1], flush=True)
    best = max(variants, key=lambda v: (round(v["eros_val_class_accuracy"], 3), -v["max_fap"],
                                        v["significance"] == "ls"))
    thr, gate_fap, sig_kind = best["threshold"], best["max_fap"], best["significance"]
    called = (p_per >= thr) & (sig(sig_kind) <= gate_fap)
    pred = np.where(called, np.where(prob[:, 1] >= prob[:, 2], 1, 2), np.where(prob[:, 0] >= prob[:, 3], 0, 3))
    per_class = {c: {"n": int((yv == k).sum()),
                     "recall": float(np.mean(pred[yv == k] == k)) if (yv == k).any() else None}
                 for k, c in enumerate(SPARSE_CLASSES)}
    per = mv["type"].to_numpy() > 0
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    card = {
        "model": "sparse long-baseline light-curve classifier (MLP on Fourier features)",
        "date": time.strftime("%Y-%m-%d"), "git_revision": rev, "classes": list(SPARSE_CLASSES),
        "features": list(FEATURE_NAMES), "views": list(VIEWS), "threshold": thr, "max_fap": gate_fap,
        "significance": sig_kind,
        "threshold_rule": f"per FAP gate {FAP_GATES} and significance {SIGNIFICANCE}: the lowest p_periodic "
                          "threshold (grid 0.50-0.99) at which <= "
                          f"{MAX_FP:.1%} of the validation constant objects and of the non-periodic objects of each "
                          "mode (joint, alone, thinned; an object is called when either band is) pass it and the gate; "
                          "the gate (max_fap) with the best EROS validation four-class accuracy (stars, bands "
                          "reconciled as benchmarks/eros.py and classify_table do; ties: the stricter gate, then 'ls')",
        "search": {"period_min_days": PERIOD_MIN_DAYS, "rescale_bands": RESCALE_BANDS},
        "data": {"generator": "training/train_sparse_classifier.py", "periodic": "EROS-1 train split, both bands",
                 "negatives": "constant and random-walk/trend objects at the EROS train stars' own times and errors "
                              "(both bands; one random walk or trend per object, its amplitude 0.7-1.4x per band)",
                 "drw_rms_mag": [0.05, a.drw_rms_max],
                 "search": ("each band's period searched alone" if a.per_band else
                            "each curve searched jointly with the star's other band and alone")
                           + ("; and thinned to 20-60 % of its points" if not a.no_thinned else ""),
                 "n_curves": len(meta), "n_val": int(val.sum()),
                 "counts": {c: int((y == k).sum()) for k, c in enumerate(SPARSE_CLASSES)}, "split_seed": 0},
        "training": {"steps": 400, "optimizer": "AdamW lr 3e-3, weight decay 1e-3, full batch, class-balanced",
                     "data_s": round(data_s, 1), "wall_s": round(time.time() - t0, 1)},
        "validation": {"negatives_called_periodic": best["negatives_called_periodic"], "per_class_recall": per_class,
                       "periodic_curves": int(per.sum()),
                       "periodic_called_periodic": float(np.mean(called[per])) if per.any() else None,
                       "variants": variants, "eros_val_class_accuracy": best["eros_val_class_accuracy"],
                       "eros_val_period_within_1pct": best["eros_val_period_within_1pct"]},
    }
    model_registry.save("classifier_sparse", model, a.out, card=card, threshold=thr)
    print(json.dumps(card["validation"], indent=1))
    print(f"threshold {thr}, wrote {a.out}")


if __name__ == "__main__":
    main()

"""Periodic-variable benchmark: precision/recall, periods, transit accuracy vs S/N, periodogram speed.

    PYTHONPATH=. python benchmarks/classify.py --run OUT [--json bench-out/classify.json]

``OUT`` is a ``survey-proc run`` output of a *held-out* simulated survey (seed > 1000).
Objects are matched one-to-one to the true stars within 1 px.

Definitions
-----------
- **S/N (CSST)**: the star's variability amplitude (the truth ``amplitude``: primary-eclipse
  or transit depth, pulsator peak-to-peak, in mag) over the single-epoch magnitude error
  from photon noise alone (the Cramér-Rao bound of an isolated star at the survey's median
  seeing, sky and zero point). Wang et al. (2024) quote detection down to 1.7.
- **Periodic**: eclipsing binaries, pulsators and transits. *Predicted* periodic:
  ``var_class`` is one of them (``p_periodic`` >= the threshold).
- **Matching**: blend-aware by default: a true star pairs with the nearest object within
  1 px, and an object counts as a true periodic one when a true periodic star lies within
  1 px (in the crowded field an unresolved pair of a variable and a constant star 0.2-1 px
  apart is one object that carries the variable's light; one-to-one matching gives it to
  whichever star is nearer). The strict one-to-one figures are reported too.
- **Precision**: predicted periodic objects that are true periodic ones (any S/N) over all
  predicted periodic objects (unmatched ones count as false).
- **Recall**: true periodic stars with S/N >= 2 that the pipeline detected (an object with
  a classified light curve) and called periodic. Reported also for the subset whose
  signal is in the data (``seen``: the true light curve over the survey varies by at least
  half the amplitude; an eclipsing binary of 10 d can have no eclipse in 3.5 d).
- **Periods**: true positives within 1 % of the true period; aliases (x 1/2, 2, 1/3, 3) apart;
  split by the number of events (eclipses/transits/cycles) in the baseline.
- **Throughput**: the batched BLS and LS (one thread) against astropy's BoxLeastSquares
  and LombScargle on the same curves and period grid.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from survey_proc.evaluate import (
    load_truth_lightcurves,
    load_truth_stars,
    load_truth_summary,
    match_one_to_one,
)
from survey_proc.vocab import PERIODIC_CLASSES

ALIASES = (0.5, 2.0, 1 / 3, 3.0)


def photon_sigma_mag(summary: dict, mag: np.ndarray) -> np.ndarray:
    """Single-epoch magnitude error from photon noise (isolated-star CRLB at median conditions)."""
    from survey_proc.photometry.crlb import crlb_point_source
    from survey_proc.simulate.psf import galsim_psf

    scn = summary["scenario"]
    psf = galsim_psf(scn["psf_profile"], float(summary["median_seeing_fwhm_px"]), 25, scn.get("moffat_beta", 3.0))
    grid = np.arange(14.0, 29.01, 0.25)
    sig = []
    for m in grid:
        flux = 10 ** (-0.4 * (m - float(summary["median_zeropoint"])))
        b = crlb_point_source(psf, flux, float(summary["median_sky_adu"]), scn["gain_e_per_adu"], scn["read_noise_e"])
        sig.append(b.sigma_mag)
    return np.interp(mag, grid, np.array(sig))


def truth_table(store: str | Path) -> pd.DataFrame:
    """True stars with S/N (CSST), whether their signal is seen and the number of events."""
    summary = load_truth_summary(store)
    stars = load_truth_stars(store)
    stars = stars[stars["in_frame"]].reset_index(drop=True) if "in_frame" in stars else stars
    stars["sigma_photon"] = photon_sigma_mag(summary, stars["mag"].to_numpy())
    stars["snr_csst"] = stars["amplitude"].to_numpy() / stars["sigma_photon"].to_numpy()
    lc = load_truth_lightcurves(store)
    rng = lc.groupby("star_id")["mag"].agg(lambda m: m.max() - m.min())
    stars["ptp_observed"] = rng.reindex(stars["star_id"]).to_numpy()
    stars["seen"] = stars["ptp_observed"] >= 0.5 * stars["amplitude"]
    t0, t1 = float(lc["mjd"].min()), float(lc["mjd"].max())
    k0 = np.ceil((t0 - stars["t0"]) / stars["period"])
    k1 = np.floor((t1 - stars["t0"]) / stars["period"])
    stars["n_events"] = (k1 - k0 + 1).clip(lower=0)
    stars["baseline_days"] = t1 - t0
    return stars


def _pairing(objects: pd.DataFrame, stars: pd.DataFrame, radius_px: float, blend_aware: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    """(object index of every true star or -1, whether each object has a true periodic star).

    Strict: one-to-one matching. Blend-aware: a star takes the nearest object within the
    radius even if that object was matched to another star (an unresolved blend carries the
    variable's light), and an object "is periodic" when any true periodic star lies within
    the radius.
    """
    ox, oy = objects["x"].to_numpy(), objects["y"].to_numpy()
    sx, sy = stars["x"].to_numpy(), stars["y"].to_numpy()
    per_star = stars["var_class"].isin(PERIODIC_CLASSES).to_numpy()
    if not blend_aware:
        i_o, i_s = match_one_to_one(ox, oy, sx, sy, radius_px)
        obj_of = np.full(len(stars), -1)
        obj_of[i_s] = i_o
        has_per = np.zeros(len(objects), bool)
        has_per[i_o] = per_star[i_s]
        return obj_of, has_per
    from scipy.spatial import cKDTree

    d, j = cKDTree(np.c_[ox, oy]).query(np.c_[sx, sy], distance_upper_bound=radius_px)
    obj_of = np.where(np.isfinite(d), j, -1)
    has_per = np.zeros(len(objects), bool)
    if per_star.any():
        d2, _ = cKDTree(np.c_[sx[per_star], sy[per_star]]).query(np.c_[ox, oy], distance_upper_bound=radius_px)
        has_per = np.isfinite(d2)
    return obj_of, has_per


def evaluate(run: str | Path, store: str | Path, blend_aware: bool = True) -> tuple[dict, pd.DataFrame]:
    """Match a run's objects to the truth and compute the metrics of the module docstring."""
    objects = pd.read_parquet(Path(run) / "objects")
    stars = truth_table(store)
    obj_of, true_per_obj = _pairing(objects, stars, 1.0, blend_aware)
    stars["object"] = obj_of
    pred_per = objects["var_class"].isin(PERIODIC_CLASSES).to_numpy()
    tp_obj = pred_per & true_per_obj
    precision = float(tp_obj.sum() / max(pred_per.sum(), 1))
    i_o, i_s = match_one_to_one(objects["x"].to_numpy(), objects["y"].to_numpy(), stars["x"].to_numpy(),
                                stars["y"].to_numpy(), 1.0)
    nearest_class = pd.Series("unmatched", index=objects.index, dtype=object)
    nearest_class.iloc[i_o] = stars["var_class"].to_numpy()[i_s]
    st = stars[stars["var_class"].isin(PERIODIC_CLASSES)].copy()
    has = st["object"].to_numpy() >= 0
    oi = st["object"].to_numpy()
    classified = np.zeros(len(st), bool)
    classified[has] = objects["var_class"].notna().to_numpy()[oi[has]]
    called = np.zeros(len(st), bool)
    called[has] = pred_per[oi[has]]
    st["detected"], st["classified"], st["called_periodic"] = has, classified, called
    st["pred_class"] = None
    st.loc[has, "pred_class"] = objects["var_class"].to_numpy()[oi[has]]
    st["period_found"] = np.nan
    st.loc[has, "period_found"] = objects["period"].to_numpy()[oi[has]]
    sel2 = st["snr_csst"] >= 2.0
    denom = sel2 & st["classified"]
    res: dict = {
        "n_objects": len(objects), "n_classified": int(objects["var_class"].notna().sum()),
        "n_predicted_periodic": int(pred_per.sum()), "n_true_positive_objects": int(tp_obj.sum()),
        "precision": precision,
        "false_positives_by_true_class": {str(k): int(v) for k, v in nearest_class[pred_per & ~true_per_obj]
                                          .value_counts().items()},
        "n_periodic_true_snr2": int(sel2.sum()), "n_periodic_snr2_detected": int((sel2 & st["detected"]).sum()),
        "n_periodic_snr2_classified": int(denom.sum()),
        "recall": float(st.loc[denom, "called_periodic"].mean()) if denom.any() else float("nan"),
        "recall_seen": float(st.loc[denom & st["seen"], "called_periodic"].mean()) if (denom & st["seen"]).any()
        else float("nan"),
        "n_seen": int((denom & st["seen"]).sum()),
    }
    res["recall_by_class"] = {c: {"n": int((denom & (st["var_class"] == c)).sum()),
                                  "recall": float(st.loc[denom & (st["var_class"] == c), "called_periodic"].mean())
                                  if (denom & (st["var_class"] == c)).any() else None,
                                  "class_correct": float((st.loc[denom & (st["var_class"] == c), "pred_class"] == c)
                                                         .mean()) if (denom & (st["var_class"] == c)).any() else None}
                              for c in PERIODIC_CLASSES}
    # periods of the true positives
    tp = st[st["called_periodic"]].copy()
    ratio = tp["period_found"].to_numpy() / tp["period"].to_numpy()
    exact = np.abs(ratio - 1) <= 0.01
    alias = np.zeros(len(tp), bool)
    for a in ALIASES:
        alias |= np.abs(ratio / a - 1) <= 0.01
    tp["period_exact"], tp["period_alias"] = exact, alias & ~exact
    res["periods"] = {"n_true_positives": len(tp), "within_1pct": float(exact.mean()) if len(tp) else None,
                      "alias": float((alias & ~exact).mean()) if len(tp) else None,
                      "other": float((~alias & ~exact).mean()) if len(tp) else None}
    for name, m in (("two_or_more_events", tp["n_events"] >= 2), ("one_event", tp["n_events"] < 2)):
        res["periods"][name] = {"n": int(m.sum()), "within_1pct": float(tp.loc[m, "period_exact"].mean())
                                if m.any() else None, "alias": float(tp.loc[m, "period_alias"].mean()) if m.any()
                                else None}
    res["periods"]["by_class"] = {c: {"n": int((tp["var_class"] == c).sum()),
                                      "within_1pct": float(tp.loc[tp["var_class"] == c, "period_exact"].mean())
                                      if (tp["var_class"] == c).any() else None,
                                      "alias": float(tp.loc[tp["var_class"] == c, "period_alias"].mean())
                                      if (tp["var_class"] == c).any() else None} for c in PERIODIC_CLASSES}
    # accuracy against S/N (transits, and every periodic class)
    edges = np.array([0, 0.5, 1, 1.5, 2, 3, 5, 10, 1e9])
    curves = {}
    for c in ("transit", "eclipsing_binary", "pulsator"):
        s = st[(st["var_class"] == c) & st["classified"]]
        b = np.digitize(s["snr_csst"], edges) - 1
        curves[c] = [{"snr_lo": float(edges[k]), "snr_hi": float(edges[k + 1]), "n": int((b == k).sum()),
                      "accuracy": float((s["pred_class"][b == k] == c).mean()) if (b == k).any() else None,
                      "called_periodic": float(s["called_periodic"][b == k].mean()) if (b == k).any() else None}
                     for k in range(len(edges) - 1)]
    res["accuracy_vs_snr"] = curves
    return res, st


def throughput(run: str | Path, n_curves: int = 256, n_astropy: int = 8) -> dict:
    """Light curves per second per core: batched BLS/LS (1 thread) against astropy on real curves."""
    import torch

    from survey_proc.lightcurves.periodogram import (
        BatchedBLS,
        BatchedLS,
        astropy_bls,
        astropy_ls,
        search_grid,
    )
    from survey_proc.lightcurves.preprocess import preprocess, to_matrix

    torch.set_num_threads(1)
    lc = pd.read_parquet(Path(run) / "lightcurves")
    n_ep = lc.groupby("object_id").size()
    ids = n_ep[n_ep >= 0.9 * lc["epoch"].nunique()].index[:n_curves]
    oid, _, mjd, mag, err, flg = to_matrix(lc[lc["object_id"].isin(ids)])
    t_pre = time.perf_counter()
    b = preprocess(oid, mjd, mag, err, flg)
    t_pre = time.perf_counter() - t_pre
    g = search_grid(b.t_days)
    bls = BatchedBLS(b.t_days, g)
    bls(b.y[:32], b.w[:32])  # warm-up
    t = time.perf_counter()
    bls(b.y, b.w)
    t_bls = time.perf_counter() - t
    ls = BatchedLS(b.t_days, g)
    t = time.perf_counter()
    ls(b.y, b.w)
    t_ls = time.perf_counter() - t
    durations = np.array([1 / 24, 2 / 24, 3 / 24, 4 / 24, 0.25])
    t = time.perf_counter()
    for i in range(n_astropy):
        astropy_bls(b.t_days, b.y[i].astype(float), b.w[i].astype(float), g, durations_days=durations)
    t_abls = (time.perf_counter() - t) / n_astropy
    t = time.perf_counter()
    for i in range(n_astropy):
        astropy_ls(b.t_days, b.y[i].astype(float), b.w[i].astype(float), g)
    t_als = (time.perf_counter() - t) / n_astropy
    n = len(b)
    return {"n_curves": n, "n_points": len(b.t_days), "bls_freq": len(g.bls_freq), "ls_freq": len(g.ls_freq),
            "preprocess_per_s": n / t_pre, "batched_bls_per_s": n / t_bls, "batched_ls_per_s": n / t_ls,
            "astropy_bls_per_s": 1 / t_abls, "astropy_bls_durations": len(durations), "astropy_ls_per_s": 1 / t_als,
            "threads": 1}


def injection_curve(run: str | Path, store: str | Path, n_stars: int = 400, seed: int = 5,
                    snr_grid: tuple[float, ...] = (0.5, 1, 1.5, 2, 3, 5, 8, 12, 20, 30)) -> dict:
    """Transit accuracy against S/N by injection into the run's own constant-star light curves.

    Transits from the simulator's model (periods 1.45-2.95 d, durations 1.5-4 h) are injected
    into up to ``n_stars`` light curves of true constant stars (no true variable within 3 px,
    at least half the epochs), with the depth set for each S/N of ``snr_grid``: S/N = depth
    (mag) over the photon-noise sigma (CSST) and, separately, over the light curve's measured
    scatter (robust rms). Only stars for which that depth is 0.3-5 % (a planetary transit;
    deeper is an eclipsing binary) are used at each S/N. The curves are preprocessed and classified exactly as in a run.
    """
    from scipy.spatial import cKDTree

    from survey_proc import model_registry
    from survey_proc.lightcurves.classifier import classify
    from survey_proc.lightcurves.preprocess import preprocess, to_matrix
    from survey_proc.simulate.variables import delta_mag

    rng = np.random.default_rng(seed)
    objects = pd.read_parquet(Path(run) / "objects")
    stars = truth_table(store)
    i_o, i_s = match_one_to_one(objects["x"].to_numpy(), objects["y"].to_numpy(), stars["x"].to_numpy(),
                                stars["y"].to_numpy(), 1.0)
    var = stars[stars["var_class"] != "constant"]
    d, _ = cKDTree(var[["x", "y"]].to_numpy()).query(objects[["x", "y"]].to_numpy()[i_o])
    n_ep = objects["n_points_classified"].to_numpy()[i_o] if "n_points_classified" in objects else objects[
        "n_good"].to_numpy()[i_o]
    ok = (stars["var_class"].to_numpy()[i_s] == "constant") & (d > 3.0) & (n_ep >= 500)
    pick = np.flatnonzero(ok)
    ids = objects["object_id"].to_numpy()[i_o[pick]]
    sig_ph = stars["sigma_photon"].to_numpy()[i_s[pick]]
    lc = pd.read_parquet(Path(run) / "lightcurves", filters=[("object_id", "in", ids.tolist())])
    oid, _, mjd, mag, err, flg = to_matrix(lc)
    order = np.searchsorted(oid, ids)
    mag, err, flg = mag[order], err[order], flg[order]
    resid = mag - np.nanmedian(mag, 1, keepdims=True)
    sig_lc = 1.4826 * np.nanmedian(np.abs(resid - np.nanmedian(resid, 1, keepdims=True)), 1)
    clf = model_registry.load("classifier", device="cpu")  # the CPU, as the measurements were made
    out = {"n_pool": len(ids), "n_per_point_max": n_stars, "mag_median": float(np.nanmedian(np.nanmedian(mag, 1))),
           "rows": []}
    for basis, sig in (("photon", sig_ph), ("measured", sig_lc)):
        for snr in snr_grid:
            # transits are 0.3-5 % deep (the classifier's transit class; deeper is an eclipsing binary)
            use = np.flatnonzero((snr * sig >= 0.003) & (snr * sig <= 0.054))
            use = rng.choice(use, min(n_stars, len(use)), replace=False) if len(use) else use
            if len(use) < 10:
                out["rows"].append({"basis": basis, "snr": float(snr), "n": len(use), "transit": None,
                                    "periodic": None, "period_1pct": None})
                continue
            n = len(use)
            depth_mag = snr * sig[use]
            cols = {c: np.full(n, np.nan) for c in ("amplitude", "secondary_ratio", "ellipsoidal", "rise_days",
                                                     "decay_days", "trend_mag_per_day", "trend_mag_per_day2")}
            p = rng.uniform(1.45, 2.95, n)
            tr = pd.DataFrame({"var_class": "transit", "period": p, "t0": mjd[0] + rng.uniform(0, 1, n) * p,
                               "depth": 1 - 10 ** (-0.4 * depth_mag), "duration": rng.uniform(1.5, 4.0, n) / 24,
                               "ingress_frac": rng.uniform(0.1, 0.25, n), "mag": 0.0, **cols})
            m_inj = mag[use] + delta_mag(tr, mjd)
            b = preprocess(oid[order][use], mjd, m_inj, err[use], flg[use])
            res = classify(b, clf)
            ok_cls = res["var_class"].notna().to_numpy()
            out["rows"].append({"basis": basis, "snr": float(snr), "n": int(ok_cls.sum()),
                                "transit": float((res["var_class"][ok_cls] == "transit").mean()),
                                "periodic": float(res["var_class"][ok_cls].isin(PERIODIC_CLASSES).mean()),
                                "period_1pct": float((np.abs(res["period"][ok_cls] / p[ok_cls] - 1) <= 0.01).mean()),
                                "mag_median": float(np.median(np.nanmedian(mag[use], 1)))})
    return out


def plot_snr(res: dict, path: Path) -> None:
    """Accuracy against S/N per periodic class (like CSST Fig. 12)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for c, rows in res["accuracy_vs_snr"].items():
        x = [np.sqrt(r["snr_lo"] * min(r["snr_hi"], 20)) if r["snr_lo"] > 0 else 0.3 for r in rows if r["n"]]
        y = [r["accuracy"] for r in rows if r["n"]]
        ax.plot(x, y, "o-", label=f"{c} (class correct)")
    ax.axvline(2.0, color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("S/N = amplitude / photon-noise sigma (CSST)")
    ax.set_ylabel("fraction classified correctly")
    ax.set_title("simulated variables of the held-out survey", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    inj = res.get("transit_injection")
    ax = axes[1]
    if inj:
        for basis, style in (("photon", "o-"), ("measured", "s--")):
            rows = [r for r in inj["rows"] if r["basis"] == basis]
            ax.plot([r["snr"] for r in rows], [r["transit"] for r in rows], style,
                    label=f"classified transit (S/N vs {basis} sigma)")
            ax.plot([r["snr"] for r in rows], [r["periodic"] for r in rows], style, alpha=0.4,
                    label=f"called periodic ({basis})")
        ax.axvline(1.7, color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("transit S/N = depth / sigma")
        ax.set_title(f"transits injected into held-out constant-star light curves (<= {inj['n_per_point_max']} "
                     f"per point, of {inj['n_pool']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--store", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default="benchmarks/plots/classify-accuracy-vs-snr.png")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--no-injection", action="store_true")
    args = ap.parse_args(argv)
    run_json = json.loads((Path(args.run) / "run.json").read_text())
    store = args.store or run_json["config"]["store"]
    res, st = evaluate(args.run, store, blend_aware=True)
    strict, _ = evaluate(args.run, store, blend_aware=False)
    res["strict_one_to_one"] = {k: strict[k] for k in ("precision", "recall", "recall_seen", "n_predicted_periodic",
                                                       "n_true_positive_objects", "n_periodic_snr2_classified",
                                                       "false_positives_by_true_class", "periods")}
    res["run"] = {"out": str(args.run), "store": str(store), "timings_s": run_json.get("timings_s"),
                  "classifier": run_json.get("models", {}).get("classifier")}
    if not args.no_throughput:
        res["throughput"] = throughput(args.run)
    if not args.no_injection:
        res["transit_injection"] = injection_curve(args.run, store)
    plot_snr(res, Path(args.plot))
    text = json.dumps(res, indent=1, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
        st.to_csv(Path(args.json).with_suffix(".truth.csv"), index=False)


if __name__ == "__main__":
    main()

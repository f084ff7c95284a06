"""Accuracy benchmark: every detector through the same pipeline on the same held-out survey.

    python -m benchmarks.accuracy --scenario dense|sparse [--methods sep,sep+bpnn,sep+epsf,pnet,pnet+bpnn]
        [--out DIR] [--quick]

Simulates the held-out survey of ``benchmarks/scenarios/<scenario>-heldout.toml`` (a seed
and conditions never used for training), runs ``survey-proc run`` once per detector, and
compares each with the truth and with the Cramér-Rao bound of the same epochs:

- detection: recall per true magnitude, precision per measured magnitude, F1, AP over the
  confidence (matching one-to-one within max(0.5 FWHM, 1 px) of each epoch; a detection
  matched to any true star, however faint, is a true detection). "Bright" F1 is the
  PNet-issue criterion: recall of true stars brighter than the 5σ limit minus 1 mag, and
  precision of the detections whose calibrated magnitude is brighter than that cut;
- astrometric RMS of stars with CRLB S/N > 20 against the RMS of their CRLB (per axis),
  unflagged detections (saturated stars have no meaningful bound), with and without a 5σ
  clip, and against the *crowded-field* bound (every true neighbour an unknown point
  source: :func:`survey_proc.photometry.crlb.crowding_factors`), the physical limit on
  these images;
- photometry and astrometry of matched stars per magnitude bin: bias, RMS, NMAD, outlier
  fraction, and the NMAD as a ratio to the CRLB of a star of that magnitude in that epoch;
- uncertainty calibration of ``mag_err``: z-score width, 68/95 % coverage, miscalibration area,
  overall and per bin of measured magnitude (z = (m_true - mag) / mag_err);
- the BPNN criteria (:func:`photometry_summary`): photometric RMS of *isolated* unflagged
  stars with S/N > 20 against the CRLB (RMS of the per-star ratio), using ``mag_inst`` +
  the true zero point (the photometry alone), the same with each epoch's median offset of
  these stars removed (a perfect calibration: a PSF-model flux scale common to an epoch is
  what calibration is for), and the calibrated ``mag``; isolation: true neighbours add less than
  1 % of the star's light, PSF-weighted (:func:`_contamination`; computed for the same
  <= 1500 S/N > 20 stars per epoch as the crowded bound); the median and mean |Δmag| of
  the calibrated magnitudes in the middle range (5σ limit − 6 to − 3 mag, S/N ~ 300 to 20),
  beside the median that unbiased estimates at the same stars' isolated-star Cramér-Rao
  bounds would give (:func:`survey_proc.evaluate.median_abs_error_at_bound`: the floor),
  and, on the stars the crowded bound was computed for, their measured median against the
  median at their crowded-field flux bound (:func:`survey_proc.photometry.crlb.crowding_factors`);
- light curves: the fraction of true stars brighter than the limit that got an object, and
  the median fraction of epochs in their light curves.

Writes ``OUT/<scenario>/accuracy.json``, ``accuracy.md`` (tables) and PNG plots
(completeness, error vs magnitude with the CRLB curve, calibration curve, P-R curve).
``--quick`` uses a 256^2 x 4-epoch survey (for the test suite).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from survey_proc import evaluate as ev
from survey_proc import store
from survey_proc.config import load_config
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.outputs import OutputLayout
from survey_proc.photometry.crlb import crlb_curve, crowding_factors
from survey_proc.simulate import load_scenario, simulate_survey
from survey_proc.simulate.psf import galsim_psf
from survey_proc.simulate.scenario import Scenario
from survey_proc.vocab import MAG_PER_FLUX, PHOTOMETRY_BAD

SCENARIOS = Path(__file__).parent / "scenarios"
ISOLATION_MAX = 0.01  # "isolated": neighbours add < 1 % of the star's light, PSF-weighted (see _contamination)
def available() -> set[str]:
    """Methods that can run in this installation (PNet and the BPNN need their shipped weights).

    A method is a detector, optionally with ``+bpnn`` (BPNN magnitudes on that detector's
    detections) or ``+epsf`` (a PSF fit on each block's empirical PSF,
    ``photometry.psf_model = "epsf"``); without either, the detector's own photometry: sep
    aperture, PNet PSF fit.
    """
    from survey_proc.detect.pnet import DEFAULT_WEIGHTS
    from survey_proc.photometry.bpnn import DEFAULT_WEIGHTS as BPNN_WEIGHTS

    dets = {"sep", "pnet"} if DEFAULT_WEIGHTS.exists() else {"sep"}
    return dets | {f"{d}+epsf" for d in dets} | ({f"{d}+bpnn" for d in dets} if BPNN_WEIGHTS.exists() else set())


AVAILABLE = available()


def heldout(name: str, quick: bool, epochs: int | None, size: int | None) -> Scenario:
    """The held-out scenario, scaled down for ``--quick``."""
    over: dict[str, Any] = {"n_epochs": 4, "size_px": 256, "psf_oversample": 7} if quick else {"n_epochs": 20}
    if epochs:
        over["n_epochs"] = epochs
    if size:
        over["size_px"] = size
    return load_scenario(str(SCENARIOS / f"{name}-heldout.toml"), over)


def _crlb_interp(scn: Scenario, fwhm: float, sky: float, gain: float, rn: float) -> tuple[np.ndarray, dict]:
    grid = np.logspace(0.5, 7.0, 14)
    size = int(2 * np.ceil(4 * fwhm) + 1)
    return grid, crlb_curve(galsim_psf(scn.psf_profile, fwhm, size, scn.moffat_beta), grid, sky, gain, rn, n_phases=2)


def _contamination(x: np.ndarray, y: np.ndarray, flux: np.ndarray, targets: np.ndarray, fwhm: float) -> np.ndarray:
    """Neighbours' light on each target star relative to its own, PSF-weighted.

    ``c_i = sum_j (F_j / F_i) exp(-d_ij^2 / (4 s^2))`` over true stars within 4 FWHM
    (``s = FWHM / 2.355``): the overlap of two Gaussian PSFs, 1 for a star on top of an
    equal one. A star is *isolated* when ``c < ISOLATION_MAX``.
    """
    from scipy.spatial import cKDTree

    tree = cKDTree(np.c_[x, y])
    s2 = (fwhm / 2.3548) ** 2
    out = np.zeros(len(targets))
    for k, (i, js) in enumerate(zip(targets, tree.query_ball_point(np.c_[x[targets], y[targets]], 4 * fwhm),
                                    strict=True)):
        js = np.asarray([j for j in js if j != i], int)
        if len(js):
            d2 = (x[js] - x[i]) ** 2 + (y[js] - y[i]) ** 2
            out[k] = np.sum(flux[js] * np.exp(-d2 / (4 * s2))) / flux[i]
    return out


def saturation_mag(scn: Scenario, epochs: pd.DataFrame) -> float:
    """The faintest true magnitude (mag) at which a centred star saturates in any of ``epochs``
    (:func:`survey_proc.simulate.depth.saturation_magnitude` of each epoch's seeing, sky and zero point)."""
    from survey_proc.simulate.depth import saturation_magnitude

    return max(saturation_magnitude(scn, float(te["seeing_fwhm_px"]), float(te["sky_adu"]), float(te["zeropoint"]))
               for _, te in epochs.iterrows())


def issue21_summary(phot_bins: list[dict[str, Any]], dzp: np.ndarray, sat_mag: float) -> dict[str, Any]:
    """Issue 21's bias and zero-point criteria from the per-true-magnitude bins and the epochs' zero points.

    Bias: the largest |median Δmag| (calibrated magnitudes) over the 1-mag bins of true
    magnitude from the saturation magnitude (the first bin wholly fainter) to S/N 10 (the
    bin's median CRLB <= 2.5/ln(10)/10 mag), bins of >= 20 stars; zero point: each epoch's
    fitted zero point minus the simulator's (mag).
    """
    sel = [b for b in phot_bins if b["lo"] >= sat_mag and b["mag_n"] >= 20 and b["crlb_mag"] <= MAG_PER_FLUX / 10]
    worst = max(sel, key=lambda b: abs(b["mag_bias"]), default=None)
    return {"saturation_mag": sat_mag,
            "bias_bins": [{"lo": b["lo"], "hi": b["hi"], "n": b["mag_n"], "bias": b["mag_bias"]} for b in sel],
            "max_abs_bias": abs(worst["mag_bias"]) if worst else None,
            "max_abs_bias_bin": [worst["lo"], worst["hi"]] if worst else None,
            "zp_minus_truth": dzp.tolist(),
            "zp_minus_truth_median": float(np.median(dzp)) if len(dzp) else None,
            "zp_minus_truth_max_abs": float(np.max(np.abs(dzp))) if len(dzp) else None}


def photometry_summary(P: pd.DataFrame, limit: float) -> dict[str, Any]:
    """The BPNN issue's photometry criteria from the matched pairs ``P`` (see the module docstring)."""
    snr_true = MAG_PER_FLUX / P["crlb_mag"].to_numpy()
    clean = (P["flags"].to_numpy() & PHOTOMETRY_BAD) == 0
    iso = P[(snr_true > 20) & clean & (P["contamination"].to_numpy() < ISOLATION_MAX)]
    out: dict[str, Any] = {"isolated_snr20": {"n": len(iso)}}
    if len(iso):
        zi = (iso["dmag_inst"] / iso["crlb_mag"]).to_numpy()
        zc = (iso["dmag"] / iso["crlb_mag"]).to_numpy()
        # a perfect calibration: each epoch's median offset of these stars removed (true-zp inst. mags)
        off = iso["dmag_inst"] - iso.groupby("epoch")["dmag_inst"].transform("median")
        zo = (off / iso["crlb_mag"]).to_numpy()
        zi, zc, zo = zi[np.isfinite(zi)], zc[np.isfinite(zc)], zo[np.isfinite(zo)]
        snr_i = MAG_PER_FLUX / iso["crlb_mag"].to_numpy()
        bins = []
        for lo, hi in ((20, 50), (50, 200), (200, 1e9)):
            m = (snr_i >= lo) & (snr_i < hi)
            z = (iso["dmag_inst"] / iso["crlb_mag"]).to_numpy()[m]
            z = z[np.isfinite(z)]
            zob = (off / iso["crlb_mag"]).to_numpy()[m]  # the same with each epoch's flux scale removed
            zob = zob[np.isfinite(zob)]
            if len(z) >= 5:
                bins.append({"snr_lo": lo, "snr_hi": min(hi, 1e4), "n": len(z),
                             "rms_over_crlb": float(np.sqrt(np.mean(z**2))),
                             "rms_over_crlb_epoch_offset_removed": float(np.sqrt(np.mean(zob**2))),
                             "bias_over_crlb": float(np.median(z))})
        out["isolated_snr20"].update({
            "rms_over_crlb": float(np.sqrt(np.mean(zi**2))),
            "rms_over_crlb_clipped5": float(np.sqrt(np.mean(zi[np.abs(zi) < 5] ** 2))),
            "clipped_fraction": float(np.mean(np.abs(zi) >= 5)),
            "rms_over_crlb_calibrated": float(np.sqrt(np.mean(zc**2))),
            "rms_over_crlb_epoch_offset_removed": float(np.sqrt(np.mean(zo**2))),
            "rms_over_crlb_epoch_offset_removed_clipped5": float(np.sqrt(np.mean(zo[np.abs(zo) < 5] ** 2))),
            "median_bias_mag": float(np.median(iso["dmag_inst"])), "bins": bins})
    lo, hi = limit - 6.0, limit - 3.0
    mid = P[(P["mag_true"] >= lo) & (P["mag_true"] < hi)]
    dm = mid["dmag"].to_numpy()
    fin = np.isfinite(dm)
    ad = np.abs(dm[fin])
    # the floor under the median: the same stars' isolated-star Cramér-Rao bounds (a crowded star's
    # bound is larger, so this is a lower limit for any method on these stars)
    floor = ev.median_abs_error_at_bound(mid["crlb_mag"].to_numpy()[fin])
    # and the crowded-field flux bound (every true neighbour an unknown point source), on the sampled
    # stars it was computed for, beside the measured median of the same stars
    kf = mid["crowding_flux"].to_numpy()
    sub = fin & np.isfinite(kf)
    out["middle_range"] = {"lo": lo, "hi": hi, "n": len(ad),
                           "median_abs_dmag": float(np.median(ad)) if len(ad) else None,
                           "median_abs_dmag_at_crlb": floor,
                           "n_crowded": int(sub.sum()),
                           "median_abs_dmag_crowded_sample": float(np.median(np.abs(dm[sub]))) if sub.any() else None,
                           "median_abs_dmag_at_crowded_crlb": ev.median_abs_error_at_bound(
                               mid["crlb_mag"].to_numpy()[sub] * kf[sub]),
                           "mean_abs_dmag": float(np.mean(ad)) if len(ad) else None,
                           "mean_abs_dmag_clipped_1mag": float(np.mean(ad[ad < 1])) if len(ad) else None}
    # z = (m_true - mag) / mag_err per bin of *measured* magnitude (the calibration a user relies on)
    z = (-P["dmag"] / P["mag_err"]).to_numpy()
    mm = P["mag"].to_numpy()
    ok = np.isfinite(z) & np.isfinite(mm)
    calib_bins = []
    for b0 in np.arange(np.floor(np.nanmin(mm[ok])) if ok.any() else 0, np.ceil(limit) + 1, 1.0):
        sel = ok & (mm >= b0) & (mm < b0 + 1)
        if sel.sum() < 20:
            continue
        zz = z[sel]
        c = ev.z_score_calibration(zz, np.ones(len(zz)))
        calib_bins.append({"lo": float(b0), "hi": float(b0 + 1), "n": int(sel.sum()), "z_mean": float(np.mean(zz)),
                           "z_std": float(np.std(zz)), "z_std_clipped5": float(np.std(zz[np.abs(zz) < 5])),
                           "clipped_fraction": float(np.mean(np.abs(zz) >= 5)), "z_nmad": c["z_nmad"],
                           "miscalibration_area": c["miscalibration_area"]})
    out["calibration_bins"] = calib_bins
    return out


def evaluate_method(out: Path, store_path: Path, scn: Scenario, epochs: list[int]) -> dict[str, Any]:
    """Metrics of one method's outputs against truth and the CRLB (see the module docstring)."""
    layout = OutputLayout(out)
    fa = store.field_attrs(store_path, "F000")
    gain, rn = float(fa["gain_e_per_adu"]), float(fa["read_noise_e"])
    truth_ep = ev.load_truth_epochs(store_path, "F000").set_index("epoch")
    trows, drows, pairs = [], [], []
    for e in epochs:
        src = pd.read_parquet(layout.sources("F000", e))
        t = ev.truth_at_epoch(store_path, "F000", e)
        te = truth_ep.loc[e]
        radius = ev.match_radius_px(float(te["seeing_fwhm_px"]))
        i_d, i_t = ev.match_one_to_one(src["x"].to_numpy(), src["y"].to_numpy(), t["x_epoch"].to_numpy(),
                                       t["y_epoch"].to_numpy(), radius)
        hit_t = np.zeros(len(t), bool)
        hit_t[i_t] = True
        hit_d = np.zeros(len(src), bool)
        hit_d[i_d] = True
        mag_match = np.full(len(src), np.nan)
        mag_match[i_d] = t["mag_epoch"].to_numpy()[i_t]
        trows.append(pd.DataFrame({"epoch": e, "mag_true": t["mag_epoch"], "found": hit_t}))
        drows.append(pd.DataFrame({"epoch": e, "mag": src["mag"], "confidence": src["confidence"], "true": hit_d,
                                   "mag_matched": mag_match}))
        grid, bound = _crlb_interp(scn, float(te["seeing_fwhm_px"]), float(te["sky_adu"]), gain, rn)
        f = t["flux_adu"].to_numpy()[i_t]
        lf = np.log(np.clip(f, grid[0], grid[-1]))
        # the crowded-field bound of the S/N > 20 stars (at most 1500 per epoch: seconds, not minutes)
        snr_t = MAG_PER_FLUX / np.exp(np.interp(lf, np.log(grid), np.log(bound["sigma_mag"])))
        crowd = np.full(len(i_t), np.nan)
        cand = np.flatnonzero(snr_t > 20)
        if len(cand) > 1500:
            cand = np.sort(np.random.default_rng(e).choice(cand, 1500, replace=False))
        crowd_flux = np.full(len(i_t), np.nan)
        cf = crowding_factors(t["x_epoch"].to_numpy(), t["y_epoch"].to_numpy(), t["flux_adu"].to_numpy(),
                              i_t[cand], float(te["seeing_fwhm_px"]), float(te["sky_adu"]), gain, rn,
                              beta=scn.moffat_beta if scn.psf_profile == "moffat" else 4.0)
        crowd[cand], crowd_flux[cand] = cf.position_x, cf.flux
        contam = np.full(len(i_t), np.nan)
        contam[cand] = _contamination(t["x_epoch"].to_numpy(), t["y_epoch"].to_numpy(), t["flux_adu"].to_numpy(),
                                      i_t[cand], float(te["seeing_fwhm_px"]))
        pairs.append(pd.DataFrame({
            "epoch": e, "mag_true": t["mag_epoch"].to_numpy()[i_t], "mag": src["mag"].to_numpy()[i_d],
            "dmag": src["mag"].to_numpy()[i_d] - t["mag_epoch"].to_numpy()[i_t],
            # the instrumental magnitude with the true zero point: photometry alone, no calibration
            "dmag_inst": src["mag_inst"].to_numpy()[i_d] + float(te["zeropoint"]) - t["mag_epoch"].to_numpy()[i_t],
            "contamination": contam,
            "mag_err": src["mag_err"].to_numpy()[i_d],
            "dx": src["x"].to_numpy()[i_d] - t["x_epoch"].to_numpy()[i_t],
            "dy": src["y"].to_numpy()[i_d] - t["y_epoch"].to_numpy()[i_t],
            "flags": src["flags"].to_numpy()[i_d],
            "flux_true": f,
            "crlb_mag": np.exp(np.interp(lf, np.log(grid), np.log(bound["sigma_mag"]))),
            "crlb_pos": np.exp(np.interp(lf, np.log(grid), np.log(bound["sigma_pos_px"]))),
            "crowding": crowd,
            "crowding_flux": crowd_flux,
        }))
    T, D, P = (pd.concat(x, ignore_index=True) for x in (trows, drows, pairs))
    limit = float(ev.load_truth_summary(store_path)["limiting_mag_5sigma_psf_crlb"])
    edges = np.arange(np.floor(scn.mag_min), np.ceil(limit) + 1.5, 1.0)
    recall_bins = ev.per_bin(T["found"].to_numpy(float), T["mag_true"].to_numpy(), edges,
                             lambda v: {"recall": float(np.mean(v)) if len(v) else None, "n": len(v)})
    prec_bins = ev.per_bin(D["true"].to_numpy(float), D["mag"].to_numpy(), edges,
                           lambda v: {"precision": float(np.mean(v)) if len(v) else None, "n": len(v)})

    def phot(rows: pd.DataFrame) -> dict[str, Any]:
        s = ev.error_stats(rows["dmag"].to_numpy())
        pos = ev.error_stats(np.r_[rows["dx"].to_numpy(), rows["dy"].to_numpy()])
        cr = float(np.median(rows["crlb_mag"])) if len(rows) else float("nan")
        crp = float(np.median(rows["crlb_pos"])) if len(rows) else float("nan")
        return {**{f"mag_{k}": v for k, v in s.items()}, "crlb_mag": cr, "mag_nmad_over_crlb": s["nmad"] / cr,
                **{f"pos_{k}": v for k, v in pos.items() if k != "n"}, "crlb_pos_px": crp,
                "pos_nmad_over_crlb": pos["nmad"] / crp}

    idx = np.digitize(P["mag_true"], edges) - 1
    phot_bins = [{"lo": float(edges[b]), "hi": float(edges[b + 1]), **phot(P[idx == b])} for b in range(len(edges) - 1)]
    bright = T["mag_true"] < limit
    cut = limit - 1.0
    rb = float(T.loc[T["mag_true"] < cut, "found"].mean())
    dsel = D["mag"] < cut
    pb = float(D.loc[dsel, "true"].mean()) if dsel.any() else float("nan")
    snr_true = MAG_PER_FLUX / P["crlb_mag"].to_numpy()
    a = P[(snr_true > 20) & ((P["flags"].to_numpy() & PHOTOMETRY_BAD) == 0)]
    d2 = np.r_[a["dx"].to_numpy(), a["dy"].to_numpy()]
    c2 = np.r_[a["crlb_pos"].to_numpy(), a["crlb_pos"].to_numpy()]
    clip = np.abs(d2) < 5 * np.maximum(c2, 1.4826 * np.median(np.abs(d2)) if len(d2) else 0)
    astrometry = {"n_stars": len(a), "rms_px": float(np.sqrt(np.mean(d2**2))) if len(d2) else None,
                  "crlb_rms_px": float(np.sqrt(np.mean(c2**2))) if len(c2) else None,
                  "clipped_fraction": float(1 - clip.mean()) if len(d2) else None,
                  "rms_clipped_px": float(np.sqrt(np.mean(d2[clip] ** 2))) if len(d2) else None,
                  "crlb_rms_clipped_px": float(np.sqrt(np.mean(c2[clip] ** 2))) if len(d2) else None}
    if len(d2):
        astrometry["rms_over_crlb"] = astrometry["rms_px"] / astrometry["crlb_rms_px"]
        astrometry["rms_over_crlb_clipped"] = astrometry["rms_clipped_px"] / astrometry["crlb_rms_clipped_px"]
        # the same against the crowded-field bound (neighbours as unknowns), on the stars it was computed for
        k2 = np.r_[a["crowding"].to_numpy(), a["crowding"].to_numpy()]
        ok = np.isfinite(k2)
        cc = c2[ok] * k2[ok]
        astrometry.update({
            "n_crowded": int(ok.sum() // 2), "crowding_factor_median": float(np.median(k2[ok])) if ok.any() else None,
            "crlb_crowded_rms_px": float(np.sqrt(np.mean(cc**2))) if ok.any() else None,
            "rms_over_crlb_crowded": (float(np.sqrt(np.mean(d2[ok] ** 2)) / np.sqrt(np.mean(cc**2)))
                                      if ok.any() else None),
            "rms_z_isolated": float(np.sqrt(np.mean((d2[ok] / c2[ok]) ** 2))) if ok.any() else None,
            "rms_z_crowded": float(np.sqrt(np.mean((d2[ok] / cc) ** 2))) if ok.any() else None,
        })
    recall = float(T.loc[bright, "found"].mean())
    precision = float(D["true"].mean())
    # AP over the stars brighter than the limit: a detection of a fainter true star is neither a
    # true nor a false detection there (it is left out), so recall cannot exceed 1
    faint_hit = D["true"].to_numpy() & (D["mag_matched"].to_numpy() >= limit)
    ap = ev.average_precision(D["confidence"].to_numpy()[~faint_hit], D["true"].to_numpy()[~faint_hit],
                              int(bright.sum()))
    calib = ev.z_score_calibration(P["dmag"].to_numpy(), P["mag_err"].to_numpy())
    objects = pd.concat([pd.read_parquet(f) for f in sorted((out / "objects").rglob("*.parquet"))], ignore_index=True)
    lcs = ev.lightcurve_completeness(objects, ev.load_truth_stars(store_path, "F000"), limit, scn.n_epochs,
                                     ev.match_radius_px(float(truth_ep["seeing_fwhm_px"].median())))
    ep_run = pd.read_parquet(layout.epochs_table)
    ep_run = ep_run[ep_run["field"] == "F000"].set_index("epoch")
    dzp = np.asarray([float(ep_run.loc[e, "zp"]) - float(truth_ep.loc[e, "zeropoint"]) for e in epochs
                      if e in ep_run.index], float)
    sat_mag = saturation_mag(scn, truth_ep.loc[epochs])
    return {
        "photometry": photometry_summary(P, limit),
        "issue21": issue21_summary(phot_bins, dzp, sat_mag),
        "lightcurves": lcs,
        "epochs": epochs, "mag_limit": limit, "recall": recall, "precision": precision,
        "f1": 2 * recall * precision / (recall + precision), "ap": ap["ap"],
        "bright_cut_mag": cut, "recall_bright": rb, "precision_bright": pb,
        "f1_bright": 2 * rb * pb / (rb + pb), "astrometry_snr20": astrometry,
        "recall_bins": recall_bins, "precision_bins": prec_bins, "phot_bins": phot_bins,
        "calibration": {k: v for k, v in calib.items() if k not in ("levels", "observed")},
        "_curves": {"pr": (ap["recall"].tolist(), ap["precision"].tolist()),
                    "calib": (calib["levels"].tolist(), calib["observed"].tolist())},
    }


def _plots(results: dict[str, Any], outdir: Path, scenario: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    methods = {k: v for k, v in results["methods"].items() if "recall" in v}

    def save(fig, name: str) -> None:
        p = outdir / name
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(p.name)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, r in methods.items():
        b = [x for x in r["recall_bins"] if x["n"]]
        ax.plot([0.5 * (x["lo"] + x["hi"]) for x in b], [x["recall"] for x in b], "o-", label=m)
    ax.axvline(next(iter(methods.values()))["mag_limit"] if methods else 0, ls=":", c="k", label="5σ limit")
    ax.set(xlabel="true magnitude", ylabel="completeness", title=f"{scenario}: completeness")
    ax.legend()
    save(fig, "completeness.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, r in methods.items():
        b = [x for x in r["phot_bins"] if x["mag_n"] >= 5]
        mid = [0.5 * (x["lo"] + x["hi"]) for x in b]
        ax.semilogy(mid, [x["mag_nmad"] for x in b], "o-", label=f"{m} NMAD")
        ax.semilogy(mid, [x["crlb_mag"] for x in b], "k--",
                    label="Cramér-Rao bound" if m == next(iter(methods)) else None)
    ax.set(xlabel="true magnitude", ylabel="magnitude error (mag)", title=f"{scenario}: photometry")
    ax.legend()
    save(fig, "photometry_vs_crlb.png")

    fig, ax = plt.subplots(figsize=(4, 4))
    for m, r in methods.items():
        lv, ob = r["_curves"]["calib"]
        ax.plot(lv, ob, label=f"{m} (area {r['calibration']['miscalibration_area']:.3f})")
    ax.plot([0, 1], [0, 1], "k:")
    ax.set(xlabel="expected confidence level", ylabel="observed fraction", title=f"{scenario}: mag_err calibration")
    ax.legend()
    save(fig, "calibration.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, r in methods.items():
        cb = r["photometry"]["calibration_bins"]
        ax.plot([0.5 * (b["lo"] + b["hi"]) for b in cb], [b["z_std_clipped5"] for b in cb], "o-", label=m)
    ax.axhspan(0.85, 1.15, color="0.9", label="0.85-1.15")
    ax.set(xlabel="measured magnitude", ylabel="std of z (5σ-clipped)", yscale="log",
           title=f"{scenario}: z = (m_true - mag) / mag_err")
    ax.legend(fontsize=7)
    save(fig, "z_width_per_bin.png")

    fig, ax = plt.subplots(figsize=(4, 4))
    for m, r in methods.items():
        rc, pr = r["_curves"]["pr"]
        ax.plot(rc, pr, label=f"{m} (AP {r['ap']:.3f})")
    ax.set(xlabel="recall", ylabel="precision", title=f"{scenario}: P-R over confidence")
    ax.legend()
    save(fig, "precision_recall.png")
    return files


def _markdown(results: dict[str, Any]) -> str:
    lines = [f"### Accuracy, {results['scenario']} (held-out: {results['scenario_file']}, seed {results['seed']}, "
             f"{results['size_px']}^2 x {results['n_epochs']} epochs)", "",
             "| method | recall (< 5σ limit) | precision | F1 | AP | mag_err z-width | 68 % coverage | miscalibration "
             "| light-curve completeness | light-curve fill |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        if "recall" not in r:
            lines.append(f"| {m} | {r.get('skipped', 'n/a')} | | | | | | | | |")
            continue
        c = r["calibration"]
        lines.append(f"| {m} | {r['recall']:.3f} | {r['precision']:.3f} | {r['f1']:.3f} | {r['ap']:.3f} | "
                     f"{c['z_nmad']:.2f} | {c['coverage_68']:.3f} | {c['miscalibration_area']:.3f} | "
                     f"{r['lightcurves']['completeness']:.3f} | {r['lightcurves']['points_fraction_median']:.2f} |")
    lines += ["", "Detection of stars brighter than the 5σ limit minus 1 mag, and astrometry at S/N > 20 "
              "(unflagged; RMS per axis against the CRLB's RMS)", "",
              "| method | cut (mag) | recall | precision | F1 | astrometric RMS (px) | CRLB RMS (px) | RMS/CRLB "
              "| RMS/CRLB after 5σ clip (clipped) | RMS/crowded CRLB | RMS of err/crowded CRLB | run s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        if "recall_bright" not in r:
            continue
        a = r["astrometry_snr20"]
        lines.append(f"| {m} | {r['bright_cut_mag']:.2f} | {r['recall_bright']:.3f} | {r['precision_bright']:.3f} | "
                     f"**{r['f1_bright']:.3f}** | {a.get('rms_px', float('nan')):.4f} | "
                     f"{a.get('crlb_rms_px', float('nan')):.4f} | {a.get('rms_over_crlb', float('nan')):.2f} | "
                     f"{a.get('rms_over_crlb_clipped', float('nan')):.2f} ({a.get('clipped_fraction', 0):.3f}) | "
                     f"{a.get('rms_over_crlb_crowded') or float('nan'):.2f} | "
                     f"{a.get('rms_z_crowded') or float('nan'):.2f} | "
                     f"{r.get('run_s', float('nan')):.0f} |")
    lines += ["", "Photometry (BPNN issue): isolated (neighbours < 1 % of the light) unflagged stars with S/N > 20, "
              "instrumental magnitude + true zero point against the Cramér-Rao bound (per-star ratio, RMS); "
              "|Δmag| of the calibrated magnitudes of all matched stars in the middle range (5σ limit − 6 to − 3 mag); "
              "z = (m_true − mag)/mag_err per measured-magnitude bin", "",
              "| method | isolated n | RMS/CRLB | 5σ-clipped (fraction) | epoch offset removed (clipped) "
              "| calibrated mags RMS/CRLB | middle range (mag) "
              "| median abs Δmag (at the isolated CRLB; crowded-bound sample) | mean abs Δmag "
              "| z std per bin (min-max) | z std clipped 5σ (min-max) "
              "| miscal. area per bin (max) | miscal. area (all) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        if "photometry" not in r:
            continue
        ph, iso, mid = r["photometry"], r["photometry"]["isolated_snr20"], r["photometry"]["middle_range"]
        cb = ph["calibration_bins"]

        def rng(key: str, cb=cb) -> str:
            v = [b[key] for b in cb]
            return f"{min(v):.2f}-{max(v):.2f}" if v else "-"

        lines.append(f"| {m} | {iso['n']} | **{iso.get('rms_over_crlb', float('nan')):.2f}** | "
                     f"{iso.get('rms_over_crlb_clipped5', float('nan')):.2f} ({iso.get('clipped_fraction', 0):.3f}) | "
                     f"**{iso.get('rms_over_crlb_epoch_offset_removed', float('nan')):.2f}** "
                     f"({iso.get('rms_over_crlb_epoch_offset_removed_clipped5', float('nan')):.2f}) | "
                     f"{iso.get('rms_over_crlb_calibrated', float('nan')):.2f} | {mid['lo']:.1f}-{mid['hi']:.1f} | "
                     f"**{mid['median_abs_dmag'] or float('nan'):.4f}** "
                     f"({mid.get('median_abs_dmag_at_crlb') or float('nan'):.4f}; "
                     f"sample {mid.get('median_abs_dmag_crowded_sample') or float('nan'):.4f} against its crowded "
                     f"bound {mid.get('median_abs_dmag_at_crowded_crlb') or float('nan'):.4f}) | "
                     f"{mid['mean_abs_dmag'] or float('nan'):.4f} | "
                     f"{rng('z_std')} | {rng('z_std_clipped5')} | "
                     f"{max((b['miscalibration_area'] for b in cb), default=float('nan')):.3f} | "
                     f"{r['calibration']['miscalibration_area']:.3f} |")
    lines += ["", "Issue 21 criteria: isolated RMS/CRLB per S/N bin (true zero point; targets <= 1.2; in brackets "
              "with each epoch's median offset of these stars removed: the flux scale apart), the largest "
              "|median Δmag| of calibrated magnitudes per 1-mag bin from saturation to S/N 10 (<= 0.005), "
              "zero point − truth over the epochs (<= 0.01)", "",
              "| method | RMS/CRLB S/N 20-50 | 50-200 | > 200 | max abs bias (bin) | bias per bin | "
              "zp − truth median (max abs) |", "|---|---|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        if "issue21" not in r:
            continue
        i21, bins = r["issue21"], {b["snr_lo"]: b for b in r["photometry"]["isolated_snr20"].get("bins", [])}
        per_snr = " | ".join(f"{bins[k]['rms_over_crlb']:.2f} ({bins[k]['rms_over_crlb_epoch_offset_removed']:.2f})"
                             if k in bins else "-" for k in (20, 50, 200))
        wb = i21["max_abs_bias_bin"]
        worst = f"{i21['max_abs_bias']:.4f} ({wb[0]:.0f}-{wb[1]:.0f})" if wb else "-"
        per_bin = ", ".join(f"{b['lo']:.0f}: {b['bias']:+.4f}" for b in i21["bias_bins"])
        zp = (f"{i21['zp_minus_truth_median']:+.4f} ({i21['zp_minus_truth_max_abs']:.4f})"
              if i21["zp_minus_truth_median"] is not None else "-")
        lines.append(f"| {m} | {per_snr} | {worst} | {per_bin} | {zp} |")
    for m, r in results["methods"].items():
        if "photometry" not in r:
            continue
        lines += ["", f"{m}: uncertainty calibration per measured-magnitude bin", "",
                  "| mag | n | z mean | z std | z std (5σ-clipped) | clipped | z NMAD | miscalibration area |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in r["photometry"]["calibration_bins"]:
            lines.append(f"| {b['lo']:.0f}-{b['hi']:.0f} | {b['n']} | {b['z_mean']:+.2f} | {b['z_std']:.2f} | "
                         f"{b['z_std_clipped5']:.2f} | {b['clipped_fraction']:.3f} | {b['z_nmad']:.2f} | "
                         f"{b['miscalibration_area']:.3f} |")
    for m, r in results["methods"].items():
        if "phot_bins" not in r:
            continue
        lines += ["", f"{m}: per true-magnitude bin (matched stars)", "",
                  "| mag | recall (true mag) | precision (measured mag) | n | mag bias | mag NMAD | CRLB | NMAD/CRLB "
                  "| outliers | pos NMAD (px) | pos CRLB | ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for rb, pb, qb in zip(r["recall_bins"], r["phot_bins"], r["precision_bins"], strict=True):
            if not rb["n"]:
                continue
            prec = f"{qb['precision']:.3f}" if qb["precision"] is not None else "-"
            lines.append(f"| {rb['lo']:.0f}-{rb['hi']:.0f} | {rb['recall']:.3f} | {prec} | {pb['mag_n']} | "
                         f"{pb['mag_bias']:+.4f} | "
                         f"{pb['mag_nmad']:.4f} | {pb['crlb_mag']:.4f} | {pb['mag_nmad_over_crlb']:.2f} | "
                         f"{pb['mag_outlier_frac']:.3f} | {pb['pos_nmad']:.3f} | {pb['crlb_pos_px']:.3f} | "
                         f"{pb['pos_nmad_over_crlb']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["section.key=value", ...]`` (``--set``) as run-configuration overrides (``{"section": {"key": value}}``).

    The value is read as a TOML value (``3.5``, ``true``, ``"annulus"``), else kept as a string.
    """
    import tomllib

    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"--set needs section.key=value, got {item!r}")
        try:
            value: Any = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        *sections, name = key.strip().split(".")
        d = out
        for sec in sections:
            d = d.setdefault(sec, {})
        d[name] = value
    return out


def _merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` with ``b``'s settings on top (section tables merged key by key)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(scenario: str, detectors: list[str], out: Path, *, quick: bool = False, epochs: int | None = None,
        size: int | None = None, workers: int | None = None, n_eval_epochs: int = 10,
        pnet_threshold: float | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Simulate the held-out survey, run every detector, evaluate, write JSON/Markdown/plots.

    ``overrides`` (:func:`parse_sets`) are applied to every method's run configuration last.
    """
    scn = heldout(scenario, quick, epochs, size)
    base = out / scenario
    base.mkdir(parents=True, exist_ok=True)
    survey = base / "survey.zarr"
    t0 = time.perf_counter()
    if not survey.exists():
        simulate_survey(scn, survey, workers=0 if quick else workers, progress=False)
    t_sim = time.perf_counter() - t0
    results: dict[str, Any] = {"scenario": scenario, "scenario_file": f"benchmarks/scenarios/{scenario}-heldout.toml",
                               "seed": scn.seed, "size_px": scn.size_px, "n_epochs": scn.n_epochs,
                               "simulate_s": t_sim, "overrides": overrides or {}, "methods": {}}
    sample = sorted({int(e) for e in np.linspace(0, scn.n_epochs - 1, min(n_eval_epochs, scn.n_epochs))})
    for det in detectors:
        if det not in AVAILABLE:
            results["methods"][det] = {"skipped": f"{det}: no shipped model in this version"}
            continue
        detector, _, phot = det.partition("+")
        cfg = load_config(None, _merged({"store": str(survey), "out": str(base / det), "detector": detector,
                                         "bpnn": {"enabled": phot == "bpnn"}, "progress": False,
                                         "photometry": {"psf_model": "epsf" if phot == "epsf" else "none"},
                                         "evaluate": False, "mode": "overwrite", "workers": workers,
                                         **({"pnet": {"threshold": pnet_threshold}} if pnet_threshold else {})},
                                        overrides or {}))
        t = time.perf_counter()
        run_json = run_pipeline(cfg)
        r = evaluate_method(base / det, survey, scn, sample)
        r["run_s"] = time.perf_counter() - t
        r["run_status"] = run_json["status"]
        results["methods"][det] = r
    results["plots"] = _plots(results, base, scenario)
    (base / "accuracy.md").write_text(_markdown(results))
    clean = {**results, "methods": {m: {k: v for k, v in r.items() if k != "_curves"}
                                    for m, r in results["methods"].items()}}
    (base / "accuracy.json").write_text(json.dumps(clean, indent=2, default=float))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=("dense", "sparse"), default="dense")
    p.add_argument("--detectors", "--methods", dest="detectors", default="sep,sep+bpnn,pnet,pnet+bpnn",
                   help="comma-separated methods: a detector (sep, pnet: its own photometry), detector+bpnn "
                        "(BPNN magnitudes on its detections) or detector+epsf (a PSF fit on each block's "
                        "empirical PSF); default sep, sep+bpnn, pnet, pnet+bpnn")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out/)")
    p.add_argument("--epochs", type=int, help="epochs of the held-out survey (default 20; quick 4)")
    p.add_argument("--size", type=int, help="detector size in px (default 1024; quick 256)")
    p.add_argument("--workers", type=int, help="Dask worker processes (default: one per core)")
    p.add_argument("--quick", action="store_true", help="a small survey for the test suite")
    p.add_argument("--pnet-threshold", type=float, help="PNet confidence threshold (default: the model card's)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", dest="sets",
                   help="a run-configuration override for every method (repeatable), e.g. "
                        "photometry.local_sky=annulus (with forced.enabled=false)")
    a = p.parse_args(argv)
    res = run(a.scenario, [d for d in a.detectors.split(",") if d], Path(a.out), quick=a.quick, epochs=a.epochs,
              size=a.size, workers=a.workers, pnet_threshold=a.pnet_threshold, overrides=parse_sets(a.sets))
    print(_markdown(res))
    print(f"wrote {Path(a.out) / a.scenario}/accuracy.json, accuracy.md and {', '.join(res['plots'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

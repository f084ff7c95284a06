"""Which EROS-1 period misses do the curves themselves support? The catalogue period against ours, per star.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/eros.py --split S --json R.json   # writes R.csv
    PYTHONPATH=. python benchmarks/eros_period_evidence.py --split S --stars R.csv [--json F]

Why
---
Issue 22 asks for the EROS-1 catalogue period within 1 % for 90 % of the test stars. Most
pulsator misses are 1-day aliases (a Cepheid's f reported at f + 1 / day, an RR Lyrae's at
|f - 1|): the two fit a nightly-sampled curve almost equally, so the choice is decided by small
differences in chi^2. This script asks of each miss whether the star's own points prefer the
catalogue's period or the reported one, independently of the pipeline's preprocessing and
search: a diagnostic of how far a search on these data can go, not a figure of merit.

Definitions (fixed before any figure was computed)
--------------------------------------------------
- **Misses**: the rows of ``benchmarks/eros.py``'s per-star CSV (``--stars``) with
  ``period_ok`` false and a finite reported period; stars given no period are counted apart.
- **Data**: each band's points as given in the split's curves file (fluxes and quoted errors,
  times de-duplicated as :func:`training.build_cadence_data.eros_band` does), without the
  pipeline's preprocessing; points more than 10 NMAD from the band's median are dropped (gross
  outliers only).
- **Model**: a ``K``-harmonic Fourier series per band at a shared period (``K`` = 3; 8 for an
  eclipsing binary, whose eclipses are narrow), each band with its own mean and coefficients.
  Each period is refined to its best chi^2 on a grid of +-5 steps of ``1 / (10 span)`` in
  frequency (41 points), so that neither side is judged off its own peak.
- **Noise scale**: each band's errors are scaled by ``sqrt(chi^2 / dof)`` of the better of the
  two fits in that band (quoted errors are often underestimated; the scale is the same for both
  candidates, so it does not favour either).
- **Evidence**: ``dchi2 = chi^2(catalogue) - chi^2(reported)`` summed over the bands, both with
  the same number of parameters. ``dchi2 > 10``: the data prefer the reported period (a
  likelihood ratio above e^5); ``dchi2 < -10``: they prefer the catalogue's; otherwise neither.
- For eclipsing binaries the catalogue period is compared at ``P`` and ``2 P`` and the
  better of the two kept (``benchmarks/eros.py`` accepts either), the reported period as reported.

**Signal at the catalogue period** (added after the first figures, for every star of the CSV):
the bands' summed chi^2 of the ``K``-harmonic series at the (refined) catalogue period against
their constant means, as an F test (``2 K`` parameters per band), its p-value multiplied by the
41 refinement trials. Above :data:`SIGNAL_FAP` (1e-3) the star's own points show no periodic
signal at its catalogue period: no classifier can tell its class from them. This enters the
class ceiling (a star without signal whose class is wrong counts as unreachable too).

**Null test** (``--null N``, defined with the rest): how often the verdict rejects a *right*
catalogue period. For up to N stars whose period the pipeline got right, each band is replaced
by the ``K``-harmonic fit at the catalogue period plus Gaussian noise of the band's scaled
errors (a curve whose true period is the catalogue's by construction), its period is searched
as the sparse route does (:func:`~survey_proc.lightcurves.fourier_features.curve_features`, the
bands jointly, rescaled; an eclipsing binary's doubled), and every miss is judged as above. A
search picks the best-fitting of its candidates, so noise favours the reported period; the
fraction of these misses judged ``reported`` is the verdict's false-rejection rate under that
selection.

Output: counts per class of the three verdicts; the **ceilings** of a search that reports the
best-fitting period (every star right except those whose points reject the catalogue period;
for the class accuracy, those of them whose four-class prediction is wrong too); the per-star
table (``--json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.eros import period_ok
from survey_proc.lightcurves.fourier_features import _design, curve_features, fourier_fit
from training.build_cadence_data import EROS, eros_band

NAMES = {1: "EB", 2: "Cepheid", 3: "RR Lyrae", 4: "Mira"}
DECISIVE = 10.0  # |dchi2| above which the data prefer one period (likelihood ratio e^5)
REFINE_STEPS = 5  # +- steps of 1 / (10 span) searched around each period
OUTLIER_NMAD = 10.0
SIGNAL_FAP = 1e-3  # the catalogue period's signal in the star's own points is significant at or below this


Curve = tuple[np.ndarray, np.ndarray, np.ndarray]


def clean_band(t: np.ndarray, flux: np.ndarray, err: np.ndarray) -> Curve:
    """One band's finite points with a positive error, without gross outliers (> 10 NMAD from the median)."""
    ok = np.isfinite(t) & np.isfinite(flux) & np.isfinite(err) & (err > 0)
    t, flux, err = t[ok], flux[ok], err[ok]
    med = float(np.median(flux))
    nmad = 1.4826 * float(np.median(np.abs(flux - med)))
    keep = np.abs(flux - med) <= OUTLIER_NMAD * nmad if nmad > 0 else np.ones(len(t), bool)
    return t[keep], flux[keep], err[keep]


def star_bands(curves: pd.DataFrame, sid: str) -> list[Curve]:
    """Star ``sid``'s cleaned bands (:func:`clean_band`) with at least 20 points each."""
    bands = (clean_band(*eros_band(curves.loc[sid], band)) for band in "br")
    return [b for b in bands if len(b[0]) >= 20]


def harmonics(typ: int) -> int:
    """Harmonics of the model of a star of class ``typ``: 8 for an eclipsing binary (narrow eclipses), else 3."""
    return 8 if typ == 1 else 3


def best_chi2(band: Curve, period_days: float, k: int, df: float) -> tuple[float, float]:
    """The lowest chi^2 of a ``k``-harmonic series near ``period_days`` (+-REFINE_STEPS x ``df`` in frequency).

    Returns
    -------
    chi^2, frequency of the minimum (1/day)
    """
    t, y, s = band
    f0 = 1.0 / period_days
    grid = f0 + np.linspace(-REFINE_STEPS, REFINE_STEPS, 8 * REFINE_STEPS + 1) * df
    grid = grid[grid > 0]
    chis = [fourier_fit(t, y, s, f, k)[1] for f in grid]
    j = int(np.argmin(chis))
    return float(chis[j]), float(grid[j])


def evidence(bands: list[Curve], p_catalogue_days: float, p_reported_days: float, k: int,
             catalogue_doubles: bool = False) -> float:
    """``chi^2(catalogue) - chi^2(reported)`` summed over ``bands`` (module docstring); > 0: the data prefer ours.

    Parameters
    ----------
    bands
        ``(t, flux, err)`` of each band (days, any linear unit).
    p_catalogue_days, p_reported_days
        The two periods (days).
    k
        Harmonics of the model.
    catalogue_doubles
        Also try twice the catalogue period and keep the better (eclipsing binaries).
    """
    span = max(float(np.ptp(b[0])) for b in bands)
    df = 1.0 / (10.0 * span)
    cats = [p_catalogue_days, 2.0 * p_catalogue_days] if catalogue_doubles else [p_catalogue_days]
    total = np.zeros(len(cats))
    for band in bands:
        dof = max(len(band[0]) - 2 * k - 1, 1)
        c_cat = np.array([best_chi2(band, p, k, df)[0] for p in cats])
        c_rep = best_chi2(band, p_reported_days, k, df)[0]
        scale = max(min(float(c_cat.min()), c_rep) / dof, 1e-6)  # the same noise scale for both candidates
        total += (c_cat - c_rep) / scale
    return float(total.min())


def signal_fap(bands: list[Curve], period_days: float, k: int) -> float:
    """False-alarm probability of a ``k``-harmonic signal at ``period_days`` in ``bands`` (module docstring).

    An F test of the bands' summed chi^2 against their constant means, with ``2 k`` extra parameters per band,
    times the ``8 REFINE_STEPS + 1`` frequencies the refinement tries (capped at 1).
    """
    from scipy.stats import f as f_dist

    span = max(float(np.ptp(b[0])) for b in bands)
    c1 = c0 = 0.0
    n = 0
    for band in bands:
        c1 += best_chi2(band, period_days, k, 1.0 / (10.0 * span))[0]
        c0 += fourier_fit(*band, 1.0, 0)[1]
        n += len(band[0])
    d1, d2 = 2 * k * len(bands), n - (2 * k + 1) * len(bands)
    if d2 <= 0 or c1 <= 0:
        return 1.0
    stat = ((c0 - c1) / d1) / (c1 / d2)
    return float(min(1.0, f_dist.sf(stat, d1, d2) * (8 * REFINE_STEPS + 1)))


def verdict(dchi2: float) -> str:
    """``"reported"``, ``"catalogue"`` or ``"neither"``: which period the data prefer (module docstring)."""
    if dchi2 > DECISIVE:
        return "reported"
    if dchi2 < -DECISIVE:
        return "catalogue"
    return "neither"


def synthetic_twin(rng: np.random.Generator, bands: list[Curve], period_days: float, k: int) -> list[Curve]:
    """Each band replaced by its ``k``-harmonic fit at ``period_days`` plus Gaussian noise of its scaled errors.

    The errors are scaled by ``sqrt(chi^2 / dof)`` of that fit and returned as the twin's errors.
    """
    span = max(float(np.ptp(b[0])) for b in bands)
    f = best_chi2(bands[0], period_days, k, 1.0 / (10.0 * span))[1]
    out = []
    for t, y, s in bands:
        c, chi = fourier_fit(t, y, s, f, k)
        s2 = s * np.sqrt(max(chi / max(len(t) - 2 * k - 1, 1), 1e-6))
        out.append((t, _design(t, f, k) @ c + rng.normal(0.0, 1.0, len(t)) * s2, s2))
    return out


def null_rejections(curves: pd.DataFrame, right: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """The null test of the module docstring: one row per synthetic twin whose searched period misses."""
    rng = np.random.default_rng(seed)
    pick = right.index.to_numpy()
    pick = pick[rng.permutation(len(pick))[:n]]
    rows = []
    for sid in pick:
        typ, p_true = int(right.loc[sid, "type"]), float(right.loc[sid, "p_true"])
        bands = star_bands(curves, sid)
        if not bands:
            continue
        k = harmonics(typ)
        twin = synthetic_twin(rng, bands, p_true, k)
        t0 = min(float(b[0][0]) for b in twin)
        twin = [(b[0] - t0, b[1], b[2]) for b in twin]
        fit = curve_features(*twin[0], 0.1, others=twin[1:], rescale_bands=True)
        p = fit.period_days * (2.0 if typ == 1 else 1.0)
        if period_ok(p, p_true, typ == 1):
            rows.append({"star": sid, "type": typ, "miss": False, "dchi2": np.nan, "verdict": ""})
            continue
        d = evidence(twin, p_true, p, k, catalogue_doubles=typ == 1)
        rows.append({"star": sid, "type": typ, "miss": True, "dchi2": d, "verdict": verdict(d)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test")
    ap.add_argument("--stars", required=True, help="benchmarks/eros.py's per-star CSV of the same split")
    ap.add_argument("--json", default=None)
    ap.add_argument("--null", type=int, default=0, help="synthetic twins of up to N stars with right periods")
    a = ap.parse_args(argv)
    res = pd.read_csv(a.stars, dtype={"star": str}).set_index("star")
    curves = pd.read_csv(EROS / f"{a.split}_varlength_features.csv.gz", index_col=0)
    curves.index = curves.index.astype(str)
    miss = res[~res["period_ok"].astype(bool)]
    no_period = miss[~np.isfinite(miss["period"].astype(float))]
    miss = miss[np.isfinite(miss["period"].astype(float))]
    bands_of = {sid: star_bands(curves, sid) for sid in set(res.index)}
    sig = {}
    for sid, r in res[np.isfinite(res["p_true"].astype(float))].iterrows():
        bands = bands_of[sid]
        sig[sid] = signal_fap(bands, float(r["p_true"]), harmonics(int(r["type"]))) if bands else 1.0
    res = res.assign(signal_fap=[sig.get(i, 1.0) for i in res.index])
    rows = []
    for sid, r in miss.iterrows():
        typ = int(r["type"])
        bands = bands_of[sid]
        if not bands:
            continue
        d = evidence(bands, float(r["p_true"]), float(r["period"]), harmonics(typ), catalogue_doubles=typ == 1)
        rows.append({"star": sid, "type": typ, "class": NAMES[typ], "p_catalogue_days": float(r["p_true"]),
                     "p_reported_days": float(r["period"]), "ratio": float(r["period"]) / float(r["p_true"]),
                     "class_right": bool(int(r["pred"]) == typ), "dchi2": d, "verdict": verdict(d)})
    tab = pd.DataFrame(rows)
    counts = (tab.groupby(["class", "verdict"]).size().unstack(fill_value=0)
              if len(tab) else pd.DataFrame())
    print(f"split {a.split}: {len(res)} stars, {len(res) - len(miss) - len(no_period)} periods right, "
          f"{len(no_period)} given no period, {len(tab)} wrong periods")
    print("which period the stars' own points prefer (dchi2 = chi2(catalogue) - chi2(reported), "
          f"decisive at |dchi2| > {DECISIVE:g}):")
    print(counts.to_string())
    # what a search reporting the best-fitting period could reach at most: every star right except those whose own
    # points reject the catalogue period (for the classes: those of them whose class is wrong too)
    rejected = tab[tab["verdict"] == "reported"] if len(tab) else tab
    wrong = res["pred"].to_numpy() != res["type"].to_numpy()
    no_signal = res["signal_fap"].to_numpy() > SIGNAL_FAP
    rej = np.zeros(len(res), bool)
    if len(rejected):  # the rows of res whose period the stars' own points reject (stars may repeat in res)
        rej = res.index.isin(set(rejected["star"])) & ~res["period_ok"].astype(bool).to_numpy()
    ceilings = {"period_within_1pct": 1.0 - len(rejected) / len(res),
                "class_accuracy": 1.0 - len(rejected[~rejected["class_right"].astype(bool)]) / len(res)
                if len(rejected) else 1.0,
                "class_accuracy_signal": 1.0 - float(np.sum(wrong & (rej | no_signal))) / len(res)}
    print(f"stars without a significant signal at their catalogue period (FAP > {SIGNAL_FAP:g}): "
          f"{int(no_signal.sum())}, {int(np.sum(no_signal & wrong))} of them with the wrong class")
    print(f"now: class accuracy {np.mean(res['pred'] == res['type']):.3f}, periods {res['period_ok'].mean():.3f}; "
          f"ceilings: periods {ceilings['period_within_1pct']:.3f}, classes {ceilings['class_accuracy']:.3f} "
          f"({ceilings['class_accuracy_signal']:.3f} counting the stars without signal)")
    out = {"split": a.split, "stars": len(res), "no_period": len(no_period), "wrong_periods": len(tab),
           "ceilings": ceilings, "no_signal": int(no_signal.sum()),
           "no_signal_class_wrong": int(np.sum(no_signal & wrong)),
           "no_signal_by_class": {NAMES[int(t)]: int(n) for t, n in
                                  res[no_signal].groupby("type").size().items()},
           "counts": {c: {v: int(n) for v, n in row.items()} for c, row in counts.iterrows()},
           "rows": tab.to_dict("records")}
    if a.null:
        right = res[res["period_ok"].astype(bool)]
        nul = null_rejections(curves, right, a.null)
        miss = nul[nul["miss"]]
        out["null"] = {"twins": len(nul), "misses": len(miss),
                       "verdicts": {v: int(n) for v, n in miss["verdict"].value_counts().items()},
                       "rows": nul.to_dict("records")}
        print(f"null test: {len(nul)} synthetic twins of right-period stars, {len(miss)} searched periods miss; "
              f"verdicts of the misses: {out['null']['verdicts']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Training light curves for the periodic-variable classifier, made to look like the pipeline's output.

Source of the noise: a pipeline run on a *training* survey (default: the ``make run`` output
of the default survey, seed 0; the benchmarks use seeds > 1000). Its objects matched to a
true **constant** star (one-to-one within 1 px, no true variable within 3 px) with at least
100 points are the *templates*: each is a real light curve of the pipeline, with its
epochs, gaps, flags, quoted errors and its actual scatter (blends, calibration residuals,
outliers included).

A training light curve takes a random template and one of two noise models (half each), both
in flux relative to the template's median flux, where the noise of the photometry is additive:

- ``real``: the template's own residuals ``f - 1``;
- ``model``: Gaussian noise drawn from the relative-flux scatter against magnitude that the
  pipeline measures (the NMAD of the template residuals per 0.5-mag bin, interpolated),
  at the template's magnitude shifted by U(-0.75, 0.75) mag, each point scaled by its
  quoted flux error relative to the template's median one (per-epoch conditions kept).

A variability model from the simulator (:func:`survey_proc.simulate.variables.delta_mag`)
multiplies the star's flux at the template's epochs (``f = 10^(-0.4 dm) + noise``; an eclipse
dims the star, not the noise); magnitudes and errors are then made from ``f`` as the pipeline
makes them, and a point with ``f <= 0`` has no magnitude, as in the pipeline's light curves.
(Before 2026-12-01 the noise was added in magnitudes, which is wrong for faint stars with forced
points: a forced flux near zero has a magnitude error of up to 10^6 mag.)
The class is drawn with :data:`CLASS_MIX`, the class is drawn with :data:`CLASS_MIX`, its
parameters with :func:`~survey_proc.simulate.variables.assign_variables` over ranges a
little wider than the dense scenario's (:data:`RANGES`). Points where the star is fainter
than usual are dropped with the extra probability of non-detection that the template set
shows at that magnitude (a faint eclipsing star vanishes in eclipse, as in the pipeline).

Labels: the simulator's class, with ``flare`` and ``trend`` as ``non_periodic``; a
variable whose signal is not in the data (``sqrt(sum (dm / sigma)^2) < 3`` over the kept
points, e.g. an eclipsing binary with no eclipse in the 3.5 days) is labelled ``constant``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from survey_proc.evaluate import load_truth_stars, match_one_to_one
from survey_proc.lightcurves.preprocess import LN10_04, to_matrix
from survey_proc.simulate.variables import assign_variables, delta_mag

CLASS_MIX = {"constant": 0.50, "eclipsing_binary": 0.13, "pulsator": 0.12, "transit": 0.13, "flare": 0.06,
             "trend": 0.06}
RANGES = {
    "eb_period_days": (0.25, 10.0),
    "pulsator_period_days": (0.3, 3.0),
    "transit_period_days": (0.5, 3.0),
    "pulsator_amplitude_mag": (0.05, 1.0),
    "eb_depth": (0.02, 0.7),
    "transit_depth": (0.003, 0.05),
    "transit_duration_h": (1.0, 5.0),
    "flare_amplitude": (0.1, 3.0),
    "trend_amplitude_mag": (0.03, 0.5),
}
LABEL = {"constant": 0, "eclipsing_binary": 1, "pulsator": 2, "transit": 3, "flare": 4, "trend": 4}


@dataclass
class Templates:
    """Real constant-star light curves of a pipeline run on a common epoch grid."""

    object_id: np.ndarray
    mjd: np.ndarray  # (n_t,)
    mag: np.ndarray  # (n, n_t) NaN = no detection
    mag_err: np.ndarray
    flags: np.ndarray
    mag_median: np.ndarray
    sigma_mag: np.ndarray  # (n,) NMAD of the residuals (mag)

    @functools.cached_property
    def sigma_flux(self) -> np.ndarray:
        """(n,) NMAD of the flux relative to the median flux (the scatter the synthesis adds noise in)."""
        f = 10.0 ** (-0.4 * (self.mag - self.mag_median[:, None])) - 1.0
        return 1.4826 * np.nanmedian(np.abs(f - np.nanmedian(f, 1)[:, None]), 1)

    def error_model(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bin centres, NMAD relative-flux scatter, missing fraction) per 0.5-mag bin of the median magnitude."""
        edges = np.arange(np.floor(self.mag_median.min()), np.ceil(self.mag_median.max()) + 0.5, 0.5)
        idx = np.digitize(self.mag_median, edges) - 1
        miss = np.isnan(self.mag).mean(1)
        sig_flux = self.sigma_flux
        c, s, m = [], [], []
        for b in range(len(edges) - 1):
            sel = idx == b
            if sel.sum() >= 5:
                c.append(0.5 * (edges[b] + edges[b + 1]))
                s.append(np.median(sig_flux[sel]))
                m.append(np.median(miss[sel]))
        return np.array(c), np.array(s), np.maximum.accumulate(np.array(m))


def load_templates(run_dir: str | Path, store: str | Path, min_points: int = 100) -> Templates:
    """Constant-star templates from the run in ``run_dir`` of the simulated ``store`` (see the module docstring)."""
    run_dir = Path(run_dir)
    objects = pd.read_parquet(run_dir / "objects")
    stars = load_truth_stars(store)
    i_o, i_s = match_one_to_one(objects["x"].to_numpy(), objects["y"].to_numpy(), stars["x"].to_numpy(),
                                stars["y"].to_numpy(), 1.0)
    const = stars["var_class"].to_numpy()[i_s] == "constant"
    var = stars[stars["var_class"] != "constant"]
    from scipy.spatial import cKDTree

    near_var = np.zeros(len(i_o), bool)
    if len(var):
        d, _ = cKDTree(var[["x", "y"]].to_numpy()).query(objects[["x", "y"]].to_numpy()[i_o])
        near_var = d < 3.0
    ok = const & ~near_var & (objects["n_good"].to_numpy()[i_o] >= min_points)
    ids = objects["object_id"].to_numpy()[i_o][ok]
    lc = pd.read_parquet(run_dir / "lightcurves", filters=[("object_id", "in", ids.tolist())])
    oid, _, mjd, mag, err, flg = to_matrix(lc)
    med = np.nanmedian(mag, 1)
    res = mag - med[:, None]
    sig = 1.4826 * np.nanmedian(np.abs(res - np.nanmedian(res, 1)[:, None]), 1)
    return Templates(oid, mjd, mag, err, flg, med, sig)


def synthesize(tpl: Templates, n: int, seed: int, rows: np.ndarray | None = None
               ) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """``n`` training light curves on the templates' epochs.

    Parameters
    ----------
    tpl
        Templates (:func:`load_templates`).
    n
        Number of curves.
    seed
        Random seed.
    rows
        Template rows to draw from (train/validation split by object); None: all.

    Returns
    -------
    arrays, meta
        ``arrays``: mag, mag_err, flags (n, n_t) and label (n,); ``meta``: the variability
        parameters, class, noise model, magnitude and observed S/N of each curve.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(len(tpl.object_id)) if rows is None else np.asarray(rows)
    pick = rng.choice(rows, n)
    t = tpl.mjd
    params = assign_variables(rng, n, fractions={k: v for k, v in CLASS_MIX.items() if k != "constant"},
                              t_start=float(t[0]), t_end=float(t[-1]), **RANGES)
    dm = delta_mag(params, t)  # (n, n_t)
    centres, scatter, missing = tpl.error_model()
    model_noise = rng.random(n) < 0.5
    shift = np.where(model_noise, rng.uniform(-0.75, 0.75, n), 0.0)
    m0 = tpl.mag_median[pick] + shift
    flags = tpl.flags[pick].copy()
    # flux relative to the template's median: the noise is additive there (a forced point of a
    # faint star can be near zero, where its magnitude error is huge and meaningless)
    med = tpl.mag_median[pick][:, None]
    f_tpl = 10.0 ** (-0.4 * (tpl.mag[pick] - med))
    ef_tpl = LN10_04 * tpl.mag_err[pick] * f_tpl
    present = np.isfinite(f_tpl) & np.isfinite(ef_tpl)
    rel_err = ef_tpl / np.nanmedian(np.where(present, ef_tpl, np.nan), 1, keepdims=True)
    sig_new = np.interp(m0, centres, scatter)  # relative-flux NMAD at the new magnitude
    gauss = rng.standard_normal(f_tpl.shape) * sig_new[:, None] * np.nan_to_num(rel_err, nan=1.0)
    noise = np.where(model_noise[:, None], gauss, f_tpl - 1.0)
    err_scale = np.where(model_noise, sig_new / np.maximum(tpl.sigma_flux[pick], 1e-4), 1.0)
    ef = ef_tpl * err_scale[:, None]
    signal = 10.0 ** (-0.4 * dm)
    f = signal + noise
    # extra non-detections where the star is fainter than its median (the pipeline without
    # forced photometry); with forced photometry the template set has none
    p_miss = np.clip(np.interp(m0[:, None] + dm, centres, missing) - np.interp(m0, centres, missing)[:, None], 0, 1)
    present &= rng.random(f.shape) >= p_miss
    present &= f > 0  # a negative flux has no magnitude (the lightcurves' mag is NaN there too)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(present, m0[:, None] - 2.5 * np.log10(np.where(present, f, 1.0)), np.nan)
        err = np.where(present, ef / (LN10_04 * np.where(present, f, 1.0)), np.nan)
    flags = np.where(present, flags, 0)
    sigma = np.where(present, sig_new[:, None], np.inf)
    # observed S/N of the signal in relative flux over the kept points
    snr_obs = np.sqrt(np.sum(((signal - 1.0) / sigma) ** 2, 1))
    cls = params["var_class"].to_numpy()
    label = np.array([LABEL[c] for c in cls])
    label = np.where((label > 0) & (snr_obs < 3.0), 0, label)
    meta = params.assign(mag=m0, noise="model", snr_obs=snr_obs, label=label, template=tpl.object_id[pick])
    meta.loc[~model_noise, "noise"] = "real"
    return {"mag": mag, "mag_err": err, "flags": flags, "label": label}, meta


# ------------------------------------------------------------------ issue 22: any cadence, real-looking signals
#: signal kinds of :func:`cadence_group` and their training labels (classifier classes)
KIND_LABEL = {
    "constant": "constant", "rrab": "pulsator", "rrc": "pulsator", "cepheid": "pulsator", "dsct": "pulsator",
    "mira": "pulsator", "eb_detached": "eclipsing_binary", "eb_contact": "eclipsing_binary", "transit": "transit",
    "random_walk": "non_periodic", "flare": "non_periodic", "trend": "non_periodic", "jumps": "non_periodic",
    "ramps": "non_periodic",
}
#: drawing weights of the kinds
KIND_MIX = {"constant": 0.26, "rrab": 0.06, "rrc": 0.04, "cepheid": 0.06, "dsct": 0.04, "mira": 0.04,
            "eb_detached": 0.09, "eb_contact": 0.06, "transit": 0.07, "random_walk": 0.07, "flare": 0.04,
            "trend": 0.05, "jumps": 0.06, "ramps": 0.06}


def load_eros_times(path: str | Path) -> list[np.ndarray]:
    """The R and B time stamps (days) of every EROS light curve in ``path`` (a ``*_varlength_features.csv.gz``)."""
    import json

    d = pd.read_csv(path, index_col=0, usecols=[0, 1, 2])
    out = []
    for col in ("time_points_r", "time_points_b"):
        out += [np.unique(np.asarray(json.loads(s), float)) for s in d[col]]
    return [t for t in out if len(t) >= 20]


def draw_cadence(rng: np.random.Generator, eros_times: list[np.ndarray] | None = None) -> np.ndarray:
    """Epoch times (days from 0, increasing) of one survey: 20-3000 points, hours to 10 years.

    Four families, equally likely: ``regular`` (a space-like or single-site stare: 1-30 min
    intervals, optionally cut by day/night), ``nightly`` (ground-based: one to a few visits per
    night at varying hours, seasons of 4-8 months each year, weather losses), ``sparse``
    (a few hundred points over years) and ``eros`` (the time stamps of a real EROS curve).
    """
    fam = rng.choice(["regular", "nightly", "sparse", "eros"] if eros_times else ["regular", "nightly", "sparse"])
    if fam == "eros" and eros_times:
        return eros_times[int(rng.integers(len(eros_times)))] - 0.0
    if fam == "regular":
        dt = rng.uniform(1, 30) / 1440
        n = int(np.exp(rng.uniform(np.log(40), np.log(3000))))
        t = np.arange(n) * dt
        if rng.random() < 0.5 and t[-1] > 1:  # nights of 6-10 h
            night = rng.uniform(0.25, 0.42)
            t = t[np.mod(t, 1.0) < night]
    else:
        years = np.exp(rng.uniform(np.log(0.1), np.log(10))) if fam == "nightly" else rng.uniform(1, 10)
        n_nights = int(years * 365)
        nights = np.arange(n_nights, dtype=float)
        season = rng.uniform(0.35, 0.7)
        nights = nights[np.mod(nights / 365.25 + rng.uniform(), 1.0) < season]
        nights = nights[rng.random(len(nights)) < rng.uniform(0.2, 0.8)]  # weather, scheduling
        n_target = int(np.exp(rng.uniform(np.log(20), np.log(600 if fam == "nightly" else 300))))
        per_night = 1 if fam == "sparse" else int(rng.integers(1, 4))
        if len(nights) == 0:
            nights = np.array([0.0])
        pick = rng.choice(len(nights), min(len(nights), max(1, n_target // per_night)), replace=False)
        base = np.sort(nights[pick])
        t = (base[:, None] + rng.uniform(-0.15, 0.15, (len(base), 1))
             + np.arange(per_night)[None, :] * rng.uniform(0.02, 0.1)).ravel()
    t = np.unique(np.round(t - t.min(), 6))
    return t if len(t) >= 20 else np.unique(np.r_[t, t[-1] + np.arange(1, 21 - len(t)) * 0.01])


def _fourier(phase: np.ndarray, amps: np.ndarray, phis: np.ndarray) -> np.ndarray:
    k = np.arange(1, len(amps) + 1)
    return (amps[:, None] * np.cos(2 * np.pi * k[:, None] * phase[None, :] + phis[:, None])).sum(0)


def signal_mag(kind: str, t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Magnitude offsets (brighter negative) of one ``kind`` at times ``t`` (days); and (period days, amplitude mag).

    Shapes after the real classes: RR Lyrae ab (0.45-0.9 d, 0.4-1.2 mag, sawtooth: Fourier
    amplitudes ~1/k, aligned phases), RR Lyrae c (0.25-0.45 d, near-sinusoidal), classical
    Cepheids (1-60 d log-uniform, 0.2-1 mag), delta Scuti (0.03-0.2 d, 0.005-0.3 mag), Miras
    (100-600 d, 1.5-5 mag, cycle-to-cycle amplitude and phase wander), detached binaries
    (0.4-40 d, eclipses 2-12 % of the period, primary 0.05-1 mag, secondary 0-1 of it,
    eccentric phases allowed), contact binaries (0.22-0.8 d, 0.1-0.7 mag, unequal minima),
    transits (0.5-20 d, 0.3-5 %, 1-6 h); negatives: quasar-like damped random walks (tau 5-500 d,
    0.05-0.6 mag), flares (1-4, 0.1-2 mag, minutes to hours), trends (linear + quadratic, up to
    0.4 mag), zero-point jumps (1-4 steps of 0.02-0.3 mag) and exponential ramps after gaps.
    """
    n = len(t)
    ph0 = rng.uniform()
    if kind == "constant":
        return np.zeros(n), np.nan, 0.0
    if kind in ("rrab", "rrc", "cepheid", "dsct", "mira"):
        lo, hi, alo, ahi, nh = {"rrab": (0.45, 0.9, 0.4, 1.2, 6), "rrc": (0.25, 0.45, 0.2, 0.5, 2),
                                "cepheid": (1.0, 60.0, 0.2, 1.0, 5), "dsct": (0.03, 0.2, 0.005, 0.3, 2),
                                "mira": (100.0, 600.0, 1.5, 5.0, 2)}[kind]
        p = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        amp = float(np.exp(rng.uniform(np.log(alo), np.log(ahi))))
        k = np.arange(1, nh + 1)
        decay = {"rrab": 1.0, "rrc": 2.5, "cepheid": 1.3, "dsct": 3.0, "mira": 3.0}[kind]
        amps = 1.0 / k**decay
        phis = k * 0.0 + (rng.normal(0, 0.3, nh) if kind != "rrab" else rng.normal(0, 0.1, nh))
        phase = np.mod(t / p + ph0, 1.0)
        if kind == "mira":  # cycle-to-cycle wander
            cyc = np.floor(t / p + ph0).astype(int)
            cyc -= cyc.min()
            scale = 1 + rng.normal(0, 0.15, cyc.max() + 1)[cyc]
        else:
            scale = 1.0
        shape = -_fourier(phase, amps, phis)  # sawtooth-ish: fast rise (brighter = negative magnitude)
        shape = (shape - shape.min()) / max(np.ptp(shape), 1e-9) if np.ptp(shape) > 0 else shape
        return amp * (shape - 0.5) * scale, p, amp
    if kind in ("eb_detached", "eb_contact"):
        if kind == "eb_contact":
            p = float(rng.uniform(0.22, 0.8))
            amp = float(rng.uniform(0.1, 0.7))
            phase = np.mod(t / p + ph0, 1.0)
            dm = amp * 0.5 * (1 - np.cos(4 * np.pi * phase)) * (1 + rng.uniform(0, 0.2) * np.cos(2 * np.pi * phase))
            return dm - np.median(dm), p, amp
        p = float(np.exp(rng.uniform(np.log(0.4), np.log(40))))
        w = rng.uniform(0.02, 0.12) * min(1.0, (2.0 / p) ** 0.3)
        d1 = float(np.exp(rng.uniform(np.log(0.05), np.log(1.0))))
        d2 = d1 * rng.uniform(0, 1)
        sec = 0.5 + rng.normal(0, 0.03) if rng.random() < 0.3 else 0.5
        phase = np.mod(t / p + ph0, 1.0)
        dist1 = np.minimum(phase, 1 - phase)
        dist2 = np.abs(phase - sec)
        dm = d1 * np.exp(-0.5 * (dist1 / (w / 2.5)) ** 2) + d2 * np.exp(-0.5 * (dist2 / (w / 2.5)) ** 2)
        return dm, p, d1
    if kind == "transit":
        p = float(np.exp(rng.uniform(np.log(0.5), np.log(20))))
        depth = float(np.exp(rng.uniform(np.log(0.003), np.log(0.05))))
        dur = min(rng.uniform(1, 6) / 24, 0.15 * p)
        phase = np.mod(t / p + ph0, 1.0)
        dt = np.minimum(phase, 1 - phase) * p
        ing = 0.15 * dur
        f = np.clip((dur / 2 - dt) / ing, 0, 1)
        return -2.5 * np.log10(1 - depth * f), p, 1.0857 * depth
    span = max(float(t[-1] - t[0]), 1e-3)
    if kind == "random_walk":
        tau = float(np.exp(rng.uniform(np.log(5), np.log(500))))
        sig = float(rng.uniform(0.05, 0.6))
        x = np.zeros(n)
        for i in range(1, n):
            a = np.exp(-(t[i] - t[i - 1]) / tau)
            x[i] = a * x[i - 1] + sig * np.sqrt(1 - a * a) * rng.normal()
        return x, np.nan, sig
    if kind == "flare":
        dm = np.zeros(n)
        amp = 0.0
        for _ in range(int(rng.integers(1, 5))):
            t0 = t[0] + rng.uniform() * span
            a = float(rng.uniform(0.1, 2.0))
            decay = float(np.exp(rng.uniform(np.log(0.005), np.log(0.2))))
            x = t - t0
            flux = a * np.exp(-np.maximum(x, 0) / decay) * np.exp(np.minimum(x, 0) / (0.1 * decay))
            dm += -2.5 * np.log10(1 + flux)
            amp = max(amp, a)
        return dm, np.nan, amp
    if kind == "trend":
        x = (t - t[0]) / span - 0.5
        a, b = rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3)
        return a * x + b * (x * x - 1 / 12), np.nan, abs(a) + abs(b)
    gaps = np.flatnonzero(np.diff(t) > max(5 * np.median(np.diff(t)), 0.2)) + 1
    if kind == "jumps":
        dm = np.zeros(n)
        cuts = rng.choice(gaps, min(len(gaps), int(rng.integers(1, 5))), replace=False) if len(gaps) else \
            rng.integers(n // 5, 4 * n // 5, int(rng.integers(1, 3)))
        for c in np.atleast_1d(cuts):
            dm[int(c):] += rng.choice([-1, 1]) * rng.uniform(0.02, 0.3)
        return dm, np.nan, float(np.ptp(dm))
    # ramps: an exponential settling after each gap (and at the start)
    starts = np.r_[0, gaps]
    amp = float(rng.uniform(0.02, 0.3))
    tau = float(rng.uniform(0.05, 2.0)) * min(1.0, span / 5)
    seg_start = t[starts[np.searchsorted(starts, np.arange(n), side="right") - 1]]
    return amp * np.exp(-(t - seg_start) / tau) * rng.choice([-1, 1]), np.nan, amp


def cadence_group(rng: np.random.Generator, n_curves: int, eros_times: list[np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """``n_curves`` training curves sharing one drawn cadence (:func:`draw_cadence`).

    Each curve: a kind (:data:`KIND_MIX`), its signal (:func:`signal_mag`), a noise level
    0.003-0.3 mag (log-uniform) with quoted errors off by up to +-30 %, 0-20 % of the points
    missing, 0-2 % outliers. The label is the kind's class (:data:`KIND_LABEL`); a periodic
    kind whose period exceeds the span / 1.5, or whose signal is below 5 sigma in total
    (``sqrt(sum(dm^2)) / sigma``), or an aperiodic one below 5 sigma, is labelled ``constant``
    (periodic ones beyond the span: ``non_periodic`` when seen).

    Returns
    -------
    mjd (n_t,), mag (n, n_t; NaN missing), mag_err (n, n_t), meta (kind, label, period, amplitude, sigma)
    """
    t = draw_cadence(rng, eros_times)
    n_t = len(t)
    kinds = rng.choice(list(KIND_MIX), n_curves, p=np.array(list(KIND_MIX.values())) / sum(KIND_MIX.values()))
    mag = np.empty((n_curves, n_t))
    err = np.empty((n_curves, n_t))
    rows = []
    span = float(t[-1] - t[0])
    for i, kind in enumerate(kinds):
        dm, p, amp = signal_mag(str(kind), t, rng)
        sigma = float(np.exp(rng.uniform(np.log(0.003), np.log(0.3))))
        noise = sigma * rng.normal(size=n_t) * (1 + 0.3 * rng.random(n_t))
        out = rng.random(n_t) < rng.uniform(0, 0.02)
        noise[out] += rng.normal(0, 10 * sigma, out.sum())
        m = 18.0 + dm + noise
        m[rng.random(n_t) < rng.uniform(0, 0.2)] = np.nan
        mag[i], err[i] = m, sigma * rng.uniform(0.7, 1.3)
        keep = np.isfinite(m)
        snr = float(np.sqrt(np.sum((dm[keep] - np.median(dm[keep])) ** 2)) / sigma) if keep.any() else 0.0
        label = KIND_LABEL[str(kind)]
        if label != "constant" and snr < 5:
            label = "constant"
        elif label in ("pulsator", "eclipsing_binary", "transit") and p > span / 1.5:
            label = "non_periodic"
        rows.append({"kind": str(kind), "label": label, "period": p, "amplitude": amp, "sigma": sigma, "snr": snr})
    return t + 60000.0, mag, err, pd.DataFrame(rows)

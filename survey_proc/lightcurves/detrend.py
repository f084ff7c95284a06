"""Detrending before the period search: SysRem over the stars of a field.

What it removes
---------------
Systematics that the calibration leaves in *every* star of a field at once: per-epoch
zero-point errors (an epoch whose zero point came from the cross-epoch model, an
ensemble solution with a bad night), airmass/colour terms, a seeing-dependent aperture
loss. Each is a time series shared by the field's stars (``c_j``, one value per epoch)
with an amplitude of its own per star (``a_i``; a colour term hits red and blue stars
differently). On the dense 256² x 1000-epoch survey of issue 19 such offsets (0.08 mag
rms on the fallback epochs) made bright constant stars look like transits.

SysRem (Tamuz, Mazeh & Zucker 2005, MNRAS 356, 1466) finds them as the weighted rank-k
approximation of the residual matrix ``r_ij = m_ij - <m_i>`` (star i, epoch j; NaN where
a star was not measured): for each component in turn it alternates

    c_j = sum_i w_ij a_i r_ij / sum_i w_ij a_i^2,   a_i = sum_j w_ij c_j r_ij / sum_j w_ij c_j^2

to convergence (``w_ij = 1 / sigma_ij^2``), subtracts ``a_i c_j`` and goes on with the
next. The components are fitted on **well-measured, constant-looking stars** only
(:func:`fit_components`): at most :data:`MAX_FIT_STARS` stars with the smallest errors
and enough epochs; three passes, each dropping the stars whose residual scatter stands out
from the field's (variables: ``scale > median + 5 NMAD``) and clipping single points at
``clip_sigma`` x the star's own error scale (a transit, a cosmic ray).

Three guards, each added after a failure measured on a held-out survey or a test:

- the first screen is made against the field's per-epoch *median* residual, before any
  fit. Without it a bright pulsator (mag 21, 0.7 mag peak-to-peak among mag-24 stars)
  became the first component, then fitted itself perfectly, passed as "constant" and had
  its variability removed;
- no star weighs more than ``max_weight_ratio`` (20) times the median star;
- a component is kept only when its chi^2 reduction beats white noise, i.e. exceeds
  ``noise_margin`` (1.3) x ``(sqrt(n_stars) + sqrt(n_epochs))^2`` (the largest eigenvalue
  of a white-noise matrix of that shape, Marchenko-Pastur, in units of each star's own
  error scale), and when at least ``min_n_eff`` (5) stars carry it. A field without shared
  systematics is left alone (``"none: no component above the noise ..."``), and ``k`` may
  come out smaller than asked for.

Every object of the
field then gets *its own* amplitudes of the shared ``c_j`` (:func:`fit_amplitudes`: a
weighted linear fit of an offset and the k amplitudes, with iterative outlier clipping,
so transit or eclipse points do not pull the fit) and the fitted ``sum_k a_ik c_kj`` is
subtracted before the period search. The components are normalised to unit rms over the
epochs, so an amplitude is the rms (mag) of that systematic in the star.

A variable's signal leaks into the correction only through its projection on the
``c_j``: for components that are noise-like in time (per-epoch offsets) that is about
``rms_signal / sqrt(n_epochs)`` (a 0.6 mag pulsator over 1000 epochs: ~0.01 mag), and the
clipped fit keeps transit and eclipse points out of it.

Why not wotan
-------------
wotan (Hippke et al. 2019) flattens one light curve at a time with a sliding robust
filter (biweight etc.). It is the right tool for slow *per-star* drifts in a transit
search, but not here:

- The systematics to remove are per-epoch offsets shared by the field, white in time. A
  sliding filter cannot remove an offset of a single epoch without a window of one epoch,
  which would remove everything; SysRem uses the *other stars* of the same epoch instead.
- Any window short enough to follow the drifts also eats real variability on the same
  time scales: pulsators of 0.3-3 d, eclipses and transits longer than ~1/3 of the window,
  and the slow ``trend`` class, which the classifier must see to tell apart from periodic
  variables (its features would be flattened to noise).
- The shipped classifier was trained on un-flattened light curves.

So wotan is not a dependency. SysRem needs only numpy; its cost is a few matrix passes
over (stars x epochs), negligible next to the period search.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from survey_proc.lightcurves.nanmedian import nmad_rows

#: at most this many stars (the best-measured) are used to fit the components of a field
MAX_FIT_STARS = 3000


@dataclass
class Components:
    """The systematics shared by the stars of a field (one band), as fitted by :func:`fit_components`.

    Attributes
    ----------
    c
        (k, n_t) the components over the epochs, each normalised to unit rms over the epochs
        it covers; 0 at epochs no fitting star measured. ``k`` may be less than asked for
        (see ``applied``).
    used
        (n,) the stars the last pass used.
    applied
        ``"sysrem:<k>"``, or ``"none: <why>"`` when nothing was fitted.
    n_stars
        Stars used in the last pass.
    rms_before, rms_after
        Median over the used stars of each star's rms about its mean (mag, clipped points
        left out), before and after removing the components.
    err_median
        Median quoted error of the used stars' points (mag), the noise the rms can reach.
    extra
        More figures for run.json (mag): ``component_rms_mag`` (rms amplitude of each component
        over the used stars); for their brightest quarter (``n_bright``, at least 10), the
        median error, the median rms before and after, and the rms over the epochs of their
        per-epoch median residual (the common offset) before and after.
    """

    c: np.ndarray
    used: np.ndarray
    applied: str
    n_stars: int = 0
    rms_before: float = float("nan")
    rms_after: float = float("nan")
    err_median: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        """Number of components."""
        return int(self.c.shape[0])

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary for run.json."""
        def f(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        return {"applied": self.applied, "n_stars": int(self.n_stars), "rms_before_mag": f(self.rms_before),
                "rms_after_mag": f(self.rms_after), "err_median_mag": f(self.err_median), **self.extra}


def sysrem(resid: np.ndarray, w: np.ndarray, n_components: int, max_iter: int = 100, tol: float = 1e-6,
           min_n_eff: float = 0.0, min_gain: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The SysRem components of a residual matrix (Tamuz, Mazeh & Zucker 2005).

    Parameters
    ----------
    resid
        (n, n_t) residuals about each star's mean (mag); any value where ``w == 0``.
    w
        (n, n_t) weights (1 / mag^2); 0 for a missing or rejected point.
    n_components
        Number of components, fitted one after the other.
    max_iter, tol
        Alternations per component at most, and the relative change of ``c`` that ends them.
    min_n_eff
        A component that fewer stars than this carry (effective number ``(sum_i s_i)^2 / sum_i
        s_i^2`` of the stars' weighted shares ``s_i = sum_j w_ij (a_i c_j)^2``: one star's
        signal, not a shared systematic) is dropped, and so are the ones after it.
    min_gain
        Likewise a component whose chi^2 reduction ``sum_i s_i`` is below this (one that noise
        alone would give: :func:`fit_components` passes the largest eigenvalue of a white-noise
        matrix of the same shape).

    Returns
    -------
    c, a
        (k, n_t) components (unit rms over the epochs with weight) and (n, k) amplitudes (mag);
        ``resid - a @ c`` is what is left. ``k`` is less than ``n_components`` when a component
        was dropped.
    """
    r = np.where(w > 0, resid, 0.0).astype(float)
    w = np.asarray(w, float)
    n, n_t = r.shape
    cs = np.zeros((n_components, n_t))
    As = np.zeros((n, n_components))
    covered = w.sum(0) > 0
    for k in range(n_components):
        a = np.ones(n)
        c = np.zeros(n_t)
        wr = w * r  # the alternations' sums as matrix-vector products (BLAS) rather than full-matrix temporaries
        for _ in range(max_iter):
            den_c = (a**2) @ w
            c_new = np.where(den_c > 0, (a @ wr) / np.where(den_c > 0, den_c, 1.0), 0.0)
            den_a = w @ (c_new**2)
            a = np.where(den_a > 0, (wr @ c_new) / np.where(den_a > 0, den_a, 1.0), 0.0)
            change = np.linalg.norm(c_new - c) / max(float(np.linalg.norm(c_new)), 1e-30)
            c = c_new
            if change < tol:
                break
        norm = float(np.sqrt(np.mean(c[covered] ** 2))) if covered.any() else 0.0
        if norm > 0:
            c, a = c / norm, a * norm
        share = (w * (a[:, None] * c[None, :]) ** 2).sum(1)
        n_eff = share.sum() ** 2 / max(float((share**2).sum()), 1e-300)
        if n_eff < min_n_eff or share.sum() < min_gain:
            return cs[:k], As[:, :k]
        cs[k], As[:, k] = c, a
        r = r - a[:, None] * c[None, :]
    return cs, As


def _weighted_mean(m: np.ndarray, w: np.ndarray) -> np.ndarray:
    sw = w.sum(1)
    return np.where(sw > 0, (np.where(w > 0, m, 0.0) * w).sum(1) / np.where(sw > 0, sw, 1.0), np.nan)


def _row_rms(r: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Rms of each row about its own mean over the ``keep`` points (mag)."""
    n = keep.sum(1)
    x = np.where(keep, r, 0.0)
    mean = x.sum(1) / np.maximum(n, 1)
    var = (np.where(keep, r - mean[:, None], 0.0) ** 2).sum(1) / np.maximum(n - 1, 1)
    return np.where(n > 1, np.sqrt(var), np.nan)


def _screen(z: np.ndarray, ok: np.ndarray, clip_sigma: float, variable_nmad: float, min_fraction: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Error scale of each star, the points to keep and the stars to use, from normalised residuals ``z``.

    A star's scale is the NMAD of its ``z``; points beyond ``clip_sigma`` x scale are dropped; a
    star is used when its scale is within ``variable_nmad`` NMADs of the field's median scale and
    it keeps ``min_fraction`` of the epochs.
    """
    scale = nmad_rows(z)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.inf)
    keep = ok & (np.abs(np.nan_to_num(z, nan=np.inf)) <= clip_sigma * scale[:, None])
    fin = np.isfinite(scale)
    s_med = float(np.median(scale[fin])) if fin.any() else np.inf
    s_nmad = float(nmad_rows(scale[fin])) if fin.sum() > 1 else 0.0
    use = fin & (scale <= s_med + variable_nmad * max(s_nmad, 0.05 * s_med))
    return scale, keep, use & (keep.sum(1) >= min_fraction * z.shape[1])


def fit_components(mag: np.ndarray, err: np.ndarray, good: np.ndarray, n_components: int, min_stars: int, *,
                   min_fraction: float = 0.5, clip_sigma: float = 5.0, variable_nmad: float = 5.0,
                   err_floor: float = 0.001, max_stars: int = MAX_FIT_STARS, n_pass: int = 3,
                   max_weight_ratio: float = 20.0, min_n_eff: float = 5.0, noise_margin: float = 1.3
                   ) -> Components:
    """Fit the systematics shared by a field's stars (one band) on its well-measured, constant-looking stars.

    Parameters
    ----------
    mag, err
        (n, n_t) calibrated magnitudes and their errors (mag) of the field's objects over the
        band's epochs; NaN where missing.
    good
        (n, n_t) points that may be used (no bad flags).
    n_components
        Components to fit (``[classify] detrend_components``).
    min_stars
        Fewer usable stars than this: nothing is fitted (``applied`` says why).
    min_fraction
        A star is a candidate when it has good points in at least this fraction of the epochs.
    clip_sigma
        Points further than this many times the star's error scale from the model are left
        out of the next pass.
    variable_nmad
        A star whose error scale (NMAD of residual / error) exceeds the field's median by this
        many NMADs is taken for a variable and left out of the next pass.
    err_floor
        Added in quadrature to the quoted errors (mag), so no star dominates the fit.
    max_stars
        At most this many candidates (those with the smallest median error).
    n_pass
        Passes of fit, clipping and star rejection.
    max_weight_ratio
        No star's total weight exceeds this many times the median star's.
    min_n_eff
        Components carried by fewer stars than this are dropped (:func:`sysrem`).
    noise_margin
        Components whose chi^2 reduction is below this many times the largest eigenvalue of
        white noise, ``(sqrt(n_stars) + sqrt(n_epochs))^2`` in units of each star's own error
        scale, are dropped: a field without shared systematics is left alone.

    Returns
    -------
    Components
        The components and what was used.
    """
    mag = np.asarray(mag, float)
    err = np.asarray(err, float)
    n, n_t = mag.shape
    ok = np.asarray(good, bool) & np.isfinite(mag) & np.isfinite(err) & (err > 0)
    cand = ok.sum(1) >= max(min_fraction * n_t, n_components + 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        err_med = np.nanmedian(np.where(ok, err, np.nan), axis=1)
    if cand.sum() > max_stars:
        order = np.argsort(np.where(cand, err_med, np.inf), kind="stable")
        cand = np.zeros(n, bool)
        cand[order[:max_stars]] = True
    none = Components(np.zeros((0, n_t)), np.zeros(n, bool), "")

    def refuse(n_use: int) -> Components:
        none.applied = f"none: {n_use} stars < detrend_min_stars ({min_stars})"
        none.n_stars = n_use
        return none

    if n_components < 1:
        none.applied = "none"
        return none
    if cand.sum() < min_stars or n_t < n_components + 2:
        return refuse(int(cand.sum()))
    idx = np.flatnonzero(cand)
    m, e, ok_c = mag[idx], np.hypot(err[idx], err_floor), ok[idx]
    resid = m - _weighted_mean(m, np.where(ok_c, 1.0 / e**2, 0.0))[:, None]
    # first screen, before any fit: the scatter about the field's per-epoch median residual (a
    # common mode no single star can pull), so that a bright variable cannot become a component
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        common = np.nanmedian(np.where(ok_c, resid, np.nan), axis=0)
    scale, keep, use = _screen(np.where(ok_c, (resid - np.nan_to_num(common)[None, :]) / e, np.nan), ok_c,
                               clip_sigma, variable_nmad, min_fraction)
    c = np.zeros((0, n_t))
    a = np.zeros((len(idx), 0))
    for _ in range(n_pass):
        if use.sum() < min_stars:
            return refuse(int(use.sum()))
        resid = m - _weighted_mean(m, np.where(keep, 1.0 / e**2, 0.0))[:, None]
        w = np.where(keep & use[:, None], 1.0 / (scale[:, None] * e) ** 2, 0.0)
        # no star weighs more than max_weight_ratio x the median star
        tot = w.sum(1)
        cap = max_weight_ratio * float(np.median(tot[use]))
        w *= np.minimum(1.0, cap / np.where(tot > 0, tot, np.inf))[:, None]
        # a component must beat what white noise gives: the largest eigenvalue of a (stars x epochs)
        # matrix of unit-variance noise, (sqrt(n) + sqrt(n_t))^2 (Marchenko-Pastur), with a margin
        n_cov = int(((w[use] > 0).sum(0) > 0).sum())
        gain = noise_margin * (np.sqrt(use.sum()) + np.sqrt(n_cov)) ** 2
        c, _ = sysrem(resid[use], w[use], n_components, min_n_eff=min_n_eff, min_gain=gain)
        # every candidate's amplitudes against these components (also those left out, to judge them again)
        a, off = _amplitudes(resid, np.where(keep, 1.0 / e**2, 0.0), c)
        z = np.where(ok_c, (resid - a @ c - off[:, None]) / e, np.nan)
        scale, keep, use = _screen(z, ok_c, clip_sigma, variable_nmad, min_fraction)
    if c.shape[0] == 0:
        none.applied = f"none: no component above the noise shared by >= {min_n_eff:g} stars"
        none.n_stars = int(use.sum())
        return none
    if use.sum() < min_stars:
        return refuse(int(use.sum()))
    # the statistics of the stars of the last pass
    resid = m - _weighted_mean(m, np.where(keep, 1.0 / e**2, 0.0))[:, None]
    k_use = keep[use]
    before = _row_rms(resid[use], k_use)
    after = _row_rms(resid[use] - a[use] @ c, k_use)
    used = np.zeros(n, bool)
    used[idx[use]] = True
    # the brightest quarter (smallest errors) of them: where the systematics show above the noise
    n_b = max(min(10, int(use.sum())), int(use.sum()) // 4)
    bright = np.argsort(err_med[idx[use]], kind="stable")[:n_b]
    r_b = np.where(k_use[bright], resid[use][bright], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        epoch_before = np.nanmedian(r_b, axis=0)
        epoch_after = np.nanmedian(r_b - (a[use] @ c)[bright], axis=0)
        extra = {"component_rms_mag": [float(np.sqrt(np.mean(a[use, k] ** 2))) for k in range(c.shape[0])],
                 "n_bright": int(n_b), "bright_err_median_mag": float(np.nanmedian(err_med[idx[use]][bright])),
                 "bright_rms_before_mag": float(np.nanmedian(before[bright])),
                 "bright_rms_after_mag": float(np.nanmedian(after[bright])),
                 "bright_epoch_offset_rms_before_mag": float(np.sqrt(np.nanmean(epoch_before**2))),
                 "bright_epoch_offset_rms_after_mag": float(np.sqrt(np.nanmean(epoch_after**2)))}
        return Components(c, used, f"sysrem:{c.shape[0]}", int(use.sum()), float(np.nanmedian(before)),
                          float(np.nanmedian(after)), float(np.nanmedian(np.where(k_use, err[idx[use]], np.nan))),
                          extra)


def _amplitudes(resid: np.ndarray, w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares offset and amplitudes of each row of ``resid`` against the components ``c``.

    Returns (n, k) amplitudes and (n,) offsets; zeros for a row with too few points.
    """
    k = c.shape[0]
    basis = np.vstack([np.ones((1, c.shape[1])), c])  # (k+1, n_t)
    r = np.where(w > 0, resid, 0.0)
    ata = np.einsum("ij,aj,bj->iab", w, basis, basis)
    atb = np.einsum("ij,ij,aj->ia", w, r, basis)
    n_pts = (w > 0).sum(1)
    ridge = 1e-12 * np.trace(ata, axis1=1, axis2=2)[:, None, None] * np.eye(k + 1)
    solvable = (n_pts >= k + 3) & (np.abs(np.linalg.det(ata + ridge)) > 0)
    x = np.zeros((len(r), k + 1))
    if solvable.any():
        x[solvable] = np.linalg.solve(ata[solvable] + ridge[solvable], atb[solvable][..., None])[..., 0]
    return x[:, 1:], x[:, 0]


def fit_amplitudes(mag: np.ndarray, err: np.ndarray, good: np.ndarray, c: np.ndarray, clip_sigma: float = 4.0,
                   n_iter: int = 3, err_floor: float = 0.001) -> tuple[np.ndarray, np.ndarray]:
    """Each object's own amplitudes of the field's components, fitted with outlier clipping.

    Parameters
    ----------
    mag, err
        (n, n_t) magnitudes and errors (mag) over the epochs of ``c``; NaN where missing.
    good
        (n, n_t) points that may be used in the fit.
    c
        (k, n_t) the field's components (:class:`Components`), 0 where unknown.
    clip_sigma
        Points further than this many times the object's error scale (NMAD of the normalised
        residuals) from the fit are left out of the next iteration (eclipses, transits, flares).
    n_iter
        Fit-and-clip iterations.
    err_floor
        Added in quadrature to the errors (mag).

    Returns
    -------
    amplitudes, correction
        (n, k) amplitudes (mag) and (n, n_t) the correction ``a @ c`` to subtract (mag);
        zeros for an object with too few points.
    """
    mag = np.asarray(mag, float)
    e = np.hypot(np.asarray(err, float), err_floor)
    ok = np.asarray(good, bool) & np.isfinite(mag) & np.isfinite(e) & (e > 0)
    n = len(mag)
    if c.shape[0] == 0 or n == 0:
        return np.zeros((n, c.shape[0])), np.zeros(mag.shape)
    keep = ok.copy()
    a = np.zeros((n, c.shape[0]))
    for it in range(n_iter):
        w = np.where(keep, 1.0 / e**2, 0.0)
        a, off = _amplitudes(np.where(ok, mag, 0.0), w, c)
        if it == n_iter - 1:
            break
        z = np.where(ok, (mag - off[:, None] - a @ c) / e, np.nan)
        s = nmad_rows(np.where(keep, z, np.nan))
        s = np.where(np.isfinite(s) & (s > 0), s, np.inf)
        keep = ok & (np.abs(np.nan_to_num(z, nan=np.inf)) <= clip_sigma * s[:, None])
    return a, a @ c


# --- long-format light curves (one row per point), as the classify stage holds them -------------------------------

#: the band label of light curves without a ``band`` column
NO_BAND = "all"


def _bands(lc: pd.DataFrame) -> pd.Series:
    if "band" in lc.columns:
        return lc["band"].astype(str).fillna(NO_BAND)
    return pd.Series(NO_BAND, index=lc.index)


def fit_field(lc: pd.DataFrame, n_components: int, min_stars: int, bad_flags: int, **kw: Any
              ) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """The components of a field, per band, from its light-curve points.

    Parameters
    ----------
    lc
        Light-curve points of the field's candidate stars: ``object_id, epoch, mag, mag_err,
        flags`` and, when present, ``band`` (components are fitted per band).
    n_components, min_stars
        ``[classify] detrend_components`` and ``detrend_min_stars``.
    bad_flags
        Points with any of these flags are not used.
    **kw
        Passed to :func:`fit_components`.

    Returns
    -------
    components, info
        Long table ``band, epoch, component, value`` (value: unit-rms component, in units of
        the star's amplitude; empty for a band where nothing was fitted), and per band the
        :meth:`Components.info`.
    """
    rows = []
    info: dict[str, dict[str, Any]] = {}
    bands = _bands(lc)
    for band in sorted(bands.unique()):
        sub = lc[(bands == band).to_numpy()]
        ids, ob = np.unique(sub["object_id"].to_numpy(), return_inverse=True)
        epochs, ep = np.unique(sub["epoch"].to_numpy(), return_inverse=True)
        mag = np.full((len(ids), len(epochs)), np.nan)
        err = np.full_like(mag, np.nan)
        good = np.zeros(mag.shape, bool)
        mag[ob, ep] = sub["mag"].to_numpy(float)
        err[ob, ep] = sub["mag_err"].to_numpy(float)
        good[ob, ep] = (sub["flags"].to_numpy() & bad_flags) == 0
        comp = fit_components(mag, err, good, n_components, min_stars, **kw)
        info[band] = comp.info()
        for k in range(comp.k):
            rows.append(pd.DataFrame({"band": band, "epoch": epochs.astype(np.int32), "component": np.int32(k),
                                      "value": comp.c[k]}))
    cols = {"band": pd.Series(dtype=str), "epoch": pd.Series(dtype=np.int32),
            "component": pd.Series(dtype=np.int32), "value": pd.Series(dtype=float)}
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(cols)
    return table, info


def apply_components(lc: pd.DataFrame, components: pd.DataFrame, bad_flags: int, **kw: Any
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Subtract from every object its own fitted amplitudes of the field's components.

    Parameters
    ----------
    lc
        Light-curve points: ``object_id, epoch, mag, mag_err, flags`` (and ``band``).
    components
        The field's components (:func:`fit_field`).
    bad_flags
        Points with any of these flags do not enter the amplitude fit (they are corrected too).
    **kw
        Passed to :func:`fit_amplitudes`.

    Returns
    -------
    lc, per_object
        A copy of ``lc`` with ``mag`` corrected, and one row per object (index ``object_id``):
        ``detrend_rms`` (rms of the subtracted correction, mag; 0 where none), ``detrended``
        (bool: some component was fitted to it) and ``detrend`` (``"sysrem:<k>"``, k the
        components of its band, the most over its bands; ``"none"``).
    """
    out = lc.copy()
    oids = np.unique(lc["object_id"].to_numpy())
    rms_sq = pd.Series(0.0, index=oids)
    n_pts = pd.Series(0, index=oids)
    n_comp = pd.Series(0, index=oids)
    bands = _bands(lc)
    for band, comp in components.groupby("band"):
        sel = (bands == band).to_numpy()
        if not sel.any():
            continue
        sub = lc[sel]
        cw = comp.pivot(index="component", columns="epoch", values="value").sort_index()
        c_epochs = cw.columns.to_numpy()
        ids, ob = np.unique(sub["object_id"].to_numpy(), return_inverse=True)
        ep_all = sub["epoch"].to_numpy()
        col = np.searchsorted(c_epochs, ep_all)
        inside = (col < len(c_epochs)) & (c_epochs[np.minimum(col, len(c_epochs) - 1)] == ep_all)
        mag = np.full((len(ids), len(c_epochs)), np.nan)
        err = np.full_like(mag, np.nan)
        good = np.zeros(mag.shape, bool)
        mag[ob[inside], col[inside]] = sub["mag"].to_numpy(float)[inside]
        err[ob[inside], col[inside]] = sub["mag_err"].to_numpy(float)[inside]
        good[ob[inside], col[inside]] = (sub["flags"].to_numpy()[inside] & bad_flags) == 0
        _, corr = fit_amplitudes(mag, err, good, np.nan_to_num(cw.to_numpy(float)), **kw)
        delta = np.zeros(len(sub))
        delta[inside] = corr[ob[inside], col[inside]]
        out.loc[out.index[sel], "mag"] = sub["mag"].to_numpy(float) - delta
        has = np.isfinite(mag)
        rms_sq.loc[ids] += np.where(has, corr**2, 0.0).sum(1)
        n_pts.loc[ids] += has.sum(1)
        n_comp.loc[ids] = np.maximum(n_comp.loc[ids].to_numpy(), cw.shape[0])
    label = pd.Series(np.where(n_comp > 0, "sysrem:" + n_comp.astype(str), "none"), index=oids)
    per_object = pd.DataFrame({"detrend_rms": np.sqrt(rms_sq / n_pts.clip(lower=1)), "detrended": n_comp > 0,
                               "detrend": label})
    per_object.index.name = "object_id"
    return out, per_object

"""Batched periodograms: box least squares (BLS) and generalised Lomb-Scargle (LS).

The light curves of a field share its epochs, so both periodograms are computed for a
batch of curves at once with matrix products (torch; on the GPU when the tensors are
there). astropy's :class:`~astropy.timeseries.BoxLeastSquares` and
:class:`~astropy.timeseries.LombScargle` are the references (:func:`astropy_bls`,
:func:`astropy_ls`; ``tests/test_lightcurves.py`` checks the best periods against them,
``benchmarks/classify.py`` times both).

The period grid (:func:`search_grid`)
-------------------------------------
With baseline ``T`` (days) and cadence ``dt`` (the median interval). The numbers are for
the default survey of ``make run`` (1000 back-to-back epochs of 300 s, ``T`` = 3.47 d) with
the defaults of :class:`survey_proc.config.ClassifySettings`:

- periods from ``period_min_days`` (default 0.25 d: 72 epochs of 300 s per cycle)
  to ``period_max_days`` (default ``T / 1.15``: 3.02 d). That covers the simulated
  pulsator and transit periods (1.45-2.95 d; they show one or two events) and the
  eclipsing binaries below 3.02 d (theirs reach 10 d). Longer periods are not searched:
  they would be a single event, not a measured period. astropy's ``autoperiod`` would
  stop at ``T / (min_n_transit - 1)`` = 1.73 d.
- **BLS**: the phase is cut into ``n_bins`` (64) bins; boxes are :data:`BLS_WIDTHS_BINS`
  (2, 3, 4, 5, 7 or 10 bins) wide (durations from 3.1 % to 15.6 % of the period), and at
  least ``duration_min_days`` (2 cadences, 600 s) long. Frequencies are spaced
  ``df = q_min / (oversample T)`` with ``q_min`` the narrowest box (2/64 = 0.031 in phase)
  and ``oversample = 1``: a frequency error of half a step moves an event by at most half
  the narrowest box over the whole baseline. 408 frequencies for the default survey.
- **LS**: frequencies spaced ``1 / (ls_oversample T)`` (``ls_oversample = 10``; 128
  frequencies for the default survey) over the same period range, then each curve's peak
  is refined by a parabola through the grid maximum and its two neighbours.

BLS statistic
-------------
With weights ``w`` (inverse variances), the weighted mean removed from ``y`` and, in a box,
``r = sum w`` and ``s = sum w y``: ``delta chi^2 = s^2 W / (r (W - r))`` (``W`` the total
weight), the chi^2 improvement of a box model over a constant (Kovacs et al. 2002; astropy's
``objective="likelihood"`` power is half of it). Only dimming boxes (``s < 0``) with at
least ``min_points_in_box`` kept points count. ``depth = -s W / (r (W - r))`` in relative flux,
``depth_err = sqrt(1/r + 1/(W - r))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLS_WIDTHS_BINS = (2, 3, 4, 5, 7, 10)


@dataclass(frozen=True)
class SearchGrid:
    """Frequencies (1/day) and box widths of one search (see the module docstring)."""

    bls_freq: np.ndarray
    ls_freq: np.ndarray
    n_bins: int
    widths_bins: tuple[int, ...]
    duration_min_days: float
    period_min_days: float
    period_max_days: float
    baseline_days: float
    cadence_days: float


def search_grid(t_days: np.ndarray, *, period_min_days: float = 0.25, period_max_days: float | None = None,
                n_bins: int = 64, widths_bins: tuple[int, ...] = BLS_WIDTHS_BINS, oversample: float = 1.0,
                ls_oversample: float = 10.0, duration_min_cadences: float = 2.0) -> SearchGrid:
    """The period grid for epochs ``t_days`` (days).

    Parameters
    ----------
    t_days
        Epoch times (days), increasing.
    period_min_days, period_max_days
        Period range (days); ``period_max_days`` None means ``baseline / 1.15``.
    n_bins
        BLS phase bins.
    widths_bins
        BLS box widths (phase bins).
    oversample
        BLS frequency oversampling (see the module docstring).
    ls_oversample
        LS frequency oversampling: ``df = 1 / (ls_oversample x baseline)``.
    duration_min_cadences
        Shortest box (in cadences).

    Returns
    -------
    SearchGrid
        BLS and LS frequencies (1/day), bins, widths and the period range (days).

    Raises
    ------
    ValueError
        With fewer than 3 epochs or an empty period range.
    """
    t = np.asarray(t_days, float)
    if len(t) < 3:
        raise ValueError(f"search_grid: need at least 3 epochs, got {len(t)}")
    baseline = float(t[-1] - t[0])
    cadence = float(np.median(np.diff(t)))
    p_max = period_max_days if period_max_days is not None else baseline / 1.15
    if not 0 < period_min_days < p_max:
        raise ValueError(f"search_grid: period range [{period_min_days}, {p_max}] d is empty "
                         f"(baseline {baseline:.3f} d)")
    q_min = min(widths_bins) / n_bins
    df = q_min / (oversample * baseline)
    f_lo, f_hi = 1.0 / p_max, 1.0 / period_min_days
    bls_freq = np.arange(f_lo, f_hi + df / 2, df)
    dfl = 1.0 / (ls_oversample * baseline)
    ls_freq = np.arange(f_lo, f_hi + dfl / 2, dfl)
    return SearchGrid(bls_freq, ls_freq, n_bins, tuple(sorted(widths_bins)), duration_min_cadences * cadence,
                      period_min_days, p_max, baseline, cadence)


@dataclass
class BLSResult:
    """Best box per curve (arrays of shape (n,)) and the power spectrum (n, n_freq)."""

    period_days: np.ndarray
    power: np.ndarray  # delta chi^2 of the best box
    sde: np.ndarray  # (peak - median) / NMAD of the spectrum
    depth: np.ndarray  # relative flux
    depth_err: np.ndarray
    duration_days: np.ndarray
    t0_days: np.ndarray  # mid-event time, days after the first epoch
    n_in: np.ndarray  # points in the box
    spectrum: np.ndarray | None = None


@dataclass
class LSResult:
    """Best Lomb-Scargle frequency per curve and the spectrum (n, n_freq)."""

    period_days: np.ndarray
    power: np.ndarray  # standard normalisation, 0..1
    amplitude: np.ndarray  # semi-amplitude of the best sinusoid (relative flux)
    t_min_days: np.ndarray  # time of minimum light of the best sinusoid, days after the first epoch
    spectrum: np.ndarray | None = None


def _device_of(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _fold_matrix(t: np.ndarray, freq: np.ndarray, n_bins: int, device: torch.device) -> torch.Tensor:
    """Sparse (n_freq * n_bins, n_t) one-hot matrix: epoch i falls in phase bin k at frequency f."""
    phase = np.mod(np.outer(freq, t), 1.0)
    k = np.minimum((phase * n_bins).astype(np.int64), n_bins - 1)
    rows = (np.arange(len(freq))[:, None] * n_bins + k).ravel()
    cols = np.broadcast_to(np.arange(len(t)), k.shape).ravel()
    idx = torch.from_numpy(np.vstack([rows, cols]))
    val = torch.ones(len(rows), dtype=torch.float32)
    import warnings

    with warnings.catch_warnings():  # torch's notes that sparse CSR is "beta"
        warnings.simplefilter("ignore", UserWarning)
        m = torch.sparse_coo_tensor(idx, val, (len(freq) * n_bins, len(t)), check_invariants=False).coalesce()
        return m.to_sparse_csr().to(device)


class BatchedBLS:
    """BLS of many light curves on one epoch grid; the folding matrix is built once.

    Parameters
    ----------
    t_days
        Epoch times (days).
    grid
        The search grid (:func:`search_grid`).
    device
        torch device ("cpu", "cuda", ...).
    min_points_in_box
        Boxes with fewer kept points are ignored.
    """

    def __init__(self, t_days: np.ndarray, grid: SearchGrid, device: str | torch.device | None = None,
                 min_points_in_box: int = 3):
        self.t = np.asarray(t_days, float)
        self.grid = grid
        self.device = _device_of(device)
        self.min_points = min_points_in_box
        self.fold = _fold_matrix(self.t, grid.bls_freq, grid.n_bins, self.device)
        period = 1.0 / grid.bls_freq
        # usable widths per frequency: at least the shortest duration
        w = np.asarray(grid.widths_bins, float)
        self.width_ok = torch.from_numpy((w[None, :] / grid.n_bins * period[:, None]) >= grid.duration_min_days
                                         ).to(self.device)  # (F, K)

    @torch.no_grad()
    def __call__(self, y: np.ndarray, w: np.ndarray, keep_spectrum: bool = False, batch: int = 16) -> BLSResult:
        """BLS of curves ``y`` (n, n_t) with weights ``w`` (n, n_t; 0 = no point)."""
        parts = [self._run(y[i:i + batch], w[i:i + batch], keep_spectrum) for i in range(0, len(y), batch)]
        if not parts:
            empty = np.zeros(0)
            return BLSResult(*(empty,) * 8, spectrum=np.zeros((0, len(self.grid.bls_freq))) if keep_spectrum else None)
        out = {k: np.concatenate([getattr(p, k) for p in parts]) for k in
               ("period_days", "power", "sde", "depth", "depth_err", "duration_days", "t0_days", "n_in")}
        spec = np.concatenate([p.spectrum for p in parts]) if keep_spectrum else None
        return BLSResult(**out, spectrum=spec)

    def _run(self, y: np.ndarray, w: np.ndarray, keep_spectrum: bool) -> BLSResult:
        dev = self.device
        g = self.grid
        nf, nb = len(g.bls_freq), g.n_bins
        yt = torch.as_tensor(np.asarray(y, np.float32), device=dev)
        wt = torch.as_tensor(np.asarray(w, np.float32), device=dev)
        n = yt.shape[0]
        wsum = wt.sum(1).clamp_min(1e-30)
        ym = (wt * yt).sum(1) / wsum
        yc = (yt - ym[:, None]) * (wt > 0)
        rhs = torch.cat([wt, wt * yc, (wt > 0).to(torch.float32)], 0).T.contiguous()  # (n_t, 3n)
        sums = (self.fold @ rhs).reshape(nf, nb, 3, n).permute(2, 0, 1, 3)  # (3, F, nb, n)
        kmax = max(g.widths_bins)
        cum = torch.zeros((3, nf, nb + kmax + 1, n), device=dev)
        torch.cumsum(torch.cat([sums, sums[:, :, :kmax]], 2), 2, out=cum[:, :, 1:])
        cum_r, cum_s, cum_c = cum[0], cum[1], cum[2]
        best = torch.full((nf, n), -1.0, device=dev)
        best_k = torch.zeros((nf, n), dtype=torch.int64, device=dev)
        best_j = torch.zeros((nf, n), dtype=torch.int64, device=dev)
        W = wsum[None, None, :]
        all_ok = self.width_ok.all(0)
        for ki, k in enumerate(g.widths_bins):
            r = cum_r[:, k:k + nb] - cum_r[:, :nb]  # (F, nb, n)
            s = (cum_s[:, k:k + nb] - cum_s[:, :nb]).clamp_(max=0.0)  # dimming boxes only
            den = (W - r).mul_(r).clamp_(min=1e-30)
            p = s.mul_(s).div_(den).mul_((cum_c[:, k:k + nb] - cum_c[:, :nb]) >= self.min_points - 0.5)
            if not bool(all_ok[ki]):
                p.mul_(self.width_ok[:, ki, None, None])
            pm, pj = p.max(1)  # over start bins: (F, n)
            better = pm > best
            best = torch.where(better, pm, best)
            best_k = torch.where(better, k, best_k)
            best_j = torch.where(better, pj, best_j)
        spec = best.clamp_min(0.0) * W[0]  # delta chi^2 per frequency, (F, n)
        fi = spec.argmax(0)  # (n,)
        cols = torch.arange(n, device=dev)
        peak = spec[fi, cols]
        med = spec.median(0).values
        mad = (spec - med).abs().median(0).values * 1.4826
        sde = (peak - med) / mad.clamp_min(1e-30)
        kw = best_k[fi, cols]  # the winning box: width and start bin per curve
        j = best_j[fi, cols]
        sel = cum[:2, fi, :, cols]  # (n, 2, nb + kmax + 1)
        box = sel[cols, :, j + kw] - sel[cols, :, j]  # (n, 2)
        r, s = box[:, 0], box[:, 1]
        depth = -s * wsum / (r * (wsum - r)).clamp_min(1e-30)
        depth_err = torch.sqrt(1.0 / r.clamp_min(1e-30) + 1.0 / (wsum - r).clamp_min(1e-30))
        freq = torch.as_tensor(g.bls_freq, device=dev)[fi]
        period = 1.0 / freq
        duration = kw.to(torch.float64) / nb * period
        t0 = (j.to(torch.float64) + kw.to(torch.float64) / 2.0) / nb * period
        # points in the winning box
        tt = torch.as_tensor(self.t, device=dev)
        ph = torch.remainder(tt[None, :] - t0[:, None] + 0.5 * period[:, None], period[:, None]) \
            - 0.5 * period[:, None]
        n_in = ((ph.abs() < 0.5 * duration[:, None]) & (wt > 0)).sum(1)
        return BLSResult(period.cpu().numpy(), peak.double().cpu().numpy(), sde.double().cpu().numpy(),
                         depth.double().cpu().numpy(), depth_err.double().cpu().numpy(), duration.cpu().numpy(),
                         t0.cpu().numpy(), n_in.cpu().numpy(),
                         spectrum=spec.T.double().cpu().numpy() if keep_spectrum else None)


class BatchedLS:
    """Generalised (floating-mean, weighted) Lomb-Scargle of many curves on one epoch grid.

    The power is astropy's ``normalization="standard"`` with ``fit_mean=True``:
    ``(chi2_const - chi2_sinusoid) / chi2_const``.
    """

    def __init__(self, t_days: np.ndarray, grid: SearchGrid, device: str | torch.device | None = None):
        self.t = np.asarray(t_days, float)
        self.grid = grid
        self.device = _device_of(device)
        arg = 2 * np.pi * np.outer(self.t, grid.ls_freq)  # (n_t, F)
        trig = np.concatenate([np.cos(arg), np.sin(arg), np.cos(2 * arg), np.sin(2 * arg)], 1)
        self.trig = torch.as_tensor(trig, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def __call__(self, y: np.ndarray, w: np.ndarray, keep_spectrum: bool = False, batch: int = 512) -> LSResult:
        """LS of curves ``y`` (n, n_t) with weights ``w`` (n, n_t; 0 = no point)."""
        parts = [self._run(y[i:i + batch], w[i:i + batch], keep_spectrum) for i in range(0, len(y), batch)]
        if not parts:
            e = np.zeros(0)
            return LSResult(e, e, e, e, spectrum=np.zeros((0, len(self.grid.ls_freq))) if keep_spectrum else None)
        out = {k: np.concatenate([getattr(p, k) for p in parts])
               for k in ("period_days", "power", "amplitude", "t_min_days")}
        return LSResult(**out, spectrum=np.concatenate([p.spectrum for p in parts]) if keep_spectrum else None)

    def _moments(self, yt: torch.Tensor, wt: torch.Tensor, trig: torch.Tensor, nf: int):
        wn = wt / wt.sum(1, keepdim=True).clamp_min(1e-300)
        Y = (wn * yt).sum(1, keepdim=True)
        yc = yt - Y
        a = wn @ trig  # (n, 4F)
        b = (wn * yc) @ trig[:, :2 * nf]
        C, S, C2, S2 = a[:, :nf], a[:, nf:2 * nf], a[:, 2 * nf:3 * nf], a[:, 3 * nf:]
        YC, YS = b[:, :nf], b[:, nf:]
        YY = (wn * yc * yc).sum(1, keepdim=True)
        CC = 0.5 * (1 + C2) - C * C
        SS = 0.5 * (1 - C2) - S * S
        CS = 0.5 * S2 - C * S
        D = (CC * SS - CS * CS).clamp_min(1e-300)
        power = (SS * YC * YC + CC * YS * YS - 2 * CS * YC * YS) / (YY * D).clamp_min(1e-300)
        # best-fit sinusoid coefficients: y - Y = a (cos - C) + b (sin - S)
        ca = (YC * SS - YS * CS) / D
        cb = (YS * CC - YC * CS) / D
        return power, ca, cb

    def _run(self, y: np.ndarray, w: np.ndarray, keep_spectrum: bool) -> LSResult:
        dev = self.device
        nf = len(self.grid.ls_freq)
        yt = torch.as_tensor(np.asarray(y, np.float64), device=dev)
        wt = torch.as_tensor(np.asarray(w, np.float64), device=dev)
        power, _, _ = self._moments(yt, wt, self.trig, nf)
        i = power.argmax(1)
        rows = torch.arange(len(i), device=dev)
        f = torch.as_tensor(self.grid.ls_freq, device=dev)
        df = float(self.grid.ls_freq[1] - self.grid.ls_freq[0]) if nf > 1 else 0.0
        # parabolic refinement through the three highest grid points
        il, ir = (i - 1).clamp(0, nf - 1), (i + 1).clamp(0, nf - 1)
        pl, pc, pr = power[rows, il], power[rows, i], power[rows, ir]
        den = pl - 2 * pc + pr
        shift = torch.where((i > 0) & (i < nf - 1) & (den < 0), 0.5 * (pl - pr) / den, torch.zeros_like(pc))
        fbest = f[i] + shift.clamp(-0.5, 0.5) * df
        # power and sinusoid at the refined frequency (each curve its own frequency)
        arg = 2 * np.pi * fbest[:, None] * torch.as_tensor(self.t, device=dev)[None, :]  # (n, n_t)
        wn = wt / wt.sum(1, keepdim=True).clamp_min(1e-300)
        yc = yt - (wn * yt).sum(1, keepdim=True)
        cos, sin = torch.cos(arg), torch.sin(arg)
        C, S = (wn * cos).sum(1), (wn * sin).sum(1)
        YC, YS = (wn * yc * cos).sum(1), (wn * yc * sin).sum(1)
        CC = (wn * cos * cos).sum(1) - C * C
        SS = (wn * sin * sin).sum(1) - S * S
        CS = (wn * cos * sin).sum(1) - C * S
        YY = (wn * yc * yc).sum(1)
        D = (CC * SS - CS * CS).clamp_min(1e-300)
        pw = (SS * YC * YC + CC * YS * YS - 2 * CS * YC * YS) / (YY * D).clamp_min(1e-300)
        ca = (YC * SS - YS * CS) / D
        cb = (YS * CC - YC * CS) / D
        amp = torch.sqrt(ca * ca + cb * cb)
        # minimum of a cos(x) + b sin(x) at x = atan2(b, a) + pi
        x_min = torch.atan2(cb, ca) + np.pi
        t_min = torch.remainder(x_min / (2 * np.pi * fbest), 1.0 / fbest)
        return LSResult((1.0 / fbest).cpu().numpy(), pw.cpu().numpy(), amp.cpu().numpy(), t_min.cpu().numpy(),
                        spectrum=power.cpu().numpy() if keep_spectrum else None)


def astropy_bls(t_days: np.ndarray, y: np.ndarray, w: np.ndarray, grid: SearchGrid,
                durations_days: np.ndarray | None = None) -> tuple[float, float, float]:
    """Reference: astropy BLS of one curve over the grid's periods; returns (period, duration, depth).

    The period range is passed explicitly (``autoperiod`` would cap it at ``T / (n - 1)``).

    Parameters
    ----------
    t_days
        Epoch times (days).
    y, w
        Relative flux and weights (inverse variances; 0 = no point) of one curve.
    grid
        The search grid (its BLS frequencies are searched).
    durations_days
        Box durations (days); None: the grid's widths at the middle of the period range,
        clipped to ``[duration_min_days, 0.99 period_min_days]``.

    Returns
    -------
    period, duration, depth
        Days, days and relative flux.
    """
    from astropy.timeseries import BoxLeastSquares

    keep = w > 0
    dy = 1.0 / np.sqrt(w[keep])
    if durations_days is None:
        durations_days = np.unique(np.clip(np.array(grid.widths_bins) / grid.n_bins * 0.5 * (
            grid.period_min_days + grid.period_max_days), grid.duration_min_days, 0.99 * grid.period_min_days))
    bls = BoxLeastSquares(t_days[keep], y[keep], dy)
    res = bls.power(1.0 / grid.bls_freq[::-1], durations_days, objective="likelihood")
    i = int(np.argmax(res.power))
    return float(res.period[i]), float(res.duration[i]), float(res.depth[i])


def astropy_ls(t_days: np.ndarray, y: np.ndarray, w: np.ndarray, grid: SearchGrid) -> tuple[float, np.ndarray]:
    """Reference: astropy LS (floating mean, standard normalisation); returns (best period, power on the grid).

    Parameters
    ----------
    t_days
        Epoch times (days).
    y, w
        Relative flux and weights (inverse variances; 0 = no point) of one curve.
    grid
        The search grid (its LS frequencies are evaluated).

    Returns
    -------
    period, power
        Best period (days) and the power at every grid frequency.
    """
    from astropy.timeseries import LombScargle

    keep = w > 0
    ls = LombScargle(t_days[keep], y[keep], 1.0 / np.sqrt(w[keep]), fit_mean=True, center_data=True)
    p = ls.power(grid.ls_freq, normalization="standard")
    return float(1.0 / grid.ls_freq[int(np.argmax(p))]), p

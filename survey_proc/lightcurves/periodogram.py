"""Batched periodograms: box least squares (BLS) and generalised Lomb-Scargle (LS).

The light curves of a field share its epochs, so both periodograms are computed for a
batch of curves at once with matrix products (torch; on the GPU when the tensors are
there). astropy's :class:`~astropy.timeseries.BoxLeastSquares` and
:class:`~astropy.timeseries.LombScargle` are the references (:func:`astropy_bls`,
:func:`astropy_ls`; ``tests/test_lightcurves.py`` checks the best periods against them,
``benchmarks/classify.py`` times both).

The period grid (:func:`search_grid`)
-------------------------------------
With baseline ``T`` (days), the positive intervals ``dt`` between epochs, and the defaults
of :class:`survey_proc.config.ClassifySettings`. The rule (issue 22: "no period longer than
the data can show, resolution set by the baseline"):

- **Shortest period** ``P_min = max(period_min_days, nyquist_factor x dt)`` (0.03 d; 2) with
  ``dt`` the interval of a *regular* sampling (:func:`sampling_interval`; 0 for an irregular
  one). Regular sampling at ``dt`` cannot show periods below ``2 dt``; irregular sampling
  can (EROS: nightly, at hours that vary, shows RR Lyrae of 0.55 d). 0.03 d for the default
  survey (300 s: ``2 dt`` = 0.007 d) and for EROS-like nightly sampling.
- **Longest period**: a period needs two events, and no period longer than the baseline is
  searched: both searches stop at ``T / max_period_baseline_ratio`` (1.15: 3.02 d for the
  default survey). Between ``T / 2`` and ``T / 1.15`` two events are in the data only for some
  phases, so the grid keeps those periods and the *result* is checked instead: a box
  (eclipse, transit) period is reported only when kept points of at least two distinct
  events show the dip (``classifier.count_events``); otherwise the period is NaN and the class
  ``single_event``. ``period_max_days`` > 0 lowers the limit, never raises it.
- **BLS** periods start at ``max(P_min, bls_period_min_days)`` (0.25 d, as before issue 22:
  the shipped classifier was trained on it; contact binaries reach 0.22 d and ultra-short-period
  planets less, a known gap; below it the variables are mostly pulsators, which the
  Lomb-Scargle search finds). The phase is cut into ``n_bins`` (64) bins; boxes are
  :data:`BLS_WIDTHS_BINS` (2-10 bins) wide, and at least ``duration_min_days`` long:
  ``min(duration_min_cadences x median(dt), 0.2 x BLS P_min)`` (600 s for the default
  survey; 0.05 d for sparse sampling, where a box is limited by ``min_points_in_box``
  instead). The frequency step is ``q(f) / (oversample T)``, with ``q(f)`` the narrowest
  box allowed at ``f`` (in phase): a frequency error of half a step moves an event by at most
  half that box over the whole baseline. Above ``f = q_min / duration_min`` the step grows
  with ``f`` (the boxes are wider there).
- **Bounded cost**: when the grid would hold more than ``bls_max_freq`` frequencies (20,000)
  or more than ``bls_max_work`` frequency x epoch pairs (5e8), ``oversample`` is lowered
  until it fits (``SearchGrid.bls_oversample`` < 1 records it); the box search then costs
  at most ``bls_max_work`` folds, and runs in chunks of frequencies (memory bounded by
  :data:`BLS_CHUNK_NNZ`). The best peak is refined afterwards (``classifier.refine_bls``).
- **LS**: frequencies spaced ``1 / (ls_oversample T)`` (``ls_oversample = 10``) over
  ``[1.15 / T, 1 / P_min]``, then each curve's peak is refined by a
  parabola through the grid maximum and its two neighbours. Grids of more than
  :data:`LS_DENSE_MAX` frequency x epoch pairs (a multi-year survey: 10^5-10^6 frequencies)
  are computed per curve with nifty-ls (Garrison et al. 2024, a NUFFT Lomb-Scargle,
  O(N + F log F)), or chunked over frequencies when nifty-ls is not installed.

Numbers for the default survey of ``make run`` (1000 epochs of 300 s, ``T`` = 3.47 d):
BLS 0.25-3.02 d in 438 frequencies, LS 0.03-3.02 d in 1,150.

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
#: most nonzeros of one chunk of the BLS folding matrix (frequencies x epochs): ~100 MB of work arrays
BLS_CHUNK_NNZ = 4_000_000
#: largest frequency x epoch product computed as one dense Lomb-Scargle matrix product (128 MB of float64 trig)
LS_DENSE_MAX = 4_000_000


@dataclass(frozen=True)
class SearchGrid:
    """Frequencies (1/day) and box widths of one search (see the module docstring).

    ``period_min_days`` / ``period_max_days`` are the BLS range; ``ls_period_min_days`` /
    ``ls_period_max_days`` the Lomb-Scargle range (days).
    """

    bls_freq: np.ndarray
    ls_freq: np.ndarray
    n_bins: int
    widths_bins: tuple[int, ...]
    duration_min_days: float
    period_min_days: float
    period_max_days: float
    baseline_days: float
    cadence_days: float
    ls_period_min_days: float = float("nan")
    ls_period_max_days: float = float("nan")
    bls_oversample: float = 1.0


def _bls_frequencies(f_lo: float, f_hi: float, baseline: float, n_bins: int, widths: tuple[int, ...],
                     duration_min: float, oversample: float) -> np.ndarray:
    """BLS frequencies (1/day) from ``f_lo`` to ``f_hi`` with the step ``q(f) / (oversample T)`` (module docstring)."""
    parts = []
    f0 = f_lo
    ws = sorted(widths)
    for i, k in enumerate(ws):
        # width k (in bins) is the narrowest allowed up to f = k / (n_bins duration_min)
        f_end = min(f_hi, k / (n_bins * duration_min)) if duration_min > 0 and i < len(ws) - 1 else f_hi
        if f_end <= f0:
            continue
        step = k / n_bins / (oversample * baseline)
        parts.append(np.arange(f0, f_end, step))
        f0 = f_end
        if f0 >= f_hi:
            break
    f = np.concatenate(parts) if parts else np.zeros(0)
    if len(f) == 0 or f[-1] < f_hi:
        f = np.append(f, f_hi)
    return f


def sampling_interval(t_days: np.ndarray, regularity: float = 0.95) -> float:
    """The interval (days) of a regular sampling, or 0 for an irregular one (no Nyquist limit).

    The interval is the 1st percentile of the positive intervals between epochs, ``dt1``. The
    sampling is regular when the epochs keep phase with it: ``|mean(exp(2 pi i t / dt1))|
    > regularity`` (0.95: timing jitter below ~5 % of ``dt1``). Nightly ground-based
    sampling (EROS: ~1 d apart, at hours that vary by a few hours) is irregular: periods
    below 2 d are seen through the jitter (RR Lyrae at 0.55 d), with aliases at +-1/d.

    Parameters
    ----------
    t_days
        Epoch times (days).
    regularity
        Threshold on the phase coherence (0..1).

    Returns
    -------
    float
        ``dt1`` (days) when regular, else 0.
    """
    t = np.asarray(t_days, float)
    dt = np.diff(np.sort(t))
    dt = dt[dt > 0]
    if not len(dt):
        return 0.0
    dt1 = float(np.percentile(dt, 1))
    coherence = abs(np.mean(np.exp(2j * np.pi * (t - t[0]) / dt1)))
    return dt1 if coherence > regularity else 0.0


def search_grid(t_days: np.ndarray, *, period_min_days: float = 0.03, period_max_days: float | None = None,
                bls_period_min_days: float = 0.25, n_bins: int = 64, widths_bins: tuple[int, ...] = BLS_WIDTHS_BINS,
                oversample: float = 1.0, ls_oversample: float = 10.0, duration_min_cadences: float = 2.0,
                max_period_baseline_ratio: float = 1.15, nyquist_factor: float = 2.0,
                bls_max_freq: int = 20_000, bls_max_work: float = 5e8) -> SearchGrid:
    """The period grid for epochs ``t_days`` (days); the rules are in the module docstring.

    Parameters
    ----------
    t_days
        Epoch times (days), increasing.
    period_min_days
        Shortest period searched (days), raised to ``nyquist_factor`` x the 1st percentile
        of the intervals between epochs.
    period_max_days
        None or 0: ``baseline / max_period_baseline_ratio``; a positive value (days) lowers it.
    bls_period_min_days
        Shortest BLS period (days).
    n_bins
        BLS phase bins.
    widths_bins
        BLS box widths (phase bins).
    oversample
        BLS frequency oversampling (lowered to meet ``bls_max_freq`` and ``bls_max_work``).
    ls_oversample
        LS frequency oversampling: ``df = 1 / (ls_oversample x baseline)``.
    duration_min_cadences
        Shortest box (in median intervals; at most 20 % of the shortest BLS period).
    max_period_baseline_ratio
        The longest period is ``baseline / max_period_baseline_ratio`` (> 1).
    nyquist_factor
        ``P_min >= nyquist_factor x`` the 1st percentile of the intervals (days).
    bls_max_freq, bls_max_work
        Caps on the BLS frequencies and on frequencies x epochs.

    Returns
    -------
    SearchGrid
        BLS and LS frequencies (1/day), bins, widths and the period ranges (days).

    Raises
    ------
    ValueError
        With fewer than 3 epochs, or a baseline too short for the shortest BLS period.
    """
    t = np.asarray(t_days, float)
    if len(t) < 3:
        raise ValueError(f"search_grid: need at least 3 epochs, got {len(t)}")
    baseline = float(t[-1] - t[0])
    dt = np.diff(t)
    dt = dt[dt > 0]
    cadence = float(np.median(dt)) if len(dt) else 0.0
    p_min = max(period_min_days, nyquist_factor * sampling_interval(t))
    cap = period_max_days if period_max_days else np.inf
    bls_max = ls_max = min(baseline / max_period_baseline_ratio, cap)
    bls_min = max(p_min, bls_period_min_days)
    if not 0 < bls_min < bls_max:
        raise ValueError(f"search_grid: period range [{bls_min:.4g}, {bls_max:.4g}] d is empty: a baseline of "
                         f"{baseline:.3f} d holds periods only up to {bls_max:.4g} d (lower bls_period_min_days, "
                         "or observe longer)")
    duration_min = min(duration_min_cadences * cadence, 0.2 * bls_min)
    f_lo, f_hi = 1.0 / bls_max, 1.0 / bls_min
    osamp = oversample
    bls_freq = _bls_frequencies(f_lo, f_hi, baseline, n_bins, tuple(widths_bins), duration_min, osamp)
    limit = min(float(bls_max_freq), bls_max_work / len(t))
    for _ in range(8):  # the count scales as 1 / oversample
        if len(bls_freq) <= limit:
            break
        osamp *= 0.98 * limit / len(bls_freq)
        bls_freq = _bls_frequencies(f_lo, f_hi, baseline, n_bins, tuple(widths_bins), duration_min, osamp)
    dfl = 1.0 / (ls_oversample * baseline)
    ls_freq = np.arange(1.0 / ls_max, 1.0 / p_min + dfl / 2, dfl)
    return SearchGrid(bls_freq, ls_freq, n_bins, tuple(sorted(widths_bins)), duration_min, bls_min, bls_max,
                      baseline, cadence, p_min, ls_max, osamp)


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


def _fold_bins(t: np.ndarray, freq: np.ndarray, n_bins: int) -> np.ndarray:
    """Phase bin (n_freq, n_t) of every epoch at every frequency (int64)."""
    phase = np.mod(np.outer(freq, t), 1.0)
    return np.minimum((phase * n_bins).astype(np.int64), n_bins - 1)


def _fold_matrix(t: np.ndarray, freq: np.ndarray, n_bins: int, device: torch.device) -> torch.Tensor:
    """Sparse CSR (n_freq * n_bins, n_t) one-hot matrix: epoch i falls in phase bin k at frequency f.

    Built as its transpose in CSR form (one entry per epoch and frequency, already sorted) and
    transposed by scipy (a counting sort, O(nnz)): no COO coalesce (a full sort, ~1 s for 2e6 entries).
    """
    import warnings

    import scipy.sparse as sp

    nf, nt = len(freq), len(t)
    cols = (np.arange(nf)[None, :] * n_bins + _fold_bins(t, freq, n_bins).T).ravel()
    mt = sp.csr_matrix((np.ones(nf * nt, np.float32), cols, np.arange(0, nf * nt + 1, nf)), shape=(nt, nf * n_bins))
    m = mt.T.tocsr()
    m.sort_indices()
    with warnings.catch_warnings():  # torch's notes that sparse CSR is "beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                       torch.from_numpy(m.indices.astype(np.int64)),
                                       torch.from_numpy(m.data.astype(np.float32)), size=m.shape).to(device)


def _fold_sums_scipy(t: np.ndarray, freq: np.ndarray, n_bins: int, rhs: np.ndarray) -> np.ndarray:
    """Per (frequency, bin) sums of ``rhs`` (n_t, m) rows: (n_freq * n_bins, m) float32.

    The transposed folding matrix is built directly in CSR form (one entry per epoch and
    frequency, column ``f * n_bins + bin``, already sorted): no sort, unlike a COO build.
    """
    import scipy.sparse as sp

    nf, nt = len(freq), len(t)
    cols = (np.arange(nf)[None, :] * n_bins + _fold_bins(t, freq, n_bins).T).ravel()  # (n_t, F) row-major
    mt = sp.csr_matrix((np.ones(nf * nt, np.float32), cols, np.arange(0, nf * nt + 1, nf)), shape=(nt, nf * n_bins))
    return np.asarray(mt.T @ rhs, dtype=np.float32)


class BatchedBLS:
    """BLS of many light curves on one epoch grid; the folding matrix is built once when it is small.

    Grids whose folding matrix would exceed :data:`BLS_CHUNK_NNZ` entries are searched in
    chunks of frequencies (the matrix of each chunk built on the fly), so the memory is
    bounded whatever the grid.

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
        nf = len(grid.bls_freq)
        self.chunk = max(1, min(nf, BLS_CHUNK_NNZ // max(len(self.t), 1)))
        self.fold = _fold_matrix(self.t, grid.bls_freq, grid.n_bins, self.device) if self.chunk >= nf else None
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

    def _boxes(self, sums: torch.Tensor, sl: slice, wsum: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best box power, width and start bin per (frequency, curve) of one chunk: each (Fc, n)."""
        dev = self.device
        g = self.grid
        nb = g.n_bins
        nfc, n = sums.shape[1], sums.shape[3]
        kmax = max(g.widths_bins)
        cum = torch.zeros((3, nfc, nb + kmax + 1, n), device=dev)
        torch.cumsum(torch.cat([sums, sums[:, :, :kmax]], 2), 2, out=cum[:, :, 1:])
        cum_r, cum_s, cum_c = cum[0], cum[1], cum[2]
        best = torch.full((nfc, n), -1.0, device=dev)
        best_k = torch.zeros((nfc, n), dtype=torch.int64, device=dev)
        best_j = torch.zeros((nfc, n), dtype=torch.int64, device=dev)
        W = wsum[None, None, :]
        width_ok = self.width_ok[sl]
        all_ok = width_ok.all(0)
        for ki, k in enumerate(g.widths_bins):
            if not bool(width_ok[:, ki].any()):
                continue
            r = cum_r[:, k:k + nb] - cum_r[:, :nb]  # (Fc, nb, n)
            s = (cum_s[:, k:k + nb] - cum_s[:, :nb]).clamp_(max=0.0)  # dimming boxes only
            den = (W - r).mul_(r).clamp_(min=1e-30)
            p = s.mul_(s).div_(den).mul_((cum_c[:, k:k + nb] - cum_c[:, :nb]) >= self.min_points - 0.5)
            if not bool(all_ok[ki]):
                p.mul_(width_ok[:, ki, None, None])
            pm, pj = p.max(1)  # over start bins: (Fc, n)
            better = pm > best
            best = torch.where(better, pm, best)
            best_k = torch.where(better, k, best_k)
            best_j = torch.where(better, pj, best_j)
        return best, best_k, best_j

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
        best = torch.empty((nf, n), device=dev)
        best_k = torch.empty((nf, n), dtype=torch.int64, device=dev)
        best_j = torch.empty((nf, n), dtype=torch.int64, device=dev)
        rhs_np = rhs.cpu().numpy() if self.fold is None else None
        # chunks bounded by the fold's entries and by the box arrays (3 x chunk x (bins + widths) x n floats)
        chunk = nf if self.fold is not None else max(1, min(self.chunk, BLS_CHUNK_NNZ // (
            (nb + max(g.widths_bins) + 1) * 3 * n)))
        for c0 in range(0, nf, chunk):
            sl = slice(c0, min(nf, c0 + chunk))
            if self.fold is not None:
                flat = self.fold @ rhs
            else:
                assert rhs_np is not None
                flat = torch.as_tensor(_fold_sums_scipy(self.t, g.bls_freq[sl], nb, rhs_np), device=dev)
            sums = flat.reshape(-1, nb, 3, n).permute(2, 0, 1, 3)  # (3, Fc, nb, n)
            best[sl], best_k[sl], best_j[sl] = self._boxes(sums, sl, wsum)
        spec = best.clamp_min(0.0) * wsum[None, :]  # delta chi^2 per frequency, (F, n)
        fi = spec.argmax(0)  # (n,)
        cols = torch.arange(n, device=dev)
        peak = spec[fi, cols]
        med = spec.median(0).values
        mad = (spec - med).abs().median(0).values * 1.4826
        sde = (peak - med) / mad.clamp_min(1e-30)
        kw = best_k[fi, cols].cpu().numpy()  # the winning box: width and start bin per curve
        j = best_j[fi, cols].cpu().numpy()
        freq = g.bls_freq[fi.cpu().numpy()]
        # the winning box's sums, from the points in its phase bins (the same bins as the fold)
        k = _fold_bins(self.t, freq, nb)  # (n, n_t)
        inbox = np.mod(k - j[:, None], nb) < kw[:, None]
        wn = np.asarray(w, np.float64)
        ycn = yc.double().cpu().numpy()
        r = np.where(inbox, wn, 0.0).sum(1)
        s = np.where(inbox, wn * ycn, 0.0).sum(1)
        W = wsum.double().cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = -s * W / np.maximum(r * (W - r), 1e-30)
            depth_err = np.sqrt(1.0 / np.maximum(r, 1e-30) + 1.0 / np.maximum(W - r, 1e-30))
        period = 1.0 / freq
        duration = kw / nb * period
        t0 = (j + kw / 2.0) / nb * period
        n_in = (inbox & (wn > 0)).sum(1)
        return BLSResult(period, peak.double().cpu().numpy(), sde.double().cpu().numpy(), depth, depth_err,
                         duration, t0, n_in, spectrum=spec.T.double().cpu().numpy() if keep_spectrum else None)


class BatchedLS:
    """Generalised (floating-mean, weighted) Lomb-Scargle of many curves on one epoch grid.

    The power is astropy's ``normalization="standard"`` with ``fit_mean=True``:
    ``(chi2_const - chi2_sinusoid) / chi2_const``. Grids up to :data:`LS_DENSE_MAX`
    frequency x epoch pairs are one dense matrix product for a batch of curves; larger ones
    are computed per curve with nifty-ls (or in chunks of frequencies without it).
    """

    def __init__(self, t_days: np.ndarray, grid: SearchGrid, device: str | torch.device | None = None):
        self.t = np.asarray(t_days, float)
        self.grid = grid
        self.device = _device_of(device)
        self.dense = len(self.t) * len(grid.ls_freq) <= LS_DENSE_MAX
        self.trig = self._trig(grid.ls_freq) if self.dense else None

    def _trig(self, freq: np.ndarray) -> torch.Tensor:
        arg = 2 * np.pi * np.outer(self.t, freq)  # (n_t, F)
        trig = np.concatenate([np.cos(arg), np.sin(arg), np.cos(2 * arg), np.sin(2 * arg)], 1)
        return torch.as_tensor(trig, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def __call__(self, y: np.ndarray, w: np.ndarray, keep_spectrum: bool = False, batch: int = 512) -> LSResult:
        """LS of curves ``y`` (n, n_t) with weights ``w`` (n, n_t; 0 = no point)."""
        if not self.dense:
            batch = 1
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

    def _power(self, yt: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        """The power spectrum (n, F) of the rows of ``yt`` (one row unless the grid is dense)."""
        f = self.grid.ls_freq
        nf = len(f)
        if self.trig is not None:
            return self._moments(yt, wt, self.trig, nf)[0]
        keep = (wt[0] > 0).cpu().numpy()
        t, yy, ww = self.t[keep], yt[0].cpu().numpy()[keep], wt[0].cpu().numpy()[keep]
        if keep.sum() < 3:
            return torch.zeros((1, nf), dtype=torch.float64, device=self.device)
        try:
            import nifty_ls  # type: ignore[import-untyped]
        except ImportError:  # chunks of frequencies, dense within each
            chunk = max(1, LS_DENSE_MAX // max(len(t), 1))
            out = []
            y1 = torch.as_tensor(yy[None], device=self.device)
            w1 = torch.as_tensor(ww[None], device=self.device)
            sub = BatchedLS.__new__(BatchedLS)
            sub.t = t
            sub.device = self.device
            for c0 in range(0, nf, chunk):
                fc = f[c0:c0 + chunk]
                out.append(sub._moments(y1, w1, sub._trig(fc), len(fc))[0])
            return torch.cat(out, 1)
        df = float(f[1] - f[0]) if nf > 1 else 1.0
        r = nifty_ls.lombscargle(t, yy, 1.0 / np.sqrt(ww), fmin=float(f[0]), fmax=float(f[0] + df * (nf - 1)), Nf=nf,
                                 center_data=True, fit_mean=True, normalization="standard", nthreads=1)
        return torch.as_tensor(np.nan_to_num(r.power, nan=0.0)[None, :], dtype=torch.float64, device=self.device)

    def _run(self, y: np.ndarray, w: np.ndarray, keep_spectrum: bool) -> LSResult:
        dev = self.device
        nf = len(self.grid.ls_freq)
        yt = torch.as_tensor(np.asarray(y, np.float64), device=dev)
        wt = torch.as_tensor(np.asarray(w, np.float64), device=dev)
        power = self._power(yt, wt)
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

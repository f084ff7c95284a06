"""BPNN photometry of a window's detections: stamps -> MC predictions -> magnitude columns.

The extraction (:mod:`survey_proc.catalog.extract`) hands over a :class:`Window`: the
background-subtracted pixels it measured and *every* detection it found there (halo ones
too, at their PSF-fit fluxes: they are the neighbours whose light the stamps must account
for), and says which of them it keeps. :func:`bpnn_photometry` cuts their stamps, runs the
network and returns the sources columns:

- ``mag_inst = m_s + mu`` (mag), with ``m_s = -2.5 log10 s`` the stamp's flux scale;
- ``mag_err_aleatoric``, ``mag_err_epistemic`` (PNet Eq. 15) and
  ``mag_inst_err = sqrt(aleatoric^2 + epistemic^2)``; when the model card holds a
  ``sigma_calibration`` (:mod:`~survey_proc.photometry.sigma_calibration`, fitted after
  training), the total is recalibrated and both parts are scaled by the same factor;
- ``flux = 10^(-0.4 mag_inst)`` and ``flux_err = flux * mag_inst_err / 1.0857`` (ADU), so
  that ``mag_inst = -2.5 log10 flux`` holds for every row, as the schema says;
- ``flux_fit``: the PSF-fit flux the stamp was scaled by (a diagnostic of the block
  table; the sources schema does not carry it).

Nothing here knows about tiles, Dask or the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from survey_proc.photometry.stamps import Stamps, cut_stamps
from survey_proc.vocab import MAG_PER_FLUX


@dataclass
class Window:
    """What an extraction measured in one window (window-frame pixels, ADU)."""

    data: np.ndarray  # background-subtracted
    bad: np.ndarray
    bkg_adu: np.ndarray  # the subtracted background map
    noise_adu: float
    gain_e_per_adu: float
    fwhm_px: float
    x: np.ndarray  # every detection of the window
    y: np.ndarray
    flux_fit: np.ndarray  # their PSF-fit fluxes


def block_seed(seed: int, epoch: int, origin_yx: tuple[int, int]) -> int:
    """A deterministic MC seed per (run seed, epoch, window): reruns give identical magnitudes.

    Parameters
    ----------
    seed
        The run's BPNN seed.
    epoch
        Index of the epoch.
    origin_yx
        Image-frame index of the window's first row and column (px).

    Returns
    -------
    int
        A non-negative seed below 2**63.
    """
    return int((int(seed) * 1_000_003 + int(epoch) * 7_919 + int(origin_yx[0]) * 104_729 + int(origin_yx[1]))
               % (2**63 - 1))


def window_stamps(win: Window, targets: np.ndarray, *, beta: float = 3.0, **kwargs) -> Stamps:
    """The stamps of ``win``'s detections ``targets``.

    :func:`~survey_proc.photometry.stamps.cut_stamps` cuts them; ``kwargs`` go to it
    (``profile``, ``binning``).

    Parameters
    ----------
    win
        The window and all its detections.
    targets
        Indices into ``win.x`` of the detections to cut stamps for.
    beta
        Moffat beta of the PSF model.

    Returns
    -------
    Stamps
        The network's inputs for ``targets``.
    """
    return cut_stamps(win.data, win.bad, win.bkg_adu, win.x, win.y, win.flux_fit, targets, win.fwhm_px, win.noise_adu,
                      win.gain_e_per_adu, beta=beta, **kwargs)


def bpnn_photometry(win: Window, targets: np.ndarray, bpnn, *, beta: float = 3.0, n_samples: int | None = None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Magnitudes and uncertainties of ``win``'s detections ``targets`` (see the module docstring).

    Parameters
    ----------
    win
        The window and all its detections.
    targets
        Indices into ``win.x`` of the detections to measure.
    bpnn
        A :class:`survey_proc.photometry.bpnn.LoadedBPNN`.
    beta
        Moffat beta of the PSF model used for the neighbours (as in the fit).
    n_samples, seed
        MC samples (default: the model card's) and their seed.

    Returns
    -------
    dict of arrays, one value per target: ``mag_inst``, ``mag_inst_err``,
    ``mag_err_aleatoric``, ``mag_err_epistemic`` (mag), ``flux``, ``flux_err``,
    ``flux_fit`` (ADU), ``stamp_masked`` (bool).
    """
    from survey_proc.photometry import bpnn as bp
    from survey_proc.photometry.sigma_calibration import SigmaCalibration

    st = window_stamps(win, targets, beta=beta)
    r = bp.predict(bpnn, st, n_samples=n_samples, seed=seed)
    mag = st.mag_scale + r.mu
    err = r.sigma
    cal = SigmaCalibration.from_card(getattr(bpnn, "card", {}) or {})
    factor = np.ones_like(err)
    if cal is not None:  # the card's recalibration of sigma (both parts scaled alike)
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where(err > 0, cal.apply(err) / err, 1.0)
        err = err * factor
    flux = 10.0 ** (-0.4 * mag)
    return {"mag_inst": mag, "mag_inst_err": err, "mag_err_aleatoric": r.sigma_aleatoric * factor,
            "mag_err_epistemic": r.sigma_epistemic * factor, "flux": flux, "flux_err": flux * err / MAG_PER_FLUX,
            "flux_fit": np.asarray(win.flux_fit, float)[np.asarray(targets, np.int64)], "stamp_masked": st.masked}

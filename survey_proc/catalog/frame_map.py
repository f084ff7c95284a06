"""Where a point of the field's reference frame falls in one epoch's pixels: a polynomial fitted to its stars.

Forced photometry needs the inverse of what extraction and registration computed: the
sources of an epoch carry their own pixel position (``x, y``) and their position in the
field's reference frame (``x_ref, y_ref``), obtained by whichever route the epoch took
(its WCS and the reference WCS, an affine registration, a refined WCS). Fitting
``x, y`` as polynomials of ``x_ref, y_ref`` on the epoch's clean stars inverts every route
the same way, including a WCS's distortion, without knowing which was taken. The degree
grows with the number of stars (affine below 30 stars, quadratic below 100, cubic
above), coordinates are centred and scaled before the fit, and stars whose residual
radius exceeds 3.5 robust sigma are rejected in up to three passes.

Written here rather than with astropy's ``fit_wcs_from_points`` because no WCS is needed
(a pure pixel-to-pixel map, also for epochs without one), and numpy's least squares on a
handful of monomials is all it takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from survey_proc.errors import SurveyProcError

CLIP_SIGMA = 3.5  # residual radius (in per-axis sigma) beyond which a star is rejected: 0.2 % of a Rayleigh
CLIP_PASSES = 3


def degree_for(n_stars: int) -> int:
    """The polynomial degree a map fitted on ``n_stars`` stars gets (1, 2 or 3)."""
    return 1 if n_stars < 30 else 2 if n_stars < 100 else 3


def _design(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    cols = [u ** (d - j) * v ** j for d in range(degree + 1) for j in range(d + 1)]
    return np.stack(cols, axis=1)


@dataclass(frozen=True)
class FrameMap:
    """A fitted map from the reference frame to an epoch's pixel frame (both 0-based px).

    Attributes
    ----------
    degree
        Polynomial degree.
    centre, scale
        The reference-frame coordinates are ``(p - centre) / scale`` before the monomials.
    coef_x, coef_y
        Coefficients of the monomials (:func:`_design`'s order) for ``x`` and ``y``.
    rms_px
        Robust rms of the kept stars' residuals per axis (px).
    n_stars
        Stars kept in the fit.
    """

    degree: int
    centre: tuple[float, float]
    scale: float
    coef_x: np.ndarray
    coef_y: np.ndarray
    rms_px: float
    n_stars: int

    def __call__(self, x_ref: np.ndarray, y_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Epoch pixel positions (px) of reference-frame positions ``x_ref, y_ref`` (px)."""
        a = _design((np.asarray(x_ref, float) - self.centre[0]) / self.scale,
                    (np.asarray(y_ref, float) - self.centre[1]) / self.scale, self.degree)
        return a @ self.coef_x, a @ self.coef_y


def fit_frame_map(x_ref: np.ndarray, y_ref: np.ndarray, x: np.ndarray, y: np.ndarray, *, min_stars: int = 6,
                  what: str = "epoch") -> FrameMap:
    """Fit the map from reference-frame positions to epoch pixel positions on matched stars.

    Parameters
    ----------
    x_ref, y_ref
        The stars' positions in the field's reference frame (px).
    x, y
        The same stars' positions in the epoch's pixels (px).
    min_stars
        Fewer finite pairs than this is an error.
    what
        Names the epoch in the error message (e.g. ``"field F000 epoch 12"``).

    Returns
    -------
    FrameMap
        The fitted map.

    Raises
    ------
    SurveyProcError
        With fewer than ``min_stars`` usable stars.
    """
    x_ref, y_ref, x, y = (np.asarray(a, float) for a in (x_ref, y_ref, x, y))
    ok = np.isfinite(x_ref) & np.isfinite(y_ref) & np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < max(min_stars, 3):
        raise SurveyProcError(f"{what}: {n} usable star(s) to map the reference frame onto the epoch, "
                              f"{max(min_stars, 3)} needed; the epoch gets no forced photometry (lower "
                              "forced.frame_min_stars or forced.frame_snr_min to use fainter stars)")
    xr, yr, xe, ye = x_ref[ok], y_ref[ok], x[ok], y[ok]
    centre = (float(np.median(xr)), float(np.median(yr)))
    scale = float(max(np.ptp(xr), np.ptp(yr), 1.0) / 2.0)
    u, v = (xr - centre[0]) / scale, (yr - centre[1]) / scale
    degree = degree_for(n)
    keep = np.ones(n, bool)
    cx = cy = np.zeros(0)
    rms = np.nan
    for _ in range(CLIP_PASSES):
        a = _design(u[keep], v[keep], degree)
        cx = np.linalg.lstsq(a, xe[keep], rcond=None)[0]
        cy = np.linalg.lstsq(a, ye[keep], rcond=None)[0]
        full = _design(u, v, degree)
        r = np.hypot(full @ cx - xe, full @ cy - ye)
        rms = float(np.median(r[keep]) / np.sqrt(2 * np.log(2)))  # median of a Rayleigh -> per-axis sigma
        new = r <= max(CLIP_SIGMA * rms, 1e-3)
        if new.sum() < max(min_stars, 3) or np.array_equal(new, keep):
            break
        keep = new
    return FrameMap(degree, centre, scale, cx, cy, rms, int(keep.sum()))


#: one row per epoch of a region's frame maps (the forced stage writes them, the blend vetting reads them)
FRAME_TABLE_SCHEMA = pa.schema([("epoch", pa.int32()), ("degree", pa.int8()), ("centre_x", pa.float64()),
                                ("centre_y", pa.float64()), ("scale", pa.float64()),
                                ("coef_x", pa.list_(pa.float64())), ("coef_y", pa.list_(pa.float64())),
                                ("rms_px", pa.float64()), ("n_stars", pa.int32())])
FRAME_TABLE_COLUMNS = tuple(FRAME_TABLE_SCHEMA.names)


def frames_to_table(frames: dict[int, FrameMap]) -> pd.DataFrame:
    """Frame maps per epoch as a table (:data:`FRAME_TABLE_COLUMNS`; coefficients as lists), sorted by epoch."""
    rows = [{"epoch": int(e), "degree": int(f.degree), "centre_x": float(f.centre[0]), "centre_y": float(f.centre[1]),
             "scale": float(f.scale), "coef_x": [float(v) for v in f.coef_x], "coef_y": [float(v) for v in f.coef_y],
             "rms_px": float(f.rms_px), "n_stars": int(f.n_stars)} for e, f in sorted(frames.items())]
    return pd.DataFrame(rows, columns=list(FRAME_TABLE_COLUMNS))


def frames_from_table(table: pd.DataFrame) -> dict[int, FrameMap]:
    """The frame maps of :func:`frames_to_table`'s table, by epoch."""
    cols = {c: table[c].to_list() for c in FRAME_TABLE_COLUMNS}
    return {int(e): FrameMap(int(d), (float(cx), float(cy)), float(s), np.asarray(ax, float), np.asarray(ay, float),
                             float(rms), int(n))
            for e, d, cx, cy, s, ax, ay, rms, n in zip(*(cols[c] for c in FRAME_TABLE_COLUMNS), strict=True)}

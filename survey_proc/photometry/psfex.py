"""PSFEx PSF models: read one, evaluate it at a pixel, and derive the aperture correction from it.

Why a reader of our own: neither astropy nor photutils (3.0, ``photutils.psf``: ImagePSF,
GriddedPSFModel, STDPSFGrid and WebbPSF readers, no PSFEx) reads PSFEx ``.psf`` files, and
GalSim's ``galsim.des.DES_PSFEx`` reads only the one-CCD PSFEx layout (header keywords), not
legacypipe's merged tables (one row per CCD, the keywords as lowercase columns). The format
is small: a basis cube and a polynomial in two scaled image coordinates.

Layouts read by :func:`read_psfex`
----------------------------------
* PSFEx's own (``.psf``): a binary-table extension ``PSF_DATA`` with the keywords ``POLNAXIS``,
  ``POLNAME1/2``, ``POLZERO1/2``, ``POLSCAL1/2``, ``POLGRP1/2``, ``POLNGRP``, ``POLDEG1``,
  ``PSF_SAMP``, ``PSFNAXIS``, ``PSFAXIS1-3``, ``PSF_FWHM`` in its header and one row holding
  ``PSF_MASK``. A multi-chip ``.psf`` has one such extension per chip; ``ccdname`` picks the one
  whose ``EXTNAME``/``CCDNAME``/``DETPOS`` matches, and a file of one extension needs none.
* legacypipe's merged files (``*-psfex.fits``, Legacy Surveys DR9/DR10): one binary table, one
  row per CCD of the exposure, the same quantities as lowercase columns (``polzero1``,
  ``psf_mask``, ...) and a ``ccdname`` column. The row is the one whose ``ccdname`` equals the
  image's CCD: the ``EXTNAME`` of the image HDU (DECam ``S4``, ``N10``; legacypipe cutouts
  keep it, and ``DETPOS`` too). A table of one row needs no name; a table of several rows
  with no name given, or with no matching row, is refused.

Evaluation (:meth:`PSFExModel.evaluate`)
----------------------------------------
``PSF(x, y) = sum_k basis[k] * term_k`` with the scaled coordinates ``u = (X - POLZERO1) /
POLSCAL1``, ``v = (Y - POLZERO2) / POLSCAL2`` (``X, Y`` PSFEx's 1-based ``X_IMAGE, Y_IMAGE``:
the pipeline's 0-based ``x, y`` plus 1) and the terms ordered as PSFEx builds them (as GalSim
does): ``u^i v^j`` for ``j = 0..deg``, ``i = 0..deg-j``, i.e. ``1, u, u^2, v, uv, v^2`` for
degree 2. The basis is sampled every ``PSF_SAMP`` image pixels about its centre pixel
``(n // 2, n // 2)`` (0-based); the image-pixel stamp samples it at ``offset / PSF_SAMP``
(cubic spline; exact copy when ``PSF_SAMP`` is 1) and divides by ``PSF_SAMP^2`` so that the
stamp sums to what the model sums to (PSFEx normalises the constant term to ~1). The model is
PSFEx's fit to star images, i.e. already the pixel-integrated PSF: a curve of growth is an
aperture sum of the stamp, as the pipeline sums images (:func:`curve_of_growth`).

legacypipe's test cutouts (``shared/data/real/legacypipe_decam``) carry models whose
``POLZERO``/``POLSCAL`` have been rewritten into the cutout's pixel frame, as the cutouts'
``CRPIX`` and the survey-ccds table were, so the cutout's own pixel coordinates go in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sep
from astropy.io import fits
from scipy import ndimage

from survey_proc.config import PhotometryConfig

_KEYS = ("polzero1", "polzero2", "polscal1", "polscal2", "psf_samp", "poldeg1")


class PSFExError(ValueError):
    """A PSFEx file that cannot be read as a PSF model (the message names the file)."""


@dataclass(frozen=True)
class PSFExModel:
    """One CCD's PSFEx model: the basis cube and its polynomial in the scaled image coordinates."""

    basis: np.ndarray  # (n_terms, ny, nx), float64
    polzero: tuple[float, float]
    polscal: tuple[float, float]
    poldeg: int  # 0 when the model is constant (POLNAXIS 0)
    samp: float  # image pixels per model pixel (PSF_SAMP)
    fwhm_px: float  # PSFEx's own PSF_FWHM (image px; NaN when absent)
    ccdname: str
    path: str

    def terms(self, x: float, y: float) -> np.ndarray:
        """The polynomial's terms at the 0-based pixel ``(x, y)``, in the basis' order."""
        if self.poldeg == 0:
            return np.ones(1)
        u = (x + 1.0 - self.polzero[0]) / self.polscal[0]
        v = (y + 1.0 - self.polzero[1]) / self.polscal[1]
        d = self.poldeg
        return np.array([u**i * v**j for j in range(d + 1) for i in range(d + 1 - j)])

    def model_at(self, x: float, y: float) -> np.ndarray:
        """The model-pixel PSF (``basis``'s grid, sampled every ``samp`` image px) at 0-based ``(x, y)``."""
        return np.tensordot(self.terms(x, y), self.basis, axes=1)

    def evaluate(self, x: float, y: float, half: int | None = None) -> np.ndarray:
        """The PSF of a star centred on the 0-based pixel ``(x, y)``, on image pixels.

        Returns a ``(2 half + 1)^2`` stamp with the star on its centre pixel; ``half``
        defaults to the largest the model covers (``(n // 2) x samp``). The stamp's sum is the
        model's (~1); values are not clipped (PSFEx models have small negative wings).
        """
        m = self.model_at(x, y)
        n = min(m.shape)
        half_max = int(np.floor((n // 2) * self.samp))
        half = half_max if half is None else int(half)
        if half > half_max:
            raise ValueError(f"{self.path}: a stamp of half-size {half} px exceeds the model's {half_max} px")
        cy, cx = m.shape[0] // 2, m.shape[1] // 2
        if self.samp == 1.0:
            return m[cy - half:cy + half + 1, cx - half:cx + half + 1].copy()
        off = np.arange(-half, half + 1) / self.samp
        yy, xx = np.meshgrid(cy + off, cx + off, indexing="ij")
        out = ndimage.map_coordinates(m, [yy, xx], order=3, mode="constant", cval=0.0, prefilter=True)
        return np.asarray(out, float) / self.samp**2


def _pick_legacypipe_row(path: str, data: fits.FITS_rec, ccdname: str | None) -> int:
    names = [str(c).strip() for c in data["ccdname"]] if "ccdname" in data.names else []
    if ccdname is None:
        if len(data) != 1:
            raise PSFExError(f"{path}: {len(data)} CCDs ({', '.join(names)}); say which (ccdname, e.g. the "
                             "image HDU's EXTNAME)")
        return 0
    hits = [i for i, n in enumerate(names) if n.upper() == ccdname.strip().upper()]
    if not hits:
        raise PSFExError(f"{path}: no model for CCD {ccdname!r} (it holds {', '.join(names) or 'no ccdname column'})")
    return hits[0]


def read_psfex(path: str | Path, ccdname: str | None = None) -> PSFExModel:
    """Read the PSFEx model of one CCD from ``path`` (either layout of the module docstring).

    Parameters
    ----------
    path
        A PSFEx ``.psf`` file or a legacypipe merged ``*-psfex.fits``.
    ccdname
        The image's CCD (its HDU's ``EXTNAME``, e.g. ``"S4"``); needed when the file holds
        several CCDs.

    Raises
    ------
    PSFExError
        When the file is not FITS, holds no PSF model, lacks a keyword, holds a polynomial of
        more than two axes or groups, or its basis disagrees with its polynomial degree; the
        message names the file.
    """
    p = str(path)
    try:
        hdul = fits.open(p, memmap=False)
    except (OSError, ValueError) as e:
        raise PSFExError(f"{p}: not a readable FITS file ({e})") from e
    with hdul:
        tables = [h for h in hdul[1:] if isinstance(h, fits.BinTableHDU)]
        if not tables:
            raise PSFExError(f"{p}: no binary table (a PSFEx model is one, PSF_DATA or legacypipe's merged table)")
        lower = [t for t in tables if t.columns is not None and "psf_mask" in t.columns.names]
        if lower:  # legacypipe merged: quantities are columns, one row per CCD
            t = lower[0]
            data = t.data
            row = _pick_legacypipe_row(p, data, ccdname)
            r = data[row]
            missing = [k for k in _KEYS if k not in data.names]
            if missing:
                raise PSFExError(f"{p}: legacypipe PSFEx table lacks {', '.join(missing)}")
            polnaxis = int(r["polnaxis"]) if "polnaxis" in data.names else 2
            ngrp = int(r["polngrp"]) if "polngrp" in data.names else 1
            names = (str(r["polname1"]).strip(), str(r["polname2"]).strip()) if "polname1" in data.names else ("", "")
            get = {k: r[k] for k in _KEYS}
            basis = np.asarray(r["psf_mask"], float)
            fwhm = float(r["psf_fwhm"]) if "psf_fwhm" in data.names else float("nan")
            name = str(r["ccdname"]).strip() if "ccdname" in data.names else (ccdname or "")
        else:  # PSFEx's own: keywords in the header, PSF_MASK in the single row
            cands = [t for t in tables if t.columns is not None and "PSF_MASK" in t.columns.names]
            if not cands:
                raise PSFExError(f"{p}: no PSF_MASK column (not a PSFEx model)")
            if ccdname is not None:
                want = ccdname.strip().upper()
                sel = [t for t in cands if any(str(t.header.get(k, "")).strip().upper() == want
                                               for k in ("EXTNAME", "CCDNAME", "DETPOS"))]
                if not sel and len(cands) > 1:
                    raise PSFExError(f"{p}: {len(cands)} PSF_DATA extensions and none named {ccdname!r}")
                cands = sel or cands
            elif len(cands) > 1:
                raise PSFExError(f"{p}: {len(cands)} PSF_DATA extensions; say which CCD (ccdname)")
            t = cands[0]
            h = t.header
            polnaxis = int(h.get("POLNAXIS", 0))
            ngrp = int(h.get("POLNGRP", 1))
            names = (str(h.get("POLNAME1", "")).strip(), str(h.get("POLNAME2", "")).strip())
            need = [k.upper() for k in _KEYS if k != "psf_samp"] if polnaxis else []
            missing = [k for k in [*need, "PSF_SAMP"] if k not in h]
            if missing:
                raise PSFExError(f"{p}: PSFEx header lacks {', '.join(missing)}")
            get = {k: h.get(k.upper(), 0 if k != "psf_samp" else 1.0) for k in _KEYS}
            if len(t.data) < 1:
                raise PSFExError(f"{p}: PSF_DATA has no row")
            basis = np.asarray(t.data["PSF_MASK"][0], float)
            fwhm = float(h.get("PSF_FWHM", np.nan))
            name = str(h.get("CCDNAME", h.get("DETPOS", ccdname or ""))).strip()
    if polnaxis not in (0, 2) or ngrp > 1:
        raise PSFExError(f"{p}: a polynomial in {polnaxis} axes and {ngrp} groups is not supported (only 0, or "
                         "2 axes in one group)")
    if polnaxis == 2 and names[0] and names != ("X_IMAGE", "Y_IMAGE"):
        raise PSFExError(f"{p}: the polynomial's axes are {names}, not X_IMAGE, Y_IMAGE")
    deg = int(get["poldeg1"]) if polnaxis == 2 else 0
    if basis.ndim == 2:
        basis = basis[None]
    n_terms = (deg + 1) * (deg + 2) // 2
    if basis.ndim != 3 or basis.shape[0] != n_terms or basis.shape[1] < 3 or basis.shape[2] < 3:
        raise PSFExError(f"{p}: PSF_MASK of shape {basis.shape} does not hold the {n_terms} basis images "
                         f"of a degree-{deg} polynomial")
    samp = float(get["psf_samp"])
    scal = (float(get["polscal1"]), float(get["polscal2"])) if deg else (1.0, 1.0)
    if not (np.isfinite(samp) and samp > 0) or 0.0 in scal or not np.all(np.isfinite(basis)):
        raise PSFExError(f"{p}: PSF_SAMP {samp}, POLSCAL {scal} or a non-finite PSF_MASK: not a usable model")
    return PSFExModel(basis=basis, polzero=(float(get["polzero1"]), float(get["polzero2"])) if deg else (0.0, 0.0),
                      polscal=scal, poldeg=deg, samp=samp, fwhm_px=fwhm, ccdname=name, path=p)


def stamp_fwhm(psf: np.ndarray, upsample: int = 8) -> float:
    """FWHM (px) of a centred PSF stamp: ``2 sqrt(A / pi)`` of the area above half its peak.

    The stamp is interpolated (cubic) ``upsample`` times finer first, so the area is not
    counted in whole pixels.
    """
    n = psf.shape[0]
    c = np.arange(0, n - 1 + 1e-9, 1.0 / upsample)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    fine = ndimage.map_coordinates(np.asarray(psf, float), [yy, xx], order=3)
    area = float(np.count_nonzero(fine >= 0.5 * fine.max())) / upsample**2
    return 2.0 * float(np.sqrt(area / np.pi))


def curve_of_growth(psf: np.ndarray, radii_px: np.ndarray | list[float] | float) -> np.ndarray:
    """Flux of a centred, pixel-integrated PSF stamp within each radius (px), as the pipeline sums.

    sep's ``sum_circle`` with ``subpix=5`` about the stamp's centre pixel, like the
    pipeline's apertures (:func:`survey_proc.photometry.aperture.aperture_flux`). A radius
    beyond the stamp's edge raises ``ValueError``.
    """
    r = np.atleast_1d(np.asarray(radii_px, float))
    half = psf.shape[0] // 2
    if np.any(r > half):
        raise ValueError(f"radius {r.max():.2f} px exceeds the stamp's half-size {half} px")
    img = np.ascontiguousarray(psf, dtype=np.float32)
    out = np.empty(len(r))
    for i, rr in enumerate(r):  # sep.sum_circle takes one radius per position
        f, _, _ = sep.sum_circle(img, [float(half)], [float(half)], float(rr), subpix=5)
        out[i] = float(f[0])
    return out


def psfex_apcorr(psf: np.ndarray, fwhm_px: float, cfg: PhotometryConfig) -> float:
    """The pipeline's aperture correction for a star of this PSF: F(apcorr_fwhm x FWHM) / F(aperture).

    The radii follow :func:`survey_proc.photometry.aperture.model_apcorr` with the block's
    ``fwhm_px`` (the header's FWHM where the block measures none): the aperture
    ``aperture_fwhm x fwhm_px``, the large radius ``apcorr_fwhm x fwhm_px``; with
    ``local_sky = "annulus"`` the aperture flux is net of the star's own mean surface
    brightness in the annulus times the aperture's area, as the model's is.
    """
    r_ap, r_big = cfg.aperture_fwhm * fwhm_px, cfg.apcorr_fwhm * fwhm_px
    if cfg.local_sky == "annulus":
        r_in, r_out = cfg.local_sky_inner_fwhm * fwhm_px, cfg.local_sky_outer_fwhm * fwhm_px
        e_ap, e_big, e_in, e_out = curve_of_growth(psf, [r_ap, r_big, r_in, r_out])
        e_ap -= (e_out - e_in) / (np.pi * (r_out**2 - r_in**2)) * np.pi * r_ap**2
    else:
        e_ap, e_big = curve_of_growth(psf, [r_ap, r_big])
    return float(e_big / e_ap)

"""The record of a sources unit (one field x epoch), kept in the unit's Parquet footer and in run.json.

The footer holds :meth:`EpochRecord.to_dict`; a resumed run reads it back with
:meth:`EpochRecord.from_dict`, so the file stays the only ledger (``survey_proc.outputs``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from survey_proc.catalog.calibrate import ZeroPoint, ZpStatus
from survey_proc.photometry.aperture import APCORR_PSFEX

APCORR_FROM_MODEL = "field model"  # apcorr_source of an epoch whose aperture correction is the field's line


@dataclass
class EpochRecord:
    """What extraction, registration and calibration measured and decided about one epoch.

    Attributes
    ----------
    field, epoch, mjd, airmass, exptime_s
        The unit's key and its exposure's metadata (MJD, airmass, seconds).
    band
        The epoch's band ("" for a store with one band for all epochs, format 1).
    n_sources, n_duplicates
        Rows written and border duplicates removed.
    fwhm_px, apcorr, n_apcorr_stars
        Measured seeing (px), aperture correction (total / aperture flux) and the fewest
        stars any block measured it on.
    bkg_adu, rms_adu, bad_px
        Median sky level and noise (ADU); unusable pixels.
    fallback
        Relaxed extraction settings a block fell back to (comma-separated), or None.
    has_wcs
        Whether the epoch had a usable WCS (else it is registered).
    zp
        The zero point (:class:`~survey_proc.catalog.calibrate.ZeroPoint`).
    fingerprint
        The run configuration's fingerprint the unit was written with.
    domain
        What the domain check did (:mod:`survey_proc.detect.domain`; None: the models ran
        inside their training range).
    halos
        With ``detection.halo_sky``: the saturated stars' modelled halos
        (:meth:`survey_proc.photometry.halo.HaloProfile.to_dict`, image frame), which the forced
        photometry renders instead of fitting them again; None without the halo sky (omitted).
    apcorr_source, registration, wcs_refinement
        Set by later stages: the aperture correction's origin, the registration's solution,
        the outcome of refining a rough WCS. None when not applicable (omitted from the footer).
    """

    field: str
    epoch: int
    mjd: float
    airmass: float
    exptime_s: float
    n_sources: int
    n_duplicates: int
    fwhm_px: float
    apcorr: float
    n_apcorr_stars: int
    bkg_adu: float
    rms_adu: float
    bad_px: int
    fallback: str | None
    has_wcs: bool
    zp: ZeroPoint
    fingerprint: str
    queue_to_done_s: float = 0.0
    finalize_s: float = 0.0
    read_s: float = 0.0
    extract_s: float = 0.0
    apcorr_source: str | None = None
    registration: dict[str, Any] | None = None
    wcs_refinement: str | None = None
    band: str = ""
    domain: str | None = None
    halos: list[dict[str, Any]] | None = None
    unit: str = "sources"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys of another version, kept as is

    @property
    def calibrated(self) -> bool:
        """The epoch has a finite zero point (a fit, a model or an ensemble value)."""
        return bool(math.isfinite(self.zp.zp))

    @property
    def apcorr_from_model(self) -> bool:
        """The aperture correction is the field's line, not this epoch's own measurement."""
        return self.apcorr_source == APCORR_FROM_MODEL

    @property
    def apcorr_from_psf_model(self) -> bool:
        """The aperture correction is the exposure's own PSF model's (``ingest --psfex``), not a measurement."""
        return (self.apcorr_source or "").startswith(APCORR_PSFEX)

    def aperture_photometry(self, detector: str, bpnn_enabled: bool) -> bool:
        """Whether the epoch's fluxes are sep's aperture fluxes times an aperture correction.

        ``detector`` and ``bpnn_enabled`` are the run's; the domain check (``domain``) may have
        detected the epoch with sep and kept sep's photometry instead.
        """
        dom = self.domain or ""
        sep_used = detector == "sep" or "detected with sep" in dom
        bpnn_used = bpnn_enabled and "bpnn:" not in dom
        return sep_used and not bpnn_used

    @property
    def needs_model_zp(self) -> bool:
        """Too few reference stars, or none yet: the epoch takes the field's zero-point model."""
        return self.zp.status in (ZpStatus.FEW, ZpStatus.PENDING)

    def with_(self, **changes: Any) -> EpochRecord:
        """A copy with ``changes``."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The footer form: plain JSON types, optional keys omitted when None."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("zp", "extra")}
        d["zp"] = self.zp.to_dict()
        for k in ("apcorr_source", "registration", "wcs_refinement", "domain", "halos"):
            if d[k] is None:
                del d[k]
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochRecord:
        """Read a footer record (keys this version does not know go to ``extra``)."""
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in names}
        kw["zp"] = ZeroPoint.from_dict(d["zp"])
        kw.setdefault("has_wcs", True)
        kw.setdefault("n_apcorr_stars", 0)
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names})

    def summary(self) -> dict[str, Any]:
        """The row of ``epochs.parquet`` for this epoch."""
        z = asdict(self.zp)
        return {"field": self.field, "epoch": self.epoch, "band": self.band, "mjd": self.mjd, "airmass": self.airmass,
                "exptime_s": self.exptime_s, "n_sources": self.n_sources, "fwhm_px": self.fwhm_px,
                "apcorr": self.apcorr, "apcorr_n_stars": self.n_apcorr_stars,
                "apcorr_from_model": self.apcorr_from_model, "bkg_adu": self.bkg_adu, "rms_adu": self.rms_adu,
                "zp": z["zp"], "zp_err": z["zp_err"], "zp_scatter": z["scatter"], "zp_n_stars": z["n_used"],
                "zp_status": str(self.zp.status), "zp_absolute": self.zp.absolute, "fallback": self.fallback or "",
                "domain": self.domain or ""}

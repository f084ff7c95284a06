"""Simulation scenarios: named presets (``dense``, ``sparse``) with every parameter overridable.

A :class:`Scenario` is a frozen dataclass; every field carries its unit in its name or its
docstring line below. Presets live in :data:`PRESETS`; a TOML file may name a ``base``
preset and override any field, and the CLI's ``--set key=value`` overrides a single field.

Photometric conventions
-----------------------
``zeropoint_mag`` is the magnitude of a source that gives 1 ADU summed over its whole
image in one exposure of ``exptime_s`` seconds, above the atmosphere. An epoch's zero point
is ``zeropoint_mag - extinction_k_mag * airmass + drift + field_offset``, so the flux of a
star of magnitude ``m`` is ``10 ** (-0.4 * (m - zeropoint_epoch))`` ADU. Space scenarios
(``site = "space"``) have no airmass (stored as NaN) and no extinction.

PSF conventions
---------------
``psf_fwhm_px`` is the FWHM of the optical/atmospheric PSF before pixel integration
(GalSim's ``fwhm``). The rendered stars are that PSF convolved with the square pixel.

What real images hold besides stars (options, all off in the presets)
---------------------------------------------------------------------
Every option below is off by default, so the presets render the same pixels as before
they existed (tested: the new code paths are not entered). ``benchmarks/scenarios/
galaxies-heldout.toml`` switches galaxies, spikes and halos on for a held-out survey.

- **Galaxies** (``galaxies.py``): ``galaxy_density_per_arcmin2`` > 0 adds GalSim
  exponential, de Vaucouleurs, Sérsic and bulge + disk galaxies with magnitudes in
  ``galaxy_mag_range`` (counts rising ``galaxy_count_slope`` = 0.4 dex/mag, so most are
  faint), half-light radii about 1" x 10^(-0.1 (m - 20)) clipped to ``galaxy_hlr_arcsec``
  and shapes |g| <= ``galaxy_e_max``, from their own random stream. They are constant over
  epochs and convolved with each epoch's PSF. Truth: ``NAME.truth/galaxies.parquet``
  (galaxy_id, field, ra, dec, x, y in the reference frame, mag, profile,
  half_light_radius_px, e1, e2, sersic_n, bulge_fraction, in_frame; empty when off).
  Galaxies are never in ``stars.parquet`` or the reference catalogue: they are negatives.
- **Diffraction spikes and halos**: with ``spikes`` (and/or ``halo_fraction`` > 0), stars
  whose truth ``mag`` < ``spike_mag_max`` are drawn with the bright-star PSF: the core
  PSF, a fraction ``halo_fraction`` of it scattered into a Moffat (beta 1.5) halo of
  ``halo_fwhm_factor`` x the FWHM, convolved with a GalSim ``OpticalPSF`` (``spike_*``:
  lambda/D in px, obscuration, ``spike_nstruts`` struts of ``spike_strut_thick``, at
  ``spike_angle_deg``; spikes fixed in the detector frame), on a stamp of half-size
  ``spike_radius_px``, truncated there (the truth flux is the total; the light beyond the
  stamp is left out).
  Truth: the ``spiked`` column of ``stars.parquet`` (True: drawn with the bright-star PSF).
  Spikes of a given length need bright stars: at lambda/D = 1 px, 3.3 px seeing, a spike
  pixel 35 px out holds about 1e-5 of the star's flux.
- **Bleed trails**: ``bleed_trails`` moves the charge above saturation along the column,
  half up and half down, filling pixels to saturation (mask bit 2; charge conserved).
- **Hot pixels**: ``hot_pixel_frac`` of the pixels, fixed per field, add ``hot_pixel_adu``
  (log-normal, 0.3 dex) per exposure with shot noise, unmasked. Truth:
  ``NAME.truth/hot_pixels.parquet`` (field, x, y, excess_adu) when on.

Costs (1024² sparse-like epoch, 1 core, measured): about 0.7 ms per galaxy (the held-out
scenario's ~1000 galaxies: +0.7 s per epoch, +1-2 s on a busy machine) and about 3 ms per
spiked star (plus ~0.2 s once per process for the OpticalPSF), on top of ≈ 0.3 s for the stars.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from survey_proc.errors import ConfigError


@dataclass(frozen=True)
class Scenario:
    """Every parameter of a simulated survey. Units are in the names or stated here."""

    name: str = "dense"
    # --- geometry and cadence
    size_px: int = 1024  # detector is size_px x size_px pixels
    n_epochs: int = 100
    n_fields: int = 1
    seed: int = 0
    band: str = "i"
    pixel_scale_arcsec: float = 0.074
    field_ra_deg: float = 270.0  # centre of field 0; further fields tile the sky eastwards
    field_dec_deg: float = -30.0
    field_rotation_deg: float = 0.0
    exptime_s: float = 300.0
    cadence_s: float = 0.0  # start-to-start interval; 0 means back to back (= exptime_s)
    start_mjd: float = 61000.0
    # --- site, airmass and gaps
    site: str = "space"  # "space" (no airmass) or "ground"
    site_lat_deg: float = -30.24  # ground sites only
    site_lon_deg: float = -70.74
    max_airmass: float = 2.0  # ground: exposures are taken only below this airmass at night
    night_only: bool = False  # ground: observe only between night_start_h and night_end_h local solar time
    night_start_h: float = 20.0
    night_end_h: float = 5.0
    n_random_gaps: int = 0  # random interruptions (downlink, weather), each random_gap_h long
    random_gap_h: float = 6.0
    # --- PSF
    psf_profile: str = "moffat"  # "moffat" or "kolmogorov"
    moffat_beta: float = 3.0
    psf_fwhm_px: float = 1.75  # median seeing
    seeing_scatter: float = 0.15  # log-normal rms of the per-epoch FWHM (fraction)
    seeing_corr: float = 0.5  # epoch-to-epoch correlation of the seeing (AR(1))
    psf_ellipticity_rms: float = 0.0  # rms of each shear component g1, g2 per epoch
    # --- detector and photometry
    gain_e_per_adu: float = 1.5
    read_noise_e: float = 5.0
    full_well_e: float = 90000.0  # saturation_adu = full_well_e / gain_e_per_adu
    zeropoint_mag: float = 31.0  # 1 ADU per exposure, above the atmosphere
    extinction_k_mag: float = 0.0  # mag per airmass (ground only)
    zp_drift_mag: float = 0.03  # rms of the slow zero-point drift (AR(1), corr 0.99)
    zp_field_scatter_mag: float = 0.02  # per-field (per-detector) constant zero-point offset
    sky_adu: float = 40.0  # median sky per pixel per exposure
    sky_scatter: float = 0.10  # log-normal rms of the per-epoch sky (fraction)
    sky_airmass_coeff: float = 0.0  # ground: sky *= 1 + coeff * (airmass - 1)
    # --- stars and luminosity function
    star_density_per_px2: float = 0.025  # all simulated stars, mag_min..mag_max
    mag_min: float = 16.5
    mag_max: float = 26.5
    lf_slope: float = 0.30  # dN/dm proportional to 10 ** (lf_slope * m)
    # --- variables (fractions of all stars) and their parameter ranges
    frac_eclipsing_binary: float = 0.01
    frac_pulsator: float = 0.01
    frac_transit: float = 0.01
    frac_flare: float = 0.0025
    frac_trend: float = 0.0025
    eb_period_days: tuple[float, float] = (0.3, 10.0)  # log-uniform
    pulsator_period_days: tuple[float, float] = (1.45, 2.95)
    transit_period_days: tuple[float, float] = (1.45, 2.95)
    pulsator_amplitude_mag: tuple[float, float] = (0.15, 0.8)  # peak to peak
    eb_depth: tuple[float, float] = (0.05, 0.6)  # primary eclipse depth, fraction of flux
    transit_depth: tuple[float, float] = (0.005, 0.02)  # fraction of flux
    transit_duration_h: tuple[float, float] = (1.5, 4.0)
    flare_amplitude: tuple[float, float] = (0.2, 3.0)  # peak flux increase, fraction of quiescent
    trend_amplitude_mag: tuple[float, float] = (0.05, 0.4)  # total change over the baseline
    # --- artefacts and pointing
    cosmic_rate_per_px_s: float = 5e-6  # cosmic-ray events per pixel per second
    cosmic_charge_e: float = 2000.0  # median deposit per pixel along a track
    n_bad_columns: int = 2  # per field, fixed in detector coordinates
    jitter_px: float = 1.0  # rms pointing offset per axis per epoch
    rotation_jitter_deg: float = 0.002
    # --- reference (Gaia-like) calibration catalogue
    reference_mag_faint: float = 21.0
    reference_sat_margin_mag: float = 0.5  # keep stars this much fainter than saturation
    reference_err_floor_mag: float = 0.003
    reference_err_at_faint_mag: float = 0.02
    reference_pos_err_mas: float = 1.0
    # --- galaxies (negatives for the detector; see galaxies.py). Off when the density is 0.
    galaxy_density_per_arcmin2: float = 0.0  # all galaxies in galaxy_mag_range, per arcmin^2 of sky
    galaxy_mag_range: tuple[float, float] = (17.0, 25.0)  # total magnitudes (mag), faint end below the limit
    galaxy_count_slope: float = 0.4  # number counts dN/dm proportional to 10 ** (slope * m) (dex/mag)
    galaxy_hlr_arcsec: tuple[float, float] = (0.3, 3.0)  # half-light radii are clipped to this range (arcsec)
    galaxy_e_max: float = 0.7  # largest |g| (reduced shear, (a - b) / (a + b)) of a galaxy's shape
    # --- bright stars: diffraction spikes and halo (stars brighter than spike_mag_max; see render.py)
    spikes: bool = False  # bright stars get an OpticalPSF with struts (diffraction spikes)
    spike_mag_max: float = 15.0  # stars with truth mag below this get the bright-star PSF (mag)
    spike_radius_px: int = 64  # half-size of the bright-star stamp (px)
    spike_nstruts: int = 4  # struts of the secondary-mirror support (GalSim OpticalPSF nstruts)
    spike_strut_thick: float = 0.02  # strut thickness (fraction of the pupil diameter)
    spike_obscuration: float = 0.3  # central obscuration (fraction of the pupil diameter)
    spike_lam_over_diam_px: float = 1.0  # lambda / D of the optics (px); sets the spikes' length
    spike_angle_deg: float = 0.0  # angle of the first strut from the detector's +y axis (deg)
    halo_fraction: float = 0.0  # fraction of a bright star's flux in a wide halo (0: none)
    halo_fwhm_factor: float = 6.0  # the halo's FWHM over the core PSF's (Moffat, beta 1.5)
    # --- extra detector artefacts (off by default)
    bleed_trails: bool = False  # saturated charge runs along the column (y) instead of being clipped away
    hot_pixel_frac: float = 0.0  # fraction of pixels that are hot (fixed per field, not masked)
    hot_pixel_adu: float = 500.0  # median excess of a hot pixel per exposure (ADU; log-normal, 0.3 dex rms)
    # --- rendering
    psf_oversample: int = 11  # odd: sub-pixel phases per pixel in the effective-PSF bank
    stamp_radius_px: int = 7  # smallest stamp; brighter stars use 2x, 4x, 8x (see render.py)

    @property
    def cadence_or_exptime_s(self) -> float:
        """Start-to-start interval between exposures in seconds.

        Returns
        -------
        float
            ``cadence_s``, or ``exptime_s`` when the cadence is 0 (back to back).
        """
        return self.cadence_s if self.cadence_s > 0 else self.exptime_s

    @property
    def saturation_adu(self) -> float:
        """Pixel value (ADU) at which the detector saturates.

        Returns
        -------
        float
            ``full_well_e / gain_e_per_adu``.
        """
        return self.full_well_e / self.gain_e_per_adu

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-serialisable dict (tuples become lists).

        Returns
        -------
        dict
            Every parameter by name.
        """
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> Scenario:
        """Check values; raise :class:`ConfigError` naming the parameter. Returns self."""
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"scenario {self.name!r}: parameter {name!r} {why}")

        if self.size_px < 16:
            raise bad("size_px", f"must be >= 16 pixels, got {self.size_px}")
        if self.n_epochs < 1:
            raise bad("n_epochs", f"must be >= 1, got {self.n_epochs}")
        if self.n_fields < 1:
            raise bad("n_fields", f"must be >= 1, got {self.n_fields}")
        if self.site not in ("space", "ground"):
            raise bad("site", f"must be 'space' or 'ground', got {self.site!r}")
        if self.psf_profile not in ("moffat", "kolmogorov"):
            raise bad("psf_profile", f"must be 'moffat' or 'kolmogorov', got {self.psf_profile!r}")
        if self.psf_oversample < 3 or self.psf_oversample % 2 == 0:
            raise bad("psf_oversample", f"must be odd and >= 3, got {self.psf_oversample}")
        for name in ("psf_fwhm_px", "exptime_s", "gain_e_per_adu", "full_well_e", "pixel_scale_arcsec"):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("read_noise_e", "sky_adu", "star_density_per_px2", "cadence_s", "jitter_px",
                     "n_random_gaps", "random_gap_h", "n_bad_columns", "cosmic_rate_per_px_s"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.cadence_s and self.cadence_s < self.exptime_s:
            raise bad("cadence_s", f"({self.cadence_s} s) is shorter than exptime_s ({self.exptime_s} s)")
        if self.mag_max <= self.mag_min:
            raise bad("mag_max", f"({self.mag_max}) must exceed mag_min ({self.mag_min})")
        fracs = (self.frac_eclipsing_binary, self.frac_pulsator, self.frac_transit,
                 self.frac_flare, self.frac_trend)
        if min(fracs) < 0 or sum(fracs) > 1:
            raise bad("frac_*", f"variable fractions must be >= 0 and sum to <= 1, got {fracs}")
        if self.site == "ground" and self.night_only and self.max_airmass < 1:
            raise bad("max_airmass", f"must be >= 1, got {self.max_airmass}")
        self._validate_extras(bad)
        return self

    def _validate_extras(self, bad: typing.Callable[[str, str], ConfigError]) -> None:
        """Check the galaxy, bright-star and artefact options (``bad(name, why)`` builds the error)."""
        if self.galaxy_density_per_arcmin2 < 0:
            raise bad("galaxy_density_per_arcmin2", f"must be >= 0, got {self.galaxy_density_per_arcmin2}")
        lo, hi = self.galaxy_mag_range
        if not hi > lo:
            raise bad("galaxy_mag_range", f"must be (bright, faint) with faint > bright, got {self.galaxy_mag_range}")
        lo, hi = self.galaxy_hlr_arcsec
        if not 0 < lo <= hi:
            raise bad("galaxy_hlr_arcsec", f"must be (min, max) with 0 < min <= max, got {self.galaxy_hlr_arcsec}")
        if not 0 <= self.galaxy_e_max < 0.95:
            raise bad("galaxy_e_max", f"must be in [0, 0.95), got {self.galaxy_e_max}")
        if not 0 <= self.halo_fraction < 1:
            raise bad("halo_fraction", f"must be in [0, 1), got {self.halo_fraction}")
        if self.spike_radius_px < 8:
            raise bad("spike_radius_px", f"must be >= 8 pixels, got {self.spike_radius_px}")
        if self.spike_nstruts < 0:
            raise bad("spike_nstruts", f"must be >= 0, got {self.spike_nstruts}")
        if not 0 <= self.spike_obscuration < 1:
            raise bad("spike_obscuration", f"must be in [0, 1), got {self.spike_obscuration}")
        if not 0 < self.spike_strut_thick < 0.5:
            raise bad("spike_strut_thick", f"must be in (0, 0.5), got {self.spike_strut_thick}")
        for name in ("spike_lam_over_diam_px", "halo_fwhm_factor"):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        if not 0 <= self.hot_pixel_frac <= 0.01:
            raise bad("hot_pixel_frac", f"must be in [0, 0.01], got {self.hot_pixel_frac}")
        if self.hot_pixel_adu < 0:
            raise bad("hot_pixel_adu", f"must be >= 0, got {self.hot_pixel_adu}")

    @property
    def bright_star_psf(self) -> bool:
        """Whether stars brighter than ``spike_mag_max`` get the bright-star PSF (spikes and/or halo).

        Returns
        -------
        bool
            ``spikes or halo_fraction > 0``.
        """
        return bool(self.spikes or self.halo_fraction > 0)


#: Named presets. ``dense`` is CSST-like (space, crowded, to i~26); ``sparse`` SDSS-like.
PRESETS: dict[str, dict[str, Any]] = {
    "dense": {},
    "sparse": {
        "name": "sparse",
        "pixel_scale_arcsec": 0.396,
        "site": "ground",
        "night_only": True,
        "max_airmass": 2.0,
        "psf_profile": "kolmogorov",
        "psf_fwhm_px": 3.5,
        "seeing_scatter": 0.15,
        "psf_ellipticity_rms": 0.03,
        "gain_e_per_adu": 4.7,
        "read_noise_e": 6.0,
        "full_well_e": 120000.0,
        "zeropoint_mag": 27.8,
        "extinction_k_mag": 0.06,
        "zp_drift_mag": 0.02,
        "sky_adu": 320.0,
        "sky_airmass_coeff": 0.3,
        "star_density_per_px2": 0.0015,
        "mag_min": 13.0,
        "mag_max": 22.5,
        "cosmic_rate_per_px_s": 2e-8,
        "cosmic_charge_e": 3000.0,
        "n_bad_columns": 1,
        "jitter_px": 2.0,
        "rotation_jitter_deg": 0.01,
        "reference_mag_faint": 19.5,
        "field_ra_deg": 150.0,
        "field_dec_deg": 2.0,
    },
}

_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(Scenario)


def _coerce(name: str, value: Any) -> Any:
    """Convert ``value`` (often a CLI string) to the type of Scenario field ``name``."""
    if name not in _FIELD_TYPES:
        known = ", ".join(sorted(_FIELD_TYPES))
        raise ConfigError(f"unknown scenario parameter {name!r}; known parameters: {known}")
    typ = _FIELD_TYPES[name]
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typing.get_origin(typ) is tuple:
            parts = value.split(",") if isinstance(value, str) else list(value)
            if len(parts) != 2:
                raise ValueError(value)
            return (float(parts[0]), float(parts[1]))
        if typ is int:
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError(value)
            return int(as_float)
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"scenario parameter {name!r}: cannot read {value!r} as {getattr(typ, '__name__', typ)}"
        ) from None


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse CLI ``key=value`` strings into a dict of typed overrides.

    Parameters
    ----------
    items
        Strings ``key=value`` (``--set``); None: none.

    Returns
    -------
    dict
        Parameter name -> value of the parameter's type.

    Raises
    ------
    ConfigError
        For an item without ``=``, an unknown parameter or a value of the wrong type.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. psf_fwhm_px=2.0)")
        key, value = item.split("=", 1)
        out[key.strip()] = _coerce(key.strip(), value.strip())
    return out


def load_scenario(name_or_path: str | Path = "dense", overrides: dict[str, Any] | None = None) -> Scenario:
    """Build a validated scenario from a preset name or a TOML file, plus overrides.

    Parameters
    ----------
    name_or_path
        A preset name (``dense``, ``sparse``) or a path to a TOML file whose top-level keys
        are Scenario parameters, optionally with ``base = "<preset>"``.
    overrides
        Parameter values applied last (e.g. ``{"n_epochs": 50, "seed": 3}``).

    Returns
    -------
    Scenario
        The validated scenario.

    Raises
    ------
    ConfigError
        For an unknown preset, a missing or invalid file, or an invalid parameter.
    """
    text = str(name_or_path)
    if text in PRESETS:
        values: dict[str, Any] = {"name": text, **PRESETS[text]}
    elif text.endswith(".toml"):
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"scenario file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"scenario file {path} is not valid TOML: {exc}") from None
        base = data.pop("base", "dense")
        if base not in PRESETS:
            raise ConfigError(f"scenario file {path}: base {base!r} is not a preset ({', '.join(PRESETS)})")
        values = {**PRESETS[base], "name": path.stem}
        values.update({k: _coerce(k, v) for k, v in data.items()})
    else:
        raise ConfigError(
            f"unknown scenario {text!r}: use a preset ({', '.join(PRESETS)}) or a .toml file"
        )
    for key, value in (overrides or {}).items():
        values[key] = _coerce(key, value)
    return replace(Scenario(), **values).validate()


def scenario_from_dict(data: dict[str, Any]) -> Scenario:
    """Rebuild a scenario from :meth:`Scenario.to_dict` output (e.g. a store's attrs).

    Parameters
    ----------
    data
        Parameter name -> value; unknown names are ignored.

    Returns
    -------
    Scenario
        The validated scenario.
    """
    names = {f.name for f in fields(Scenario)}
    return replace(Scenario(), **{k: _coerce(k, v) for k, v in data.items() if k in names}).validate()


__all__ = ["PRESETS", "Scenario", "load_scenario", "parse_overrides", "scenario_from_dict"]

"""One typed run configuration for ``survey-proc run``, loadable from TOML, echoed into run.json.

A TOML file may set any top-level key of :class:`RunConfig` and any key of its eight
sections (:data:`SECTIONS`): ``[detection]`` (:class:`DetectionConfig`), ``[pnet]``
(:class:`PNetSettings`), ``[bpnn]`` (:class:`BPNNSettings`), ``[photometry]``
(:class:`PhotometryConfig`), ``[calibration]`` (:class:`CalibrationConfig`),
``[crossmatch]`` (:class:`CrossmatchConfig`), ``[forced]`` (:class:`ForcedConfig`) and
``[classify]`` (:class:`ClassifySettings`)::

    tile_px = 512
    halo_px = 32
    [detection]
    thresh_sigma = 2.0
    [crossmatch]
    region_px = 1024

Command-line options override the file. Unknown keys are errors (a typo must not be
silently ignored in an overnight run).

The *processing fingerprint* (:meth:`RunConfig.fingerprint`) hashes every setting that
changes the numbers in the outputs (and the digests of the model weights; ``[pnet]`` only
with ``detector = "pnet"``, ``[bpnn]`` only when it is enabled). ``--resume`` refuses an
output directory written with a different fingerprint, so a resumed run never mixes two
configurations. ``[forced]`` and ``[classify]`` have fingerprints of their own
(:meth:`RunConfig.forced_fingerprint`, :meth:`RunConfig.classify_fingerprint`): changing
them re-runs only those stages (forced photometry, then classify).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from survey_proc import storage
from survey_proc.errors import ConfigError
from survey_proc.vocab import DETECTOR_SECTIONS

DETECTORS = tuple(DETECTOR_SECTIONS)  # the implementations: survey_proc.detect.registry
CLUSTERS = ("local", "cuda")
MODES = ("resume", "overwrite")
DETRENDS = ("sysrem", "none")


@dataclass(frozen=True)
class DetectionConfig:
    """Classical (sep) background and extraction settings."""

    bkg_mesh_px: int = 32  # background mesh size (pixels); small: the sky is estimated locally
    bkg_filter_px: int = 3  # median filter over meshes
    thresh_sigma: float = 1.5  # detection threshold in units of the background rms
    minarea_px: int = 3  # minimum connected pixels above threshold
    deblend_nthresh: int = 32
    deblend_cont: float = 0.0005  # low contrast: deblend aggressively in crowded fields
    clean: bool = False  # SExtractor cleaning (off: it swallows faint neighbours; see detect/classical.py)
    pixstack: int = 3_000_000  # sep pixel buffer (pixels); raised once on overflow
    sub_object_limit: int = 4096  # sep deblending sub-object limit; raised once on overflow
    own_margin_px: float = 2.0  # a tile keeps detections up to this far outside its core
    dedup_radius_fwhm: float = 0.5  # border de-duplication radius (x FWHM, at least 1 px)
    # artefact suppression (survey_proc/detect/artefacts.py): halos/spikes of bright stars, shattered galaxies
    suppress_artefacts: bool = False  # true: detect/artefacts.py filters sep's detections (measured: not the default)
    bright_peak_sigma: float = 50.0  # a bright star: peak >= this x the noise (or a saturated core so bordered)
    # true (default): the sky includes each saturated star's ring-median halo (photometry/halo.py); detections on it
    # are flagged HALO. With halo_detect = false it wins DECam (1.42 -> 1.05, the same detections); fitted once per
    # epoch and rendered by the forced photometry (RESULTS.md, issue 21)
    halo_sky: bool = True
    # with halo_sky, whether sep also thresholds the halo-subtracted image (true), or the image less the mesh sky alone
    # (false: the detections of halo_sky = false, their centroids, FWHM and photometry on the halo-subtracted image)
    halo_detect: bool = False
    # with halo_sky, whether the saturated stars' diffraction spikes are modelled too (photometry/halo.py: Spikes;
    # DECam shared injections 1.045 -> 0.999, RESULTS.md issue 21)
    halo_spikes: bool = True
    bright_max_radius_fwhm: float = 15.0  # a bright star's light is modelled out to this (x FWHM, <= 120 px) + its core
    artefact_ksigma: float = 5.0  # a detection on modelled light is kept when its matched-filter excess is >= this
    # a second sep pass on the image less a Moffat model of the first pass' detections finds neighbours hidden in a
    # brighter star's isophote (detect/hidden.py); with the model's own error per pixel and two cuts on what it keeps
    residual_detect: bool = False
    residual_model_error: float = 0.1  # the model's error per pixel, a fraction of the model (DAOPHOT's profile error)
    residual_min_sep_fwhm: float = 0.7  # a residual source this close (x FWHM) to a first-pass one is its core's
    residual_min_snr: float = 5.0  # ... and one with a lower aperture S/N on the residual is not kept
    # the residual's PSF: "moffat" (the Moffat of the window's FWHM, residual_model_error fixed) or "epsf" (the
    # window's empirical PSF, its profile error measured on the bright point stars; the pass is skipped where that
    # error exceeds residual_max_model_error: a PSF the window's stars do not follow leaves its cores as detections)
    residual_psf: str = "moffat"
    residual_max_model_error: float = 0.2
    residual_max_chi2: float = 2.0  # "epsf": a candidate is kept where the joint model fits its pair to this chi2/px
    # "epsf": the photometry of both members of a kept pair (photometry/pairs.py), the first-pass star moved to its
    # place in the pair's fit: "subtract" (each aperture less the other member's fitted model), "psf_fit" (the
    # pair's PSF fluxes on the block's total-flux scale) or "aperture" (plain apertures, positions unchanged)
    residual_pair_photometry: str = "subtract"
    extended_smooth_frac: float = 0.5  # a parent is extended when its 3-FWHM median-filtered light holds this share


@dataclass(frozen=True)
class PhotometryConfig:
    """Aperture photometry settings (radii scale with the measured FWHM of each block)."""

    aperture_fwhm: float = 1.0  # aperture radius in units of the FWHM
    # the window's other detections' Moffat models out of each aperture (photometry/neighbours.py)
    subtract_neighbours: bool = False
    apcorr_fwhm: float = 4.0  # radius for the aperture correction to total flux (x FWHM; 99.7 % of a Moffat(3))
    apcorr_snr_min: float = 50.0  # stars used for the aperture correction and the FWHM
    # the light within apcorr_fwhm: "sum" (the pixels' sum) or "growth" (a 2-FWHM core plus ring medians, the
    # stars' wing and the sky left by the mesh separated across the stars: photometry/growth.py)
    apcorr_method: str = "sum"
    apcorr_growth_fwhm: float = 6.0  # "growth": the outer radius of the rings (x FWHM); stars chosen as for "sum"
    winpos_subpix: int = 1  # sub-pixel sampling of sep windowed centroids (3 or 11: slower, same rms)
    fwhm_default_px: float = 2.5  # used when a block has too few bright stars to measure it
    psf_model: str = "none"  # "epsf": magnitudes from a PSF fit on the block's empirical PSF (photometry/psfphot.py)
    background: str = "mesh"  # photometry's sky: "mesh" (the detection's) or "masked" (photometry/background.py)
    # "annulus": a local sky per detection on top of the mesh (sigma-clipped median of an annulus, other detections
    # masked; photometry/aperture.py local_sky); "none": the mesh sky only
    local_sky: str = "none"
    local_sky_inner_fwhm: float = 2.0  # the annulus' inner radius (x FWHM)
    local_sky_outer_fwhm: float = 3.0  # ... and outer radius (x FWHM)
    local_sky_min_snr: float = 0.0  # the annulus sky only where |sky| >= this x its error (0: everywhere)


@dataclass(frozen=True)
class CalibrationConfig:
    """Per-epoch photometric zero point against a reference catalogue."""

    match_radius_px: float = 1.0  # reference star <-> detection
    isolation_fwhm: float = 3.0  # no other detection within this radius (x FWHM) ...
    isolation_flux_ratio: float = 0.025  # ... with at least this fraction of the star's flux (4 mag)
    snr_min: float = 20.0
    clip_sigma: float = 3.0  # sigma clipping about the median with a MAD scale
    min_stars: int = 10  # fewer: a fit flagged ZP_FEW with a widened error, down to min_stars_fit
    min_stars_fit: int = 3  # fewer: the epoch takes the zero point of the cross-epoch model
    max_stars: int = 300  # the brightest usable stars
    reference_epoch: int | None = None  # relative calibration only; None: most detections
    ensemble_max_stars: int = 2000  # stars of the field's ensemble (relative) photometry
    ensemble_snr_min: float = 10.0  # ... with at least this S/N in the reference epoch


@dataclass(frozen=True)
class CrossmatchConfig:
    """Cross-match over epochs, per spatial region of the reference frame."""

    region_px: int = 512
    match_radius_fwhm: float = 0.5  # association radius: max(this x FWHM, 3 x astrometric rms, min)
    match_radius_min_px: float = 1.0
    min_epochs: int = 3  # objects detected in fewer epochs are dropped
    seed_bin_px: float = 0.25  # detection-density map used to seed objects
    # objects this close (x FWHM) never detected in the same epoch are merged (0: never); the default won on two
    # held-out surveys (RESULTS.md, "Cross-match: alternate centroids"): catalog/crossmatch.merge_exclusive
    merge_radius_fwhm: float = 1.0


@dataclass(frozen=True)
class PNetSettings:
    """The learned detector (``detector = "pnet"``)."""

    weights: str = ""  # a detector .pt file; "" = the weights shipped in survey_proc/models/
    threshold: float = 0.0  # heatmap confidence threshold; 0 = the one on the model card
    flux_neff_fwhm2: float = 3.78  # noise-equivalent area / FWHM^2 for flux_err (Moffat beta = 3)
    refine: bool = True  # refine positions by a simultaneous PSF fit (photometry/psffit.py)
    refine_snr_min: float = 0.0  # ... of the detections with at least this S/N (all are subtracted)
    psf_beta: float = 3.0  # Moffat beta of the refinement's PSF model
    min_fit_snr: float = 3.0  # a detection whose PSF-fit flux has a lower S/N is dropped (wing artefacts)


@dataclass(frozen=True)
class BPNNSettings:
    """The Bayesian photometry network (magnitudes and their aleatoric + epistemic errors)."""

    enabled: bool = False  # True: the BPNN's magnitudes; False: the detector's own (sep aperture, PNet PSF fit)
    weights: str = ""  # a BPNN .pt file; "" = the weights shipped in survey_proc/models/
    n_samples: int = 0  # MC weight samples T; 0 = the one on the model card
    seed: int = 0  # seeds the MC samples (with the epoch and window): reruns are identical
    psf_beta: float = 3.0  # Moffat beta of the neighbours' model in the stamps


@dataclass(frozen=True)
class ClassifySettings:
    """The periodic-variable search and classifier (``survey_proc/lightcurves``), per region.

    Its settings and the classifier's weights have their own fingerprint: changing them
    re-runs only this stage on a resumed output.
    """

    enabled: bool = True
    weights: str = ""  # a classifier .pt file; "" = the weights shipped in survey_proc/models/
    threshold: float = 0.0  # p_periodic above which an object is periodic; 0 = the model card's
    clip_sigma: float = 3.0  # outlier clipping against a running median (preprocess.py)
    min_points: int = 20  # objects with fewer kept points (or < min_fraction of the epochs) are not classified
    min_fraction: float = 0.1
    period_min_days: float = 0.03  # shortest period searched (days; raised to 2 intervals of a regular sampling)
    # true: never below the classifier card's search.period_min_days, the range its inputs were trained on
    # (0.25 d for the shipped v2 model; lightcurves/search.py)
    period_min_from_model: bool = True
    period_max_days: float = 0.0  # 0: baseline / 1.15 (a positive value lowers it; periodogram.py)
    bls_period_min_days: float = 0.25  # shortest box (eclipse, transit) period; shorter ones are LS only
    bls_max_freq: int = 20_000  # the box search's frequencies are capped (oversampling lowered) ...
    bls_max_work: float = 5e8  # ... and so are its frequencies x epochs: bounded cost per curve
    min_baseline_days: float = 0.0  # a curve whose kept points span less is not classified (0: 1.6 x the BLS minimum)
    pulsator_max_fap: float = 1e-3  # a pulsator's LS peak must have a false-alarm probability <= this
    # an eclipsing binary's or transit's refined box must have a depth S/N >= this (errors rescaled by the
    # scatter; classifier.box_snr); 7: between the validation surveys' highest false call at 40/100 epochs
    # (6.3) and their lowest true binary at 1000 epochs (7.5); 0: no test
    eclipse_min_snr: float = 7.0
    # the CNN route labels a curve non_periodic only when its von Neumann ratio lies >= this many white-noise
    # spreads below 2 (variability correlated in time; preprocess.correlated_variability_z), else constant;
    # 4: the smallest of 2-6 in steps of 0.5 at which <= 0.5 % of every validation survey's clean constants keep
    # the label at 1000 epochs (ten surveys, 1.5 % before; true flares and trends keeping it 118 -> 94 of 138); 0: none
    non_periodic_min_z: float = 4.0
    # curves whose kept points span more than this (days) go to the sparse long-baseline classifier
    # (lightcurves/sparse_classifier.py; the CNN saw 3.5-d curves only); 0: the CNN classifies every curve
    sparse_span_days: float = 30.0
    sparse_weights: str = ""  # the sparse classifier's .pt file; "" = the one shipped in survey_proc/models/
    # the sparse route searches a multi-band object's period in all its bands jointly (each band its own
    # sinusoid, one frequency), then classifies each band at that period; false: each band alone
    joint_bands: bool = True
    detrend: str = "sysrem"  # systematics removed before the period search: "sysrem" or "none"
    detrend_components: int = 2  # SysRem components (trends shared by the field's stars)
    detrend_min_stars: int = 20  # fewer usable constant-looking stars in a field: no detrending
    # issue 22: a periodic call whose light varying in phase with its signal lies > blend_offset_px (px) and
    # > blend_min_sigma sigma from the object (or beyond the fit box) becomes "blended_variable"
    # (stages/blend_io.py, lightcurves/blend_vetting.py; rule fixed on validation, confirmed on held-out surveys)
    blend_vetting: bool = True
    blend_offset_px: float = 1.0
    blend_min_sigma: float = 5.0
    blend_n_boot: int = 100  # bootstrap draws (over epochs) of the offset's uncertainty
    blend_stamp_px: int = 15  # side of the per-epoch stamps (px, odd)


@dataclass(frozen=True)
class ForcedConfig:
    """Forced photometry (``survey_proc/stages/forced.py``): every object measured where it was not detected.

    Its settings have their own fingerprint (:meth:`RunConfig.forced_fingerprint`): changing
    them re-runs only this stage and the classify stage on a resumed output.
    """

    enabled: bool = True  # false: light curves hold detections only
    frame_min_stars: int = 6  # fewer clean stars to map the reference frame onto an epoch: no forced points there
    frame_snr_min: float = 10.0  # stars used for that map
    frame_margin_px: float = 128.0  # stars within the region plus this margin map it (all of the epoch's when too few)
    subtract_neighbours: bool = False  # subtract the epoch's detections (Moffat models) before the forced apertures
    neighbour_exclude_fwhm: float = 0.75  # ... except detections this close (x FWHM) to a measured position (itself)
    neighbour_beta: float = 3.0  # Moffat index of the neighbours' model


SECTIONS: dict[str, type] = {
    "pnet": PNetSettings,
    "bpnn": BPNNSettings,
    "detection": DetectionConfig,
    "photometry": PhotometryConfig,
    "calibration": CalibrationConfig,
    "crossmatch": CrossmatchConfig,
    "classify": ClassifySettings,
    "forced": ForcedConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything ``survey-proc run`` needs. Paths are strings so the config is JSON-able."""

    store: str = ""
    out: str = ""
    epochs: int | None = None  # process the first N epochs of each field (None: all)
    fields: tuple[str, ...] | None = None  # None: every field of the store
    detector: str = "sep"  # the measured winner on real images (issue 20, benchmarks/RESULTS.md); "pnet" on request
    cluster: str = "local"
    scheduler: str | None = None
    workers: int | None = None  # None: one per core (local) or per GPU (cuda)
    threads_per_worker: int = 1
    tile_px: int = 512
    halo_px: int = 32
    tiles_per_task: int = 16  # a task reads one window holding this many tiles
    retries: int = 1  # a failed unit is submitted again this many times before it is quarantined
    reference: str | None = None  # None: the store's reference_catalog attribute
    mode: str = "resume"
    progress: bool = True
    evaluate: bool = True  # compare with truth when the store was simulated
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    pnet: PNetSettings = field(default_factory=PNetSettings)
    bpnn: BPNNSettings = field(default_factory=BPNNSettings)
    photometry: PhotometryConfig = field(default_factory=PhotometryConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    crossmatch: CrossmatchConfig = field(default_factory=CrossmatchConfig)
    classify: ClassifySettings = field(default_factory=ClassifySettings)
    forced: ForcedConfig = field(default_factory=ForcedConfig)

    # settings that do not change output values
    _NOT_FINGERPRINTED = ("store", "out", "epochs", "fields", "cluster", "scheduler", "workers",
                          "threads_per_worker", "tiles_per_task", "retries", "mode", "progress", "evaluate",
                          "classify", "forced")  # the classify and forced stages have their own

    def validate(self) -> RunConfig:
        """Check values; raise :class:`ConfigError` naming the setting. Returns self.

        ``file://`` URLs for the store and the output become local paths; other fsspec URLs
        (``s3://``, ``gs://``...) stay URLs (see deployments/README.md, "Storage").
        ``memory://`` is refused: each process has its own, so workers would not see it.
        """
        for name in ("store", "out"):
            value = getattr(self, name)
            if value:
                if str(value).startswith("memory://"):
                    raise ConfigError(f"{name} {value!r}: memory:// is private to each process, so the workers "
                                      "could not see it; use a local directory or an object store (s3://...)")
                object.__setattr__(self, name, str(storage.location(value, name)))
        if self.detector not in DETECTORS:
            raise ConfigError(f"detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"cluster must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.tile_px < 64:
            raise ConfigError(f"tile_px must be >= 64 pixels, got {self.tile_px}")
        if not 0 <= self.halo_px <= self.tile_px:
            raise ConfigError(f"halo_px must be between 0 and tile_px ({self.tile_px}), got {self.halo_px}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be a positive number of epochs, got {self.epochs}")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0 (0: a failed unit is quarantined at once), got {self.retries}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.crossmatch.region_px < 64:
            raise ConfigError(f"crossmatch.region_px must be >= 64 pixels, got {self.crossmatch.region_px}")
        if self.crossmatch.merge_radius_fwhm < 0:
            raise ConfigError(f"crossmatch.merge_radius_fwhm must be >= 0 (0: never merge), got "
                              f"{self.crossmatch.merge_radius_fwhm}")
        if not self.classify.eclipse_min_snr >= 0:
            raise ConfigError(f"classify.eclipse_min_snr must be >= 0 (the box S/N an eclipse needs; 0: no test), "
                              f"got {self.classify.eclipse_min_snr}")
        if self.classify.sparse_span_days < 0:
            raise ConfigError(f"classify.sparse_span_days must be >= 0 days (0: the CNN classifies every curve), got "
                              f"{self.classify.sparse_span_days}")
        if self.crossmatch.min_epochs < 1:
            raise ConfigError(f"crossmatch.min_epochs must be >= 1, got {self.crossmatch.min_epochs}")
        if not 0.0 <= self.pnet.threshold < 1.0:
            raise ConfigError(f"pnet.threshold must be in [0, 1) (0: the model card's), got {self.pnet.threshold}")
        if self.bpnn.n_samples < 0:
            raise ConfigError(f"bpnn.n_samples must be >= 0 (0: the model card's), got {self.bpnn.n_samples}")
        if self.photometry.psf_model not in ("none", "epsf"):
            raise ConfigError(f"photometry.psf_model must be 'none' or 'epsf' (a PSF fit on the block's empirical "
                              f"PSF), got {self.photometry.psf_model!r}")
        if self.photometry.background not in ("masked", "mesh"):
            raise ConfigError(f"photometry.background must be 'masked' (the mesh background again with the detections "
                              f"masked) or 'mesh' (the detection's), got {self.photometry.background!r}")
        d = self.detection
        if d.residual_psf not in ("moffat", "epsf"):
            raise ConfigError(f"detection.residual_psf must be 'moffat' (the Moffat of the window's FWHM) or 'epsf' "
                              f"(the window's empirical PSF), got {d.residual_psf!r}")
        if not (d.residual_model_error >= 0 and d.residual_min_sep_fwhm >= 0 and d.residual_min_snr >= 0
                and d.residual_max_model_error >= 0 and d.residual_max_chi2 >= 0):
            raise ConfigError(f"detection.residual_model_error, residual_min_sep_fwhm, residual_min_snr, "
                              f"residual_max_model_error and residual_max_chi2 must be >= 0, got "
                              f"{d.residual_model_error}, {d.residual_min_sep_fwhm}, {d.residual_min_snr}, "
                              f"{d.residual_max_model_error}, {d.residual_max_chi2}")
        if d.residual_pair_photometry not in ("subtract", "psf_fit", "aperture"):
            raise ConfigError(f"detection.residual_pair_photometry must be 'subtract' (apertures less the other "
                              f"member's model), 'psf_fit' (the pair's PSF fluxes) or 'aperture', got "
                              f"{d.residual_pair_photometry!r}")
        if not isinstance(self.detection.halo_detect, bool):
            raise ConfigError(f"detection.halo_detect must be true or false (false: sep thresholds the image less the "
                              f"mesh sky alone), got {self.detection.halo_detect!r}")
        if not isinstance(self.detection.halo_spikes, bool):
            raise ConfigError(f"detection.halo_spikes must be true or false (true: the saturated stars' diffraction "
                              f"spikes are modelled in the halo sky), got {self.detection.halo_spikes!r}")
        if not isinstance(self.detection.halo_sky, bool):
            raise ConfigError(f"detection.halo_sky must be true or false (true: each saturated star's halo modelled "
                              f"in the sky), got {self.detection.halo_sky!r}")
        ph = self.photometry
        if ph.apcorr_method not in ("sum", "growth"):
            raise ConfigError(f"photometry.apcorr_method must be 'sum' (the pixels within apcorr_fwhm) or 'growth' "
                              f"(ring medians, wing and sky separated), got {ph.apcorr_method!r}")
        if ph.apcorr_method == "growth" and ph.apcorr_growth_fwhm <= 2.0:
            raise ConfigError(f"photometry.apcorr_method = 'growth' sums a 2-FWHM core and takes rings beyond it: "
                              f"photometry.apcorr_growth_fwhm must be > 2, got {ph.apcorr_growth_fwhm}")
        if ph.local_sky not in ("none", "annulus"):
            raise ConfigError(f"photometry.local_sky must be 'none' (the mesh sky only) or 'annulus' (a sigma-clipped "
                              f"annulus median around each source on top of it), got {ph.local_sky!r}")
        if ph.local_sky == "annulus" and self.forced.enabled:
            # forced photometry measures with the mesh sky: a light curve would mix two sky estimates
            raise ConfigError("photometry.local_sky = 'annulus' is not applied by forced photometry, so a light "
                              "curve would mix detections net of the annulus sky with forced points on the mesh sky: "
                              "set forced.enabled = false to use it, or photometry.local_sky = 'none'")
        if ph.local_sky_min_snr < 0:
            raise ConfigError(f"photometry.local_sky_min_snr must be >= 0 (0: the annulus sky everywhere), got "
                              f"{ph.local_sky_min_snr}")
        if not ph.aperture_fwhm < ph.local_sky_inner_fwhm < ph.local_sky_outer_fwhm:
            raise ConfigError(f"photometry.local_sky_inner_fwhm ({ph.local_sky_inner_fwhm}) must lie between "
                              f"photometry.aperture_fwhm ({ph.aperture_fwhm}) and photometry.local_sky_outer_fwhm "
                              f"({ph.local_sky_outer_fwhm})")
        c = self.classify
        if not 0.0 <= c.threshold < 1.0:
            raise ConfigError(f"classify.threshold must be in [0, 1) (0: the model card's), got {c.threshold}")
        if c.min_points < 3:
            raise ConfigError(f"classify.min_points must be >= 3, got {c.min_points}")
        if not (c.period_min_days > 0 and (c.period_max_days == 0 or c.period_max_days > c.period_min_days)):
            raise ConfigError(f"classify.period_min_days ({c.period_min_days}) must be > 0 and below "
                              f"classify.period_max_days ({c.period_max_days}; 0 = baseline / 1.15)")
        if c.detrend not in DETRENDS:
            raise ConfigError(f"classify.detrend must be one of {', '.join(DETRENDS)}, got {c.detrend!r}")
        if c.detrend_components < 1 or c.detrend_min_stars < 2:
            raise ConfigError(f"classify.detrend_components must be >= 1 and classify.detrend_min_stars >= 2, got "
                              f"{c.detrend_components} and {c.detrend_min_stars}")
        if not c.blend_offset_px > 0:
            raise ConfigError(f"classify.blend_offset_px must be > 0 px (the offset of the varying light beyond "
                              f"which a periodic call is a blend), got {c.blend_offset_px}")
        if not c.blend_min_sigma >= 0:
            raise ConfigError(f"classify.blend_min_sigma must be >= 0 (the offset's significance a blend needs), "
                              f"got {c.blend_min_sigma}")
        if c.blend_n_boot < 3:
            raise ConfigError(f"classify.blend_n_boot must be >= 3 bootstrap draws (the offset's covariance), "
                              f"got {c.blend_n_boot}")
        if c.blend_stamp_px < 9 or c.blend_stamp_px % 2 == 0:
            raise ConfigError(f"classify.blend_stamp_px must be an odd number of pixels >= 9, got "
                              f"{c.blend_stamp_px}")
        if self.forced.neighbour_exclude_fwhm < 0:
            raise ConfigError(f"forced.neighbour_exclude_fwhm must be >= 0, got {self.forced.neighbour_exclude_fwhm}")
        if self.forced.neighbour_beta <= 1:
            raise ConfigError(f"forced.neighbour_beta must be > 1 (a Moffat with finite flux), got "
                              f"{self.forced.neighbour_beta}")
        if self.forced.frame_min_stars < 3:
            raise ConfigError(f"forced.frame_min_stars must be >= 3 (an affine map has 3 unknowns per axis), got "
                              f"{self.forced.frame_min_stars}")
        if self.calibration.min_stars < 1:
            raise ConfigError(f"calibration.min_stars must be >= 1, got {self.calibration.min_stars}")
        if not 1 <= self.calibration.min_stars_fit <= self.calibration.min_stars:
            raise ConfigError(f"calibration.min_stars_fit must be between 1 and calibration.min_stars "
                              f"({self.calibration.min_stars}), got {self.calibration.min_stars_fit}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the form echoed into run.json).

        Returns
        -------
        dict
            Every setting, sections as nested dicts, ``fields`` as a list.
        """
        d = dataclasses.asdict(self)
        if d["fields"] is not None:
            d["fields"] = list(d["fields"])
        return d

    def classify_fingerprint(self, fingerprint: str, classifier_digest: str) -> str:
        """Hash of the classify stage's inputs: the run's fingerprint, its settings and weights.

        Parameters
        ----------
        fingerprint
            The run's :meth:`fingerprint`.
        classifier_digest
            SHA-256 of the classifier's weights.

        Returns
        -------
        str
            16 hex digits.
        """
        d = {"run": self.forced_fingerprint(fingerprint), "classify": dataclasses.asdict(self.classify),
             "weights": classifier_digest}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def forced_fingerprint(self, fingerprint: str) -> str:
        """Hash of the forced-photometry stage's inputs: the run's fingerprint and its ``[forced]`` settings.

        Parameters
        ----------
        fingerprint
            The run's :meth:`fingerprint`.

        Returns
        -------
        str
            16 hex digits.
        """
        d = {"run": fingerprint, "forced": dataclasses.asdict(self.forced)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def fingerprint(self, models: dict[str, str] | None = None) -> str:
        """Hash of every setting that changes output values (16 hex digits).

        ``models`` (name -> weights digest) joins the hash: new weights are a new output.

        Parameters
        ----------
        models
            Model name -> SHA-256 of its weights; None: no models.

        Returns
        -------
        str
            16 hex digits.
        """
        d = {k: v for k, v in self.to_dict().items() if k not in self._NOT_FINGERPRINTED}
        for name, sections in DETECTOR_SECTIONS.items():  # settings of a detector this run does not use
            if name != self.detector:
                for s in sections:
                    d.pop(s, None)
        if not self.bpnn.enabled:
            d.pop("bpnn", None)
        if models:
            d["models"] = models
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _section(cls: type, name: str, values: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{name}]: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def config_from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from a (TOML-shaped) dict, on top of ``base``.

    Parameters
    ----------
    data
        Top-level settings and section tables (``{"detection": {...}, ...}``); a section's
        keys replace those of ``base``'s section, the others stay.
    base
        The configuration to start from; None: the defaults.

    Returns
    -------
    RunConfig
        Not validated (see :meth:`RunConfig.validate`).

    Raises
    ------
    ConfigError
        For an unknown setting or a section that is not a table.
    """
    base = base or RunConfig()
    top_known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(data) - top_known)
    if unknown:
        raise ConfigError(f"unknown run setting(s): {', '.join(unknown)}; sections are "
                          f"{', '.join('[' + s + ']' for s in SECTIONS)}")
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table of settings, got {value!r}")
            current = dataclasses.asdict(getattr(base, key))
            changes[key] = _section(SECTIONS[key], key, current | value)
        elif key == "fields" and value is not None:
            changes[key] = tuple(str(v) for v in value)
        else:
            changes[key] = value
    return replace(base, **changes)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (TOML, optional), apply ``overrides`` (None values are ignored), validate.

    Parameters
    ----------
    path
        A TOML run configuration; None: the defaults.
    overrides
        Settings applied last (e.g. from the command line), in the form of :func:`config_from_dict`.

    Returns
    -------
    RunConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        For a missing or invalid file, an unknown setting or a value out of range.
    """
    cfg = RunConfig()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"run configuration {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"run configuration {p} is not valid TOML: {exc}") from None
        cfg = config_from_dict(data, cfg)
    if overrides:
        cfg = config_from_dict({k: v for k, v in overrides.items() if v is not None}, cfg)
    return cfg.validate()


def config_from_json(d: dict[str, Any]) -> RunConfig:
    """Inverse of :meth:`RunConfig.to_dict` (used by worker tasks).

    Parameters
    ----------
    d
        A dict from :meth:`RunConfig.to_dict`.

    Returns
    -------
    RunConfig
        Not validated.
    """
    return config_from_dict(d)

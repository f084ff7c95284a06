"""Pixels for the blend vetting of periodic calls (issue 22): per-epoch stamps, sub-pixel offsets, frame Jacobians.

The pure measurement is :func:`survey_proc.lightcurves.blend_vetting.vet_blend`; this module
does its I/O for the classify stage (and ``benchmarks/blend_centroid.py``): for each
calibrated epoch it maps the reference frame onto the epoch with the forced stage's frame
map (kept by that stage, :func:`survey_proc.stages.forced.load_frames`, or fitted again with
:func:`survey_proc.stages.forced._epoch_frame` on the epoch's clean stars near the region),
reads the epoch's pixels once (:class:`survey_proc.store.PixelReader`, one window around all
the candidates, :data:`READ_BLOCK_EPOCHS` epochs per read; any mask bit -> NaN) and cuts an
``n x n`` stamp at the nearest pixel of each candidate. The stamps are put on one photometric
scale by the epochs' zero points (``10 ** (-0.4 (zp - median zp))``), as the light curves'
fluxes are by :func:`lightcurve_flux`.

An epoch whose frame cannot be mapped or whose pixels cannot be read keeps NaN stamps (the
vetting leaves it out) and is counted with its reason; nothing here raises for one epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from survey_proc import storage, store
from survey_proc import vocab as F
from survey_proc.catalog import crossmatch as xm
from survey_proc.catalog.frame_map import FrameMap
from survey_proc.errors import SurveyProcError
from survey_proc.lightcurves.blend_vetting import BlendVetting, model_variation, vet_blend
from survey_proc.stages.crossmatch import LIGHTCURVES_UNIT
from survey_proc.stages.forced import _epoch_frame, load_frames

#: light-curve points that do not measure the model (a forced point may be negative: it still does)
LC_BAD = F.PHOTOMETRY_BAD & ~F.NONPOSITIVE
JACOBIAN_STEP_PX = 0.5  # half-step of the central differences of the frame map (px)
MAX_REASONS = 20  # skipped epochs listed (the count is always complete)
READ_BLOCK_EPOCHS = 32  # epochs read in one Zarr selection (their union window; 32 x 512^2 float32 = 32 MB)


@dataclass
class EpochStamps:
    """The candidates' stamps over the field's epochs.

    Attributes
    ----------
    epochs
        ``(n_epochs,)`` epoch numbers, in the order of the stamps' second axis.
    mjd, fwhm_px, scale
        Per epoch: mid-exposure MJD (days), PSF FWHM (px), and the factor that puts the epoch's
        ADU on the common photometric scale (dimensionless).
    stamps
        ``(n_candidates, n_epochs, n, n)`` pixels (ADU x ``scale``, float32; NaN: masked, off the
        image, or an epoch left out).
    dx, dy
        ``(n_candidates, n_epochs)`` the candidate's epoch position minus the stamp centre's (px).
    jacobian
        ``(n_candidates, 2, 2)`` mean derivative of the epoch position over the reference position.
    skipped
        Epoch -> why it was left out (frame map or pixels).
    """

    epochs: np.ndarray
    mjd: np.ndarray
    fwhm_px: np.ndarray
    scale: np.ndarray
    stamps: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    jacobian: np.ndarray
    skipped: dict[int, str] = field(default_factory=dict)


def cut_stamps(image: np.ndarray, xe: np.ndarray, ye: np.ndarray, r: int, mask: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stamps at the nearest pixels of positions, and the positions' sub-pixel offsets.

    Parameters
    ----------
    image
        ``(ny, nx)`` pixels (NaN marks bad ones).
    xe, ye
        Positions in ``image``'s pixel frame (px, 0-based, pixel centres at integers).
    r
        Half-size: stamps are ``2 r + 1`` px square.
    mask
        ``(ny, nx)`` mask bits of ``image``, or None: a pixel with any bit set is NaN in the stamps.

    Returns
    -------
    stamps, dx, dy
        ``(n, 2r+1, 2r+1)`` float32 stamps (NaN outside the image, at masked and non-finite pixels)
        and ``xe - round(xe)``, ``ye - round(ye)`` (px).
    """
    ny, nx = image.shape
    ix, iy = np.rint(xe).astype(int), np.rint(ye).astype(int)
    off = np.arange(-r, r + 1)
    rows, cols = iy[:, None] + off, ix[:, None] + off  # (n, 2r+1) each
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    ri, ci = np.clip(rows, 0, max(ny - 1, 0))[:, :, None], np.clip(cols, 0, max(nx - 1, 0))[:, None, :]
    if image.size == 0:
        return np.full((len(xe), 2 * r + 1, 2 * r + 1), np.nan, np.float32), xe - ix, ye - iy
    out = image[ri, ci].astype(np.float32)
    bad = ~inside | ~np.isfinite(out)
    if mask is not None:
        bad |= mask[ri, ci] != 0
    out[bad] = np.nan
    return out, xe - ix, ye - iy


def frame_jacobian(fmap: Any, x_ref: np.ndarray, y_ref: np.ndarray, h: float = JACOBIAN_STEP_PX) -> np.ndarray:
    """``(n, 2, 2)`` derivative of a frame map at each position (central differences of ``h`` px).

    ``[[dx/dx_ref, dx/dy_ref], [dy/dx_ref, dy/dy_ref]]`` per position; ``fmap(x_ref, y_ref)``
    returns the epoch positions.
    """
    ax1, ay1 = fmap(x_ref + h, y_ref)
    ax0, ay0 = fmap(x_ref - h, y_ref)
    bx1, by1 = fmap(x_ref, y_ref + h)
    bx0, by0 = fmap(x_ref, y_ref - h)
    return np.stack([np.stack([(ax1 - ax0) / (2 * h), (bx1 - bx0) / (2 * h)], -1),
                     np.stack([(ay1 - ay0) / (2 * h), (by1 - by0) / (2 * h)], -1)], 1)


def zp_scale(zp: np.ndarray) -> np.ndarray:
    """``10 ** (-0.4 (zp - median zp))``: per epoch, the factor putting its ADU on one photometric scale."""
    zp = np.asarray(zp, float)
    return np.asarray(10.0 ** (-0.4 * (zp - float(np.nanmedian(zp)))))


def read_stamps(store_path: str, out: str, field_id: str, region: xm.Region, x_ref: np.ndarray,
                y_ref: np.ndarray, epochs: list[dict[str, Any]], image_shape: tuple[int, int], forced_cfg: Any,
                *, stamp_px: int = 15, frames: dict[int, FrameMap] | None = None) -> EpochStamps:
    """Per-epoch stamps of positions ``x_ref, y_ref`` (reference frame) of one region.

    Parameters
    ----------
    store_path, out, field_id, region
        The survey store, the run's output directory (its ``sources/`` map the frames), the
        field and the region (the frame map is fitted on the stars near it).
    x_ref, y_ref
        The candidates' reference-frame positions (px).
    epochs
        The field's calibrated epochs: dicts with ``epoch``, ``mjd`` (days), ``fwhm_px`` (px)
        and ``zp`` (mag, or a :meth:`ZeroPoint.to_dict` dict).
    image_shape
        ``(ny, nx)`` of the field's images (px).
    forced_cfg
        The ``[forced]`` settings (frame map: ``frame_snr_min``, ``frame_min_stars``, ``frame_margin_px``).
    stamp_px
        Stamp side (px, odd).
    frames
        Epoch -> frame map kept by the forced stage (:func:`survey_proc.stages.forced.load_frames`);
        an epoch without one gets its map fitted here (the same fit).

    Returns
    -------
    EpochStamps
    """
    x_ref, y_ref = np.asarray(x_ref, float), np.asarray(y_ref, float)
    eps = sorted(epochs, key=lambda e: int(e["epoch"]))
    n_ep, nc, r = len(eps), len(x_ref), stamp_px // 2
    zps = np.array([float(e["zp"]["zp"] if isinstance(e["zp"], dict) else e["zp"]) for e in eps])
    scale = zp_scale(zps) if n_ep else np.zeros(0)
    stamps = np.full((nc, n_ep, stamp_px, stamp_px), np.nan, np.float32)
    dxs, dys = np.full((nc, n_ep), np.nan), np.full((nc, n_ep), np.nan)
    jac = np.zeros((nc, 2, 2))
    n_jac = 0
    skipped: dict[int, str] = {}
    ny, nx = image_shape
    reader: store.PixelReader | None = None  # opened at the first read (an unreadable store: every epoch says why)
    pending: list[tuple[int, int, Any, np.ndarray, np.ndarray, tuple[int, int, int, int]]] = []

    def read_pending() -> None:
        """Read the pending epochs' pixels in one window (one by one if that fails) and cut their stamps."""
        nonlocal reader, jac, n_jac
        win = tuple(f(p[5][k] for p in pending) for k, f in enumerate((min, max, min, max)))
        got: list[tuple[np.ndarray, np.ndarray | None, int, int] | None] = []
        try:
            reader = reader or store.PixelReader(store_path, field_id)
            images, masks = reader.windows([p[1] for p in pending], *win)
            got = [(images[k], None if masks is None else masks[k], win[0], win[2]) for k in range(len(pending))]
        except (SurveyProcError, OSError, ValueError, KeyError):  # one by one: the bad epoch is named, the rest read
            for p in pending:
                try:
                    reader = reader or store.PixelReader(store_path, field_id)
                    image, mask = reader.window(p[1], *p[5])
                    got.append((image, mask, p[5][0], p[5][2]))
                except (SurveyProcError, OSError, ValueError, KeyError) as exc:
                    skipped[p[1]] = str(exc)
                    got.append(None)
        for (i, _, fmap, xe, ye, _), g in zip(pending, got, strict=True):
            if g is None:
                continue
            jac += frame_jacobian(fmap, x_ref, y_ref)
            n_jac += 1
            st, dxs[:, i], dys[:, i] = cut_stamps(g[0], xe - g[3], ye - g[2], r, g[1])
            stamps[:, i] = st * np.float32(scale[i])
        pending.clear()

    for i, ep in enumerate(eps):
        e = int(ep["epoch"])
        if not np.isfinite(scale[i]):
            skipped[e] = f"field {field_id} epoch {e}: no zero point"
            continue
        try:
            fmap = (frames or {}).get(e) or _epoch_frame(out, field_id, e, region, forced_cfg)[0]
            xe, ye = fmap(x_ref, y_ref)
        except (SurveyProcError, OSError, ValueError, KeyError) as exc:  # this epoch is left out, the others go on
            skipped[e] = str(exc)
            continue
        y0, y1 = int(max(0, np.floor(np.min(ye)) - r - 1)), int(min(ny, np.ceil(np.max(ye)) + r + 2))
        x0, x1 = int(max(0, np.floor(np.min(xe)) - r - 1)), int(min(nx, np.ceil(np.max(xe)) + r + 2))
        if y1 <= y0 or x1 <= x0:
            skipped[e] = f"field {field_id} epoch {e}: the candidates fall off the image"
            continue
        pending.append((i, e, fmap, xe, ye, (y0, y1, x0, x1)))
        if len(pending) >= READ_BLOCK_EPOCHS:
            read_pending()
    if pending:
        read_pending()
    jac = jac / n_jac if n_jac else np.broadcast_to(np.eye(2), (nc, 2, 2)).copy()
    return EpochStamps(epochs=np.array([int(e["epoch"]) for e in eps], int),
                       mjd=np.array([float(e["mjd"]) for e in eps]),
                       fwhm_px=np.array([float(e["fwhm_px"]) for e in eps]), scale=scale, stamps=stamps,
                       dx=dxs, dy=dys, jacobian=jac, skipped=skipped)


def lightcurve_flux(lc: pd.DataFrame, object_id: int, st: EpochStamps) -> np.ndarray:
    """The object's clean fluxes on the stamps' epochs and photometric scale (NaN where missing).

    Parameters
    ----------
    lc
        Light-curve rows (``object_id, epoch, flux, flags``); points with :data:`LC_BAD` flags are ignored.
    object_id
        The object.
    st
        The stamps (their epochs and scale).
    """
    rows = lc[(lc["object_id"].to_numpy() == object_id) & ((lc["flags"].to_numpy() & LC_BAD) == 0)]
    flux = np.full(len(st.epochs), np.nan)
    k = pd.Series(np.arange(len(st.epochs)), index=st.epochs).reindex(rows["epoch"].to_numpy(int)).to_numpy()
    ok = np.isfinite(k)
    kk = k[ok].astype(int)
    flux[kk] = rows["flux"].to_numpy(float)[ok] * st.scale[kk]
    return flux


#: ``objects`` columns of the blend vetting (NaN / null for objects not vetted)
BLEND_COLUMNS = ("blend_dx_px", "blend_dy_px", "blend_offset_px", "blend_offset_sigma_px", "blend_significance",
                 "blend_amp_snr", "blend_at_bound", "blend_reason")


def vet_region(store_path: str, out: str, field_id: str, region: xm.Region, candidates: pd.DataFrame,
               epochs: list[dict[str, Any]], image_shape: tuple[int, int], forced_cfg: Any, *, n_boot: int = 100,
               stamp_px: int = 15, seed: int = 0, full_boot_above_px: float = 0.0
               ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Where the varying light of each periodic candidate of one region is.

    Parameters
    ----------
    store_path, out, field_id, region, epochs, image_shape, forced_cfg, stamp_px
        As :func:`read_stamps`.
    candidates
        The periodic calls: ``object_id, x, y`` (reference frame, px), ``period`` (days), ``t0_mjd``.
    n_boot, seed, full_boot_above_px
        Bootstrap draws, seed and the offset (px) below which a candidate gets fewer draws
        (:func:`vet_blend`).

    Returns
    -------
    results, info
        One row per candidate indexed by ``object_id`` with :data:`BLEND_COLUMNS` (offsets in px,
        reference frame; ``blend_reason`` null when vetted, else why not), and what was read
        (``n_epochs``, ``n_epochs_skipped``, ``epochs_skipped``, ``n_frames_kept``: epochs mapped
        by the forced stage's kept frame maps, ``read_s``: seconds spent reading).
    """
    rows: dict[int, dict[str, Any]] = {}
    ids = candidates["object_id"].to_numpy().astype(np.int64)
    t0 = time.perf_counter()
    frames = load_frames(out, field_id, region.index)
    st = read_stamps(store_path, out, field_id, region, candidates["x"].to_numpy(float),
                     candidates["y"].to_numpy(float), epochs, image_shape, forced_cfg, stamp_px=stamp_px,
                     frames=frames)
    info = {"n_epochs": len(st.epochs), "n_epochs_skipped": len(st.skipped), "n_frames_kept": len(frames or {}),
            "epochs_skipped": {str(k): v for k, v in sorted(st.skipped.items())[:MAX_REASONS]},
            "read_s": time.perf_counter() - t0}
    lpath = LIGHTCURVES_UNIT.path(out, field=field_id, region=region.index)
    lc = storage.read_table(lpath, columns=["object_id", "epoch", "flux", "flags"],
                            filters=[("object_id", "in", ids.tolist())]).to_pandas()
    fwhm_med = float(np.nanmedian(st.fwhm_px)) if len(st.fwhm_px) else float("nan")
    for j, oid in enumerate(ids):
        c = candidates.iloc[j]
        try:
            m = model_variation(st.mjd, lightcurve_flux(lc, int(oid), st), float(c["period"]), float(c["t0_mjd"]))
            res: BlendVetting = vet_blend(st.stamps[j], st.dx[j], st.dy[j], m, fwhm_px=fwhm_med,
                                          jacobian=st.jacobian[j], nuisance=st.fwhm_px[:, None], n_boot=n_boot,
                                          seed=seed, full_boot_above_px=full_boot_above_px)
        except ValueError as exc:  # too few epochs, no variation, no fit: not vetted, with the reason
            rows[int(oid)] = {"blend_reason": f"not_vetted: {exc}"}
            continue
        rows[int(oid)] = {"blend_dx_px": res.dx, "blend_dy_px": res.dy, "blend_offset_px": res.offset,
                          "blend_offset_sigma_px": res.sigma_offset, "blend_significance": res.offset_significance,
                          "blend_amp_snr": res.amplitude_snr, "blend_at_bound": res.at_bound, "blend_reason": None}
    return pd.DataFrame.from_dict(rows, orient="index").reindex(ids, columns=list(BLEND_COLUMNS)), info


def is_blend(offset_px: np.ndarray, sigma_px: np.ndarray, at_bound: np.ndarray, *, min_offset_px: float = 1.0,
             min_sigma: float = 5.0) -> np.ndarray:
    """The rule of issue 22: varying light > ``min_offset_px`` and > ``min_sigma`` sigma away, or beyond the fit box.

    Parameters
    ----------
    offset_px, sigma_px
        Offset of the varying light from the object and its standard deviation (px); NaN: not vetted.
    at_bound
        The fit hit its box (the varying light is farther than it); null/NaN: not vetted.
    min_offset_px, min_sigma
        The rule's thresholds (px; multiples of ``sigma_px``).

    Returns
    -------
    ndarray of bool
        True for a blend; False where not vetted.
    """
    off = np.asarray(offset_px, float)
    sig = np.asarray(sigma_px, float)
    bound = np.array([b is not None and b == b and bool(b) for b in np.asarray(at_bound, object)], bool)
    with np.errstate(invalid="ignore"):
        far = np.isfinite(off) & (off > min_offset_px) & (off > min_sigma * sig)
    return np.asarray((far | (bound & np.isfinite(off))), bool)

"""Registration of an epoch without a (usable) WCS to a reference epoch, from star lists alone.

Method (asterism matching, as astroalign / Lang et al.'s astrometry.net quads, in small):

1. The ``n_bright`` brightest sources of each list; for each, the triangles it forms with
   pairs of its ``k`` nearest bright neighbours.
2. Each triangle's invariants: the ratios of its sorted side lengths ``(L2/L3, L1/L3)``
   (unchanged by shift, rotation and scale). Triangles of the two lists are matched in
   invariant space with a KD-tree; each match votes for its 3 vertex correspondences.
3. RANSAC over the (at most 200) most-voted correspondences: the similarity (shift +
   rotation + scale) from two pairs; the one that the most pairs agree with within
   ``tol_px`` is kept.
4. Refinement: every epoch source whose transformed position lies within the match radius
   of a reference source (nearest neighbour, both ways), a least-squares **affine** fit
   (weighted by ``min(S/N, 200)^2`` when given), 3-sigma clipping (3 rounds); repeated with
   the radius ``tol_px``, then twice ``match_radius_px``.

Returns a :class:`Registration`: the 2 x 3 affine matrix ``A`` that maps epoch pixels to
reference pixels, ``[x_ref, y_ref] = A @ [x, y, 1]``, the number of stars used, the
residual RMS (px), and the shift, rotation and scale it implies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from survey_proc.catalog.image_shift import ImageShiftError, image_shift
from survey_proc.errors import SurveyProcError

ASTERISM = "asterism"
PHASE_CORRELATION = "phase correlation + stars"
# random pairs within a match radius R scatter by ~0.5 R per axis about a fit; genuine ones by centroid errors
RANDOM_SCATTER = 0.25
RAYLEIGH_MEDIAN = float(np.sqrt(2 * np.log(2)))  # median distance / per-axis sigma of 2-D Gaussian residuals


class RegistrationError(SurveyProcError):
    """Two star lists could not be registered."""


@dataclass(frozen=True)
class Registration:
    """Result of :func:`register`."""

    matrix: np.ndarray  # (2, 3): epoch pixels -> reference pixels
    n_stars: int  # stars in the final fit
    rms_px: float  # residual RMS per axis of the fit (pixels, reference frame)
    shift_px: tuple[float, float]
    rotation_deg: float
    scale: float
    method: str = ASTERISM  # ASTERISM or PHASE_CORRELATION
    correlation_sigma: float | None = None  # significance of the phase-correlation peak (robust sigma)
    initial_shift_px: tuple[float, float] | None = None  # the phase-correlation translation (px)

    def apply(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Epoch pixel positions -> reference pixel positions.

        Parameters
        ----------
        x, y
            Epoch pixel positions (px).

        Returns
        -------
        x_ref, y_ref
            Reference pixel positions (px).
        """
        a = self.matrix
        return a[0, 0] * x + a[0, 1] * y + a[0, 2], a[1, 0] * x + a[1, 1] * y + a[1, 2]

    def to_dict(self) -> dict:
        """JSON-able form for run.json.

        Returns
        -------
        dict
            ``matrix`` (nested lists), ``n_stars``, ``rms_px``, ``shift_px``, ``rotation_deg``, ``scale``,
            ``method``; after phase correlation also ``correlation_sigma`` and ``initial_shift_px``.
        """
        out = {"matrix": self.matrix.tolist(), "n_stars": self.n_stars, "rms_px": self.rms_px,
               "shift_px": list(self.shift_px), "rotation_deg": self.rotation_deg, "scale": self.scale,
               "method": self.method}
        if self.correlation_sigma is not None:
            out["correlation_sigma"] = self.correlation_sigma
        if self.initial_shift_px is not None:
            out["initial_shift_px"] = list(self.initial_shift_px)
        return out


def _triangles(xy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Invariants (m, 2) and vertex indices (m, 3) of the triangles of each point with its k neighbours.

    Vertices are ordered by the opposite side: vertex 0 faces the shortest side, 2 the longest,
    so matched triangles give vertex correspondences directly.
    """
    n = len(xy)
    k = min(k, n - 1)
    if k < 2:
        return np.zeros((0, 2)), np.zeros((0, 3), int)
    _, nb = cKDTree(xy).query(xy, k + 1)
    tri = set()
    for i in range(n):
        js = nb[i, 1:]
        for a in range(len(js)):
            for b in range(a + 1, len(js)):
                tri.add(tuple(sorted((i, int(js[a]), int(js[b])))))
    t = np.array(sorted(tri), int)
    p = xy[t]  # (m, 3, 2)
    # side opposite each vertex
    s = np.stack([np.hypot(*(p[:, 1] - p[:, 2]).T), np.hypot(*(p[:, 0] - p[:, 2]).T),
                  np.hypot(*(p[:, 0] - p[:, 1]).T)], 1)
    order = np.argsort(s, 1)
    s_sorted = np.take_along_axis(s, order, 1)
    ok = s_sorted[:, 0] > 1e-6
    inv = np.c_[s_sorted[:, 1] / s_sorted[:, 2], s_sorted[:, 0] / s_sorted[:, 2]]
    return inv[ok], np.take_along_axis(t, order, 1)[ok]


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (2 x 3) mapping src -> dst (Umeyama, no reflection)."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    cov = b.T @ a / len(src)
    u, d, vt = np.linalg.svd(cov)
    sgn = np.sign(np.linalg.det(u @ vt)) or 1.0
    dm = np.diag([1.0, sgn])
    r = u @ dm @ vt
    scale = np.trace(np.diag(d) @ dm) / max(a.var(0).sum(), 1e-30)
    m = np.zeros((2, 3))
    m[:, :2] = scale * r
    m[:, 2] = md - scale * r @ ms
    return m


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:, :2].T + m[:, 2]


def _affine(src: np.ndarray, dst: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    a = np.c_[src, np.ones(len(src))]
    sw = np.ones(len(src)) if w is None else np.sqrt(w)
    sol, *_ = np.linalg.lstsq(a * sw[:, None], dst * sw[:, None], rcond=None)
    return sol.T


def _mutual_matches(p: np.ndarray, tree_r: cKDTree, ref_xy: np.ndarray, radius: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours within ``radius`` (px): indices into ``p`` and the matched indices into ``ref_xy``."""
    d, j = tree_r.query(p, distance_upper_bound=radius)
    sel = np.isfinite(d)
    back = cKDTree(p).query(ref_xy[j[sel]])[1]
    keep = np.flatnonzero(sel)[back == np.flatnonzero(sel)]
    return keep, j[keep]


def _clipped_affine(src: np.ndarray, dst: np.ndarray, w: np.ndarray | None, *, robust_start: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Affine fit src -> dst with 3 rounds of 3-sigma clipping; the matrix and the kept pairs.

    ``robust_start``: the first round's scatter is 1.4826 x the median residual instead of
    the RMS (for match lists that may hold many wrong pairs).
    """
    clip = np.ones(len(src), bool)
    m = np.zeros((2, 3))
    for k in range(3):
        m = _affine(src[clip], dst[clip], None if w is None else w[clip])
        r = _apply(m, src) - dst
        if w is None:
            s = (np.median(np.hypot(*r[clip].T)) / RAYLEIGH_MEDIAN if robust_start and k == 0
                 else np.sqrt(np.mean(r[clip] ** 2)))
            clip = np.hypot(*r.T) < max(3 * s * np.sqrt(2), 1e-3)
        else:  # residuals in units of the expected scatter ~ 1 / snr
            z = np.hypot(*r.T) * np.sqrt(w)
            s = (np.sqrt(2) * np.median(z[clip]) / RAYLEIGH_MEDIAN if robust_start and k == 0
                 else np.sqrt(np.mean(z[clip] ** 2)))
            clip = z < max(3 * s, 1e-3)
    return m, clip


def register(xy: np.ndarray, flux: np.ndarray, ref_xy: np.ndarray, ref_flux: np.ndarray, *, n_bright: int = 40,
             k: int = 5, tol_px: float = 2.0, match_radius_px: float = 1.5, min_stars: int = 6,
             seed: int = 0, snr: np.ndarray | None = None) -> Registration:
    """Register an epoch's sources to a reference list (see the module docstring).

    Parameters
    ----------
    xy, flux
        The epoch's source positions (n, 2) (pixels) and fluxes (any unit: only the order counts).
    ref_xy, ref_flux
        The reference list.
    n_bright
        Brightest sources of each list used for the asterisms.
    k
        Neighbours per source forming triangles.
    tol_px
        RANSAC inlier tolerance (pixels).
    match_radius_px
        Radius of the refinement matches (pixels).
    min_stars
        Fewer stars in the final fit is an error.
    snr
        S/N of the epoch's sources; the affine fit then weights each star by
        ``min(snr, 200)^2`` (its centroid variance ~ 1/snr^2). None: equal weights.

    Returns
    -------
    Registration
        The transformation and its quality.

    Raises
    ------
    RegistrationError
        When the lists are too sparse, do not overlap, or fewer than ``min_stars`` stars match.
    """
    xy, ref_xy = np.asarray(xy, float), np.asarray(ref_xy, float)
    if len(xy) < 3 or len(ref_xy) < 3:
        raise RegistrationError(f"too few sources to register ({len(xy)} in the epoch, {len(ref_xy)} in the "
                                "reference); at least 3 are needed, better 20")
    bi = np.argsort(-np.asarray(flux, float))[:n_bright]
    br = np.argsort(-np.asarray(ref_flux, float))[:n_bright]
    inv_s, tri_s = _triangles(xy[bi], k)
    inv_r, tri_r = _triangles(ref_xy[br], k)
    if len(inv_s) == 0 or len(inv_r) == 0:
        raise RegistrationError("no star triangles to match; the lists are too sparse")
    d, j = cKDTree(inv_r).query(inv_s, distance_upper_bound=0.01)
    ok = np.isfinite(d)
    if not ok.any():
        raise RegistrationError("no matching star triangles between the epoch and the reference")
    pairs = np.c_[bi[tri_s[ok].ravel()], br[tri_r[j[ok]].ravel()]]
    pairs, votes = np.unique(pairs, axis=0, return_counts=True)
    order = np.argsort(-votes)
    pairs = pairs[order][:200]
    rng = np.random.default_rng(seed)
    best, best_n = None, 0
    n_p = len(pairs)
    trials = min(500, n_p * (n_p - 1) // 2)
    for _ in range(trials):
        a, b = rng.choice(n_p, 2, replace=False)
        if np.hypot(*(xy[pairs[a, 0]] - xy[pairs[b, 0]])) < 5:
            continue
        m = _similarity(xy[pairs[[a, b], 0]], ref_xy[pairs[[a, b], 1]])
        res = np.hypot(*(_apply(m, xy[pairs[:, 0]]) - ref_xy[pairs[:, 1]]).T)
        n_in = int((res < tol_px).sum())
        if n_in > best_n:
            best, best_n = m, n_in
    if best is None or best_n < 3:
        raise RegistrationError(f"no consistent transformation (best {best_n} agreeing star pairs); the epoch "
                                "and the reference may not overlap")
    m = best
    tree_r = cKDTree(ref_xy)
    n_used, rms = 0, np.inf
    for radius in (tol_px, match_radius_px, match_radius_px):
        keep, j = _mutual_matches(_apply(m, xy), tree_r, ref_xy, radius)
        if len(keep) < min_stars:
            raise RegistrationError(f"only {len(keep)} stars match after the first solution (need {min_stars})")
        src, dst = xy[keep], ref_xy[j]
        w = None if snr is None else np.clip(np.asarray(snr, float)[keep], 1.0, 200.0) ** 2
        m, clip = _clipped_affine(src, dst, w)
        n_used, rms = int(clip.sum()), float(np.sqrt(np.mean((_apply(m, src[clip]) - dst[clip]) ** 2)))
    return _result(m, n_used, rms)


def _result(m: np.ndarray, n_used: int, rms: float, method: str = ASTERISM, correlation_sigma: float | None = None,
            initial_shift_px: tuple[float, float] | None = None) -> Registration:
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    rot = float(np.degrees(np.arctan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1])))
    return Registration(m, n_used, rms, (float(m[0, 2]), float(m[1, 2])), rot, scale, method, correlation_sigma,
                        initial_shift_px)


def register_by_image(xy: np.ndarray, flux: np.ndarray, ref_xy: np.ndarray, ref_flux: np.ndarray,
                      image: np.ndarray, ref_image: np.ndarray, *, image_origin_px: tuple[int, int] = (0, 0),
                      ref_xy_out: np.ndarray | None = None,
                      bad: np.ndarray | None = None, ref_bad: np.ndarray | None = None,
                      match_radius_px: float = 1.5, min_stars: int = 6, snr: np.ndarray | None = None,
                      max_rotation_deg: float = 1.0, n_bright: int = 300, min_significance: float = 12.0,
                      max_window_px: int = 1024) -> Registration:
    """Register an epoch to a reference by the images' translation, then by matched stars (an affine fit).

    1. The translation by band-limited phase correlation of the two images
       (:func:`survey_proc.catalog.image_shift.image_shift`, central window of at most
       ``max_window_px``).
    2. Stars: the epoch's positions moved by that translation are matched to the
       reference's (mutual nearest neighbours) and an affine transform is fitted with
       3-sigma clipping (weights ``min(snr, 200)^2`` when ``snr`` is given), four times
       with a shrinking radius: ``r0 = max(2 match_radius_px, 4)`` on the ``n_bright``
       brightest stars of each list within ``(r0 - 1) / tan(max_rotation_deg)`` of the
       window centre (where a rotation of up to ``max_rotation_deg`` moves no star by more
       than the radius), then ``r0`` on all, then ``match_radius_px`` twice. The first fit
       must scatter by less than ``r0 / 4`` RMS per axis (random pairs within ``r0``
       scatter by ~``r0 / 2``).

    Parameters
    ----------
    xy, flux
        The epoch's source positions (n, 2) in its image's pixels (px) and fluxes (any unit).
    ref_xy, ref_flux
        The reference sources in the reference image's pixels (px), and fluxes.
    image, ref_image
        The two images (ADU), same shape; NaN/inf allowed. They may be windows of the frames
        the positions are in (see ``image_origin_px``).
    image_origin_px
        ``(x0, y0)``: the position (px) of the arrays' pixel ``[0, 0]`` in the frames of ``xy``
        and ``ref_xy`` (both windows cut at the same place).
    ref_xy_out
        The reference sources' positions in the frame the result maps to (e.g. the field's
        reference frame through a WCS); None: ``ref_xy``.
    bad, ref_bad
        Pixels of each image not to use in the correlation (True), or None.
    match_radius_px
        Final radius of the star matches (px).
    min_stars
        Fewer stars in any fit is an error.
    snr
        S/N of the epoch's sources (weights), or None for equal weights.
    max_rotation_deg
        Largest rotation between the images the first match radius allows for (degrees).
    n_bright
        Brightest sources of each list in the first match.
    min_significance
        Weakest phase-correlation peak accepted (robust sigma; noise alone reaches ~8, two
        unrelated star fields ~10 on 600-px windows of the M67 plate).
    max_window_px
        Side of the central window correlated (px).

    Returns
    -------
    Registration
        Epoch pixels -> ``ref_xy_out`` frame, with ``method`` "phase correlation + stars",
        ``correlation_sigma`` and ``initial_shift_px``.

    Raises
    ------
    RegistrationError
        When the correlation has no significant peak or fewer than ``min_stars`` stars match.
    """
    xy, ref_xy = np.asarray(xy, float).reshape(-1, 2), np.asarray(ref_xy, float).reshape(-1, 2)
    ref_out = ref_xy if ref_xy_out is None else np.asarray(ref_xy_out, float).reshape(-1, 2)
    if len(xy) < min_stars or len(ref_xy) < min_stars:
        raise RegistrationError(f"too few sources to register ({len(xy)} in the epoch, {len(ref_xy)} in the "
                                f"reference); at least {min_stars} are needed")
    try:
        sh = image_shift(image, ref_image, bad=bad, ref_bad=ref_bad, max_size_px=max_window_px,
                         min_significance=min_significance)
    except ImageShiftError as exc:
        raise RegistrationError(str(exc)) from None
    m = np.array([[1.0, 0.0, sh.dx], [0.0, 1.0, sh.dy]])
    y0, y1, x0, x1 = sh.window
    centre = np.array([(x0 + x1 - 1) / 2 + image_origin_px[0], (y0 + y1 - 1) / 2 + image_origin_px[1]])
    r0 = max(2.0 * match_radius_px, 4.0)
    disc = (r0 - 1.0) / np.tan(np.radians(max(max_rotation_deg, 1e-3)))
    bright_e = np.zeros(len(xy), bool)
    bright_e[np.argsort(-np.asarray(flux, float))[:n_bright]] = True
    bright_r = np.argsort(-np.asarray(ref_flux, float))[:n_bright]
    wall = None if snr is None else np.clip(np.asarray(snr, float), 1.0, 200.0) ** 2
    clip = np.zeros(0, bool)
    keep = j = np.zeros(0, int)
    for step, radius in enumerate((r0, r0, match_radius_px, match_radius_px)):
        if step == 0:
            cand = np.flatnonzero(bright_e & (np.hypot(*(xy - centre).T) < disc))
            k, jj = _mutual_matches(_apply(m, xy[cand]), cKDTree(ref_xy[bright_r]), ref_xy[bright_r], radius)
            keep, j = cand[k], bright_r[jj]
            where = (f"within {radius:.1f} px of their positions predicted by the phase-correlation shift "
                     f"({sh.dx:+.2f}, {sh.dy:+.2f}) px, {sh.significance:.0f} sigma")
        else:
            keep, j = _mutual_matches(_apply(m, xy), cKDTree(ref_xy), ref_xy, radius)
            where = f"within {radius:.1f} px after the first star fit"
        if len(keep) < min_stars:
            raise RegistrationError(f"only {len(keep)} stars match {where} (need {min_stars})")
        m, clip = _clipped_affine(xy[keep], ref_xy[j], None if wall is None else wall[keep], robust_start=step == 0)
        rms = float(np.sqrt(np.mean((_apply(m, xy[keep][clip]) - ref_xy[j][clip]) ** 2)))
        if step == 0 and rms > RANDOM_SCATTER * radius:
            raise RegistrationError(f"the {int(clip.sum())} stars matched {where} scatter by {rms:.2f} px RMS "
                                    f"about the fit, as random pairs would (genuine matches: well under "
                                    f"{RANDOM_SCATTER * radius:.1f} px); the star lists may not belong to these images")
    src, dst = xy[keep][clip], ref_out[j][clip]
    m = _affine(src, dst, None if wall is None else wall[keep][clip])
    rms = float(np.sqrt(np.mean((_apply(m, src) - dst) ** 2)))
    return _result(m, int(clip.sum()), rms, method=PHASE_CORRELATION, correlation_sigma=sh.significance,
                   initial_shift_px=(sh.dx, sh.dy))

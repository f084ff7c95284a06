"""Cross-match over epochs, per spatial region: objects and light curves.

Regions
-------
The field's reference pixel frame is cut into square regions of ``region_px``; each is one
task. A region task reads the sources of every epoch within its region plus a margin,
finds objects there, keeps the objects whose position lies in its own region, and writes
their light curves. The margin (several match radii) makes the neighbouring tasks agree
on every object near the common border, so each source lands in exactly one light curve.

Objects
-------
1. *Seeds.* All detections of all epochs are binned on a fine grid (``seed_bin_px``, fixed
   to the frame so neighbouring regions bin identically) and smoothed. Local maxima of
   this detection-density map are object candidates; a candidate needs at least
   ``min_epochs`` detections within the match radius, and candidates closer than the
   match radius to a stronger one are suppressed. A star detected in many epochs is one
   sharp peak however noisy its single-epoch centroids are, so the result does not depend
   on the order of the epochs.
2. *Association.* Every source goes to its nearest seed within the match radius; one
   source per object per epoch: when two sources of an epoch claim an object, the nearer
   wins and the other tries its second-nearest object.
3. *Refinement.* Object positions become the median of their sources (objects with fewer
   than ``min_epochs`` sources are no longer seeds); the match radius is
   ``max(r0, 3 x astrometric rms)`` with ``r0 = max(match_radius_fwhm x FWHM,
   match_radius_min_px)``, but at most ``max(r0, FWHM)`` (a wider radius would merge
   neighbours). The rms is the 90th percentile, over objects with at least 10 sources, of
   the per-axis scatter of their positions after the first association. Then the
   association is repeated once.
4. *Alternate centroids merged* (``merge_radius_fwhm``, default 1; 0: off): two objects closer
   than that which no epoch detected together are one source seen at two centroids (alone
   in good seeing, blended with a neighbour in poor seeing): :func:`merge_exclusive`. The
   object sits at its member with the steadier astrometry; the points from the other
   centroid carry ``BLENDED`` (they hold the neighbour's light).
5. Objects with fewer than ``min_epochs`` sources are dropped (their sources stay in
   ``sources/``).

Object ids are ``(field_index * 2**16 + region) * 2**24 + n``, ``n`` numbering the
region's objects in (y, x) order: deterministic for the same input and configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from survey_proc import vocab as F
from survey_proc.catalog.schema import BAND_STAT_COLUMNS, CLASSIFY_COLUMNS, band_column

REGION_BITS = 16
OBJECT_BITS = 24


@dataclass(frozen=True)
class Region:
    """A square of the reference frame: pixel indices ``[x0, x1) x [y0, y1)``."""

    index: int
    y0: int
    y1: int
    x0: int
    x1: int

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Positions whose pixel lies in the region (coordinate interval ``[x0 - 0.5, x1 - 0.5)``).

        Parameters
        ----------
        x, y
            Positions (px, reference frame).

        Returns
        -------
        ndarray of bool
            One per position.
        """
        return (x >= self.x0 - 0.5) & (x < self.x1 - 0.5) & (y >= self.y0 - 0.5) & (y < self.y1 - 0.5)


def region_grid(ny: int, nx: int, region_px: int) -> list[Region]:
    """Regions covering an ``ny x nx`` reference frame, row-major.

    The outermost regions extend to infinity on their open sides, so sources that fall
    just outside the reference frame (pointing offsets) still belong to some region.

    Parameters
    ----------
    ny, nx
        Size of the reference frame (px).
    region_px
        Region edge (px).

    Returns
    -------
    list of Region
        Regions with ``index`` 0, 1, ... in row-major order.
    """
    regions: list[Region] = []
    ys = list(range(0, ny, region_px))
    xs = list(range(0, nx, region_px))
    big = 10**9
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            regions.append(Region(len(regions),
                                  -big if iy == 0 else y0, big if iy == len(ys) - 1 else y0 + region_px,
                                  -big if ix == 0 else x0, big if ix == len(xs) - 1 else x0 + region_px))
    return regions


def object_ids(field_index: int, region: int, n: int) -> np.ndarray:
    """Deterministic int64 ids for ``n`` objects of one region.

    Parameters
    ----------
    field_index
        Index of the field in the store.
    region
        Index of the region.
    n
        Number of objects.

    Returns
    -------
    ndarray
        int64 ids, ``(field_index * 2**16 + region) * 2**24 + (0 .. n - 1)``.

    Raises
    ------
    ValueError
        When ``n`` or ``region`` does not fit the id layout.
    """
    if n >= 2**OBJECT_BITS or region >= 2**REGION_BITS:
        raise ValueError(f"too many objects ({n}) or regions ({region}) for the object id layout")
    base = (np.int64(field_index) * 2**REGION_BITS + np.int64(region)) * 2**OBJECT_BITS
    return base + np.arange(n, dtype=np.int64)


def find_seeds(x: np.ndarray, y: np.ndarray, radius_px: float, bin_px: float, min_count: int) -> np.ndarray:
    """Object candidates ``(n, 2)`` (x, y) from the detection-density map of all epochs.

    Parameters
    ----------
    x, y
        Positions of every detection (reference frame, pixels).
    radius_px
        Match radius: the counting radius and the suppression radius (pixels).
    bin_px
        Bin size of the density map (pixels); bins are aligned to the frame's pixel edges.
    min_count
        Detections needed within ``radius_px`` of a candidate.

    Returns
    -------
    ndarray
        Candidate positions (px), shape (n, 2).
    """
    if len(x) == 0:
        return np.zeros((0, 2))
    # bins fixed to the frame: edge k at -0.5 + k * bin_px
    kx = np.floor((x + 0.5) / bin_px).astype(np.int64)
    ky = np.floor((y + 0.5) / bin_px).astype(np.int64)
    kx0, ky0 = kx.min() - 4, ky.min() - 4
    shape = (int(ky.max() - ky0 + 5), int(kx.max() - kx0 + 5))
    hist = np.zeros(shape, np.float32)
    np.add.at(hist, (ky - ky0, kx - kx0), 1.0)
    dens = ndimage.gaussian_filter(hist, sigma=max(1.0, 0.25 / bin_px), mode="constant")
    size = 2 * max(1, round(0.5 * radius_px / bin_px)) + 1
    peaks = (dens == ndimage.maximum_filter(dens, size=size, mode="constant")) & (dens > 0)
    py, px = np.nonzero(peaks)
    if len(py) == 0:
        return np.zeros((0, 2))
    cx = (px + kx0 + 0.5) * bin_px - 0.5
    cy = (py + ky0 + 0.5) * bin_px - 0.5
    strength = dens[py, px]
    tree = cKDTree(np.c_[x, y])
    counts = tree.query_ball_point(np.c_[cx, cy], radius_px, return_length=True)
    ok = counts >= min_count
    cx, cy, strength, counts = cx[ok], cy[ok], strength[ok], counts[ok]
    if len(cx) == 0:
        return np.zeros((0, 2))
    # refine each candidate to the mean of its detections, then suppress weaker neighbours
    nbrs = tree.query_ball_point(np.c_[cx, cy], radius_px)
    rx = np.array([x[i].mean() for i in nbrs])
    ry = np.array([y[i].mean() for i in nbrs])
    order = np.lexsort((ry, rx, -counts, -strength))
    rx, ry = rx[order], ry[order]
    ctree = cKDTree(np.c_[rx, ry])
    alive = np.ones(len(rx), bool)
    for i, near in enumerate(ctree.query_ball_point(np.c_[rx, ry], radius_px)):
        if alive[i]:
            for j in near:
                if j > i:
                    alive[j] = False
    return np.c_[rx[alive], ry[alive]]


def associate(seeds: np.ndarray, x: np.ndarray, y: np.ndarray, epoch: np.ndarray, radius_px: float) -> np.ndarray:
    """Object index of every source (-1: none), one source per object per epoch.

    Conflicts (two sources of one epoch nearest to one object) go to the nearer source;
    the loser tries its second-nearest object.

    Parameters
    ----------
    seeds
        Object positions (n_obj, 2) (px, reference frame).
    x, y
        Source positions (px, reference frame).
    epoch
        Epoch of every source.
    radius_px
        Match radius (px).

    Returns
    -------
    ndarray
        int64 object index per source, -1 for none.
    """
    n = len(x)
    out = np.full(n, -1, np.int64)
    if n == 0 or len(seeds) == 0:
        return out
    k = 2 if len(seeds) > 1 else 1
    d, j = cKDTree(seeds).query(np.c_[x, y], k=k, distance_upper_bound=radius_px)
    if k == 1:
        d, j = d[:, None], j[:, None]
    nseed = len(seeds)
    n_keys = (int(epoch.max()) + 1) * nseed
    taken = np.zeros(n_keys, bool)  # (epoch, object) pairs already given a source
    pending = np.arange(n)
    for rank in range(k):
        cand = pending[np.isfinite(d[pending, rank])]
        if len(cand) == 0:
            break
        obj = j[cand, rank]
        key = epoch[cand].astype(np.int64) * nseed + obj
        free = ~taken[key]
        cand, obj, key = cand[free], obj[free], key[free]
        order = np.lexsort((cand, d[cand, rank], key))
        cand, obj, key = cand[order], obj[order], key[order]
        first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
        out[cand[first]] = obj[first]
        taken[key[first]] = True
        pending = pending[out[pending] < 0]
    return out


def merge_exclusive(obj: np.ndarray, x: np.ndarray, y: np.ndarray, epoch: np.ndarray, radius_px: float
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Merge objects closer than ``radius_px`` that no epoch detected together; ``(obj, primary, n_merged)``.

    A source blended with a neighbour in poor seeing is detected at the blend's centroid,
    up to a FWHM from its own position in good seeing: the detection-density map then has
    two peaks and the source becomes two objects, each with part of the epochs (and, with
    forced photometry, each padded with forced points at its own position). Measured on the
    default 1000-epoch run: 113 object pairs closer than 1.5 px, 106 of them never detected
    in the same epoch, together detected in a median 932 of the 1000 epochs. Two real stars
    that close are either resolved in some epochs (then both are detected there, and they
    stay two objects) or never (then they make one density peak, not two).

    Pairs are taken nearest first; a pair is merged when the two groups it joins share no
    epoch (so the merged object still has one source per epoch). Deterministic: the result
    depends on the positions and epochs only, not on the order of the sources.

    Parameters
    ----------
    obj
        Object index of every source (-1: none), as from :func:`associate`.
    x, y
        Source positions (px, reference frame).
    epoch
        Epoch of every source.
    radius_px
        Largest distance (px) between the two objects' median positions.

    Returns
    -------
    obj, primary, n_merged
        The object index of every source after merging (each group takes its smallest
        index); whether the source belonged to its group's member with the smallest
        astrometric scatter (the object's position is theirs: the source alone, whose
        centroid is stable, not the blend's, which moves with the seeing); the number of
        merges.
    """
    m = obj >= 0
    primary = np.ones(len(obj), bool)
    if radius_px <= 0 or m.sum() == 0:
        return obj, primary, 0
    pos = pd.DataFrame({"o": obj[m], "x": x[m], "y": y[m]}).groupby("o").median()
    ids = pos.index.to_numpy()
    pairs = cKDTree(pos[["x", "y"]].to_numpy()).query_pairs(radius_px, output_type="ndarray")
    if len(pairs) == 0:
        return obj, primary, 0
    xy = pos[["x", "y"]].to_numpy()
    dist = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0], dist))]
    involved = np.unique(ids[pairs])
    order = np.argsort(obj[m], kind="stable")
    o_sorted, e_sorted = obj[m][order], epoch[m][order]
    bounds = np.searchsorted(o_sorted, involved), np.searchsorted(o_sorted, involved, side="right")
    epochs = {int(o): set(e_sorted[a:b].tolist()) for o, a, b in zip(involved, *bounds, strict=True)}
    root = {int(o): int(o) for o in involved}

    def find(o: int) -> int:
        while root[o] != o:
            o = root[o]
        return o

    n_merged = 0
    for i, j in pairs:
        a, b = find(int(ids[i])), find(int(ids[j]))
        if a == b or epochs[a] & epochs[b]:
            continue
        keep, gone = min(a, b), max(a, b)
        root[gone] = keep
        epochs[keep] |= epochs.pop(gone)
        n_merged += 1
    if n_merged == 0:
        return obj, primary, 0
    lut = {o: find(o) for o in root}
    out = obj.copy()
    out[m] = pd.Series(obj[m]).map(lambda o: lut.get(o, o)).to_numpy()
    grp = pd.DataFrame({"o": obj[m], "x": x[m], "y": y[m]}).groupby("o")
    scatter = pd.Series(np.sqrt(0.5 * (grp["x"].var(ddof=1) + grp["y"].var(ddof=1))))
    members = pd.DataFrame({"o": list(lut), "g": list(lut.values())})
    members["n"] = scatter.reindex(members["o"]).fillna(np.inf).to_numpy()
    main = members.sort_values(["g", "n", "o"], ascending=[True, True, True]).drop_duplicates("g")
    merged_groups = set(members.loc[members["o"] != members["g"], "g"])
    main_of = dict(zip(main["g"], main["o"], strict=True))
    src_obj, src_grp = obj[m], out[m]
    primary[np.flatnonzero(m)] = [g not in merged_groups or o == main_of[g] for o, g in zip(src_obj, src_grp,
                                                                                            strict=True)]
    return out, primary, n_merged


STAT_COLUMNS = ["n_good", "mag_mean", "mag_median", "mag_std", "chi2_const", "mag_err_median"]


def _stats(g: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Weighted mean, median, std, reduced chi^2 about the mean and median error per ``keys`` group."""
    w = 1.0 / g["mag_err"].to_numpy() ** 2
    tmp = pd.DataFrame({**{k: g[k].to_numpy() for k in keys}, "w": w, "wm": w * g["mag"].to_numpy(),
                        "m": g["mag"].to_numpy(), "e": g["mag_err"].to_numpy()})
    grp = tmp.groupby(keys, sort=True)
    s = pd.DataFrame({"n_good": grp.size(), "sw": grp["w"].sum(), "swm": grp["wm"].sum(),
                      "mag_median": grp["m"].median(), "mag_std": grp["m"].std(ddof=1),
                      "mag_err_median": grp["e"].median()})
    s["mag_mean"] = s["swm"] / s["sw"]
    mean = s["mag_mean"].reindex(pd.MultiIndex.from_frame(tmp[keys]) if len(keys) > 1 else tmp[keys[0]])
    tmp["chi"] = (tmp["m"] - mean.to_numpy()) ** 2 * tmp["w"]
    chi = tmp.groupby(keys, sort=True)["chi"].sum()
    s["chi2_const"] = chi / (s["n_good"] - 1).where(s["n_good"] > 1)
    return s[STAT_COLUMNS]


def object_stats(lc: pd.DataFrame, bands: list[str] | None = None) -> pd.DataFrame:
    """Per-object photometric statistics over clean points (flags without PHOTOMETRY_BAD).

    Magnitudes of different bands are never mixed: the statistics of :data:`STAT_COLUMNS`
    are those of the object's band with the most clean points (``band``; ties go to the
    band first in ``bands``), and every band of ``bands`` gets ``mag_mean_<b>``,
    ``mag_std_<b>`` and ``n_good_<b>`` (:func:`survey_proc.catalog.schema.band_column`).
    """
    band = lc["band"].astype(str) if "band" in lc.columns else pd.Series("", index=lc.index)
    good = ((lc["flags"].to_numpy() & F.PHOTOMETRY_BAD) == 0) & np.isfinite(lc["mag"].to_numpy()) \
        & np.isfinite(lc["mag_err"].to_numpy()) & (lc["mag_err"].to_numpy() > 0)
    g = lc[good].assign(band=band[good].to_numpy())
    per = _stats(g, ["obj", "band"]).reset_index()
    order = {b: i for i, b in enumerate(bands or [])}
    per["rank"] = per["band"].map(order).fillna(len(order)).astype(int)
    primary = per.sort_values(["obj", "n_good", "rank", "band"], ascending=[True, False, True, True],
                              kind="stable").drop_duplicates("obj")
    out = primary.set_index("obj")[[*STAT_COLUMNS, "band"]]
    for b in bands or []:
        if not b:
            continue
        pb = per[per["band"] == b].set_index("obj")
        for stat, _ in BAND_STAT_COLUMNS:
            out[band_column(stat, b)] = pb[stat].reindex(out.index)
    return out


def crossmatch_region(src: pd.DataFrame, region: Region, *, field: str, field_index: int, fwhm_px: float,
                      match_radius_fwhm: float, match_radius_min_px: float, min_epochs: int, seed_bin_px: float,
                      bands: list[str] | None = None, merge_radius_fwhm: float = 0.0
                      ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Objects and light curves of one region.

    Parameters
    ----------
    src
        Sources of all epochs within the region plus its margin: columns source_id, epoch,
        mjd, x_ref, y_ref, mag, mag_err, flux, flux_err, flags (and band).
    region
        The region whose objects are kept.
    fwhm_px
        Typical FWHM of the field (pixels), for the match radius.
    bands
        The store's bands: objects get per-band means for each (:func:`object_stats`).
    merge_radius_fwhm
        Objects closer than this many FWHM that no epoch detected together are merged
        (:func:`merge_exclusive`); 0: never.

    Returns
    -------
    objects, lightcurves, info
        ``objects`` with object_id, x, y (reference frame) and statistics (no ra/dec yet);
        ``lightcurves`` sorted by (object_id, mjd); ``info`` with the radius and counts.
    """
    x = src["x_ref"].to_numpy(float)
    y = src["y_ref"].to_numpy(float)
    ep = src["epoch"].to_numpy()
    r0 = max(match_radius_fwhm * fwhm_px, match_radius_min_px)
    seeds = find_seeds(x, y, r0, seed_bin_px, min_epochs)
    obj = associate(seeds, x, y, ep, r0)
    # refine positions and the radius
    m = obj >= 0
    pos = pd.DataFrame({"o": obj[m], "x": x[m], "y": y[m]}).groupby("o")
    med = pos.median()
    cnt = pos.size()
    astrom = pos.std(ddof=1)
    well = cnt >= 10
    sigma90 = float(np.nanpercentile(astrom[well].to_numpy(), 90)) if well.any() else 0.0
    radius = max(r0, 3.0 * sigma90)
    radius = min(radius, max(r0, fwhm_px))  # never wider than a FWHM: beyond that we would merge neighbours
    seeds2 = med[cnt >= min_epochs][["x", "y"]].to_numpy()
    obj = associate(seeds2, x, y, ep, radius)
    obj, primary, n_merged = merge_exclusive(obj, x, y, ep, merge_radius_fwhm * fwhm_px)

    m = obj >= 0
    lc = src[m].copy()
    lc["obj"] = obj[m]
    alternate = ~primary[m]  # detections at a merged object's other centroid: blended with a neighbour
    if alternate.any():
        lc.loc[alternate, "flags"] = lc.loc[alternate, "flags"].to_numpy() | F.BLENDED
    pos = lc[primary[m]].groupby("obj")  # a merged object sits where its steadier member's sources are
    centre = pd.DataFrame({"x": pos["x_ref"].median(), "y": pos["y_ref"].median(),
                           "n_epochs": lc.groupby("obj").size(),
                           "astrom_rms_px": np.sqrt(0.5 * (pos["x_ref"].var(ddof=1) + pos["y_ref"].var(ddof=1)))})
    centre = centre[(centre["n_epochs"] >= min_epochs)
                    & region.contains(centre["x"].to_numpy(), centre["y"].to_numpy())]
    centre = centre.sort_values(["y", "x"], kind="stable")
    ids = pd.Series(object_ids(field_index, region.index, len(centre)), index=centre.index)
    lc = lc[lc["obj"].isin(centre.index)]
    stats = object_stats(lc, bands)
    objects = centre.join(stats, how="left")
    for c in [c for c in objects.columns if c == "n_good" or c.startswith("n_good_")]:
        objects[c] = objects[c].fillna(0).astype(np.int32)
    objects["band"] = objects["band"].fillna("").astype(str)
    objects.insert(0, "object_id", ids.reindex(objects.index).to_numpy())
    objects.insert(1, "field", field)
    objects.insert(2, "region", np.int32(region.index))
    for c in CLASSIFY_COLUMNS:  # filled by the classify stage
        objects[c] = np.nan
    objects["n_points_classified"] = np.int32(0)
    objects["n_detected"] = objects["n_epochs"].astype(np.int32)  # the forced stage adds forced points
    objects["n_forced"] = np.int32(0)
    objects["var_class"] = pd.Series([None] * len(objects), dtype=object, index=objects.index)
    objects["detrend"] = pd.Series([None] * len(objects), dtype=object, index=objects.index)  # classify fills
    objects["detrend_rms"] = np.nan
    objects = objects.reset_index(drop=True)
    if "band" not in lc.columns:
        lc["band"] = ""
    lc["object_id"] = ids.reindex(lc["obj"]).to_numpy()
    lc["field"] = field
    lc = lc.sort_values(["object_id", "mjd"], kind="stable").reset_index(drop=True)
    info = {"match_radius_px": radius, "astrom_rms90_px": sigma90, "n_seeds": len(seeds),
            "n_objects": len(objects), "n_points": len(lc), "n_sources_in": len(src), "n_merged": n_merged}
    return objects, lc, info

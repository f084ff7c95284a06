"""One-to-one matching of detected to true (or catalogue) positions; numpy and scipy only.

Kept apart from ``evaluate`` (which reads simulated surveys with Zarr) so that the
detector's training, which runs where Zarr and Dask are not installed, shares it.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MATCH_RADIUS_PX = 1.0


def match_one_to_one(x_det: np.ndarray, y_det: np.ndarray, x_true: np.ndarray, y_true: np.ndarray,
                     radius_px: float = DEFAULT_MATCH_RADIUS_PX) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching by distance; returns ``(i_det, i_true)`` of the pairs.

    Pairs are accepted nearest first; each detection and each true star is used at most once.

    Parameters
    ----------
    x_det, y_det
        Detected positions (px).
    x_true, y_true
        True positions (px, same frame).
    radius_px
        Largest accepted distance (px).

    Returns
    -------
    i_det, i_true
        Indices of the matched detections and true stars, pair by pair.
    """
    from scipy.spatial import cKDTree

    if len(x_det) == 0 or len(x_true) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    tree = cKDTree(np.c_[x_true, y_true])
    k = min(4, len(x_true))
    d, j = tree.query(np.c_[x_det, y_det], k=k, distance_upper_bound=radius_px)
    if k == 1:
        d, j = d[:, None], j[:, None]
    det = np.repeat(np.arange(len(x_det)), k)
    d, j = d.ravel(), j.ravel()
    ok = np.isfinite(d)
    det, d, j = det[ok], d[ok], j[ok]
    order = np.argsort(d, kind="stable")
    used_d = np.zeros(len(x_det), bool)
    used_t = np.zeros(len(x_true), bool)
    pd_, pt = [], []
    for i in order:
        if not used_d[det[i]] and not used_t[j[i]]:
            used_d[det[i]] = used_t[j[i]] = True
            pd_.append(det[i])
            pt.append(j[i])
    return np.asarray(pd_, int), np.asarray(pt, int)

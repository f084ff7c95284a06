"""The periodic-variable search of a set of light curves, as the classify stage runs it.

:func:`classify_table` takes the light-curve points of many objects (one row per point),
keeps the objects that can reach the minimum number of points, preprocesses them
(:mod:`survey_proc.lightcurves.preprocess`), builds the frequency grid for their common
baseline (:func:`survey_proc.lightcurves.periodogram.search_grid`) and runs the batched
search and the classifier (:func:`survey_proc.lightcurves.classifier.classify`). It knows
nothing of files or Dask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from survey_proc.config import ClassifySettings
from survey_proc.vocab import PERIODIC_CLASSES


def classify_table(lc: pd.DataFrame, clf: Any, cc: ClassifySettings, sparse: Any = None
                   ) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """Search and classify the light curves in ``lc``.

    Parameters
    ----------
    lc
        Light-curve points: ``object_id, epoch, mjd, mag, mag_err, flags`` (mag in magnitudes,
        mjd in days), optionally ``band``: with several bands each band's curve is searched
        and classified alone and the results reconciled per object (:func:`reconcile_bands`).
    clf
        A loaded classifier (``survey_proc.model_registry.load("classifier")``).
    cc
        The ``[classify]`` settings (minimum points, clipping, period range in days).
    sparse
        The sparse long-baseline classifier (``model_registry.load("classifier_sparse")``)
        for curves spanning more than ``cc.sparse_span_days``; None: the CNN classifies all.

    Returns
    -------
    results, info
        One row per object of ``lc`` (index ``object_id``; the columns of
        :func:`~survey_proc.lightcurves.classifier.classify` plus ``n_points_classified`` and
        ``classify_reason``: null when classified, else ``too_few_points: ...`` (fewer than
        ``min_points`` points, before or after clipping), ``too_sparse: ...`` (fewer than
        ``min_fraction`` of the epochs) or ``too_short: ...`` (kept points spanning less than
        ``min_baseline_days``, default 1.6 x the shortest box period: 0.4 d)), or None when
        ``lc`` is empty; and counts for the run record (``n_classified``, ``n_periodic``,
        ``classes``, ``not_classified`` by reason, the grid size, or ``not_searched`` saying why;
        with several bands ``n_bands`` and ``bands``, each band's own counts), and
        ``band_classified`` (which band's result an object has) with several bands.
    """
    if "band" in lc.columns and lc["band"].nunique(dropna=False) > 1:
        return _per_band(lc, clf, cc, sparse)
    return _one_band(lc, clf, cc, sparse)


def _per_band(lc: pd.DataFrame, clf: Any, cc: ClassifySettings, sparse: Any
              ) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """Each band of a multi-band ``lc`` classified alone, reconciled per object (:func:`reconcile_bands`).

    An object's curve over a multi-band survey alternates between its magnitudes in each band:
    mixed into one curve, a colour of 0.5 mag is a 0.5-mag "variable". Measured on the EROS-1
    validation stars (two bands, RESULTS.md, issue 22), bands merged onto one scale and
    searched jointly were called right less often (0.65-0.73) than each band alone reconciled
    (0.75-0.77): the bands' amplitudes differ and one band's noise dilutes the other's signal.
    The sparse route does search an object's long curves jointly (``[classify] joint_bands``),
    each band with its own mean and amplitude at one shared frequency
    (:func:`survey_proc.lightcurves.fourier_features.joint_candidates`), then classifies each
    band at that period.
    """
    from survey_proc.lightcurves.sparse_classifier import views as sparse_views

    results: dict[str, pd.DataFrame] = {}
    bands: dict[str, dict[str, Any]] = {}
    prepared = {str(band): _prepare(part.drop(columns="band"), clf, cc)
                for band, part in lc.groupby(lc["band"].astype(str), sort=True)}
    # the sparse route searches an object's period in all its long curves jointly
    joint = sparse is not None and cc.sparse_span_days > 0 and cc.joint_bands
    kept = {b: p.kept_curves(cc.sparse_span_days) for b, p in prepared.items() if p is not None} if joint else {}
    # the other bands' unclipped curves, only for a model that reads that view
    two_views = joint and "unclipped" in sparse_views(sparse)
    kept_u = ({b: p.kept_curves(cc.sparse_span_days, with_clipped=True) for b, p in prepared.items()
               if p is not None} if two_views else {})
    for band, prep in prepared.items():
        others: dict[Any, list] = {}
        others_u: dict[Any, list] | None = {} if two_views else None
        for ob, curves in kept.items():
            if ob != band:
                for oid, c in curves.items():
                    others.setdefault(oid, []).append(c)
                    if others_u is not None:
                        others_u.setdefault(oid, []).append(kept_u[ob][oid])
        res, inf = _finish(prep, clf, cc, sparse, others, others_u)
        bands[band] = inf
        if res is not None:
            results[band] = res
    res = reconcile_bands(results)
    info: dict[str, Any] = {"n_classified": 0, "n_periodic": 0, "n_bands": len(bands), "bands": bands}
    if res is None:
        return None, info
    done = res["var_class"].notna() if "var_class" in res else pd.Series(False, index=res.index)
    info.update(n_classified=int(done.sum()),
                n_periodic=int(res["var_class"].isin(PERIODIC_CLASSES).sum()) if "var_class" in res else 0,
                n_sparse=int(res["sparse"].fillna(False).astype(bool).sum()) if "sparse" in res else 0)
    if "var_class" in res:
        info["classes"] = {str(k): int(v) for k, v in res["var_class"].value_counts().items()}
    why = res["classify_reason"].dropna()
    info["not_classified"] = {str(k): int(v) for k, v in why.str.split(":").str[0].value_counts().items()}
    return res, info


def reconcile_bands(results: dict[str, pd.DataFrame]) -> pd.DataFrame | None:
    """One row per object from per-band results (index ``object_id``): which band's result it keeps.

    A band that calls the object periodic wins (of several, the higher ``var_class_prob``);
    otherwise a band that labels it ``non_periodic`` (significant variability correlated in time in
    any band is variability of the object; of several, the most points); otherwise the classified
    band with the most points (``n_points_classified``); otherwise (not classified in any band)
    the reason of the band with the most points. ``band_classified`` names the band kept.
    """
    if not results:
        return None
    allr = pd.concat([r.assign(band_classified=b) for b, r in results.items()])
    cls = allr["var_class"] if "var_class" in allr else pd.Series(None, index=allr.index, dtype=object)
    periodic = cls.isin(PERIODIC_CLASSES).to_numpy()
    n_pts = (allr["n_points_classified"].fillna(0).to_numpy(float) if "n_points_classified" in allr
             else np.zeros(len(allr)))
    prob = allr["var_class_prob"].fillna(0).to_numpy(float) if "var_class_prob" in allr else np.zeros(len(allr))
    varies = (cls == "non_periodic").to_numpy()
    keys = pd.DataFrame({"object_id": allr.index.to_numpy(), "k0": cls.notna().to_numpy().astype(int),
                         "k1": periodic.astype(int), "k1b": varies.astype(int), "k2": np.where(periodic, prob, n_pts),
                         "row": np.arange(len(allr))})
    keys = keys.sort_values(["object_id", "k0", "k1", "k1b", "k2"], ascending=[True, False, False, False, False],
                            kind="stable")
    pick = keys.drop_duplicates("object_id")["row"].to_numpy()  # in object_id order
    out = allr.iloc[pick]
    out.index.name = "object_id"
    return out


@dataclass
class _Prepared:
    """One band's light curves preprocessed for the search (:func:`_prepare`)."""

    ids: np.ndarray
    reason: pd.Series
    info: dict[str, Any]
    batch: Any = None  # LightCurveBatch of the objects with enough points; None: nothing to search
    ids_e: np.ndarray | None = None
    grid: Any = None

    def kept_curves(self, min_span_days: float, with_clipped: bool = False
                    ) -> dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The usable curves whose kept points span more than ``min_span_days``: object_id -> (t_mjd, y, sigma).

        ``with_clipped``: each curve with the points the clipping dropped (the sparse route's unclipped view).
        """
        out: dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if self.batch is None:
            return out
        b = self.batch
        for i in np.flatnonzero(b.usable):
            curve = b.kept(i)
            if np.ptp(curve[0]) > min_span_days:
                out[b.object_id[i]] = b.kept(i, True) if with_clipped else curve
        return out


def _one_band(lc: pd.DataFrame, clf: Any, cc: ClassifySettings, sparse: Any
              ) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """:func:`classify_table` of light curves of one band."""
    return _finish(_prepare(lc, clf, cc), clf, cc, sparse)


def _prepare(lc: pd.DataFrame, clf: Any, cc: ClassifySettings) -> _Prepared | None:
    """Select, preprocess and grid one band's curves; None when ``lc`` is empty."""
    from survey_proc.lightcurves.periodogram import search_grid
    from survey_proc.lightcurves.preprocess import PreprocessConfig, preprocess, to_matrix

    info: dict[str, Any] = {"n_classified": 0, "n_periodic": 0}
    if not len(lc):
        return None
    ids, _, mjd, mag, err, flg = to_matrix(lc)
    reason = pd.Series(None, index=pd.Index(ids, name="object_id"), dtype=object)
    prep = _Prepared(ids, reason, info)
    n_have = np.isfinite(mag).sum(1)
    need_points = max(cc.min_points, 3)
    need_frac = int(np.ceil(cc.min_fraction * len(mjd)))
    reason[n_have < need_points] = f"too_few_points: fewer than {need_points} points"
    reason[(n_have >= need_points) & (n_have < need_frac)] = (
        f"too_sparse: fewer than {need_frac} points ({cc.min_fraction:.0%} of {len(mjd)} epochs)")
    # objects that cannot reach the minimum number of points are not even preprocessed
    enough = reason.isna().to_numpy()
    p_min = max(cc.period_min_days, trained_period_min(clf)) if cc.period_min_from_model else cc.period_min_days
    min_base = cc.min_baseline_days or 1.6 * max(cc.bls_period_min_days, p_min)
    if not enough.any() or len(mjd) < 3:
        info["not_searched"] = f"no light curve with {max(need_points, need_frac)} points"
        return prep
    ids_e, mag, err, flg = ids[enough], mag[enough], err[enough], flg[enough]
    batch = preprocess(ids_e, mjd, mag, err, flg, PreprocessConfig(clip_sigma=cc.clip_sigma,
                                                                    min_points=need_points,
                                                                    min_fraction=cc.min_fraction))
    reason[ids_e[~batch.usable]] = f"too_few_points: fewer than {max(need_points, need_frac)} kept after clipping"
    # each curve's own span of kept points: too short to hold two cycles of the shortest box period
    span = np.array([np.ptp(batch.t_days[batch.w[i] > 0]) if (batch.w[i] > 0).any() else 0.0
                     for i in range(len(batch))])
    short = batch.usable & (span < min_base)
    reason[ids_e[short]] = f"too_short: kept points span less than {min_base:.3g} d"
    batch.usable = batch.usable & ~short
    baseline = float(batch.t_days[-1] - batch.t_days[0])
    try:
        grid = search_grid(batch.t_days, period_min_days=p_min, period_max_days=cc.period_max_days or None,
                           bls_period_min_days=cc.bls_period_min_days, bls_max_freq=cc.bls_max_freq,
                           bls_max_work=cc.bls_max_work)
    except ValueError as e:
        reason[ids_e[reason[ids_e].isna().to_numpy()]] = f"too_short: baseline {baseline:.3g} d"
        info["not_searched"] = str(e)
        return prep
    if not batch.usable.any():
        info["not_searched"] = f"no light curve with {max(need_points, need_frac)} points over {min_base:.3g} d"
        return prep
    prep.batch, prep.ids_e, prep.grid = batch, ids_e, grid
    return prep


def _finish(prep: _Prepared | None, clf: Any, cc: ClassifySettings, sparse: Any,
            others: Mapping[Any, list] | None = None, others_unclipped: Mapping[Any, list] | None = None
            ) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """Classify a :func:`_prepare`'d band.

    ``others``: the objects' other bands, for the sparse route's joint period search
    (``others_unclipped``: the same with their clipped points, for a two-view sparse model).
    """
    from survey_proc.lightcurves.classifier import classify

    if prep is None:
        return None, {"n_classified": 0, "n_periodic": 0}
    ids, reason, info, batch, grid = prep.ids, prep.reason, prep.info, prep.batch, prep.grid
    if batch is None:
        return _reasons_only(reason), info
    res = classify(batch, clf, grid, pulsator_max_fap=cc.pulsator_max_fap, eclipse_min_snr=cc.eclipse_min_snr,
                   sparse=sparse,
                   sparse_span_days=cc.sparse_span_days, sparse_others=others,
                   sparse_others_unclipped=others_unclipped,
                   non_periodic_min_z=cc.non_periodic_min_z).set_index("object_id")
    res["n_points_classified"] = batch.n_points.astype(np.int32)
    res = res.reindex(ids)
    res["classify_reason"] = reason.reindex(ids).to_numpy()
    info.update(n_classified=int(batch.usable.sum()),
                n_periodic=int(np.isin(res["var_class"].to_numpy(), PERIODIC_CLASSES).sum()),
                classes={str(k): int(v) for k, v in res["var_class"].value_counts().items()},
                not_classified={str(k).split(":")[0]: int(v) for k, v in
                                reason.str.split(":").str[0].value_counts().items()},
                baseline_days=float(grid.baseline_days), n_bls_freq=len(grid.bls_freq), n_ls_freq=len(grid.ls_freq),
                n_sparse=int(res["sparse"].fillna(False).astype(bool).sum()))
    return res, info


def trained_period_min(clf: Any) -> float:
    """The shortest period (days) the classifier's inputs were trained with: its card's ``search.period_min_days``.

    The classifier sees the Lomb-Scargle and BLS folds and periods; a grid reaching shorter
    periods than its training data feeds it inputs it never saw (measured: noise peaks at
    0.03-0.06 d turned constant stars "periodic" with p = 0.99999). Cards without the key are
    the shipped v2 model's: 0.25 d.

    Parameters
    ----------
    clf
        A loaded classifier (with a ``card`` dict).

    Returns
    -------
    float
        Days.
    """
    card = getattr(clf, "card", None) or {}
    return float(card.get("search", {}).get("period_min_days", 0.25))


def _reasons_only(reason: pd.Series) -> pd.DataFrame:
    """A result with only ``classify_reason`` (why each object was not classified)."""
    return pd.DataFrame({"classify_reason": reason.to_numpy()}, index=reason.index)

"""The periodic-variable search of a set of light curves, as the classify stage runs it.

:func:`classify_table` takes the light-curve points of many objects (one row per point),
keeps the objects that can reach the minimum number of points, preprocesses them
(:mod:`survey_proc.lightcurves.preprocess`), builds the frequency grid for their common
baseline (:func:`survey_proc.lightcurves.periodogram.search_grid`) and runs the batched
search and the classifier (:func:`survey_proc.lightcurves.classifier.classify`). It knows
nothing of files or Dask.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from survey_proc.config import ClassifySettings
from survey_proc.vocab import PERIODIC_CLASSES


def classify_table(lc: pd.DataFrame, clf: Any, cc: ClassifySettings) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """Search and classify the light curves in ``lc``.

    Parameters
    ----------
    lc
        Light-curve points: ``object_id, epoch, mjd, mag, mag_err, flags`` (mag in magnitudes,
        mjd in days).
    clf
        A loaded classifier (``survey_proc.model_registry.load("classifier")``).
    cc
        The ``[classify]`` settings (minimum points, clipping, period range in days).

    Returns
    -------
    results, info
        One row per searched object (index ``object_id``; the columns of
        :func:`~survey_proc.lightcurves.classifier.classify` plus ``n_points_classified``), or
        None when nothing could be searched; and counts for the run record (``n_classified``,
        ``n_periodic``, ``classes``, the grid size, or ``not_searched`` saying why).
    """
    from survey_proc.lightcurves.classifier import classify
    from survey_proc.lightcurves.periodogram import search_grid
    from survey_proc.lightcurves.preprocess import PreprocessConfig, preprocess, to_matrix

    info: dict[str, Any] = {"n_classified": 0, "n_periodic": 0}
    if not len(lc) or len(np.unique(lc["epoch"])) < 3:
        return None, info
    ids, _, mjd, mag, err, flg = to_matrix(lc)
    # objects that cannot reach the minimum number of points are not even preprocessed
    need = max(cc.min_points, int(np.ceil(cc.min_fraction * len(mjd))))
    enough = np.isfinite(mag).sum(1) >= need
    ids, mag, err, flg = ids[enough], mag[enough], err[enough], flg[enough]
    batch = preprocess(ids, mjd, mag, err, flg, PreprocessConfig(clip_sigma=cc.clip_sigma, min_points=cc.min_points,
                                                                  min_fraction=cc.min_fraction))
    baseline = float(batch.t_days[-1] - batch.t_days[0])
    p_max = cc.period_max_days or baseline / 1.15
    if not batch.usable.any() or p_max <= cc.period_min_days:
        info["not_searched"] = (f"no light curve with {need} points" if not batch.usable.any() else
                                f"baseline {baseline:.3f} d too short for periods >= {cc.period_min_days} d")
        return None, info
    grid = search_grid(batch.t_days, period_min_days=cc.period_min_days, period_max_days=p_max)
    res = classify(batch, clf, grid).set_index("object_id")
    res["n_points_classified"] = batch.n_points.astype(np.int32)
    info.update(n_classified=int(batch.usable.sum()),
                n_periodic=int(np.isin(res["var_class"].to_numpy(), PERIODIC_CLASSES).sum()),
                classes={str(k): int(v) for k, v in res["var_class"].value_counts().items()},
                baseline_days=float(grid.baseline_days), n_bls_freq=len(grid.bls_freq), n_ls_freq=len(grid.ls_freq))
    return res, info

"""Training light curves for the periodic-variable classifier, made to look like the pipeline's output.

Source of the noise: a pipeline run on a *training* survey (default: the ``make run`` output
of the default survey, seed 0; the benchmarks use seeds > 1000). Its objects matched to a
true **constant** star (one-to-one within 1 px, no true variable within 3 px) with at least
100 points are the *templates*: each is a real light curve of the pipeline, with its
epochs, gaps, flags, quoted errors and its actual scatter (blends, calibration residuals,
outliers included).

A training light curve takes a random template and one of two noise models (half each):

- ``real``: the template's own residuals ``mag - median``;
- ``model``: Gaussian noise drawn from the photometric error against magnitude that the
  pipeline measures (the NMAD of the template residuals per 0.5-mag bin, interpolated),
  at the template's magnitude shifted by U(-0.75, 0.75) mag, each point scaled by its
  quoted error relative to the template's median error (per-epoch conditions kept).

A variability model from the simulator (:func:`survey_proc.simulate.variables.delta_mag`)
is then added at the template's epochs: the class is drawn with :data:`CLASS_MIX`, its
parameters with :func:`~survey_proc.simulate.variables.assign_variables` over ranges a
little wider than the dense scenario's (:data:`RANGES`). Points where the star is fainter
than usual are dropped with the extra probability of non-detection that the template set
shows at that magnitude (a faint eclipsing star vanishes in eclipse, as in the pipeline).

Labels: the simulator's class, with ``flare`` and ``trend`` as ``non_periodic``; a
variable whose signal is not in the data (``sqrt(sum (dm / sigma)^2) < 3`` over the kept
points, e.g. an eclipsing binary with no eclipse in the 3.5 days) is labelled ``constant``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from survey_proc.evaluate import load_truth_stars, match_one_to_one
from survey_proc.lightcurves.preprocess import to_matrix
from survey_proc.simulate.variables import assign_variables, delta_mag

CLASS_MIX = {"constant": 0.50, "eclipsing_binary": 0.13, "pulsator": 0.12, "transit": 0.13, "flare": 0.06,
             "trend": 0.06}
RANGES = {
    "eb_period_days": (0.25, 10.0),
    "pulsator_period_days": (0.3, 3.0),
    "transit_period_days": (0.5, 3.0),
    "pulsator_amplitude_mag": (0.05, 1.0),
    "eb_depth": (0.02, 0.7),
    "transit_depth": (0.003, 0.05),
    "transit_duration_h": (1.0, 5.0),
    "flare_amplitude": (0.1, 3.0),
    "trend_amplitude_mag": (0.03, 0.5),
}
LABEL = {"constant": 0, "eclipsing_binary": 1, "pulsator": 2, "transit": 3, "flare": 4, "trend": 4}


@dataclass
class Templates:
    """Real constant-star light curves of a pipeline run on a common epoch grid."""

    object_id: np.ndarray
    mjd: np.ndarray  # (n_t,)
    mag: np.ndarray  # (n, n_t) NaN = no detection
    mag_err: np.ndarray
    flags: np.ndarray
    mag_median: np.ndarray
    sigma_mag: np.ndarray  # (n,) NMAD of the residuals

    def error_model(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bin centres, NMAD scatter, missing fraction) per 0.5-mag bin of the median magnitude."""
        edges = np.arange(np.floor(self.mag_median.min()), np.ceil(self.mag_median.max()) + 0.5, 0.5)
        idx = np.digitize(self.mag_median, edges) - 1
        miss = np.isnan(self.mag).mean(1)
        c, s, m = [], [], []
        for b in range(len(edges) - 1):
            sel = idx == b
            if sel.sum() >= 5:
                c.append(0.5 * (edges[b] + edges[b + 1]))
                s.append(np.median(self.sigma_mag[sel]))
                m.append(np.median(miss[sel]))
        return np.array(c), np.array(s), np.maximum.accumulate(np.array(m))


def load_templates(run_dir: str | Path, store: str | Path, min_points: int = 100) -> Templates:
    """Constant-star templates from the run in ``run_dir`` of the simulated ``store`` (see the module docstring)."""
    run_dir = Path(run_dir)
    objects = pd.read_parquet(run_dir / "objects")
    stars = load_truth_stars(store)
    i_o, i_s = match_one_to_one(objects["x"].to_numpy(), objects["y"].to_numpy(), stars["x"].to_numpy(),
                                stars["y"].to_numpy(), 1.0)
    const = stars["var_class"].to_numpy()[i_s] == "constant"
    var = stars[stars["var_class"] != "constant"]
    from scipy.spatial import cKDTree

    near_var = np.zeros(len(i_o), bool)
    if len(var):
        d, _ = cKDTree(var[["x", "y"]].to_numpy()).query(objects[["x", "y"]].to_numpy()[i_o])
        near_var = d < 3.0
    ok = const & ~near_var & (objects["n_good"].to_numpy()[i_o] >= min_points)
    ids = objects["object_id"].to_numpy()[i_o][ok]
    lc = pd.read_parquet(run_dir / "lightcurves", filters=[("object_id", "in", ids.tolist())])
    oid, _, mjd, mag, err, flg = to_matrix(lc)
    med = np.nanmedian(mag, 1)
    res = mag - med[:, None]
    sig = 1.4826 * np.nanmedian(np.abs(res - np.nanmedian(res, 1)[:, None]), 1)
    return Templates(oid, mjd, mag, err, flg, med, sig)


def synthesize(tpl: Templates, n: int, seed: int, rows: np.ndarray | None = None
               ) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """``n`` training light curves on the templates' epochs.

    Parameters
    ----------
    tpl
        Templates (:func:`load_templates`).
    n
        Number of curves.
    seed
        Random seed.
    rows
        Template rows to draw from (train/validation split by object); None: all.

    Returns
    -------
    arrays, meta
        ``arrays``: mag, mag_err, flags (n, n_t) and label (n,); ``meta``: the variability
        parameters, class, noise model, magnitude and observed S/N of each curve.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(len(tpl.object_id)) if rows is None else np.asarray(rows)
    pick = rng.choice(rows, n)
    t = tpl.mjd
    params = assign_variables(rng, n, fractions={k: v for k, v in CLASS_MIX.items() if k != "constant"},
                              t_start=float(t[0]), t_end=float(t[-1]), **RANGES)
    dm = delta_mag(params, t)  # (n, n_t)
    centres, scatter, missing = tpl.error_model()
    model_noise = rng.random(n) < 0.5
    shift = np.where(model_noise, rng.uniform(-0.75, 0.75, n), 0.0)
    m0 = tpl.mag_median[pick] + shift
    base = tpl.mag[pick]
    err = tpl.mag_err[pick].copy()
    flags = tpl.flags[pick].copy()
    present = np.isfinite(base)
    resid = base - tpl.mag_median[pick][:, None]
    sig_new = np.interp(m0, centres, scatter)
    rel_err = err / np.nanmedian(err, 1, keepdims=True)
    gauss = rng.standard_normal(base.shape) * sig_new[:, None] * np.nan_to_num(rel_err, nan=1.0)
    noise = np.where(model_noise[:, None], gauss, resid)
    err_scale = np.where(model_noise, sig_new / np.maximum(tpl.sigma_mag[pick], 1e-4), 1.0)
    err = err * err_scale[:, None]
    mag = m0[:, None] + dm + noise
    # extra non-detections where the star is fainter than its median
    p_miss = np.clip(np.interp(m0[:, None] + dm, centres, missing) - np.interp(m0, centres, missing)[:, None], 0, 1)
    present &= rng.random(base.shape) >= p_miss
    mag = np.where(present, mag, np.nan)
    err = np.where(present, err, np.nan)
    flags = np.where(present, flags, 0)
    sigma = np.where(present, np.interp(m0, centres, scatter)[:, None], np.inf)
    snr_obs = np.sqrt(np.sum((dm / sigma) ** 2, 1))
    cls = params["var_class"].to_numpy()
    label = np.array([LABEL[c] for c in cls])
    label = np.where((label > 0) & (snr_obs < 3.0), 0, label)
    meta = params.assign(mag=m0, noise="model", snr_obs=snr_obs, label=label, template=tpl.object_id[pick])
    meta.loc[~model_noise, "noise"] = "real"
    return {"mag": mag, "mag_err": err, "flags": flags, "label": label}, meta

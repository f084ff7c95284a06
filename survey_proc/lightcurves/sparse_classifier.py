"""The classifier of sparse, long-baseline light curves: a small MLP on Fourier features.

Why a second model
------------------
The shipped CNN (:mod:`survey_proc.lightcurves.classifier`, v2) was trained on one cadence
(1000 epochs over 3.5 d) and reads phase-folded views of it. On real ground-based curves of
years (EROS-1, ~120 points over ~900-1400 d) it called 0.54 of the test split's stars right
(RESULTS.md, issue 22): its inputs are out of its domain. Curves whose kept points span
more than ``[classify] sparse_span_days`` go to this model instead: it sees the cadence-free
features of :mod:`survey_proc.lightcurves.fourier_features` (a multi-band object's period
searched in all its bands jointly), was trained on the real EROS-1 train split (eclipsing
binaries and pulsators) and on constant and random-walk objects at the same real cadences and
errors, each also thinned to 20-60 % of its points (``training/train_sparse_classifier.py``;
the card says how).
Curves inside the CNN's domain (the simulated surveys, whatever their number of epochs)
are unchanged.

Two views of a curve
--------------------
The preprocessing clips points unlike their neighbours in time
(:mod:`~survey_proc.lightcurves.preprocess`, step 3). At a nightly cadence a detached
binary's eclipse is a single faint point among out-of-eclipse neighbours, and the clip drops
it: on the EROS-1 validation stars the joint search finds the period of 0.49 of the
eclipsing binaries on the clipped curves and 0.74 with the clipped points put back, while
the pulsators' periods need the clip (Cepheids 0.72 clipped, 0.59 unclipped; RESULTS.md,
issue 22). A card with ``views = ["clipped", "unclipped"]`` gives the model both: each
curve's features are measured on the kept points and again with the clipped points
(:meth:`~survey_proc.lightcurves.preprocess.LightCurveBatch.kept`, ``with_clipped``), each
view's period searched on its own, and the two feature vectors concatenated. The
significance gate takes the smaller false-alarm probability of the two views; an eclipsing
binary's period and shape come from the unclipped view, every other class's from the
clipped one. A card without ``views`` is the single clipped view.

Decision
--------
Classes :data:`SPARSE_CLASSES` (no ``transit``: the training set has none). ``p_periodic``
is ``p(eclipsing_binary) + p(pulsator)``; an object is periodic when it reaches the card's
``threshold`` and its signal is significant: the LS peak's Baluev false-alarm probability,
or with the card's ``significance = "ls_or_harmonic"`` the smaller of it and the
multi-harmonic one (:func:`~survey_proc.lightcurves.fourier_features.harmonic_false_alarm`),
is at most the card's ``max_fap`` (all chosen on the validation split, see the card; without
``max_fap``, ``[classify] pulsator_max_fap``, the CNN path's gate); otherwise the
more probable of ``constant`` and ``non_periodic``, except when ``p_periodic`` reaches the
threshold but no period is significant: ``constant`` (the model is out of its domain there:
on a simulated 11-year single-band survey it gave constant stars p_periodic ~0.99, and the
order of their two tiny non-periodic probabilities labelled 38 % of them ``non_periodic``;
RESULTS.md, issue 22). ``non_periodic`` further needs evidence of variability that is not white:
the curve's von Neumann ratio ``eta`` (clipped view) at least :data:`NON_PERIODIC_MIN_Z` white-noise
spreads below 2 (:func:`correlated_variability_z`; a card may set ``non_periodic_min_z``), else
``constant``. The preprocessing scales the errors to the curve's own point-to-point scatter, so a
curve without correlated variability carries no evidence that it varies at all, whatever the
model's probabilities: on a simulated 11-year single-band survey the model labelled 114 of 1141
constant stars ``non_periodic`` (3 with this rule), on the EROS-1 validation cadences 4 % of the
constant curves (0.3 %); the price is the random walks too slow or faint to lower ``eta`` that
much (at the EROS test cadences 57 % of them keep the label per band, 68 % per object with the bands
reconciled by :func:`~survey_proc.lightcurves.search.reconcile_bands`, 84 % before; RESULTS.md, issue 22).
Periods: a pulsator's is the fitted period; an eclipsing binary's is twice it (the LS peak of
two similar eclipses is half the orbit). Fewer than 1.15 cycles of that period in the curve's
own span: ``single_event``, period NaN, as in the CNN path.

Nothing here knows about Dask or files; :func:`survey_proc.model_registry.load` loads it
(kind ``"classifier_sparse"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from survey_proc.lightcurves.fourier_features import FEATURE_NAMES, CurveFit, curve_features
from survey_proc.lightcurves.preprocess import LightCurveBatch, correlated_variability_z
from survey_proc.vocab import SINGLE_EVENT

SPARSE_CLASSES: tuple[str, ...] = ("constant", "eclipsing_binary", "pulsator", "non_periodic")
VIEWS: tuple[str, ...] = ("clipped", "unclipped")  # the views a card may name (module docstring)
SINGLE_EVENT_CYCLES = 1.15
# ``non_periodic`` needs the von Neumann ratio this many white-noise spreads below 2 (module docstring): the
# smallest of 2, 2.5 and 3 at which <= 0.5 % of the EROS-1 validation constant curves of every mode (joint, alone,
# thinned) keep that label (2: 0.9 / 0.8 / 1.5 %, 2.5: 0.4 / 0.4 / 0.9 %, 3: 0.2 / 0.3 / 0.1 %; RESULTS.md, issue 22)
NON_PERIODIC_MIN_Z = 3.0


@dataclass(frozen=True)
class SparseClassifierConfig:
    """Architecture of :class:`FourierMLP`."""

    n_features: int = len(FEATURE_NAMES)
    hidden: tuple[int, ...] = (64, 64)
    dropout: float = 0.2
    n_classes: int = len(SPARSE_CLASSES)


class FourierMLP(nn.Module):
    """Standardised features -> class logits; the standardisation (``mean``, ``scale``) is part of the weights."""

    def __init__(self, cfg: SparseClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(cfg.n_features))
        self.register_buffer("scale", torch.ones(cfg.n_features))
        layers: list[nn.Module] = []
        n_in = cfg.n_features
        for h in cfg.hidden:
            layers += [nn.Linear(n_in, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            n_in = h
        layers.append(nn.Linear(n_in, cfg.n_classes))
        self.net = nn.Sequential(*layers)

    mean: torch.Tensor
    scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (n, n_classes) of raw feature rows ``x`` (n, n_features)."""
        return self.net((x - self.mean) / self.scale)


@dataclass
class LoadedSparseClassifier:
    """A sparse-curve classifier ready for inference (from :func:`survey_proc.model_registry.load`)."""

    model: FourierMLP
    threshold: float
    card: dict
    path: str
    device: torch.device


def period_min_days(clf: LoadedSparseClassifier) -> float:
    """The shortest period searched (days): the card's ``search.period_min_days`` (what it was trained with)."""
    return float((clf.card or {}).get("search", {}).get("period_min_days", 0.1))


def rescale_bands(clf: LoadedSparseClassifier) -> bool:
    """Whether the joint search weighs each band by its own scatter (the card's ``search.rescale_bands``).

    What the model was trained with (:func:`~survey_proc.lightcurves.fourier_features.rescaled_bands`).
    """
    return bool((clf.card or {}).get("search", {}).get("rescale_bands", False))


def significance(clf: LoadedSparseClassifier, fit: CurveFit) -> float:
    """The false-alarm probability a periodic call is gated on.

    The LS peak's, or with the card's ``significance = "ls_or_harmonic"`` the smaller of it
    and the multi-harmonic one (:attr:`CurveFit.fap_harmonic`).
    """
    if (clf.card or {}).get("significance", "ls") == "ls_or_harmonic":
        return min(fit.fap, fit.fap_harmonic)
    return fit.fap


def max_fap(clf: LoadedSparseClassifier, default: float) -> float:
    """The FAP gate of a periodic call: the card's ``max_fap`` (chosen on validation), else ``default``."""
    return float((clf.card or {}).get("max_fap", default))


def non_periodic_min_z(clf: LoadedSparseClassifier) -> float:
    """The least :func:`correlated_variability_z` of a ``non_periodic`` label (card ``non_periodic_min_z``)."""
    return float((clf.card or {}).get("non_periodic_min_z", NON_PERIODIC_MIN_Z))


@torch.no_grad()
def predict_proba(clf: LoadedSparseClassifier, x: np.ndarray) -> np.ndarray:
    """Class probabilities (n, len(SPARSE_CLASSES)) of feature rows ``x`` (n, len(FEATURE_NAMES))."""
    if not len(x):
        return np.zeros((0, len(SPARSE_CLASSES)), np.float32)
    t = torch.as_tensor(np.asarray(x, np.float32), device=clf.device)
    return torch.softmax(clf.model(t), 1).cpu().numpy()


def views(clf: LoadedSparseClassifier) -> tuple[str, ...]:
    """The views of a curve the model reads, in the order of its feature vector (card ``views``; default clipped).

    Raises
    ------
    ValueError
        When the card names a view other than :data:`VIEWS` or none.
    """
    vs = tuple((clf.card or {}).get("views", ["clipped"]))
    if not vs or any(v not in VIEWS for v in vs):
        raise ValueError(f"sparse classifier {clf.path}: card views {list(vs)} must be a non-empty list of "
                         f"{list(VIEWS)}; retrain it with training/train_sparse_classifier.py")
    return vs


def batch_features(batch: LightCurveBatch, rows: np.ndarray, p_min_days: float,
                   others: Mapping[Any, list] | None = None, with_clipped: bool = False,
                   rescale: bool = False) -> list[CurveFit]:
    """:func:`~survey_proc.lightcurves.fourier_features.curve_features` of rows ``rows`` of ``batch`` (kept points).

    ``others`` maps an object_id to its other bands' kept curves, ``(t_mjd, y, sigma)`` each
    (MJD in days): that object's period is searched in all its bands jointly.
    ``with_clipped``: the points the preprocessing clipped are measured too (the unclipped view;
    ``others`` should then hold the other bands' unclipped curves). ``rescale``: the joint search
    weighs each band by its own scatter (:func:`rescale_bands`).
    """
    out = []
    others = others or {}
    for i in rows:
        out.append(curve_features(*batch.kept(i, with_clipped), p_min_days,
                                  others=others.get(batch.object_id[i], ()), rescale_bands=rescale))
    return out


def classify_sparse(batch: LightCurveBatch, rows: np.ndarray, clf: LoadedSparseClassifier,
                    pulsator_max_fap: float = 1e-3, others: Mapping[Any, list] | None = None,
                    others_unclipped: Mapping[Any, list] | None = None) -> pd.DataFrame:
    """Classify rows ``rows`` of ``batch`` (usable curves): one result row each, in that order.

    ``others``: the objects' other bands (:func:`batch_features`), searched jointly with these;
    ``others_unclipped``: the same with their clipped points, for a two-view model
    (module docstring; missing: the unclipped view is searched with ``others``).

    Returns
    -------
    DataFrame with period (days), period_power (LS power), depth (peak-to-peak relative flux),
    duration (NaN), p_periodic, var_class, var_class_prob, t0_days (time of minimum light,
    days from ``batch.t_days`` 0), period_ls, ls_power, n_events (-1), ls_fap and
    ``prob_<class>`` for :data:`SPARSE_CLASSES`.
    """
    rows = np.asarray(rows, int)
    vs = views(clf)
    p_min = period_min_days(clf)
    rescale = rescale_bands(clf)
    others = others or {}
    others_u = others if others_unclipped is None else others_unclipped
    fits: dict[str, list[CurveFit]] = {}
    for v in vs:
        if v == "clipped":
            fits[v] = batch_features(batch, rows, p_min, others, rescale=rescale)
            continue
        fits[v] = []
        for k, i in enumerate(rows):
            oid = batch.object_id[i]
            same = (batch.n_clipped[i] == 0 and [len(c[0]) for c in others.get(oid, ())]
                    == [len(c[0]) for c in others_u.get(oid, ())])
            if same and "clipped" in fits:  # nothing clipped in any band: the same curves, the same fit
                fits[v].append(fits["clipped"][k])
            else:
                fits[v] += batch_features(batch, rows[k:k + 1], p_min, others_u, with_clipped=True, rescale=rescale)
    x = (np.concatenate([np.stack([f.features for f in fits[v]]) for v in vs], 1) if len(rows)
         else np.zeros((0, len(FEATURE_NAMES) * len(vs)), np.float32))
    prob = predict_proba(clf, x)
    ie, ip = SPARSE_CLASSES.index("eclipsing_binary"), SPARSE_CLASSES.index("pulsator")
    non = [SPARSE_CLASSES.index("constant"), SPARSE_CLASSES.index("non_periodic")]
    p_per = prob[:, ie] + prob[:, ip]
    eb_view = "unclipped" if "unclipped" in vs else vs[0]
    i_eta = FEATURE_NAMES.index("eta")
    min_z = non_periodic_min_z(clf)
    other_view = "clipped" if "clipped" in vs else vs[0]
    res = []
    for k, i in enumerate(rows):
        keep = batch.w[i] > 0
        span = float(np.ptp(batch.t_days[keep]))
        sig = min(significance(clf, fits[v][k]) for v in vs)
        fit, view = fits[other_view][k], other_view
        if p_per[k] >= clf.threshold and sig <= max_fap(clf, pulsator_max_fap):
            j = ie if prob[k, ie] >= prob[k, ip] else ip
            name = SPARSE_CLASSES[j]
            if name == "eclipsing_binary":
                fit, view = fits[eb_view][k], eb_view
            period = fit.period_days * (2.0 if name == "eclipsing_binary" else 1.0)
            if period * SINGLE_EVENT_CYCLES > span:
                name, period = SINGLE_EVENT, np.nan
        elif p_per[k] >= clf.threshold:
            # the model calls it periodic but no period is significant: out of the model's domain (on its
            # validation curves 14 of ~7,000 negatives), its constant / non_periodic probabilities are both
            # ~0.005 and their order is noise; no significant variability was found, so: constant
            j = SPARSE_CLASSES.index("constant")
            name, period = SPARSE_CLASSES[j], np.nan
        else:
            j = non[int(np.argmax(prob[k, non]))]
            z = correlated_variability_z(float(fit.features[i_eta]), int(batch.n_points[i]))  # fit: the clipped view
            if SPARSE_CLASSES[j] == "non_periodic" and z < min_z:  # no evidence of variability: constant
                j = SPARSE_CLASSES.index("constant")
            name, period = SPARSE_CLASSES[j], np.nan
        row = {"period": period, "period_power": fit.ls_power, "depth": fit.amplitude, "duration": np.nan,
               "p_periodic": float(p_per[k]), "var_class": name, "var_class_prob": float(prob[k, j]),
               "t0_days": fit.t_min_days + float(batch.kept(i, view == "unclipped")[0][0]) - batch.t_ref_mjd,
               "period_ls": fit.period_days,
               "ls_power": fit.ls_power, "n_events": -1, "ls_fap": fit.fap}
        row.update({f"prob_{c}": float(prob[k, m]) for m, c in enumerate(SPARSE_CLASSES)})
        res.append(row)
    return pd.DataFrame(res, index=pd.RangeIndex(len(res)))

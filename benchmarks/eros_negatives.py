"""Constant and random-walk objects at real EROS-1 test-split cadences through the classify path (issue 22).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/eros_negatives.py [--sparse-weights W] [--thin 0.4]
        [--n-stars 300] [--seed 2024] [--drw-rms-max 0.5] [--json F]

The EROS-1 test split has no constant or non-periodic stars, so the false positives of the
sparse route at its cadences are measured on synthetic ones: for each of the first
``--n-stars`` test stars, a ``constant`` and a ``non_periodic`` (damped random walk or trend
with a zero-point jump) object in both bands at the star's real times and quoted errors
(:func:`training.train_sparse_classifier._negative`, the generator of the training negatives;
only the times and errors of the test split are read, never its labels), optionally thinned
to ``--thin`` of each band's points (at least 20). Each object goes through
:func:`survey_proc.lightcurves.search.classify_table` with the default ``[classify]``
settings; reported: the objects called periodic (eclipsing_binary, pulsator, transit) per kind,
and every class given (a constant labelled ``non_periodic`` is wrong too, though not periodic).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from survey_proc import model_registry
from survey_proc.config import ClassifySettings
from survey_proc.lightcurves.search import classify_table
from survey_proc.vocab import PERIODIC_CLASSES
from training.build_cadence_data import EROS, eros_band
from training.train_sparse_classifier import _negative


def main(argv: list[str] | None = None) -> None:
    """Command line (module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse-weights", default="")
    ap.add_argument("--thin", type=float, default=1.0)
    ap.add_argument("--n-stars", type=int, default=300)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--json", default=None)
    ap.add_argument("--drw-rms-max", type=float, default=0.5,
                    help="the random walks' largest rms (mag; 0.5, the definition the figures have used)")
    a = ap.parse_args(argv)
    cnn = model_registry.load("classifier", device="cpu")
    sparse = model_registry.load("classifier_sparse", a.sparse_weights or None, device="cpu")
    lab = pd.read_csv(EROS / "test.csv", index_col=0)
    cur = pd.read_csv(EROS / "test_varlength_features.csv.gz", index_col=0)
    rng = np.random.default_rng(a.seed)
    t0 = time.time()
    rows = []
    for sid in lab.index[:a.n_stars]:
        bands = {}
        for b in "rb":
            t, m, e = eros_band(cur.loc[sid], b)
            ok = np.isfinite(m) & np.isfinite(e) & (e > 0)
            t, m, e = t[ok], m[ok], e[ok]
            if a.thin < 1:
                keep = np.sort(rng.choice(len(t), min(len(t), max(20, round(len(t) * a.thin))), replace=False))
                t, m, e = t[keep], m[keep], e[keep]
            if len(t) >= 20:
                bands[b] = (t, m, e)
        if not bands:
            continue
        for kind in ("constant", "non_periodic"):
            parts, start = [], 0
            for b, (t, m, e) in _negative(rng, bands, kind, a.drw_rms_max).items():
                parts.append(pd.DataFrame({"object_id": 0, "epoch": start + np.arange(len(t)), "mjd": t, "mag": m,
                                           "mag_err": e, "flags": 0, "band": b}))
                start += len(t)
            res, _ = classify_table(pd.concat(parts, ignore_index=True), cnn, ClassifySettings(), sparse)
            cls = res["var_class"].iloc[0] if res is not None and "var_class" in res else None
            rows.append({"star": sid, "kind": kind, "var_class": cls})
    d = pd.DataFrame(rows)
    done = d["var_class"].notna()
    out = {"sparse_weights": str(sparse.path), "thin": a.thin, "n_stars": a.n_stars, "seed": a.seed,
           "drw_rms_max": a.drw_rms_max,
           "wall_s": round(time.time() - t0, 1),
           **{kind: {"classified": int((done & (d["kind"] == kind)).sum()),
                     "called_periodic": int((d["var_class"].isin(PERIODIC_CLASSES) & (d["kind"] == kind)).sum()),
                     "classes": {str(k): int(v) for k, v in
                                 d.loc[d["kind"] == kind, "var_class"].fillna("none").value_counts().items()}}
              for kind in ("constant", "non_periodic")}}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()

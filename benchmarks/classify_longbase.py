"""The sparse long-baseline classifier on a simulated multi-year survey, against the CNN alone (issue 22).

    survey-proc simulate --scenario benchmarks/scenarios/longbase-heldout.toml --epochs 150 --size 1024 --out S.zarr
    survey-proc run S.zarr --out OUT
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/classify_longbase.py --run OUT --store S.zarr [--json F]
        [--sparse-weights W ...] [--no-cnn]

The run's light curves (detrended as the stage does: :func:`benchmarks.classify_heldout22.load_run`)
go through :func:`survey_proc.lightcurves.search.classify_table` twice, with the default
settings: with the shipped sparse classifier (the stage's default: every curve spanning more
than ``sparse_span_days`` goes to it) and without it (the CNN alone, as before it existed).
Per variant:

- **constants called periodic**: objects matched one-to-one (1 px) to a true constant star with
  no true variable within 3 px (:func:`~benchmarks.classify_heldout22.clean_constants`), classified,
  whose class is periodic;
- **precision**: objects called periodic whose one-to-one true star is periodic;
- **recall**: true periodic stars with S/N >= 2 and at least two events in the baseline
  (:func:`benchmarks.classify.truth_table`), matched to a classified object, called periodic;
- **periods**: of the true positives, within 1 % of the true period (eclipsing binaries and
  transits also at 2x or 1/2x).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.classify import truth_table
from benchmarks.classify_heldout22 import clean_constants, load_run
from survey_proc import model_registry
from survey_proc.config import ClassifySettings
from survey_proc.evaluate import match_one_to_one
from survey_proc.lightcurves.search import classify_table
from survey_proc.vocab import PERIODIC_CLASSES


def evaluate(run: Path, store: str, extra_weights: tuple[str, ...] = (), cnn: bool = True) -> dict[str, dict]:
    """The figures of the module docstring for each variant: the shipped sparse model, each of ``extra_weights``
    (other sparse weights, e.g. an earlier model's) and, with ``cnn``, the CNN alone."""
    objects, lc = load_run(run)
    stars = truth_table(store)
    const = set(clean_constants(objects, stars))
    i_o, i_s = match_one_to_one(objects["x"].to_numpy(), objects["y"].to_numpy(), stars["x"].to_numpy(),
                                stars["y"].to_numpy(), 1.0)
    obj2star = dict(zip(objects["object_id"].to_numpy()[i_o], i_s, strict=True))
    cls_true = stars["var_class"].to_numpy()
    clf = model_registry.load("classifier", device="cpu")
    out: dict[str, dict] = {}
    variants = [("sparse (default)", model_registry.load("classifier_sparse", device="cpu"))]
    variants += [(f"sparse ({w})", model_registry.load("classifier_sparse", w, device="cpu")) for w in extra_weights]
    if cnn:
        variants.append(("cnn only", None))
    for name, sparse in variants:
        t0 = time.time()
        res, info = classify_table(lc, clf, ClassifySettings(), sparse)
        wall = time.time() - t0
        assert res is not None
        done = res[res["var_class"].notna()]
        called = done["var_class"].isin(PERIODIC_CLASSES)
        c = done[done.index.isin(const)]
        tp, periods_ok = 0, []
        for oid in done.index[called.to_numpy()]:
            s = obj2star.get(oid)
            if s is not None and cls_true[s] in PERIODIC_CLASSES:
                tp += 1
                facs = (1.0,) if cls_true[s] == "pulsator" else (1.0, 2.0, 0.5)
                p = float(done.loc[oid, "period"])
                periods_ok.append(any(abs(p / (f * stars["period"].iloc[s]) - 1) <= 0.01 for f in facs))
        elig = [oid for oid, s in obj2star.items() if oid in done.index and cls_true[s] in PERIODIC_CLASSES
                and stars["snr_csst"].iloc[s] >= 2 and stars["n_events"].iloc[s] >= 2]
        out[name] = {"classified": len(done), "n_sparse": info.get("n_sparse"), "clean_constants": len(c),
                     "constants_called_periodic": float(c["var_class"].isin(PERIODIC_CLASSES).mean()),
                     "n_constants_called_periodic": int(c["var_class"].isin(PERIODIC_CLASSES).sum()),
                     "called_periodic": int(called.sum()), "precision": tp / max(int(called.sum()), 1),
                     "true_periodic_eligible": len(elig),
                     "recall": float(np.mean([done.loc[o, "var_class"] in PERIODIC_CLASSES for o in elig]))
                     if elig else None,
                     "periods_within_1pct_of_tp": float(np.mean(periods_ok)) if periods_ok else None,
                     "classes": {str(k): int(v) for k, v in done["var_class"].value_counts().items()},
                     "wall_s": round(wall, 1)}
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sparse-weights", nargs="*", default=[], help="other sparse weights to compare")
    ap.add_argument("--no-cnn", action="store_true", help="skip the CNN-only variant")
    a = ap.parse_args(argv)
    out = evaluate(Path(a.run), a.store, tuple(a.sparse_weights), not a.no_cnn)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()

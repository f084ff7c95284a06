"""Featurize training curves over many cadences (issue 22) into an npz, as ``survey-proc run`` would.

    PYTHONPATH=. python training/build_cadence_data.py --what synthetic --groups 400 --seed 7 --out F.npz
    PYTHONPATH=. python training/build_cadence_data.py --what eros --split train --out F.npz

``synthetic``: groups of 16 curves sharing one cadence (:func:`training.classifier_data.cadence_group`).
``eros``: the real EROS-1 curves of a split (R band; B band too with ``--bands rb``), labelled
eclipsing_binary (type 1) or pulsator (Cepheids, RR Lyrae, Miras). The search grid is the
pipeline's (:func:`survey_proc.lightcurves.periodogram.search_grid`, from 0.03 d), the
magnitude feature is dropped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from survey_proc.lightcurves import classifier as C
from survey_proc.lightcurves.periodogram import search_grid
from survey_proc.lightcurves.preprocess import PreprocessConfig, preprocess

EROS = Path(__file__).resolve().parents[1].parent / "shared/data/lightcurves/eros"  # ../shared beside the repo
PERIOD_MIN = 0.03
EROS_LABEL = {1: "eclipsing_binary", 2: "pulsator", 3: "pulsator", 4: "pulsator"}



def eros_band(row: pd.Series, band: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One band of an EROS curve (a row of ``*_varlength_features.csv.gz``): times (days), fluxes, errors.

    Repeated times keep their first point (the files hold a few duplicates).
    """
    t = np.asarray(json.loads(row[f"time_points_{band}"]), float)
    m = np.asarray(json.loads(row[f"light_points_{band}"]), float)
    e = np.asarray(json.loads(row[f"error_points_{band}"]), float)
    t, first = np.unique(t, return_index=True)
    return t, m[first], e[first]

def featurize(mjd: np.ndarray, mag: np.ndarray, err: np.ndarray) -> dict[str, np.ndarray] | None:
    """Preprocess, search and make the classifier inputs of curves sharing ``mjd`` (days)."""
    ids = np.arange(len(mag))
    b = preprocess(ids, mjd, mag, err, np.zeros(mag.shape, np.int32), PreprocessConfig(min_points=20))
    try:
        grid = search_grid(b.t_days, period_min_days=PERIOD_MIN)
    except ValueError:
        return None
    use = np.flatnonzero(b.usable)
    if not len(use):
        return None
    sub = b.subset(use)
    bls, ls, (g, loc, aux) = C.search(sub, grid, use_magnitude=False)
    return {"idx": use, "g": g, "loc": loc, "aux": aux, "period_bls": bls.period_days, "period_ls": ls.period_days,
            "n_points": sub.n_points, "span": np.full(len(use), grid.baseline_days)}


def _save(out: str, parts: dict[str, list], meta_rows: list[pd.DataFrame]) -> pd.DataFrame:
    meta = pd.concat(meta_rows, ignore_index=True)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    np.savez(out, **arrays, **{f"meta_{c}": meta[c].to_numpy() for c in meta.columns})
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", choices=["synthetic", "eros"], required=True)
    ap.add_argument("--groups", type=int, default=400)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--split", default="train")
    ap.add_argument("--bands", default="r")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    parts: dict[str, list] = {}
    meta_rows: list[pd.DataFrame] = []

    def add(f: dict, meta: pd.DataFrame) -> None:
        for k in ("g", "loc", "aux", "period_bls", "period_ls", "n_points", "span"):
            parts.setdefault(k, []).append(f[k])
        meta_rows.append(meta.iloc[f["idx"]].reset_index(drop=True))

    if args.what == "synthetic":
        from training.classifier_data import cadence_group, load_eros_times

        eros_times = load_eros_times(EROS / "train_varlength_features.csv.gz")
        rng = np.random.default_rng(args.seed)
        for gi in range(args.groups):
            mjd, mag, err, meta = cadence_group(rng, args.group_size, eros_times)
            f = featurize(mjd, mag, err)
            if f is not None:
                add(f, meta.assign(group=gi, n_t=len(mjd), baseline=mjd[-1] - mjd[0]))
            if gi % 20 == 0:
                print(f"group {gi}/{args.groups} n_t {len(mjd)} T {mjd[-1] - mjd[0]:.1f} d  {time.time() - t0:.0f} s",
                      flush=True)
                if meta_rows:  # a checkpoint: what is done so far is usable
                    _save(args.out, parts, meta_rows)
    else:
        lab = pd.read_csv(EROS / f"{args.split}.csv", index_col=0)
        curves = pd.read_csv(EROS / f"{args.split}_varlength_features.csv.gz", index_col=0)
        ids = lab.index.intersection(curves.index)
        if args.limit:
            ids = ids[:args.limit]
        for k, sid in enumerate(ids):
            for band in args.bands:
                t, m, e = eros_band(curves.loc[sid], band)
                if len(t) < 20:
                    continue
                f = featurize(t, m[None], e[None])
                if f is None:
                    continue
                typ = int(lab.loc[sid, "type"])
                meta = pd.DataFrame([{"kind": f"eros{typ}", "label": EROS_LABEL[typ], "star": sid, "band": band,
                                      "period": float(lab.loc[sid, "period"] / lab.loc[sid, "div_period"]),
                                      "amplitude": np.nan, "sigma": np.nan, "snr": np.nan}])
                add(f, meta)
            if k % 200 == 0:
                print(f"star {k}/{len(ids)}  {time.time() - t0:.0f} s", flush=True)
    meta = _save(args.out, parts, meta_rows)
    print(f"wrote {args.out}: {len(meta)} curves, {meta['label'].value_counts().to_dict()}, {time.time() - t0:.0f} s",
          flush=True)


if __name__ == "__main__":
    main()

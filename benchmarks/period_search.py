"""Period-search cost (issue 22): classify throughput on the default survey, and a 10-year, 10,000-point curve.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/period_search.py [--json F]

- **Throughput**: ``classify_table`` (preprocessing, BLS, LS, views, the CNN, period
  refinement: the classify stage's work on a region) on 512 synthetic light curves on the
  default survey's epochs (1000 x 300 s, 3.47 d), 2.5 % of them sinusoids (0.3-3 d, 0.1 mag),
  the rest white noise (0.02 mag), one thread, the shipped classifier. Curves per second.
- **Long curve**: one curve of 10,000 points drawn uniformly over 10 years (a 0.61 d,
  0.05 mag sinusoid, plus a transit train of 3.7 d), searched with the default grid
  (``search_grid``: LS from 0.03 d to T / 1.15, BLS from 0.25 d, capped): wall time and the
  process's peak resident memory (``ru_maxrss``) of the BLS, the LS and the whole
  ``classify`` of that curve, each in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def throughput(n: int = 512, seed: int = 1) -> dict:
    """Curves per second of ``classify_table`` on the default survey's epochs (module docstring)."""
    import pandas as pd
    import torch

    from survey_proc import model_registry
    from survey_proc.config import ClassifySettings
    from survey_proc.lightcurves.search import classify_table

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    nt = 1000
    mjd = 60000 + np.arange(nt) * 300 / 86400
    mag = 20 + 0.02 * rng.normal(size=(n, nt))
    k = n // 40
    mag[:k] += 0.1 * np.sin(2 * np.pi * mjd[None] / rng.uniform(0.3, 3, k)[:, None])
    lc = pd.DataFrame({"object_id": np.repeat(np.arange(n), nt), "epoch": np.tile(np.arange(nt), n),
                       "mjd": np.tile(mjd, n), "mag": mag.ravel(), "mag_err": 0.02, "flags": 0})
    clf = model_registry.load("classifier", device="cpu")
    cc = ClassifySettings()
    classify_table(lc.iloc[: 64 * nt], clf, cc)  # warm-up
    t = time.perf_counter()
    _res, info = classify_table(lc, clf, cc)
    dt = time.perf_counter() - t
    return {"n_curves": n, "curves_per_s": n / dt, "wall_s": dt, "n_bls_freq": info.get("n_bls_freq"),
            "n_ls_freq": info.get("n_ls_freq"), "n_periodic": info.get("n_periodic")}


def _long_curve(seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 3652.5, 10_000))
    y = 0.05 * np.sin(2 * np.pi * t / 0.61) + 0.01 * rng.normal(size=t.size)
    ph = np.mod(t / 3.7, 1.0)
    y[np.minimum(ph, 1 - ph) * 3.7 < 0.06] -= 0.02
    return t, y, np.full(t.size, 1e4)


def _one(what: str) -> dict:
    """Run one step on the long curve in this process; returns time and peak memory."""
    import torch

    from survey_proc.lightcurves.periodogram import BatchedBLS, BatchedLS, search_grid

    torch.set_num_threads(1)
    t, y, w = _long_curve()
    t0 = time.perf_counter()
    g = search_grid(t)
    out: dict = {"n_bls_freq": len(g.bls_freq), "n_ls_freq": len(g.ls_freq), "bls_oversample": g.bls_oversample}
    if what == "bls":
        r = BatchedBLS(t, g)(y[None], w[None])
        out["period"] = float(r.period_days[0])
    elif what == "ls":
        r2 = BatchedLS(t, g)(y[None], w[None])
        out["period"] = float(r2.period_days[0])
    else:
        from survey_proc import model_registry
        from survey_proc.lightcurves import classifier as C
        from survey_proc.lightcurves.preprocess import preprocess

        clf = model_registry.load("classifier", device="cpu")
        mag = 20 - 2.5 * np.log10(1 + y)
        b = preprocess(np.array([0]), t + 60000, mag[None], np.full((1, t.size), 0.01),
                       np.zeros((1, t.size), np.int32))
        res = C.classify(b, clf, search_grid(b.t_days, period_min_days=0.03)).iloc[0]
        out.update(var_class=res["var_class"], period=float(res["period"]), period_ls=float(res["period_ls"]),
                   period_bls=float(res["period_bls"]))
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-throughput", action="store_true")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one)))
        return
    res: dict = {}
    if not args.no_throughput:
        res["throughput_default_survey"] = throughput()
    res["long_curve_10yr_10k_points"] = {}
    for what in ("bls", "ls", "classify"):
        p = subprocess.run([sys.executable, __file__, "--one", what], capture_output=True, text=True, check=True)
        res["long_curve_10yr_10k_points"][what] = json.loads(p.stdout.strip().splitlines()[-1])
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        open(args.json, "w").write(text)


if __name__ == "__main__":
    main()

"""Behaviour preservation across a refactor: the content digest of every output table, per case.

Runs five cases with whatever ``survey_proc`` is importable (put a checkout of another
commit first on ``PYTHONPATH`` to measure that commit) and writes, per case, the run's
status and :func:`survey_proc.validate.content_digest` of ``sources``, ``objects`` and
``lightcurves`` (row counts and SHA-256 over the rows in key order):

- ``default``: ``survey-proc run --epochs 60`` on the default survey (PNet + BPNN + classifier);
- ``sep``: the same with ``--detector sep``;
- ``sep_relative``: ``--detector sep --reference none`` (internal reference, ensemble zero points);
- ``nowcs``: a 256² dense survey, 5 jittered epochs (20 px, 0.5 deg) with every WCS removed
  (registration to the reference epoch), sep;
- ``rough``: a 256² dense survey, 4 epochs, two WCSs 25-30 px off (refined against the reference
  catalogue), sep.

Usage::

    git worktree add /tmp/old <commit>
    (cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/benchmarks/behaviour_digests.py --root R --tag before)
    PYTHONPATH=. python benchmarks/behaviour_digests.py --root R --tag after
    python benchmarks/behaviour_digests.py --root R --compare before after
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

CASES = ("default", "sep", "sep_relative", "nowcs", "rough")


def _cli(root: Path, out: Path, *args: str) -> None:
    env = {**os.environ, "SURVEY_PROC_CACHE": str(root / "cache")}
    subprocess.run([sys.executable, "-m", "survey_proc.cli", "run", "--epochs", "60", "--out", str(out), "--quiet",
                    "--no-evaluate", "--workers", "2", "--overwrite", *args], env=env, check=False)


def _small_store(root: Path, kind: str) -> Path:
    import zarr

    from survey_proc.simulate import load_scenario, simulate_survey
    from survey_proc.simulate.wcs import shift_wcs_text

    st = root / f"{kind}.zarr"
    if st.exists():
        return st
    if kind == "nowcs":
        scn = load_scenario("dense", {"size_px": 256, "n_epochs": 5, "seed": 41, "psf_oversample": 5,
                                      "star_density_per_px2": 0.006, "jitter_px": 20.0, "rotation_jitter_deg": 0.5,
                                      "n_bad_columns": 0, "cosmic_rate_per_px_s": 0.0})
        simulate_survey(scn, st, workers=0, progress=False)
        g = zarr.open_group(str(st / "fields" / "F000"), mode="r+")
        g["wcs"][:] = np.asarray([""] * 5, dtype=object)
        g.attrs.pop("reference_wcs", None)
    else:
        scn = load_scenario("dense", {"size_px": 256, "n_epochs": 4, "seed": 47, "psf_oversample": 5,
                                      "star_density_per_px2": 0.01, "n_bad_columns": 0, "reference_mag_faint": 23.0})
        simulate_survey(scn, st, workers=0, progress=False)
        g = zarr.open_group(str(st / "fields" / "F000"), mode="r+")
        wcs = [str(w) for w in g["wcs"][:]]
        for e, (dx, dy) in ((1, (30.0, -12.0)), (3, (-25.0, 20.0))):
            wcs[e] = shift_wcs_text(wcs[e], dx, dy)
        g["wcs"][:] = np.asarray(wcs, dtype=object)
    return st


def _small(root: Path, kind: str, out: Path) -> None:
    from survey_proc.config import load_config
    from survey_proc.distributed.cluster import local_client
    from survey_proc.distributed.pipeline import run_pipeline

    st = _small_store(root, kind)
    shutil.rmtree(out, ignore_errors=True)
    extra = {"reference": "none"} if kind == "nowcs" else {}
    cfg = load_config(None, {"store": str(st), "out": str(out), "progress": False, "evaluate": False,
                             "detector": "sep", "bpnn": {"enabled": False}, "tile_px": 256, "halo_px": 24,
                             "crossmatch": {"region_px": 256}, **extra})
    with local_client(2, quiet=True) as c:
        run_pipeline(cfg, client=c)


def measure(root: Path, tag: str, cases: list[str]) -> dict:
    import survey_proc
    from survey_proc.validate import content_digest

    print(f"survey_proc from {survey_proc.__file__}", flush=True)
    path = root / f"{tag}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    args = {"default": (), "sep": ("--detector", "sep"),
            "sep_relative": ("--detector", "sep", "--reference", "none")}
    for case in cases:
        out = root / "out" / tag / case
        if case in args:
            _cli(root, out, *args[case])
        else:
            _small(root, case, out)
        run = json.loads((out / "run.json").read_text())
        results[case] = {"status": run["status"], "failures": len(run["failures"]), "digest": content_digest(out)}
        print(case, results[case], flush=True)
        path.write_text(json.dumps(results, indent=1))
    return results


def compare(root: Path, a: str, b: str) -> bool:
    ra, rb = (json.loads((root / f"{t}.json").read_text()) for t in (a, b))
    same = True
    print(f"| case | status ({a} / {b}) | sources | objects | light-curve points | digests |")
    print("|---|---|---|---|---|---|")
    for case in ra:
        da, db = ra[case]["digest"], rb.get(case, {}).get("digest")
        ok = da == db
        same &= ok
        rows = [f"{da[k][0]:,}" for k in ("sources", "objects", "lightcurves")]
        print(f"| {case} | {ra[case]['status']} / {rb.get(case, {}).get('status')} | {' | '.join(rows)} | "
              f"{'identical' if ok else 'DIFFERENT'} |")
    return same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="working directory (stores, outputs, JSON results)")
    ap.add_argument("--tag", help="name of this measurement (e.g. before, after)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    a = ap.parse_args()
    a.root.mkdir(parents=True, exist_ok=True)
    if a.compare:
        return 0 if compare(a.root, *a.compare) else 1
    measure(a.root, a.tag, a.cases.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())

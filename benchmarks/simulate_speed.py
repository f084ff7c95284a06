"""Simulator speed and survey character: ``python -m benchmarks.simulate_speed``.

Simulates a survey with ``survey-proc simulate``'s API on a LocalCluster (one worker
process per core), then reports wall time, per-epoch render time, peak RSS of this
process, and the survey's crowding and depth (from the simulator's summary). Writes
``OUT/simulate_speed.json``.

Example (the issue-2 target: a 1024x1024, 1000-epoch dense field in <= 15 min on 2 cores)::

    python -m benchmarks.simulate_speed --scenario dense --epochs 1000 --size 1024 --out bench-out
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from survey_proc.distributed.cluster import available_cores
from survey_proc.simulate import SurveyPaths, load_scenario, simulate_survey


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="dense")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=101)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--keep", action="store_true", help="keep the simulated survey")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / f"speed-{a.scenario}-{a.size}px-{a.epochs}ep.zarr"
    scn = load_scenario(a.scenario, {"n_epochs": a.epochs, "size_px": a.size, "seed": a.seed})
    t0 = time.perf_counter()
    summary = simulate_survey(scn, store, overwrite=True, workers=a.workers)
    wall = time.perf_counter() - t0
    size_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    result = {
        "command": "python -m benchmarks.simulate_speed " + " ".join(argv or []),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {available_cores()} cores",
        "scenario": a.scenario, "epochs": a.epochs, "size_px": a.size, "seed": a.seed,
        "wall_s": wall,
        "render_s": summary["render_s"],
        "ms_per_epoch_wall": 1000 * wall / a.epochs,
        "store_mb": size_bytes / 1e6,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **{k: v for k, v in summary.items() if k not in ("scenario",)},
    }
    (out / f"simulate_speed-{a.scenario}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not a.keep:
        paths = SurveyPaths.for_store(store)
        for p_ in (paths.store, paths.truth, paths.reference):
            shutil.rmtree(p_, ignore_errors=True) if p_.is_dir() else p_.unlink(missing_ok=True)
    return result


if __name__ == "__main__":
    main()

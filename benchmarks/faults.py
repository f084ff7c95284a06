"""Faults at the scale of a real run, with the default pipeline (PNet + BPNN + classifier).

    PYTHONPATH=. python benchmarks/faults.py --epochs 60 --out bench-out/faults

Simulates (once) a 512 x 512 px dense survey, then runs ``survey-proc run`` on it:

1. undisturbed;
2. with one worker process SIGKILLed when 40 % of the epochs are written (the nanny starts
   a new one, which loads the models again; Dask re-runs the lost tasks);
3. interrupted with SIGINT to the whole process group (Ctrl-C) at 40 %, then the same
   command again.

It reports wall times and compares the row counts and content checksums
(:func:`survey_proc.validate.content_digest`) of runs 2 and 3 with run 1, and runs
``validate`` on each output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from survey_proc.config import load_config
from survey_proc.distributed.cluster import local_client
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.simulate import load_scenario, simulate_survey
from survey_proc.validate import content_digest, validate_output


def _n_written(out: Path) -> int:
    return len(list(out.glob("sources/*/epoch=*.parquet")))


def _wait(out: Path, n: int) -> None:
    while _n_written(out) < n:
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--out", default="bench-out/faults")
    ap.add_argument("--seed", type=int, default=1003)
    ap.add_argument("--parts", default="undisturbed,killed,interrupt",
                    help="which runs to do (an earlier undisturbed output is reused for the comparison)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    st = root / f"dense-512px-{args.epochs}ep-seed{args.seed}.zarr"
    if not st.exists():
        scn = load_scenario("dense", {"n_epochs": args.epochs, "size_px": 512, "seed": args.seed})
        simulate_survey(scn, st, workers=2, progress=False)
    kill_at = max(1, int(0.4 * args.epochs))
    results: dict = {"epochs": args.epochs, "kill_at_epochs_written": kill_at}

    def cfg(out: Path):
        return load_config(None, {"store": str(st), "out": str(out), "progress": False, "evaluate": False})

    out1 = root / "undisturbed"
    with local_client(2, quiet=True) as client:
        if "undisturbed" in parts or not (out1 / "run.json").exists():
            shutil.rmtree(out1, ignore_errors=True)
            t = time.perf_counter()
            run1 = run_pipeline(cfg(out1), client=client)
            results["undisturbed_s"] = time.perf_counter() - t
            results["undisturbed_status"] = run1["status"]
        ref = content_digest(out1)
        results["rows"] = {k: v[0] for k, v in ref.items()}

        if "killed" in parts:
            out2 = root / "killed-worker"
            shutil.rmtree(out2, ignore_errors=True)
            box: dict = {}
            t = time.perf_counter()
            th = threading.Thread(target=lambda: box.update(run=run_pipeline(cfg(out2), client=client)))
            th.start()
            _wait(out2, kill_at)
            victim = sorted(client.run(os.getpid).values())[0]
            os.kill(victim, signal.SIGKILL)
            th.join()
            results["killed_worker_s"] = time.perf_counter() - t
            results["killed_worker_status"] = box["run"]["status"]
            results["killed_worker_identical"] = content_digest(out2) == ref
            results["killed_worker_valid"] = validate_output(out2) == []
    if "interrupt" in parts:
        _interrupt(root, st, kill_at, ref, results)
    print(json.dumps(results, indent=2))
    (root / f"faults-{'-'.join(sorted(parts))}.json").write_text(json.dumps(results, indent=2) + "\n")


def _default_sigint() -> None:
    """In the child: Ctrl-C's default action, even when this script was started with SIGINT
    ignored (a background job of a non-interactive shell), which the child would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(root: Path, st: Path, kill_at: int, ref: dict, results: dict) -> None:
    out3 = root / "interrupted"
    shutil.rmtree(out3, ignore_errors=True)
    cmd = [sys.executable, "-m", "survey_proc.cli", "run", str(st), "--out", str(out3), "--workers", "2", "--quiet",
           "--no-evaluate"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    _wait(out3, kill_at)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate()
    results["interrupt_rc"] = proc.returncode
    results["interrupt_message"] = err.strip().splitlines()[-1] if err.strip() else ""
    results["interrupted_after_s"] = time.perf_counter() - t
    results["written_at_interrupt"] = _n_written(out3)
    t = time.perf_counter()
    rc = subprocess.run(cmd, capture_output=True, text=True)
    results["resume_s"] = time.perf_counter() - t
    results["resume_rc"] = rc.returncode
    run3 = json.loads((out3 / "run.json").read_text())
    results["resume_skipped_epochs"] = run3["counts"]["epochs_skipped_resume"]
    results["interrupted_identical"] = content_digest(out3) == ref
    results["interrupted_valid"] = validate_output(out3) == []


if __name__ == "__main__":
    main()

"""The same run from a local store to a local output, and from ``s3://`` to ``s3://``, side by side.

Starts a moto S3 server on 127.0.0.1 (its own process), uploads the store (with its truth and
reference catalogue) to a bucket, runs ``survey-proc run`` both ways with the same options,
checks that the two outputs hold the same rows (:func:`survey_proc.validate.content_digest`)
and that the s3 output validates, and prints the wall time per stage of each. moto keeps
objects in the memory of one Python process, so the s3 figures are an upper bound on the
cost of the object-store code path, not a measurement of AWS.

Usage::

    python -m benchmarks.storage --store DIR/NAME.zarr [--epochs N] [--workers 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

STAGES = ("extract_s", "calibrate_s", "crossmatch_s", "forced_s", "classify_s", "total_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(store: str, out: str, args: argparse.Namespace, env: dict[str, str]) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "survey_proc.cli", "run", store, "--out", out, "--workers", str(args.workers),
           "--quiet", "--no-evaluate", "--overwrite"]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    t = time.perf_counter()
    rc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if rc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{rc.stderr[-3000:]}")
    from survey_proc import storage

    return json.loads(storage.read_text(storage.join(storage.location(out), "run.json"))), wall


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print a table (and write JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="a local survey store (DIR/NAME.zarr)")
    ap.add_argument("--epochs", type=int, help="only the first N epochs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    store = Path(args.store).resolve()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")})
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        import s3fs

        from survey_proc.validate import content_digest, validate_output

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        stem = store.name[: -len(".zarr")]
        t = time.perf_counter()
        for name in (store.name, f"{stem}.truth", f"{stem}.reference.parquet"):
            if (store.parent / name).exists():
                fs.put(str(store.parent / name), f"bench/surveys/{name}", recursive=(store.parent / name).is_dir())
        upload_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            local_out = str(Path(tmp) / "out")
            s3_out = "s3://bench/out"
            run_l, wall_l = _run(str(store), local_out, args, env)
            run_s, wall_s = _run(f"s3://bench/surveys/{store.name}", s3_out, args, env)
            same = content_digest(local_out) == content_digest(s3_out)
            problems = validate_output(s3_out)
            out_bytes = sum(p.stat().st_size for p in Path(local_out).rglob("*") if p.is_file())
        res = {"store": str(store), "epochs": args.epochs, "workers": args.workers, "upload_s": upload_s,
               "same_rows": same, "s3_problems": problems, "output_bytes": out_bytes,
               "counts": {k: run_l["counts"].get(k) for k in ("sources", "objects", "lightcurve_points")},
               "local": {"wall_s": wall_l, **{k: run_l["timings_s"].get(k) for k in STAGES}},
               "s3": {"wall_s": wall_s, **{k: run_s["timings_s"].get(k) for k in STAGES}}}
        print(f"store {store} ({args.epochs or 'all'} epochs, {args.workers} workers); upload {upload_s:.1f} s; "
              f"output {out_bytes / 1e6:.1f} MB; same rows: {same}; s3 output valid: {not problems}")
        print("| | command wall s | " + " | ".join(STAGES) + " |")
        for k in ("local", "s3"):
            print(f"| {k} | {res[k]['wall_s']:.1f} | "
                  + " | ".join(f"{res[k][s]:.1f}" if res[k][s] is not None else "-" for s in STAGES) + " |")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0 if same and not problems else 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())

"""Object storage: a run reading its store from ``s3://`` and writing its outputs there.

Against a real S3 server on 127.0.0.1 (moto's server mode, started here as its own
process); the run is a real ``survey-proc run`` with worker processes, killed mid-way and
resumed, then validated with DuckDB through the same filesystem.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from survey_proc import storage
from survey_proc.errors import ConfigError, StoreError, SurveyProcError

BUCKET = "survey"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server process on 127.0.0.1, this process's AWS variables pointing at it, and a bucket."""
    import s3fs

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the moto S3 server did not start")
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    try:
        yield {"fs": fs, "env": {**os.environ, **env}, "endpoint": endpoint}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _upload_survey(fs, store: Path, prefix: str) -> str:
    """Copy a simulated survey (store, truth, reference catalogue) under ``s3://BUCKET/prefix``; the store's URL."""
    stem = store.name[: -len(".zarr")]
    for name in (store.name, f"{stem}.truth", f"{stem}.reference.parquet"):
        local = store.parent / name
        if local.exists():
            fs.put(str(local), f"{BUCKET}/{prefix}/{name}", recursive=local.is_dir())
    return f"s3://{BUCKET}/{prefix}/{store.name}"


# --- locations ---------------------------------------------------------------------------------------------------

def test_locations_local_remote_and_refused(tmp_path):
    from survey_proc.config import load_config

    assert storage.location(str(tmp_path)) == tmp_path
    assert storage.location(f"file://{tmp_path}/x") == tmp_path / "x"
    assert storage.location("s3://b/k/out/") == "s3://b/k/out"
    assert storage.join("s3://b/k", "sources", "field=F0", "epoch=1.parquet") == "s3://b/k/sources/field=F0/epoch=1.parquet"
    assert storage.join(tmp_path, "a", "b") == tmp_path / "a" / "b"
    assert storage.parent("s3://b/k/s.zarr") == "s3://b/k" and storage.name("s3://b/k/s.zarr/") == "s.zarr"
    with pytest.raises(ConfigError, match=r"store 'nosuchfs://b/s\.zarr': cannot open nosuchfs:// URLs here"):
        storage.location("nosuchfs://b/s.zarr", "store")
    with pytest.raises(ConfigError, match=r"--out 'file://otherhost/x': a file:// URL names a host \(otherhost\)"):
        storage.location("file://otherhost/x", "--out")
    with pytest.raises(ConfigError, match=r"out 'memory://x': memory:// is private to each process"):
        load_config(None, {"store": str(tmp_path), "out": "memory://x"})
    cfg = load_config(None, {"store": "s3://b/s.zarr", "out": "s3://b/out/"})
    assert cfg.store == "s3://b/s.zarr" and cfg.out == "s3://b/out"


def test_atomic_writes_local_and_remote(s3, tmp_path):
    table = pa.table({"x": [1, 2, 3]})
    for root in (tmp_path / "w", f"s3://{BUCKET}/atomic"):
        unit = storage.join(root, "sources", "field=F0", "epoch=0.parquet")
        storage.write_table_atomic(table, unit)
        storage.write_table_atomic(pa.table({"x": [4, 5]}), unit)  # replaces it whole
        assert storage.read_table(unit).column("x").to_pylist() == [4, 5]
        storage.write_bytes_atomic(b'{"a": 1}', storage.join(root, "run.json"))
        assert json.loads(storage.read_text(storage.join(root, "run.json"))) == {"a": 1}
        assert [storage.name(f) for f in storage.find(root)] == ["run.json", "epoch=0.parquet"]
        assert storage.children(root) == ["run.json", "sources"]
        storage.remove(storage.join(root, "sources"))
        assert storage.children(root) == ["run.json"] and not storage.exists(unit)
    assert not list((tmp_path / "w").rglob("*.tmp"))


def test_prepare_on_a_bucket_refuses_foreign_prefixes_and_overwrites_only_its_own(s3):
    from survey_proc.outputs import prepare

    fs = s3["fs"]
    fs.pipe_file(f"{BUCKET}/foreign/data.csv", b"1,2\n")
    with pytest.raises(SurveyProcError, match=r"--out s3://survey/foreign is a non-empty directory that is not a "
                                              r"survey-proc output"):
        prepare(f"s3://{BUCKET}/foreign", "resume", "fp")
    out = f"s3://{BUCKET}/prev"
    fs.pipe_file(f"{BUCKET}/prev/run.json", json.dumps({"fingerprint": "old"}).encode())
    fs.pipe_file(f"{BUCKET}/prev/sources/field=F0/epoch=0.parquet", b"x")
    fs.pipe_file(f"{BUCKET}/prev/notes.txt", b"mine")
    with pytest.raises(SurveyProcError, match=r"holds a run made with a different processing configuration "
                                              r"\(fingerprint old, now new\)"):
        prepare(out, "resume", "new")
    assert prepare(out, "overwrite", "new", owned=["run.json", "sources"]) is None
    assert storage.children(out) == ["notes.txt"]


def test_unreachable_or_missing_remote_store_is_a_clear_error(s3):
    from survey_proc import store

    with pytest.raises(StoreError, match=r"survey store s3://survey/nope\.zarr does not exist"):
        store.list_fields(f"s3://{BUCKET}/nope.zarr")


# --- the round trip ------------------------------------------------------------------------------------------------

def _units(fs, prefix: str, kind: str) -> list[str]:
    fs.invalidate_cache()
    return [p for p in fs.glob(f"{BUCKET}/{prefix}/{kind}/*/*.parquet")]


def test_s3_run_interrupted_resumed_and_validated(s3, field_run, tmp_path):
    """A real run from s3:// to s3://, killed mid-way, resumed: the rows of the local run, valid, no partial unit."""
    from survey_proc.validate import content_digest, validate_output

    fs = s3["fs"]
    url = _upload_survey(fs, Path(field_run["store"]), "surveys")
    out = f"s3://{BUCKET}/runs/field"
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text("[crossmatch]\nregion_px = 192\n")
    cmd = [sys.executable, "-m", "survey_proc.cli", "run", url, "--out", out, "--tile-px", "128", "--halo-px", "24",
           "--workers", "2", "--quiet", "--no-evaluate", "--detector", "sep", "--photometry", "classical",
           "--config", str(cfg_file)]
    proc = subprocess.Popen(cmd, start_new_session=True, env=s3["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(_units(fs, "runs/field", "sources")) < 3:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = _units(fs, "runs/field", "sources")
    assert 3 <= len(written) < 8, "the run was not interrupted mid-way"
    for key in written + _units(fs, "runs/field", "objects"):  # every visible unit is whole: its footer reads
        assert storage.read_metadata(f"s3://{key}").num_rows > 0
    rc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=s3["env"])
    assert rc.returncode == 0, rc.stderr
    run = json.loads(storage.read_text(f"{out}/run.json"))
    assert run["status"] == "complete" and run["store"] == url
    assert run["counts"]["epochs_skipped_resume"] >= len(written)
    assert content_digest(out) == content_digest(field_run["out"])  # the same rows as the uninterrupted local run
    assert validate_output(out) == []
    fs.invalidate_cache()
    assert not [k for k in fs.find(f"{BUCKET}/runs/field") if Path(k).name.startswith(".")]
    rc = subprocess.run([sys.executable, "-m", "survey_proc.cli", "validate", out], capture_output=True, text=True,
                        timeout=300, env=s3["env"])
    assert rc.returncode == 0 and "valid" in rc.stdout, rc.stdout + rc.stderr
    # pandas reads the hive output straight from the bucket, as users will
    objects = pd.read_parquet(f"{out}/objects/", storage_options={"endpoint_url": s3["endpoint"]})
    assert len(objects) == run["counts"]["objects"]
    # validate finds a unit that went missing
    fs.rm(_units(fs, "runs/field", "objects")[0])
    problems = validate_output(out)
    assert any("run.json counts.objects" in p for p in problems) and any("not in objects/" in p for p in problems)

"""Faults with real processes: a killed worker, Ctrl-C, a transient error, a full disk.

Each disturbed run is compared with an undisturbed run of the same survey and config:
row counts and content checksums of sources, objects and light curves must be identical.
The faults are injected into real worker processes of a LocalCluster by a WorkerPlugin
(below), never by flags in survey-proc itself.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from distributed.diagnostics.plugin import WorkerPlugin

from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.simulate import load_scenario, simulate_survey
from survey_proc.validate import content_digest, validate_output
from tests.conftest import run_config

N_EPOCHS = 12
SETTINGS = dict(tile_px=128, halo_px=24, crossmatch={"region_px": 128, "min_epochs": 2})


@pytest.fixture(scope="module")
def fault_survey(tmp_path_factory) -> Path:
    """256 x 256 px, 12 epochs, ~600 detections per epoch, with a reference catalogue."""
    out = tmp_path_factory.mktemp("faults") / "faults.zarr"
    scn = load_scenario("dense", {"size_px": 256, "n_epochs": N_EPOCHS, "seed": 31, "psf_oversample": 5,
                                  "star_density_per_px2": 0.04, "psf_fwhm_px": 2.2})
    simulate_survey(scn, out, workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def fault_client():
    """A LocalCluster of its own (2 worker processes under nannies): these tests kill and patch workers."""
    from survey_proc.distributed.cluster import local_client

    with local_client(2, quiet=True) as c:
        yield c


@pytest.fixture(scope="module")
def baseline(fault_survey, fault_client, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("baseline") / "out"
    run = run_pipeline(run_config(fault_survey, out, **SETTINGS), client=fault_client)
    assert run["status"] == "complete" and run["failures"] == [] and run["retried"] == []
    return {"out": out, "run": run, "digest": content_digest(out)}


def _n_sources(out: Path) -> int:
    return len(list(out.glob("sources/*/epoch=*.parquet")))


def _extraction(path: Path) -> tuple[float, float]:
    """What identifies one extraction of a sources unit: its timings, kept in the unit's record."""
    from survey_proc.outputs import read_meta

    rec = read_meta(path)
    return rec["queue_to_done_s"], rec["extract_s"]


def _wait_for_sources(out: Path, n: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while _n_sources(out) < n:
        assert time.time() < deadline, f"no {n} sources units in {timeout_s} s"
        time.sleep(0.02)


class Fault(WorkerPlugin):
    """Patches a function in every worker process to fail, and restores it on teardown.

    ``target``: "read_window" (the pixels of an epoch cannot be read) or "write_table"
    (Parquet writes fail with ENOSPC after writing part of the temporary file).
    ``epoch``: the epoch that fails. ``once``: a marker file makes only the first attempt
    fail, across processes (a transient fault).
    """

    name = "test-fault"

    def __init__(self, target: str, epoch: int, once: Path | None = None):
        self.target, self.epoch, self.once = target, epoch, str(once) if once else None

    def _should_fail(self) -> bool:
        if self.once is None:
            return True
        try:
            fd = os.open(self.once, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def setup(self, worker) -> None:
        import pyarrow.parquet as pq_

        from survey_proc import store

        if self.target == "read_window":
            self.original = store.read_window

            def read_window(path, field_id, epoch, *args, **kwargs):
                if epoch == self.epoch and self._should_fail():
                    raise OSError(errno.EIO, f"Input/output error reading epoch {epoch} (injected)")
                return self.original(path, field_id, epoch, *args, **kwargs)

            store.read_window = read_window
        else:
            self.original = pq_.write_table

            def write_table(table, where, *args, **kwargs):
                if f"epoch={self.epoch}.parquet" in str(where) and self._should_fail():
                    Path(where).write_bytes(b"PAR1" + b"\0" * 1000)  # part of the file got out
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
                return self.original(table, where, *args, **kwargs)

            pq_.write_table = write_table

    def teardown(self, worker) -> None:
        import pyarrow.parquet as pq_

        from survey_proc import store

        if self.target == "read_window":
            store.read_window = self.original
        else:
            pq_.write_table = self.original


class _Faults:
    """``fault(plugin)`` registers a :class:`Fault` on the workers; ``fault.clear()`` removes it."""

    def __init__(self, client):
        self.client, self.active = client, False

    def __call__(self, plugin: Fault) -> None:
        self.client.register_plugin(plugin)
        self.active = True

    def clear(self) -> None:
        if self.active:
            self.client.unregister_worker_plugin(Fault.name)
            self.active = False


@pytest.fixture
def fault(fault_client):
    """Faults on the fault cluster's workers, removed at the end of the test."""
    faults = _Faults(fault_client)
    yield faults
    faults.clear()


def test_a_killed_worker_loses_nothing(fault_survey, fault_client, baseline, tmp_path):
    """SIGKILL one worker process mid-extraction: Dask re-runs its tasks; outputs are identical."""
    out = tmp_path / "killed"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        run=run_pipeline(run_config(fault_survey, out, **SETTINGS), client=fault_client)))
    thread.start()
    _wait_for_sources(out, 3)
    pids = fault_client.run(os.getpid)
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    n_at_kill = _n_sources(out)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert n_at_kill < N_EPOCHS, "the worker was killed after the extraction had finished"
    run = result["run"]
    assert run["status"] == "complete" and run["failures"] == []
    assert victim not in fault_client.run(os.getpid).values()  # the nanny started a new worker process
    assert content_digest(out) == baseline["digest"]
    assert not list(out.rglob(".*.tmp"))
    assert validate_output(out) == []


def test_ctrl_c_then_rerun_resumes_without_duplicates(fault_survey, baseline, tmp_path):
    """SIGINT to the CLI's process group (what Ctrl-C does) mid-run, then the same command again."""
    out = tmp_path / "interrupted"
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text("[crossmatch]\nregion_px = 128\nmin_epochs = 2\n")
    cmd = [sys.executable, "-m", "survey_proc.cli", "run", str(fault_survey), "--out", str(out), "--tile-px", "128",
           "--halo-px", "24", "--workers", "2", "--quiet", "--no-evaluate", "--detector", "sep", "--photometry",
           "classical", "--config", str(cfg_file)]
    # preexec: Ctrl-C's default action even where pytest runs with SIGINT ignored (a background
    # job of a non-interactive shell), which the CLI would inherit and rightly respect
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_sources(out, 3)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "survey-proc run: interrupted; the units written so far are kept: run the same command again to resume" \
        in stderr
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted"
    done = {p: _extraction(p) for p in out.glob("sources/*/epoch=*.parquet")}
    assert 3 <= len(done) < N_EPOCHS, "the run was not interrupted mid-way"

    rc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["counts"]["epochs_skipped_resume"] == len(done)
    # the finished extractions were not redone (the calibrate stage, which had not run, did rewrite
    # the zero points of some of them: a unit's record keeps its extraction's timings) ...
    assert {p: _extraction(p) for p in done} == done
    # ... and nothing is duplicated or missing
    assert content_digest(out) == baseline["digest"]
    assert validate_output(out) == []


def test_a_transient_error_is_retried(fault_survey, fault_client, fault, baseline, tmp_path):
    fault(Fault("read_window", epoch=4, once=tmp_path / "failed-once"))
    out = tmp_path / "transient"
    run = run_pipeline(run_config(fault_survey, out, **SETTINGS), client=fault_client)
    assert run["status"] == "complete" and run["failures"] == []
    (retried,) = run["retried"]
    assert retried["stage"] == "extract" and retried["epoch"] == 4 and retried["attempts"] == 2
    assert retried["errors"] == ["OSError: [Errno 5] Input/output error reading epoch 4 (injected)"]
    assert content_digest(out) == baseline["digest"]


def test_a_persistent_error_is_retried_then_quarantined(fault_survey, fault_client, fault, tmp_path, capsys):
    from survey_proc.report import summary_lines

    fault(Fault("read_window", epoch=4))
    out = tmp_path / "persistent"
    run = run_pipeline(run_config(fault_survey, out, retries=2, **SETTINGS), client=fault_client)
    assert run["status"] == "incomplete"
    (fail,) = run["failures"]
    assert fail == {"stage": "extract", "field": "F000", "epoch": 4, "attempts": 3,
                    "error": "OSError: [Errno 5] Input/output error reading epoch 4 (injected)"}
    assert json.loads((out / "run.json").read_text())["failures"] == [fail]
    assert run["counts"]["epochs_written"] == N_EPOCHS - 1
    lc = pd.read_parquet(out / "lightcurves")
    assert 4 not in set(lc["epoch"]) and set(lc["epoch"]) == set(range(N_EPOCHS)) - {4}
    assert validate_output(out) == []
    lines = summary_lines(run)
    assert "    extract field F000, epoch 4 (3 attempts): OSError: [Errno 5] Input/output error reading epoch 4 " \
           "(injected)" in lines


def test_disk_full_mid_stage_then_resume(fault_survey, fault_client, fault, baseline, tmp_path):
    """ENOSPC while writing one unit: that unit fails cleanly; after 'freeing space' a re-run completes it."""
    fault(Fault("write_table", epoch=5))
    out = tmp_path / "full"
    run = run_pipeline(run_config(fault_survey, out, **SETTINGS), client=fault_client)
    assert run["status"] == "incomplete"
    (fail,) = run["failures"]
    assert fail["epoch"] == 5 and fail["attempts"] == 2
    assert "cannot write" in fail["error"] and "epoch=5.parquet" in fail["error"]
    assert "No space left on device" in fail["error"] and "run the same command again to resume" in fail["error"]
    assert not (out / "sources" / "field=F000" / "epoch=5.parquet").exists()
    assert not list(out.rglob(".*.tmp"))  # the partial temporary file was removed
    assert validate_output(out) == []
    fault.clear()  # space was freed
    again = run_pipeline(run_config(fault_survey, out, **SETTINGS), client=fault_client)
    assert again["status"] == "complete" and again["counts"]["epochs_skipped_resume"] == N_EPOCHS - 1
    assert content_digest(out) == baseline["digest"]

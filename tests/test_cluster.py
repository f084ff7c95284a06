"""distributed/cluster.py: the cuda cluster without dask-cuda, the cuda path with a stand-in, attaching to a
running scheduler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from survey_proc.cli import main
from survey_proc.distributed.cluster import library_thread_env


def test_cuda_cluster_without_dask_cuda_is_a_clear_error():
    pytest.importorskip("distributed")
    try:
        import dask_cuda  # noqa: F401
        pytest.skip("dask-cuda is installed here")
    except ImportError:
        pass
    from survey_proc.distributed.cluster import make_client
    from survey_proc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--cluster cuda needs dask-cuda, which is not installed: "
                                          r"pip install 'survey-proc\[cuda\]'"):
        with make_client("cuda", scheduler=None, workers=None):
            pass


def test_cluster_cuda_runs_the_pipeline_when_dask_cuda_is_there(border_survey, tmp_path, monkeypatch):
    """`--cluster cuda` end to end with dask-cuda replaced at the boundary by a LocalCluster (no GPU here)."""
    import json
    import sys
    import types

    from distributed import LocalCluster

    from survey_proc.cli import main

    made = {}

    class FakeLocalCUDACluster(LocalCluster):
        """dask_cuda.LocalCUDACluster's interface: one worker per (pretend) GPU, one thread each."""

        def __init__(self, n_workers=None, **kw):
            made["n_workers"] = n_workers
            super().__init__(n_workers=n_workers or 1, threads_per_worker=1, processes=True, **kw)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=FakeLocalCUDACluster))
    cfg = tmp_path / "run.toml"
    cfg.write_text("[crossmatch]\nregion_px = 128\nmin_epochs = 2\n")
    out = tmp_path / "out"
    assert main(["run", str(border_survey["store"]), "--out", str(out), "--cluster", "cuda", "--workers", "2",
                 "--tile-px", "128", "--halo-px", "16", "--config", str(cfg), "--quiet", "--no-evaluate",
                 "--reference", "none", "--detector", "pnet", "--photometry", "bpnn"]) == 0  # every model
    run = json.loads((out / "run.json").read_text())
    assert made["n_workers"] == 2 and run["config"]["cluster"] == "cuda" and run["status"] == "complete"
    assert run["counts"]["objects"] > 0
    assert set(run["models"]) == {"detector", "bpnn", "classifier", "classifier_sparse"}


def _tables(out) -> dict[str, pd.DataFrame]:
    keys = {"sources": ["source_id"], "objects": ["object_id"], "lightcurves": ["object_id", "epoch"]}
    return {k: pd.read_parquet(out / k).sort_values(v).reset_index(drop=True) for k, v in keys.items()}


@pytest.fixture()
def external_cluster(tmp_path):
    sf = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(sf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        t0 = time.time()
        while not (sf.exists() and sf.stat().st_size > 0):
            if time.time() - t0 > 60:
                raise RuntimeError("the dask scheduler did not start in 60 s")
            time.sleep(0.2)
        addr = json.loads(sf.read_text())["address"]
        # the library threads a local run gives its 2 workers: torch's reductions (and so the last bits of the
        # fluxes) depend on them, and this process's environment holds whatever the last LocalCluster set
        env = {**os.environ, **library_thread_env(2, 1)}
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads",
                                           "1", "--no-dashboard", "--host", "127.0.0.1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        from distributed import Client

        with Client(addr, timeout="30s") as c:
            c.wait_for_workers(2, timeout=90)
        yield addr
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_run_attached_to_a_running_cluster_gives_the_same_outputs_as_a_local_one(border_survey, external_cluster,
                                                                                    tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[crossmatch]\nregion_px = 128\nmin_epochs = 2\n")
    common = [str(border_survey["store"]), "--tile-px", "128", "--halo-px", "16", "--detector", "pnet",
              "--config", str(cfg), "--quiet", "--no-evaluate", "--reference", "none"]
    a, b = tmp_path / "attached", tmp_path / "local"
    assert main(["run", *common, "--out", str(a), "--scheduler", external_cluster]) == 0
    assert main(["run", *common, "--out", str(b), "--workers", "2"]) == 0
    ta, tb = _tables(a), _tables(b)
    for k in ta:
        assert len(ta[k]) > 0
        pd.testing.assert_frame_equal(ta[k], tb[k])
    run = json.loads((a / "run.json").read_text())
    assert run["config"]["scheduler"] == external_cluster and run["status"] == "complete"


def test_file_urls_for_store_and_output_and_a_clear_refusal_of_unusable_urls(border_survey, client, tmp_path):
    from survey_proc.config import load_config
    from survey_proc.distributed.pipeline import run_pipeline
    from survey_proc.errors import ConfigError
    from tests.conftest import run_config

    out = tmp_path / "out"
    cfg = run_config(f"file://{border_survey['store']}", f"file://{out}", tile_px=128, halo_px=16,
                     crossmatch={"region_px": 128, "min_epochs": 2})
    assert cfg.store == str(border_survey["store"]) and cfg.out == str(out)
    run = run_pipeline(cfg, client=client)
    assert run["status"] == "complete" and (out / "objects").exists()
    assert len(pd.read_parquet(out / "sources")) == run["counts"]["sources"]
    with pytest.raises(ConfigError, match=r"store 'nosuchfs://bucket/s\.zarr': cannot open nosuchfs:// URLs here"):
        load_config(None, {"store": "nosuchfs://bucket/s.zarr", "out": str(out)})
    with pytest.raises(ConfigError, match=r"out 'memory://x': memory:// is private to each process"):
        load_config(None, {"store": str(border_survey["store"]), "out": "memory://x"})

"""The GPU check's dry mode (benchmarks/gpu_check.py): the whole path on the CPU, a tiny survey."""

from __future__ import annotations

import json
import math
import re
import sys

import numpy as np
import pandas as pd
import pytest

from benchmarks import gpu_check
from survey_proc import store


def test_dry_mode_runs_the_whole_check(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    res = gpu_check.run_check(out, work_dir=work, dry=True, size_px=128, n_epochs=3, seconds=0.05)
    data = json.loads((out / "gpu_check.json").read_text())
    assert tuple(data) == gpu_check.JSON_KEYS
    assert data["cluster_start_s"]["gpu"] > 0 and data["cluster_start_s"]["cpu"] is None
    assert data == json.loads(json.dumps(res, default=str))
    assert data["dry"] is True and data["device"] == "cpu"
    assert data["survey"]["size_px"] == 128 and data["survey"]["epochs"] == 3 and data["survey"]["stars"] > 100
    rates = [data["models"]["pnet"]["mpix_per_s"], data["models"]["bpnn"]["stamps_per_s"],
             data["periodogram"]["bls_curves_per_s"], data["periodogram"]["ls_curves_per_s"],
             data["periodogram"]["curves_per_s"]]
    assert all(math.isfinite(r) and r > 0 for r in rates)
    # both searches of a curve together are slower than either alone
    assert data["periodogram"]["curves_per_s"] < min(rates[2:4])
    assert data["periodogram"]["bls_freq"] > 0 and data["periodogram"]["ls_freq"] > 0
    assert set(data["runs"]["gpu"]) == set(gpu_check.CONFIGS)
    for name, run in data["runs"]["gpu"].items():
        assert run["cluster"] == "local" and run["workers"] == 1
        assert run["status"] == "complete" and run["failures"] == 0
        c = run["counts"]
        assert c["sources"] > 100 and c["objects"] > 20
        assert c["lightcurve_points"] >= 3 * c["objects"]  # every object has a point in each of the 3 epochs
        assert run["timings_s"]["extract_s"] > 0 and run["timings_s"]["total_s"] > run["timings_s"]["extract_s"]
        copy = json.loads((out / f"run-gpu-{name}.json").read_text())
        assert copy["status"] == "complete" and copy["counts"]["objects"] == c["objects"]
        lc = pd.read_parquet(work / f"run-gpu-{name}" / "lightcurves")
        assert lc["object_id"].nunique() == c["objects"]
    assert data["runs"]["gpu"]["pnet_bpnn"]["timings_s"].keys() >= {"extract_s", "crossmatch_s", "total_s"}
    # dry mode: no CPU runs, no ratio, no GPU memory
    assert data["runs"]["cpu"] == {}
    assert data["cpu_gpu_ratio"] == {"pnet_bpnn": None, "default": None}
    assert data["gpu_memory"] == {"driver_peak_allocated_gib": None, "workers_peak_allocated_gib": None,
                                  "nvidia_smi_peak_used_gib": None}
    assert any("dry mode" in n for n in data["notes"])
    md = (out / "gpu_check.md").read_text()
    assert "| PNet (128² blocks, batch 1) |" in md and "| gpu pnet_bpnn | local | 1 | complete |" in md


def test_missing_module_is_named_with_the_fix():
    with pytest.raises(gpu_check.GPUCheckError,
                       match=r"missing Python module\(s\): no_such_module_xyz\. .*benchmarks/gpu\.sh --prepare"):
        gpu_check.check_modules(("json", "no_such_module_xyz"))


def test_missing_dependency_of_a_present_package_is_named(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg_needs_dep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import not_there_abc  # noqa\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gpu_check.missing_modules(("json", "pkg_needs_dep")) == ["pkg_needs_dep (needs not_there_abc)"]
    sys.modules.pop("pkg_needs_dep", None)


def test_main_exits_2_when_a_module_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "REQUIRED_MODULES", ("numpy", "no_such_module_xyz"))
    assert gpu_check.main(["--dry", "--out", str(tmp_path)]) == 2
    assert "missing Python module(s): no_such_module_xyz" in capsys.readouterr().out
    assert not (tmp_path / "gpu_check.json").exists()


def test_moffat_bank_and_survey(tmp_path):
    bank = gpu_check.moffat_bank(2.5)
    assert bank.radii_px == (6, 12, 24)
    # light outside a centred 13 x 13 px stamp of a Moffat(3), FWHM 2.5 px (alpha 2.45 px): between
    # what falls outside the circles of radius 6 px and 6 sqrt(2) px, (1 + r^2 / alpha^2)^-2
    alpha = 2.5 / (2 * np.sqrt(2 ** (1 / 3) - 1))
    assert (1 + 72 / alpha**2) ** -2 < bank.missing_flux[0] < (1 + 36 / alpha**2) ** -2
    assert bank.missing_flux[-1] < (1 + 24**2 / alpha**2) ** -2
    for b, m in zip(bank.banks, bank.missing_flux, strict=True):  # truncated stamps: each sums to EE(R) at its phase
        sums = b.sum(axis=(2, 3))
        assert np.all(sums <= 1.0 + 1e-9) and sums.min() > 1.0 - 3 * m - 1e-9
        assert sums[-bank.t_min, -bank.t_min] == pytest.approx(1.0 - m, abs=1e-9)
    path = tmp_path / "s.zarr"
    info = gpu_check.make_survey(path, 64, 3, seed=1)
    assert store.validate_store(path) == []
    assert info["stars"] == int(0.01 * 84**2) and info["mpix"] == pytest.approx(64 * 64 * 3 / 1e6)
    table = store.read_epoch_table(path, "F000")
    assert np.all(np.diff(table["mjd"]) > 0.1) and all("RA---TAN" in w for w in table["wcs"])
    img = store.open_field(path, "F000")["image"].values
    assert img.shape == (3, 64, 64) and np.isfinite(img).all()
    # sky 250-400 ADU, noise ~13 ADU: the median pixel is sky, the brightest are stars
    assert 240 < float(np.median(img)) < 420 and float(img.max()) > 2000


def test_ratios_are_cpu_over_gpu():
    gpu = {"pnet_bpnn": {"wall_s": 2.0, "timings_s": {"total_s": 2.0, "extract_s": 1.0}}}
    cpu = {"pnet_bpnn": {"wall_s": 6.0, "timings_s": {"total_s": 6.0, "extract_s": 4.0, "classify_s": 1.0}}}
    r = gpu_check.ratios(gpu, cpu)
    assert r["pnet_bpnn"]["wall_s"] == 3.0 and r["pnet_bpnn"]["extract_s"] == 4.0
    assert r["pnet_bpnn"]["classify_s"] is None  # no GPU time to compare with
    assert all(v is None for v in r["default"].values())


def test_a_run_or_measurement_that_raises_is_recorded_and_the_check_goes_on(tmp_path, monkeypatch):
    import contextlib

    from benchmarks import gpu_models

    @contextlib.contextmanager
    def fake_client(dry, workers, notes):
        yield object(), "local"

    def fake_run(client, store_path, out, cluster, settings):
        if settings.get("detector") == "pnet":
            raise RuntimeError("boom on the worker")
        return {"cluster": cluster, "workers": 1, "status": "complete", "wall_s": 1.5,
                "timings_s": {"extract_s": 1.0, "total_s": 1.5}, "counts": {"objects": 7}, "failures": 0,
                "worker_peak_gpu_gib": None}

    survey = {"size_px": 8, "epochs": 3, "stars": 1, "variables": 0, "mpix": 0.0002, "wall_s": 0.0}
    monkeypatch.setattr(gpu_check, "make_survey", lambda *a, **k: survey)
    monkeypatch.setattr(gpu_check, "gpu_client", fake_client)
    monkeypatch.setattr(gpu_check, "run_one", fake_run)
    def broken_periodogram(*a, **k):
        raise ValueError("no grid")

    monkeypatch.setattr(gpu_check, "measure_periodogram", broken_periodogram)
    monkeypatch.setattr(gpu_models, "measure", lambda *a, **k: {
        "pnet": {"block_px": 128, "batch": 1, "mpix_per_s": 1.0}, "bpnn": {"mc_samples": 8, "stamps_per_s": 2.0}})
    res = gpu_check.run_check(tmp_path, dry=True)
    err = res["runs"]["gpu"]["pnet_bpnn"]
    assert err["status"] == "error: RuntimeError: boom on the worker" and err["timings_s"] == {}
    assert res["runs"]["gpu"]["default"]["status"] == "complete"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| gpu pnet_bpnn | local | - | error: RuntimeError: boom on the worker | - |" in md
    assert "| gpu default | local | 1 | complete | 7 | 1 |" in md
    # a measurement that raises is recorded too, and the runs still ran
    assert res["periodogram"] == {"error": "ValueError: no grid"} and res["models"]["pnet"]["mpix_per_s"] == 1.0
    assert "| periodograms | error: ValueError: no grid |" in md and "| PNet (128² blocks, batch 1) | 1 Mpix/s |" in md


def test_nvidia_smi_sampler_keeps_the_peak(tmp_path, monkeypatch):
    import time

    smi = tmp_path / "nvidia-smi"
    count = tmp_path / "n"
    # used memory in MiB: 1024, then 3072, then 2048 for every later call
    smi.write_text(f"#!/bin/sh\nn=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}\n"
                   "case $n in 0) echo 1024;; 1) echo 3072;; *) echo 2048;; esac\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    with gpu_check.SmiSampler(interval_s=0.02) as s:
        t0 = time.monotonic()
        while int((count.read_text() if count.exists() else "0").strip() or 0) < 4 and time.monotonic() - t0 < 20:
            time.sleep(0.02)
    assert s.peak_gib == 3.0
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_check.SmiSampler.read_gib() is None
    with gpu_check.SmiSampler(interval_s=0.02) as s2:
        pass
    assert s2.peak_gib is None


def test_gpu_client_falls_back_without_dask_cuda_and_cpu_workers_see_no_gpu():
    import importlib.util
    import os

    if importlib.util.find_spec("dask_cuda") is not None:
        pytest.skip("dask-cuda is installed here: no fallback to see")
    notes: list[str] = []
    with gpu_check.gpu_client(False, 1, notes) as (client, name):
        assert name == "local-gpu" and len(client.scheduler_info()["workers"]) == 1
    assert len(notes) == 1 and re.match(r"dask-cuda's LocalCUDACluster did not start \(ConfigError: --cluster cuda "
                                        r"needs dask-cuda", notes[0])
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with gpu_check.cpu_client(1) as client:
        assert list(client.run(os.environ.get, "CUDA_VISIBLE_DEVICES").values()) == [""]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before

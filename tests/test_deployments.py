"""Deployment recipes, checked without a cluster: SLURM job script, Kubernetes manifests, Dockerfile."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEP = ROOT / "deployments"


def _slurm_module():
    spec = importlib.util.spec_from_file_location("slurm_cluster", DEP / "slurm" / "cluster.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_walltime_parsing():
    m = _slurm_module()
    assert m.walltime_minutes("04:00:00") == 240
    assert m.walltime_minutes("1-02:30:00") == 1590
    assert m.walltime_minutes("45:00") == 45


def test_slurm_job_script_books_gpus_and_starts_dask_cuda_workers_with_walltime_lifetimes():
    pytest.importorskip("dask_jobqueue")
    m = _slurm_module()
    cluster = m.slurm_gpu_cluster(gpus_per_job=2, walltime="04:00:00", partition="gpu", account="proj",
                                  python="/opt/env/bin/python", env_setup=["module load cuda/12.4"])
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:2" in lines and "#SBATCH -t 04:00:00" in lines
    assert "#SBATCH -p gpu" in lines and "#SBATCH -A proj" in lines
    assert "#SBATCH --cpus-per-task=16" in lines
    cmd = next(line for line in lines if "-m dask_cuda.cli " in line)
    assert cmd.startswith("/opt/env/bin/python -m dask_cuda.cli tcp://")  # dask_cuda.cli's __main__ is the worker
    assert "--lifetime" not in cmd  # not a dask-cuda option: the lifetime is Dask configuration
    assert "export DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION=230m" in lines
    assert lines.index("module load cuda/12.4") < lines.index(cmd)


def test_sbatch_script_is_valid_bash_and_runs_survey_proc_on_the_scheduler():
    text = (DEP / "slurm" / "run.sbatch").read_text()
    assert "#SBATCH --gres=gpu:" in text and "dask cuda worker" in text
    assert 'survey-proc run "${STORE}" --out "${OUT}" --scheduler "${ADDR}"' in text
    subprocess.run(["bash", "-n", str(DEP / "slurm" / "run.sbatch")], check=True)


def test_kubernetes_manifests_have_what_the_dask_operator_needs():
    cluster = yaml.safe_load((DEP / "kubernetes" / "daskcluster.yaml").read_text())
    job = yaml.safe_load((DEP / "kubernetes" / "job.yaml").read_text())
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1" and cluster["kind"] == "DaskCluster"
    name = cluster["metadata"]["name"]
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert cluster["spec"]["worker"]["replicas"] >= 1
    assert worker["command"] == ["dask"] and worker["args"][:2] == ["cuda", "worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    sched = cluster["spec"]["scheduler"]
    assert sched["spec"]["containers"][0]["args"] == ["scheduler"]
    ports = {p["name"]: p["port"] for p in sched["service"]["ports"]}
    assert ports["tcp-comm"] == 8786 and sched["service"]["selector"]["dask.org/cluster-name"] == name
    assert job["kind"] == "Job" and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    c = job["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert args[0] == "run" and args[args.index("--scheduler") + 1] == f"tcp://{name}-scheduler:8786"
    assert c["image"] == worker["image"] == sched["spec"]["containers"][0]["image"]


def test_dockerfile_lint():
    path = DEP / "docker" / "Dockerfile"
    if shutil.which("hadolint"):
        subprocess.run(["hadolint", str(path)], check=True)
    text = path.read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")
                    and not line.startswith((" ", "\t"))]
    assert instructions[0] == "FROM"
    base = text.split("FROM", 1)[1].split()[0]
    assert ":" in base and not base.endswith(":latest") and "cuda" in base  # a pinned CUDA base
    assert 'pip install ".[cuda]"' in text and "COPY survey_proc ./survey_proc" in text
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["survey-proc"]' in text
    for inst in instructions:
        assert inst in {"FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "ENTRYPOINT", "CMD", "ARG", "LABEL"}, inst
    # every file COPY names exists in the build context (the repository root)
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_each_deployment_has_a_readme():
    for d in ("slurm", "kubernetes", "docker", "local"):
        assert (DEP / d / "README.md").stat().st_size > 200

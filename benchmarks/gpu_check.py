"""A GPU check in one call (issue 24): model, periodogram and end-to-end throughput, GPU memory, CPU/GPU ratio.

    python -m benchmarks.gpu_check [--out DIR] [--size 1024] [--epochs 20] [--seconds 3] [--dry]

(``benchmarks/gpu.sh`` wraps it on the device machine: it installs the carried wheels first.)

What it does, in one process, in this order:

1. **Checks the imports** the pipeline needs (numpy, scipy, pandas, pyarrow, xarray, torch,
   dask, distributed, zarr, astropy, sep, scikit-image, rich, and dask-cuda on a GPU) and
   stops with one message naming every missing module (:class:`GPUCheckError`).
2. **Writes a synthetic survey** (:func:`make_survey`) with numpy alone, through the
   store's public writers (no GalSim, no reference catalogue, no truth): one field of
   ``--size``² px and ``--epochs`` epochs every 0.15 d (so that 20 epochs hold periods of
   0.25-2.5 d), Moffat (beta 3) stars of magnitude 15-22.5 at 0.01 per px², a per-epoch
   seeing (FWHM 2.2-3.4 px), sky, zero point and dither (up to 4 px, with a matching TAN WCS),
   5 % of the stars brighter than 20 mag variable (sinusoids and eclipses), Poisson and
   read noise, saturation masked.
3. **Model throughput** on the check's device through :func:`benchmarks.gpu_models.measure`
   (PNet Mpix/s on 512² blocks, BPNN stamps/s with the card's MC samples).
4. **Periodogram throughput** (:func:`measure_periodogram`): light curves per second of the
   batched BLS and Lomb-Scargle of :mod:`survey_proc.lightcurves.periodogram` (their public
   ``search_grid``, ``BatchedBLS``, ``BatchedLS``, with the pipeline's default batch sizes)
   on synthetic curves of the default survey's shape (1000 epochs of 300 s).
5. **End-to-end runs** of :func:`survey_proc.distributed.pipeline.run_pipeline` on the
   survey, relative calibration (``reference = "none"``), two configurations: ``pnet_bpnn``
   (``detector = "pnet"``, ``[bpnn] enabled = true``) and ``default`` (sep), first on the
   GPU cluster (``cluster = "cuda"``: dask-cuda's LocalCUDACluster, one worker per GPU,
   exactly as ``survey-proc run --cluster cuda`` starts it), then on a CPU LocalCluster of
   one worker process per core (``cluster = "local"``, the models forced onto the CPU with
   ``CUDA_VISIBLE_DEVICES=""`` in the workers). The peak GPU memory of each run is read in
   the workers (``torch.cuda.max_memory_allocated``) and, when ``nvidia-smi`` exists, from
   the device every 0.5 s (used memory of the whole card).
6. **Writes** ``gpu_check.json`` and ``gpu_check.md`` (a Markdown table) to ``--out`` and
   prints the table.

**Dry mode** (``--dry``, and automatically when ``torch.cuda.is_available()`` is False):
the same code path on the CPU with a tiny survey (default 256² x 4 epochs), shorter timing
loops (0.3 s), 64 periodogram curves of 200 epochs, and one LocalCluster (``cluster =
"local"``, ``--cpu-workers``, default 1) standing in for the GPU cluster; the model and
periodogram timings run on one torch thread (on a shared machine two threads wait on each
other: a 128² PNet block took 1-3 s with two, 0.2 s with one). There is nothing
to compare, so the CPU cluster runs are skipped: ``runs.cpu`` is ``{}``, every
``cpu_gpu_ratio`` value is ``null``, ``gpu_memory`` values are ``null``, and ``dry`` is
true. The default test suite runs it (``tests/test_gpu_check.py``).

The JSON (keys always present, :data:`JSON_KEYS`; a key not measured yet is null, since the
reports are rewritten after every step): ``dry``, ``device`` (name), ``machine`` (host,
cores, Python, torch, CUDA), ``started_utc``, ``survey`` (size_px, epochs, stars, variables,
mpix, wall_s to write it), ``models`` (:func:`benchmarks.gpu_models.measure`'s dict:
``pnet.mpix_per_s``, ``bpnn.stamps_per_s``, ...), ``periodogram`` (curves, epochs,
bls_freq, ls_freq, ``bls_curves_per_s``, ``ls_curves_per_s``, ``curves_per_s`` for both
searches of a curve; ``models`` and ``periodogram`` are ``{"error": ...}`` when their
measurement raised, and the check goes on), ``runs`` (``gpu`` and ``cpu``, each configuration -> cluster, workers,
status (``complete``, or ``error: ...`` when the run raised: the check goes on), wall_s,
``timings_s`` of run.json, counts (sources, objects, lightcurve_points,
objects_classified, periodic_variables), failures, worker_peak_gpu_gib),
``cluster_start_s`` (gpu, cpu: seconds to start each cluster, once for both runs),
``gpu_memory`` (GiB: driver_peak_allocated_gib of the model and periodogram timings,
workers_peak_allocated_gib of the GPU runs, nvidia_smi_peak_used_gib of the whole card
during the GPU runs), ``cpu_gpu_ratio`` (per configuration: CPU seconds / GPU seconds for
wall_s and every stage of :data:`STAGE_KEYS`; > 1 means the GPU is faster; null where a
side is missing), ``notes`` (what went differently: a fallback, a skipped run, dry mode),
``wall_s`` (the whole check).

Budget: the default GPU size (1024² x 20 epochs) is sized to end within 8 minutes on an
H100/H200 machine with 16 cores, install included; ``--size``/``--epochs`` change it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: modules the pipeline imports (module name as imported)
REQUIRED_MODULES = ("numpy", "scipy", "pandas", "pyarrow", "xarray", "torch", "dask", "distributed", "zarr",
                    "astropy", "sep", "skimage", "rich")
#: modules needed only on the GPU path
GPU_MODULES = ("dask_cuda", "pynvml")
#: the top-level keys of gpu_check.json
JSON_KEYS = ("dry", "device", "machine", "started_utc", "survey", "models", "periodogram", "runs",
             "cluster_start_s", "gpu_memory", "cpu_gpu_ratio", "notes", "wall_s")
#: the two configurations of the end-to-end runs: name -> run settings
CONFIGS: dict[str, dict[str, Any]] = {
    "pnet_bpnn": {"detector": "pnet", "bpnn": {"enabled": True}},
    "default": {},
}
#: stages whose times (run.json ``timings_s``) the ratio and the table report (its ``cluster_start_s`` is 0
#: here: the check starts each cluster once for both runs and reports that time apart)
STAGE_KEYS = ("extract_s", "register_s", "calibrate_s", "crossmatch_s", "forced_s", "classify_s",
              "total_s")

ZEROPOINT = 28.0  # mag of 1 ADU per exposure
GAIN = 1.5  # e-/ADU
READ_NOISE = 5.0  # e-
SATURATION = 60_000.0  # ADU
PIXEL_SCALE = 0.3  # arcsec / px
CADENCE_DAYS = 0.15
EXPTIME_S = 300.0


class GPUCheckError(RuntimeError):
    """The check cannot run here (a missing module); the message says what to do."""


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that fail to import here, each with the module its import missed.

    Importing is the test (not ``find_spec``): a package present without one of its own
    dependencies (distributed without tornado, zarr 3.4 without msgspec) fails too, and the
    entry names that dependency, e.g. ``"zarr (needs msgspec)"``.
    """
    out = []
    for n in names:
        try:
            importlib.import_module(n)
        except ImportError as exc:
            dep = getattr(exc, "name", None)
            out.append(n if not dep or dep == n else f"{n} (needs {dep})")
    return out


def check_modules(names: tuple[str, ...]) -> None:
    """Raise :class:`GPUCheckError` naming every module of ``names`` that is missing.

    Parameters
    ----------
    names
        Importable module names.
    """
    miss = missing_modules(names)
    if miss:
        raise GPUCheckError(
            f"missing Python module(s): {', '.join(miss)}. On the GPU machine they come from the carried "
            "wheelhouse: run `benchmarks/gpu.sh --prepare` here (it fills .whl/), carry .whl, and start the "
            "check with `bash benchmarks/gpu.sh` (see its header)")


# --------------------------------------------------------------------------- the survey


def moffat_bank(fwhm_px: float, beta: float = 3.0, oversample: int = 5, radii_px: tuple[int, ...] = (6, 12, 24)
                ) -> Any:
    """Phase banks (:class:`survey_proc.simulate.stamps.PSFBank`) of a pixel-integrated Moffat PSF, numpy only.

    Parameters
    ----------
    fwhm_px
        FWHM (px).
    beta
        Moffat index.
    oversample
        Sub-pixel samples per pixel (odd).
    radii_px
        Stamp radii (px), ascending.

    Returns
    -------
    PSFBank
        For :func:`survey_proc.simulate.stamps.render_stars`.
    """
    from scipy.ndimage import uniform_filter

    from survey_proc.photometry.psffit import moffat_alpha
    from survey_proc.simulate.stamps import bank_from_epsf

    k = int(oversample)
    c = k * (max(radii_px) + 2)
    u = (np.arange(2 * c + 1) - c) / k
    alpha = moffat_alpha(fwhm_px, beta)
    r2 = u[None, :] ** 2 + u[:, None] ** 2
    density = (beta - 1.0) / (math.pi * alpha**2) * (1.0 + r2 / alpha**2) ** (-beta)  # flux per px^2, total 1
    epsf = uniform_filter(density, size=k, mode="constant")  # K x K mean of the density = one pixel's integral
    return bank_from_epsf(epsf, k, radii_px)


def make_survey(path: str | Path, size_px: int, n_epochs: int, seed: int = 0,
                density_per_px2: float = 0.01) -> dict[str, Any]:
    """Write a synthetic one-field survey store with numpy alone (see the module docstring).

    Parameters
    ----------
    path
        The new store (``NAME.zarr``; replaced when it exists).
    size_px
        Image edge (px).
    n_epochs
        Epochs, every :data:`CADENCE_DAYS` days.
    seed
        Seeds every random draw.
    density_per_px2
        Stars per px² over the field plus a 10 px margin.

    Returns
    -------
    dict
        size_px, epochs, stars, variables, mpix (pixels written / 1e6), wall_s.
    """
    from survey_proc import store
    from survey_proc.simulate.stamps import render_stars
    from survey_proc.simulate.wcs import make_wcs, wcs_header_text
    from survey_proc.vocab import MASK_SATURATED
    from training.detector_data import luminosity_function

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = size_px
    margin = 10.0
    n_stars = int(density_per_px2 * (n + 2 * margin) ** 2)
    x = rng.uniform(-margin, n + margin, n_stars)
    y = rng.uniform(-margin, n + margin, n_stars)
    mag = luminosity_function(rng, n_stars, 15.0, 22.5, 0.3)  # dN/dm ~ 10^(0.3 m)
    mjd = 60000.0 + CADENCE_DAYS * np.arange(n_epochs) + rng.uniform(0, 0.01, n_epochs)
    # variables: 5 % of the stars brighter than 20 mag, half sinusoids, half eclipses
    bright = np.flatnonzero(mag < 20.0)
    var = rng.choice(bright, size=max(1, len(bright) // 20), replace=False) if len(bright) else np.zeros(0, int)
    dmag = np.zeros((n_epochs, n_stars))
    t = mjd - mjd[0]
    for j, i in enumerate(var):
        period = rng.uniform(0.3, 2.5)
        phase = np.mod(t / period + rng.uniform(), 1.0)
        if j % 2 == 0:
            dmag[:, i] = rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * phase)
        else:
            dmag[:, i] = np.where(np.abs(phase - 0.5) < 0.05, rng.uniform(0.2, 0.5), 0.0)
    store.create_store(path, band="i", pixel_scale_arcsec=PIXEL_SCALE,
                       attrs={"simulated_by": "benchmarks.gpu_check (numpy only, no truth)"}, overwrite=True)
    store.create_field(path, "F000", ny=n, nx=n, n_epochs=n_epochs, gain_e_per_adu=GAIN, read_noise_e=READ_NOISE,
                       saturation_adu=SATURATION, zeropoint_nominal=ZEROPOINT)
    scale = PIXEL_SCALE / 3600.0
    cd = np.array([[-scale, 0.0], [0.0, scale]])
    c = (n - 1) / 2.0
    airmass = rng.uniform(1.0, 1.5, n_epochs)
    wcs_text = []
    for e in range(n_epochs):
        fwhm = rng.uniform(2.2, 3.4)
        sky = rng.uniform(250.0, 400.0)
        zp = ZEROPOINT - 0.1 * (airmass[e] - 1.0) + rng.normal(0.0, 0.02)
        dx, dy = rng.uniform(-4.0, 4.0, 2)
        wcs_text.append(wcs_header_text(make_wcs((150.0, 2.0), (c + dx, c + dy), cd, n)))
        flux = 10.0 ** (-0.4 * (mag + dmag[e] - zp))
        sigma_pix = math.sqrt(sky * GAIN + READ_NOISE**2) / GAIN
        model = sky + render_stars((n, n), x + dx, y + dy, flux, moffat_bank(fwhm), sigma_pix)
        img = rng.poisson(np.clip(model, 0, None) * GAIN) / GAIN + rng.normal(0.0, READ_NOISE / GAIN, model.shape)
        sat = img >= SATURATION
        img = np.minimum(img, SATURATION).astype(np.float32)
        store.write_epoch_pixels(path, "F000", e, img, (sat * MASK_SATURATED).astype(np.uint8))
    store.write_epoch_meta(path, "F000", 0, store.EpochMeta(
        mjd=mjd, exptime_s=np.full(n_epochs, EXPTIME_S), airmass=airmass, wcs=wcs_text,
        source_file=[f"gpu_check:{e}" for e in range(n_epochs)]))
    return {"size_px": n, "epochs": n_epochs, "stars": n_stars, "variables": len(var),
            "mpix": n * n * n_epochs / 1e6, "wall_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- micro-benchmarks


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_periodogram(device: str, n_curves: int, n_epochs: int, seconds: float, seed: int = 2
                        ) -> dict[str, Any]:
    """Light curves per second of the batched BLS and LS on ``device`` (pipeline defaults).

    Parameters
    ----------
    device
        Torch device ("cuda", "cpu").
    n_curves
        Curves per call (2 % sinusoids of 0.1 mag, the rest white noise of 0.02 mag).
    n_epochs
        Epochs every 300 s (the default survey's cadence).
    seconds
        Each search is repeated (after one warm-up call) for about this long (s).
    seed
        Seeds the curves.

    Returns
    -------
    dict
        curves, epochs, device, bls_freq, ls_freq, bls_curves_per_s, ls_curves_per_s and
        curves_per_s (both searches of a curve).
    """
    from survey_proc.lightcurves.periodogram import BatchedBLS, BatchedLS, search_grid

    rng = np.random.default_rng(seed)
    t = np.arange(n_epochs) * EXPTIME_S / 86400.0
    y = 0.02 * rng.normal(size=(n_curves, n_epochs))
    k = max(1, n_curves // 50)
    y[:k] += 0.1 * np.sin(2 * np.pi * t[None] / rng.uniform(0.3, 3.0, k)[:, None])
    w = np.full_like(y, 1.0 / 0.02**2)
    grid = search_grid(t)

    def rate(fn: Any) -> float:
        fn()
        _sync(device)
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            _sync(device)
            calls += 1
            dt = time.perf_counter() - t0
            if dt >= seconds:
                return calls * n_curves / dt

    bls = BatchedBLS(t, grid, device=device)
    ls = BatchedLS(t, grid, device=device)
    r_bls = rate(lambda: bls(y, w))
    r_ls = rate(lambda: ls(y, w))
    return {"curves": n_curves, "epochs": n_epochs, "device": device, "bls_freq": len(grid.bls_freq),
            "ls_freq": len(grid.ls_freq), "bls_curves_per_s": r_bls, "ls_curves_per_s": r_ls,
            "curves_per_s": 1.0 / (1.0 / r_bls + 1.0 / r_ls)}


# --------------------------------------------------------------------------- GPU memory


class SmiSampler:
    """Peak used memory of the first GPU (GiB) from ``nvidia-smi``, sampled every ``interval_s`` in a thread.

    ``peak_gib`` stays None when ``nvidia-smi`` is absent or never answers.
    """

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.peak_gib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def read_gib() -> float | None:
        """Memory used on GPU 0 now (GiB), or None."""
        exe = shutil.which("nvidia-smi")
        if not exe:
            return None
        try:
            out = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return float(out.split()[0]) / 1024.0
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            v = self.read_gib()
            if v is not None:
                self.peak_gib = v if self.peak_gib is None else max(self.peak_gib, v)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> SmiSampler:
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


def _worker_peak_gib() -> float | None:
    """In a worker: torch's peak allocated CUDA memory (GiB) of this process, None without CUDA."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return float(torch.cuda.max_memory_allocated()) / 2**30


def _worker_reset_peak() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------- clusters and runs


@contextlib.contextmanager
def gpu_client(dry: bool, workers: int, notes: list[str]) -> Iterator[tuple[Any, str]]:
    """The client of the GPU runs and the name of its cluster.

    On a GPU: :func:`survey_proc.distributed.cluster.make_client` with ``cluster="cuda"``
    (what ``--cluster cuda`` starts: dask-cuda's LocalCUDACluster). When that cluster cannot
    start, the reason goes to ``notes`` and a LocalCluster of one worker process that sees the
    GPU stands in (name ``"local-gpu"``), so the figures still come. Dry: a LocalCluster of
    ``workers`` processes (name ``"local"``).
    """
    from survey_proc.distributed.cluster import local_client, make_client

    if dry:
        with local_client(workers, quiet=True, glibc_malloc=True) as c:
            yield c, "local"
        return
    stack = contextlib.ExitStack()
    try:
        client, name = stack.enter_context(make_client("cuda", scheduler=None, workers=None, quiet=True)), "cuda"
    except Exception as exc:  # dask-cuda missing a dependency of this image, or failing to start
        notes.append(f"dask-cuda's LocalCUDACluster did not start ({type(exc).__name__}: {exc}); the GPU runs "
                     "used a LocalCluster of one worker process on the GPU instead")
        client, name = stack.enter_context(local_client(1, quiet=True, glibc_malloc=True)), "local-gpu"
    with stack:
        yield client, name


@contextlib.contextmanager
def cpu_client(workers: int | None) -> Iterator[Any]:
    """A LocalCluster of processes (``--cluster local``) whose workers see no GPU."""
    from survey_proc.distributed.cluster import local_client

    # the workers inherit the environment they are spawned with: no GPU, so the models load on the CPU
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        with local_client(workers, quiet=True, glibc_malloc=True) as c:
            yield c
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def run_one(client: Any, store_path: Path, out: Path, cluster: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One end-to-end run of the pipeline on ``client``; the figures the check reports.

    Parameters
    ----------
    client
        A Dask client (its workers hold the models once the run registers them).
    store_path
        The survey store.
    out
        The run's output directory (overwritten).
    cluster
        The ``cluster`` setting recorded in the configuration ("cuda" or "local").
    settings
        Run settings on top of the defaults (:data:`CONFIGS`).

    Returns
    -------
    dict
        cluster, workers, status, wall_s, timings_s, counts (sources, objects,
        lightcurve_points, objects_classified, periodic_variables), worker_peak_gpu_gib.
    """
    from survey_proc.config import load_config
    from survey_proc.distributed.pipeline import run_pipeline

    # (the client is already there; the setting only records the kind: "local-gpu" is a LocalCluster)
    cfg = load_config(None, {"store": str(store_path), "out": str(out), "reference": "none",
                             "cluster": "cuda" if cluster == "cuda" else "local",
                             "progress": False, "evaluate": False, "mode": "overwrite", **settings})
    client.run(_worker_reset_peak)
    t0 = time.perf_counter()
    run = run_pipeline(cfg, client=client)
    wall = time.perf_counter() - t0
    peaks = [v for v in client.run(_worker_peak_gib).values() if v is not None]
    counts = run.get("counts", {})
    return {"cluster": cluster, "workers": len(client.scheduler_info().get("workers", {})),
            "status": run.get("status"), "wall_s": wall,
            "timings_s": {k: float(v) for k, v in run.get("timings_s", {}).items()},
            "counts": {k: counts.get(k) for k in ("sources", "objects", "lightcurve_points", "objects_classified",
                                                  "periodic_variables")},
            "failures": len(run.get("failures", [])),
            "worker_peak_gpu_gib": max(peaks) if peaks else None}


def ratios(gpu: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds / GPU seconds per configuration and stage (None where either is missing or zero)."""
    out: dict[str, Any] = {}
    for name in CONFIGS:
        g, c = gpu.get(name), cpu.get(name)
        row: dict[str, float | None] = {}
        for k in ("wall_s", *STAGE_KEYS):
            gv = (g or {}).get("wall_s") if k == "wall_s" else (g or {}).get("timings_s", {}).get(k)
            cv = (c or {}).get("wall_s") if k == "wall_s" else (c or {}).get("timings_s", {}).get(k)
            row[k] = float(cv) / float(gv) if gv and cv else None
        out[name] = row
    return out


# --------------------------------------------------------------------------- the check


def _guarded(fn: Any) -> dict[str, Any]:
    """``fn()``, or ``{"error": "Type: message"}`` when it raises (the check goes on to the runs)."""
    try:
        return dict(fn())
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def write_reports(res: dict[str, Any], out: Path) -> str:
    """Write ``gpu_check.json`` and ``gpu_check.md`` to ``out`` (keys not yet measured are null); the Markdown."""
    full = {k: res.get(k) for k in JSON_KEYS}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(full, indent=1, default=str) + "\n")
    md = markdown(full)
    (out / "gpu_check.md").write_text(md)
    return md


def run_check(out_dir: str | Path, *, work_dir: str | Path | None = None, dry: bool | None = None,
              size_px: int | None = None, n_epochs: int | None = None, seconds: float | None = None,
              cpu_workers: int | None = None, gpu_workers: int = 1, budget_s: float = 420.0,
              seed: int = 0) -> dict[str, Any]:
    """Run the whole check (see the module docstring) and write gpu_check.json and gpu_check.md.

    Parameters
    ----------
    out_dir
        Where the reports go: gpu_check.json, gpu_check.md and each run's run.json as
        ``run-<gpu|cpu>-<config>.json`` (at most 7 files; rewritten after every step, so a
        check stopped from outside leaves what it had measured).
    work_dir
        The survey store and the runs' outputs (default ``out_dir/work``).
    dry
        None: dry exactly when torch sees no CUDA device.
    size_px, n_epochs
        The survey (default 1024 x 20, dry 256 x 4).
    seconds
        Length of each timing loop (s; default 3, dry 0.3).
    cpu_workers
        Worker processes of the CPU cluster (default: one per core; dry: the stand-in
        cluster's, default ``gpu_workers``).
    gpu_workers
        Dry only: worker processes of the LocalCluster standing in for the GPU cluster.
    budget_s
        A CPU run is not started once the check has run this long (s); it is recorded as
        skipped in ``notes`` and its ratio is null.
    seed
        Seeds the survey.

    Returns
    -------
    dict
        What gpu_check.json holds (:data:`JSON_KEYS`).
    """
    t_all = time.perf_counter()
    check_modules(REQUIRED_MODULES)
    import torch

    has_cuda = torch.cuda.is_available()
    dry = (not has_cuda) if dry is None else (dry or not has_cuda)
    size_px = size_px or (256 if dry else 1024)
    n_epochs = n_epochs or (4 if dry else 20)
    seconds = seconds if seconds is not None else (0.3 if dry else 3.0)
    out = Path(out_dir)
    work = Path(work_dir) if work_dir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if dry else "cuda"
    notes: list[str] = []
    if not dry and missing_modules(GPU_MODULES):  # not fatal: gpu_client falls back to a LocalCluster on the GPU
        notes.append(f"missing for dask-cuda: {', '.join(missing_modules(GPU_MODULES))}")
    res: dict[str, Any] = {
        "dry": dry, "device": torch.cuda.get_device_name(0) if has_cuda and not dry else "cpu",
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.version.cuda},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "notes": notes,
        "runs": {"gpu": {}, "cpu": {}}, "cluster_start_s": {"gpu": None, "cpu": None},
        "cpu_gpu_ratio": dict.fromkeys(CONFIGS),
        "gpu_memory": dict.fromkeys(("driver_peak_allocated_gib", "workers_peak_allocated_gib",
                                     "nvidia_smi_peak_used_gib"))}

    def step(msg: str) -> None:
        res["wall_s"] = time.perf_counter() - t_all
        write_reports(res, out)
        print(f"  [{res['wall_s']:5.0f} s] {msg}", flush=True)

    print(f"gpu_check: {'dry mode on the CPU' if dry else 'GPU ' + res['device']}; survey {size_px}^2 x {n_epochs}",
          flush=True)
    store_path = work / "survey.zarr"
    res["survey"] = make_survey(store_path, size_px, n_epochs, seed=seed)
    step(f"survey written in {res['survey']['wall_s']:.1f} s")

    from benchmarks import gpu_models

    if not dry:
        torch.cuda.reset_peak_memory_stats()
    threads = torch.get_num_threads()
    if dry:  # one thread: on a shared 2-core machine two wait on each other (128^2 PNet block: 1-3 s vs 0.2 s)
        torch.set_num_threads(1)
    try:
        res["models"] = _guarded(lambda: gpu_models.measure(device, seconds, block_px=128 if dry else 512,
                                                            batch=1 if dry else 8, n_stamps=128 if dry else 16384))
        step("models: " + (res["models"].get("error") or f"PNet {res['models']['pnet']['mpix_per_s']:.3g} Mpix/s, "
                           f"BPNN {res['models']['bpnn']['stamps_per_s']:.3g} stamps/s"))
        res["periodogram"] = _guarded(lambda: measure_periodogram(device, 16 if dry else 2048,
                                                                  200 if dry else 1000, seconds))
    finally:
        torch.set_num_threads(threads)
    if not dry:
        res["gpu_memory"]["driver_peak_allocated_gib"] = float(torch.cuda.max_memory_allocated()) / 2**30
        torch.cuda.empty_cache()
    step("periodograms: " + (res["periodogram"].get("error") or f"{res['periodogram']['curves_per_s']:.3g} curves/s"))

    runs = res["runs"]

    def run(side: str, name: str, client: Any, cluster: str) -> None:
        """One run, recorded; a run that raises is recorded with its error and the check goes on."""
        run_out = work / f"run-{side}-{name}"
        t0 = time.perf_counter()
        try:
            r = run_one(client, store_path, run_out, cluster, CONFIGS[name])
        except Exception as exc:
            r = {"cluster": cluster, "workers": None, "status": f"error: {type(exc).__name__}: {exc}"[:500],
                 "wall_s": time.perf_counter() - t0, "timings_s": {}, "counts": {}, "failures": None,
                 "worker_peak_gpu_gib": None}
        runs[side][name] = r
        with contextlib.suppress(OSError):
            shutil.copyfile(run_out / "run.json", out / f"run-{side}-{name}.json")
        if side == "cpu":
            res["cpu_gpu_ratio"] = ratios(runs["gpu"], runs["cpu"])
        step(f"{side} {name} ({r['cluster']}): {r['status']}, {r['wall_s']:.1f} s")

    with SmiSampler() as smi:
        t0 = time.perf_counter()
        with gpu_client(dry, cpu_workers or gpu_workers, notes) as (client, cluster):
            res["cluster_start_s"]["gpu"] = time.perf_counter() - t0
            for name in CONFIGS:
                run("gpu", name, client, cluster)
    worker_peaks = [r["worker_peak_gpu_gib"] for r in runs["gpu"].values() if r["worker_peak_gpu_gib"] is not None]
    res["gpu_memory"]["workers_peak_allocated_gib"] = max(worker_peaks) if worker_peaks else None
    res["gpu_memory"]["nvidia_smi_peak_used_gib"] = smi.peak_gib
    if dry:
        notes.append("dry mode: the GPU runs ran on a CPU LocalCluster; no CPU runs, the CPU/GPU ratio is null")
    else:
        t0 = time.perf_counter()
        with cpu_client(cpu_workers) as client:
            res["cluster_start_s"]["cpu"] = time.perf_counter() - t0
            for name in CONFIGS:
                if time.perf_counter() - t_all > budget_s:
                    notes.append(f"cpu {name}: not run, the check had used its {budget_s:.0f} s budget")
                    continue
                run("cpu", name, client, "local")
    res["wall_s"] = time.perf_counter() - t_all
    md = write_reports(res, out)
    print(md, flush=True)
    return {k: res.get(k) for k in JSON_KEYS}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def markdown(res: dict[str, Any]) -> str:
    """The check's results as Markdown: device, model and periodogram rates, memory, run times, ratios, notes.

    Parameters
    ----------
    res
        gpu_check.json's content; keys not measured yet (None) are left out of the tables.

    Returns
    -------
    str
        The Markdown text.
    """
    mode = "dry mode, CPU" if res.get("dry") else res.get("device")
    lines = [f"## GPU check ({mode}), {res.get('started_utc')}", ""]
    s, mach = res.get("survey"), res.get("machine") or {}
    if s:
        lines += [f"Survey: {s['size_px']}² px x {s['epochs']} epochs ({s['stars']} stars, {s['variables']} "
                  f"variables, {s['mpix']:.3g} Mpix); machine {mach.get('host')}, {mach.get('cores')} cores, "
                  f"torch {mach.get('torch')}; check wall time {_fmt(res.get('wall_s'))} s.", ""]
    rows: list[tuple[str, str]] = []
    m, p, g = res.get("models"), res.get("periodogram"), res.get("gpu_memory") or {}
    for label, part in (("models", m), ("periodograms", p)):
        if part and "error" in part:
            rows.append((label, f"error: {part['error']}"))
    if m and "error" not in m:
        rows += [(f"PNet ({m['pnet']['block_px']}² blocks, batch {m['pnet']['batch']})",
                  f"{_fmt(m['pnet']['mpix_per_s'])} Mpix/s"),
                 (f"BPNN ({m['bpnn']['mc_samples']} MC samples)", f"{_fmt(m['bpnn']['stamps_per_s'])} stamps/s")]
    if p and "error" not in p:
        rows += [(f"BLS ({p['curves']} curves x {p['epochs']} epochs, {p['bls_freq']} freq)",
                  f"{_fmt(p['bls_curves_per_s'])} curves/s"),
                 (f"LS ({p['ls_freq']} freq)", f"{_fmt(p['ls_curves_per_s'])} curves/s"),
                 ("BLS + LS", f"{_fmt(p['curves_per_s'])} curves/s")]
    rows += [("peak GPU memory, models + periodograms (torch)", f"{_fmt(g.get('driver_peak_allocated_gib'))} GiB"),
             ("peak GPU memory, pipeline workers (torch)", f"{_fmt(g.get('workers_peak_allocated_gib'))} GiB"),
             ("peak GPU memory used (nvidia-smi)", f"{_fmt(g.get('nvidia_smi_peak_used_gib'))} GiB")]
    lines += ["| figure | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows), ""]
    runs = res.get("runs") or {}
    if any(runs.values()):
        cs = res.get("cluster_start_s") or {}
        lines += ["End to end (run.json `timings_s`, seconds; ratio = CPU / GPU, > 1: the GPU is faster; cluster "
                  f"start, once for both runs: gpu {_fmt(cs.get('gpu'))} s, cpu {_fmt(cs.get('cpu'))} s):", "",
                  "| run | cluster | workers | status | objects | " + " | ".join(k[:-2] for k in STAGE_KEYS)
                  + " | wall |",
                  "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in STAGE_KEYS) + " | --- |"]
        for side in ("gpu", "cpu"):
            for name, r in (runs.get(side) or {}).items():
                lines.append(f"| {side} {name} | {r['cluster']} | {_fmt(r['workers'])} | {r['status']} | "
                             f"{_fmt(r['counts'].get('objects'))} | "
                             + " | ".join(_fmt(r["timings_s"].get(k)) for k in STAGE_KEYS)
                             + f" | {_fmt(r['wall_s'])} |")
        for name, row in (res.get("cpu_gpu_ratio") or {}).items():
            if row is not None:
                lines.append(f"| ratio {name} | | | | | " + " | ".join(_fmt(row.get(k)) for k in STAGE_KEYS)
                             + f" | {_fmt(row.get('wall_s'))} |")
    if res.get("notes"):
        lines += ["", *(f"- {n}" for n in res["notes"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: parse the options, run the check, print the table; 2 when a module is missing."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/gpu-check"),
                    help="reports (gpu_check.json, gpu_check.md, the runs' run.json)")
    ap.add_argument("--work", type=Path, help="survey store and run outputs (default OUT/work)")
    ap.add_argument("--dry", action="store_true", help="run on the CPU with a tiny survey (automatic without CUDA)")
    ap.add_argument("--size", type=int, help="survey image edge (px; default 1024, dry 256)")
    ap.add_argument("--epochs", type=int, help="survey epochs (default 20, dry 4)")
    ap.add_argument("--seconds", type=float, help="length of each timing loop (s; default 3, dry 0.3)")
    ap.add_argument("--cpu-workers", type=int, help="processes of the CPU cluster (default: one per core)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no CPU run starts after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        run_check(a.out, work_dir=a.work, dry=True if a.dry else None, size_px=a.size, n_epochs=a.epochs,
                  seconds=a.seconds, cpu_workers=a.cpu_workers, budget_s=a.budget_s, seed=a.seed)
    except GPUCheckError as exc:
        print(f"gpu_check: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-model inference throughput on one device: PNet (Mpix/s) and the BPNN (stamps/s).

    python -m benchmarks.gpu_models [--device cuda] [--out FILE.json] [--seconds 5] [--detector PATH]

Runs the shipped models through their own inference functions
(:func:`survey_proc.detect.pnet.predict`, :func:`survey_proc.photometry.bpnn.predict`) on
synthetic inputs of the pipeline's shapes: PNet on batches of normalised 512^2 blocks of
unit noise with ~400 point sources per 512^2 (so decoding has peaks to handle), the BPNN on stamps with
the card's number of MC samples. Each measurement is timed after a warm-up for about
``--seconds`` and synchronised on a GPU. Prints one JSON object (and writes it with
``--out``): device name, rates, and peak GPU memory. Needs only numpy and torch (no Dask,
Zarr or GalSim), so it runs on a bare GPU machine; on a CPU it is the dry mode that the
default test suite runs with a small ``--seconds``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from survey_proc import model_registry
from survey_proc.detect import pnet
from survey_proc.photometry import bpnn as bpnn_mod
from survey_proc.photometry.stamps import AUX_NAMES, Stamps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, seconds: float) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """Calls of ``fn`` and their wall time (s) after two warm-up calls, for about ``seconds``."""
    fn()
    fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(device)
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n, dt


def synthetic_blocks(n: int, size_px: int, seed: int = 0) -> np.ndarray:
    """``n`` normalised blocks: unit Gaussian noise plus Gaussian stars (FWHM 3 px, S/N 5-500)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, size_px, size_px)).astype(np.float32)
    yy, xx = np.mgrid[:size_px, :size_px]
    k = max(1, int(1.5e-3 * size_px**2))  # ~400 stars per 512^2 block
    for b in range(n):
        for x, y, a in zip(rng.uniform(5, size_px - 5, k), rng.uniform(5, size_px - 5, k),
                           10 ** rng.uniform(0.2, 2.2, k), strict=True):
            s = slice(int(y) - 5, int(y) + 6), slice(int(x) - 5, int(x) + 6)
            img[b][s] += a * np.exp(-((xx[s] - x) ** 2 + (yy[s] - y) ** 2) / (2 * 1.27**2))
    return img


def measure(device: str, seconds: float, detector: Path | None = None, block_px: int = 512,
            batch: int = 8, n_stamps: int = 16384) -> dict:
    """Throughput of PNet and the BPNN on ``device`` (see the module docstring)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    out: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "threads": torch.get_num_threads()}
    det = model_registry.load("detector", detector, device=dev)
    imgs = synthetic_blocks(batch, block_px)
    n, dt = _timed(lambda: pnet.predict(det, imgs), dev, seconds)
    out["pnet"] = {"block_px": block_px, "batch": batch, "calls": n, "mpix_per_s": n * batch * block_px**2 / dt / 1e6,
                   "detections_per_block": float(np.mean([len(d) for d in pnet.predict(det, imgs)]))}
    bp = model_registry.load("bpnn", device=dev)
    rng = np.random.default_rng(1)
    k = bp.model.cfg.stamp_px
    stamps = Stamps(pixels=rng.normal(size=(n_stamps, bp.model.cfg.in_channels, k, k)).astype(np.float32),
                    aux=rng.normal(size=(n_stamps, len(AUX_NAMES))).astype(np.float32),
                    scale_adu=np.full(n_stamps, 1000.0), masked=np.zeros(n_stamps, bool), binning=1)
    n, dt = _timed(lambda: bpnn_mod.predict(bp, stamps), dev, seconds)
    out["bpnn"] = {"stamps": n_stamps, "mc_samples": bp.n_samples, "calls": n, "stamps_per_s": n * n_stamps / dt}
    if dev.type == "cuda":
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--detector", type=Path, help="PNet weights (default: the shipped ones)")
    p.add_argument("--block-px", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--stamps", type=int, default=16384)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    res = measure(a.device, a.seconds, a.detector, a.block_px, a.batch, a.stamps)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train PNet on simulated tiles and write ``survey_proc/models/detector.pt`` + ``detector.json``.

    python -m training.train_detector [--steps N] [--batch B] [--seed S] [--out DIR]
    python -m training.train_detector --generator scenes --assets training/assets/detector_assets.npz \
        --device cuda --workers 14 --batch 64 --time-budget-s 330 --init survey_proc/models/detector.pt

``--generator scenes`` draws the realistic tiles of ``training/detector_scenes.py`` (stars
as positives; galaxies, halos, spikes, bleed trails, hot pixels, cosmic rays, grain,
nebulosity and correlated noise as negatives; PSFs of 0.8-10 px) from a GalSim-drawn
library (``python -m training.detector_assets``), numpy-only, in ``--workers`` data-loader
processes (worker ``w`` of stream ``seed`` draws seed ``seed * 100 + w``). With
``--time-budget-s`` the number of steps is set after 30 timed warm-up steps so that the
one-cycle schedule ends inside the budget (the card records the steps run).

Tiles are drawn on the fly (``training/detector_data.py``; training seeds < 1000, the
validation seed is a different stream; the benchmarks' held-out surveys use seeds > 1000
and whole simulated epochs). Every run is reproducible from its seed on the same torch
build (``torch.manual_seed`` + numpy generators; CPU fp32).

The loss is PNet's: α-balanced focal loss (γ = 2) on the heatmap + L1 on the offsets +
MSE on log10 flux, summed over the hourglass stacks (intermediate supervision). Adam with
a one-cycle learning rate; at the end the BatchNorm statistics are recomputed on fresh
batches with the final weights (:func:`precise_batchnorm`) and the version that validates
better is kept. Every ``--val-every`` steps the validation loss and detection
metrics are logged (JSON lines in ``--log``). At the end the confidence threshold is
chosen on the validation tiles as the one that maximises F1 (recall of stars with
isolated S/N >= 5, precision of all detections against all stars), and the card records
the whole precision-recall curve.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from survey_proc import model_registry
from survey_proc.detect.pnet import (
    DEFAULT_WEIGHTS,
    PNet,
    PNetConfig,
    decode,
    detection_loss,
)
from survey_proc.matching import match_one_to_one
from training.detector_data import TileConfig, TileGenerator
from training.detector_scenes import SceneConfig, SceneGenerator, load_library

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)


def _tensors(b: dict, device: str = "cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    img = torch.as_tensor(b["image"]).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    tgt = {k: torch.as_tensor(b[k]).to(device, non_blocking=True) for k in ("heatmap", "offset", "flux", "pos")}
    tgt["pos"] = tgt["pos"].float()
    return img, tgt


class _Stream(torch.utils.data.IterableDataset):
    """Endless training batches from per-worker scene generators (numpy batches, no truth lists)."""

    def __init__(self, cfg: SceneConfig, seed: int, assets: Path, batch: int):
        self.cfg, self.seed, self.assets, self.batch = cfg, seed, assets, batch

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        gen = SceneGenerator(self.cfg, self.seed * 100 + w, load_library(self.assets))
        while True:
            b = gen.batch(self.batch)
            b.pop("stars")
            yield b


def _generators(a: argparse.Namespace) -> tuple[object, object, object, list]:
    """(tile config, training generator factory, BN generator, validation batches) of ``--generator``."""
    if a.generator == "scenes":
        lib = load_library(a.assets)
        scfg = SceneConfig(size_px=a.tile_px)
        val_gen = SceneGenerator(scfg, a.val_seed, lib)
        val = [val_gen.batch(a.batch) for _ in range(max(1, a.val_tiles // a.batch))]
        return scfg, lambda seed: SceneGenerator(scfg, seed, lib), lib, val
    tcfg = TileConfig(size_px=a.tile_px)
    return tcfg, lambda seed: TileGenerator(tcfg, seed), None, validation_set(tcfg, a.val_seed, a.val_tiles, a.batch)


def validation_set(cfg: TileConfig, seed: int, n_tiles: int, batch: int) -> list[dict]:
    gen = TileGenerator(cfg, seed)
    return [gen.batch(batch) for _ in range(max(1, n_tiles // batch))]


def evaluate(model: PNet, val: list[dict], device: str = "cpu") -> dict:
    """Validation loss and detection metrics (per threshold), astrometric and flux errors."""
    model.eval()
    losses = []
    rows = []  # per detection: confidence, matched?, matched snr, dx, dy, dlogf
    n_true = {5: 0, 10: 0, 20: 0}
    found = {t: {5: 0, 10: 0, 20: 0} for t in THRESHOLDS}
    with torch.inference_mode():
        for b in val:
            img, tgt = _tensors(b, device)
            outs = model(img, all_stacks=True)
            loss, _ = detection_loss(outs, tgt)
            losses.append(float(loss))
            hm = torch.sigmoid(outs[-1]["heatmap"]).float().cpu()
            dets = decode(hm, outs[-1]["offset"].float().cpu(), outs[-1]["flux"].float().cpu(),
                          threshold=float(THRESHOLDS[0]))
            for d, stars in zip(dets, b["stars"], strict=True):
                n = b["image"].shape[-1]
                inside = (stars[:, 0] > -0.5) & (stars[:, 0] < n - 0.5) & (stars[:, 1] > -0.5) & (stars[:, 1] < n - 0.5)
                st = stars[inside]
                for s in n_true:
                    n_true[s] += int((st[:, 3] >= s).sum())
                i_d, i_t = match_one_to_one(d.x, d.y, st[:, 0], st[:, 1], radius_px=1.0)
                matched = np.zeros(len(d), bool)
                matched[i_d] = True
                snr = np.zeros(len(d))
                snr[i_d] = st[i_t, 3]
                dx = np.full(len(d), np.nan)
                dy = np.full(len(d), np.nan)
                dlf = np.full(len(d), np.nan)
                dx[i_d] = d.x[i_d] - st[i_t, 0]
                dy[i_d] = d.y[i_d] - st[i_t, 1]
                dlf[i_d] = np.log10(np.clip(d.flux[i_d], 1e-3, None)) - np.log10(st[i_t, 2])
                rows.append(np.c_[d.confidence, matched, snr, dx, dy, dlf])
                for t in THRESHOLDS:
                    ok = d.confidence[i_d] >= t
                    for s in n_true:
                        found[t][s] += int((st[i_t, 3][ok] >= s).sum())
    model.train()
    r = np.concatenate(rows) if rows else np.zeros((0, 6))
    curve = []
    for t in THRESHOLDS:
        sel = r[:, 0] >= t
        prec = float(r[sel, 1].mean()) if sel.any() else 1.0
        rec5 = found[t][5] / max(1, n_true[5])
        curve.append({"threshold": float(t), "precision": prec, "recall_snr5": rec5,
                      "recall_snr10": found[t][10] / max(1, n_true[10]),
                      "recall_snr20": found[t][20] / max(1, n_true[20]),
                      "f1_snr5": 2 * prec * rec5 / max(prec + rec5, 1e-12)})
    best = max(curve, key=lambda c: c["f1_snr5"])
    m = (r[:, 0] >= best["threshold"]) & (r[:, 1] > 0)
    out = {"loss": float(np.mean(losses)), "best": best, "curve": curve}
    for lo, hi in ((5, 20), (20, 100), (100, 1e9)):
        s = m & (r[:, 2] >= lo) & (r[:, 2] < hi)
        if s.sum() > 5:
            out[f"snr_{lo}_{int(min(hi, 1e4))}"] = {
                "n": int(s.sum()), "pos_rms_px": float(np.sqrt(np.mean(r[s, 3] ** 2 + r[s, 4] ** 2) / 2)),
                "flux_nmad_dex": float(1.4826 * np.median(np.abs(r[s, 5] - np.median(r[s, 5])))),
                "flux_bias_dex": float(np.median(r[s, 5]))}
    return out


def precise_batchnorm(model: PNet, gen: TileGenerator | SceneGenerator, batch: int, n_batches: int,
                      device: str = "cpu") -> None:
    """Recompute every BatchNorm's population statistics on fresh batches ("precise BN").

    During training the running statistics are an exponential average (momentum 0.1) over
    the last batches of a moving network; at evaluation they can lag behind the weights
    they normalise. This pass averages the batch statistics of the final weights over
    ``n_batches`` new batches (cumulative average, ``momentum=None``) without changing
    any weight.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(n_batches):
            img, _ = _tensors(gen.batch(batch), device)
            model(img, all_stacks=True)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()


def _init_training(init: Path) -> dict:
    """The training record of ``--init``'s card, for a ``--steps 0`` (precise-BN only) pass."""
    card = json.loads(init.with_suffix(".json").read_text())
    return {**card["training"], "precise_bn_pass_after_training": True}


def _tile_record(a: argparse.Namespace, tcfg: object) -> dict:
    """The tile configuration for the card; for scenes also the library's PSF range (``fwhm_px``)."""
    rec = dict(tcfg.to_dict())  # type: ignore[attr-defined]
    if a.generator == "scenes":
        z = np.load(a.assets)
        rec["fwhm_px"] = [round(float(z["psf_fwhm_px"].min()), 3), round(float(z["psf_fwhm_px"].max()), 3)]
        rec["assets"] = {"file": a.assets.name, "config": str(z["config"]), "n_psf": len(z["psf_fwhm_px"])}
    return rec


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--val-seed", type=int, default=907)
    p.add_argument("--val-tiles", type=int, default=256)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--tile-px", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--log", type=Path, default=Path("training/logs/detector.jsonl"))
    p.add_argument("--init", type=Path, help="start from these weights (fine-tuning)")
    p.add_argument("--bn-batches", type=int, default=64, help="batches for the precise-BatchNorm pass at the end")
    p.add_argument("--generator", choices=("basic", "scenes"), default="basic",
                   help="basic: stars on a smooth sky (detector_data); scenes: realistic negatives (detector_scenes)")
    p.add_argument("--assets", type=Path, default=Path("training/assets/detector_assets.npz"),
                   help="the GalSim library of --generator scenes (python -m training.detector_assets)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes (--generator scenes)")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="set --steps from the measured step rate so that training ends within this (s)")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = a.device
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    tcfg, make_gen, _, val = _generators(a)
    mcfg = PNetConfig()
    model = PNet(mcfg)
    if a.init:
        model.load_state_dict(torch.load(a.init, weights_only=True, map_location="cpu")["state_dict"])
    model = model.to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    if a.generator == "scenes":
        loader = torch.utils.data.DataLoader(_Stream(tcfg, a.seed, a.assets, a.batch), batch_size=None,
                                             num_workers=a.workers, pin_memory=dev.startswith("cuda"),
                                             persistent_workers=a.workers > 0,
                                             prefetch_factor=4 if a.workers else None)
        batches = iter(loader)
    else:
        gen = make_gen(a.seed)
        batches = (gen.batch(a.batch) for _ in iter(int, 1))
    a.log.parent.mkdir(parents=True, exist_ok=True)
    log = a.log.open("w")
    t0 = time.perf_counter()

    def train_step(b: dict) -> list[float]:
        img, tgt = _tensors(b, dev)
        outs = model(img, all_stacks=True)
        loss, parts = detection_loss(outs, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        return [float(loss.detach()), parts["focal"], parts["offset"], parts["flux"]]

    warm = 0
    if a.time_budget_s > 0:  # warm-up at a tenth of the rate, timed, then size the schedule to the budget
        for g in opt.param_groups:
            g["lr"] = a.lr / 25
        for _ in range(10):
            train_step(next(batches))
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        tw = time.perf_counter()
        for _ in range(30):
            train_step(next(batches))
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        rate = 30 / (time.perf_counter() - tw)
        warm = 40
        a.steps = max(100, int(rate * (a.time_budget_s - (time.perf_counter() - t0))))
        print(json.dumps({"warmup_steps_per_s": round(rate, 2), "steps": a.steps}), flush=True)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
             if a.steps > 0 else None)
    run_loss = []
    history = []
    for step in range(1, a.steps + 1):
        run_loss.append(train_step(next(batches)))
        sched.step()
        if step % 50 == 0:
            m = np.mean(run_loss, axis=0)
            rec = {"step": step, "time_s": round(time.perf_counter() - t0, 1), "lr": sched.get_last_lr()[0],
                   "loss": m[0], "focal": m[1], "offset_l1": m[2], "flux_mse": m[3]}
            run_loss = []
            if step % a.val_every == 0 or step == a.steps:
                v = evaluate(model, val, dev)
                rec["val_loss"] = v["loss"]
                rec["val_best"] = v["best"]
                rec.update({k: v[k] for k in v if k.startswith("snr_")})
            history.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
    train_wall_s = round(time.perf_counter() - t0, 1)
    v_before = evaluate(model, val, dev)
    trained_state = {k: t.clone() for k, t in model.state_dict().items()}
    precise_batchnorm(model, make_gen(a.seed + 1), a.batch, a.bn_batches, dev)
    v = evaluate(model, val, dev)
    use_precise = v["best"]["f1_snr5"] > v_before["best"]["f1_snr5"]
    if not use_precise:  # keep the training's running statistics: they validate better
        model.load_state_dict(trained_state)
        v_after, v = v, v_before
    else:
        v_after = v
    print(json.dumps({"precise_bn": {"before": v_before["best"], "after": v_after["best"],
                                     "kept": "precise" if use_precise else "running"}}), flush=True)
    model.eval()
    model = model.to("cpu")
    card = {
        "model": "PNet (CenterNet / stacked hourglass, no downsampling stem)",
        "architecture": asdict(mcfg),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "input": "(image - background) / noise, bad pixels 0; float32",
        "outputs": "heatmap (sigmoid), offset (dx, dy px), log10(flux / noise)",
        "threshold": v["best"]["threshold"],
        "threshold_rule": "maximum F1 on the validation tiles: recall of stars with isolated S/N >= 5, "
                          "precision of all detections matched one-to-one within 1 px to any star",
        "training": _init_training(a.init) if a.steps == 0 and a.init else {
                     "steps": a.steps, "warmup_steps": warm, "batch": a.batch, "lr": a.lr,
                     "optimizer": "Adam + one-cycle", "seed": a.seed, "generator": a.generator,
                     "tile": _tile_record(a, tcfg), "wall_s": train_wall_s,
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
                     "workers": a.workers, "init": str(a.init) if a.init else None,
                     "loss": "alpha-balanced focal (alpha 0.25, gamma 2, beta 4) + L1 offset + MSE log10 flux, "
                             "summed over stacks"},
        "validation": {"seed": a.val_seed, "tiles": len(val) * a.batch, **v},
        "batchnorm_statistics": "precise (recomputed on fresh batches)" if use_precise else
                                "running averages from training (the precise-BN pass validated worse)",
        "validation_other_batchnorm": {k: (v_after if not use_precise else v_before)[k]
                                       for k in v if k != "curve"},
        "git_revision": git_revision(),
        "date": time.strftime("%Y-%m-%d"),
        "log": str(a.log),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    model_registry.save("detector", model, a.out, card=card, threshold=v["best"]["threshold"])
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.1f} MB), threshold {card['threshold']}, "
          f"val best {v['best']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

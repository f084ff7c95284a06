"""PNet: a CenterNet-style stacked-hourglass star detector with a photometry head.

Plain PyTorch; nothing here knows about Dask, tiles or the store.

Input
-----
One channel, the *normalised* image ``(image - background) / noise`` (dimensionless:
units of the background noise), with unusable pixels set to 0 (:func:`normalise`).
Normalising makes the network independent of the zero point, exposure and sky level;
the flux head therefore predicts ``log10(flux / noise)`` and :func:`decode` multiplies
the noise back.

Architecture (the PNet/CSST variant for crowded fields)
-------------------------------------------------------
- a stem at full resolution (no downsampling module: at a FWHM of 1.5-2 px a stride-2
  stem would merge the neighbours the detector exists to separate). ``stem_stride=2`` is
  the optional variant for well-sampled sparse fields; outputs are then at half resolution
  and the offsets span two pixels;
- ``n_stacks`` hourglass modules (max-pool down, nearest up, residual blocks; channel
  widths ``channels`` per level), each followed by its own heads (intermediate
  supervision) whose predictions are mapped back with 1x1 convolutions and added to the
  features of the next stack, as in Newell et al. (2016);
- heads at the output resolution: heatmap (1 channel, sigmoid), sub-pixel offset (2:
  dx, dy) and flux (1: ``log10(flux / noise)``).

Decoding
--------
A 3x3 max-pool keeps local maxima of the heatmap above ``threshold``; a peak at pixel
(i, j) gives ``x = j + dx``, ``y = i + dy`` (0-based pixel centres, the convention of the
whole package) and ``confidence`` = the heatmap value. The default threshold is chosen
from the validation precision-recall curve (see ``survey_proc/models/detector.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as nnf

from survey_proc import model_registry
from survey_proc.errors import SurveyProcError

DEFAULT_WEIGHTS = model_registry.default_weights("detector")


@dataclass(frozen=True)
class PNetConfig:
    """Architecture hyper-parameters (stored in the weights file and the model card)."""

    stem_channels: int = 16
    channels: tuple[int, ...] = (16, 24, 32, 48)  # per hourglass level, full resolution first
    n_stacks: int = 2
    stem_stride: int = 1  # 1: no downsampling (dense fields); 2: the sparse-field variant
    head_channels: int = 16

    @property
    def multiple(self) -> int:
        """Input sizes must be multiples of this (pixels)."""
        return self.stem_stride * 2 ** (len(self.channels) - 1)


class Residual(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (1x1 when the width changes) skip, then ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        # fuse_batchnorm folds b1, b2 (-> Identity) into c1, c2 and a Sequential skip into one Conv2d
        self.c1: nn.Conv2d = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.b1: nn.BatchNorm2d | nn.Identity = nn.BatchNorm2d(cout)
        self.c2: nn.Conv2d = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.b2: nn.BatchNorm2d | nn.Identity = nn.BatchNorm2d(cout)
        self.skip: nn.Identity | nn.Sequential | nn.Conv2d = (
            nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output for the input ``x``."""
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.skip(x))


class Hourglass(nn.Module):
    """Recursive hourglass: a full-resolution branch plus a max-pooled, deeper branch."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        c0, c1 = channels[0], channels[1]
        self.up1 = Residual(c0, c0)
        self.low1 = Residual(c0, c1)
        self.low2 = Hourglass(channels[1:]) if len(channels) > 2 else Residual(c1, c1)
        self.low3 = Residual(c1, c0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output for the input ``x``."""
        low = self.low3(self.low2(self.low1(nnf.max_pool2d(x, 2))))
        return self.up1(x) + nnf.interpolate(low, scale_factor=2, mode="nearest")


class Heads(nn.Module):
    """Heatmap logit, offsets and log-flux from one stack's features."""

    def __init__(self, cin: int, ch: int):
        super().__init__()

        def head(n_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, ch, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(ch, n_out, 1))

        self.heatmap = head(1)
        self.offset = head(2)
        self.flux = head(1)
        # CenterNet's prior: start with a low heatmap everywhere (p = 0.01)
        bias = cast(nn.Conv2d, self.heatmap[-1]).bias
        assert bias is not None  # nn.Conv2d's default bias=True
        nn.init.constant_(bias, -4.6)

    def forward(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads' maps (heatmap logits, offsets, log flux) from the features ``f``."""
        return {"heatmap": self.heatmap(f), "offset": self.offset(f), "flux": self.flux(f)}


class PNet(nn.Module):
    """Stacked-hourglass CenterNet for point sources. See the module docstring."""

    def __init__(self, cfg: PNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PNetConfig()
        c0 = cfg.channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(1, cfg.stem_channels, 3, stride=cfg.stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(cfg.stem_channels), nn.ReLU(inplace=True), Residual(cfg.stem_channels, c0))
        self.stacks = nn.ModuleList([Hourglass(cfg.channels) for _ in range(cfg.n_stacks)])
        self.post = nn.ModuleList([Residual(c0, c0) for _ in range(cfg.n_stacks)])
        self.heads = nn.ModuleList([Heads(c0, cfg.head_channels) for _ in range(cfg.n_stacks)])
        self.merge_feat = nn.ModuleList([nn.Conv2d(c0, c0, 1) for _ in range(cfg.n_stacks - 1)])
        self.merge_pred = nn.ModuleList([nn.Conv2d(4, c0, 1) for _ in range(cfg.n_stacks - 1)])

    def forward(self, x: torch.Tensor, all_stacks: bool = False
                ) -> list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]:
        """Heads of every stack (``all_stacks``, for training) or of the last one.

        ``x``: (N, 1, H, W) normalised images, H and W multiples of ``cfg.multiple``.
        Heatmaps are returned as logits.
        """
        f = self.stem(x)
        outs = []
        for i, hg in enumerate(self.stacks):
            g = self.post[i](hg(f))
            out = self.heads[i](g)  # the intermediate heads also feed the next stack
            outs.append(out)
            if i < len(self.stacks) - 1:
                pred = torch.cat([out["heatmap"], out["offset"], out["flux"]], dim=1)
                f = f + self.merge_feat[i](g) + self.merge_pred[i](pred)
        return outs if all_stacks else outs[-1]


# ----------------------------------------------------------------------------- preprocessing


def normalise(image: np.ndarray, bad: np.ndarray, background: np.ndarray | float, noise_adu: float) -> np.ndarray:
    """``(image - background) / noise`` as float32, with ``bad`` pixels set to 0."""
    if not np.isfinite(noise_adu) or noise_adu <= 0:
        raise SurveyProcError(f"PNet needs a positive background noise to normalise the image, got {noise_adu!r}")
    out = (np.asarray(image, np.float32) - np.asarray(background, np.float32)) / np.float32(noise_adu)
    out[bad] = 0.0
    return out


def pad_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad an image at its high ends so both sizes are multiples of ``multiple``."""
    ny, nx = img.shape[-2:]
    py = (-ny) % multiple
    px = (-nx) % multiple
    if py == 0 and px == 0:
        return img
    pad = [(0, 0)] * (img.ndim - 2) + [(0, py), (0, px)]
    return np.pad(img, pad)


# ----------------------------------------------------------------------------- decoding


@dataclass
class Detections:
    """Decoded detections, pixel coordinates of the input image (0-based pixel centres)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray  # in the units of the input image times ``noise`` passed to decode (ADU)
    confidence: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def decode(heatmap: torch.Tensor, offset: torch.Tensor, log_flux: torch.Tensor, *, threshold: float,
           stride: int = 1, noise_adu: float = 1.0) -> list[Detections]:
    """Peaks of a heatmap batch -> detections.

    Parameters
    ----------
    heatmap
        (N, 1, H, W) probabilities (after the sigmoid).
    offset
        (N, 2, H, W): sub-pixel (dx, dy) of the star from the peak pixel, in output pixels.
    log_flux
        (N, 1, H, W): ``log10(flux / noise)``.
    threshold
        Minimum heatmap value of a detection.
    stride
        Output stride (``PNetConfig.stem_stride``): output pixel (i, j) has its centre at
        input pixel ``stride * (i, j) + (stride - 1) / 2``.
    noise_adu
        Multiplies the flux back into ADU.

    Returns
    -------
    One :class:`Detections` per image.
    """
    peaks = nnf.max_pool2d(heatmap, 3, stride=1, padding=1)
    keep = (heatmap == peaks) & (heatmap >= threshold)
    out = []
    for n in range(heatmap.shape[0]):
        iy, ix = torch.nonzero(keep[n, 0], as_tuple=True)
        dx = offset[n, 0, iy, ix]
        dy = offset[n, 1, iy, ix]
        c = (stride - 1) / 2.0
        x = (ix.to(torch.float64) + dx.to(torch.float64)) * stride + c
        y = (iy.to(torch.float64) + dy.to(torch.float64)) * stride + c
        flux = 10.0 ** log_flux[n, 0, iy, ix].to(torch.float64) * noise_adu
        out.append(Detections(x.cpu().numpy(), y.cpu().numpy(), flux.cpu().numpy(),
                              heatmap[n, 0, iy, ix].to(torch.float64).cpu().numpy()))
    return out


# ----------------------------------------------------------------------------- loss


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
               beta: float = 4.0) -> torch.Tensor:
    """α-balanced, penalty-reduced focal loss on a Gaussian-splatted heatmap (CornerNet/CenterNet).

    Positives are the pixels where ``target == 1`` (the pixel of each star's centre);
    negatives are weighted by ``(1 - target) ** beta`` so pixels next to a star cost little.
    The sum is normalised by the number of positives. ``alpha`` weights positives and
    ``1 - alpha`` negatives (RetinaNet's 0.25 by default).
    """
    p = torch.sigmoid(logits).clamp(1e-6, 1 - 1e-6)
    pos = target >= 1.0 - 1e-6
    logp = nnf.logsigmoid(logits)
    log1mp = nnf.logsigmoid(-logits)
    pos_loss = -(alpha * (1 - p) ** gamma * logp)[pos].sum()
    neg_w = (1 - target) ** beta
    neg_loss = -((1 - alpha) * neg_w * p**gamma * log1mp)[~pos].sum()
    n_pos = pos.sum().clamp(min=1)
    return (pos_loss + neg_loss) / n_pos


def detection_loss(outs: list[dict[str, torch.Tensor]], target: dict[str, torch.Tensor], *,
                   w_offset: float = 1.0, w_flux: float = 1.0, alpha: float = 0.25, gamma: float = 2.0
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over stacks of focal(heatmap) + w_offset * L1(offset) + w_flux * MSE(log-flux).

    ``target``: ``heatmap`` (N, 1, H, W) in [0, 1] with exact 1 at star pixels; ``offset``
    (N, 2, H, W) and ``flux`` (N, 1, H, W) defined at those pixels; ``pos`` (N, 1, H, W) bool.
    """
    pos = target["pos"]
    n_pos = pos.sum().clamp(min=1)
    total = torch.zeros((), device=target["heatmap"].device)
    parts = {"focal": 0.0, "offset": 0.0, "flux": 0.0}
    for out in outs:
        lf = focal_loss(out["heatmap"], target["heatmap"], alpha=alpha, gamma=gamma)
        lo = (torch.abs(out["offset"] - target["offset"]) * pos).sum() / n_pos
        lq = (((out["flux"] - target["flux"]) ** 2) * pos).sum() / n_pos
        total = total + lf + w_offset * lo + w_flux * lq
        parts["focal"] += float(lf.detach())
        parts["offset"] += float(lo.detach())
        parts["flux"] += float(lq.detach())
    return total, parts


# ----------------------------------------------------------------------------- weights


@dataclass
class LoadedDetector:
    """A PNet ready for inference (from :func:`survey_proc.model_registry.load`) and its threshold."""

    model: PNet
    threshold: float
    device: torch.device
    card: dict = field(default_factory=dict)
    path: str = ""

    @property
    def cfg(self) -> PNetConfig:
        """The architecture of the loaded network."""
        return self.model.cfg


def fuse_batchnorm(model: PNet) -> PNet:
    """Fold every BatchNorm into the convolution before it (inference only; same outputs)."""

    def fold(conv: nn.Module, bn: nn.Module) -> nn.Conv2d:
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise SurveyProcError(f"fuse_batchnorm: expected a Conv2d followed by a BatchNorm2d, got "
                                  f"{type(conv).__name__} and {type(bn).__name__} (already fused?)")
        running_mean, running_var = bn.running_mean, bn.running_var
        if running_mean is None or running_var is None:
            raise SurveyProcError("fuse_batchnorm: a BatchNorm2d without running statistics cannot be folded")
        # nn.Conv2d's attributes are typed for any number of dimensions; these are the 2-D ones
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, cast(tuple[int, int], conv.kernel_size),
                          cast(tuple[int, int], conv.stride), cast("str | tuple[int, int]", conv.padding), bias=True)
        scale = bn.weight / torch.sqrt(running_var + bn.eps)
        fused.weight.data = conv.weight.data * scale[:, None, None, None]
        b0 = conv.bias.data if conv.bias is not None else torch.zeros_like(running_mean)
        assert fused.bias is not None  # bias=True
        fused.bias.data = (b0 - running_mean) * scale + bn.bias
        return fused

    with torch.no_grad():
        for m in list(model.modules()):
            if isinstance(m, Residual):
                m.c1, m.b1 = fold(m.c1, m.b1), nn.Identity()
                m.c2, m.b2 = fold(m.c2, m.b2), nn.Identity()
                if isinstance(m.skip, nn.Sequential):
                    m.skip = fold(m.skip[0], m.skip[1])
        s = model.stem
        model.stem = nn.Sequential(fold(s[0], s[1]), s[2], s[3])
    return model


def _forward_backing_off(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``model(x)``; on a GPU out-of-memory error, the batch is run in halves (recursively)."""
    from survey_proc.gpu_memory import is_oom, release_cache

    try:
        return model(x)
    except Exception as exc:
        if not is_oom(exc):
            raise
        release_cache()
        if len(x) == 1:
            raise SurveyProcError(f"one {tuple(x.shape[-2:])}-pixel tile does not fit in the GPU's memory; "
                                  "use a smaller --tile-px") from exc
        h = len(x) // 2
        a, b = _forward_backing_off(model, x[:h]), _forward_backing_off(model, x[h:])
        return {k: torch.cat([a[k], b[k]]) for k in a}


def predict(det: LoadedDetector, images: np.ndarray, *, threshold: float | None = None,
            noise_adu: float = 1.0) -> list[Detections]:
    """Run the detector on a batch of normalised images (N, H, W) and decode.

    Images are zero-padded to the model's multiple (peaks in the padding are dropped).
    Inference runs under ``torch.inference_mode`` in fp32 on every device: the flux head
    regresses log10 flux, where bf16's 8-bit mantissa (0.4 % steps, ~0.004 mag) is already
    as large as the photometric errors of bright stars, and no mixed-precision variant has
    been validated against the fp32 photometry yet (see docs/pnet.md).
    """
    imgs = np.asarray(images, np.float32)
    if imgs.ndim == 2:
        imgs = imgs[None]
    ny, nx = imgs.shape[-2:]
    padded = pad_to_multiple(imgs, det.cfg.multiple)
    x = torch.from_numpy(np.ascontiguousarray(padded[:, None])).to(det.device)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = _forward_backing_off(det.model, x)
        hm = torch.sigmoid(out["heatmap"]).float()
        dets = decode(hm, out["offset"].float(), out["flux"].float(),
                      threshold=det.threshold if threshold is None else threshold,
                      stride=det.cfg.stem_stride, noise_adu=noise_adu)
    res = []
    for d in dets:  # drop peaks in the padding
        ok = (d.x < nx - 0.5) & (d.y < ny - 0.5)
        res.append(Detections(d.x[ok], d.y[ok], d.flux[ok], d.confidence[ok]))
    return res

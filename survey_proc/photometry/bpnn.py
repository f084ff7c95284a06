"""BPNN: the Bayesian photometry network (PNet's second stage).

Plain PyTorch; nothing here knows about Dask, tiles or the store. Inputs are the stamps of
:mod:`survey_proc.photometry.stamps` (3 x 9 x 9 pixels + 7 auxiliary numbers).

Architecture
------------
- a ResNet-style feature extractor at full stamp resolution: a 3x3 stem convolution, then
  ``n_blocks`` residual blocks (3x3 conv - BN - ReLU - 3x3 conv - BN, identity skip), no
  pooling (as in PNet: a 9 x 9 stamp has no pixels to spare), then a 1x1 convolution down
  to ``reduce_channels``;
- the flattened features, the flattened stamp itself (a linear path: the best flux
  estimator of a known PSF is a linear functional of the pixels) and the auxiliary inputs
  go through Bayesian *flipout* linear layers (:class:`FlipoutLinear`; ReLU between);
- a heteroscedastic head: ``(mu, log sigma^2)`` of ``m - m_s`` (mag), where
  ``m_s = -2.5 log10 s`` is the stamp's flux scale (:mod:`~survey_proc.photometry.stamps`).

Flipout, written here rather than imported from bayesian-torch
---------------------------------------------------------------
The layer is 40 lines. bayesian-torch (the PNet authors' library) would bring torchvision,
tensorboard and scikit-learn as hard requirements; pip's torchvision does not import with
the CPU torch wheel used here, and its layers define the KL as a *mean* over parameters and
read ``prior_variance`` as a standard deviation, both of which an ELBO must undo. Our layer:
weights ``W = mu + softplus(rho) * eps``; flipout (Wen et al. 2018) decorrelates the
examples of a batch that share one ``eps`` with random sign vectors,
``y = x mu^T + ((x * s_in) (sigma * eps)^T) * s_out + b``; ``kl()`` is the closed-form
KL(q || N(0, prior_sigma^2)) *summed* over parameters, so the ELBO is
``mean NLL + kl / N_train`` (:func:`elbo_loss`).

MC inference in one batched pass
--------------------------------
:func:`mc_forward` computes the convolutional features once, repeats them T times along a
leading sample axis, and runs the flipout head once on (T, B, F): each sample t draws its
own ``eps_t`` (weights and biases) and sign vectors, so the T samples are independent
draws of the weight posterior, not T passes. Then (PNet Eq. 15)
``sigma_aleatoric^2 = mean_t sigma_t^2``, ``sigma_epistemic^2 = mean_t mu_t^2 - (mean_t mu_t)^2``
and the prediction is ``mean_t mu_t``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as nnf

from survey_proc import model_registry
from survey_proc.photometry.stamps import AUX_NAMES, CHANNELS, STAMP_PX, Stamps

DEFAULT_WEIGHTS = model_registry.default_weights("bpnn")
LOGVAR_RANGE = (-16.0, 6.0)  # sigma from 0.3 mmag to 20 mag


@dataclass(frozen=True)
class BPNNConfig:
    """Architecture hyper-parameters (stored in the weights file and the model card)."""

    in_channels: int = len(CHANNELS)
    n_aux: int = len(AUX_NAMES)
    stamp_px: int = STAMP_PX
    channels: int = 24
    n_blocks: int = 2
    reduce_channels: int = 4
    bottleneck: int = 96  # deterministic projection of the features before the Bayesian layers
    hidden: tuple[int, ...] = (64,)  # flipout layers: bottleneck -> hidden... -> 2
    prior_sigma: float = 0.1  # N(0, prior_sigma^2) on every Bayesian weight
    rho_init: float = -6.0  # softplus(-6) = 0.0025: start near the deterministic net

    @property
    def head_inputs(self) -> int:
        """Width of the head's input: the convolutional features plus the auxiliary inputs."""
        return (self.reduce_channels + self.in_channels) * self.stamp_px**2 + self.n_aux


@dataclass
class FlipoutNoise:
    """The random numbers of one flipout layer for a (T, B) or (B,) input."""

    eps_w: torch.Tensor  # (T, out, in) or (out, in)
    eps_b: torch.Tensor  # (T, out) or (out,)
    s_in: torch.Tensor  # (T, B, in) or (B, in), entries +-1
    s_out: torch.Tensor  # (T, B, out) or (B, out)

    def select(self, t: int) -> FlipoutNoise:
        """The noise of sample ``t`` of a (T, B) draw, as for a (B,) input."""
        return FlipoutNoise(self.eps_w[t], self.eps_b[t], self.s_in[t], self.s_out[t])


def _signs(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.empty(shape, device=device).bernoulli_(0.5, generator=generator) * 2.0 - 1.0


class FlipoutLinear(nn.Module):
    """A mean-field Gaussian linear layer with flipout (see the module docstring).

    Parameters
    ----------
    in_features, out_features
        Sizes.
    prior_sigma
        Standard deviation of the zero-mean Gaussian prior on every weight and bias.
    rho_init
        Initial ``rho`` (posterior sigma = softplus(rho)).
    """

    def __init__(self, in_features: int, out_features: int, prior_sigma: float = 0.1, rho_init: float = -6.0):
        super().__init__()
        self.in_features, self.out_features, self.prior_sigma = in_features, out_features, prior_sigma
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_mu, a=5**0.5)
        self.weight_rho = nn.Parameter(torch.full((out_features, in_features), rho_init))
        self.bias_mu = nn.Parameter(torch.zeros(out_features))
        self.bias_rho = nn.Parameter(torch.full((out_features,), rho_init))

    def draw(self, batch: int, n_samples: int | None = None, generator: torch.Generator | None = None
             ) -> FlipoutNoise:
        """Noise for a (batch,) input, or for (n_samples, batch) with independent weights per sample."""
        dev = self.weight_mu.device
        lead = () if n_samples is None else (n_samples,)
        return FlipoutNoise(
            torch.randn((*lead, self.out_features, self.in_features), generator=generator, device=dev),
            torch.randn((*lead, self.out_features), generator=generator, device=dev),
            _signs((*lead, batch, self.in_features), generator, dev),
            _signs((*lead, batch, self.out_features), generator, dev))

    def forward(self, x: torch.Tensor, noise: FlipoutNoise | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """``x``: (B, in) (one weight draw for the batch) or (T, B, in) (one draw per sample t)."""
        if noise is None:
            noise = self.draw(x.shape[-2], x.shape[0] if x.dim() == 3 else None, generator)
        sig_w = nnf.softplus(self.weight_rho)
        sig_b = nnf.softplus(self.bias_rho)
        bias = self.bias_mu + sig_b * noise.eps_b
        if x.dim() == 3:
            bias = bias.unsqueeze(-2)
        mean = torch.matmul(x, self.weight_mu.t()) + bias
        pert = torch.matmul(x * noise.s_in, (sig_w * noise.eps_w).transpose(-1, -2)) * noise.s_out
        return mean + pert

    def forward_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The layer at its posterior mean weights (no sampling)."""
        return nnf.linear(x, self.weight_mu, self.bias_mu)

    def kl(self) -> torch.Tensor:
        """KL(q || prior) summed over all weights and biases (nats)."""
        p = self.prior_sigma
        total: torch.Tensor | float = 0.0
        for mu, rho in ((self.weight_mu, self.weight_rho), (self.bias_mu, self.bias_rho)):
            s = nnf.softplus(rho)
            total = total + torch.sum(torch.log(p / s) + (s**2 + mu**2) / (2 * p**2) - 0.5)
        return cast(torch.Tensor, total)  # a tensor after the first of the two terms


class Residual(nn.Module):
    """3x3 conv - BN - ReLU - 3x3 conv - BN, identity skip, ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output for the input ``x``."""
        return nnf.relu(x + self.b2(self.c2(nnf.relu(self.b1(self.c1(x))))))


class BPNN(nn.Module):
    """Feature extractor + flipout head; outputs ``(mu, log sigma^2)`` of ``m - m_s`` (mag)."""

    def __init__(self, cfg: BPNNConfig = BPNNConfig()):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.blocks = nn.Sequential(*[Residual(c) for _ in range(cfg.n_blocks)])
        self.reduce = nn.Conv2d(c, cfg.reduce_channels, 1)
        self.project = nn.Linear(cfg.head_inputs, cfg.bottleneck)
        sizes = (cfg.bottleneck, *cfg.hidden, 2)
        self.head = nn.ModuleList([FlipoutLinear(a, b, cfg.prior_sigma, cfg.rho_init)
                                   for a, b in itertools.pairwise(sizes)])
        with torch.no_grad():  # start at mu = 0, sigma = 0.1 mag
            last = self.head_layers()[-1]
            last.weight_mu.mul_(0.01)
            last.bias_mu.copy_(torch.tensor([0.0, np.log(0.01)]))

    def head_layers(self) -> list[FlipoutLinear]:
        """The flipout layers of :attr:`head` (typed: ``nn.ModuleList`` yields plain modules)."""
        return [cast(FlipoutLinear, layer) for layer in self.head]

    def features(self, pixels: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """(B, 3, 9, 9), (B, n_aux) -> (B, bottleneck): everything before the Bayesian layers.

        The image channels are compressed with ``asinh`` (linear below 1, logarithmic above:
        a faint star's stamp next to a bright one holds values of 10^2-10^3 of its own
        scale), the auxiliary inputs clipped to +-10.
        """
        pixels = torch.cat([torch.asinh(pixels[:, :2]), pixels[:, 2:]], dim=1)
        aux = torch.clamp(aux, -10.0, 10.0)
        f = self.reduce(self.blocks(self.stem(pixels)))
        return nnf.relu(self.project(torch.cat([f.flatten(1), pixels.flatten(1), aux], dim=1)))

    def draw(self, batch: int, n_samples: int | None = None, generator: torch.Generator | None = None
             ) -> list[FlipoutNoise]:
        """The noise of every flipout layer (see :meth:`FlipoutLinear.draw`)."""
        return [layer.draw(batch, n_samples, generator) for layer in self.head_layers()]

    def run_head(self, feats: torch.Tensor, noise: list[FlipoutNoise] | None = None,
                 generator: torch.Generator | None = None, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Head on (B, F) or (T, B, F) features -> ``mu``, ``logvar`` of shape (B,) or (T, B)."""
        h = feats
        for i, layer in enumerate(self.head_layers()):
            if sample:
                h = layer(h, None if noise is None else noise[i], generator)
            else:
                h = layer.forward_mean(h)
            if i < len(self.head) - 1:
                h = nnf.relu(h)
        return h[..., 0], torch.clamp(h[..., 1], *LOGVAR_RANGE)

    def forward(self, pixels: torch.Tensor, aux: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One weight draw for the batch (training): ``mu``, ``logvar``, each (B,)."""
        return self.run_head(self.features(pixels, aux), generator=generator)

    def kl(self) -> torch.Tensor:
        """Sum of the flipout layers' KL divergences (nats)."""
        return cast(torch.Tensor, sum(layer.kl() for layer in self.head_layers()))  # >= 1 layer: a tensor


def gaussian_nll(mu: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Gaussian negative log-likelihood (nats, without the constant 0.5 log 2 pi)."""
    return torch.mean(0.5 * (logvar + (target - mu) ** 2 * torch.exp(-logvar)))


def elbo_loss(model: BPNN, mu: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, n_train: int,
              kl_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative ELBO per example: ``mean NLL + kl_weight * KL / n_train``; returns (loss, nll, kl)."""
    nll = gaussian_nll(mu, logvar, target)
    kl = model.kl()
    return nll + kl_weight * kl / n_train, nll, kl


@dataclass
class MCResult:
    """Predictions of ``m - m_s`` (mag) from T weight samples."""

    mu: np.ndarray  # mean over samples
    sigma_aleatoric: np.ndarray  # sqrt(mean_t sigma_t^2)
    sigma_epistemic: np.ndarray  # std_t mu_t (population)

    @property
    def sigma(self) -> np.ndarray:
        """Total uncertainty (mag): aleatoric and epistemic in quadrature."""
        return np.hypot(self.sigma_aleatoric, self.sigma_epistemic)


def decompose(mu_t: torch.Tensor, logvar_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, B) samples -> mean, aleatoric sigma, epistemic sigma (PNet Eq. 15)."""
    mean = mu_t.mean(0)
    alea = torch.exp(logvar_t).mean(0).sqrt()
    epi = ((mu_t**2).mean(0) - mean**2).clamp_min(0).sqrt()
    return mean, alea, epi


def mc_forward(model: BPNN, pixels: torch.Tensor, aux: torch.Tensor, n_samples: int,
               generator: torch.Generator | None = None, noise: list[FlipoutNoise] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """T weight samples in one batched pass: (T, B) ``mu_t`` and ``logvar_t``."""
    feats = model.features(pixels, aux)
    x = feats.unsqueeze(0).expand(n_samples, *feats.shape)
    return model.run_head(x, noise=noise, generator=generator)


@dataclass
class LoadedBPNN:
    """A BPNN ready for inference (from :func:`survey_proc.model_registry.load`) and its T."""

    model: BPNN
    n_samples: int
    device: torch.device
    card: dict = field(default_factory=dict)
    path: str = ""


def predict(bpnn: LoadedBPNN, stamps: Stamps, *, n_samples: int | None = None, seed: int = 0,
            max_rows: int = 65536, max_batch: int | None = None) -> MCResult:
    """MC predictions of ``m - m_s`` (mag) for a set of stamps.

    Parameters
    ----------
    bpnn
        The loaded model.
    stamps
        Inputs (:func:`survey_proc.photometry.stamps.cut_stamps`).
    n_samples
        T, the number of weight samples (default: the card's); 0 evaluates the posterior
        mean weights once (no epistemic part).
    seed
        Seeds the weight samples: the same stamps and seed give the same output.
    max_rows, max_batch
        Stamps x samples per batched pass (bounds memory: ~1 kB per row), and stamps per
        pass (default 256 on a CPU: the convolutions of small batches stay in the caches,
        1.6x faster than 5000 at once, measured; 16384 on a GPU).
    """
    t = bpnn.n_samples if n_samples is None else int(n_samples)
    n = len(stamps)
    mu, alea, epi = np.zeros(n), np.zeros(n), np.zeros(n)
    if n == 0:
        return MCResult(mu, alea, epi)
    g = torch.Generator(device=bpnn.device)
    g.manual_seed(int(seed))
    if max_batch is None:
        max_batch = 256 if bpnn.device.type == "cpu" else 16384
    chunk = max(1, min(max_batch, max_rows // max(t, 1)))
    from survey_proc.gpu_memory import is_oom, release_cache

    a = 0
    with torch.inference_mode():
        while a < n:
            try:
                _predict_chunk(bpnn, stamps, a, chunk, t, g, mu, alea, epi)
            except Exception as exc:  # a GPU out of memory: halve the batch and run it again
                if not is_oom(exc) or chunk == 1:
                    raise
                release_cache()
                chunk = max(1, chunk // 2)
                continue
            a += chunk
    return MCResult(mu, alea, epi)


def _predict_chunk(bpnn: LoadedBPNN, stamps: Stamps, a: int, chunk: int, t: int, g: torch.Generator,
                   mu: np.ndarray, alea: np.ndarray, epi: np.ndarray) -> None:
    """Predictions for stamps ``a .. a + chunk`` written into ``mu``, ``alea``, ``epi``.

    After an out-of-memory back-off the MC draws of the rerun chunks differ from an
    uninterrupted run's (the generator has moved on); the result is as valid, not identical.
    """
    px = torch.from_numpy(stamps.pixels[a:a + chunk]).to(bpnn.device)
    px = px.contiguous(memory_format=torch.channels_last)
    ax = torch.from_numpy(stamps.aux[a:a + chunk]).to(bpnn.device)
    if t == 0:
        m, lv = bpnn.model.run_head(bpnn.model.features(px, ax), sample=False)
        mu[a:a + chunk] = m.double().cpu().numpy()
        alea[a:a + chunk] = torch.exp(0.5 * lv).double().cpu().numpy()
        return
    m_t, lv_t = mc_forward(bpnn.model, px, ax, t, generator=g)
    m, s_a, s_e = decompose(m_t.double(), lv_t.double())
    mu[a:a + chunk], alea[a:a + chunk], epi[a:a + chunk] = (v.cpu().numpy() for v in (m, s_a, s_e))

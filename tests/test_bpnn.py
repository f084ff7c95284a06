"""BPNN: flipout layers, batched MC, the sigma decomposition, stamps, the pipeline.

Weights I/O: tests/test_model_registry.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as nnf

from survey_proc.errors import SurveyProcError
from survey_proc.evaluate import match_one_to_one, truth_at_epoch
from survey_proc.photometry import bpnn as bp
from survey_proc.photometry import stamps as stp
from survey_proc.photometry.psffit import moffat_alpha, render
from tests.conftest import run_config

SMALL = bp.BPNNConfig(channels=8, n_blocks=1, bottleneck=16, hidden=(8,))


def test_flipout_samples_differ_and_a_fixed_seed_repeats_them():
    torch.manual_seed(0)
    layer = bp.FlipoutLinear(6, 3, rho_init=-1.0)
    x = torch.randn(4, 6)
    a = layer(x, generator=torch.Generator().manual_seed(1))
    b = layer(x, generator=torch.Generator().manual_seed(2))
    c = layer(x, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)
    assert torch.equal(a, c)
    # rows of one batch share eps but not their perturbation (flipout's sign vectors)
    same = layer(x[:1].repeat(4, 1), generator=torch.Generator().manual_seed(3))
    assert (same.std(0) > 1e-3).all()


def test_flipout_output_has_the_mean_and_variance_of_independent_weight_draws():
    torch.manual_seed(0)
    layer = bp.FlipoutLinear(5, 2, rho_init=-1.5)
    x = torch.randn(1, 5)
    t = 20000
    with torch.no_grad():
        out = layer(x.expand(t, 1, 5).contiguous(), generator=torch.Generator().manual_seed(0))[:, 0]
        sw, sb = nnf.softplus(layer.weight_rho), nnf.softplus(layer.bias_rho)
        mean = (x @ layer.weight_mu.t() + layer.bias_mu)[0]
        var = (x**2 @ (sw**2).t())[0] + sb**2
    torch.testing.assert_close(out.mean(0), mean, atol=4 * float(var.max().sqrt()) / t**0.5, rtol=0)
    torch.testing.assert_close(out.var(0), var, rtol=0.05, atol=0)


def test_kl_is_the_closed_form_sum_over_parameters():
    layer = bp.FlipoutLinear(7, 3, prior_sigma=0.3, rho_init=-2.0)
    with torch.no_grad():
        layer.weight_mu.normal_(0, 0.2)
        layer.bias_mu.normal_(0, 0.2)
    q = [torch.distributions.Normal(layer.weight_mu, nnf.softplus(layer.weight_rho)),
         torch.distributions.Normal(layer.bias_mu, nnf.softplus(layer.bias_rho))]
    ref = sum(torch.distributions.kl_divergence(d, torch.distributions.Normal(0.0, 0.3)).sum() for d in q)
    torch.testing.assert_close(layer.kl(), ref)


def test_batched_mc_equals_looped_mc():
    torch.manual_seed(0)
    model = bp.BPNN(SMALL).eval()
    px, ax = torch.randn(5, 3, 9, 9), torch.randn(5, len(stp.AUX_NAMES))
    t = 6
    noise = model.draw(5, t, torch.Generator().manual_seed(4))
    with torch.no_grad():
        mu_b, lv_b = bp.mc_forward(model, px, ax, t, noise=noise)
        feats = model.features(px, ax)
        looped = [model.run_head(feats, noise=[n.select(k) for n in noise]) for k in range(t)]
    torch.testing.assert_close(mu_b, torch.stack([m for m, _ in looped]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lv_b, torch.stack([v for _, v in looped]), rtol=1e-5, atol=1e-6)
    assert float(mu_b.std(0).min()) > 0  # the samples are different weight draws


class _Toy(nn.Module):
    """x -> (mu, logvar) through three flipout layers (the BPNN head on a 1-d input)."""

    def __init__(self):
        super().__init__()
        self.head = nn.ModuleList([bp.FlipoutLinear(1, 32, 1.0, -5.0), bp.FlipoutLinear(32, 32, 1.0, -5.0),
                                   bp.FlipoutLinear(32, 2, 1.0, -5.0)])

    def forward(self, x, generator=None):
        h = x
        for i, layer in enumerate(self.head):
            h = layer(h, generator=generator)
            if i < 2:
                h = nnf.relu(h)
        return h[..., 0], h[..., 1]

    def kl(self):
        return sum(layer.kl() for layer in self.head)


def test_sigma_decomposition_recovers_known_noise_and_epistemic_grows_out_of_range():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 4000
    x = torch.rand(n, 1, generator=g) * 2 - 1
    sigma = 0.05 + 0.10 * (x[:, 0] + 1) / 2  # known aleatoric noise, 0.05 .. 0.15
    y = torch.sin(2 * x[:, 0]) + sigma * torch.randn(n, generator=g)
    model = _Toy()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(2500):
        i = torch.randint(0, n, (256,), generator=g)
        mu, lv = model(x[i], generator=g)
        loss = bp.gaussian_nll(mu, lv, y[i]) + model.kl() / n
        opt.zero_grad()
        loss.backward()
        opt.step()
    grid = torch.tensor([[-0.8], [-0.4], [0.0], [0.4], [0.8], [3.0]])
    with torch.no_grad():
        mu_t, lv_t = model(grid.expand(200, 6, 1).contiguous(), generator=g)
        mean, alea, epi = bp.decompose(mu_t, lv_t)
    true_sig = 0.05 + 0.10 * (grid[:5, 0] + 1) / 2
    np.testing.assert_allclose(alea[:5].numpy(), true_sig.numpy(), rtol=0.25)
    np.testing.assert_allclose(mean[:5].numpy(), np.sin(2 * grid[:5, 0].numpy()), atol=0.05)
    assert float(epi[:5].max()) < 0.5 * float(true_sig.min())  # 4000 points pin the function down
    assert float(epi[5]) > 5 * float(epi[:5].mean())  # far outside the training range it does not


def test_stamp_binning_rule():
    assert [stp.stamp_binning(f) for f in (1.3, 1.9, 2.9, 3.1, 4.9, 5.1, 7.5)] == [1, 1, 1, 2, 2, 3, 4]


def _scene(fwhm: float, xs, ys, fs, shape=(64, 64)):
    alpha = moffat_alpha(fwhm, 3.0)
    return render(shape, np.asarray(xs, float), np.asarray(ys, float), np.asarray(fs, float), alpha, 3.0,
                  int(np.ceil(3 * fwhm)))


@pytest.mark.parametrize("fwhm", [1.9, 4.0])
def test_stamps_of_a_noise_free_star_hold_its_light_and_its_neighbour(fwhm):
    xs, ys, fs = [30.3, 33.8], [31.6, 32.1], [5000.0, 2000.0]
    data = _scene(fwhm, xs, ys, fs)
    bad = np.zeros(data.shape, bool)
    st = stp.cut_stamps(data, bad, None, xs, ys, fs, [0], fwhm, 1.0, 2.0)
    b = stp.stamp_binning(fwhm)
    assert st.pixels.shape == (1, 3, 9, 9) and st.binning == b and not st.masked[0]
    x0 = int(np.floor(30.3 - (9 * b - 1) / 2 + 0.5))
    y0 = int(np.floor(31.6 - (9 * b - 1) / 2 + 0.5))
    window = data[y0:y0 + 9 * b, x0:x0 + 9 * b]
    np.testing.assert_allclose(st.pixels[0, 0].sum() * st.scale_adu[0], window.sum(), rtol=1e-5)  # binning sums
    own = _scene(fwhm, xs[:1], ys[:1], fs[:1])[y0:y0 + 9 * b, x0:x0 + 9 * b]
    neigh = (st.pixels[0, 1] * st.scale_adu[0]).sum()
    np.testing.assert_allclose(neigh, window.sum() - own.sum(), rtol=1e-4)
    assert st.scale_adu[0] == pytest.approx(5000.0)
    np.testing.assert_allclose(st.aux[0, :2], [(30.3 - x0 - (9 * b - 1) / 2) / b, (31.6 - y0 - (9 * b - 1) / 2) / b],
                               atol=1e-6)


def test_masked_pixels_are_filled_with_the_model_and_flagged():
    fwhm, xs, ys, fs = 2.0, [30.3, 33.8], [31.6, 32.1], [5000.0, 2000.0]
    data = _scene(fwhm, xs, ys, fs)
    clean = stp.cut_stamps(data, np.zeros(data.shape, bool), None, xs, ys, fs, [0], fwhm, 1.0, 2.0)
    bad = np.zeros(data.shape, bool)
    bad[31, 28:33] = True  # a bad row through the star's core
    hurt = data.copy()
    hurt[bad] = 1e6
    st = stp.cut_stamps(hurt, bad, None, xs, ys, fs, [0], fwhm, 1.0, 2.0)
    assert st.masked[0] and st.pixels[0, 2].sum() == pytest.approx(5.0)
    # the fill is the model; the noise-free data are the model, so the stamp is unchanged
    np.testing.assert_allclose(st.pixels[0, 0], clean.pixels[0, 0], atol=2e-3)
    assert st.aux[0, stp.AUX_NAMES.index("masked_fraction")] == pytest.approx(5 / 81)


needs_weights = pytest.mark.skipif(not bp.DEFAULT_WEIGHTS.exists(), reason="no shipped BPNN weights")


@needs_weights
def test_pipeline_with_bpnn_gives_calibrated_magnitudes_with_both_uncertainties(grid_survey, client, tmp_path):
    from survey_proc.distributed.pipeline import run_pipeline

    cfg = run_config(grid_survey["store"], tmp_path / "out", bpnn={"enabled": True}, tile_px=128, halo_px=24,
                     crossmatch={"region_px": 128})
    run = run_pipeline(cfg, client=client)
    assert run["status"] == "complete" and run["models"]["bpnn"]["n_samples"] >= 1
    src = pd.read_parquet(tmp_path / "out" / "sources")
    assert src["mag_inst"].notna().all() and (src["mag_err_epistemic"] > 0).all()
    np.testing.assert_allclose(src["mag_inst_err"] ** 2, src["mag_err_aleatoric"] ** 2 + src["mag_err_epistemic"] ** 2,
                               rtol=1e-9)
    np.testing.assert_allclose(src["mag_inst"], -2.5 * np.log10(src["flux"]), atol=1e-9)
    # 19-20.5 mag isolated stars: the calibrated magnitudes agree with the truth within 3 sigma + 0.02
    for e in (0, 3):
        s = src[src["epoch"] == e]
        t = truth_at_epoch(grid_survey["store"], "F000", e)
        i_d, i_t = match_one_to_one(s["x"].to_numpy(), s["y"].to_numpy(), t["x_epoch"].to_numpy(),
                                    t["y_epoch"].to_numpy(), 1.0)
        assert len(i_d) == 16
        dm = s["mag"].to_numpy()[i_d] - t["mag_epoch"].to_numpy()[i_t]
        assert np.all(np.abs(dm) < 3 * s["mag_err"].to_numpy()[i_d] + 0.02), dm
    # the MC samples are seeded: a second run gives the same magnitudes
    cfg2 = run_config(grid_survey["store"], tmp_path / "out2", bpnn={"enabled": True}, tile_px=128, halo_px=24,
                      crossmatch={"region_px": 128})
    run_pipeline(cfg2, client=client)
    src2 = pd.read_parquet(tmp_path / "out2" / "sources")
    np.testing.assert_array_equal(src.sort_values("source_id")["mag_inst"].to_numpy(),
                                  src2.sort_values("source_id")["mag_inst"].to_numpy())


def test_config_checks_mc_samples_and_fingerprints_the_bpnn_section():
    from survey_proc.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"bpnn.n_samples must be >= 0 \(0: the model card's\), got -1"):
        load_config(None, {"bpnn": {"n_samples": -1}})
    on = load_config(None, {"bpnn": {"enabled": True}})
    assert on.fingerprint() != load_config(None, {"bpnn": {"enabled": True, "n_samples": 4}}).fingerprint()
    assert not load_config(None, {}).bpnn.enabled  # the default photometry is the detector's (issue 21)
    off = load_config(None, {"bpnn": {"enabled": False}})
    assert off.fingerprint() == load_config(None, {"bpnn": {"enabled": False, "n_samples": 4}}).fingerprint()


def test_a_corrupt_bpnn_file_stops_the_run_before_anything_is_written(grid_survey, tmp_path):
    from survey_proc.distributed.pipeline import run_pipeline

    bad = tmp_path / "bpnn.pt"
    bad.write_bytes(b"\x00" * 100)
    cfg = run_config(grid_survey["store"], tmp_path / "out", bpnn={"enabled": True, "weights": str(bad)})
    with pytest.raises(SurveyProcError, match=r"BPNN weights file .*bpnn\.pt is corrupt"):
        run_pipeline(cfg)
    assert not (tmp_path / "out" / "sources").exists()

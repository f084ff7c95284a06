"""PNet: decoding, loss, the shipped model on simulated pixels, the worker plugin.

Weights I/O: tests/test_model_registry.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from survey_proc import model_registry, store
from survey_proc.catalog.extract import extract_block
from survey_proc.detect import pnet
from survey_proc.detect.registry import make_detector
from survey_proc.errors import SurveyProcError
from survey_proc.evaluate import match_one_to_one, truth_at_epoch
from survey_proc.tiling import tile_grid
from tests.conftest import run_config


def _maps(n: int, peaks: list[tuple[int, int, float, float, float, float]]):
    """Heatmap/offset/log-flux maps with a Gaussian bump at each (iy, ix, conf, dx, dy, log_flux)."""
    hm = torch.zeros(1, 1, n, n)
    off = torch.zeros(1, 2, n, n)
    lf = torch.zeros(1, 1, n, n)
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    for iy, ix, c, dx, dy, f in peaks:
        bump = c * torch.exp(-((yy - iy) ** 2 + (xx - ix) ** 2) / 2.0)
        hm[0, 0] = torch.maximum(hm[0, 0], bump)
        off[0, 0, iy, ix], off[0, 1, iy, ix], lf[0, 0, iy, ix] = dx, dy, f
    return hm, off, lf


def test_decode_returns_exact_subpixel_positions_and_fluxes():
    peaks = [(10, 12, 0.9, 0.25, -0.375, 2.0), (30, 5, 0.5, -0.5, 0.125, 3.5), (20, 40, 0.2, 0.0, 0.0, 1.0)]
    hm, off, lf = _maps(48, peaks)
    (d,) = pnet.decode(hm, off, lf, threshold=0.3, noise_adu=2.0)
    order = np.argsort(d.y)
    assert len(d) == 2  # the 0.2 peak is below the threshold; a bump's shoulders are not peaks
    np.testing.assert_allclose(d.x[order], [12.25, 4.5], atol=1e-6)
    np.testing.assert_allclose(d.y[order], [9.625, 30.125], atol=1e-6)
    np.testing.assert_allclose(d.flux[order], [2.0 * 10**2.0, 2.0 * 10**3.5], rtol=1e-5)
    np.testing.assert_allclose(d.confidence[order], [0.9, 0.5], atol=1e-6)
    # stride 2: output pixel (i, j) is centred on input pixel 2 (i, j) + 0.5
    (d2,) = pnet.decode(hm, off, lf, threshold=0.3, stride=2)
    np.testing.assert_allclose(sorted(d2.x), sorted([(12 + 0.25) * 2 + 0.5, (5 - 0.5) * 2 + 0.5]), atol=1e-6)


def test_decode_nms_keeps_one_of_two_adjacent_pixels_and_both_of_two_separated():
    hm = torch.zeros(1, 1, 16, 16)
    hm[0, 0, 5, 5], hm[0, 0, 5, 6] = 0.8, 0.7  # adjacent: only the higher survives the 3x3 max-pool
    hm[0, 0, 10, 5], hm[0, 0, 10, 7] = 0.6, 0.6  # two pixels apart: both are local maxima
    (d,) = pnet.decode(hm, torch.zeros(1, 2, 16, 16), torch.zeros(1, 1, 16, 16), threshold=0.3)
    assert sorted(zip(d.y.tolist(), d.x.tolist(), strict=True)) == [(5.0, 5.0), (10.0, 5.0), (10.0, 7.0)]


def test_focal_loss_prefers_the_right_heatmap():
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 3, 4] = 1.0
    good = torch.full((1, 1, 8, 8), -6.0)
    good[0, 0, 3, 4] = 6.0
    bad = torch.full((1, 1, 8, 8), -6.0)
    bad[0, 0, 6, 1] = 6.0
    lg, lb = pnet.focal_loss(good, target), pnet.focal_loss(bad, target)
    assert float(lg) < 1e-3 < float(lb)
    # alpha-balanced: a missed positive costs alpha * log p
    flat = torch.zeros(1, 1, 8, 8)  # p = 0.5 everywhere
    expected = -(0.25 * 0.25 * np.log(0.5)) - 63 * 0.75 * 0.25 * np.log(0.5)
    assert float(pnet.focal_loss(flat, target)) == pytest.approx(expected, rel=1e-5)


def test_fused_batchnorm_model_gives_the_same_outputs():
    torch.manual_seed(0)
    model = pnet.PNet(pnet.PNetConfig(channels=(8, 8, 12, 16), stem_channels=8, head_channels=8))
    model.train()
    for _ in range(3):  # give the BatchNorms non-trivial running statistics
        model(torch.randn(2, 1, 32, 32) * 3 + 1, all_stacks=True)
    model.eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        ref = model(x)
        fused = pnet.fuse_batchnorm(model)(x)
    for k in ("heatmap", "offset", "flux"):
        torch.testing.assert_close(fused[k], ref[k], atol=1e-4, rtol=1e-4)


def test_normalise_needs_a_positive_noise():
    with pytest.raises(SurveyProcError, match="positive background noise"):
        pnet.normalise(np.zeros((4, 4)), np.zeros((4, 4), bool), 0.0, 0.0)


def test_shipped_weights_find_bright_stars_within_0p2_px(grid_survey):
    """The trained model on a simulated epoch it never saw: 16 isolated i = 19-20.5 stars."""
    path, scn = grid_survey["store"], grid_survey["scn"]
    det = model_registry.load("detector", device="cpu")
    fa = store.field_attrs(path, "F000")
    cfg = run_config(path, path.parent / "unused", detector="pnet", tile_px=160, halo_px=0)
    tiles = tile_grid(scn.size_px, scn.size_px, 160, 0)
    for epoch in (0, 3):
        image, mask = store.read_window(path, "F000", epoch, 0, scn.size_px, 0, scn.size_px)
        res = extract_block(image, mask, (0, 0), tiles, float(fa["gain_e_per_adu"]), float(fa["saturation_adu"]),
                            cfg, make_detector(cfg, det))
        df, info = res.table, res.info
        truth = truth_at_epoch(path, "F000", epoch)
        i_d, i_t = match_one_to_one(df["x"].to_numpy(), df["y"].to_numpy(), truth["x_epoch"].to_numpy(),
                                    truth["y_epoch"].to_numpy(), 1.0)
        assert len(i_t) == len(truth) == 16, f"epoch {epoch}: {len(i_t)} of 16 found"
        err = np.hypot(df["x"].to_numpy()[i_d] - truth["x_epoch"].to_numpy()[i_t],
                       df["y"].to_numpy()[i_d] - truth["y_epoch"].to_numpy()[i_t])
        assert err.max() < 0.2, f"epoch {epoch}: position errors {np.round(err, 3)}"
        # the flux head gives total fluxes within 10 % for these S/N > 100 stars
        ratio = df["flux"].to_numpy()[i_d] / truth["flux_adu"].to_numpy()[i_t]
        assert np.all(np.abs(ratio - 1) < 0.1), f"flux ratios {np.round(ratio, 3)}"
        extra = np.setdiff1d(np.arange(len(df)), i_d)  # noise peaks at the threshold (S/N ~4) only
        assert len(extra) <= 2 and (df["snr"].to_numpy()[extra] < 6).all(), df.iloc[extra]
        assert info.apcorr == 1.0 and 2.0 < info.fwhm_px < 3.2


def _load_count():
    from survey_proc.distributed import plugins

    return plugins.LOADS["detector"]


def _use_detector(i: int):
    from survey_proc.distributed.plugins import worker_model

    det = worker_model("detector")
    out = pnet.predict(det, np.zeros((32, 32), np.float32))
    return id(det), len(out[0])


def test_worker_plugin_loads_the_model_once_per_worker(client):
    from survey_proc.distributed.plugins import ModelPlugin

    before = client.run(_load_count)
    client.register_plugin(ModelPlugin({"detector": None}))
    registered = client.run(_load_count)
    assert len(registered) == 2 and all(registered[w] == before[w] + 1 for w in registered), (before, registered)
    results = client.gather(client.map(_use_detector, range(24), pure=False))
    after = client.run(_load_count)
    assert after == registered  # 24 tasks, no further loads
    assert all(n == 0 for _, n in results)  # a blank image has no stars
    assert len({i for i, _ in results}) <= 2  # each worker's tasks share its one model object


def test_pipeline_with_pnet_matches_the_truth_on_a_crowded_field(dense_small, client, tmp_path):
    cfg = run_config(dense_small["store"], tmp_path / "out", detector="pnet", tile_px=128, halo_px=24,
                     crossmatch={"region_px": 128})
    run = __import__("survey_proc.distributed.pipeline", fromlist=["run_pipeline"]).run_pipeline(cfg, client=client)
    assert run["status"] == "complete"
    assert run["models"]["detector"]["sha256"] and run["fingerprint"] == cfg.fingerprint(
        models={"detector": run["models"]["detector"]["sha256"]})
    src = pd.read_parquet(tmp_path / "out" / "sources")
    assert set(src["epoch"]) == {0, 1, 2, 3}
    assert src["confidence"].between(0, 1).all() and src["mag_inst"].notna().all()
    e = 0
    s0 = src[src["epoch"] == e]
    truth = truth_at_epoch(dense_small["store"], "F000", e)
    limit = dense_small["summary"]["limiting_mag_5sigma_psf_crlb"]
    i_d, i_t = match_one_to_one(s0["x"].to_numpy(), s0["y"].to_numpy(), truth["x_epoch"].to_numpy(),
                                truth["y_epoch"].to_numpy(), 1.0)
    bright = truth["mag_epoch"].to_numpy() < limit - 1
    found = np.zeros(len(truth), bool)
    found[i_t] = True
    assert found[bright].mean() > 0.85, found[bright].mean()
    assert len(i_d) / len(s0) > 0.9

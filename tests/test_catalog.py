"""Units of the pipeline: tiling, de-duplication, zero points, association, config, output directory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from survey_proc.catalog import calibrate as cal
from survey_proc.catalog.crossmatch import associate, find_seeds, region_grid
from survey_proc.config import CalibrationConfig, load_config
from survey_proc.errors import ConfigError, SurveyProcError
from survey_proc.outputs import prepare, read_meta, write_parquet_atomic
from survey_proc.photometry.aperture import core_fwhm
from survey_proc.tiling import Tile, deduplicate, tile_blocks, tile_grid


@settings(max_examples=40, deadline=None)
@given(ny=st.integers(16, 700), nx=st.integers(16, 700), tile=st.integers(64, 300), halo=st.integers(0, 40))
def test_tile_cores_cover_every_pixel_once(ny, nx, tile, halo):
    cover = np.zeros((ny, nx), int)
    tiles = tile_grid(ny, nx, tile, halo)
    for t in tiles:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        assert 0 <= t.hy0 <= t.y0 < t.y1 <= t.hy1 <= ny and 0 <= t.hx0 <= t.x0 < t.x1 <= t.hx1 <= nx
        assert t.y0 - t.hy0 == min(halo, t.y0) and t.hx1 - t.x1 == min(halo, nx - t.x1)
    assert (cover == 1).all()
    # every position in the image has exactly one tile with depth >= 0 ... < except on the far edges
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, nx - 0.5, 200)
    y = rng.uniform(-0.5, ny - 0.5, 200)
    depth = np.stack([t.depth_px(x, y) for t in tiles])
    assert ((depth >= 0).sum(axis=0) == 1).all()
    blocks = tile_blocks(tiles, 3, (256, 256))
    assert sorted(t.index for b in blocks for t in b) == list(range(len(tiles)))
    assert all(len({(t.y0 // 256, t.x0 // 256) for t in b}) == 1 and len(b) <= 3 for b in blocks)


def test_deduplicate_keeps_the_copy_deepest_in_its_core():
    a = Tile(0, 0, 100, 0, 100, 0, 120, 0, 120)
    b = Tile(1, 0, 100, 100, 200, 0, 120, 80, 200)
    # the same star measured by both tiles at x = 99.45 (a) and 99.55 (b); another pair from one tile
    x = np.array([99.45, 99.55, 50.0, 50.3])
    y = np.array([10.0, 10.02, 50.0, 50.0])
    tile = np.array([0, 1, 0, 0])
    depth = np.array([a.depth_px(x[i:i + 1], y[i:i + 1])[0] if tile[i] == 0 else b.depth_px(x[i:i + 1], y[i:i + 1])[0]
                      for i in range(4)])
    keep = deduplicate(x, y, tile, depth, radius_px=1.0)
    assert keep.tolist() == [True, False, True, True]  # 99.45 is 0.05 px inside a; 99.55 is 0.05 px outside b
    assert deduplicate(x[2:], y[2:], tile[2:], depth[2:], 1.0).all()  # same tile: never merged


def test_core_fwhm_of_gaussians():
    yy, xx = np.mgrid[:64, :64].astype(float)
    for sigma in (0.9, 1.5, 2.5):
        for cx, cy in ((31.0, 31.0), (31.37, 30.81)):
            img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
            f = core_fwhm(img, np.array([cx]), np.array([cy]))[0]
            assert f == pytest.approx(2.3548 * sigma, rel=1e-6)


def test_robust_zeropoint_ignores_outliers_and_quotes_its_error():
    rng = np.random.default_rng(1)
    n = 80
    err = np.full(n, 0.02)
    dz = 25.3 + rng.normal(0, 0.02, n)
    dz[:15] += rng.uniform(0.2, 1.0, 15)  # blends / variables: one-sided outliers
    zp, zp_err, scatter, used = cal.robust_zeropoint(dz, err, 3.0)
    assert zp == pytest.approx(25.3, abs=3 * 0.02 / np.sqrt(65))
    assert used >= 60 and scatter == pytest.approx(0.02, rel=0.35)
    assert zp_err == pytest.approx(0.02 / np.sqrt(used), rel=0.4)
    assert cal.robust_zeropoint(np.array([]), np.array([]), 3.0)[3] == 0


def test_fit_epoch_zeropoint_status_depends_on_star_count():
    cfg = CalibrationConfig(min_stars=10)
    m = np.linspace(-12, -9, 8)
    z = cal.fit_epoch_zeropoint(m, np.full(8, 0.01), m + 30.0, np.full(8, 0.01), cfg)
    assert z.status == "few" and z.zp == pytest.approx(30.0)


def test_airmass_model_recovers_extinction():
    rng = np.random.default_rng(2)
    X = rng.uniform(1.0, 2.0, 200)
    zp = 31.0 - 0.12 * (X - 1) + rng.normal(0, 0.005, 200)
    zp[:10] -= 0.5  # clouds
    t = pd.DataFrame({"airmass": X, "zp": zp, "zp_err": 0.005, "zp_status": "fit"})
    m = cal.fit_airmass_model(t)
    assert m["k_mag_per_airmass"] == pytest.approx(0.12, abs=0.005)
    assert m["zp0"] == pytest.approx(31.0, abs=0.003) and m["n"] >= 185
    assert cal.model_zeropoint(m, 1.5) == pytest.approx(31.0 - 0.06, abs=0.004)
    space = t.assign(airmass=np.nan)
    assert np.isnan(cal.fit_airmass_model(space)["k_mag_per_airmass"])


def test_associate_one_source_per_object_per_epoch():
    seeds = np.array([[10.0, 10.0], [11.2, 10.0]])
    # epoch 0: two sources both nearest to seed 0; the farther one goes to seed 1
    x = np.array([10.1, 10.5, 10.0, 30.0])
    y = np.array([10.0, 10.0, 10.05, 30.0])
    epoch = np.array([0, 0, 1, 1])
    obj = associate(seeds, x, y, epoch, radius_px=1.0)
    assert obj.tolist() == [0, 1, 0, -1]


def test_seeds_do_not_depend_on_the_order_of_the_epochs():
    rng = np.random.default_rng(3)
    true = rng.uniform(0, 200, (300, 2))
    pts = np.concatenate([true + rng.normal(0, 0.15, true.shape) for _ in range(12)])
    a = find_seeds(pts[:, 0], pts[:, 1], 1.0, 0.25, 3)
    perm = rng.permutation(len(pts))
    b = find_seeds(pts[perm, 0], pts[perm, 1], 1.0, 0.25, 3)
    a, b = a[np.lexsort(a.T)], b[np.lexsort(b.T)]
    np.testing.assert_allclose(a, b, atol=1e-9)
    assert abs(len(a) - 300) <= 3  # one seed per star (close pairs may merge)


def test_region_grid_covers_the_plane():
    regions = region_grid(1000, 700, 256)
    x = np.array([-50.0, 0.0, 255.49, 255.5, 699.0, 800.0])
    y = np.array([-3.0, 500.0, 999.0, 1200.0, 0.0, 0.0])
    n = sum(r.contains(x, y).astype(int) for r in regions)
    assert n.tolist() == [1] * 6


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) in \[detection\]: threshold"):
        load_config(None, {"detection": {"threshold": 3}})
    with pytest.raises(ConfigError, match="unknown run setting"):
        load_config(None, {"tiles": 3})
    with pytest.raises(ConfigError, match="detector must be one of sep, pnet"):
        load_config(None, {"detector": "yolo"})
    with pytest.raises(ConfigError, match=r"halo_px must be between 0 and tile_px"):
        load_config(None, {"tile_px": 128, "halo_px": 200})
    bad = tmp_path / "bad.toml"
    bad.write_text("tile_px = [")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    good = tmp_path / "good.toml"
    good.write_text("tile_px = 256\n[crossmatch]\nregion_px = 1024\n")
    cfg = load_config(good, {"tile_px": 128, "workers": None})
    assert cfg.tile_px == 128 and cfg.crossmatch.region_px == 1024 and cfg.crossmatch.min_epochs == 3


def test_fingerprint_tracks_only_what_changes_outputs():
    base = load_config(None, {})
    assert base.fingerprint() == load_config(None, {"workers": 7, "out": "/x", "progress": False}).fingerprint()
    assert base.fingerprint() != load_config(None, {"detection": {"thresh_sigma": 2.0}}).fingerprint()
    assert base.fingerprint() != load_config(None, {"tile_px": 256}).fingerprint()


def test_output_directory_safety(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(SurveyProcError, match="non-empty directory that is not a survey-proc output"):
        prepare(other, "overwrite", "abc")
    assert (other / "holiday.jpg").exists()
    out = tmp_path / "out"
    prepare(out, "resume", "abc")
    (out / "run.json").write_text('{"fingerprint": "abc"}')
    write_parquet_atomic(pd.DataFrame({"a": [1]}), __import__("pyarrow").schema([("a", "int64")]),
                         out / "sources" / "field=F000" / "epoch=0.parquet", {"n": 1})
    assert read_meta(out / "sources" / "field=F000" / "epoch=0.parquet") == {"n": 1}
    with pytest.raises(SurveyProcError, match=r"different processing configuration .* use --overwrite"):
        prepare(out, "resume", "def")
    prepare(out, "overwrite", "def")
    assert not (out / "sources").exists() and not (out / "run.json").exists()


def test_cuda_cluster_without_dask_cuda_names_the_extra():
    pytest.importorskip("distributed")
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - only on GPU machines
        pytest.skip("dask-cuda is installed")
    from survey_proc.distributed.cluster import make_client

    with pytest.raises(ConfigError, match=r"--cluster cuda needs dask-cuda.*survey-proc\[cuda\]"):
        with make_client("cuda", scheduler=None, workers=None):
            pass


def test_select_calibrators_with_no_reference_star_in_reach_returns_nothing():
    from survey_proc.catalog.calibrate import CalibrationConfig, select_calibrators

    x = np.array([10.0, 50.0])
    i_s, i_r = select_calibrators(x, x, np.array([100.0, 100.0]), np.zeros(2, np.int32), x + 30.0, x + 30.0, 2.0,
                                  CalibrationConfig())
    assert len(i_s) == 0 and len(i_r) == 0

"""Block extraction (catalog/extract.py): bad pixels, sep overflows, the window kept on demand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from survey_proc import store
from survey_proc import vocab as F
from survey_proc.catalog.extract import extract_block
from survey_proc.config import DetectionConfig, RunConfig
from survey_proc.detect import classical
from survey_proc.detect.registry import make_detector
from survey_proc.evaluate import truth_at_epoch
from survey_proc.photometry.measure import Window
from survey_proc.tiling import tile_grid

SEP = RunConfig(detector="sep")


@pytest.fixture(scope="module")
def pnet_model():
    from survey_proc import model_registry

    return model_registry.load("detector", None, device="cpu")


def _border_epoch(border_survey):
    return store.read_window(border_survey["store"], "F000", 0, 0, 256, 0, 256)


def test_nan_inf_and_saturated_pixels_are_flagged_not_fatal(border_survey):
    image, mask = _border_epoch(border_survey)
    image = image.copy()
    t = truth_at_epoch(border_survey["store"], "F000", 0)
    (x0, y0), (x1, y1), (x2, y2) = t[["x_epoch", "y_epoch"]].to_numpy()[[0, 5, 9]]
    image[round(y0), round(x0) + 1] = np.nan  # a NaN next to a star's centre
    image[round(y1) - 1, round(x1)] = np.inf
    image[round(y2), round(x2)] = 1e9  # above saturation
    image[200:210, 20:30] = np.nan  # a NaN patch on empty sky
    res = extract_block(image, mask, (0, 0), tile_grid(256, 256, 128, 16), 1.5, 60000.0, SEP, make_detector(SEP))
    df, info = res.table, res.info
    assert info.bad_px >= 102
    assert len(df) == len(t)  # no star lost, nothing spurious from the patch
    near = lambda x, y: np.argmin(np.hypot(df["x"] - x, df["y"] - y))  # noqa: E731
    assert df["flags"].iloc[near(x0, y0)] & F.MASKED
    assert df["flags"].iloc[near(x1, y1)] & F.MASKED
    assert df["flags"].iloc[near(x2, y2)] & F.MASKED  # the saturated value is masked as bad
    assert np.isfinite(df["flux"]).all()


def test_sep_overflow_falls_back_and_says_so(border_survey):
    image, mask = _border_epoch(border_survey)
    cfg = DetectionConfig(pixstack=1000)  # too small: "internal pixel buffer full"
    bad = classical.bad_pixels(image, mask, 60000.0)
    bkg = classical.estimate_background(image, bad, cfg)
    data = np.ascontiguousarray(np.where(bad, 0, image - bkg.back), dtype=np.float32)
    objs, fallback = classical.extract(data, bad, bkg.global_rms, cfg)
    assert fallback == "limits" and len(objs) == len(border_survey["stars"])
    ok, none = classical.extract(data, bad, bkg.global_rms, DetectionConfig())
    assert none is None and len(ok) == len(objs)
    # the block records the rung and flags every detection
    rc = RunConfig(detector="sep", detection=cfg)
    res = extract_block(image, mask, (0, 0), tile_grid(256, 256, 128, 16), 1.5, 60000.0, rc, make_detector(rc))
    assert res.info.fallback == "limits" and len(res.table) == len(objs)
    assert (res.table["flags"] & F.EXTRACT_FALLBACK).all()


@pytest.mark.parametrize("name", ["sep", "pnet"])
def test_keep_window_changes_nothing_but_the_window(border_survey, pnet_model, name):
    """An off-origin block: the table is the same with or without the window; targets index its rows."""
    image, mask = store.read_window(border_survey["store"], "F000", 1, 112, 256, 112, 256)
    tiles = [t for t in tile_grid(256, 256, 128, 16) if t.index == 3]
    rc = RunConfig(detector=name)
    det = make_detector(rc, pnet_model if name == "pnet" else None)
    plain = extract_block(image, mask, (112, 112), tiles, 1.5, 60000.0, rc, det)
    kept = extract_block(image, mask, (112, 112), tiles, 1.5, 60000.0, rc, det, keep_window=True)
    assert plain.window is None and plain.targets.dtype == np.int64 and len(plain.targets) == 0
    pd.testing.assert_frame_equal(plain.table, kept.table, check_exact=True)
    assert plain.info == kept.info and len(kept.table) > 5
    assert isinstance(kept.window, Window) and kept.targets.dtype == np.int64
    assert len(kept.targets) == len(kept.table) and len(kept.window.x) >= len(kept.table)
    oy, ox = 112, 112  # the window frame's origin in the image
    np.testing.assert_array_equal(kept.window.x[kept.targets] + ox, kept.table["x"].to_numpy())
    np.testing.assert_array_equal(kept.window.y[kept.targets] + oy, kept.table["y"].to_numpy())
    assert kept.window.fwhm_px == kept.info.fwhm_px


def test_sep_fits_the_window_only_when_asked(border_survey, monkeypatch):
    """The default sep path (no BPNN, no keep_window) never runs the window's linear PSF fit."""
    from survey_proc.detect import sep_detector

    def no_fit(*args, **kwargs):
        raise AssertionError("the window's PSF fit ran")

    monkeypatch.setattr(sep_detector, "refine_positions", no_fit)
    image, mask = _border_epoch(border_survey)
    tiles = tile_grid(256, 256, 128, 16)
    res = extract_block(image, mask, (0, 0), tiles, 1.5, 60000.0, SEP, make_detector(SEP))
    assert len(res.table) == len(border_survey["stars"]) and res.window is None
    with pytest.raises(AssertionError, match="PSF fit ran"):
        extract_block(image, mask, (0, 0), tiles, 1.5, 60000.0, SEP, make_detector(SEP), keep_window=True)


def test_seps_pixel_stack_is_no_larger_than_the_image_and_never_overflows_at_that_size():
    """sep allocates its whole pixel stack on every call (57 ms for the 3M default); an image cannot hold more
    pixels above the threshold than it has, so the stack is capped at that and still never overflows."""
    import sep

    rng = np.random.default_rng(3)
    data = np.ascontiguousarray(50.0 + rng.normal(0.0, 1.0, (200, 150)), dtype=np.float32)  # every pixel a source
    bad = np.zeros(data.shape, bool)
    cfg = DetectionConfig()
    objs, fallback = classical.extract(data, bad, 1.0, cfg)
    assert fallback is None and len(objs) >= 1
    assert sep.get_extract_pixstack() == classical.pixstack_for(data) == data.size + 16 < cfg.pixstack
    # a smaller configured stack is kept
    _, fallback = classical.extract(data - 50.0, bad, 1.0, DetectionConfig(pixstack=1000))
    assert fallback is None and sep.get_extract_pixstack() == 1000

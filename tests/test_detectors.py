"""The Detector protocol, its two implementations and the detector registry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from survey_proc import store
from survey_proc.catalog.extract import COLUMNS, BlockInfo, BlockResult, extract_block
from survey_proc.config import PNetSettings, RunConfig
from survey_proc.detect.base import Detections, Detector
from survey_proc.detect.pnet_detector import PNetDetector
from survey_proc.detect.registry import DETECTORS, detector_class, make_detector, weights_path
from survey_proc.detect.sep_detector import SepDetector
from survey_proc.errors import ConfigError
from survey_proc.photometry.measure import Window
from survey_proc.tiling import tile_grid

INT_COLUMNS = ("tile", "npix", "flags")


@pytest.fixture(scope="module")
def pnet_model():
    from survey_proc import model_registry

    return model_registry.load("detector", None, device="cpu")


def _detector(name: str, pnet_model) -> Detector:
    return make_detector(RunConfig(detector=name), pnet_model if name == "pnet" else None)


# ------------------------------------------------------------------ protocol and registry


def test_both_detectors_follow_the_protocol(pnet_model):
    sep_det, pnet_det = SepDetector(), PNetDetector(pnet_model)
    assert isinstance(sep_det, Detector) and isinstance(pnet_det, Detector)
    assert (sep_det.name, sep_det.model_kind, sep_det.weights_setting) == ("sep", None, None)
    assert (pnet_det.name, pnet_det.model_kind, pnet_det.weights_setting) == ("pnet", "detector", "pnet.weights")
    assert not isinstance(object(), Detector)


def test_the_registry_names_each_class_by_its_name():
    assert list(DETECTORS) == ["sep", "pnet"]
    for name, cls in DETECTORS.items():
        assert cls.name == name and detector_class(name) is cls
        assert all(hasattr(cls, a) for a in ("model_kind", "weights_setting", "detect", "total_flux"))


def test_an_unknown_detector_is_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown detector 'sextractor'; the detectors are: sep, pnet"):
        detector_class("sextractor")
    with pytest.raises(ConfigError, match=r"unknown detector 'PNet'; the detectors are: sep, pnet"):
        make_detector(RunConfig(detector="PNet"))
    with pytest.raises(ConfigError, match=r"unknown detector 'nope'"):
        weights_path(RunConfig(detector="nope"))


def test_make_detector_checks_the_model(pnet_model):
    assert isinstance(make_detector(RunConfig(detector="sep")), SepDetector)
    det = make_detector(RunConfig(detector="pnet"), pnet_model)
    assert isinstance(det, PNetDetector) and det.model is pnet_model
    with pytest.raises(ValueError, match=r"detector 'pnet' needs a loaded 'detector' model"):
        make_detector(RunConfig(detector="pnet"))
    with pytest.raises(ValueError, match=r"detector 'sep' takes no model, got a LoadedDetector"):
        make_detector(RunConfig(detector="sep"), pnet_model)


def test_weights_path_is_the_detectors_setting_or_none():
    assert weights_path(RunConfig(detector="pnet")) is None  # "": the shipped weights
    assert weights_path(RunConfig(detector="pnet", pnet=PNetSettings(weights="my/pnet.pt"))) == "my/pnet.pt"
    assert weights_path(RunConfig(detector="sep", pnet=PNetSettings(weights="my/pnet.pt"))) is None


def test_extract_block_refuses_the_old_call_shape():
    """``extract_block(..., cfg, bpnn, seed=...)``: the BPNN (or None) where the detector goes."""
    with pytest.raises(TypeError, match=r"needs a Detector .* got a NoneType; the BPNN comes after the detector"):
        extract_block(np.zeros((64, 64), np.float32), None, (0, 0), tile_grid(64, 64, 64, 0), 1.5, 6e4,
                      RunConfig(), None)  # type: ignore[arg-type]


# ------------------------------------------------------------------ results always whole


@pytest.mark.parametrize("name", ["sep", "pnet"])
def test_block_result_is_always_whole(border_survey, pnet_model, name):
    image, mask = store.read_window(border_survey["store"], "F000", 0, 0, 256, 0, 256)
    tiles = tile_grid(256, 256, 128, 16)
    rc = RunConfig(detector=name)
    res = extract_block(image, mask, (0, 0), tiles, 1.5, 60000.0, rc, _detector(name, pnet_model))
    assert isinstance(res, BlockResult) and isinstance(res.table, pd.DataFrame) and isinstance(res.info, BlockInfo)
    assert res.window is None and res.targets.dtype == np.int64 and res.targets.shape == (0,)
    assert res.info.n_detections == len(res.table) >= len(border_survey["stars"])
    extra = ["confidence"] if name == "pnet" else []
    assert list(res.table.columns) == [*COLUMNS, *extra]
    kept = extract_block(image, mask, (0, 0), tiles, 1.5, 60000.0, rc, _detector(name, pnet_model),
                         keep_window=True)
    assert isinstance(kept.window, Window) and len(kept.targets) == len(kept.table)


WINDOWS = {
    "constant": lambda: (np.full((96, 96), 300.0, np.float32), None),  # an empty readout: nothing to detect
    "all-nan": lambda: (np.full((96, 96), np.nan, np.float32), None),
    "all-masked": lambda: (np.random.default_rng(0).normal(300, 5, (96, 96)).astype(np.float32),
                           np.ones((96, 96), np.uint8)),
}


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("name", ["sep", "pnet"])
def test_empty_and_all_bad_windows_give_an_empty_table_with_the_columns(pnet_model, name, window):
    image, mask = WINDOWS[window]()
    rc = RunConfig(detector=name)
    res = extract_block(image, mask, (32, 64), tile_grid(96, 96, 64, 16), 1.5, 60000.0, rc,
                        _detector(name, pnet_model), keep_window=True)
    assert isinstance(res, BlockResult) and len(res.table) == 0
    extra = {"confidence": np.dtype(np.float32)} if name == "pnet" else {}
    want = {c: np.dtype(np.int32) if c in INT_COLUMNS else np.dtype(np.float64) for c in COLUMNS} | extra
    assert res.table.dtypes.to_dict() == want
    assert res.window is None and res.targets.dtype == np.int64 and len(res.targets) == 0
    info = res.info
    assert (info.n_detections, info.fwhm_px, info.n_fwhm_stars, info.apcorr, info.n_apcorr_stars) == \
        (0, rc.photometry.fwhm_default_px, 0, 1.0, 0)
    assert info.n_px == 96 * 96 and info.bad_px == (0 if window == "constant" else 96 * 96)
    assert info.nonfinite_px == (96 * 96 if window == "all-nan" else 0)


def test_empty_detections_have_typed_columns():
    d = Detections.empty(2.5, confidence=True, fallback="limits")
    assert len(d) == 0 and d.tile.dtype == np.int32 and d.flags.dtype == np.int32 and d.npix.dtype == np.int32
    assert d.x.dtype == np.float64 and d.confidence is not None and d.confidence.dtype == np.float32
    assert d.fallback == "limits" and d.neighbours is None and d.fwhm_px == 2.5
    assert Detections.empty(2.0).confidence is None

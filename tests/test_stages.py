"""The stage list, its declarations, the epoch record and the orchestrator's shape (no cluster needed)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from survey_proc.catalog import calibrate as cal
from survey_proc.config import RunConfig
from survey_proc.outputs import OutputLayout
from survey_proc.stages import STAGES
from survey_proc.stages.crossmatch import LIGHTCURVES_UNIT, OBJECTS_UNIT
from survey_proc.stages.extract import SOURCES_UNIT
from survey_proc.stages.records import EpochRecord

ROOT = Path(__file__).resolve().parents[1]


def test_docs_list_the_stages_of_the_stage_list_in_order():
    text = (ROOT / "docs" / "pipeline.md").read_text()
    table = text[text.index("## Stages"):].split("\n\n")[2]
    rows = [re.match(r"\| (\w+) \|", line).group(1) for line in table.splitlines()[2:]]
    assert rows == [s.name for s in STAGES] == ["extract", "register", "calibrate", "crossmatch", "classify"]
    for s in STAGES:
        assert f"`stages/{s.name}.py`" in table


def test_each_stage_declares_unit_config_sections_and_a_module_of_its_name():
    section_names = {f.name for f in fields(RunConfig)}
    for s in STAGES:
        assert type(s).__module__ == f"survey_proc.stages.{s.name}"
        assert s.config_sections and set(s.config_sections) <= section_names, s.name
        assert s.unit.template.endswith(".parquet")
        assert type(s).run is not type(s).__mro__[-2].run  # every stage has its own plan


def test_unit_templates_agree_with_the_output_layout(tmp_path):
    layout = OutputLayout(tmp_path)
    assert SOURCES_UNIT.path(tmp_path, field="F001", epoch=7) == layout.sources("F001", 7)
    assert OBJECTS_UNIT.path(tmp_path, field="F001", region=3) == layout.objects("F001", 3)
    assert LIGHTCURVES_UNIT.path(tmp_path, field="F001", region=3) == layout.lightcurves("F001", 3)
    tops = {u.top for s in STAGES for u in s.writes}
    assert tops == {"sources", "calibration", "epochs.parquet", "objects", "lightcurves"}


def _record(**kw) -> EpochRecord:
    base = dict(field="F000", epoch=4, mjd=60000.5, airmass=1.2, exptime_s=300.0, n_sources=812, n_duplicates=3,
                fwhm_px=2.1, apcorr=1.08, n_apcorr_stars=40, bkg_adu=210.0, rms_adu=9.5, bad_px=12, fallback=None,
                has_wcs=True, zp=cal.ZeroPoint(30.9, 0.004, 0.02, 88, 120, "fit"), fingerprint="abc")
    return EpochRecord(**{**base, **kw})


def test_epoch_record_round_trips_through_its_footer_form_and_keeps_unknown_keys():
    r = _record(registration={"reference_epoch": 2, "rms_px": 0.03, "n_stars": 50})
    d = r.to_dict()
    assert d["zp"] == {"zp": 30.9, "zp_err": 0.004, "scatter": 0.02, "n_used": 88, "n_candidates": 120,
                       "status": "fit"}
    assert "apcorr_source" not in d and "wcs_refinement" not in d  # optional keys only when set
    assert EpochRecord.from_dict(d) == r
    old = {**d, "some_future_key": 5}
    old.pop("has_wcs")
    back = EpochRecord.from_dict(old)
    assert back.has_wcs and back.extra == {"some_future_key": 5} and back.to_dict()["some_future_key"] == 5
    assert r.calibrated and not r.needs_model_zp
    pending = r.with_(zp=cal.ZeroPoint.pending())
    assert not pending.calibrated and pending.needs_model_zp and pending.zp.status is cal.ZpStatus.PENDING


def test_epoch_summary_row_has_the_epochs_table_columns():
    row = _record(apcorr_source="field model").summary()
    assert list(row) == ["field", "epoch", "mjd", "airmass", "exptime_s", "n_sources", "fwhm_px", "apcorr",
                         "apcorr_n_stars", "apcorr_from_model", "bkg_adu", "rms_adu", "zp", "zp_err", "zp_scatter",
                         "zp_n_stars", "zp_status", "fallback"]
    assert row["apcorr_from_model"] is True and row["zp_status"] == "fit" and row["fallback"] == ""


def test_zero_point_status_is_an_enum_that_reads_and_writes_as_text():
    z = cal.ZeroPoint(30.0, 0.01, 0.02, 5, 9, "few")
    assert z.status is cal.ZpStatus.FEW and z.to_dict()["status"] == "few"
    assert cal.ZeroPoint.from_dict(z.to_dict()) == z
    with pytest.raises(ValueError, match="'best' is not a valid ZpStatus"):
        cal.ZeroPoint(30.0, 0.01, 0.02, 5, 9, "best")


def test_apcorr_model_is_a_clipped_line_or_a_median():
    f = np.linspace(1.8, 3.0, 12)
    a = 1.02 + 0.05 * f
    a[3] += 0.5  # an outlier
    m = cal.fit_apcorr_model(f, a)
    assert m["n"] == 12 and m["coef"] == pytest.approx([0.05, 1.02], abs=1e-9)
    few = cal.fit_apcorr_model(f[:4], a[:4] * 0 + 1.1)
    assert few == {"coef": [0.0, pytest.approx(1.1)], "n": 4}
    assert cal.fit_apcorr_model(np.zeros(0), np.zeros(0)) == {"coef": [0.0, 1.0], "n": 0}


def test_reference_epoch_choice():
    assert cal.choose_reference_epoch({0: 10, 1: 30, 2: 30}) == 1
    assert cal.choose_reference_epoch({0: 10, 1: 30}, requested=0) == 0
    with pytest.raises(ValueError, match=r"reference_epoch = 5 was not extracted in this run \(epochs 0..1\)"):
        cal.choose_reference_epoch({0: 10, 1: 30}, requested=5)


def test_the_orchestrator_is_small_and_holds_no_science():
    src = (ROOT / "survey_proc" / "distributed" / "pipeline.py").read_text()
    assert len(src.splitlines()) <= 300
    for science in ("survey_proc.catalog", "survey_proc.photometry", "survey_proc.lightcurves", "numpy", "pandas",
                    "pyarrow"):
        assert f"import {science}" not in src and f"from {science}" not in src, science


def test_only_the_detector_registry_branches_on_the_detector_name():
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "survey_proc").rglob("*.py")
            if "cfg.detector ==" in p.read_text()]
    assert hits in ([], ["survey_proc/detect/registry.py"])


def test_detector_names_agree_between_vocabulary_config_and_registry():
    from survey_proc import vocab
    from survey_proc.config import DETECTORS
    from survey_proc.detect.registry import DETECTORS as IMPLEMENTATIONS

    assert tuple(IMPLEMENTATIONS) == tuple(vocab.DETECTOR_SECTIONS) == DETECTORS
    for name, cls in IMPLEMENTATIONS.items():
        assert cls.name == name
        if cls.weights_setting:  # the section holding its weights is one only it reads
            assert cls.weights_setting.split(".")[0] in vocab.DETECTOR_SECTIONS[name]


def test_the_fingerprint_leaves_out_the_settings_of_an_unused_detector():
    from survey_proc.config import load_config

    sep = load_config(None, {"detector": "sep"})
    sep_other_pnet = load_config(None, {"detector": "sep", "pnet": {"threshold": 0.3}})
    pnet = load_config(None, {"detector": "pnet"})
    pnet_other = load_config(None, {"detector": "pnet", "pnet": {"threshold": 0.3}})
    assert sep.fingerprint() == sep_other_pnet.fingerprint()
    assert pnet.fingerprint() != pnet_other.fingerprint()

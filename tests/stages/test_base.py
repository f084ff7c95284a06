"""stages/: the stage list against docs/pipeline.md, each stage's declarations, the orchestrator's shape."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from survey_proc.config import RunConfig
from survey_proc.outputs import OutputLayout
from survey_proc.stages import STAGES
from survey_proc.stages.crossmatch import LIGHTCURVES_UNIT, OBJECTS_UNIT
from survey_proc.stages.extract import SOURCES_UNIT

ROOT = Path(__file__).resolve().parents[2]


def test_docs_list_the_stages_of_the_stage_list_in_order():
    text = (ROOT / "docs" / "pipeline.md").read_text()
    table = text[text.index("## Stages"):].split("\n\n")[2]
    rows = [re.match(r"\| (\w+) \|", line).group(1) for line in table.splitlines()[2:]]
    assert rows == [s.name for s in STAGES] == ["extract", "register", "calibrate", "crossmatch", "forced", "classify"]
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


def test_the_flags_table_in_the_docs_lists_every_flag_of_the_vocabulary():
    from survey_proc import vocab

    text = (ROOT / "docs" / "pipeline.md").read_text()
    for bit, name in vocab.NAMES.items():
        assert f"| {bit.bit_length() - 1} | {name} |" in text, name

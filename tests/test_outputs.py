"""outputs.py: what --resume and --overwrite do to an output directory."""

from __future__ import annotations

import pandas as pd
import pytest

from survey_proc.errors import SurveyProcError
from survey_proc.outputs import prepare, read_meta, write_parquet_atomic


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

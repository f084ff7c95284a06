"""`survey-proc validate OUT`: a good run passes; each kind of damage is named."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from survey_proc import vocab as F
from survey_proc.cli import main
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.validate import validate_output
from tests.conftest import run_config


@pytest.fixture(scope="module")
def good_run(border_survey, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate") / "out"
    run_pipeline(run_config(border_survey["store"], out, tile_px=128, halo_px=16,
                            crossmatch={"region_px": 128, "min_epochs": 2}), client=client)
    return out


def _copy(good_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    return out


def test_a_good_run_is_valid(good_run, capsys):
    assert validate_output(good_run) == []
    assert main(["validate", str(good_run)]) == 0
    assert "valid (schemas, unique keys, references, counts against run.json)" in capsys.readouterr().out


def test_duplicated_rows_and_wrong_counts_are_reported(good_run, tmp_path, capsys):
    out = _copy(good_run, tmp_path)
    f = sorted((out / "sources").rglob("*.parquet"))[0]
    t = pq.read_table(f)
    pq.write_table(pa.concat_tables([t, t.slice(0, 1)]), f)
    problems = validate_output(out)
    assert any(p.startswith("sources: 1 duplicated key(s) (source_id)") for p in problems)
    assert any("run.json counts.sources = " in p and "but the output has" in p for p in problems)
    assert main(["validate", str(out)]) == 1
    assert "problem(s)" in capsys.readouterr().out


def test_missing_objects_and_sources_break_the_references(good_run, tmp_path):
    out = _copy(good_run, tmp_path)
    f = sorted((out / "objects").rglob("*.parquet"))[0]
    pq.write_table(pq.read_table(f).slice(1), f)  # drop one object
    e0 = sorted((out / "sources").rglob("*.parquet"))[0]
    e0.unlink()
    problems = validate_output(out)
    assert any(p.startswith("lightcurves: 1 object_id(s) not in objects/") for p in problems)
    assert any(p.startswith("lightcurves: ") and "source_id(s) not in sources/" in p for p in problems)
    assert any(p.startswith("run.json counts.epochs_written = ") for p in problems)


def test_schema_damage_and_a_missing_run_json_are_named(good_run, tmp_path):
    out = _copy(good_run, tmp_path)
    f = sorted((out / "lightcurves").rglob("*.parquet"))[0]
    t = pq.read_table(f)
    pq.write_table(t.drop(["mag_err"]).set_column(t.schema.get_field_index("epoch") - 0, "epoch",
                                                   t["epoch"].cast(pa.float64())), f)
    problems = validate_output(out)
    assert any("column 'mag_err' (double) is missing" in p for p in problems)
    assert any("column 'epoch' has type double, the contract says int32" in p for p in problems)
    (out / "run.json").unlink()
    assert validate_output(out)[0].endswith("run.json: missing; " + str(out) + " is not a survey-proc output "
                                            "(or the run never started)")
    (out / "run.json").write_text("{")
    assert "run.json: not valid JSON" in validate_output(out)[0]
    run = json.loads((good_run / "run.json").read_text())
    assert run["counts"]["sources"] > 0


def test_cli_lists_failed_units_and_allow_failures_exits_zero(border_survey, tmp_path, capsys):
    store = tmp_path / "broken.zarr"
    shutil.copytree(border_survey["store"], store)
    (store / "fields" / "F000" / "image" / "c" / "1" / "0" / "0").write_bytes(b"this is not a zstd frame")
    cfg = tmp_path / "run.toml"
    cfg.write_text("[crossmatch]\nregion_px = 128\nmin_epochs = 2\n")
    args = ["run", str(store), "--tile-px", "128", "--halo-px", "16", "--config", str(cfg), "--quiet",
            "--no-evaluate", "--detector", "sep", "--photometry", "classical", "--no-classify", "--workers", "1",
            "--reference", str(border_survey["store"]).replace(".zarr", ".reference.parquet")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 1
    text = capsys.readouterr().out
    assert "FAILED units: 1" in text and "field F000 epoch 1: cannot read pixels" in text
    assert main([*args, "--out", str(tmp_path / "b"), "--allow-failures"]) == 0
    assert "1 failed unit(s) allowed by --allow-failures" in capsys.readouterr().out
    assert validate_output(tmp_path / "b") == []  # what was written is consistent


def test_points_from_an_epoch_listed_as_failed_are_reported(good_run, tmp_path):
    out = _copy(good_run, tmp_path)
    run = json.loads((out / "run.json").read_text())
    run["failures"] = [{"stage": "calibrate", "field": "F000", "epoch": 1, "error": "x", "attempts": 1}]
    (out / "run.json").write_text(json.dumps(run))
    problems = validate_output(out)
    assert len(problems) == 1
    assert problems[0].startswith("lightcurves: ") and "from epochs run.json lists as failed, e.g. field F000 " \
        "epoch 1; a failed epoch must not reach the light curves" in problems[0]
    n = pq.read_table(out / "lightcurves").to_pandas().query("epoch == 1").shape[0]
    assert problems[0].startswith(f"lightcurves: {n} point(s)") and n > 0


def test_points_of_fallback_epochs_without_their_flag_are_reported(good_run, tmp_path):
    import pandas as pd

    out = _copy(good_run, tmp_path)
    ep = pd.read_parquet(out / "epochs.parquet")
    assert ep["zp_absolute"].all() and (ep["zp_status"] == "fit").all()
    # say epoch 2 took the model's zero point and had no absolute level: its points lack both flags
    ep.loc[ep["epoch"] == 2, ["zp_status", "zp_absolute"]] = ["model", False]
    ep.to_parquet(out / "epochs.parquet")
    problems = validate_output(out)
    n = pq.read_table(out / "lightcurves").to_pandas().query("epoch == 2").shape[0]
    assert problems == [
        f"lightcurves: {n} point(s) of epochs with a model zero point lack the ZP_MODEL flag, e.g. field F000 epoch 2",
        f"lightcurves: {n} point(s) of epochs with no absolute calibration lack the ZP_RELATIVE flag, e.g. field "
        "F000 epoch 2"]


def test_forced_points_must_carry_their_flag_and_counts(good_run, tmp_path):
    out = _copy(good_run, tmp_path)
    assert validate_output(out) == []
    f = sorted((out / "lightcurves").rglob("*.parquet"))[0]
    t = pq.read_table(f)
    lc = t.to_pandas()
    # a point without a source and without the FORCED flag, and a detection that claims to be forced
    lc["source_id"] = lc["source_id"].astype("Int64")
    lc.loc[0, "source_id"] = pd.NA
    lc.loc[1, "flags"] = lc.loc[1, "flags"] | F.FORCED
    pq.write_table(pa.Table.from_pandas(lc, schema=t.schema, preserve_index=False), f)
    problems = validate_output(out)
    first = min(lc.loc[0, "object_id"], lc.loc[1, "object_id"])
    assert f"lightcurves: 2 point(s) whose FORCED flag disagrees with a null source_id, e.g. object {first}" \
        in problems
    assert f"objects: 1 object(s) whose n_forced differs from their forced points, e.g. {lc.loc[0, 'object_id']}" \
        in problems

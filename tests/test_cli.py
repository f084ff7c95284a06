"""The command line: simulate, info, run (store resolution), and its error handling."""

from __future__ import annotations

import json

import duckdb
import pytest
import zarr

from survey_proc.cli import main


def test_simulate_then_info(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    rc = main(["simulate", "--out", str(out), "--scenario", "sparse", "--epochs", "3", "--size", "80",
               "--fields", "2", "--seed", "5", "--workers", "0", "--quiet", "--set", "psf_oversample=5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Wrote" in text and "5-sigma limit" in text
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == 2 and set(info["fields"]) == {"F000", "F001"}
    assert info["fields"]["F001"]["epochs"] == 3 and info["problems"] == []
    # truth is queryable with DuckDB like every other output
    n = duckdb.sql(f"select count(*) from '{tmp_path}/s.truth/epochs.parquet'").fetchall()[0][0]
    assert n == 6


def test_simulate_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    args = ["simulate", "--out", str(out), "--epochs", "1", "--size", "32", "--workers", "0", "--quiet",
            "--set", "psf_oversample=3"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 1
    assert "s.zarr already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_cli_errors_have_no_traceback(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "x.zarr"), "--set", "nope=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("survey-proc simulate: error: unknown scenario parameter 'nope'")
    assert "Traceback" not in err
    assert main(["run", "--epochs", "0"]) == 1
    assert "--epochs must be a positive number of epochs, got 0" in capsys.readouterr().err


def test_info_reports_an_invalid_store(tmp_path, capsys):
    import zarr

    out = tmp_path / "s.zarr"
    main(["simulate", "--out", str(out), "--epochs", "2", "--size", "32", "--workers", "0", "--quiet",
          "--set", "psf_oversample=3"])
    zarr.open_group(str(out))["fields/F000/mjd"][1] = 0.0
    capsys.readouterr()
    assert main(["info", str(out)]) == 1
    assert "not strictly increasing at epoch 1" in capsys.readouterr().out


def test_run_without_store_simulates_the_default_survey_once(tmp_path, monkeypatch, capsys):
    import pandas as pd

    monkeypatch.setenv("SURVEY_PROC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("survey_proc.cli.DEFAULT_SIZE_PX", 256)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--epochs", "3", "--workers", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "Simulating the default survey (dense, 256x256 px, 3 epochs)" in captured.out
    assert "Output: survey-proc-out/default-dense-256px-seed0-sim2-3ep  (complete)" in captured.out
    assert "epochs: 3/3 written" in captured.out and "vs truth F000 (3 epochs): recall" in captured.out
    cached = list((tmp_path / "cache").glob("*.zarr"))
    assert [p.name for p in cached] == ["default-dense-256px-seed0-sim2-3ep.zarr"]
    assert zarr.open_group(str(cached[0]), mode="r").attrs["simulator_version"] == 2
    # a shorter run reuses the cache and processes only the first epochs; a survey of the older renderer
    # (stamps renormalised, no version in its name) is not reused
    (tmp_path / "cache" / "default-dense-256px-seed0-5ep.zarr").mkdir()
    assert main(["run", "--epochs", "2", "--workers", "1", "--quiet", "--out", "short", "--no-evaluate"]) == 0
    out = capsys.readouterr().out
    assert "Using the cached default survey" in out and "default-dense-256px-seed0-sim2-3ep.zarr" in out
    assert len(list((tmp_path / "cache").glob("*sim2*.zarr"))) == 1
    assert sorted(pd.read_parquet(tmp_path / "short" / "epochs.parquet")["epoch"]) == [0, 1]


def test_evaluate_loaders_and_missing_truth(tmp_path, capsys):
    from survey_proc import evaluate
    from survey_proc.errors import SurveyProcError

    out = tmp_path / "s.zarr"
    main(["simulate", "--out", str(out), "--epochs", "2", "--size", "64", "--workers", "0", "--quiet",
          "--set", "psf_oversample=3", "--seed", "3"])
    stars = evaluate.load_truth_stars(out, "F000", in_frame_only=True)
    assert len(stars) > 50 and stars["in_frame"].all()
    t = evaluate.truth_at_epoch(out, "F000", 1)
    assert {"mag_epoch", "flux_adu", "x_epoch", "y_epoch"} <= set(t.columns)
    assert t["x_epoch"].between(-0.5, 63.5).all()
    with pytest.raises(SurveyProcError, match=r"field 'F000' has no epoch 7 in the truth"):
        evaluate.truth_at_epoch(out, "F000", 7)
    with pytest.raises(SurveyProcError, match=r"no truth for .*other.zarr: .*other.truth does not exist"):
        evaluate.load_truth_stars(tmp_path / "other.zarr")
    (out.parent / "s.truth" / "epochs.parquet").unlink()
    with pytest.raises(SurveyProcError, match=r"truth file .*epochs.parquet is missing"):
        evaluate.load_truth_epochs(out)
    with pytest.raises(SurveyProcError, match=r"reference catalogue .*nope.parquet does not exist"):
        evaluate.load_reference_catalog(tmp_path / "nope.parquet")


def test_a_truth_comparison_that_cannot_run_is_a_warning_not_a_failed_run(tmp_path, capsys):
    st = tmp_path / "s.zarr"
    main(["simulate", "--out", str(st), "--epochs", "3", "--size", "256", "--workers", "0", "--quiet",
          "--set", "psf_oversample=3", "--seed", "5"])
    (tmp_path / "s.truth" / "summary.json").unlink()  # a truth folder without its summary
    out = tmp_path / "out"
    code = main(["run", str(st), "--out", str(out), "--detector", "sep", "--photometry", "classical",
                 "--no-classify", "--tile-px", "128", "--halo-px", "16", "--workers", "1", "--quiet"])
    cap = capsys.readouterr()
    err = cap.err
    assert code == 0
    assert "Warning: the comparison with truth could not run (" in err and "summary.json" in err
    assert "it is skipped (the run's outputs are complete). Pass --no-evaluate to skip it" in err
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and "summary.json" in run["evaluation"]["error"]
    assert "  vs truth: not compared (FileNotFoundError: " in cap.out

"""``survey-proc export --hats``: a real run's objects as a HATS collection that lsdb opens and crossmatches."""

from __future__ import annotations

import shutil
import sys

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from survey_proc.cli import main
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.errors import SurveyProcError
from survey_proc.export_hats import CATALOG_NAME, NESTED_COLUMN, export_hats
from tests.conftest import run_config

lsdb = pytest.importorskip("lsdb", reason="the hats extra is not installed: pip install 'survey-proc[hats]'")
pytest.importorskip("hats_import")
pytest.importorskip("nested_pandas")

DUCKDB_README = "select object_id, count(*) n from '{out}/lightcurves/**/*.parquet' group by 1 order by n desc limit 5"
DUCKDB_ALL = "select object_id, count(*) n from '{out}/lightcurves/**/*.parquet' group by 1 order by 1"


@pytest.fixture(scope="module")
def exported(grid_survey, client, tmp_path_factory) -> dict:
    """The grid survey run with four regions, exported on the shared LocalCluster (real worker processes)."""
    root = tmp_path_factory.mktemp("hats")
    out = root / "out"
    cfg = run_config(grid_survey["store"], out, tile_px=160, halo_px=16, crossmatch={"region_px": 80})
    run = run_pipeline(cfg, client=client)
    assert run["status"] == "complete"
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    query_before = duckdb.sql(DUCKDB_ALL.format(out=out)).fetchall()
    res = export_hats(out, root / "hats", client=client, margin_arcsec=30.0)
    return {"out": out, "dest": root / "hats", "res": res, "before": before, "query_before": query_before,
            "root": root}


def test_lsdb_opens_every_object_with_its_light_curve(exported):
    out, dest, res = exported["out"], exported["dest"], exported["res"]
    objects = pd.read_parquet(out / "objects")
    lc = pd.read_parquet(out / "lightcurves")
    assert len(list((out / "objects").glob("field=*/region=*.parquet"))) == 4  # four units nested separately
    assert res["rows"] == len(objects) == 16 and res["lightcurve_points"] == len(lc)
    assert (dest / "collection.properties").is_file() and (dest / CATALOG_NAME / "properties").is_file()
    assert res["margin_path"] is not None and (res["margin_path"] / "properties").is_file()
    cat = lsdb.open_catalog(dest)
    assert cat.margin is not None  # the collection's default margin comes with it
    df = cat.compute()
    assert len(df) == len(objects) and set(df["object_id"]) == set(objects["object_id"])
    assert NESTED_COLUMN in df.nested_columns
    # every object's nested light curve is its rows of lightcurves/, in time order
    n_rows = lc.groupby("object_id").size()
    for _, row in df.iterrows():
        nested = row[NESTED_COLUMN]
        mine = lc[lc["object_id"] == row["object_id"]].sort_values("mjd")
        assert len(nested) == n_rows[row["object_id"]] == len(mine)
        np.testing.assert_array_equal(nested["mjd"].to_numpy(float), mine["mjd"].to_numpy(float))
        np.testing.assert_array_equal(nested["mag"].to_numpy(float), mine["mag"].to_numpy(float))
        np.testing.assert_array_equal(nested["flags"].to_numpy(), mine["flags"].to_numpy())
    # the object columns came through unchanged
    merged = df[["object_id", "ra", "dec", "mag_mean"]].merge(objects[["object_id", "ra", "dec", "mag_mean"]],
                                                              on="object_id", suffixes=("_h", "_o"))
    np.testing.assert_allclose(merged["ra_h"].astype(float), merged["ra_o"])
    np.testing.assert_allclose(merged["mag_mean_h"].astype(float), merged["mag_mean_o"])
    # the hive output is untouched and the README's DuckDB query still answers the same
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == exported["before"]
    assert duckdb.sql(DUCKDB_ALL.format(out=out)).fetchall() == exported["query_before"]
    top = duckdb.sql(DUCKDB_README.format(out=out)).fetchall()
    assert len(top) == 5 and all(n == n_rows.max() for _, n in top)


def test_crossmatch_with_a_second_hats_catalogue(exported, tmp_path):
    objects = pd.read_parquet(out_objects := exported["out"] / "objects")
    assert len(objects) and out_objects.is_dir()
    # every second object, seen by another survey 0.1 arcsec away, and three sources far from any object
    pick = objects.sort_values("object_id").iloc[::2]
    other = pd.DataFrame({"ext_id": pick["object_id"].to_numpy() * 10 + 1,
                          "ra": pick["ra"].to_numpy(), "dec": pick["dec"].to_numpy() + 0.1 / 3600})
    decoys = pd.DataFrame({"ext_id": [-1, -2, -3], "ra": objects["ra"].mean() + np.array([0.01, 0.02, -0.01]),
                           "dec": objects["dec"].mean() + np.array([0.01, -0.02, 0.015])})
    ext = lsdb.from_dataframe(pd.concat([other, decoys], ignore_index=True), ra_column="ra", dec_column="dec",
                              catalog_name="ext", margin_threshold=30.0)
    ext.write_catalog(tmp_path / "ext")  # a collection with its margin
    ours = lsdb.open_catalog(exported["dest"])
    theirs = lsdb.open_catalog(tmp_path / "ext")
    xm = ours.crossmatch(theirs, radius_arcsec=0.5, n_neighbors=1, suffixes=("_sp", "_ext"),
                         suffix_method="all_columns").compute()
    pairs = sorted(zip(xm["object_id_sp"].astype(int), xm["ext_id_ext"].astype(int), strict=True))
    assert pairs == sorted(zip(pick["object_id"].astype(int), pick["object_id"].astype(int) * 10 + 1, strict=True))
    np.testing.assert_allclose(xm["_dist_arcsec"].astype(float), 0.1, atol=0.01)


def test_export_refuses_objects_without_sky_positions(exported, tmp_path, capsys):
    out = tmp_path / "nowcs"
    shutil.copytree(exported["out"], out)
    unit = sorted((out / "objects").glob("field=*/region=*.parquet"))[1]
    t = pq.read_table(unit)
    nan = pa.array(np.full(t.num_rows, np.nan))
    pq.write_table(t.set_column(t.schema.get_field_index("ra"), "ra", nan), unit)
    with pytest.raises(SurveyProcError, match=rf"objects without ra/dec \(field F000: {t.num_rows} object\(s\)\); "
                                              "HATS partitions by sky position"):
        export_hats(out, tmp_path / "h")
    assert not (tmp_path / "h").exists()
    # the CLI prints it as one line and exits 1
    assert main(["export", str(out), "--hats", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err
    assert "objects without ra/dec (field F000" in err and "Traceback" not in err


def test_export_destination_and_missing_extra(exported, tmp_path, monkeypatch):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SurveyProcError, match=r"--hats .*busy exists and is not empty; pass --overwrite"):
        export_hats(exported["out"], busy)
    with pytest.raises(SurveyProcError, match=r"--hats .*busy is not a HATS collection .*refusing to delete it"):
        export_hats(exported["out"], busy, overwrite=True)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(SurveyProcError, match=r"holds no objects unit: nothing to export"):
        export_hats(tmp_path, tmp_path / "h2")
    monkeypatch.setitem(sys.modules, "lsdb", None)  # as if the extra were not installed
    with pytest.raises(SurveyProcError, match=r"needs the optional packages .*\(lsdb is not installed\): "
                                              r"pip install 'survey-proc\[hats\]'"):
        export_hats(exported["out"], tmp_path / "h3")


def test_run_with_hats_exports_when_the_run_is_complete(exported, grid_survey, tmp_path, capsys, monkeypatch):
    """``survey-proc run ... --hats DIR``: the export follows a complete run (here a resume with nothing left to do)."""
    import json

    out = tmp_path / "out"
    shutil.copytree(exported["out"], out)
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text("[crossmatch]\nregion_px = 80\n")
    args = ["run", str(grid_survey["store"]), "--out", str(out), "--tile-px", "160", "--halo-px", "16",
            "--workers", "1", "--quiet", "--no-evaluate", "--detector", "sep", "--photometry", "classical",
            "--config", str(cfg_file), "--hats", str(tmp_path / "hats")]
    assert main(args) == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["epochs_skipped_resume"] == 6  # the same configuration as the fixture's run
    assert run["hats_export"]["rows"] == exported["res"]["rows"] == 16
    assert run["hats_export"]["lightcurve_points"] == exported["res"]["lightcurve_points"]
    assert len(lsdb.open_catalog(tmp_path / "hats").compute()) == 16
    # refused before any work, with one line: an object-store output, or the extra missing
    capsys.readouterr()
    assert main([*args[:2], "--out", "s3://b/out", "--hats", str(tmp_path / "h2")]) == 1
    assert "--hats: the HATS export reads a local output, and --out s3://b/out is not local" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "hats_import", None)
    assert main([*args[:2], "--out", str(tmp_path / "o3"), "--hats", str(tmp_path / "h3")]) == 1
    assert "(hats-import is not installed): pip install 'survey-proc[hats]'" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()

"""The accuracy benchmark's --quick mode, end to end (simulate, run, evaluate, write)."""

from __future__ import annotations

import json

from benchmarks import accuracy


def test_accuracy_quick_writes_tables_plots_and_sane_numbers(tmp_path, capsys):
    assert accuracy.main(["--scenario", "dense", "--quick", "--out", str(tmp_path), "--detectors", "sep,pnet",
                          "--workers", "2"]) == 0
    base = tmp_path / "dense"
    res = json.loads((base / "accuracy.json").read_text())
    assert res["seed"] == 1001 and res["n_epochs"] == 4  # the held-out scenario, scaled down
    assert "no shipped model" in res["methods"]["pnet"]["skipped"]
    sep = res["methods"]["sep"]
    assert sep["run_status"] == "complete"
    assert 0.3 < sep["recall"] < 1.0 and sep["precision"] > 0.9 and 0 < sep["ap"] <= sep["recall"] + 1e-9
    # nothing measured beats the Cramér-Rao bound (well above the limit, where selection cannot bias it)
    for b in sep["phot_bins"]:
        if b["mag_n"] >= 20 and b["hi"] <= sep["mag_limit"] - 1:
            assert b["mag_nmad_over_crlb"] > 0.9, b
            assert b["pos_nmad_over_crlb"] > 0.9, b
    for png in ("completeness.png", "photometry_vs_crlb.png", "calibration.png", "precision_recall.png"):
        assert (base / png).stat().st_size > 10_000
    md = (base / "accuracy.md").read_text()
    assert "| sep |" in md and "NMAD/CRLB" in md
    assert 0.3 < sep["lightcurves"]["completeness"] <= 1.0
    assert "wrote" in capsys.readouterr().out


def test_throughput_quick(tmp_path, capsys):
    from benchmarks import throughput

    assert throughput.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "throughput-dense.json").read_text())
    stages = res["stages_one_process"]
    assert set(stages) == {"read", "background", "sep_extract", "block_total", "merge_write"}
    assert all(v["mpix_per_s_per_core"] > 0 for v in stages.values())
    # (no timing comparisons here: the suite runs in parallel, so timings are noisy)
    (row,) = res["scaling"]
    assert row["workers"] == 1 and row["speedup"] == 1.0 and row["epochs_per_s"] > 0
    assert 50 < res["peak_rss_mb"]["largest_worker"] < 4000 and row["worker_peak_rss_mb"] > 50
    assert "Mpix/s per core" in capsys.readouterr().out

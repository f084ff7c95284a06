"""The accuracy benchmark's --quick mode, end to end (simulate, run, evaluate, write)."""

from __future__ import annotations

import json

from benchmarks import accuracy


def test_accuracy_quick_writes_tables_plots_and_sane_numbers(tmp_path, capsys):
    methods = "sep,pnet" + (",sep+bpnn" if "sep+bpnn" in accuracy.AVAILABLE else "")
    assert accuracy.main(["--scenario", "dense", "--quick", "--out", str(tmp_path), "--detectors", methods,
                          "--workers", "2"]) == 0
    base = tmp_path / "dense"
    res = json.loads((base / "accuracy.json").read_text())
    assert res["seed"] == 1001 and res["n_epochs"] == 4  # the held-out scenario, scaled down
    sep, pn = res["methods"]["sep"], res["methods"]["pnet"]
    assert pn["run_status"] == "complete"
    for m in (sep, pn):
        assert 0 < m["recall_bright"] <= 1 and 0 < m["precision_bright"] <= 1
        assert m["f1_bright"] == (2 * m["recall_bright"] * m["precision_bright"]
                                  / (m["recall_bright"] + m["precision_bright"]))
        assert m["astrometry_snr20"]["n_stars"] > 20 and m["astrometry_snr20"]["rms_over_crlb_clipped"] > 0.9
    assert pn["recall_bright"] > sep["recall_bright"]  # the learned detector finds more of the crowded stars
    assert sep["run_status"] == "complete"
    assert 0.3 < sep["recall"] < 1.0 and sep["precision"] > 0.9 and 0 < sep["ap"] <= sep["recall"] + 1e-9
    # nothing measured beats the Cramér-Rao bound (well above the limit, where selection cannot bias it)
    for b in sep["phot_bins"]:
        if b["mag_n"] >= 20 and b["hi"] <= sep["mag_limit"] - 1:
            assert b["mag_nmad_over_crlb"] > 0.9, b
            assert b["pos_nmad_over_crlb"] > 0.9, b
    for png in ("completeness.png", "photometry_vs_crlb.png", "calibration.png", "precision_recall.png",
                "z_width_per_bin.png"):
        assert (base / png).stat().st_size > 10_000
    ph = sep["photometry"]
    assert ph["middle_range"]["n"] > 50 and 0 < ph["middle_range"]["median_abs_dmag"] < 0.2
    assert ph["isolated_snr20"]["n"] > 5 and ph["isolated_snr20"]["rms_over_crlb"] > 0.8
    assert ph["calibration_bins"] and all(b["z_std_clipped5"] > 0 for b in ph["calibration_bins"])
    if "sep+bpnn" in res["methods"]:  # the same detections, BPNN magnitudes with both uncertainties
        sb = res["methods"]["sep+bpnn"]
        assert sb["run_status"] == "complete" and sb["recall"] == sep["recall"]
        assert sb["photometry"]["middle_range"]["median_abs_dmag"] < 0.1
    md = (base / "accuracy.md").read_text()
    assert "| sep |" in md and "| pnet |" in md and "NMAD/CRLB" in md and "precision (measured mag)" in md
    assert 0.3 < sep["lightcurves"]["completeness"] <= 1.0
    assert "wrote" in capsys.readouterr().out


def test_throughput_quick(tmp_path, capsys):
    from benchmarks import throughput

    assert throughput.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "throughput-dense.json").read_text())
    stages = res["stages_one_process"]
    assert set(stages) == {"read", "background", "sep_extract", "block_total", "merge_write", "pnet_network",
                           "pnet_block_total"}
    assert all(v["mpix_per_s_per_core"] > 0 for v in stages.values())
    # (no timing comparisons here: the suite runs in parallel, so timings are noisy)
    row, row_pnet = res["scaling"]
    assert (row["detector"], row_pnet["detector"]) == ("sep", "pnet")
    assert row["workers"] == 1 and row["speedup"] == 1.0 and row["epochs_per_s"] > 0 and row_pnet["epochs_per_s"] > 0
    assert 50 < res["peak_rss_mb"]["largest_worker"] < 4000 and row["worker_peak_rss_mb"] > 50
    assert "Mpix/s per core" in capsys.readouterr().out

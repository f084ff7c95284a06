"""The accuracy benchmark's --quick mode, end to end (simulate, run, evaluate, write)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

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
    mid = ph["middle_range"]
    assert mid["n"] > 50 and 0 < mid["median_abs_dmag"] < 0.2
    # the floors: no method beats the isolated bound, and the crowded bound is above it
    assert 0 < mid["median_abs_dmag_at_crlb"] < mid["median_abs_dmag"]
    assert mid["n_crowded"] > 20 and mid["median_abs_dmag_at_crowded_crlb"] >= mid["median_abs_dmag_at_crlb"] * 0.9
    assert mid["median_abs_dmag_at_crowded_crlb"] < mid["median_abs_dmag_crowded_sample"]
    assert ph["isolated_snr20"]["n"] > 5 and ph["isolated_snr20"]["rms_over_crlb"] > 0.8
    for b in ph["isolated_snr20"]["bins"]:  # the flux scale removed: a ratio to the bound, reported per bin
        assert 0.5 < b["rms_over_crlb_epoch_offset_removed"] < 50, b
    assert ph["calibration_bins"] and all(b["z_std_clipped5"] > 0 for b in ph["calibration_bins"])
    if "sep+bpnn" in res["methods"]:  # the same detections, BPNN magnitudes with both uncertainties
        sb = res["methods"]["sep+bpnn"]
        assert sb["run_status"] == "complete" and sb["recall"] == sep["recall"]
        assert sb["photometry"]["middle_range"]["median_abs_dmag"] < 0.1
    i21 = sep["issue21"]  # the quick survey's 4 epochs: every zero point within a few 0.01 mag of the truth
    assert len(i21["zp_minus_truth"]) == 4 and i21["zp_minus_truth_max_abs"] < 0.05
    assert 15 < i21["saturation_mag"] < 19 and all(b["lo"] >= i21["saturation_mag"] for b in i21["bias_bins"])
    md = (base / "accuracy.md").read_text()
    assert "| sep |" in md and "| pnet |" in md and "NMAD/CRLB" in md and "precision (measured mag)" in md
    assert "Issue 21 criteria" in md
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


def test_issue21_summary_picks_the_worst_bin_between_saturation_and_snr10():
    """Bins brighter than saturation, fainter than S/N 10 or of < 20 stars are left out of the bias criterion."""
    bins = [{"lo": 15.0, "hi": 16.0, "mag_n": 50, "crlb_mag": 0.001, "mag_bias": 0.03},   # saturated
            {"lo": 17.0, "hi": 18.0, "mag_n": 50, "crlb_mag": 0.004, "mag_bias": -0.002},
            {"lo": 18.0, "hi": 19.0, "mag_n": 10, "crlb_mag": 0.01, "mag_bias": 0.02},    # too few stars
            {"lo": 19.0, "hi": 20.0, "mag_n": 80, "crlb_mag": 0.05, "mag_bias": -0.004},
            {"lo": 20.0, "hi": 21.0, "mag_n": 90, "crlb_mag": 0.2, "mag_bias": -0.05}]   # below S/N 10
    s = accuracy.issue21_summary(bins, np.array([0.004, -0.012, 0.001]), 16.3)
    assert [b["lo"] for b in s["bias_bins"]] == [17.0, 19.0]
    assert s["max_abs_bias"] == 0.004 and s["max_abs_bias_bin"] == [19.0, 20.0]
    assert s["zp_minus_truth_max_abs"] == 0.012 and s["zp_minus_truth_median"] == 0.001


def test_saturation_mag_is_where_a_centred_star_reaches_the_full_well():
    from survey_proc.simulate import load_scenario
    from survey_proc.simulate.psf import build_bank
    from survey_proc.simulate.stamps import render_stars

    scn = load_scenario("dense", {"size_px": 64})
    ep = pd.DataFrame({"seeing_fwhm_px": [1.9, 2.4], "sky_adu": [45.0, 45.0], "zeropoint": [27.0, 27.2]})
    m = accuracy.saturation_mag(scn, ep)
    # the epoch that saturates at the faintest magnitude: the sharper seeing, unless the zero point wins
    peaks = []
    for _, e in ep.iterrows():
        b = build_bank(scn.psf_profile, float(e["seeing_fwhm_px"]), beta=scn.moffat_beta, max_factor=1)
        f = 10 ** (-0.4 * (m - float(e["zeropoint"])))
        img = render_stars((31, 31), np.array([15.0]), np.array([15.0]), np.array([f]), b, 1e9)
        peaks.append(float(img.max()) + float(e["sky_adu"]))
    assert max(peaks) == pytest.approx(scn.saturation_adu, rel=0.01) and min(peaks) < scn.saturation_adu

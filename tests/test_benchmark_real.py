"""The real-data benchmark's quick mode (benchmarks/real.py) on a 200 x 200 SDSS crop around the star with spikes.

The crop holds one bright star with diffraction spikes and faint galaxies; its FWHM (1.1-1.2 px)
is below PNet's training range, so the pipeline's PNet block is detected with sep (the
domain check) while ``pnet_raw`` is PNet alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import real

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real"
pytestmark = pytest.mark.skipif(not (REAL / "sdss_r.fits.bz2").exists(),
                                reason="the real SDSS images ../shared/data/real/sdss_*.fits.bz2 are not here")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run (its JSON, tables and gallery in a temporary folder)."""
    pytest.importorskip("photutils")
    from survey_proc.detect.pnet import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.exists():
        pytest.skip("PNet's shipped weights are not installed")
    out = tmp_path_factory.mktemp("real")
    res = real.run(quick=True, out=out, plot_dir=out, root=REAL)
    res["_out"] = out
    return res


def test_quick_outputs_every_key(quick: dict[str, Any]) -> None:
    out = quick["_out"]
    assert (out / "real.json").exists() and (out / "real.md").exists() and (out / "real-sdss_crop.png").exists()
    (rs,) = quick["sets"]
    assert [f["frame"] for f in rs["frames"]] == ["sdss_g_crop", "sdss_r_crop", "sdss_i_crop"]
    for fr in rs["frames"]:
        assert set(fr["n_detections"]) == set(real.DETECTORS)
        assert set(fr["artefacts"]["per_detector"]) == set(real.DETECTORS)
    assert set(rs["repeatability"]) == set(real.DETECTORS)
    per = quick["summary"]["sdss_crop"]
    assert set(per) == set(real.DETECTORS)
    keys = {"n_detections", "fwhm_px", "domain", "recall_bins", "extra_per_star_r4", "excess_per_star_r4",
            "extra_per_star_rext", "excess_per_star_rext", "per_extended", "excess_per_extended", "repeatability",
            "repeatability_chance"}
    for d in per.values():
        assert keys <= set(d)
        assert len(d["recall_bins"]) == len(real.SNR_BINS)


def test_quick_injection_recovery(quick: dict[str, Any]) -> None:
    per = quick["summary"]["sdss_crop"]
    inj = quick["sets"][0]["frames"][1]["injection"]
    assert inj["psf"].startswith("empirical")  # enough isolated stars in the r crop
    for det in ("sep", "pnet", "pnet_raw", "dao"):
        bright = [b for b in per[det]["recall_bins"] if b["snr_lo"] >= 20]
        n = sum(b["n"] for b in bright)
        assert n >= 30
        recall = sum(b["recall"] * b["n"] for b in bright) / n
        assert recall >= 0.9, (det, recall)
        assert all(b["chance"] <= 0.2 for b in bright)
    # sep's total fluxes of injected stars (S/N >= 20) within 15 % of what was injected
    for b in per["sep"]["recall_bins"][2:]:
        assert 0.85 <= b["flux_ratio_median"] <= 1.15


def test_quick_domain_and_artefacts(quick: dict[str, Any]) -> None:
    per = quick["summary"]["sdss_crop"]
    # FWHM ~1.2 px: outside PNet's range, the pipeline's PNet block is sep's, the raw one is not
    assert all(d and "outside its training range" in d for d in per["pnet"]["domain"])
    assert not any(per["pnet_raw"]["domain"])
    assert per["pnet"]["n_detections"] == per["sep"]["n_detections"]
    for fr in quick["sets"][0]["frames"]:
        assert fr["artefacts"]["n_bright_stars"] >= 1
    for det, d in per.items():
        for k in ("extra_per_star_r4", "extra_per_star_rext", "excess_per_star_rext"):
            assert d[k] is not None and math.isfinite(d[k]), (det, k)
    # what the pipeline runs puts at most 1 extra detection on the bright star with spikes (within 4 FWHM)
    assert per["pnet"]["extra_per_star_r4"] <= 1.0
    assert per["sep"]["extra_per_star_r4"] <= 1.0


def test_quick_repeatability_above_chance(quick: dict[str, Any]) -> None:
    rep = quick["sets"][0]["repeatability"]
    for det, r in rep.items():
        assert r["n"] > 100
        assert r["share"] > r["chance"] + 0.3, det
    assert rep["sep"]["share"] >= 0.7


def test_an_injection_that_reaches_the_saturation_level_is_set_apart() -> None:
    import numpy as np

    img = np.full((40, 40), 100.0, np.float32)
    img[10, 10] = 2990.0  # a core just under the level
    img[30, 21] = 3000.0  # one pixel off the centre, at the level
    xy = np.array([[10.2, 9.8], [20.4, 30.0], [5.0, 30.0]])
    np.testing.assert_array_equal(real.saturated_injections(img, xy, 2997.16), [False, True, False])
    assert not real.saturated_injections(img, xy, float("inf")).any()  # no saturation level: none

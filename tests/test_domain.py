"""The domain check (survey_proc.detect.domain): epochs whose seeing lies outside the learned models' training
range are detected with sep and measured without the BPNN, and the run says so."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from survey_proc.detect import domain
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.simulate import load_scenario, simulate_survey
from tests.conftest import CLEAN, planted_stars, run_config


def _survey(tmp_path, fwhm_px: float, size: int = 192) -> dict:
    out = tmp_path / f"fwhm{fwhm_px:g}.zarr"
    scn = load_scenario("dense", {**CLEAN, "size_px": size, "n_epochs": 3, "psf_fwhm_px": fwhm_px, "jitter_px": 0.3,
                                  "seeing_scatter": 0.03,
                                  "seed": 41})
    rng = np.random.default_rng(3)
    step = max(24, int(6 * fwhm_px))
    rows = [{"x": step / 2 + step * i + rng.uniform(-0.5, 0.5), "y": step / 2 + step * j + rng.uniform(-0.5, 0.5),
             "mag": (17.5 if fwhm_px > 2 else 19.5) + 0.3 * ((i + j) % 4)}
            for i in range(size // step) for j in range(size // step)]
    simulate_survey(scn, out, workers=0, stars=planted_stars(scn, rows), progress=False)
    return {"store": out, "n_stars": len(rows)}


def test_card_ranges_and_the_message():
    card = {"training": {"tile": {"fwhm_px": [1.3, 5.0]}}}
    rng = domain.card_fwhm_range(card, "training", "tile", "fwhm_px")
    assert rng == (1.3, 5.0) and domain.card_fwhm_range(card, "data", "tile", "fwhm_px") is None
    assert domain.outside(9.0, rng) and domain.outside(1.0, rng) and not domain.outside(2.5, rng)
    assert domain.outside(1.40, rng) and not domain.outside(1.50, rng)  # 1.3 px measures 1.47 px on the pixels
    assert not domain.outside(50.0, None)
    assert domain.describe("pnet", 9.104, rng, "detected with sep") == (
        "pnet: FWHM 9.10 px outside its training range 1.3-5 px (PSF before the pixel); detected with sep")


@pytest.mark.parametrize("fwhm_px", [9.0, 1.0])
def test_an_epoch_outside_the_training_seeing_is_detected_with_sep_and_recorded(tmp_path, client, fwhm_px):
    from survey_proc.report import summary_lines

    s = _survey(tmp_path, fwhm_px)
    out = tmp_path / "out"
    run = run_pipeline(run_config(s["store"], out, tile_px=192, halo_px=32 if fwhm_px > 5 else 16,
                                  detector="pnet", bpnn={"enabled": True}, reference="none",
                                  crossmatch={"region_px": 192, "min_epochs": 2}), client=client)
    assert run["status"] == "complete", run["failures"]
    acts = sorted(run["domain_actions"], key=lambda a: a["epoch"])
    assert [a["epoch"] for a in acts] == [0, 1, 2]
    ep = pd.read_parquet(out / "epochs.parquet")
    for a, (_, row) in zip(acts, ep.iterrows(), strict=True):
        f = row["fwhm_px"]
        assert (f > 5.0) if fwhm_px > 5 else (f < 1.47)
        assert row["domain"] == a["action"]
        assert re.fullmatch(r"pnet: FWHM \d+\.\d\d px outside its training range 1\.3-5 px \(PSF before the pixel\); "
                            r"detected with sep; bpnn: FWHM \d+\.\d\d px outside its training range 1\.3-5 px \(PSF "
                            r"before the pixel\); sep's photometry kept \(1 of 1 block\(s\)\)", a["action"])
    # sep found the planted stars (PNet on a 9-px PSF broke them up; on 1 px it is untested)
    src = pd.read_parquet(out / "sources")
    per_epoch = src.groupby("epoch").size()
    assert (per_epoch >= 0.9 * s["n_stars"]).all() and (per_epoch <= 1.2 * s["n_stars"]).all()
    assert (src["mag_err_epistemic"] == 0).all()  # no BPNN on these epochs
    lines = "\n".join(summary_lines(json.loads((out / "run.json").read_text())))
    assert "outside a model's training range: 3 epoch(s), e.g. field F000 epoch " in lines

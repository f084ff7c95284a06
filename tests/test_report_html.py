"""``survey-proc report``: the HTML page of a real pipeline run on a small simulated survey with variables."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from survey_proc import vocab as F
from survey_proc.cli import main
from survey_proc.distributed.pipeline import run_pipeline
from survey_proc.errors import SurveyProcError
from survey_proc.report_html import (
    depth_from_noise,
    limiting_mag,
    periodic_candidates,
    plot_lightcurve,
    write_report,
)
from survey_proc.simulate import load_scenario, simulate_survey
from tests.conftest import CLEAN, planted_stars, run_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, client) -> dict:
    """24 epochs over 0.96 d of 128x128 px: constant stars from 18.5 to 26 mag (the faintest are forced in some
    epochs) and two variables."""
    t = time.perf_counter()
    root = tmp_path_factory.mktemp("report")
    store = root / "rep.zarr"
    scn = load_scenario("dense", {**CLEAN, "size_px": 128, "n_epochs": 24, "cadence_s": 3600.0, "psf_fwhm_px": 2.0,
                                  "jitter_px": 0.3, "seed": 31})
    rng = np.random.default_rng(3)
    rows = [{"x": 12.0 + 17 * i + rng.uniform(-1, 1), "y": 12.0 + 17 * j + rng.uniform(-1, 1),
             "mag": 18.5 + 0.22 * (i * 6 + j)} for i in range(6) for j in range(6) if (i, j) not in ((0, 0), (5, 5))]
    rows += [{"x": 12.0, "y": 12.0, "mag": 19.0, "var_class": "eclipsing_binary", "period": 0.3, "t0": 61000.05,
              "depth": 0.5, "duration": 0.04, "secondary_ratio": 0.3, "ellipsoidal": 0.0},
             {"x": 97.0, "y": 97.0, "mag": 19.2, "var_class": "pulsator", "period": 0.35, "t0": 61000.1,
              "amplitude": 0.7}]
    stars = planted_stars(scn, rows)
    simulate_survey(scn, store, workers=0, stars=stars, progress=False)
    out = root / "out"
    cfg = run_config(store, out, tile_px=128, halo_px=16, reference="none",
                     crossmatch={"region_px": 128, "min_epochs": 10}, classify={"min_points": 10})
    run = run_pipeline(cfg, client=client)
    assert run["status"] == "complete"
    return {"store": store, "out": out, "stars": stars, "run": run, "setup_s": time.perf_counter() - t}


def _referenced_pngs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+\.png)"', page)


def test_report_page_holds_every_plot(report_run, tmp_path):
    out = report_run["out"]
    t = time.perf_counter()
    rep = write_report(out, top=3)
    wall = time.perf_counter() - t
    assert rep.html == out / "report" / "index.html" and rep.html.is_file()
    page = rep.html.read_text()
    refs = _referenced_pngs(page)
    names = {p.name for p in rep.plots}
    # every plot is referenced once, exists, is a real PNG and is not blank
    assert sorted(refs) == sorted(names) and len(refs) == len(set(refs))
    assert set(refs) == {p.name for p in (out / "report").glob("*.png")}
    for name in refs:
        data = (out / "report" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 15_000, name
    assert {"epochs.png", "truth.png", "calibration.png", "skymap.png"} <= names
    assert rep.simulated and rep.sections == ["summary", "epochs", "truth", "calibration", "skymap", "variables"]
    # the top three by p_periodic among objects with a period, each with a raw and folded light curve
    obj = pd.read_parquet(out / "objects")
    top = periodic_candidates(obj, 3)
    assert len(top) == 3 and top["period"].gt(0).all()
    assert sorted(n for n in names if n.startswith("variable-")) == sorted(f"variable-{i}.png"
                                                                            for i in top["object_id"])
    assert obj["p_periodic"].notna().sum() >= 30  # (which ones lead is the classifier's business, not the page's)
    for oid in top["object_id"]:
        assert f'<img src="variable-{oid}.png"' in page and f"<td>{oid}</td>" in page
    # forced points exist in this run and the page counts them
    lc = pd.read_parquet(out / "lightcurves")
    assert ((lc["flags"] & F.FORCED) != 0).sum() > 0 and rep.numbers["z_nmad_forced"] > 0
    # the figures the page quotes: per-epoch numbers, truth, calibration
    assert len(obj) == rep.numbers["objects"]
    assert 23.0 < rep.numbers["depth_mag_median"] < 27.0
    n_det = pd.read_parquet(out / "sources", columns=["epoch"]).groupby("epoch").size()
    assert rep.numbers["detections_median"] == pytest.approx(float(np.median(n_det)))
    n_bright = int((report_run["stars"]["mag"] < 23).sum())
    assert rep.numbers["truth_matched"] >= 10 * n_bright  # 10 sampled epochs, every bright star found
    assert 0.5 < rep.numbers["z_nmad_detected"] < 2.0
    assert "Store <code>" in page and "simulated: truth found beside it" in page
    assert wall < 20


def test_report_cli_dest_and_errors(report_run, tmp_path, capsys):
    dest = tmp_path / "page"
    assert main(["report", str(report_run["out"]), "--dest", str(dest), "--top", "1"]) == 0
    assert "index.html" in capsys.readouterr().out
    assert len(list(dest.glob("variable-*.png"))) == 1 and (dest / "index.html").is_file()
    # a directory that is not a run's output: one clear line, exit 1
    assert main(["report", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "run.json not found" in err and "Traceback" not in err
    with pytest.raises(SurveyProcError, match=r"run.json not found: .* is not the output of `survey-proc run`"):
        write_report(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{not json")
    with pytest.raises(SurveyProcError, match=r"run.json cannot be read .*re-run `survey-proc run`"):
        write_report(tmp_path / "bad")


def test_report_without_truth_says_so(report_run, tmp_path):
    """A store whose truth is gone (or a real survey): no truth section, classifier constants for z."""
    rep = write_report(report_run["out"], tmp_path / "nt", store=tmp_path / "elsewhere.zarr", top=1)
    page = rep.html.read_text()
    assert not rep.simulated and "truth" not in rep.sections and "truth.png" not in page
    assert "no truth found beside it" in page
    assert {"epochs.png", "calibration.png", "skymap.png"} <= {p.name for p in rep.plots}


def test_depth_estimators():
    rng = np.random.default_rng(0)
    mag = rng.uniform(17, 26, 2000)
    err = 0.02 * 10 ** (0.4 * (mag - 21.0))  # errors grow by 10^(0.4 dm)
    expected = 21.0 + 2.5 * np.log10(F.MAG_PER_FLUX / 5 / 0.02)
    assert limiting_mag(mag, err) == pytest.approx(expected, abs=1e-6)
    assert np.isnan(limiting_mag(mag[:5], err[:5]))
    # background-limited: S/N 5 with NEA = 4 pi sigma^2 at rms 10 ADU, FWHM 2.3548 px: flux = 5 * 10 * sqrt(4 pi)
    d = depth_from_noise(np.array([30.0]), np.array([10.0]), np.array([2.3548200450309493]))
    assert d[0] == pytest.approx(30.0 - 2.5 * np.log10(50 * np.sqrt(4 * np.pi)))
    assert np.isnan(depth_from_noise(np.array([30.0]), np.array([0.0]), np.array([2.0]))[0])


def test_lightcurve_plot_draws_forced_points_apart(tmp_path):
    mjd = 61000.0 + np.arange(40) * 0.02
    mag = 20.0 + 0.5 * np.sin(2 * np.pi * mjd / 0.3)
    flags = np.zeros(40, np.int32)
    flags[::4] = F.FORCED | F.EDGE  # forced points, two of them without a magnitude (negative flux)
    mag[[0, 8]] = np.nan
    lc = pd.DataFrame({"mjd": mjd, "mag": mag, "mag_err": np.full(40, 0.02), "flags": flags})
    counts = plot_lightcurve(lc, 0.3, float("nan"), tmp_path / "v.png", title="t")
    assert counts == {"detected": 30, "forced": 8, "forced_nan": 2}
    data = (tmp_path / "v.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 15_000
    # the forced colour is in the picture, and without forced points it is not
    from matplotlib.image import imread

    def has_orange(p):
        img = imread(p)[..., :3]
        return bool((np.abs(img - np.array([0xE0, 0x7B, 0x00]) / 255).sum(axis=-1) < 0.05).any())

    assert has_orange(tmp_path / "v.png")
    plot_lightcurve(lc[(lc["flags"] & F.FORCED) == 0], 0.3, 61000.0, tmp_path / "d.png")
    assert not has_orange(tmp_path / "d.png")


def _chromium() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report_run):
    """Open the page in headless Chromium (playwright + Debian's chromium) and keep a screenshot."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium: apt-get install chromium (playwright's own browser download needs the internet)")
    rep = write_report(report_run["out"], top=4)
    shots = Path(__file__).resolve().parents[1] / "benchmarks" / "plots"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(rep.html.as_uri())
        # every image loaded and decoded with a real size
        sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
        assert len(sizes) == len(rep.plots) and all(c and w > 200 and h > 150 for c, w, h in sizes), sizes
        headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
        assert any("Epochs" in h for h in headings) and any("Periodic variables" in h for h in headings)
        page.screenshot(path=str(shots / "report-test-top.png"))
        page.screenshot(path=str(shots / "report-test-full.png"), full_page=True)
        browser.close()
    for name in ("report-test-top.png", "report-test-full.png"):
        assert (shots / name).read_bytes()[:8] == PNG_MAGIC and (shots / name).stat().st_size > 50_000

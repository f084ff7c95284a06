"""Stored WCS text read liberally: newline-separated or 80-character cards; the rest a clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from astropy.wcs import WCS

from survey_proc import store
from survey_proc.catalog.astrometry import WcsParseError, header_from_text, parse_wcs
from survey_proc.errors import StoreValidationError, SurveyProcError
from survey_proc.simulate import load_scenario, simulate_survey
from survey_proc.simulate.wcs import shift_wcs_text, wcs_from_text


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval, w.wcs.crpix = [150.0, 2.0], [50.0, 40.0]
    w.wcs.cd = [[-1e-4, 2e-6], [2e-6, 1e-4]]
    return w


NEWLINES = _wcs().to_header(relax=True).tostring(sep="\n")
CARDS_80 = _wcs().to_header_string()  # 80-character cards, no newlines, END and padding: what broke the run
FORMS = {
    "newline-separated": NEWLINES,
    "80-character cards": CARDS_80,
    "80-character cards without END": CARDS_80.rstrip()[:-3].rstrip(),
    "trailing spaces and blank lines": "\n".join(line + "    " for line in NEWLINES.split("\n")) + "\n\n",
    "CRLF": NEWLINES.replace("\n", "\r\n"),
    "non-standard cards": ("CTYPE1 = RA---TAN\nCTYPE2 = DEC--TAN\nCRPIX1=50\nCRPIX2 = 40 / ref pixel\n"
                           "crval1 = 150.0\nCRVAL2 = 2.0\nCD1_1 = -1.0D-4\nCD1_2 = 2e-6\nCD2_1 = 2e-6\nCD2_2 = 1e-4\n"
                           "DATE-OBS = '2020/01/01'\nHISTORY made by hand"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_gives_the_same_sky(form):
    x, y = np.array([0.0, 10.0, 99.0]), np.array([0.0, 70.0, 5.0])
    want = _wcs().all_pix2world(x, y, 0)
    got = parse_wcs(FORMS[form]).all_pix2world(x, y, 0)
    np.testing.assert_allclose(got, want, atol=1e-10)
    np.testing.assert_allclose(wcs_from_text(FORMS[form]).all_pix2world(x, y, 0), want, atol=1e-10)


def test_shift_and_empty_text():
    h = header_from_text(shift_wcs_text(CARDS_80, 2.0, -3.0))
    assert (h["CRPIX1"], h["CRPIX2"]) == (52.0, 37.0)
    assert parse_wcs("") is None and parse_wcs("   \n") is None and wcs_from_text("") is None


@pytest.mark.parametrize("text, match", [
    ("not a header at all",
     r"field 'F000' epoch 3: the stored WCS has no celestial axes \(no CTYPE1/2 such as RA---TAN/DEC--TAN among 1 "
     r"card\(s\) read\); the store's wcs entries are FITS header cards separated by newlines, or 80-character cards "
     r"run together .* set it to \"\" \(no WCS\)"),
    (NEWLINES.replace("RA---TAN", "RA---XYZ").replace("DEC--TAN", "DEC--XYZ"),
     r"field 'F000' epoch 3: the stored WCS cannot be parsed \(InconsistentAxisTypesError: .*Unrecognized projection "
     r"code \(XYZ in CTYPE1\)\.\); .*Re-ingest the exposure, fix the entry, or set it to \"\" \(no WCS\)"),
    ("CTYPE1  = 'RA---TAN'\nCTYPE2  = 'DEC--TAN'\nCD1_1   = 'x'",
     r"field 'F000' epoch 3: the stored WCS lacks a number for CRPIX1, CRPIX2, CRVAL1, CRVAL2, CDELT1 or CD1_\*, "
     r"CDELT2 or CD2_\* \(astropy would silently use 0 or 1 deg/px\)"),
    ("CTYPE1  = 'RA---TAN'\nCRVAL1 = 'unterminated\nCRPIX1 ! 3",
     r"field 'F000' epoch 3: the WCS card 'CRPIX1 ! 3' cannot be read; the store's wcs entries are FITS header cards"),
])
def test_an_unusable_wcs_is_a_clear_error(text, match):
    with pytest.raises(WcsParseError, match=match):
        parse_wcs(text, "field 'F000' epoch 3")
    assert issubclass(WcsParseError, ValueError) and issubclass(WcsParseError, SurveyProcError)


# ---------------------------------------------------------------- stores and runs

@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wcs") / "w.zarr"
    scn = load_scenario("dense", {"size_px": 128, "n_epochs": 3, "seed": 12, "psf_oversample": 5,
                                  "star_density_per_px2": 0.02, "psf_fwhm_px": 2.2})
    simulate_survey(scn, out, workers=0, progress=False)
    return out


def _rewrite(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    g = zarr.open_group(str(dst), mode="r+")["fields/F000"]
    texts = [str(t) for t in g["wcs"][:]]
    g["wcs"][:] = np.asarray([fn(e, t) for e, t in enumerate(texts)], dtype=object)
    g.attrs["reference_wcs"] = fn(-1, str(g.attrs["reference_wcs"]))
    return dst


def _as_80_cards(text: str) -> str:
    return header_from_text(text).tostring()  # 80-character cards, no separator, END + padding


def test_validate_names_the_field_and_epoch_of_a_bad_wcs(sim, tmp_path):
    bad = "CTYPE1  = 'RA---TAN'\nCTYPE2  = 'DEC--TAN'"
    st = _rewrite(sim, tmp_path / "b.zarr", lambda e, t: bad if e == 1 else _as_80_cards(t))
    assert store.validate_store(st, epoch_checks=False) == []  # the reference frame is fine: the run goes on
    with pytest.raises(StoreValidationError, match=r"field 'F000', variable 'wcs' at epoch 1: the stored WCS lacks "
                                                   r"a number for CRPIX1"):
        store.validate_store(st)
    # a bad reference frame stops the run at its start, named
    zarr.open_group(str(st), mode="r+")["fields/F000"].attrs["reference_wcs"] = "garbage"
    with pytest.raises(StoreValidationError, match=r"field 'F000', attribute 'reference_wcs' \(the field's reference "
                                                   r"frame\): the stored WCS has no celestial axes"):
        store.validate_store(st, epoch_checks=False)


def test_a_store_of_80_character_wcs_cards_runs_and_a_bad_epoch_wcs_is_left_out(sim, tmp_path, client):
    from survey_proc.distributed.pipeline import run_pipeline
    from tests.conftest import run_config

    bad = NEWLINES.replace("RA---TAN", "RA---XYZ").replace("DEC--TAN", "DEC--XYZ")
    st = _rewrite(sim, tmp_path / "c.zarr", lambda e, t: bad if e == 2 else _as_80_cards(t))
    assert "\n" not in store.read_epoch_table(st, "F000")["wcs"][0]
    settings = dict(tile_px=128, halo_px=24, reference="none", classify={"enabled": False},
                    crossmatch={"region_px": 128, "min_epochs": 2}, retries=0)
    run = run_pipeline(run_config(st, tmp_path / "out", **settings), client=client)
    assert run["status"] == "incomplete"
    assert [f["epoch"] for f in run["failures"]] == [2]
    with pytest.raises(SurveyProcError, match=r"field F000 epoch 2: the stored WCS is unusable \(the stored WCS "
                                              r"cannot be parsed \(InconsistentAxisTypesError"):
        raise SurveyProcError(run["failures"][0]["error"])
    src = pd.read_parquet(tmp_path / "out" / "sources" / "field=F000" / "epoch=0.parquet")
    assert len(src) > 50 and src["ra"].notna().all()

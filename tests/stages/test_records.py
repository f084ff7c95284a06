"""stages/records.py: the epoch record and its footer form."""

from __future__ import annotations

from pathlib import Path

import pytest

from survey_proc.catalog import calibrate as cal
from survey_proc.stages.records import EpochRecord

ROOT = Path(__file__).resolve().parents[2]


def _record(**kw) -> EpochRecord:
    base = dict(field="F000", epoch=4, mjd=60000.5, airmass=1.2, exptime_s=300.0, n_sources=812, n_duplicates=3,
                fwhm_px=2.1, apcorr=1.08, n_apcorr_stars=40, bkg_adu=210.0, rms_adu=9.5, bad_px=12, fallback=None,
                has_wcs=True, zp=cal.ZeroPoint(30.9, 0.004, 0.02, 88, 120, "fit"), fingerprint="abc")
    return EpochRecord(**{**base, **kw})


def test_epoch_record_round_trips_through_its_footer_form_and_keeps_unknown_keys():
    r = _record(registration={"reference_epoch": 2, "rms_px": 0.03, "n_stars": 50})
    d = r.to_dict()
    assert d["zp"] == {"zp": 30.9, "zp_err": 0.004, "scatter": 0.02, "n_used": 88, "n_candidates": 120,
                       "status": "fit", "absolute": True}
    assert "apcorr_source" not in d and "wcs_refinement" not in d  # optional keys only when set
    assert EpochRecord.from_dict(d) == r
    old = {**d, "some_future_key": 5}
    old.pop("has_wcs")
    back = EpochRecord.from_dict(old)
    assert back.has_wcs and back.extra == {"some_future_key": 5} and back.to_dict()["some_future_key"] == 5
    assert r.calibrated and not r.needs_model_zp
    pending = r.with_(zp=cal.ZeroPoint.pending())
    assert not pending.calibrated and pending.needs_model_zp and pending.zp.status is cal.ZpStatus.PENDING


def test_epoch_summary_row_has_the_epochs_table_columns():
    row = _record(apcorr_source="field model").summary()
    assert list(row) == ["field", "epoch", "band", "mjd", "airmass", "exptime_s", "n_sources", "fwhm_px", "apcorr",
                         "apcorr_n_stars", "apcorr_from_model", "bkg_adu", "rms_adu", "zp", "zp_err", "zp_scatter",
                         "zp_n_stars", "zp_status", "zp_absolute", "fallback", "domain"]
    assert row["apcorr_from_model"] is True and row["zp_status"] == "fit" and row["fallback"] == ""


def test_an_epoch_with_its_psfex_correction_keeps_it_and_a_poor_moffat_epoch_takes_the_field_line():
    from survey_proc.stages.calibrate import apcorr_from_field_model

    rich = {e: _record(epoch=e, fwhm_px=f, apcorr=a, n_apcorr_stars=60, apcorr_source="measured")
            for e, (f, a) in enumerate([(2.0, 1.10), (2.5, 1.15), (3.0, 1.20), (3.5, 1.25), (4.0, 1.30)])}
    poor_moffat = _record(epoch=10, fwhm_px=2.25, apcorr=1.312, n_apcorr_stars=0, apcorr_source="model Moffat(3)")
    poor_psfex = _record(epoch=11, fwhm_px=2.25, apcorr=1.17, n_apcorr_stars=0,
                         apcorr_source="psfex c4d_x-psfex.fits[S4] at image centre (21.5, 21.5)")
    line_epoch = _record(epoch=12, fwhm_px=2.25, apcorr=1.125, n_apcorr_stars=0, apcorr_source="field model")
    assert poor_psfex.apcorr_from_psf_model and not poor_moffat.apcorr_from_psf_model
    line, new = apcorr_from_field_model({**rich, 10: poor_moffat, 11: poor_psfex, 12: line_epoch})
    assert line["n"] == 5
    assert set(new) == {10}  # the PSFEx epoch keeps its own; the one already on the line is not redone
    assert new[10] == pytest.approx(1.125, abs=1e-9)

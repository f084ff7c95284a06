"""The classifier's training curves (training/classifier_data.py): noise added in flux, as the photometry makes it."""

from __future__ import annotations

import numpy as np

from training.classifier_data import Templates, synthesize


def _templates(n: int = 40, n_t: int = 300, seed: int = 0) -> Templates:
    """Constant stars of 20-26.5 mag whose points scatter in flux (forced points of the faint ones near zero)."""
    rng = np.random.default_rng(seed)
    mag0 = np.linspace(20.0, 26.5, n)
    sig_rel = 0.005 * 10 ** (0.4 * (mag0 - 20.0))  # relative flux error: 0.5 % at 20 mag, ~2 at 26.5 mag
    f = 1.0 + rng.standard_normal((n, n_t)) * sig_rel[:, None]
    ef = np.broadcast_to(sig_rel[:, None], (n, n_t)).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        mag = np.where(f > 0, mag0[:, None] - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)
        err = np.where(f > 0, ef / (0.4 * np.log(10) * np.where(f > 0, f, 1.0)), np.nan)
    med = np.nanmedian(mag, 1)
    res = mag - med[:, None]
    sig_mag = 1.4826 * np.nanmedian(np.abs(res - np.nanmedian(res, 1)[:, None]), 1)
    return Templates(np.arange(n), np.linspace(60000.0, 60003.47, n_t), mag, err, np.zeros((n, n_t), np.int32),
                     med, sig_mag)


def test_faint_forced_points_do_not_make_absurd_magnitudes():
    tpl = _templates()
    assert np.nanmax(tpl.mag_err) > 50  # a forced point near zero flux: a huge magnitude error
    arrays, meta = synthesize(tpl, 2000, seed=1)
    mag, err = arrays["mag"], arrays["mag_err"]
    ok = np.isfinite(mag)
    assert ok.mean() > 0.8
    # in magnitudes the noise made the old synthesis produce points at |mag| ~ 1e5; in flux it cannot
    assert np.nanmax(mag) < 40 and np.nanmin(mag) > 15
    assert np.all(err[ok] > 0)
    # the quoted error of a kept point is the flux error over the flux, as the pipeline writes it
    f = 10 ** (-0.4 * (mag - meta["mag"].to_numpy()[:, None]))
    assert np.nanmedian(err * f) < 1.0


def test_the_signal_multiplies_the_star_and_the_real_noise_is_the_templates_own():
    tpl = _templates(seed=3)
    arrays, meta = synthesize(tpl, 600, seed=2)
    real = (meta["noise"] == "real").to_numpy() & (meta["var_class"] == "pulsator").to_numpy()
    assert real.sum() > 10
    from survey_proc.simulate.variables import delta_mag

    dm = delta_mag(meta.reset_index(drop=True), tpl.mjd)
    i = np.flatnonzero(real)
    rows = meta["template"].to_numpy()[i]
    f_tpl = 10 ** (-0.4 * (tpl.mag[rows] - tpl.mag_median[rows][:, None]))
    f_out = 10 ** (-0.4 * (arrays["mag"][i] - meta["mag"].to_numpy()[i][:, None]))
    expect = 10 ** (-0.4 * dm[i]) + (f_tpl - 1.0)
    both = np.isfinite(f_out) & np.isfinite(f_tpl)
    np.testing.assert_allclose(f_out[both], expect[both], rtol=1e-9, atol=1e-9)

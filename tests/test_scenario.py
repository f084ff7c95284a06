"""Scenario presets, overrides and their error messages."""

from __future__ import annotations

import pytest

from survey_proc.errors import ConfigError
from survey_proc.simulate.scenario import (
    PRESETS,
    load_scenario,
    parse_overrides,
    scenario_from_dict,
)


def test_presets_differ_as_documented():
    dense, sparse = load_scenario("dense"), load_scenario("sparse")
    assert set(PRESETS) == {"dense", "sparse"}
    assert dense.site == "space" and sparse.site == "ground"
    assert 1.5 <= dense.psf_fwhm_px <= 2.0 and 3.0 <= sparse.psf_fwhm_px <= 4.0
    assert dense.mag_max >= 26 and sparse.mag_min == 13
    assert dense.star_density_per_px2 == pytest.approx(0.025)


def test_overrides_are_typed():
    o = parse_overrides(["psf_fwhm_px=2.2", "n_epochs=50", "night_only=false", "transit_depth=0.01,0.03"])
    assert o == {"psf_fwhm_px": 2.2, "n_epochs": 50, "night_only": False, "transit_depth": (0.01, 0.03)}
    scn = load_scenario("sparse", o)
    assert scn.n_epochs == 50 and scn.transit_depth == (0.01, 0.03)
    assert scenario_from_dict(scn.to_dict()) == scn


def test_toml_scenario_with_base(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('base = "sparse"\nsize_px = 300\nseed = 9\n')
    scn = load_scenario(str(f), {"n_epochs": 7})
    assert (scn.name, scn.size_px, scn.seed, scn.n_epochs, scn.site) == ("mine", 300, 9, 7, "ground")


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("dense", {"bogus": 1}, r"unknown scenario parameter 'bogus'; known parameters: band, "),
        ("dense", {"n_epochs": "many"}, r"scenario parameter 'n_epochs': cannot read 'many' as int"),
        ("dense", {"n_epochs": 0}, r"scenario 'dense': parameter 'n_epochs' must be >= 1, got 0"),
        ("dense", {"psf_oversample": 4}, r"parameter 'psf_oversample' must be odd and >= 3, got 4"),
        ("dense", {"mag_max": 10.0}, r"parameter 'mag_max' \(10.0\) must exceed mag_min \(16.5\)"),
        ("dense", {"cadence_s": 100.0}, r"parameter 'cadence_s' \(100.0 s\) is shorter than exptime_s \(300.0 s\)"),
        ("dense", {"psf_profile": "airy"}, r"parameter 'psf_profile' must be 'moffat' or 'kolmogorov', got 'airy'"),
        ("dense", {"frac_pulsator": 0.9, "frac_transit": 0.9}, r"variable fractions must be >= 0 and sum to <= 1"),
        ("galaxy", {}, r"unknown scenario 'galaxy': use a preset \(dense, sparse\) or a .toml file"),
        ("nofile.toml", {}, r"scenario file nofile.toml does not exist"),
    ],
)
def test_bad_scenarios_are_named(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_scenario(name, overrides)


def test_bad_override_syntax_and_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'seed' is not of the form key=value"):
        parse_overrides(["seed"])
    f = tmp_path / "bad.toml"
    f.write_text("size_px = [")
    with pytest.raises(ConfigError, match=r"scenario file .*bad.toml is not valid TOML"):
        load_scenario(str(f))
    f.write_text('base = "galaxy"\n')
    with pytest.raises(ConfigError, match=r"base 'galaxy' is not a preset"):
        load_scenario(str(f))

"""The detector's realistic training scenes: negatives carry no target, noise stays normalised."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training.detector_assets import AssetConfig, build_assets
from training.detector_scenes import SceneConfig, SceneGenerator, load_library

QUIET = dict(frac_galaxies=0.0, frac_bright_star=0.0, frac_nebula=0.0, frac_grain=0.0, frac_correlated=0.0,
             hot_pixels_per_tile=0.0, cosmics_per_tile=0.0, frac_bad_column=0.0, frac_crowded=0.0,
             density_per_px2=(1e-9, 2e-9), bkg_error_sigma=0.0, noise_scale_error=0.0)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> list:
    path = tmp_path_factory.mktemp("assets") / "lib.npz"
    np.savez_compressed(path, **build_assets(AssetConfig(n_psf=3, galaxies_per_psf=3, fwhm_px=(1.5, 4.0)), seed=5))
    return load_library(path)


def test_library_psfs_are_unit_flux_and_in_range(library: list) -> None:
    for p in library:
        assert 1.5 <= p.fwhm_px <= 4.0
        # the centred stamp is the PSF truncated to the stamp (not renormalised): its sum is 1 - the missing flux
        centred = p.bank.banks[-1][-p.bank.t_min, -p.bank.t_min].sum()
        assert centred == pytest.approx(1.0 - p.bank.missing_flux[-1], abs=1e-6) and centred > 0.99
        assert p.galaxies.sum(axis=(1, 2)) == pytest.approx(1.0, abs=2e-3)
        assert p.bright.sum() == pytest.approx(1.0, abs=0.05)  # tapered: at most a few per cent less


def test_empty_tiles_have_unit_noise_and_no_targets(library: list) -> None:
    gen = SceneGenerator(SceneConfig(**QUIET), 3, library)
    b = gen.batch(16)
    assert np.std(b["image"]) == pytest.approx(1.0, abs=0.05)
    assert b["pos"].sum() == 0


@pytest.mark.parametrize("feature", ["galaxies", "grain", "correlated", "nebula"])
def test_negatives_add_light_or_structure_but_no_targets(library: list, feature: str) -> None:
    cfg = SceneConfig(**{**QUIET, f"frac_{feature}": 1.0})
    if feature == "galaxies":
        cfg = replace(cfg, galaxies_per_px2=(4e-3, 4.1e-3), galaxy_mag_rel=(-7.0, -5.0))
    b = SceneGenerator(cfg, 4, library).batch(8)
    assert b["pos"].sum() == 0
    img = b["image"][:, 0]
    if feature == "galaxies":  # bright galaxies: many pixels far above the noise
        assert (img > 10).sum() > 8 * 20
    elif feature == "correlated":  # neighbouring pixels correlate
        r = np.corrcoef(img[:, :, :-1].ravel(), img[:, :, 1:].ravel())[0, 1]
        assert r > 0.3
    elif feature == "grain":  # per-pixel rms still ~1 after normalising by the total noise
        assert np.std(img) == pytest.approx(1.0, abs=0.1)
    else:  # nebulosity: large-scale structure of several sigma
        assert np.std(img) > 1.5


def test_bright_star_is_the_only_target_among_its_spikes(library: list) -> None:
    cfg = replace(SceneConfig(**QUIET), frac_bright_star=1.0, bright_reach_px=-20, bright_mag_rel=(-10.0, -9.0))
    gen = SceneGenerator(cfg, 8, library)
    n_targets, bright_pixels = [], []
    for _ in range(6):
        t = gen.tile()
        n_targets.append(int(t["pos"].sum()))
        bright_pixels.append(int((t["image"] > 5).sum()))
    assert n_targets == [1] * 6  # the star; its halo and spikes are negatives
    assert min(bright_pixels) > 20


def test_scenes_import_without_galsim() -> None:
    code = ("import sys\nfor m in ('galsim', 'zarr', 'dask', 'astropy', 'sep'): sys.modules[m] = None\n"
            "import training.detector_scenes, training.train_detector, benchmarks.gpu_models\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=False)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]

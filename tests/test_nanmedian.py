"""The sorting medians of survey_proc.lightcurves.nanmedian give numpy's nanmedian numbers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from survey_proc.lightcurves.nanmedian import nanmedian_rows, running_nanmedian


def _with_gaps(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape)
    a[rng.random(shape) < 0.3] = np.nan
    rows = a.reshape(-1, shape[-1])
    rows[0] = np.nan  # a row without values
    if shape[-1] > 2:
        rows[-1, ::3] = np.inf
        rows[-1, 1] = -np.inf
    return a


@pytest.mark.parametrize("shape", [(300, 101), (4, 6), (2, 3, 40), (1, 1)])
def test_nanmedian_rows_is_numpys(shape: tuple[int, ...]) -> None:
    a = _with_gaps(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmedian(a, axis=-1, keepdims=True)
    got = nanmedian_rows(a, keepdims=True)
    assert got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True)
    assert np.isnan(nanmedian_rows(a)).reshape(-1)[0]
    assert nanmedian_rows(np.array([[1.0, np.nan, 3.0, 10.0]]))[0] == 3.0  # even count of values: the mean of two
    assert nanmedian_rows(np.zeros((3, 0))).shape == (3,)


@pytest.mark.parametrize("k", [1, 3, 7, 8])
def test_running_nanmedian_is_numpys_over_the_windows(k: int) -> None:
    a = _with_gaps((700, 120), seed=2)  # more rows than one block of sorted windows
    a[5, 30:60] = np.nan  # a long gap: windows without any value
    h = k // 2
    pad = np.pad(a, [(0, 0), (h, h)], constant_values=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = a if k <= 1 else np.nanmedian(sliding_window_view(pad, k, axis=-1), axis=-1)
    got = running_nanmedian(a, k)
    assert got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True)

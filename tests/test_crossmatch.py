"""catalog/crossmatch.py: association, seeds and the region grid."""

from __future__ import annotations

import numpy as np

from survey_proc import vocab as F
from survey_proc.catalog.crossmatch import (
    Region,
    associate,
    crossmatch_region,
    find_seeds,
    merge_exclusive,
    region_grid,
)


def test_associate_one_source_per_object_per_epoch():
    seeds = np.array([[10.0, 10.0], [11.2, 10.0]])
    # epoch 0: two sources both nearest to seed 0; the farther one goes to seed 1
    x = np.array([10.1, 10.5, 10.0, 30.0])
    y = np.array([10.0, 10.0, 10.05, 30.0])
    epoch = np.array([0, 0, 1, 1])
    obj = associate(seeds, x, y, epoch, radius_px=1.0)
    assert obj.tolist() == [0, 1, 0, -1]


def test_seeds_do_not_depend_on_the_order_of_the_epochs():
    rng = np.random.default_rng(3)
    true = rng.uniform(0, 200, (300, 2))
    pts = np.concatenate([true + rng.normal(0, 0.15, true.shape) for _ in range(12)])
    a = find_seeds(pts[:, 0], pts[:, 1], 1.0, 0.25, 3)
    perm = rng.permutation(len(pts))
    b = find_seeds(pts[perm, 0], pts[perm, 1], 1.0, 0.25, 3)
    a, b = a[np.lexsort(a.T)], b[np.lexsort(b.T)]
    np.testing.assert_allclose(a, b, atol=1e-9)
    assert abs(len(a) - 300) <= 3  # one seed per star (close pairs may merge)


def test_region_grid_covers_the_plane():
    regions = region_grid(1000, 700, 256)
    x = np.array([-50.0, 0.0, 255.49, 255.5, 699.0, 800.0])
    y = np.array([-3.0, 500.0, 999.0, 1200.0, 0.0, 0.0])
    n = sum(r.contains(x, y).astype(int) for r in regions)
    assert n.tolist() == [1] * 6


def _alternating_source(rng: np.random.Generator, n_epochs: int = 60) -> dict:
    """One star at (40, 40) seen alone in good seeing and at a blend centroid 1.4 px away in poor seeing,
    plus a resolved pair 1.6 px apart (both detected in every epoch) and an isolated star."""
    rows = []
    for e in range(n_epochs):
        if e % 3:  # good seeing: the star's own position
            rows.append((e, 40.0, 40.0))
        else:  # poor seeing: the blend's centroid
            rows.append((e, 41.4, 40.0))
        rows += [(e, 80.0, 80.0), (e, 81.6, 80.0), (e, 20.0, 70.0)]
    ep, x, y = (np.array(v) for v in zip(*rows, strict=True))
    # a blend's centroid moves with the seeing: it scatters more than the star alone
    sigma = np.where(np.isclose(x, 41.4), 0.25, 0.05)
    return {"epoch": ep, "x": x + rng.normal(0, 1, len(x)) * sigma, "y": y + rng.normal(0, 1, len(y)) * sigma}


def test_alternate_centroids_of_one_source_are_merged_and_resolved_pairs_are_not():
    s = _alternating_source(np.random.default_rng(3))
    seeds = find_seeds(s["x"], s["y"], 1.0, 0.25, 3)
    obj = associate(seeds, s["x"], s["y"], s["epoch"], 1.0)
    assert len(np.unique(obj[obj >= 0])) == 5  # the blended star is two objects before the merge
    merged, primary, n = merge_exclusive(obj, s["x"], s["y"], s["epoch"], 2.0)
    assert n == 1 and len(np.unique(merged[merged >= 0])) == 4
    star = merged[np.argmin(np.hypot(s["x"] - 40, s["y"] - 40))]
    assert np.sum(merged == star) == 60  # every epoch, one source each
    # its position is the steadier member's (the star alone), not the blend's centroid, though that has fewer points
    # here only in one epoch in three
    assert np.all(np.abs(s["x"][(merged == star) & primary] - 40.0) < 0.3)
    # the resolved pair shares every epoch: never merged, whatever the radius
    pair = np.hypot(s["x"] - 80.8, s["y"] - 80) < 1.2
    assert len(np.unique(merged[pair])) == 2
    assert merge_exclusive(obj, s["x"], s["y"], s["epoch"], 0.0)[2] == 0


def test_crossmatch_region_merges_when_asked_and_flags_the_other_centroid():
    import pandas as pd

    s = _alternating_source(np.random.default_rng(4))
    n = len(s["x"])
    src = pd.DataFrame({"source_id": np.arange(n), "epoch": s["epoch"], "mjd": s["epoch"] * 0.01, "x_ref": s["x"],
                        "y_ref": s["y"], "mag": 20.0, "mag_err": 0.01, "flux": 1e4, "flux_err": 1e2, "flags": 0})
    region = Region(0, 0, 128, 0, 128)
    kw = {"field": "F", "field_index": 0, "fwhm_px": 2.0, "match_radius_fwhm": 0.5, "match_radius_min_px": 1.0,
          "min_epochs": 3, "seed_bin_px": 0.25}
    objects, lc, info = crossmatch_region(src, region, **kw, merge_radius_fwhm=1.0)
    assert info["n_merged"] == 1 and len(objects) == 4 and sorted(objects["n_epochs"]) == [60, 60, 60, 60]
    star = objects.loc[np.argmin(np.hypot(objects["x"] - 40, objects["y"] - 40))]
    assert abs(star["x"] - 40.0) < 0.1
    pts = lc[lc["object_id"] == star["object_id"]]
    blended = (pts["flags"].to_numpy() & F.BLENDED) != 0
    assert blended.sum() == 20 and np.all(pts["epoch"].to_numpy()[blended] % 3 == 0)  # the poor-seeing epochs
    objects0, _, info0 = crossmatch_region(src, region, **kw, merge_radius_fwhm=0.0)
    assert info0["n_merged"] == 0 and len(objects0) == 5


def test_merge_radius_must_not_be_negative():
    import pytest

    from survey_proc.config import load_config
    from survey_proc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"crossmatch.merge_radius_fwhm must be >= 0 \(0: never merge\), got -1"):
        load_config(None, {"crossmatch": {"merge_radius_fwhm": -1.0}})

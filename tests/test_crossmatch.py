"""catalog/crossmatch.py: association, seeds and the region grid."""

from __future__ import annotations

import numpy as np

from survey_proc.catalog.crossmatch import associate, find_seeds, region_grid


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

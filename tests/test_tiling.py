"""Tiling: tile cores cover the image once, blocks, and de-duplication across tile borders."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from survey_proc.tiling import Tile, deduplicate, tile_blocks, tile_grid


@settings(max_examples=40, deadline=None)
@given(ny=st.integers(16, 700), nx=st.integers(16, 700), tile=st.integers(64, 300), halo=st.integers(0, 40))
def test_tile_cores_cover_every_pixel_once(ny, nx, tile, halo):
    cover = np.zeros((ny, nx), int)
    tiles = tile_grid(ny, nx, tile, halo)
    for t in tiles:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        assert 0 <= t.hy0 <= t.y0 < t.y1 <= t.hy1 <= ny and 0 <= t.hx0 <= t.x0 < t.x1 <= t.hx1 <= nx
        assert t.y0 - t.hy0 == min(halo, t.y0) and t.hx1 - t.x1 == min(halo, nx - t.x1)
    assert (cover == 1).all()
    # every position in the image has exactly one tile with depth >= 0 ... < except on the far edges
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, nx - 0.5, 200)
    y = rng.uniform(-0.5, ny - 0.5, 200)
    depth = np.stack([t.depth_px(x, y) for t in tiles])
    assert ((depth >= 0).sum(axis=0) == 1).all()
    blocks = tile_blocks(tiles, 3, (256, 256))
    assert sorted(t.index for b in blocks for t in b) == list(range(len(tiles)))
    assert all(len({(t.y0 // 256, t.x0 // 256) for t in b}) == 1 and len(b) <= 3 for b in blocks)


def test_deduplicate_keeps_the_copy_deepest_in_its_core():
    a = Tile(0, 0, 100, 0, 100, 0, 120, 0, 120)
    b = Tile(1, 0, 100, 100, 200, 0, 120, 80, 200)
    # the same star measured by both tiles at x = 99.45 (a) and 99.55 (b); another pair from one tile
    x = np.array([99.45, 99.55, 50.0, 50.3])
    y = np.array([10.0, 10.02, 50.0, 50.0])
    tile = np.array([0, 1, 0, 0])
    depth = np.array([a.depth_px(x[i:i + 1], y[i:i + 1])[0] if tile[i] == 0 else b.depth_px(x[i:i + 1], y[i:i + 1])[0]
                      for i in range(4)])
    keep = deduplicate(x, y, tile, depth, radius_px=1.0)
    assert keep.tolist() == [True, False, True, True]  # 99.45 is 0.05 px inside a; 99.55 is 0.05 px outside b
    assert deduplicate(x[2:], y[2:], tile[2:], depth[2:], 1.0).all()  # same tile: never merged

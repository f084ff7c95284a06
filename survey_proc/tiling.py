"""The tile grid: cores that cover the image exactly once, halos around them, ownership.

Conventions
-----------
Pixel coordinates are 0-based with pixel centres at integers, so pixel ``i`` spans
``[i - 0.5, i + 0.5)``. A tile core covers pixel indices ``[x0, x1) x [y0, y1)``, i.e. the
coordinate interval ``[x0 - 0.5, x1 - 0.5)``. Cores tile the image without gaps or
overlap; the halo (``halo_px`` on every side, clipped at the image edge) gives a detector
the context of sources just outside the core.

Ownership and border de-duplication
-----------------------------------
A detection belongs to the tile whose core holds its centre. Two tiles measure a star on
their common border from (almost) the same pixels, but not exactly the same numbers, so a
star at ``x = 511.49`` may be measured at ``511.51`` by the neighbour: strict ownership
would then keep it twice or drop it. So each tile keeps detections up to
``own_margin_px`` outside its core, and :func:`deduplicate` then removes, among
detections *from different tiles* closer than the de-duplication radius, every copy but
the one lying deepest inside its own tile's core (ties: the lower tile index). Real pairs
closer than that radius are not resolved by the detectors anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class Tile:
    """One tile: core ``[x0, x1) x [y0, y1)`` and halo window ``[hx0, hx1) x [hy0, hy1)`` (pixel indices)."""

    index: int
    y0: int
    y1: int
    x0: int
    x1: int
    hy0: int
    hy1: int
    hx0: int
    hx1: int

    @property
    def core_shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the core (pixels)."""
        return (self.y1 - self.y0, self.x1 - self.x0)

    def depth_px(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance (px) of positions inside the core from its nearest edge (< 0 outside).

        Parameters
        ----------
        x, y
            Positions (px, image frame).

        Returns
        -------
        ndarray
            The distance (px) per position.
        """
        lo_x, hi_x = self.x0 - 0.5, self.x1 - 0.5
        lo_y, hi_y = self.y0 - 0.5, self.y1 - 0.5
        return np.minimum.reduce([x - lo_x, hi_x - x, y - lo_y, hi_y - y])


def tile_grid(ny: int, nx: int, tile_px: int, halo_px: int) -> list[Tile]:
    """Tiles covering an ``ny x nx`` image, row-major; edge tiles are smaller when needed.

    Parameters
    ----------
    ny, nx
        Image shape (pixels).
    tile_px
        Core size (pixels).
    halo_px
        Halo width on each side (pixels), clipped at the image edge.

    Returns
    -------
    list of Tile
        Tiles with ``index`` 0, 1, ... in row-major order.
    """
    tiles: list[Tile] = []
    for y0 in range(0, ny, tile_px):
        for x0 in range(0, nx, tile_px):
            y1, x1 = min(y0 + tile_px, ny), min(x0 + tile_px, nx)
            tiles.append(Tile(len(tiles), y0, y1, x0, x1, max(0, y0 - halo_px), min(ny, y1 + halo_px),
                              max(0, x0 - halo_px), min(nx, x1 + halo_px)))
    return tiles


def tile_blocks(tiles: list[Tile], tiles_per_task: int, chunk_px: tuple[int, int] | None = None) -> list[list[Tile]]:
    """Group tiles into blocks (one task each) of at most ``tiles_per_task`` tiles.

    When ``chunk_px`` (the store's ``(y, x)`` chunk shape) is given, a block never spans two
    chunks, so each task decompresses each chunk it reads once (halos aside).

    Parameters
    ----------
    tiles
        The tiles (:func:`tile_grid`).
    tiles_per_task
        Most tiles in one block.
    chunk_px
        The store's ``(cy, cx)`` chunk shape (pixels); None: blocks ignore chunks.

    Returns
    -------
    list of list of Tile
        The blocks, chunk by chunk in row-major order.
    """
    groups: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        key = (t.y0 // chunk_px[0], t.x0 // chunk_px[1]) if chunk_px else (0, 0)
        groups.setdefault(key, []).append(t)
    blocks: list[list[Tile]] = []
    for key in sorted(groups):
        g = groups[key]
        blocks.extend(g[i : i + tiles_per_task] for i in range(0, len(g), tiles_per_task))
    return blocks


def block_window(block: list[Tile]) -> tuple[int, int, int, int]:
    """The pixel window ``(y0, y1, x0, x1)`` holding every tile (core + halo) of a block.

    Parameters
    ----------
    block
        Tiles of one block (at least one).

    Returns
    -------
    tuple of int
        ``(y0, y1, x0, x1)`` (pixels, image frame; end exclusive).
    """
    return (min(t.hy0 for t in block), max(t.hy1 for t in block),
            min(t.hx0 for t in block), max(t.hx1 for t in block))


def owned(tile: Tile, x: np.ndarray, y: np.ndarray, margin_px: float) -> np.ndarray:
    """Detections a tile keeps: centre inside its core grown by ``margin_px``.

    Parameters
    ----------
    tile
        The tile.
    x, y
        Detection centres (px, image frame).
    margin_px
        How far outside the core a detection is still kept (px).

    Returns
    -------
    ndarray of bool
        One per detection.
    """
    return tile.depth_px(np.asarray(x, float), np.asarray(y, float)) >= -margin_px


def deduplicate(x: np.ndarray, y: np.ndarray, tile: np.ndarray, depth_px: np.ndarray, radius_px: float) -> np.ndarray:
    """Keep-mask removing border duplicates: pairs from different tiles closer than ``radius_px``.

    Of each such group the detection deepest inside its own tile's core survives (ties: the
    lower tile index, then the lower row). Pairs from the same tile are never touched.

    Parameters
    ----------
    x, y
        Detection centres (pixels, image frame).
    tile
        Index of the tile that measured each detection.
    depth_px
        :meth:`Tile.depth_px` of each detection in its own tile.
    radius_px
        De-duplication radius (pixels).

    Returns
    -------
    ndarray of bool
        True for the detections to keep.
    """
    n = len(x)
    keep = np.ones(n, bool)
    if n < 2:
        return keep
    # only detections near a core border can have a copy from another tile
    near = np.flatnonzero(depth_px < radius_px + 1.0)
    if len(near) < 2:
        return keep
    pairs = cKDTree(np.c_[x[near], y[near]]).query_pairs(radius_px, output_type="ndarray")
    if len(pairs) == 0:
        return keep
    a, b = near[pairs[:, 0]], near[pairs[:, 1]]
    cross = tile[a] != tile[b]
    a, b = a[cross], b[cross]
    # rank: deeper first, then lower tile, then lower row index
    order = np.lexsort((np.arange(n), tile, -depth_px))
    rank = np.empty(n, int)
    rank[order] = np.arange(n)
    # process pairs from the best survivor down, so chains resolve deterministically
    loser = np.where(rank[a] < rank[b], b, a)
    winner = np.where(rank[a] < rank[b], a, b)
    for i in np.argsort(rank[winner], kind="stable"):
        if keep[winner[i]]:
            keep[loser[i]] = False
    return keep

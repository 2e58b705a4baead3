"""Tiles over a region, and the smooth blending that joins their outputs without seams.

Pure functions and small classes, no I/O. A :class:`TileGrid` covers a ``width × height`` region with
tiles of at most ``tile_size`` that overlap by at least ``overlap``; the last tile of a row or column
is moved back to end exactly at the border, so every tile (but those of regions smaller than a tile)
has the full size an engine expects. :class:`RowBlender` accumulates weighted tile outputs and
releases finished rows as soon as no later tile can touch them, so memory is bounded by one band of
tiles, whatever the region's size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def tile_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start positions of tiles of size ``min(tile, length)`` covering ``[0, length)``."""
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be ≥ 0 and smaller than the tile size {tile}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    positions = list(range(0, length - tile, stride))
    positions.append(length - tile)
    return positions


@dataclass(frozen=True)
class Tile:
    """One tile, in pixels of the region (not of the level)."""

    row: int
    col: int
    x: int
    y: int
    width: int
    height: int


class TileGrid:
    """Tiles over a ``width × height`` region."""

    def __init__(self, width: int, height: int, tile_size: int = 256, overlap: int = 32) -> None:
        self.width, self.height = width, height
        self.tile_size, self.overlap = tile_size, overlap
        self.xs = tile_positions(width, tile_size, overlap)
        self.ys = tile_positions(height, tile_size, overlap)
        self.tile_width = min(tile_size, width)
        self.tile_height = min(tile_size, height)

    def __len__(self) -> int:
        return len(self.xs) * len(self.ys)

    @property
    def n_rows(self) -> int:
        return len(self.ys)

    def row(self, r: int) -> list[Tile]:
        y = self.ys[r]
        return [Tile(r, c, x, y, self.tile_width, self.tile_height) for c, x in enumerate(self.xs)]

    def __iter__(self) -> Iterator[Tile]:
        for r in range(self.n_rows):
            yield from self.row(r)


def axis_weights(positions: list[int], size: int, index: int, scale: int = 1) -> np.ndarray:
    """1-D blending weights of tile ``index`` along one axis, on the output grid (``size·scale`` long).

    Inside a tile the weight is 1; where it overlaps a neighbour it follows a sin² ramp whose
    complement (cos²) is the neighbour's, so overlapping weights sum to one. Weights are never zero,
    so every output pixel is covered with positive weight.
    """
    n = size * scale
    w = np.ones(n, dtype=np.float64)
    start = positions[index] * scale
    end = start + n
    if index > 0:
        prev_end = positions[index - 1] * scale + n
        ramp = prev_end - start
        if ramp > 0:
            t = (np.arange(ramp) + 0.5) / ramp
            w[:ramp] *= np.sin(0.5 * np.pi * t) ** 2
    if index < len(positions) - 1:
        next_start = positions[index + 1] * scale
        ramp = end - next_start
        if ramp > 0:
            t = (np.arange(ramp) + 0.5) / ramp
            w[n - ramp :] *= np.cos(0.5 * np.pi * t) ** 2
    return w


def tile_seed(seed: int, level: int, x: int, y: int) -> int:
    """A 63-bit seed for the tile at level-pixel position ``(x, y)``: independent of order and batching."""
    digest = hashlib.blake2b(f"{seed}:{level}:{x}:{y}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stripes(grid: TileGrid, max_width: int) -> list[tuple[int, int, list[int]]]:
    """Split a wide grid into vertical stripes: ``(own_x0, own_x1, columns)`` each.

    The owned ranges partition ``[0, width)``; ``columns`` are all tile columns that touch the owned
    range, so a stripe blends its owned pixels completely (the columns at its edges are computed by both
    neighbours; per-tile seeds make both copies identical).
    """
    stride = max(1, grid.tile_size - grid.overlap)
    per = max(1, max_width // stride)
    starts = list(range(0, len(grid.xs), per))
    out = []
    for k, c0 in enumerate(starts):
        a = 0 if k == 0 else grid.xs[c0]
        b = grid.width if k == len(starts) - 1 else grid.xs[starts[k + 1]]
        cols = [c for c, x in enumerate(grid.xs) if x < b and x + grid.tile_width > a]
        out.append((a, b, cols))
    return out


class RowBlender:
    """Blends tile outputs of one :class:`TileGrid` row by row and releases finished output rows.

    With ``columns`` it blends only those tile columns (a stripe of the grid); the buffers then span
    from the first column's left edge to the last one's right edge, ``x_lo`` in region pixels.
    """

    def __init__(self, grid: TileGrid, scale: int, channels: int, columns: list[int] | None = None) -> None:
        self.grid, self.scale, self.channels = grid, scale, channels
        cols = columns if columns is not None else list(range(len(grid.xs)))
        self.x_lo = grid.xs[cols[0]]
        self.out_width = (grid.xs[cols[-1]] + grid.tile_width - self.x_lo) * scale
        self.out_height = grid.height * scale
        self._wx = {i: axis_weights(grid.xs, grid.tile_width, i, scale) for i in cols}
        self._wy = [axis_weights(grid.ys, grid.tile_height, i, scale) for i in range(len(grid.ys))]
        self._top = 0  # first output row held in the buffers
        self._acc = np.zeros((0, self.out_width, channels), dtype=np.float32)
        self._wsum = np.zeros((0, self.out_width, 1), dtype=np.float32)
        self._extra_acc: np.ndarray | None = None
        self._scratch: np.ndarray | None = None
        self._weights: dict[tuple[int, int], np.ndarray] = {}

    def _weight(self, row: int, col: int) -> np.ndarray:
        """The 2-D weight of a tile; interior tiles share one array (only border tiles differ)."""
        kr = 0 if row == 0 else (2 if row == len(self._wy) - 1 else 1)
        ncols = len(self.grid.xs)
        kc = 0 if col == 0 else (2 if col == ncols - 1 else 1)
        # Inner tiles have equal ramps except next to the last one (its overlap can be larger).
        key = (row if kr != 1 or row == len(self._wy) - 2 else -1, col if kc != 1 or col == ncols - 2 else -1)
        w = self._weights.get(key)
        if w is None:
            w = np.outer(self._wy[row], self._wx[col]).astype(np.float32)[:, :, None]
            self._weights[key] = w
        return w

    def _ensure(self, bottom: int) -> None:
        held = self._top + self._acc.shape[0]
        if bottom > held:
            grow = bottom - held
            self._acc = np.concatenate([self._acc, np.zeros((grow, self.out_width, self.channels), np.float32)])
            self._wsum = np.concatenate([self._wsum, np.zeros((grow, self.out_width, 1), np.float32)])
            if self._extra_acc is not None:
                self._extra_acc = np.concatenate(
                    [self._extra_acc, np.zeros((grow, self.out_width, self._extra_acc.shape[2]), np.float32)]
                )

    def add(self, tile: Tile, pixels: np.ndarray, extra: np.ndarray | None = None) -> None:
        """Add one tile's output ``(h·s, w·s, C)`` (and an optional extra map, e.g. uncertainty)."""
        s = self.scale
        y0, x0 = tile.y * s, (tile.x - self.x_lo) * s
        h, w = pixels.shape[:2]
        if (h, w) != (tile.height * s, tile.width * s):
            raise ValueError(f"engine returned a {h}×{w} tile, expected {tile.height * s}×{tile.width * s}")
        weight = self._weight(tile.row, tile.col)
        if extra is not None and self._extra_acc is None:
            self._extra_acc = np.zeros((self._acc.shape[0], self.out_width, extra.shape[2]), np.float32)
        self._ensure(y0 + h)
        r0 = y0 - self._top
        self._scratch = np.multiply(pixels, weight, out=self._scratch if self._scratch is not None and
                                    self._scratch.shape == pixels.shape else None, dtype=np.float32)
        self._acc[r0 : r0 + h, x0 : x0 + w] += self._scratch
        self._wsum[r0 : r0 + h, x0 : x0 + w] += weight
        if extra is not None:
            self._extra_acc[r0 : r0 + h, x0 : x0 + w] += extra * weight  # type: ignore[index]

    def release(self, finished_row: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Output rows no tile after grid row ``finished_row`` can touch, normalised, as float32."""
        if finished_row + 1 < self.grid.n_rows:
            limit = self.grid.ys[finished_row + 1] * self.scale
        else:
            limit = self.out_height
        n = limit - self._top
        if n <= 0:
            return np.zeros((0, self.out_width, self.channels), np.float32), None
        wsum = self._wsum[:n]
        rows = self._acc[:n] / wsum
        extra = self._extra_acc[:n] / wsum if self._extra_acc is not None else None
        self._acc = self._acc[n:].copy()
        self._wsum = self._wsum[n:].copy()
        if self._extra_acc is not None:
            self._extra_acc = self._extra_acc[n:].copy()
        self._top = limit
        return rows, extra

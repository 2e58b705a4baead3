"""Tiles over a region, and the smooth blending that joins their outputs without seams.

Pure functions and small classes, no I/O. A :class:`TileGrid` covers a ``width × height`` region with
tiles of at most ``tile_size`` that overlap by at least ``overlap``; the last tile of a row or column
is moved back to end exactly at the border, so every tile (but those of regions smaller than a tile)
has the full size an engine expects. Wide regions are cut into vertical stripes (:func:`plan_stripes`)
of a fixed width; a :class:`StripeBlender` accumulates one stripe's weighted tile outputs and releases
finished rows as soon as no later tile can touch them, so memory is bounded by one band of one stripe,
whatever the region's size. Every tile is computed once: what a stripe's last tiles contribute to the
next stripe is handed over as a *carry* (their horizontal partial sums), and the sums are formed in the
same order as without stripes, so the pixels do not depend on the stripe width.
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


@dataclass(frozen=True)
class Stripe:
    """Output columns ``[lo, hi)`` (output pixels) and the tile columns whose left edge lies in them."""

    lo: int
    hi: int
    columns: list[int]


def plan_stripes(grid: TileGrid, scale: int, width: int) -> list[Stripe]:
    """Cut the grid's output (``grid.width · scale`` wide) into stripes of ``width`` output pixels.

    ``width`` must be a multiple of ``scale`` and at least one tile (``tile_width · scale``), so the carry a
    stripe hands on never reaches past the next stripe. Each tile belongs to the stripe holding its left edge.
    """
    total = grid.width * scale
    if width % scale or width < grid.tile_width * scale:
        raise ValueError(f"stripe width {width} must be a multiple of {scale} and at least one tile wide")
    out = []
    for lo in range(0, total, width):
        hi = min(total, lo + width)
        out.append(Stripe(lo, hi, [c for c, x in enumerate(grid.xs) if lo <= x * scale < hi]))
    return out


def _axis_sum(positions: list[int], size: int, scale: int, lo: int, hi: int) -> np.ndarray:
    """Sum of all tiles' axis weights over output pixels ``[lo, hi)``, added in tile order (float32)."""
    total = np.zeros(hi - lo, np.float32)
    n = size * scale
    for i, p in enumerate(positions):
        a, b = max(lo, p * scale), min(hi, p * scale + n)
        if a < b:
            w = axis_weights(positions, size, i, scale).astype(np.float32)
            total[a - lo : b - lo] += w[a - p * scale : b - p * scale]
    return total


def _with_channels(pixels: np.ndarray, channels: int, what: str) -> np.ndarray:
    """``(h, w, C)`` from a tile; a single-channel tile may come as ``(h, w)`` (squeezed by an engine)."""
    if pixels.ndim == 2 and channels == 1:
        return pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] != channels:
        raise ValueError(f"{what} a tile of shape {tuple(pixels.shape)}, expected (h, w, {channels})")
    return pixels


class StripeBlender:
    """Blends the tiles of one stripe of a :class:`TileGrid`, grid row by grid row (separable weights).

    Per grid row, tile outputs are first blended horizontally, ``H += pixels · w_x`` in column order; then
    ``acc += H · w_y`` over the stripe's own columns. Columns right of the stripe, which the next stripe
    owns, leave ``H`` there as a carry; the next stripe starts its ``H`` from it, so every sum is formed in
    the same order as in an unstriped run. Output = ``acc / (Σw_y · Σw_x)``, the weight sums taken over
    all tiles of the grid.
    """

    def __init__(self, grid: TileGrid, scale: int, channels: int, stripe: Stripe, extra_channels: int = 0) -> None:
        self.grid, self.scale, self.channels, self.stripe = grid, scale, channels, stripe
        s = scale
        ends = [(grid.xs[c] + grid.tile_width) * s for c in stripe.columns]
        self.lo = stripe.lo
        self.own_width = stripe.hi - stripe.lo
        self.width = max([stripe.hi, *ends]) - stripe.lo  # own columns + the carry handed to the next stripe
        self.carry_width = self.width - self.own_width
        self.extra_channels = extra_channels
        self.out_height = grid.height * s
        self._wx = {c: axis_weights(grid.xs, grid.tile_width, c, s).astype(np.float32)[None, :, None]
                    for c in stripe.columns}
        self._wy = [axis_weights(grid.ys, grid.tile_height, r, s).astype(np.float32)[:, None, None]
                    for r in range(grid.n_rows)]
        self._hsum = _axis_sum(grid.xs, grid.tile_width, s, stripe.lo, stripe.hi)[None, :, None]
        self._vsum = _axis_sum(grid.ys, grid.tile_height, s, 0, self.out_height)[:, None, None]
        self._top = 0  # first output row held in the accumulators
        self._acc = np.zeros((0, self.own_width, channels), np.float32)
        self._extra = np.zeros((0, self.own_width, extra_channels), np.float32) if extra_channels else None

    def add_row(self, row: int, outputs: list[tuple[Tile, np.ndarray, np.ndarray | None]],
                carry: tuple[np.ndarray, np.ndarray | None] | None = None,
                ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Blend grid row ``row`` (``outputs`` in column order); return the carry for the next stripe."""
        s = self.scale
        h = self.grid.tile_height * s
        band = np.zeros((h, self.width, self.channels), np.float32)
        xband = np.zeros((h, self.width, self.extra_channels), np.float32) if self.extra_channels else None
        if carry is not None:
            cw = carry[0].shape[1]
            if cw > self.width:
                raise ValueError(f"a carry of {cw} columns does not fit a stripe blender {self.width} wide")
            band[:, :cw] = carry[0]
            if xband is not None and carry[1] is not None:
                xband[:, :cw] = carry[1]
        for tile, pixels, extra in outputs:
            x0 = tile.x * s - self.lo
            pixels = _with_channels(pixels, self.channels, "engine returned")
            if extra is not None and self.extra_channels:
                extra = _with_channels(extra, self.extra_channels, "engine returned an uncertainty")
            if pixels.shape[:2] != (h, tile.width * s):
                raise ValueError(f"engine returned a {pixels.shape[0]}×{pixels.shape[1]} tile, "
                                 f"expected {h}×{tile.width * s}")
            w = self._wx[tile.col]
            band[:, x0 : x0 + pixels.shape[1]] += pixels * w
            if xband is not None:
                ex = extra if extra is not None else np.zeros(pixels.shape[:2] + (self.extra_channels,), np.float32)
                xband[:, x0 : x0 + pixels.shape[1]] += ex * w
        y0 = self.grid.ys[row] * s
        need = y0 + h - self._top
        if need > self._acc.shape[0]:
            grow = need - self._acc.shape[0]
            self._acc = np.concatenate([self._acc, np.zeros((grow, self.own_width, self.channels), np.float32)])
            if self._extra is not None:
                self._extra = np.concatenate(
                    [self._extra, np.zeros((grow, self.own_width, self.extra_channels), np.float32)])
        r0 = y0 - self._top
        wy = self._wy[row]
        self._acc[r0 : r0 + h] += band[:, : self.own_width] * wy
        if self._extra is not None and xband is not None:
            self._extra[r0 : r0 + h] += xband[:, : self.own_width] * wy
        if not self.carry_width:
            return None
        return (band[:, self.own_width :].copy(),
                xband[:, self.own_width :].copy() if xband is not None else None)

    def release(self, finished_row: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Output rows no tile after grid row ``finished_row`` can touch, normalised, as float32."""
        if finished_row + 1 < self.grid.n_rows:
            limit = self.grid.ys[finished_row + 1] * self.scale
        else:
            limit = self.out_height
        n = limit - self._top
        if n <= 0:
            return np.zeros((0, self.own_width, self.channels), np.float32), None
        norm = self._vsum[self._top : limit] * self._hsum
        rows = self._acc[:n] / norm
        extra = self._extra[:n] / norm if self._extra is not None else None
        self._acc = self._acc[n:].copy()
        if self._extra is not None:
            self._extra = self._extra[n:].copy()
        self._top = limit
        return rows, extra

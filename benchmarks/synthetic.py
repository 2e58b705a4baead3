"""Synthetic H&E-like pyramidal slides of any size, written tile by tile (never held in memory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

TILE = 256


def _texture_bank(n: int = 8, seed: int = 0) -> list[np.ndarray]:
    """A few 256² tissue-like RGB tiles: pink stroma, purple nuclei blobs, white gaps."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    bank = []
    for _ in range(n):
        base = ndimage.gaussian_filter(rng.random((TILE, TILE)), 6)
        base = (base - base.min()) / (np.ptp(base) + 1e-9)
        nuclei = ndimage.gaussian_filter((rng.random((TILE, TILE)) > 0.995).astype(float), 3) * 40
        od_e = 0.15 + 0.5 * base
        od_h = np.clip(nuclei, 0, 1.2)
        od = od_h[..., None] * np.array([0.65, 0.70, 0.29]) + od_e[..., None] * np.array([0.07, 0.99, 0.11])
        rgb = np.exp(-od) * 255 + rng.normal(0, 3, (TILE, TILE, 3))
        bank.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return bank


def write_synthetic_slide(path: Path, size: int, mpp: float = 0.5) -> Path:
    """Write a ``size × size`` RGB OME-TIFF pyramid (JPEG tiles, SubIFDs) if it is not there yet."""
    if path.exists():
        return path
    bank = _texture_bank()
    levels = [size]
    while levels[-1] > 1024:
        levels.append((levels[-1] + 1) // 2)

    def tiles(n: int, ds: int):
        for ty in range(0, n, TILE):
            for tx in range(0, n, TILE):
                yield bank[((tx // TILE) * 7 + (ty // TILE) * 3 + ds) % len(bank)]

    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, n in enumerate(levels):
            kw = {"subifds": len(levels) - 1, "metadata": {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}} \
                if i == 0 else {"subfiletype": 1}
            tw.write(tiles(n, i), shape=(n, n, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", **kw)
    tmp.rename(path)
    return path

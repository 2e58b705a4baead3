"""Generators for the hostile corpus: every bad file is made here by code, none is stored as a blob.

Each function writes one file (or folder, link, pipe) into a folder and returns its path.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile

SAMPLE = Path(__file__).resolve().parents[2] / "lpfm_toolkit" / "data" / "cmu_small_region.svs"


def small_rgb(folder: Path, name: str = "crop.ome.tiff", size: int = 96, seed: int = 0) -> Path:
    """A small tissue-like 8-bit RGB OME-TIFF with a pixel size (fast to enhance)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([180 + 40 * np.sin(x / 7), 120 + 50 * np.cos(y / 9), 190 + 30 * np.sin((x + y) / 11)], -1)
    img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    path = folder / name
    tifffile.imwrite(
        path, img, photometric="rgb", ome=True, metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    )
    return path


def float_with(folder: Path, value: float, name: str) -> Path:
    """A float32 two-channel OME-TIFF with one non-finite pixel in the middle."""
    img = np.random.default_rng(1).random((2, 64, 64)).astype(np.float32)
    img[0, 40, 30] = value
    path = folder / name
    tifffile.imwrite(path, img, ome=True, metadata={"axes": "CYX"})
    return path


def truncated(folder: Path, source: Path, fraction: float, name: str) -> Path:
    data = source.read_bytes()
    path = folder / name
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    return path


def garbage(folder: Path, name: str, head: bytes = b"", size: int = 4096) -> Path:
    path = folder / name
    path.write_bytes(head + np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def huge_header_tiff(folder: Path, width: int, height: int, name: str = "huge.tif") -> Path:
    """A little-endian TIFF whose header declares ``width`` × ``height`` 8-bit pixels but holds 16 × 16 bytes."""
    data = bytes(range(256))
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8),
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, len(data)),
    ]
    ifd_offset = 8 + len(data)
    out = bytearray(b"II" + struct.pack("<HI", 42, ifd_offset)) + data
    out += struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<HI", value, 0)[:4] if typ == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    out += struct.pack("<I", 0)
    path = folder / name
    path.write_bytes(bytes(out))
    return path


def png_bomb(folder: Path, side: int = 100_000, name: str = "bomb.png") -> Path:
    """A PNG whose header declares ``side`` × ``side`` pixels (a decompression bomb), with almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path = folder / name
    path.write_bytes(data)
    return path


def fifo(folder: Path, name: str = "stream.svs") -> Path:
    path = folder / name
    os.mkfifo(path)
    return path


def symlink(folder: Path, target: Path | str, name: str) -> Path:
    path = folder / name
    path.symlink_to(target)
    return path


def foreign_ome_tiff(folder: Path, name: str = "mine.ome.tiff") -> Path:
    """A user's own OME-TIFF (no lpfm provenance anywhere)."""
    img = np.full((64, 64, 3), 200, np.uint8)
    path = folder / name
    tifffile.imwrite(path, img, photometric="rgb", ome=True, metadata={"axes": "YXS"})
    return path


def flip_byte(path: Path, offset_fraction: float = 0.5) -> None:
    """Change one byte inside ``path`` without changing its size (a silent edit, or bit rot)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_fraction)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_pixel_byte(path: Path) -> None:
    """Change one byte in the middle of the first tile's compressed data (same size: only a decode sees it)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset = page.dataoffsets[0] + page.databytecounts[0] // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))

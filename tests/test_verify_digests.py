"""Stored-pixel checksums are computed piece by piece (bands cut into columns) and equal the whole-image digest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from lpfm_toolkit import verify
from lpfm_toolkit.provenance import pixel_digest


@pytest.mark.parametrize("piece_bytes", [1, 8 << 20])  # 1: the narrowest pieces (1024 px); 8 MiB: whole bands here
def test_level_digest_in_pieces_equals_the_whole_image_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece_bytes: int
) -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(1100, 3000, 3), dtype=np.uint8)  # neither side a multiple of a piece
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib")
    monkeypatch.setattr(verify, "_PIECE_BYTES", piece_bytes)
    monkeypatch.setattr(verify, "_INFLIGHT_BYTES", 1)  # one piece ahead at a time still completes
    assert verify.level_digests(path) == [pixel_digest(img)]

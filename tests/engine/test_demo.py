"""The gain demo: a held-out clean crop degraded, restored, pictured with PSNR per panel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpfm_toolkit import demo
from lpfm_toolkit.engine.base import IdentityEngine
from lpfm_toolkit.errors import ConfigError


def test_gain_demo_pictures_four_panels_and_reports_the_gain(tmp_path: Path) -> None:
    res = demo.gain_demo(tmp_path, IdentityEngine(), prompt="sr x2", size=96)
    assert res.picture.exists() and res.picture.parent == tmp_path
    assert not list(tmp_path.glob("*.part"))
    img = Image.open(res.picture)
    assert img.width == 4 * 96 + 3 * 8 and img.height > 96
    classical = {k: v for k, v in res.psnr.items() if k.startswith("classical")}
    assert set(classical) == {"classical: bicubic", "classical: lanczos"}
    assert res.best_classical == max(classical, key=classical.__getitem__)
    assert res.gain_db == pytest.approx(res.psnr["lpfm"] - classical[res.best_classical])
    # pixel replication (the identity engine) is no better than the degraded input it repeats
    assert res.psnr["lpfm"] == pytest.approx(res.psnr["degraded"])
    assert res.gain_db < 0
    assert any("gain of lpfm" in line for line in res.lines())


def test_clean_crop_comes_from_tissue_in_the_held_out_band() -> None:
    crop = demo.clean_crop(64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.float32
    assert float(crop.std()) > 0.05


def test_gain_demo_refuses_unknown_prompts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no degradation"):
        demo.gain_demo(tmp_path, IdentityEngine(), prompt="AF -> H&E")

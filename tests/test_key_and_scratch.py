"""The idempotency key tells JPEG settings apart; the on-disk stripe assembly leaves nothing when it cannot start."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from lpfm_toolkit import open_image, parse_prompt
from lpfm_toolkit.engine import get_engine
from lpfm_toolkit.pipeline import _StripeAssembly, key_for, plan
from lpfm_toolkit.sinks.base import OutputSpec
from lpfm_toolkit.sources.base import Region


def test_key_tells_jpeg_quality_and_subsampling_apart(sample_slide: Path) -> None:
    engine = get_engine("classical")
    with open_image(sample_slide) as slide:
        item = next(iter(plan(slide, parse_prompt("denoise"), level=0, region=Region(0, 0, 256, 256), seed=0)))
        tiling = {"tile": 256, "overlap": 32}

        def key(**kw: object) -> str:
            return key_for(slide, item, engine, tiling, **kw)

        default = key(compression="auto")
        assert default == key(compression="jpeg")  # auto is JPEG for 8-bit RGB
        assert default == key(compression="jpeg", jpeg=(98, "4:4:4"))  # the writer's default settings
        assert default != key(compression="jpeg", jpeg=(90, "4:2:0"))
        assert key(compression="jpeg", jpeg=(90, "4:2:0")) != key(compression="jpeg", jpeg=(90, "4:4:4"))
        assert default != key(compression="zlib")
        assert key(compression="zlib") == key(compression="zlib", jpeg=(90, "4:2:0"))  # lossless ignores JPEG


def test_stripe_assembly_cleans_up_when_the_second_file_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "lpfm-stripes-*")))
    real_open = open
    opened = []

    def failing_open(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith("unc.raw"):
            raise OSError(28, "No space left on device")
        f = real_open(path, mode, *args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr("builtins.open", failing_open)
    spec = OutputSpec("x", 64, 32, ["R", "G", "B"], np.dtype(np.uint8), None, uncertainty=True)
    with pytest.raises(OSError, match="No space"):
        _StripeAssembly(spec, 3, np.dtype(np.uint8), uncertainty=True)
    assert opened and all(f.closed for f in opened)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "lpfm-stripes-*"))) == before

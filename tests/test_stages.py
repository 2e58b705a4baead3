"""run_item's stages, each alone: resolve tiling → output spec → stripe runner → provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lpfm_toolkit.engine.base import IdentityEngine
from lpfm_toolkit.engine.classical import ClassicalEngine
from lpfm_toolkit.errors import RegionError, TaskNotSupportedError
from lpfm_toolkit.pipeline import (
    StripeRunner,
    Tiling,
    key_for,
    make_provenance,
    output_name,
    output_spec,
    plan,
    resolve_tiling,
    run_item,
)
from lpfm_toolkit.prompts import parse_prompt
from lpfm_toolkit.sinks.memory import ArraySink
from lpfm_toolkit.sources import Region, open_image


@pytest.fixture
def region_item(sample_slide: Path):
    with open_image(sample_slide) as handle:
        (item,) = plan(handle, parse_prompt("sr x2"), region=Region(900, 1200, 300, 200), seed=7)
        yield handle, item


class RowWriter:
    """A writer that takes full-width rows only (as the OME-TIFF writer does for narrow regions)."""

    column_alignment = None

    def __init__(self, spec) -> None:
        self.rows: list[np.ndarray] = []

    def write_rows(self, rows: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        self.rows.append(rows)


def test_resolve_tiling(region_item) -> None:
    handle, item = region_item
    engine = IdentityEngine()
    assert resolve_tiling(handle, item, engine) == Tiling(engine.tile_size, engine.overlap)
    assert resolve_tiling(handle, item, engine, 64, 0).as_dict() == {"tile": 64, "overlap": 0}
    with pytest.raises(RegionError, match="overlap 64 must be smaller than the tile size 64"):
        resolve_tiling(handle, item, engine, 64, 64)
    with pytest.raises(TaskNotSupportedError):  # a deblurring method for super-resolution
        resolve_tiling(handle, item, ClassicalEngine(method="wiener"))


def test_output_spec(region_item) -> None:
    handle, item = region_item
    spec = output_spec(handle, item, IdentityEngine(), "name", uncertainty=True)
    assert (spec.width, spec.height) == (600, 400) and spec.channel_names == handle.channel_names
    assert spec.dtype == np.uint8 and spec.uncertainty
    assert spec.mpp == pytest.approx((0.499 / 2, 0.499 / 2))


def test_stripe_runner_is_identical_whatever_the_stripes(region_item) -> None:
    handle, item = region_item
    engine = IdentityEngine()
    tiling = Tiling(64, 16)
    spec = output_spec(handle, item, engine, "name", uncertainty=False)
    results = []
    for width in (64, 2048):
        seen: list[tuple[int, int]] = []
        runner = StripeRunner(handle, item, engine, spec, tiling, progress=lambda d, t, seen=seen: seen.append((d, t)))
        runner.prepare()
        writer = RowWriter(spec)
        run = runner.run(writer, stripe_width=width)
        pixels = np.concatenate(writer.rows)
        assert pixels.shape == (400, 600, 3) and seen[-1] == (run.tiles, run.tiles)
        results.append((pixels, run))
    (narrow, run_n), (wide, run_w) = results
    assert run_n.stripes > 1 and run_w.stripes == 1
    np.testing.assert_array_equal(narrow, wide)
    assert run_n.output_sha256 == run_w.output_sha256 and run_n.input_sha256 == run_w.input_sha256
    src = handle.read_region(0, 900, 1200, 300, 200)
    np.testing.assert_array_equal(wide[::2, ::2], src)  # identity ×2 replicates each pixel


def test_make_provenance_and_run_item_agree(region_item) -> None:
    handle, item = region_item
    engine = IdentityEngine()
    tiling = Tiling(128, 32)
    name = output_name(handle, item.task, item)
    spec = output_spec(handle, item, engine, name, uncertainty=False)
    runner = StripeRunner(handle, item, engine, spec, tiling)
    runner.prepare()
    run = runner.run(RowWriter(spec))
    key = key_for(handle, item, engine, tiling.as_dict(), compression=None, uncertainty=False)
    prov = make_provenance(handle, item, engine, key, tiling, spec, run, total_seconds=1.5)
    assert prov.idempotency_key == key and prov.seed == 7 and prov.engine == {"name": "identity"}
    assert prov.tiling["tile"] == 128 and prov.tiling["tiles"] == run.tiles and prov.tiling["scale"] == 2
    assert prov.output["shape"] == [400, 600, 3] and prov.output["dtype"] == "uint8"
    assert prov.durations["total_s"] == 1.5 and prov.output_sha256 == run.output_sha256
    whole = run_item(handle, item, engine, ArraySink(), tile_size=128, overlap=32)
    # the stages alone give the same record as run_item (but for the time it took)
    assert whole.provenance.idempotency_key == key
    assert (whole.provenance.input_sha256, whole.provenance.output_sha256) == (run.input_sha256, run.output_sha256)
    assert whole.provenance.tiling == prov.tiling and whole.provenance.output == prov.output

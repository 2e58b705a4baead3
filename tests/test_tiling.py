"""Tiling and blending: an identity engine must reproduce its input exactly, for any geometry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lpfm_toolkit.engine.base import IdentityEngine
from lpfm_toolkit.pipeline import plan, run_item
from lpfm_toolkit.prompts import Task, TaskKind
from lpfm_toolkit.provenance import pixel_digest
from lpfm_toolkit.sinks.memory import ArraySink
from lpfm_toolkit.sources.base import ImageHandle, Level, Region
from lpfm_toolkit.tiling import StripeBlender, TileGrid, axis_weights, plan_stripes, tile_positions, tile_seed


class ArrayHandle(ImageHandle):
    """An in-memory image with a two-level pyramid, for exact checks."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    uri = property(lambda self: "memory://test")
    name = property(lambda self: "test")
    dtype = property(lambda self: self.pixels.dtype)
    channel_names = property(lambda self: ["R", "G", "B"] if self.pixels.shape[2] == 3 else
                             [f"C{i}" for i in range(self.pixels.shape[2])])

    @property
    def levels(self) -> list[Level]:
        h, w = self.pixels.shape[:2]
        return [Level(w, h, 1.0), Level(w // 2, h // 2, 2.0)]

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        img = self.pixels if level == 0 else self.pixels[::2, ::2]
        return img[y : y + height, x : x + width]


def test_positions_cover_and_end_at_border() -> None:
    assert tile_positions(100, 256, 32) == [0]
    assert tile_positions(256, 256, 32) == [0]
    pos = tile_positions(1000, 256, 32)
    assert pos[0] == 0 and pos[-1] == 1000 - 256
    assert all(b - a <= 256 - 32 for a, b in zip(pos, pos[1:]))


@pytest.mark.parametrize("bad", [-1, 256, 300])
def test_overlap_must_be_smaller_than_tile(bad: int) -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_positions(1000, 256, bad)


def test_weights_sum_to_one_in_overlaps() -> None:
    pos = tile_positions(700, 256, 32)
    total = np.zeros(700)
    for i, p in enumerate(pos):
        total[p : p + 256] += axis_weights(pos, 256, i)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_tile_seed_depends_on_position_only() -> None:
    assert tile_seed(7, 0, 256, 512) == tile_seed(7, 0, 256, 512)
    assert len({tile_seed(7, 0, x, y) for x in range(0, 2048, 224) for y in range(0, 2048, 224)}) == 100
    assert tile_seed(7, 0, 0, 0) != tile_seed(8, 0, 0, 0)


def _blend(img: np.ndarray, grid: TileGrid, scale: int, width: int) -> np.ndarray:
    """Blend an image's own tiles through stripes ``width`` output px wide, carries handed on in memory."""
    channels = img.shape[2]
    parts = plan_stripes(grid, scale, width)
    columns = []
    carries: list = []
    for stripe in parts:
        blender = StripeBlender(grid, scale, channels, stripe)
        out, handed = [], []
        for r in range(grid.n_rows):
            outputs = []
            for t in grid.row(r):
                if t.col in stripe.columns:
                    patch = img[t.y : t.y + t.height, t.x : t.x + t.width]
                    outputs.append((t, patch.repeat(scale, 0).repeat(scale, 1), None))
            handed.append(blender.add_row(r, outputs, carries[r] if carries else None))
            out.append(blender.release(r)[0])
        carries = handed
        columns.append(np.concatenate(out))
    return np.concatenate(columns, axis=1)


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 300), height=st.integers(1, 300), tile=st.integers(8, 96),
    overlap_frac=st.floats(0, 0.9), scale=st.sampled_from([1, 2, 4, 8]), channels=st.sampled_from([1, 3]),
    stripe_tiles=st.integers(1, 4),
)
def test_blender_identity_is_exact(width: int, height: int, tile: int, overlap_frac: float, scale: int,
                                   channels: int, stripe_tiles: int) -> None:
    overlap = min(tile - 1, int(tile * overlap_frac))
    rng = np.random.default_rng(width * 1000 + height)
    img = rng.integers(0, 256, size=(height, width, channels)).astype(np.float32) / 255
    grid = TileGrid(width, height, tile, overlap)
    whole = _blend(img, grid, scale, width * scale)
    striped = _blend(img, grid, scale, grid.tile_width * scale * stripe_tiles)
    expected = img.repeat(scale, 0).repeat(scale, 1)
    assert whole.shape == expected.shape
    # uint8 round trip is exact: float error stays far below half a grey level
    np.testing.assert_array_equal(np.floor(whole * 255 + 0.5), np.floor(expected * 255 + 0.5))
    # stripes change nothing, not even the last bit: every sum is formed in the same order
    np.testing.assert_array_equal(striped, whole)


@settings(max_examples=30, deadline=None)
@given(
    x=st.integers(0, 150), y=st.integers(0, 150), w=st.integers(1, 170), h=st.integers(1, 170),
    level=st.sampled_from([0, 1]), tile=st.integers(16, 80), overlap=st.integers(0, 15),
    scale=st.sampled_from([1, 2, 4]), dtype=st.sampled_from([np.uint8, np.uint16]),
    stripe=st.sampled_from([4096, 16, 60]),
)
def test_pipeline_identity_is_exact(x: int, y: int, w: int, h: int, level: int, tile: int, overlap: int,
                                    scale: int, dtype: type, stripe: int) -> None:
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    pixels = rng.integers(0, info.max, size=(640, 640, 3), dtype=dtype, endpoint=True)
    handle = ArrayHandle(pixels)
    lv = handle.levels[level]
    w, h = min(w, lv.width - x), min(h, lv.height - y)
    task = Task(TaskKind.SUPER_RESOLUTION, scale=scale) if scale > 1 else Task(TaskKind.DENOISE)
    item = plan(handle, task, level=level, region=Region(x, y, w, h))[0]
    engine = IdentityEngine()
    engine.batch_size = 3
    result = run_item(handle, item, engine, ArraySink(), tile_size=tile, overlap=min(overlap, tile - 1),
                      stripe_width=stripe)
    out = result.output.extra["pixels"]
    src = handle.read_region(level, x, y, w, h)
    np.testing.assert_array_equal(out, src.repeat(scale, 0).repeat(scale, 1))
    assert out.dtype == dtype
    # the recorded checksums are those of exactly the region's pixels and of the output
    assert result.provenance.input_sha256 == pixel_digest(src)
    assert result.provenance.output_sha256 == pixel_digest(out)


def test_engine_receives_full_tiles_and_memory_stays_banded() -> None:
    """Every tile handed to the engine has the engine's tile size; the blender never holds the whole output."""
    seen: list[tuple[int, int]] = []
    peak_rows = 0

    class Spy(IdentityEngine):
        def process(self, tiles, task, seeds):  # type: ignore[override]
            seen.extend(t.shape[:2] for t in tiles)
            return super().process(tiles, task, seeds)

    pixels = np.zeros((1500, 900, 3), np.uint8)
    handle = ArrayHandle(pixels)
    item = plan(handle, Task(TaskKind.DENOISE))[0]

    class RowCounter(ArraySink):
        def open(self, spec, key, source):  # type: ignore[override]
            writer = super().open(spec, key, source)
            original = writer.write_block

            def write_block(x, rows, uncertainty=None):
                nonlocal peak_rows
                peak_rows = max(peak_rows, rows.shape[0])
                widths.add(rows.shape[1])
                original(x, rows, uncertainty)

            writer.write_block = write_block  # type: ignore[method-assign]
            return writer

    widths: set[int] = set()
    run_item(handle, item, Spy(), RowCounter(), tile_size=128, overlap=16, stripe_width=448)
    assert set(seen) == {(128, 128)}
    assert 0 < peak_rows <= 128
    assert widths == {448, 900 - 2 * 448}  # three stripes (the last made of the carry alone)


def test_stripes_partition_and_own_every_tile_once() -> None:
    grid = TileGrid(5000, 300, 256, 32)
    parts = plan_stripes(grid, 2, 2048)
    assert parts[0].lo == 0 and parts[-1].hi == 10000
    assert all(a.hi == b.lo for a, b in zip(parts, parts[1:]))
    assert sorted(c for p in parts for c in p.columns) == list(range(len(grid.xs)))
    with pytest.raises(ValueError, match="at least one tile"):
        plan_stripes(grid, 2, 256)


def test_pixel_digest_does_not_depend_on_how_the_image_arrives() -> None:
    from lpfm_toolkit.provenance import DIGEST_BLOCK, PixelDigest

    img = np.random.default_rng(1).integers(0, 255, (50, 3 * DIGEST_BLOCK + 7, 3), dtype=np.uint8)
    d = PixelDigest(*img.shape, dtype=img.dtype)
    d.update(DIGEST_BLOCK, img[:20, DIGEST_BLOCK:])
    d.update(0, img[:, :DIGEST_BLOCK])
    d.update(DIGEST_BLOCK, img[20:, DIGEST_BLOCK:])
    assert d.hexdigest() == pixel_digest(img)
    changed = img.copy()
    changed[49, -1, 2] ^= 1
    assert pixel_digest(changed) != pixel_digest(img)
    with pytest.raises(ValueError, match="not every row"):
        PixelDigest(*img.shape, dtype=img.dtype).hexdigest()


def test_striped_and_unstriped_runs_give_identical_pixels() -> None:
    """A stochastic-looking engine (output depends on the tile seed) gives the same pixels in both modes."""
    from lpfm_toolkit.engine.base import EngineOutput

    class Seeded(IdentityEngine):
        def process(self, tiles, task, seeds):  # type: ignore[override]
            noise = np.stack([np.random.default_rng(sd).random(tiles.shape[1:], dtype=np.float32) for sd in seeds])
            return EngineOutput(np.clip(tiles * 0.8 + noise * 0.2, 0, 1), noise[..., :1])

    pixels = np.random.default_rng(9).integers(0, 255, (300, 700, 3), dtype=np.uint8)
    handle = ArrayHandle(pixels)
    item = plan(handle, Task(TaskKind.DENOISE), seed=5)[0]
    wide = run_item(handle, item, Seeded(), ArraySink(), tile_size=64, overlap=8, samples_uncertainty=True)
    narrow = run_item(handle, item, Seeded(), ArraySink(), tile_size=64, overlap=8, samples_uncertainty=True,
                      stripe_width=128)
    assert (wide.provenance.tiling["stripes"], narrow.provenance.tiling["stripes"]) == (1, 3)
    np.testing.assert_array_equal(wide.output.extra["pixels"], narrow.output.extra["pixels"])
    np.testing.assert_array_equal(wide.output.extra["uncertainty"], narrow.output.extra["uncertainty"])
    assert wide.provenance.output_sha256 == narrow.provenance.output_sha256
    assert wide.provenance.input_sha256 == narrow.provenance.input_sha256

    class RowsOnly(ArraySink):
        """A writer that takes full-width rows only (like OMERO's): stripes are assembled on disk first."""

        def open(self, spec, key, source):  # type: ignore[override]
            writer = super().open(spec, key, source)
            writer.column_alignment = None
            return writer

    assembled = run_item(handle, item, Seeded(), RowsOnly(), tile_size=64, overlap=8, samples_uncertainty=True,
                         stripe_width=128)
    assert assembled.provenance.tiling["stripes"] == 3
    np.testing.assert_array_equal(assembled.output.extra["pixels"], wide.output.extra["pixels"])
    np.testing.assert_array_equal(assembled.output.extra["uncertainty"], wide.output.extra["uncertainty"])


def test_single_channel_tiles_without_channel_axis_blend() -> None:
    """Regression (issue 9): an engine returning (h, w) for one channel broke the blender's broadcast."""
    rng = np.random.default_rng(7)
    img = rng.random((300, 280, 1), dtype=np.float32)
    grid = TileGrid(280, 300, 128, 16)
    (stripe,) = plan_stripes(grid, 1, 280)
    blender = StripeBlender(grid, 1, 1, stripe)
    out = []
    for r in range(grid.n_rows):
        blender.add_row(r, [(t, img[t.y : t.y + t.height, t.x : t.x + t.width, 0], None) for t in grid.row(r)])
        out.append(blender.release(r)[0])
    np.testing.assert_allclose(np.concatenate(out), img, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \(h, w, 1\)"):
        StripeBlender(grid, 1, 1, stripe).add_row(0, [(grid.row(0)[0], np.zeros((128, 128, 3), np.float32), None)])


def test_single_channel_image_through_the_classical_engine(tmp_path) -> None:
    """Regression (issue 9): single-channel images crashed in blending with the classical denoiser."""
    from lpfm_toolkit.engine.classical import ClassicalEngine

    yy, xx = np.mgrid[0:300, 0:340]
    smooth = 20000 + 8000 * np.sin(xx / 13.0) * np.cos(yy / 17.0)
    img = (smooth + np.random.default_rng(8).normal(0, 800, smooth.shape))[:, :, None].astype(np.uint16)
    handle = ArrayHandle(img)
    for prompt in (TaskKind.DENOISE, TaskKind.DEBLUR):
        item = plan(handle, Task(prompt))[0]
        res = run_item(handle, item, ClassicalEngine(), ArraySink(), tile_size=128, overlap=16)
        pixels = res.output.extra["pixels"]
        assert pixels.shape == (300, 340, 1) and pixels.dtype == np.uint16
        assert abs(float(pixels.mean()) - float(img.mean())) < 0.05 * float(img.mean())  # brightness kept

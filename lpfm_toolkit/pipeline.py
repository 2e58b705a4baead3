"""Plan and run enhancements: source region → tiles → engine → blended rows → sink, with provenance.

This is the one workflow every front end calls (CLI, QuPath, OMERO scripts, scheduled jobs):
:func:`plan` turns a selection into :class:`WorkItem` s with idempotency keys, and :func:`run_item`
executes one in vertical stripes of a fixed width, streaming rows so memory is bounded by one band of
one stripe, never by the region.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpfm_toolkit.engine.base import Engine
from lpfm_toolkit.errors import (
    ConfigError,
    CorruptImageError,
    OutputExistsError,
    RegionError,
    TaskNotSupportedError,
)
from lpfm_toolkit.prompts import Task
from lpfm_toolkit.provenance import DIGEST_BLOCK, DIGEST_SCHEME, PixelDigest, Provenance, idempotency_key
from lpfm_toolkit.sinks.base import OutputRef, OutputSpec, Sink
from lpfm_toolkit.sources.base import Annotation, ImageHandle, Region
from lpfm_toolkit.tiling import Stripe, StripeBlender, TileGrid, plan_stripes, tile_seed

log = logging.getLogger(__name__)

#: progress(done_tiles, total_tiles) — the CLI passes a rich progress bar's update here
ProgressFn = Callable[[int, int], None]

#: the most output pixels one work item may have (about 260k × 260k): beyond it, planning alone would take
#: minutes and the result would not fit any disk; split it with regions
MAX_OUTPUT_PIXELS = 1 << 36
#: engines that give the same pixels every time (no samples, so no uncertainty map)
_DETERMINISTIC_ENGINES = ("classical", "identity")


@dataclass(frozen=True)
class WorkItem:
    """One unit of work: a region at a level, optionally the annotation it came from."""

    level: int
    region: Region
    task: Task
    seed: int = 0
    annotation: Annotation | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        if self.annotation is not None:
            ident = self.annotation.name or self.annotation.id or "annotation"
            cls = f"{self.annotation.class_name}: " if self.annotation.class_name else ""
            return f"{cls}{ident}"
        r = self.region
        return f"level {self.level} ({r.x},{r.y},{r.width},{r.height})"


@dataclass
class EnhanceResult:
    """The outcome of one work item: where the result is and how it was made."""

    item: WorkItem
    output: OutputRef
    skipped: bool  # True when an identical earlier result was found and nothing was recomputed
    #: why an earlier result of the same key was not reused but made again (it failed its check), or None
    remade: str | None = None

    @property
    def provenance(self) -> Provenance:
        return self.output.provenance


def plan(
    handle: ImageHandle,
    task: Task,
    *,
    level: int = 0,
    region: Region | None = None,
    annotations: Sequence[Annotation] | None = None,
    seed: int = 0,
) -> list[WorkItem]:
    """Work items for the whole level, one region, or the bounding box of each annotation."""
    if not 0 <= level < len(handle.levels):
        raise RegionError(
            f"level {level} does not exist in {handle.name}", f"choose a level from 0 to {len(handle.levels) - 1}"
        )
    if annotations is not None:
        items = []
        lv = handle.levels[level]
        for ann in annotations:
            box = ann.bounds_region(lv.downsample)
            x0, y0 = max(0, box.x), max(0, box.y)
            x1, y1 = min(lv.width, box.x + box.width), min(lv.height, box.y + box.height)
            if x1 <= x0 or y1 <= y0:
                raise RegionError(
                    f"annotation {ann.name or ann.id} lies outside {handle.name}",
                    "check that the annotations belong to this image",
                )
            items.append(WorkItem(level, Region(x0, y0, x1 - x0, y1 - y0), task, seed, ann))
        return items
    region = region or handle.full_region(level)
    handle.check_region(level, region)
    check_size(region, task)
    return [WorkItem(level, region, task, seed)]


def run_selection(
    handle: ImageHandle,
    sink: Sink,
    engine: Engine,
    task: Task,
    *,
    level: int = 0,
    annotation: Annotation | None = None,
    seed: int = 0,
    **run_options: Any,
) -> EnhanceResult:
    """:func:`plan` the whole level (or one annotation's box) and :func:`run_item` it; ``run_options`` are
    run_item's keywords. What the QuPath and OMERO workflows run for each of their items."""
    (item,) = plan(handle, task, level=level, annotations=[annotation] if annotation is not None else None, seed=seed)
    return run_item(handle, item, engine, sink, **run_options)


def check_size(region: Region, task: Task) -> None:
    """Refuse a work item whose output would exceed :data:`MAX_OUTPUT_PIXELS` (before any tile is planned)."""
    pixels = region.width * region.height * task.scale**2
    if pixels > MAX_OUTPUT_PIXELS:
        raise RegionError(
            f"the output of {region.width}×{region.height} px at {task.label} would have "
            f"{pixels:.3g} pixels, more than the {MAX_OUTPUT_PIXELS:.3g} one run makes",
            "choose a smaller --region (or a coarser --level) and run it in parts",
        )


def resolve_engine_name(engine: str, model: str | None, task: Task | None = None, channels: int | None = None) -> str:
    """The engine ``auto`` stands for here, for ``task`` (without loading any model)."""
    if engine != "auto":
        return engine
    if model:
        return "lpfm"
    from lpfm_toolkit.engine import default_engine_name

    return default_engine_name(task, channels)


def preflight_engine(
    engine: str,
    task: Task,
    channel_names: Sequence[str],
    *,
    method: str | None = None,
    model: str | None = None,
    steps: int | None = None,
    samples: int = 1,
    explicit: Collection[str] = ("method", "steps", "samples"),
) -> str:
    """Everything about the engine options that can be checked without loading a model; returns the engine name.

    Refuses options the chosen engine would ignore (``--method`` with a learned model, ``--steps`` or
    ``--samples`` with a deterministic engine, whose "uncertainty" would be all zeros), and for the learned
    engine reads the bundle's index to check that it was trained for ``task`` on this many channels.
    ``explicit`` names the options the user gave for this run; ``method`` and ``steps`` that come from a
    settings file for another engine are not refused (the engine ignores them).
    """
    name = resolve_engine_name(engine, model, task, len(channel_names))
    if "method" not in explicit and name != "classical":
        method = None
    if "steps" not in explicit and name != "lpfm":
        steps = None
    if method is not None and name != "classical":
        raise ConfigError(
            f"--method {method} is a classical method, but the engine is {name}",
            "add --engine classical, or drop --method",
        )
    if name in _DETERMINISTIC_ENGINES:
        if samples > 1:
            raise ConfigError(
                f"--samples {samples} needs a stochastic engine: the {name} engine gives the same "
                "pixels every time, so its uncertainty map would be all zeros",
                "drop --samples, or use --engine lpfm (with --steps ≥ 1)",
            )
        if steps is not None:
            raise ConfigError(
                f"--steps is a setting of the lpfm engine, not of the {name} engine",
                "drop --steps, or use --engine lpfm",
            )
        if name == "classical":
            from lpfm_toolkit.engine.classical import ClassicalEngine

            ClassicalEngine(method=method).check(task, channel_names)
        return name
    if name != "lpfm":
        return name
    if samples > 1 and steps == 0:
        raise ConfigError(
            f"--samples {samples} with --steps 0 runs the deterministic restorer only: the "
            "uncertainty map would be all zeros",
            "give --steps 1 or more, or drop --samples",
        )
    _preflight_bundle(model, task, channel_names)
    return name


def _preflight_bundle(model: str | None, task: Task, channel_names: Sequence[str]) -> None:
    """Check the bundle's index (tasks, stains, input channels) without loading any weights."""
    import json

    from lpfm_toolkit.engine.bundle import read_index, resolve, stains_match
    from lpfm_toolkit.engine.taskcodes import TASK_NAMES, task_code

    path = resolve(model)
    index = read_index(path)
    tasks = list(index.get("tasks", []))
    wanted = TASK_NAMES[task_code(task)]
    name = index.get("name", path.name)
    if wanted not in tasks:
        raise TaskNotSupportedError(
            f"the lpfm engine cannot run {task.label}: bundle {name} was trained for {', '.join(tasks) or 'nothing'}",
            "use --engine classical, or a bundle trained for this task (--model PATH)",
        )
    stains = index.get("stains")
    if task.source_stain is not None and task.kind.value == "virtual_stain" and isinstance(stains, dict):
        pair = (getattr(task.source_stain, "value", None), getattr(task.target_stain, "value", None))
        if not stains_match(stains, *pair):
            raise TaskNotSupportedError(
                f"the lpfm engine cannot run {task.label}: bundle {name} translates "
                f"{stains.get('source')}→{stains.get('target')}",
                "use a bundle trained for this pair",
            )
    components = index.get("components", {})
    role = "stainer" if task.kind.value == "virtual_stain" and "stainer" in components else "restorer"
    folder = components.get(role, role)
    try:
        config = json.loads((path / folder / "config.json").read_text())
        expected = int(config.get("config", {}).get("in_channels", 3))
    except (OSError, ValueError, TypeError):
        return  # loading the bundle reports a damaged component with its own message
    if len(channel_names) != expected:
        raise TaskNotSupportedError(
            f"the lpfm engine cannot run {task.label}: it needs {expected}-channel (RGB) "
            f"input, got {len(channel_names)} channels ({', '.join(channel_names)})",
            "use an RGB brightfield image or the classical engine",
        )


def source_record(handle: ImageHandle, item: WorkItem) -> dict[str, Any]:
    """The provenance ``source`` block of one work item."""
    rec: dict[str, Any] = {
        "system": handle.system,
        "uri": handle.uri,
        "name": handle.name,
        "fingerprint": handle.fingerprint(),
        "level": item.level,
        "downsample": handle.levels[item.level].downsample,
        "region": list(item.region.as_tuple()),
        "mpp": list(handle.level_mpp(item.level)) if handle.mpp else None,
        "channels": handle.channel_names,
        "dtype": str(np.dtype(handle.dtype)),
    }
    extra_id = getattr(handle, "source_id", None)
    if extra_id is not None:
        rec["id"] = extra_id
    if item.annotation is not None:
        ann = item.annotation
        rec["annotation"] = {
            "id": ann.id,
            "name": ann.name,
            "class": ann.class_name,
            "source": ann.source,
            "wkt": ann.geometry.wkt if ann.geometry is not None else None,
        }
    return rec


def output_name(handle: ImageHandle, task: Task, item: WorkItem) -> str:
    """``<image> [lpfm sr×2]``, with the annotation named when there is one."""
    suffix = (
        f" {item.annotation.class_name or ''} {item.annotation.name or item.annotation.id or ''}".rstrip()
        if item.annotation is not None
        else ""
    )
    return f"{handle.name}{suffix} [lpfm {task.label}]"


def output_fields(handle: ImageHandle, item: WorkItem, engine: Engine) -> dict[str, str]:
    """What file sinks name the result's file from (:func:`~lpfm_toolkit.sinks.ometiff.name_fields`): the image's
    stem, task, engine and, when a region or annotation restricts the work, the region (``x-y-w-h``, or the
    annotation's class and name)."""
    from lpfm_toolkit.sinks.ometiff import name_fields

    region = None
    if item.annotation is not None:
        ann = item.annotation
        region = " ".join(str(v) for v in (ann.class_name, ann.name or ann.id or "annotation") if v)
    elif item.region != handle.full_region(item.level):
        region = "-".join(str(v) for v in item.region.as_tuple())
    return name_fields(handle.name, item.task, engine.describe(), item.level, region)


def output_options(
    handle: ImageHandle,
    item: WorkItem,
    engine: Engine,
    compression: str | None,
    uncertainty: bool,
    jpeg: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """What about the stored output the key must distinguish: compression as resolved, and the uncertainty map.

    ``auto`` is resolved as the OME-TIFF writer does (JPEG for 8-bit RGB, zlib otherwise), so ``auto`` and
    ``jpeg`` are one result, and a lossless re-run never reuses a JPEG one.
    """
    if compression == "auto":
        channels = engine.output_channels(item.task, handle.channel_names)
        rgb8 = list(channels) == ["R", "G", "B"] and (
            len(channels) != len(handle.channel_names) or np.dtype(handle.dtype) == np.uint8
        )
        compression = "jpeg" if rgb8 else "zlib"
    options: dict[str, Any] = {"compression": compression, "uncertainty": bool(uncertainty)}
    if compression == "jpeg":
        # a q98 4:4:4 result is not a q90 4:2:0 one: the stored pixels differ
        if jpeg is None:
            from lpfm_toolkit.sinks.ometiff import JPEG_QUALITY, JPEG_SUBSAMPLING

            jpeg = (JPEG_QUALITY, JPEG_SUBSAMPLING)
        options["jpeg_quality"], options["jpeg_subsampling"] = int(jpeg[0]), str(jpeg[1])
    return options


def key_for(
    handle: ImageHandle,
    item: WorkItem,
    engine: Engine,
    tiling: dict[str, int],
    *,
    compression: str | None = None,
    uncertainty: bool = False,
    jpeg: tuple[int, str] | None = None,
) -> str:
    """The idempotency key :func:`run_item` uses; ``compression`` as given to the sink (None: a sink without),
    ``jpeg`` the sink's (quality, chroma sub-sampling) when it can write JPEG."""
    identity = {"system": handle.system, "fingerprint": handle.fingerprint()}
    region = {
        "level": item.level,
        "region": list(item.region.as_tuple()),
        "annotation": item.annotation.id if item.annotation is not None else None,
    }
    described = {
        **engine.describe(),
        "tiling": tiling,
        "output": output_options(handle, item, engine, compression, uncertainty, jpeg),
    }
    return idempotency_key(identity, region, item.task.to_dict(), described, item.seed)


def _max_value(dtype: np.dtype) -> float:
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        return float(np.iinfo(dtype).max)
    return 1.0


def to_float(pixels: np.ndarray) -> np.ndarray:
    """Pixels of any integer type → float32 in [0, 1] (floats are passed through)."""
    if pixels.dtype.kind == "f":
        return pixels.astype(np.float32, copy=False)
    return np.multiply(pixels, np.float32(1.0 / _max_value(pixels.dtype)), dtype=np.float32)


def from_float(pixels: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 in [0, 1] → ``dtype`` with rounding and clipping."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return pixels.astype(dtype)
    m = _max_value(dtype)
    out = np.multiply(pixels, np.float32(m), dtype=np.float32)  # in place from here: one temporary, not four
    out += np.float32(0.5)
    np.floor(out, out=out)
    np.clip(out, 0, m, out=out)
    return out.astype(dtype)


def _overview(handle: ImageHandle, item: WorkItem, max_pixels: int = 1024 * 1024) -> np.ndarray:
    """The region read at a coarse enough level to hold at most ``max_pixels`` (for engine.prepare)."""
    lv0 = handle.levels[item.level]
    r = item.region
    target = max(1.0, (r.width * r.height / max_pixels) ** 0.5)
    abs_ds = lv0.downsample * target
    level = max(item.level, handle.best_level_for_downsample(abs_ds))
    f = lv0.downsample / handle.levels[level].downsample
    lv = handle.levels[level]
    x, y = int(r.x * f), int(r.y * f)
    w = max(1, min(lv.width - x, round(r.width * f)))
    h = max(1, min(lv.height - y, round(r.height * f)))
    img = to_float(handle.read_region(level, x, y, w, h))
    step = max(1, int(np.ceil((w * h / max_pixels) ** 0.5)))
    return img[::step, ::step]


class _StripeAssembly:
    """Output rows assembled on disk from vertical stripes, then read back in row order.

    Only for writers that take full-width rows alone (OMERO); the OME-TIFF writer takes stripes directly.
    """

    def __init__(self, spec: OutputSpec, channels: int, dtype: np.dtype, uncertainty: bool) -> None:
        import tempfile

        self.width, self.height, self.channels, self.dtype = spec.width, spec.height, channels, np.dtype(dtype)
        self._dir = tempfile.TemporaryDirectory(prefix="lpfm-stripes-")
        self._img = self._unc = None
        try:
            self._img = open(f"{self._dir.name}/img.raw", "w+b")  # noqa: SIM115 - closed in close()
            self._img.truncate(self.width * self.height * channels * self.dtype.itemsize)
            self._unc = open(f"{self._dir.name}/unc.raw", "w+b") if uncertainty else None  # noqa: SIM115
            if self._unc is not None:
                self._unc.truncate(self.width * self.height * 4)
        except BaseException:
            # nothing half-made stays behind: close what opened, remove the scratch folder
            for f in (self._img, self._unc):
                if f is not None:
                    f.close()
            self._dir.cleanup()
            raise
        self._next_row: dict[int, int] = {}  # stripe x → next output row to write

    def write_block(self, x: int, rows: np.ndarray, unc: np.ndarray | None = None) -> None:
        y = self._next_row.get(x, 0)
        itemsize = self.channels * self.dtype.itemsize
        for i in range(rows.shape[0]):
            os.pwrite(
                self._img.fileno(), np.ascontiguousarray(rows[i]).tobytes(), ((y + i) * self.width + x) * itemsize
            )
            if self._unc is not None and unc is not None:
                os.pwrite(
                    self._unc.fileno(),
                    np.ascontiguousarray(unc[i], np.float32).tobytes(),
                    ((y + i) * self.width + x) * 4,
                )
        self._next_row[x] = y + rows.shape[0]

    def rows(self, chunk: int = 256) -> Any:
        """Yield ``(rows, uncertainty)`` blocks top to bottom."""
        row_bytes = self.width * self.channels * self.dtype.itemsize
        for y in range(0, self.height, chunk):
            n = min(chunk, self.height - y)
            data = os.pread(self._img.fileno(), n * row_bytes, y * row_bytes)
            rows = np.frombuffer(data, self.dtype).reshape(n, self.width, self.channels)
            unc = None
            if self._unc is not None:
                raw = os.pread(self._unc.fileno(), n * self.width * 4, y * self.width * 4)
                unc = np.frombuffer(raw, np.float32).reshape(n, self.width, 1)
            yield rows, unc

    def close(self) -> None:
        self._img.close()
        if self._unc is not None:
            self._unc.close()
        self._dir.cleanup()


class _CarryFile:
    """The carries one stripe hands to the next, one per grid row, spooled through a scratch file."""

    def __init__(self) -> None:
        import tempfile

        self._f = tempfile.TemporaryFile(prefix="lpfm-carry-")
        self._shapes: list[tuple[tuple[int, ...], tuple[int, ...] | None]] = []
        self._read = 0

    def put(self, carry: tuple[np.ndarray, np.ndarray | None] | None) -> None:
        if carry is None:
            self._shapes.append(((0,), None))
            return
        band, extra = carry
        self._f.write(np.ascontiguousarray(band).data)
        if extra is not None:
            self._f.write(np.ascontiguousarray(extra).data)
        self._shapes.append((band.shape, extra.shape if extra is not None else None))

    def rewind(self) -> None:
        self._f.seek(0)

    def get(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        shape, xshape = self._shapes[self._read]
        self._read += 1
        if shape == (0,):
            return None
        band = np.empty(shape, np.float32)
        self._f.readinto(band.data)
        extra = None
        if xshape is not None:
            extra = np.empty(xshape, np.float32)
            self._f.readinto(extra.data)
        return band, extra

    def close(self) -> None:
        self._f.close()


def stripe_width_for(grid: TileGrid, scale: int, wanted: int, alignment: int, batch: int) -> int:
    """The stripe width actually used: at least ``wanted``, one tile and one engine batch of tiles wide,
    rounded up to a multiple of the writer's alignment and of the checksum blocks."""
    stride = max(1, grid.tile_size - grid.overlap)
    unit = math.lcm(alignment, DIGEST_BLOCK * scale)
    width = max(wanted, grid.tile_width * scale, batch * stride * scale)
    return -(-width // unit) * unit


def _file_state(handle: ImageHandle) -> tuple[int, int, int] | None:
    """Size, modification time and inode of a local source (None for other sources)."""
    path = getattr(handle, "path", None)
    if handle.system != "file" or path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return (-1, -1, -1)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _local_file(ref: OutputRef) -> Path | None:
    """The OME-TIFF file a result lives in, when it is a local file (not OMERO or an array)."""
    uri = str(ref.uri)
    if "://" in uri or not uri.lower().endswith((".ome.tiff", ".ome.tif")):
        return None
    return Path(uri)


@dataclass(frozen=True)
class Tiling:
    """How a work item is cut into tiles (part of its idempotency key)."""

    tile: int
    overlap: int

    def as_dict(self) -> dict[str, int]:
        return {"tile": self.tile, "overlap": self.overlap}


def resolve_tiling(
    handle: ImageHandle, item: WorkItem, engine: Engine, tile_size: int | None = None, overlap: int | None = None
) -> Tiling:
    """Stage 1: check the engine can run the item and fix its tiling (the engine's defaults where not given)."""
    engine.check(item.task, handle.channel_names)
    tile = tile_size or engine.tile_size
    ovl = engine.overlap if overlap is None else overlap
    if not 0 <= ovl < tile:
        raise RegionError(f"overlap {ovl} must be smaller than the tile size {tile}", "lower --overlap")
    check_size(item.region, item.task)
    return Tiling(tile, ovl)


def output_spec(handle: ImageHandle, item: WorkItem, engine: Engine, name: str, uncertainty: bool) -> OutputSpec:
    """Stage 2: the shape and meaning of the output: scaled size, the engine's channels, dtype, pixel size.

    Channels of another kind than the input's (virtual staining) are 8-bit RGB; otherwise the input's dtype.
    """
    task = item.task
    channels_out = engine.output_channels(task, handle.channel_names)
    same_kind = len(channels_out) == len(handle.channel_names)
    mpp_in = handle.level_mpp(item.level)
    return OutputSpec(
        name=name,
        width=item.region.width * task.scale,
        height=item.region.height * task.scale,
        channel_names=channels_out,
        dtype=np.dtype(handle.dtype) if same_kind else np.dtype(np.uint8),
        mpp=(mpp_in[0] / task.scale, mpp_in[1] / task.scale) if mpp_in else None,
        uncertainty=uncertainty,
        file_fields=output_fields(handle, item, engine),
    )


@dataclass
class StripeRun:
    """What stage 3 measured: checksums of the pixels read and written, engine time, how it was cut."""

    input_sha256: str
    output_sha256: str
    engine_seconds: float
    tiles: int
    stripe_width: int
    stripes: int


class StripeRunner:
    """Stage 3: runs a work item's tiles through the engine in vertical stripes into an open writer.

    A reader thread prefetches the next band of a stripe and a writer thread blends and emits the previous
    row while the engine works; the blend is bit-identical whatever the stripe width. Memory is one band of
    one stripe (stripes that a writer cannot take directly are assembled in a scratch file).
    """

    def __init__(
        self,
        handle: ImageHandle,
        item: WorkItem,
        engine: Engine,
        spec: OutputSpec,
        tiling: Tiling,
        *,
        progress: ProgressFn | None = None,
    ) -> None:
        self.handle, self.item, self.engine, self.spec = handle, item, engine, spec
        self.grid = TileGrid(item.region.width, item.region.height, tiling.tile, tiling.overlap)
        self.progress = progress
        self.scale = item.task.scale
        self.channels = len(spec.channel_names)
        self.batch = max(1, engine.batch_size)
        r = item.region
        self.in_digest = PixelDigest(r.height, r.width, len(handle.channel_names), handle.dtype)
        self.out_digest = PixelDigest(spec.height, spec.width, self.channels, spec.dtype)
        self.engine_seconds = 0.0
        self.done = 0

    def prepare(self) -> None:
        """Give the engine what it needs from the whole region first (virtual staining: an overview)."""
        task = self.item.task
        overview = (
            _overview(self.handle, self.item)
            if self.engine.needs_overview(task)
            else np.zeros((1, 1, len(self.handle.channel_names)), np.float32)
        )
        t0 = time.perf_counter()
        self.engine.prepare(task, overview)
        self.engine_seconds += time.perf_counter() - t0

    def run(self, writer: Any, stripe_width: int = 2048) -> StripeRun:
        """Make every stripe and hand the finished rows (or stripes) to ``writer`` (after :meth:`prepare`)."""
        spec, uncertainty = self.spec, self.spec.uncertainty
        alignment = writer.column_alignment
        width = stripe_width_for(self.grid, self.scale, stripe_width, alignment or 1, self.batch)
        parts = plan_stripes(self.grid, self.scale, width)
        direct = alignment is not None or len(parts) == 1
        assembly = None if direct else _StripeAssembly(spec, self.channels, spec.dtype, uncertainty)

        def emit(x: int, rows: np.ndarray, unc: np.ndarray | None) -> None:
            out_rows = from_float(rows, spec.dtype)
            self.out_digest.update(x, out_rows)
            unc_rows = unc if uncertainty else None
            if assembly is not None:
                assembly.write_block(x, out_rows, unc_rows)
            elif alignment is None:
                writer.write_rows(out_rows, unc_rows)
            else:
                writer.write_block(x, out_rows, unc_rows)

        carries: list[_CarryFile] = []
        try:
            carry_in: _CarryFile | None = None
            for k, stripe in enumerate(parts):
                carry_out = _CarryFile() if k + 1 < len(parts) else None
                if carry_out is not None:
                    carries.append(carry_out)
                if carry_in is not None:
                    carry_in.rewind()
                self.stripe(stripe, emit, carry_in, carry_out)
                if carry_in is not None:
                    carry_in.close()
                carry_in = carry_out
            if assembly is not None:
                for rows, unc in assembly.rows():
                    writer.write_rows(rows, unc)
        finally:
            for c in carries:
                c.close()
            if assembly is not None:
                assembly.close()
        return StripeRun(
            self.in_digest.hexdigest(),
            self.out_digest.hexdigest(),
            self.engine_seconds,
            len(self.grid),
            width,
            len(parts),
        )

    def stripe(
        self,
        stripe: Stripe,
        emit: Callable[[int, np.ndarray, np.ndarray | None], None],
        carry_in: _CarryFile | None,
        carry_out: _CarryFile | None,
    ) -> None:
        """Run one stripe's tiles through the engine, band by band, with reading and writing overlapped."""
        handle, item, engine, grid, s = self.handle, self.item, self.engine, self.grid, self.scale
        task, r, bs = item.task, item.region, self.batch
        blender = StripeBlender(grid, s, self.channels, stripe, 1 if self.spec.uncertainty else 0)
        own_x0, own_x1 = stripe.lo // s, stripe.hi // s  # input columns this stripe hashes
        x0, x1 = own_x0, min(r.width, own_x0 + -(-blender.width // s))  # input columns it reads
        hashed_to = 0
        total = len(grid)

        def read_band(row: int) -> np.ndarray:
            """Reader stage: read one band of the stripe, hash the rows not hashed yet, convert to float."""
            nonlocal hashed_to
            y = grid.ys[row]
            band = handle.read_region(item.level, r.x + x0, r.y + y, x1 - x0, grid.tile_height)
            new = band[hashed_to - y :, : own_x1 - own_x0] if hashed_to > y else band[:, : own_x1 - own_x0]
            self.in_digest.update(own_x0, new)
            hashed_to = y + grid.tile_height
            if band.dtype.kind == "f" and not np.isfinite(band).all():
                bad = np.argwhere(~np.isfinite(band))[0]
                raise CorruptImageError(
                    f"{handle.name} has NaN or infinite pixels (first at x={r.x + x0 + bad[1]}, "
                    f"y={r.y + y + bad[0]} of level {item.level}); they would spread through "
                    "every tile they touch",
                    "replace them with finite values (e.g. 0), or choose a --region without them",
                )
            return to_float(band)

        def finish_row(row: int, outputs: list[tuple[Any, np.ndarray, np.ndarray | None]]) -> None:
            """Writer stage: blend a row of tile outputs, hand on the carry, emit the finished rows."""
            carry = carry_in.get() if carry_in is not None else None
            handed = blender.add_row(row, outputs, carry)
            if carry_out is not None:
                carry_out.put(handed)
            rows, unc = blender.release(row)
            if rows.shape[0]:
                emit(stripe.lo, rows, unc)

        tiles_by_row = [[t for t in grid.row(row) if t.col in stripe.columns] for row in range(grid.n_rows)]
        # Three stages overlap: the reader prefetches the next band and the writer blends and emits
        # the previous row while the engine works. At most one band is read ahead and one row written.
        with (
            ThreadPoolExecutor(1, thread_name_prefix="lpfm-read") as reader,
            ThreadPoolExecutor(1, thread_name_prefix="lpfm-write") as post,
        ):
            future = reader.submit(read_band, 0)
            pending = None
            try:
                for row in range(grid.n_rows):
                    fband = future.result()
                    if row + 1 < grid.n_rows:
                        future = reader.submit(read_band, row + 1)
                    tiles = tiles_by_row[row]
                    outputs: list[tuple[Any, np.ndarray, np.ndarray | None]] = []
                    for b in range(0, len(tiles), bs):
                        batch = tiles[b : b + bs]
                        views = [fband[:, t.x - x0 : t.x - x0 + t.width] for t in batch]
                        stack = views[0][None] if len(views) == 1 else np.stack(views)  # no copy for one tile
                        seeds = [tile_seed(item.seed, item.level, r.x + t.x, r.y + t.y) for t in batch]
                        t0 = time.perf_counter()
                        result = engine.process(stack, task, seeds)
                        self.engine_seconds += time.perf_counter() - t0
                        for i, t in enumerate(batch):
                            unc = result.uncertainty[i] if result.uncertainty is not None else None
                            outputs.append((t, result.pixels[i], unc))
                        self.done += len(batch)
                        if self.progress is not None:
                            self.progress(self.done, total)
                    if pending is not None:
                        pending.result()  # back-pressure, and re-raises the writer's errors here
                    pending = post.submit(finish_row, row, outputs)
                if pending is not None:
                    pending.result()
                    pending = None
            finally:
                if pending is not None:  # stop the writer before anything is cleaned up
                    pending.cancel()
                    try:
                        pending.result()
                    except BaseException:  # noqa: BLE001 - the first error is the one being raised
                        pass


def make_provenance(
    handle: ImageHandle,
    item: WorkItem,
    engine: Engine,
    key: str,
    tiling: Tiling,
    spec: OutputSpec,
    run: StripeRun,
    total_seconds: float,
    source: dict[str, Any] | None = None,
) -> Provenance:
    """Stage 4: the record of how the output was made (source, task, engine, tiling, checksums, durations)."""
    task = item.task
    described = engine.describe()
    bundle_path = getattr(getattr(engine, "bundle", None), "path", None)
    if bundle_path is not None:  # where to find the bundle again (not part of the key: folders move)
        described["model_path"] = str(Path(bundle_path).resolve())
    options = getattr(engine, "options", None)  # the EngineOptions it was built from (options.build_engine)
    if options is not None:
        described["options"] = options.to_dict()
    return Provenance(
        source=source if source is not None else source_record(handle, item),
        prompt=task.prompt,
        task=task.to_dict(),
        engine=described,
        seed=item.seed,
        idempotency_key=key,
        tiling={
            **tiling.as_dict(),
            "scale": task.scale,
            "tiles": run.tiles,
            "stripe_width": run.stripe_width,
            "stripes": run.stripes,
            "checksums": DIGEST_SCHEME,
        },
        output={
            "name": spec.name,
            "shape": [spec.height, spec.width, len(spec.channel_names)],
            "dtype": str(np.dtype(spec.dtype)),
            "channels": list(spec.channel_names),
            "mpp": list(spec.mpp) if spec.mpp else None,
        },
        input_sha256=run.input_sha256,
        output_sha256=run.output_sha256,
        durations={"total_s": round(total_seconds, 4), "engine_s": round(run.engine_seconds, 4)},
    )


def run_item(
    handle: ImageHandle,
    item: WorkItem,
    engine: Engine,
    sink: Sink,
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    force: bool = False,
    samples_uncertainty: bool = False,
    progress: ProgressFn | None = None,
    stripe_width: int = 2048,
    verify: str = "quick",
) -> EnhanceResult:
    """Enhance one work item into ``sink``; skip it when an identical, intact result already exists.

    The stages, each usable alone: :func:`resolve_tiling` → the idempotency key and an earlier result →
    :func:`output_spec` → :class:`StripeRunner` → :func:`make_provenance` → commit.

    An earlier local result is checked before it is reused — ``verify="quick"`` reads its header, levels,
    size and both provenance copies; ``"full"`` also decodes every level against its checksums — and made
    again when it fails (``EnhanceResult.remade`` says why). A file at the target that lpfm did not write
    is never replaced. The output is made in vertical stripes ``stripe_width`` output pixels wide (rounded
    up, see :func:`stripe_width_for`): memory is that of one band of one stripe, whatever the region's width.
    """
    from lpfm_toolkit import verify as _verify

    if verify not in ("quick", "full"):
        raise ValueError(f"verify must be 'quick' or 'full', not {verify!r}")
    task = item.task
    before = _file_state(handle)  # taken before the fingerprint, so a change during the run is always seen
    tiling = resolve_tiling(handle, item, engine, tile_size, overlap)
    jpeg = (sink.jpeg_quality, sink.jpeg_subsampling) if hasattr(sink, "jpeg_quality") else None
    key = key_for(
        handle,
        item,
        engine,
        tiling.as_dict(),
        compression=getattr(sink, "compression", None),
        uncertainty=samples_uncertainty,
        jpeg=jpeg,
    )
    name = output_name(handle, task, item)
    spec = output_spec(handle, item, engine, name, samples_uncertainty)
    remade = None
    found = None if force else sink.find_spec(key, spec)
    if found is not None:
        path = _local_file(found)
        problems = _verify.check_output(path, found.provenance, full=verify == "full") if path else []
        if not problems:
            log.info("skipping %s: already done as %s", item.label, found.uri)
            return EnhanceResult(item, found, skipped=True)
        remade = "; ".join(problems)
        log.warning("%s is damaged (%s): making it again", found.uri, remade)
        if getattr(sink, "overwrite", None) is False:  # our own output of this very key: it may be replaced
            sink = copy.copy(sink)
            sink.overwrite = True  # type: ignore[attr-defined]
    target = getattr(sink, "target", None)
    if callable(target):  # a file sink: never write over the original, nor any file lpfm did not make
        final = Path(target(key, spec))
        if handle.system == "file" and final.exists() and final.resolve() == Path(handle.uri).resolve():
            raise OutputExistsError(f"refusing to write over the original {final}", "choose another --out")
        _verify.check_target(final, force=True, uncertainty=samples_uncertainty)

    source = source_record(handle, item)
    t_start = time.perf_counter()
    runner = StripeRunner(handle, item, engine, spec, tiling, progress=progress)
    runner.prepare()  # before anything is created at the sink
    with sink.open(spec, key, source) as writer:
        run = runner.run(writer, stripe_width)
        if _file_state(handle) != before:  # the pixels read may mix two versions of the file: keep nothing
            raise CorruptImageError(
                f"{handle.name} changed while it was being read", "wait until it is completely copied, then run again"
            )
        prov = make_provenance(handle, item, engine, key, tiling, spec, run, time.perf_counter() - t_start, source)
        ref = writer.commit(prov)
    path = _local_file(ref)
    sidecar = ref.extra.get("sidecar")
    if path is not None and sidecar:
        try:
            _verify.record_stored(path, ref.provenance, Path(sidecar))
        except (OSError, CorruptImageError) as exc:  # the output is complete; only its stored checksums are missing
            log.warning("could not record the stored checksums of %s: %s", path, exc)
    return EnhanceResult(item, ref, skipped=False, remade=remade)

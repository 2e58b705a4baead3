"""Quality control: find what needs enhancing, tile by tile, and summarise it per slide.

:func:`assess` reads a region at a pyramid level tile by tile (memory: one tile and the per-tile numbers)
and runs a degradation estimator on each — the classical one (no weights) or the learned one from the
default bundle. The :class:`SlideQC` it returns holds per-tile estimates and flags and a per-slide summary
(fraction of tissue out of focus, noisy, compressed; median noise σ; the worst regions), and is written as
JSON, CSV and a heat-map PNG by :func:`write_outputs`. :func:`flagged_regions` merges flagged tiles into
polygons for QuPath annotations and OMERO ROIs. :func:`auto_enhance` (``lpfm enhance --auto``) enhances
only flagged tiles, each with the task matching its defect, and scores them again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpfm_toolkit._version import __version__
from lpfm_toolkit.engine.estimate import ClassicalEstimator, Thresholds, TileEstimate
from lpfm_toolkit.errors import ConfigError, LpfmError
from lpfm_toolkit.sources.base import ImageHandle, Region

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
ESTIMATORS = ("auto", "classical", "learned")
#: defect → QuPath/OMERO class name and colour (RGB)
DEFECTS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "out_of_focus": ("lpfm: out of focus", (230, 60, 40)),
    "noisy": ("lpfm: noisy", (40, 120, 230)),
    "compressed": ("lpfm: compressed", (240, 190, 30)),
}
MIN_TISSUE = 0.25
QC_NAMESPACE = "lpfm-toolkit/qc"


def get_estimator(name: str = "auto", *, brightfield: bool = True) -> Any:
    """``classical``, ``learned`` (the default bundle's estimator), or ``auto``: learned when it loads."""
    if name not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {name!r}", f"use one of {', '.join(ESTIMATORS)}")
    if name == "classical" or not brightfield:
        if name == "learned":
            raise ConfigError(
                "the learned estimator is trained on RGB brightfield only", "use --estimator classical for fluorescence"
            )
        return ClassicalEstimator(brightfield)
    try:
        from lpfm_toolkit.engine.estimate_learned import LearnedEstimator

        return LearnedEstimator.load()
    except Exception as exc:  # torch missing, or no estimator in the bundle
        if name == "learned":
            if isinstance(exc, LpfmError):  # it already says what to do
                raise
            raise ConfigError(
                f"the learned estimator could not be loaded ({exc})", "install torch, or use --estimator classical"
            ) from exc
        log.info("learned estimator unavailable (%s); using the classical one", exc)
        return ClassicalEstimator(brightfield)


@dataclass(frozen=True)
class TileQC:
    """One tile: where it is (pixels of the level), what the estimator saw, and what is flagged."""

    x: int
    y: int
    width: int
    height: int
    estimate: TileEstimate
    flags: dict[str, bool]

    @property
    def flagged(self) -> bool:
        return any(self.flags.values())

    def severity(self, t: Thresholds) -> float:
        """How far past its thresholds the tile is (≤ 1: not flagged); 0 for tiles without enough tissue."""
        if not any(self.flags.values()) and self.estimate.tissue < MIN_TISSUE:
            return 0.0
        e = self.estimate
        parts = [e.noise_sigma / t.noise, t.quality / max(e.jpeg_quality, 1.0)]
        if not math.isnan(e.blur_sigma):
            parts.append(e.blur_sigma / t.blur)
        return float(max(parts))

    def task(self) -> str | None:
        """The enhancement this tile needs: deblur, denoise, restore (both, or blur with compression), or None."""
        blur, noise, jpeg = self.flags["out_of_focus"], self.flags["noisy"], self.flags["compressed"]
        if blur and (noise or jpeg):
            return "restore"
        if blur:
            return "deblur"
        if noise or jpeg:
            return "denoise"
        return None

    def row(self, mpp: float | None) -> dict[str, Any]:
        e = self.estimate
        return {
            "x": self.x,
            "y": self.y,
            "width": self.width,
            "height": self.height,
            "tissue": round(e.tissue, 4),
            "blur_sigma": _r(e.blur_sigma),
            "resolution": _r(e.resolution(mpp)),
            "noise_sigma": _r(e.noise_sigma),
            "jpeg_quality": _r(e.jpeg_quality),
            "jpeg_score": _r(e.jpeg_score),
            **{k: v for k, v in self.flags.items()},
            "task": self.task() or "",
        }


def _r(v: float, digits: int = 3) -> float | None:
    return None if v is None or math.isnan(v) else round(float(v), digits)


@dataclass
class SlideQC:
    """Per-tile estimates and flags of one slide region, and its summary."""

    name: str
    uri: str
    system: str
    level: int
    downsample: float
    mpp: float | None  # µm per pixel at the level
    region: Region
    tile: int
    estimator: dict[str, Any]
    thresholds: Thresholds
    tiles: list[TileQC] = field(default_factory=list)
    seconds: float = 0.0
    source_id: str | None = None

    def tissue_tiles(self) -> list[TileQC]:
        return [t for t in self.tiles if t.estimate.tissue >= MIN_TISSUE]

    def summary(self, worst: int = 5) -> dict[str, Any]:
        """Fractions of tissue area flagged per defect, medians, the ``worst`` tiles, and a ranking score."""
        tissue = self.tissue_tiles()
        area = sum(t.estimate.tissue * t.width * t.height for t in tissue)

        def frac(key: str) -> float:
            if not area:
                return 0.0
            return sum(t.estimate.tissue * t.width * t.height for t in tissue if t.flags[key]) / area

        blur = [t.estimate.blur_sigma for t in tissue if not math.isnan(t.estimate.blur_sigma)]
        noise = [t.estimate.noise_sigma for t in tissue]
        flagged = frac("out_of_focus"), frac("noisy"), frac("compressed")
        any_frac = (sum(t.estimate.tissue * t.width * t.height for t in tissue if t.flagged) / area) if area else 0.0
        ranked = sorted((t for t in tissue if t.flagged), key=lambda t: -t.severity(self.thresholds))[:worst]
        return {
            "tiles": len(self.tiles),
            "tissue_tiles": len(tissue),
            "out_of_focus_fraction": round(flagged[0], 4),
            "noisy_fraction": round(flagged[1], 4),
            "compressed_fraction": round(flagged[2], 4),
            "flagged_fraction": round(any_frac, 4),
            "median_blur_sigma": _r(float(np.median(blur))) if blur else None,
            "median_noise_sigma": _r(float(np.median(noise))) if noise else None,
            "median_resolution": _r(float(np.median(blur)) * 2.3548 * (self.mpp or 1.0)) if blur else None,
            "resolution_unit": "µm" if self.mpp else "px",
            "worst_regions": [
                {
                    "x": t.x,
                    "y": t.y,
                    "width": t.width,
                    "height": t.height,
                    "defects": [k for k, v in t.flags.items() if v],
                    "severity": round(t.severity(self.thresholds), 3),
                }
                for t in ranked
            ],
            "score": round(any_frac + 0.01 * (ranked[0].severity(self.thresholds) if ranked else 0.0), 4),
        }

    def key(self) -> str:
        """An idempotency key: the image, region, level, tiling, estimator and thresholds."""
        blob = json.dumps(
            [
                self.uri,
                self.system,
                self.level,
                list(self.region.as_tuple()),
                self.tile,
                self.estimator,
                self.thresholds.to_dict(),
            ],
            sort_keys=True,
            default=str,
        )
        return "qc-" + hashlib.sha256(blob.encode()).hexdigest()[:24]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uri": self.uri,
            "system": self.system,
            "id": self.source_id,
            "level": self.level,
            "downsample": self.downsample,
            "mpp": self.mpp,
            "region": list(self.region.as_tuple()),
            "tile": self.tile,
            "estimator": self.estimator,
            "thresholds": self.thresholds.to_dict(),
            "min_tissue": MIN_TISSUE,
            "toolkit_version": __version__,
            "key": self.key(),
            "seconds": round(self.seconds, 3),
            "summary": self.summary(),
            "tiles": [t.row(self.mpp) for t in self.tiles],
        }


def tile_boxes(region: Region, tile: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping ``tile``-px boxes over ``region`` (level pixels); the last row and column are moved
    back to end at the border, so every box has the full size (smaller only for regions under one tile)."""
    from lpfm_toolkit.tiling import tile_positions

    xs = tile_positions(region.width, tile, 0) if region.width > tile else [0]
    ys = tile_positions(region.height, tile, 0) if region.height > tile else [0]
    tw, th = min(tile, region.width), min(tile, region.height)
    return [(region.x + x, region.y + y, tw, th) for y in ys for x in xs]


def assess(
    handle: ImageHandle,
    *,
    level: int = 0,
    region: Region | None = None,
    tile: int = 256,
    estimator: Any = None,
    thresholds: Thresholds | None = None,
    progress: ProgressFn | None = None,
    batch: int = 8,
) -> SlideQC:
    """Estimate the degradations of every tile of ``region`` (default: the whole level) of ``handle``.

    Tiles are read one row-batch at a time, so memory does not grow with the slide.
    """
    from lpfm_toolkit.pipeline import to_float

    if tile < 32:
        raise ConfigError(f"QC tile size {tile} is too small", "use --tile 128 or more (256 is the default)")
    if not 0 <= level < len(handle.levels):
        from lpfm_toolkit.errors import RegionError

        raise RegionError(
            f"level {level} does not exist in {handle.name}", f"choose a level from 0 to {len(handle.levels) - 1}"
        )
    region = region or handle.full_region(level)
    handle.check_region(level, region)
    thresholds = thresholds or Thresholds()
    brightfield = handle.is_rgb
    if estimator is None or (not brightfield and getattr(estimator, "name", "") != "classical"):
        estimator = ClassicalEstimator(brightfield)  # the learned estimator knows RGB brightfield only
    boxes = tile_boxes(region, tile)
    lv = handle.levels[level]
    mpp = handle.level_mpp(level)
    qc = SlideQC(
        name=handle.name,
        uri=handle.uri,
        system=handle.system,
        level=level,
        downsample=lv.downsample,
        mpp=float(np.mean(mpp)) if mpp else None,
        region=region,
        tile=tile,
        estimator=estimator.describe(),
        thresholds=thresholds,
        source_id=str(getattr(handle, "source_id", "")) or None,
    )
    t0 = time.perf_counter()
    for start in range(0, len(boxes), batch):
        chunk = boxes[start : start + batch]
        pixels = [to_float(handle.read_region(level, *b)) for b in chunk]
        if not brightfield or any(p.shape != pixels[0].shape for p in pixels):
            ests = [estimator.estimate(p[None])[0] for p in pixels]
        else:
            ests = estimator.estimate(np.stack(pixels))
        for b, e in zip(chunk, ests):
            qc.tiles.append(TileQC(*b, estimate=e, flags=e.flags(thresholds, MIN_TISSUE)))
        if progress is not None:
            progress(len(qc.tiles), len(boxes))
    qc.seconds = time.perf_counter() - t0
    return qc


def rank(results: Sequence[SlideQC]) -> list[SlideQC]:
    """Slides worst first (largest flagged tissue fraction, then the worst tile's severity)."""
    return sorted(results, key=lambda q: -q.summary()["score"])


# -- regions --------------------------------------------------------------------------------------------------
@dataclass
class FlaggedRegion:
    """Connected flagged tiles of one defect as a polygon in level-0 pixels, with their mean scores."""

    defect: str
    geometry: Any  # shapely Polygon, level-0 pixels
    tiles: list[TileQC]

    @property
    def class_name(self) -> str:
        return DEFECTS[self.defect][0]

    @property
    def color(self) -> tuple[int, int, int]:
        return DEFECTS[self.defect][1]

    def measurements(self, mpp: float | None = None) -> dict[str, float]:
        """QuPath-style measurements: name → number."""
        es = [t.estimate for t in self.tiles]
        blur = [e.blur_sigma for e in es if not math.isnan(e.blur_sigma)]
        out = {
            "lpfm tiles": float(len(es)),
            "lpfm tissue fraction": round(float(np.mean([e.tissue for e in es])), 4),
            "lpfm noise sigma": round(float(np.mean([e.noise_sigma for e in es])), 3),
            "lpfm JPEG quality": round(float(np.min([e.jpeg_quality for e in es])), 1),
        }
        if blur:
            out["lpfm blur sigma (px)"] = round(float(np.mean(blur)), 3)
            out[f"lpfm resolution ({'µm' if mpp else 'px'})"] = round(float(np.mean(blur)) * 2.3548 * (mpp or 1), 3)
        return out


def flagged_regions(qc: SlideQC) -> list[FlaggedRegion]:
    """Flagged tiles merged per defect into connected polygons (level-0 pixel coordinates)."""
    from shapely.geometry import box
    from shapely.ops import unary_union

    ds = qc.downsample
    out = []
    for defect in DEFECTS:
        tiles = [t for t in qc.tiles if t.flags[defect]]
        if not tiles:
            continue
        boxes = [box(t.x * ds, t.y * ds, (t.x + t.width) * ds, (t.y + t.height) * ds) for t in tiles]
        merged = unary_union(boxes)
        parts = list(merged.geoms) if hasattr(merged, "geoms") else [merged]
        for poly in parts:
            poly = poly.simplify(0)
            members = [t for t, b in zip(tiles, boxes) if poly.intersects(b.representative_point())]
            out.append(FlaggedRegion(defect, poly, members))
    return out


# -- outputs --------------------------------------------------------------------------------------------------
def _atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def write_json(qc: SlideQC, path: Path) -> Path:
    return _atomic(Path(path), (json.dumps(qc.to_dict(), indent=1, ensure_ascii=False) + "\n").encode())


def write_csv(qc: SlideQC, path: Path) -> Path:
    rows = [t.row(qc.mpp) for t in qc.tiles]
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return _atomic(Path(path), buf.getvalue().encode())


def write_summary_csv(results: Sequence[SlideQC], path: Path) -> Path:
    """One row per slide, worst first."""
    buf = io.StringIO()
    cols = [
        "rank",
        "name",
        "uri",
        "id",
        "tissue_tiles",
        "flagged_fraction",
        "out_of_focus_fraction",
        "noisy_fraction",
        "compressed_fraction",
        "median_blur_sigma",
        "median_noise_sigma",
        "score",
    ]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for i, q in enumerate(rank(results), 1):
        w.writerow({"rank": i, "name": q.name, "uri": q.uri, "id": q.source_id or "", **q.summary()})
    return _atomic(Path(path), buf.getvalue().encode())


def overview(handle: ImageHandle, level: int, region: Region, max_size: int = 768) -> np.ndarray:
    """The region as an 8-bit RGB picture at most ``max_size`` px on its long side (coarse levels first)."""
    from lpfm_toolkit.imageops import resize

    lv0 = handle.levels[level]
    factor = max(1.0, max(region.width, region.height) / max_size)
    best = max(level, handle.best_level_for_downsample(lv0.downsample * factor))
    f = lv0.downsample / handle.levels[best].downsample
    lv = handle.levels[best]
    x, y = int(region.x * f), int(region.y * f)
    w = max(1, min(lv.width - x, round(region.width * f)))
    h = max(1, min(lv.height - y, round(region.height * f)))
    img = handle.read_region(best, x, y, w, h)
    if img.dtype != np.uint8:
        img = img.astype(np.float32)
        hi = np.percentile(img, 99.5) or 1.0
        img = np.clip(img / hi * 255, 0, 255).astype(np.uint8)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    elif img.shape[-1] == 2:
        img = np.concatenate([img, np.zeros_like(img[..., :1])], axis=-1)
    img = img[..., :3]
    scale = max_size / max(w, h)
    if scale < 1:
        img = resize(img, (max(1, round(h * scale)), max(1, round(w * scale))))
    return np.ascontiguousarray(img)


_CMAP = np.array([[20, 20, 80], [60, 40, 160], [180, 50, 140], [240, 120, 40], [250, 230, 90]], np.float32)


def _colour(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo if abs(hi - lo) > 1e-9 else 1e-9  # hi < lo: a falling scale (JPEG quality 100 → 20)
    t = np.clip((values - lo) / span, 0, 1) * (len(_CMAP) - 1)
    i = np.minimum(t.astype(int), len(_CMAP) - 2)
    f = (t - i)[..., None]
    return (_CMAP[i] * (1 - f) + _CMAP[i + 1] * f).astype(np.uint8)


def heatmap(qc: SlideQC, picture: np.ndarray) -> np.ndarray:
    """Four panels side by side: the region with flagged tiles outlined, blur σ, noise σ and JPEG quality maps
    (glass and tiles without an estimate are grey; a scale under each map)."""
    from PIL import Image, ImageDraw

    ph, pw = picture.shape[:2]
    sx, sy = pw / qc.region.width, ph / qc.region.height
    t = qc.thresholds
    maps = {
        "blur σ (px)": ("blur_sigma", 0.5, 2 * t.blur),
        "noise σ (0-255)": ("noise_sigma", 0.0, 3 * t.noise),
        "JPEG quality": ("jpeg_quality", 100.0, 20.0),
    }
    panels = [Image.fromarray(picture).convert("RGB")]
    draw = ImageDraw.Draw(panels[0], "RGBA")
    for tq in qc.tiles:
        box = (
            (tq.x - qc.region.x) * sx,
            (tq.y - qc.region.y) * sy,
            (tq.x - qc.region.x + tq.width) * sx - 1,
            (tq.y - qc.region.y + tq.height) * sy - 1,
        )
        for k, (defect, on) in enumerate(tq.flags.items()):
            if on:
                c = DEFECTS[defect][1]
                inset = 1 + 2 * k
                draw.rectangle(
                    (box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset), outline=(*c, 255), width=2
                )
    for _title, (attr, lo, hi) in maps.items():
        canvas = np.full((ph, pw, 3), 200, np.uint8)
        base = (picture.astype(np.float32) * 0.35 + 140).astype(np.uint8)
        for tq in qc.tiles:
            v = getattr(tq.estimate, attr)
            x0, y0 = int((tq.x - qc.region.x) * sx), int((tq.y - qc.region.y) * sy)
            x1, y1 = (
                int(math.ceil((tq.x - qc.region.x + tq.width) * sx)),
                int(math.ceil((tq.y - qc.region.y + tq.height) * sy)),
            )
            if tq.estimate.tissue < MIN_TISSUE or math.isnan(v):
                canvas[y0:y1, x0:x1] = base[y0:y1, x0:x1]
            else:
                canvas[y0:y1, x0:x1] = _colour(np.array(v, np.float32), lo, hi)
        panels.append(Image.fromarray(canvas))
    label_h = 34
    out = Image.new("RGB", (pw * 4 + 30, ph + label_h), (255, 255, 255))
    d = ImageDraw.Draw(out)
    titles = ["flagged: red blur, blue noise, yellow JPEG", *maps]
    for i, (p, title) in enumerate(zip(panels, titles)):
        x = i * (pw + 10)
        out.paste(p, (x, label_h))
        d.text((x + 2, 2), title, fill=(0, 0, 0))
        if i:
            attr, lo, hi = maps[title]
            bar = _colour(np.linspace(lo, hi, max(pw // 2, 2), dtype=np.float32)[None].repeat(8, 0), lo, hi)
            out.paste(Image.fromarray(bar), (x + 2, 16))
            d.text((x + 4 + pw // 2, 14), f"{lo:g} to {hi:g}", fill=(0, 0, 0))
    return np.asarray(out)


def write_heatmap(qc: SlideQC, handle: ImageHandle, path: Path, max_size: int = 512) -> Path:
    from PIL import Image

    picture = overview(handle, qc.level, qc.region, max_size)
    buf = io.BytesIO()
    Image.fromarray(heatmap(qc, picture)).save(buf, format="PNG")
    return _atomic(Path(path), buf.getvalue())


def output_stem(qc: SlideQC) -> str:
    """A file-name stem: the image name made safe, and the QC key's start (level/region/estimator differ)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in qc.name)[:80] or "image"
    return f"{safe}.{qc.key()[3:13]}"


def write_outputs(qc: SlideQC, handle: ImageHandle, directory: str | Path) -> dict[str, Path]:
    """``<stem>.qc.json`` (summary + every tile), ``<stem>.qc.csv`` (tiles) and ``<stem>.qc.png`` (heat map)."""
    d = Path(directory)
    stem = output_stem(qc)
    return {
        "json": write_json(qc, d / f"{stem}.qc.json"),
        "csv": write_csv(qc, d / f"{stem}.qc.csv"),
        "png": write_heatmap(qc, handle, d / f"{stem}.qc.png"),
    }


def qc_features(qc: SlideQC) -> list[Any]:
    """The flagged regions as :class:`~lpfm_toolkit.sources.base.Annotation` s with measurements (level 0)."""
    import uuid

    from lpfm_toolkit.sources.base import Annotation

    ns = uuid.UUID("1b0d6c52-0f43-4d58-9d7e-5b2a3f9e8c11")
    out = []
    for i, reg in enumerate(flagged_regions(qc)):
        out.append(
            Annotation(
                geometry=reg.geometry,
                class_name=reg.class_name,
                id=str(uuid.uuid5(ns, f"{qc.key()}:{reg.defect}:{i}")),
                name=f"{reg.class_name} ({len(reg.tiles)} tiles)",
                source="lpfm qc",
                properties={
                    "objectType": "annotation",
                    "color": list(reg.color),
                    "measurements": reg.measurements(qc.mpp),
                    "isLocked": True,
                },
            )
        )
    return out


# -- lpfm enhance --auto --------------------------------------------------------------------------------------
TASK_KINDS = {"deblur": "DEBLUR", "denoise": "DENOISE", "restore": "RESTORE"}
#: quarter positions inside a tile, in the order of a plan's quarter mask bits (bit i: quarter i)
QUARTERS = ("top left", "top right", "bottom left", "bottom right")


def _auto_task() -> Any:
    from dataclasses import dataclass as _dc

    from lpfm_toolkit.prompts import Task, TaskKind

    @_dc(frozen=True)
    class AutoTask(Task):
        """The whole region's task in ``--auto`` runs: each flagged tile gets its own (deblur/denoise/restore)."""

        @property
        def label(self) -> str:
            return "auto"

        @property
        def slug(self) -> str:
            return "auto"

    return AutoTask(TaskKind.RESTORE, prompt="auto: enhance the tiles lpfm qc flags, each with its matching task")


def check_auto_options(options: Any) -> None:
    """Refuse the engine options ``--auto`` cannot honour (before anything is read or loaded)."""
    if options.samples > 1:
        raise ConfigError("--samples does not apply to --auto", "drop --samples, or enhance with -p PROMPT")
    if "method" in options.explicit() and options.method is not None:
        raise ConfigError(
            "--method picks one classical method, but --auto runs several tasks",
            "drop --method (each task uses its default method)",
        )


def resolve_auto_options(options: Any, channel_names: Sequence[str]) -> dict[str, Any]:
    """``options`` resolved and checked for each task ``--auto`` may choose (``deblur``, ``denoise``,
    ``restore``), without loading a model."""
    check_auto_options(options)
    return {name: options.resolved(_task(name), channel_names) for name in TASK_KINDS}


def engine_factory(options: Any, channel_names: Sequence[str]) -> Callable[[Any], Any]:
    """``build(task)`` for :func:`auto_enhance`: the engine ``options`` give each task ``--auto`` may choose.

    Every task's options are resolved and checked here, before any model loads; engines are built on first
    use and kept (one per task), so a batch of images loads each model once.
    """
    from lpfm_toolkit.options import build_engine

    resolved = resolve_auto_options(options, channel_names)
    built: dict[str, Any] = {}

    def build(task: Any) -> Any:
        name = task.kind.value
        if name not in built:
            built[name] = build_engine(resolved[name], task)
        return built[name]

    return build


class AutoRun:
    """:func:`auto_enhance` over many images (QuPath entries, OMERO images, jobs): one engine builder per set of
    channels (each model loads once, when first needed) and one estimator per kind of image.

    ``estimator``: None for the default bundle's learned estimator when it loads (else the classical one).
    """

    def __init__(self, options: Any, *, estimator: Any = None, thresholds: Thresholds | None = None) -> None:
        check_auto_options(options)
        self.options, self.estimator, self.thresholds = options, estimator, thresholds
        self._builders: dict[tuple[str, ...], Callable[[Any], Any]] = {}
        self._estimators: dict[bool, Any] = {}

    def estimator_for(self, brightfield: bool) -> Any:
        """The estimator that plans images of this kind (RGB brightfield or not)."""
        if brightfield not in self._estimators:
            self._estimators[brightfield] = self.estimator or get_estimator("auto", brightfield=brightfield)
        return self._estimators[brightfield]

    def __call__(self, handle: ImageHandle, sink: Any, **kwargs: Any) -> AutoResult:
        """:func:`auto_enhance` of ``handle`` into ``sink``; ``kwargs``: its keywords (level, region, annotation,
        seed, tiling, force, verify, progress)."""
        channels = tuple(handle.channel_names)
        if channels not in self._builders:  # each task's options checked against these channels first
            self._builders[channels] = engine_factory(self.options, channels)
        return auto_enhance(
            handle,
            sink,
            self._builders[channels],
            estimator=self.estimator_for(handle.is_rgb),
            thresholds=self.thresholds,
            **kwargs,
        )

    def outcome(self, label: str, handle: ImageHandle, sink: Any, done: Callable[[Any, dict], Any], **kwargs: Any) -> Any:
        """One item of a batch (:mod:`lpfm_toolkit.batch`): ``nothing to do`` when QC flags nothing, else
        ``done(result, report)`` — the connector's :class:`~lpfm_toolkit.batch.Outcome` of a written result."""
        from lpfm_toolkit.batch import Outcome, Status

        res = self(handle, sink, **kwargs)
        if res.result is None:
            return Outcome(label, Status.NOTHING, error="QC flags nothing here", detail={"qc": res.report})
        return done(res.result, res.report)


@dataclass
class AutoTile:
    """One tile of the enhancement grid: where, its flags and task, and the estimates of its flagged
    quarters before and (after the run) after enhancement."""

    x: int  # level pixels
    y: int
    width: int
    height: int
    seed: int
    flags: dict[str, bool]
    task: str | None
    quarters: list[tuple[int, int, int, int]]  # flagged quarters, (x, y, w, h) inside the tile
    before: list[TileEstimate]
    after: list[TileEstimate] | None = None
    mask: int = 0  # the flagged quarters as bits (bit i: QUARTERS[i])
    background: int = 0  # flagged quarters with too little tissue to judge, taken from their noisy neighbours

    def still_flagged(self, thresholds: Thresholds) -> bool:
        return any(any(e.flags(thresholds, MIN_TISSUE).values()) for e in self.after or [])


def tile_quarters(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The four quarters (x, y, w, h) of a tile, in :data:`QUARTERS` order (they overlap by a pixel when odd)."""
    hw, hh = max(width // 2, 1), max(height // 2, 1)
    return [(qx, qy, hw, hh) for qy in (0, height - hh) for qx in (0, width - hw)]


def _estimate_dict(e: TileEstimate | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"blur_sigma": _r(e.blur_sigma), "noise_sigma": _r(e.noise_sigma), "jpeg_quality": _r(e.jpeg_quality)}


def _mean_estimate(es: Sequence[TileEstimate]) -> dict[str, Any]:
    blur = [e.blur_sigma for e in es if not math.isnan(e.blur_sigma)]
    return {
        "blur_sigma": _r(float(np.mean(blur))) if blur else None,
        "noise_sigma": _r(float(np.mean([e.noise_sigma for e in es]))),
        "jpeg_quality": _r(float(np.mean([e.jpeg_quality for e in es]))),
    }


class AutoEngine:
    """An :class:`~lpfm_toolkit.engine.base.Engine` that enhances only the flagged tiles of a plan.

    Tiles are recognised by their seed, which the pipeline derives from their position
    (:func:`lpfm_toolkit.tiling.tile_seed`). An unflagged tile is returned unchanged; in a flagged tile only
    its flagged quarters take the enhanced pixels (with a short ramp), so sharp tissue beside a blurred patch
    is not over-sharpened, pixels no flagged quarter reaches stay identical to the input, and enhanced parts
    blend into their neighbours without a seam.
    Each enhanced tile is scored again with the same estimator (``after``; not when ``estimator`` is None, as
    in ``lpfm reproduce``, which compares pixels only).
    """

    name = "auto"
    #: width (px) of the ramp between a flagged quarter and the untouched rest of its tile
    feather = 32

    def __init__(
        self,
        tiles: list[AutoTile],
        engines: dict[str, Any],
        estimator: Any,
        thresholds: Thresholds,
        tile_size: int,
        overlap: int,
        *,
        estimator_description: dict[str, Any] | None = None,
    ) -> None:
        self.tiles = {t.seed: t for t in tiles}
        self.engines = engines
        self.estimator = estimator
        self.estimator_description = estimator.describe() if estimator is not None else estimator_description or {}
        self.thresholds = thresholds
        self.tile_size, self.overlap = tile_size, overlap
        self.batch_size = max([getattr(e, "batch_size", 1) for e in engines.values()] + [1])
        self._tasks = {name: _task(name) for name in engines}
        self.ran = False

    # Engine protocol (duck-typed so this module does not import the engine base class eagerly)
    def check(self, task: Any, channel_names: Sequence[str]) -> None:
        for name, eng in self.engines.items():
            eng.check(self._tasks[name], channel_names)

    def output_channels(self, task: Any, channel_names: Sequence[str]) -> list[str]:
        return list(channel_names)

    def needs_overview(self, task: Any) -> bool:
        return any(e.needs_overview(self._tasks[n]) for n, e in self.engines.items())

    def prepare(self, task: Any, overview: np.ndarray) -> None:
        for name, eng in self.engines.items():
            eng.prepare(self._tasks[name], overview)

    def process(self, tiles: np.ndarray, task: Any, seeds: Sequence[int]) -> Any:
        from lpfm_toolkit.engine.base import EngineOutput

        self.ran = True
        out = np.array(tiles, dtype=np.float32, copy=True)
        by_task: dict[str, list[int]] = {}
        for i, s in enumerate(seeds):
            plan_tile = self.tiles.get(int(s))
            if plan_tile is not None and plan_tile.task is not None:
                by_task.setdefault(plan_tile.task, []).append(i)
        for name, idx in by_task.items():
            res = self.engines[name].process(tiles[idx], self._tasks[name], [seeds[i] for i in idx])
            for j, i in enumerate(idx):
                t = self.tiles[int(seeds[i])]
                m = quarter_mask(out.shape[1:3], t.quarters, self.feather)[..., None]
                out[i] = out[i] * (1 - m) + res.pixels[j] * m  # only the flagged quarters change
                if self.estimator is not None:
                    t.after = self.estimator.estimate([out[i][y : y + h, x : x + w] for x, y, w, h in t.quarters])
        return EngineOutput(out)

    def report(self) -> dict[str, Any]:
        """Before/after per region (connected flagged tiles of one task) and for the whole slide region.

        ``before``/``after``: mean estimates over the flagged quarters; ``still_flagged``: enhanced tiles that
        the estimator still flags; ``slide``: the whole region's tiles, flagged before and after.
        """
        from shapely.geometry import box
        from shapely.ops import unary_union

        flagged = [t for t in self.tiles.values() if t.task is not None]

        def scores(members: list[AutoTile]) -> dict[str, Any]:
            done = [t for t in members if t.after is not None]
            return {
                "before": _mean_estimate([e for t in members for e in t.before]),
                "after": _mean_estimate([e for t in done for e in t.after or []]) if done else None,
                "still_flagged": sum(t.still_flagged(self.thresholds) for t in done),
            }

        regions = []
        for task in sorted({t.task for t in flagged if t.task}):  # connected tiles of one task = one region
            same = [t for t in flagged if t.task == task]
            boxes = [box(t.x, t.y, t.x + t.width, t.y + t.height) for t in same]
            merged = unary_union(boxes)
            for poly in list(merged.geoms) if hasattr(merged, "geoms") else [merged]:
                members = [t for t, b in zip(same, boxes) if poly.intersects(b.representative_point())]
                x0, y0, x1, y1 = (int(v) for v in poly.bounds)
                regions.append(
                    {"bounds": [x0, y0, x1 - x0, y1 - y0], "task": task, "tiles": len(members), **scores(members)}
                )
        still = sum(t.still_flagged(self.thresholds) for t in flagged if t.after is not None)
        scored = any(t.after is not None for t in flagged)
        n = max(len(self.tiles), 1)
        slide = {
            "tiles": len(self.tiles),
            "flagged_before": len(flagged),
            "flagged_after": still if scored else None,
            "flagged_fraction_before": round(len(flagged) / n, 4),
            "flagged_fraction_after": round(still / n, 4) if scored else None,
            "background_quarters": sum(bin(t.background).count("1") for t in flagged),
        }
        return {
            "tiles": len(self.tiles),
            "flagged_tiles": len(flagged),
            "tasks": {n: sum(t.task == n for t in flagged) for n in sorted({t.task for t in flagged if t.task})},
            **(scores(flagged) if flagged else {"before": None, "after": None, "still_flagged": 0}),
            "slide": slide,
            "regions": regions,
        }

    def plan_record(self) -> dict[str, Any]:
        """The plan as provenance keeps it: every flagged tile's position, task and quarter mask (level pixels).

        With the run's level, seed and tiling this is all ``lpfm reproduce`` needs to redo the run exactly.
        """
        flagged = sorted((t for t in self.tiles.values() if t.task is not None), key=lambda t: (t.y, t.x))
        size = next(([t.width, t.height] for t in self.tiles.values()), None)
        return {
            "tile_size": size,
            "quarters": list(QUARTERS),
            "tiles": [[t.x, t.y, t.task, t.mask] for t in flagged],
        }

    def describe(self) -> dict[str, Any]:
        plan = self.plan_record()["tiles"]  # what the key depends on: the tiles, their tasks and quarters
        desc: dict[str, Any] = {
            "name": self.name,
            "estimator": self.estimator_description,
            "thresholds": self.thresholds.to_dict(),
            "engines": {n: e.describe() for n, e in self.engines.items()},
            "plan_sha256": hashlib.sha256(json.dumps(plan).encode()).hexdigest(),
        }
        if self.ran:  # provenance (written after the run) carries the plan, each engine's options, before/after
            desc["plan"] = self.plan_record()
            for n, e in self.engines.items():
                options = getattr(e, "options", None)
                if options is not None:
                    desc["engines"][n]["options"] = options.to_dict()
                bundle_path = getattr(getattr(e, "bundle", None), "path", None)
                if bundle_path is not None:
                    desc["engines"][n]["model_path"] = str(Path(bundle_path).resolve())
            if self.estimator is not None:
                desc["qc"] = self.report()
        return desc


def quarter_mask(shape: tuple[int, int], quarters: Sequence[tuple[int, int, int, int]], feather: int) -> np.ndarray:
    """1 on the flagged quarters of a tile, 0 on the rest, with a ``feather``-px ramp between them (float32)."""
    from scipy import ndimage

    m = np.zeros(shape, np.float32)
    for x, y, w, h in quarters:
        m[y : y + h, x : x + w] = 1.0
    if feather > 1 and 0 < m.mean() < 1:
        m = ndimage.uniform_filter(m, feather, mode="nearest")
        m[m < 1e-3] = 0.0  # exactly the input where no flagged quarter reaches
    return m


def _task(name: str) -> Any:
    from lpfm_toolkit.prompts import Task, TaskKind

    return Task(getattr(TaskKind, TASK_KINDS[name]), prompt=f"auto: {name}")


def _tile_task(flags: dict[str, bool]) -> str | None:
    return TileQC(0, 0, 0, 0, TileEstimate(1.0, float("nan"), 0.0, 100.0, 0.0), flags).task()


def plan_auto(
    handle: ImageHandle,
    *,
    level: int,
    region: Region,
    tile: int,
    overlap: int,
    seed: int,
    estimator: Any,
    thresholds: Thresholds,
    progress: ProgressFn | None = None,
    glass_from_neighbours: bool = True,
) -> list[AutoTile]:
    """Score every tile of the enhancement grid in quarters and choose its task (None: leave it as it is).

    A quarter with too little tissue to be judged (glass, fat) is still denoised when its own noise σ is
    above the threshold *and* it touches noisy quarters, directly or through other such quarters: the glass
    inside a noisy area is then not left noisy beside denoised tissue, while noisy-looking glass far from any
    judged noise is left alone (``glass_from_neighbours=False``: glass is never flagged, as before).
    """
    from collections import deque

    from lpfm_toolkit.pipeline import to_float
    from lpfm_toolkit.tiling import TileGrid, tile_seed

    grid = TileGrid(region.width, region.height, tile, overlap)
    tw, th = grid.tile_width, grid.tile_height
    quarters = tile_quarters(tw, th)
    # quarters of all tiles lie on one lattice (tiles overlap): its columns and rows, in order
    cols = {x: i for i, x in enumerate(sorted({x + q[0] for x in grid.xs for q in quarters}))}
    rows = {y: i for i, y in enumerate(sorted({y + q[1] for y in grid.ys for q in quarters}))}
    out: list[AutoTile] = []
    noisy: set[tuple[int, int]] = set()  # lattice cells of judged noisy quarters
    glass: dict[tuple[int, int], list[tuple[int, int, TileEstimate]]] = {}  # unjudged cells above the noise σ
    for i, t in enumerate(grid):
        px = to_float(handle.read_region(level, region.x + t.x, region.y + t.y, t.width, t.height))
        # quarters localise a defect that covers only part of a tile (defects do not follow the tile grid)
        ests = estimator.estimate([px[y : y + h, x : x + w] for x, y, w, h in quarters])
        qflags = [e.flags(thresholds, MIN_TISSUE) for e in ests]
        hit = [j for j, f in enumerate(qflags) if any(f.values())]
        for j, (e, f) in enumerate(zip(ests, qflags)):
            cell = (rows[t.y + quarters[j][1]], cols[t.x + quarters[j][0]])
            if f["noisy"]:
                noisy.add(cell)
            elif e.tissue < MIN_TISSUE and e.noise_sigma > thresholds.noise:
                glass.setdefault(cell, []).append((len(out), j, e))
        flags = {k: any(f[k] for f in qflags) for k in DEFECTS}
        out.append(
            AutoTile(
                region.x + t.x,
                region.y + t.y,
                t.width,
                t.height,
                tile_seed(seed, level, region.x + t.x, region.y + t.y),
                flags,
                _tile_task(flags),
                [quarters[j] for j in hit],
                [ests[j] for j in hit],
                mask=sum(1 << j for j in hit),
            )
        )
        if progress is not None:
            progress(i + 1, len(grid))
    # glass reached from judged noisy quarters through glass that is itself noisy: flagged noisy too
    todo = deque(noisy if glass_from_neighbours else ())
    while todo:
        r, c = todo.popleft()
        for cell in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if cell in glass and cell not in noisy:
                noisy.add(cell)
                todo.append(cell)
                for k, j, e in glass[cell]:
                    at = out[k]
                    at.mask |= 1 << j
                    at.background |= 1 << j
                    at.flags = {**at.flags, "noisy": True}
                    at.task = _tile_task(at.flags)
                    at.quarters.append(quarters[j])
                    at.before.append(e)
    for at in out:  # quarters in mask order, so a plan rebuilt from its mask is the same
        order = sorted(range(len(at.quarters)), key=lambda n: quarters.index(at.quarters[n]))
        at.quarters = [at.quarters[n] for n in order]
        at.before = [at.before[n] for n in order]
    return out


def auto_engine_for_record(
    desc: dict[str, Any], *, level: int, seed: int, model: str | None = None, trust_pickle: bool = False
) -> AutoEngine:
    """The :class:`AutoEngine` an ``--auto`` output's provenance (its ``engine`` block) records, for
    ``lpfm reproduce``: the recorded plan (flagged tiles, tasks, quarters) and each task's engine, rebuilt as
    ``lpfm reproduce`` rebuilds any engine. No tile is scored again: the plan is taken as recorded.
    """
    from lpfm_toolkit.errors import ProvenanceError
    from lpfm_toolkit.tiling import tile_seed
    from lpfm_toolkit.verify import engine_for_record

    plan = desc.get("plan")
    if not isinstance(plan, dict) or not isinstance(plan.get("tiles"), list) or not plan.get("tile_size"):
        raise ProvenanceError(
            "this --auto output does not record its plan (it was made before lpfm recorded it)",
            "make it again with `lpfm enhance --auto --force`, then reproduce that",
        )
    unknown = {str(p[2]) for p in plan["tiles"]} - set(TASK_KINDS)
    if unknown or not isinstance(desc.get("engines"), dict):
        raise ProvenanceError(
            f"the --auto plan names tasks {', '.join(sorted(unknown)) or '(no engines)'} this version does not know",
            "reproduce it with the lpfm-toolkit version that made it",
        )
    engines = {name: engine_for_record(sub, model, trust_pickle) for name, sub in desc["engines"].items()}
    tw, th = (int(v) for v in plan["tile_size"])
    quarters = tile_quarters(tw, th)
    tiles = []
    for x, y, task, mask in plan["tiles"]:
        hit = [j for j in range(len(quarters)) if int(mask) >> j & 1]
        tiles.append(
            AutoTile(
                int(x),
                int(y),
                tw,
                th,
                tile_seed(seed, level, int(x), int(y)),
                {},
                str(task),
                [quarters[j] for j in hit],
                [],
                mask=int(mask),
            )
        )
    missing = {t.task for t in tiles} - set(engines)
    if missing:
        raise ProvenanceError(
            f"the --auto plan uses {', '.join(sorted(str(m) for m in missing))} but records no engine for it",
            "the record was edited; make the output again",
        )
    return AutoEngine(  # the tiling is the record's (``lpfm reproduce`` passes it to the pipeline)
        tiles,
        engines,
        None,
        Thresholds(**desc.get("thresholds", {})),
        tw,
        0,
        estimator_description=desc.get("estimator"),
    )


@dataclass
class AutoResult:
    """The enhanced whole region (an :class:`~lpfm_toolkit.pipeline.EnhanceResult`) and the before/after report."""

    result: Any  # None when no tile was flagged: nothing is written
    report: dict[str, Any]


def auto_enhance(
    handle: ImageHandle,
    sink: Any,
    engine_factory: Callable[[Any], Any],
    *,
    level: int = 0,
    region: Region | None = None,
    annotation: Any = None,
    seed: int = 0,
    estimator: Any = None,
    thresholds: Thresholds | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    force: bool = False,
    verify: str = "quick",
    qc_progress: ProgressFn | None = None,
    progress: ProgressFn | None = None,
    glass_from_neighbours: bool = True,
) -> AutoResult:
    """Enhance only the tiles QC flags, each with its matching task, into one output of the whole region.

    blur → deblur, noise or JPEG → denoise, blur with either → restore; every other pixel is the input's.
    ``engine_factory(task)`` makes the engine for one task (the engine ``lpfm enhance`` would use for it; see
    :func:`engine_factory`). ``annotation``: enhance its bounding box at ``level`` instead of ``region`` (QuPath
    classes, OMERO ROIs). The enhanced tiles are scored again with the same estimator; provenance
    (``engine.qc``, ``engine.plan``) and the returned report hold before/after per region and for the whole
    region, and the plan ``lpfm reproduce`` re-runs. ``glass_from_neighbours``: see :func:`plan_auto`.
    """
    from lpfm_toolkit.pipeline import WorkItem, plan, run_item

    if not 0 <= level < len(handle.levels):
        from lpfm_toolkit.errors import RegionError

        raise RegionError(
            f"level {level} does not exist in {handle.name}", f"choose a level from 0 to {len(handle.levels) - 1}"
        )
    task = _auto_task()
    if annotation is not None:
        region = plan(handle, task, level=level, annotations=[annotation], seed=seed)[0].region
    region = region or handle.full_region(level)
    handle.check_region(level, region)
    thresholds = thresholds or Thresholds()
    estimator = estimator or ClassicalEstimator(handle.is_rgb)
    probe = engine_factory(_task("restore"))
    tile = tile_size or probe.tile_size
    ovl = probe.overlap if overlap is None else overlap
    tiles = plan_auto(
        handle,
        level=level,
        region=region,
        tile=tile,
        overlap=ovl,
        seed=seed,
        estimator=estimator,
        thresholds=thresholds,
        progress=qc_progress,
        glass_from_neighbours=glass_from_neighbours,
    )
    needed = sorted({t.task for t in tiles if t.task is not None})
    if not needed:
        return AutoResult(None, AutoEngine(tiles, {}, estimator, thresholds, tile, ovl).report())
    engines = {name: probe if name == "restore" else engine_factory(_task(name)) for name in needed}
    auto = AutoEngine(tiles, engines, estimator, thresholds, tile, ovl)
    item = WorkItem(level, region, task, seed, annotation)
    result = run_item(
        handle,
        item,
        auto,
        sink,
        tile_size=tile,
        overlap=ovl,
        force=force,  # type: ignore[arg-type]
        progress=progress,
        verify=verify,
    )
    recorded = result.provenance.engine.get("qc")
    report = recorded if result.skipped and recorded else auto.report()
    return AutoResult(result, report)

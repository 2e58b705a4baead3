"""Pyramidal, tiled, compressed OME-TIFF output with provenance, written without holding the image.

Rows arrive top to bottom, as full-width rows or in vertical stripes. Every pyramid level is built
from row pairs as they come and cut into tiles, which a thread pool compresses (exactly as tifffile
would) into a scratch file while the engine works; memory is one tile row per level of one stripe.
On commit the compressed tiles are laid out in the standard OME-TIFF layout — full resolution as the
main IFD(s), reduced levels in SubIFDs (Bio-Formats, QuPath and OMERO read it; tifffile and tiffslide
see every level; OpenSlide 4 sees only the first) — with OME-XML carrying the provenance (MapAnnotation
+ the full JSON as a CommentAnnotation), validated against the OME schema. Everything is written
under temporary names and renamed when complete, so nothing that looks finished is left by an
interrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lpfm_toolkit._version import __version__
from lpfm_toolkit.errors import ConfigError, OutputExistsError
from lpfm_toolkit.imageops import downsample2
from lpfm_toolkit.provenance import NAMESPACE, Provenance
from lpfm_toolkit.sinks.base import OutputRef, OutputSpec, Sink, SinkWriter

log = logging.getLogger(__name__)

COMPRESSIONS = ("auto", "jpeg", "zlib", "zstd", "lzw", "none")
SIDECAR_SUFFIX = ".lpfm.json"
JSON_NAMESPACE = NAMESPACE + "/json"
# Threads compressing tiles (the codecs release the GIL).
_COMMIT_WORKERS = max(1, min(8, os.cpu_count() or 1))
#: numpy dtype → OME pixel type: every OME type numpy has (OME's "bit" and complex types are never written)
OME_PIXEL_TYPES = {"int8": "int8", "int16": "int16", "int32": "int32", "uint8": "uint8", "uint16": "uint16",
                   "uint32": "uint32", "float32": "float", "float64": "double"}
#: JPEG settings of ``--compression jpeg`` (and of ``auto`` where it picks JPEG); docs/benchmarks.md, "Compression"
JPEG_QUALITY = 98
JPEG_SUBSAMPLING = "4:4:4"
# chroma sub-sampling → (TIFF YCbCrSubSampling, colour space of the JPEG data). 4:4:4 is stored as RGB JPEG
# (photometric RGB), not as YCbCr 4:4:4: Bio-Formats 7.3.1 decodes YCbCr JPEG tiles without sub-sampling into wrong
# colours (tests/interop found it), while it reads RGB JPEG, 4:2:2 and 4:2:0 exactly as tifffile/libjpeg-turbo do.
_SUBSAMPLING = {"4:4:4": ((1, 1), "RGB"), "4:2:2": ((2, 1), "YCBCR"), "4:2:0": ((2, 2), "YCBCR")}
_TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")


def _spell_signs(text: str) -> str:
    """The signs lpfm's names use, spelled for file names: ``×`` → ``x``, ``→`` → ``-to-``, ``&`` → ``and``."""
    return text.replace("×", "x").replace("→", "-to-").replace("&", "and")


def safe_filename(name: str) -> str:
    """A portable file name from a result name: ``CMU-1 [lpfm sr×2]`` → ``CMU-1_lpfm_srx2``.

    How outputs were named before name templates (:data:`DEFAULT_NAME`); still looked up, so re-runs find
    results written by older versions (:meth:`OmeTiffSink.find_spec`).
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", _spell_signs(name)).strip("._")
    return name[:120] or "lpfm-output"


# ------------------------------------------------------------------------------------------- output names

#: the placeholders of an output name template (``--name``), each with what it becomes
NAME_FIELDS: dict[str, str] = {
    "stem": "the image's name without its extensions: CMU-1.svs -> CMU-1",
    "task": "the task however the prompt was worded: srx2, deblur, denoise, restore, AF-to-HE, stain-normalize",
    "prompt": "the prompt as typed, made file-name safe: sr_x2",
    "engine": "the engine that ran: lpfm, classical, identity",
    "method": "the classical method, or the lpfm engine's model bundle",
    "region": "x-y-w-h of a --region, or the annotation's class-name; empty when the whole level is enhanced",
    "level": "the pyramid level read: 0, 1, ...",
    "key": "the first 10 hex digits of the idempotency key",
}
#: how outputs are named unless ``--name`` says otherwise; ``[...]`` is left out when a placeholder in it is empty
DEFAULT_NAME = "{stem}_{task}_{engine}[_{region}].{key}"
#: longest output name (before ``.ome.tiff``): room for ``.uncertainty.ome.tiff`` within 255 bytes
MAX_NAME = 200
_FIELD_MAX = {"stem": 80, "region": 48, "prompt": 48, "method": 48}
_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")
#: image extensions dropped from ``{stem}``
_IMAGE_SUFFIXES = tuple(
    (
        ".svs .tif .tiff .btf .ndpi .vms .vmu .scn .mrxs .svslide .bif .czi .qptiff .png .jpg .jpeg .dcm .zarr .isyntax "
        ".vsi .nd2 .lif"
    ).split()
)
_STAIN_SLUG = {"H&E": "HE", "AF": "AF", "fluorescence": "fluo"}


def _ascii(text: str) -> str:
    """``Färbung ×2 → H&E`` → ``Farbung x2 -to- HandE``: accents dropped, the signs lpfm names use spelled out."""
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFKD", _spell_signs(text)) if not unicodedata.combining(c))


def _slug(text: str, limit: int = 48) -> str:
    """One name field: ``Tumor: t 1`` → ``Tumor-t-1`` (``_`` stays free to separate fields)."""
    text = _ascii(text)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.")[:limit].strip("-.")


def _words(text: str) -> str:
    """Free text as a file name part: ``my slide (1)`` → ``my_slide_1``, ``AF -> H&E`` → ``AF_-_HandE``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", _ascii(text)).strip("._")


def image_stem(name: str) -> str:
    """``CMU-1.svs`` → ``CMU-1``, ``a b.ome.tiff`` → ``a_b``, ``x.svs.tif`` → ``x``; an earlier lpfm output also
    loses its ``.<key>``."""
    stripped = True
    while stripped:  # slide.svs.tif → slide
        stripped = False
        for ext in (".ome.tiff", ".ome.tif", ".ome.zarr", ".ome.btf", *_IMAGE_SUFFIXES):
            if name.lower().endswith(ext) and len(name) > len(ext):
                name, stripped = name[: -len(ext)], True
                break
    name = re.sub(r"\.[0-9a-f]{10}$", "", name)  # x.<key>.ome.tiff, enhanced again
    return _words(name)[: _FIELD_MAX["stem"]].strip("._") or "image"


def task_slug(task: Any) -> str:
    """The task as a file name part, independent of how the prompt was worded: ``srx2``, ``AF-to-HE``."""
    if getattr(task, "label", None) == "auto":  # lpfm enhance --auto: each flagged tile has its own task
        return "auto"
    kind = task.kind.value
    if kind == "super_resolution":
        return f"srx{task.scale}"
    if kind == "virtual_stain":
        src, dst = (_STAIN_SLUG.get(s.value, _slug(s.value)) for s in (task.source_stain, task.target_stain))
        return f"{src}-to-{dst}"
    return kind.replace("_", "-")


def name_fields(image_name: str, task: Any, engine: dict[str, Any], level: int, region: str | None) -> dict[str, str]:
    """Every placeholder of :data:`NAME_FIELDS` but ``key``, made file-name safe.

    ``engine``: the engine's ``describe()``; ``region``: what restricts the work (``x-y-w-h`` or an annotation's
    class and name), ``None`` for a whole level.
    """
    engine_name = _slug(str(engine.get("name") or "engine"))
    method = engine.get("method") or engine.get("model") or engine_name
    slug = task_slug(task)
    return {
        "stem": image_stem(image_name),
        "task": slug,
        "prompt": _words(str(task.prompt or ""))[: _FIELD_MAX["prompt"]].strip("._") or slug,
        "engine": engine_name,
        "method": _slug(str(method), _FIELD_MAX["method"]) or engine_name,
        "region": _slug(region, _FIELD_MAX["region"]) if region else "",
        "level": str(int(level)),
    }


class NameTemplate:
    """A checked output name template: placeholders from :data:`NAME_FIELDS`, ``[...]`` for optional parts.

    ``NameTemplate("{stem}_{task}[_{region}].{key}")``: ``CMU-1_srx2.1a2b3c4d5e`` for a whole slide,
    ``CMU-1_srx2_0-0-512-512.1a2b3c4d5e`` for a region. :class:`ConfigError` (one line) for a template that
    names an unknown placeholder, holds a path separator, or can give an empty name.
    """

    def __init__(self, text: str | None = None) -> None:
        text = DEFAULT_NAME if text is None else text
        self.text = text
        for ext in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):  # the extension is the writer's: .ome.tiff
            if text.lower().endswith(ext):
                text = text[: -len(ext)]
                break
        self._body = text
        fix = (
            "e.g. --name '{stem}_{task}_{engine}[_{region}].{key}' (placeholders: "
            + ", ".join("{" + n + "}" for n in NAME_FIELDS)
            + ")"
        )
        if not text.strip():
            raise ConfigError("--name is empty", fix)
        if "/" in text or "\\" in text or "\0" in text:
            raise ConfigError(
                f"--name {self.text!r} holds a path separator; it names a file, not a folder",
                "give the folder with --out, and a file name with --name",
            )
        if _OPTIONAL.sub("", text).count("[") or _OPTIONAL.sub("", text).count("]"):
            raise ConfigError(
                f"--name {self.text!r} has an unmatched [ or ] (or one inside another)",
                "write optional parts as [_{region}], not nested",
            )
        self.names = self._placeholders(text, fix)
        unknown = [n for n in self.names if n not in NAME_FIELDS]
        if unknown:
            raise ConfigError(f"--name {self.text!r}: unknown placeholder {{{unknown[0]}}}", fix)
        sample = {n: "x" for n in NAME_FIELDS} | {"region": ""}  # only {region} can be empty
        if not self.render(sample, "0" * 64):
            raise ConfigError(
                f"--name {self.text!r} gives an empty file name when the whole image is enhanced",
                "add {stem} or {key}, e.g. --name '{stem}[_{region}].{key}'",
            )

    @staticmethod
    def _placeholders(text: str, fix: str) -> list[str]:
        import string

        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ConfigError(f"--name {text!r} is not a valid template ({exc})", fix) from None
        names = []
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if spec or conversion or field == "" or field.isdigit():
                raise ConfigError(f"--name {text!r}: write placeholders plainly, like {{stem}}", fix)
            names.append(field)
        return names

    @property
    def is_default(self) -> bool:
        return self._body == DEFAULT_NAME

    @property
    def has_key(self) -> bool:
        """Whether names hold the key: without it, results of other settings would share one name."""
        return "key" in self.names

    def render(self, fields: dict[str, str], key: str) -> str:
        """The file name (without ``.ome.tiff``) for ``fields`` (:func:`name_fields`) and the idempotency key."""
        values = {**fields, "key": key[:10]}

        def optional(match: re.Match[str]) -> str:
            inner = match.group(1)
            return inner.format_map(values) if all(values.get(n) for n in self._placeholders(inner, "")) else ""

        name = _OPTIONAL.sub(optional, self._body).format_map(values)
        name = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._-")
        return name[:MAX_NAME].rstrip("._-")

    def __repr__(self) -> str:
        return f"NameTemplate({self.text!r})"


def _split_suffix(path: Path) -> tuple[str, str]:
    """``x.ome.tif`` → ``("x", ".ome.tif")``; a name without a TIFF suffix → ``(name, "")``."""
    for ext in _TIFF_SUFFIXES:
        if path.name.lower().endswith(ext):
            return path.name[: -len(ext)], path.name[-len(ext) :]
    return path.name, ""


def sidecar_path(tiff_path: Path) -> Path:
    """``x.ome.tiff`` (or ``x.ome.tif``) → ``x.lpfm.json``; other names get the suffix appended."""
    stem, ext = _split_suffix(tiff_path)
    if ext.lower() in (".ome.tiff", ".ome.tif"):
        return tiff_path.with_name(stem + SIDECAR_SUFFIX)
    return tiff_path.with_name(tiff_path.name + SIDECAR_SUFFIX)


def uncertainty_path(tiff_path: Path) -> Path:
    """``x.ome.tiff`` → ``x.uncertainty.ome.tiff``, ``x.ome.tif`` → ``x.uncertainty.ome.tif``: never the image."""
    stem, ext = _split_suffix(tiff_path)
    return tiff_path.with_name(f"{stem}.uncertainty{ext or '.ome.tiff'}")


def ome_pixel_type(dtype: np.dtype | type) -> str:
    """The OME pixel type of a numpy dtype; ``ConfigError`` for dtypes OME-TIFF cannot hold."""
    name = np.dtype(dtype).name
    if name not in OME_PIXEL_TYPES:
        raise ConfigError(f"OME-TIFF cannot store {name} pixels",
                          f"convert the result to one of {', '.join(OME_PIXEL_TYPES)}")
    return OME_PIXEL_TYPES[name]


def n_pyramid_levels(width: int, height: int, tile: int) -> int:
    """Levels needed to reach one tile (each level halves both sides)."""
    return 1 + max(0, math.ceil(math.log2(max(width, height) / tile))) if max(width, height) > tile else 1


_OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def build_ome_xml(spec: OutputSpec, provenance: Provenance | None, channels: list[str], dtype: np.dtype,
                  interleaved_rgb: bool) -> str:
    """OME-XML for one image, with the provenance as a MapAnnotation and a JSON CommentAnnotation.

    Built directly with ElementTree (ome-types' model serialiser costs tens of milliseconds per image) and
    always checked by :func:`validate_ome_xml` before it is written; a test proves it parses to the same
    model ome-types itself would write.
    """
    import xml.etree.ElementTree as ET

    def el(parent: ET.Element, tag: str, **attrs: Any) -> ET.Element:
        return ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})

    ET.register_namespace("", _OME_NS)
    ome = ET.Element("OME", {"xmlns": _OME_NS, "xmlns:xsi": "http://www.w3.org/2001/XMLSchema-instance",
                             "xsi:schemaLocation": f"{_OME_NS} {_OME_NS}/ome.xsd",
                             "Creator": f"lpfm-toolkit {__version__}"})
    image = el(ome, "Image", ID="Image:0", Name=spec.name)
    size = {"SizeX": spec.width, "SizeY": spec.height, "SizeZ": 1, "SizeC": len(channels), "SizeT": 1}
    phys = {"PhysicalSizeX": repr(float(spec.mpp[0])), "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": repr(float(spec.mpp[1])), "PhysicalSizeYUnit": "µm"} if spec.mpp else {}
    pixels = el(image, "Pixels", ID="Pixels:0", DimensionOrder="XYCZT", Type=ome_pixel_type(dtype),
                Interleaved=str(interleaved_rgb).lower(), BigEndian="false", **size, **phys)
    if interleaved_rgb:
        el(pixels, "Channel", ID="Channel:0:0", Name="RGB", SamplesPerPixel=3)
        el(pixels, "TiffData", IFD=0, PlaneCount=1)
    else:
        for i, name in enumerate(channels):
            el(pixels, "Channel", ID=f"Channel:0:{i}", Name=name, SamplesPerPixel=1)
        for i in range(len(channels)):
            el(pixels, "TiffData", IFD=i, FirstC=i, PlaneCount=1)
    if provenance is not None:
        el(image, "AnnotationRef", ID="Annotation:0")
        el(image, "AnnotationRef", ID="Annotation:1")
        annotations = el(ome, "StructuredAnnotations")
        comment = el(annotations, "CommentAnnotation", ID="Annotation:1", Namespace=JSON_NAMESPACE)
        el(comment, "Value").text = provenance.to_json(indent=None)
        values = el(el(annotations, "MapAnnotation", ID="Annotation:0", Namespace=NAMESPACE), "Value")
        for k, v in provenance.summary().items():
            el(values, "M", K=k).text = v
    ET.indent(ome)
    # Written into the TIFF as UTF-8 (write_tiff). Never as ASCII with character references (&#181;m): they are
    # valid XML, but Bio-Formats' XML sanitiser turns "&#" into " #", the OME-XML no longer parses, and Bio-Formats
    # falls back to its plain TIFF reader (one level, no annotations, channels read as timepoints).
    return ET.tostring(ome, encoding="unicode")


def validate_ome_xml(xml: str) -> None:
    """Raise ``ValueError`` unless ``xml`` validates against the OME schema (ome-types' copy, with lxml)."""
    from ome_types import validate_xml

    validate_xml(xml)


def _codec(compression: str, rgb: bool, quality: int = JPEG_QUALITY, subsampling: str = JPEG_SUBSAMPLING) -> Any:
    """A function that compresses one tile exactly as tifffile does for the same ``write`` arguments."""
    if compression == "none":
        return lambda tile: tile.tobytes()
    import tifffile

    tag = {"jpeg": 7, "zlib": 8, "lzw": 5, "zstd": 50000}[compression]
    encode = tifffile.TIFF.COMPRESSORS[tag]
    kwargs: dict[str, Any] = {}
    if compression == "jpeg":
        kwargs = {"level": quality}
        if rgb:  # as tifffile does for photometric RGB: YCbCr chroma sub-sampled as asked, or RGB for 4:4:4
            factors, colorspace = _SUBSAMPLING[subsampling]
            kwargs.update(subsampling=factors, colorspace="RGB", outcolorspace=colorspace)
    return lambda tile: encode(tile, **kwargs)


def stripe_levels(tile: int) -> int:
    """How many reduced levels a stripe completes by itself: its width is a multiple of ``tile·2**J``."""
    j = 0
    while tile * 2**j < 2048:
        j += 1
    return j


class _TilePyramid:
    """Every level of one image as compressed TIFF tiles, encoded while rows arrive.

    Rows come in vertical stripes whose x is a multiple of ``tile·2**J`` (``J`` = :func:`stripe_levels`),
    each stripe top to bottom. A stripe builds its levels 0..J itself (2×2 means of row pairs) and sends
    each complete tile to a thread pool that compresses it into a scratch file of tiles; level ``J+1`` is
    parked in a small raw file, from which the coarser levels are built at the end. Memory is one tile row
    per level of one stripe, whatever the image's width. One stripe as wide as the image builds all levels.
    """

    def __init__(self, folder: Path, stem: str, width: int, height: int, channels: int, dtype: np.dtype,
                 tile: int, n_levels: int, compression: str, rgb: bool, pool: Any, quality: int = JPEG_QUALITY,
                 subsampling: str = JPEG_SUBSAMPLING) -> None:
        import threading

        self.dtype, self.channels, self.tile, self.rgb = np.dtype(dtype), channels, tile, rgb
        self.compression, self.quality, self.subsampling = compression, quality, subsampling
        self.sizes: list[tuple[int, int]] = []
        w, h = width, height
        for _ in range(n_levels):
            self.sizes.append((w, h))
            w, h = (w + 1) // 2, (h + 1) // 2
        self.local = stripe_levels(tile)  # levels 0..local are built inside a stripe
        self.alignment = tile * 2**self.local
        self.planes: list[int | None] = [None] if rgb else list(range(channels))
        self._encode = _codec(compression, rgb, quality, subsampling)
        self._pool = pool
        self._slots = threading.BoundedSemaphore(4 * _COMMIT_WORKERS)  # tiles queued for compression
        self._lock = threading.Lock()
        self._store_path = folder / f"{stem}.tiles"
        self._store = self._store_path.open("wb")
        self._end = 0
        self.index: dict[tuple[int | None, int, int, int], tuple[int, int]] = {}
        self._error: BaseException | None = None
        self._coarse_path = folder / f"{stem}-coarse.raw"
        self._coarse: Any = None
        self._state: dict[str, Any] | None = None
        self._stripes_done: list[tuple[int, int]] = []

    # -- rows ---------------------------------------------------------------------------------------------------
    def _start(self, x: int, width: int, base: int, full: bool) -> dict[str, Any]:
        top = len(self.sizes) - 1 if full else min(len(self.sizes) - 1, self.local)
        return {"x": x, "width": width, "base": base, "top": top, "full": full,
                "strip": {lv: [] for lv in range(base, top + 1)}, "strip_rows": dict.fromkeys(range(base, top + 1), 0),
                "emitted": dict.fromkeys(range(base, top + 1), 0), "pending": {}, "rows": dict.fromkeys(
                    range(base, len(self.sizes)), 0)}

    def write(self, x: int, rows: np.ndarray) -> None:
        """Rows ``(h, w, C)`` of the stripe starting at level-0 column ``x``."""
        if self._error is not None:
            raise self._error
        st = self._state
        if st is None or st["x"] != x:
            if st is not None:
                raise ValueError(f"stripe at column {st['x']} ended after {st['rows'][0]} of "
                                 f"{self.sizes[0][1]} rows")
            if x % self.alignment:
                raise ValueError(f"stripe at column {x} is not on a multiple of {self.alignment}")
            full = x == 0 and rows.shape[1] == self.sizes[0][0]
            st = self._state = self._start(x, rows.shape[1], 0, full)
        if rows.shape[1:] != (st["width"], self.channels):
            raise ValueError(f"rows of shape {rows.shape[1:]} do not fit the stripe ({st['width']}, {self.channels})")
        self._feed(st, 0, np.ascontiguousarray(rows, self.dtype))
        if st["rows"][0] == self.sizes[0][1]:
            self._finish_stripe(st)
            self._stripes_done.append((x, st["width"]))
            self._state = None

    def _feed(self, st: dict[str, Any], level: int, rows: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        y = st["rows"][level]
        st["rows"][level] = y + rows.shape[0]
        if level > st["top"]:  # a coarse level: parked in the raw file at this stripe's columns
            self._park(level, st["x"] >> level, y, rows)
            return
        strip, n = st["strip"], st["strip_rows"]
        strip[level].append(rows)
        n[level] += rows.shape[0]
        while n[level] >= self.tile:
            block = np.concatenate(strip[level]) if len(strip[level]) > 1 else strip[level][0]
            self._emit(st, level, block[: self.tile])
            rest = block[self.tile :]
            strip[level] = [rest] if rest.shape[0] else []
            n[level] = rest.shape[0]
        if level + 1 < len(self.sizes) and (level < st["top"] or not st["full"]):
            pending = st["pending"].pop(level, None)
            buf = rows if pending is None else np.concatenate([pending, rows])
            even = buf.shape[0] - buf.shape[0] % 2
            if buf.shape[0] % 2:
                st["pending"][level] = buf[even:]
            if even:
                self._feed(st, level + 1, downsample2(buf[:even]))

    def _finish_stripe(self, st: dict[str, Any]) -> None:
        """The stripe's last rows: odd rows averaged with themselves, partial tile rows padded."""
        for level in range(st["base"], st["top"] + 1):
            pending = st["pending"].pop(level, None)
            if pending is not None and level + 1 < len(self.sizes):
                self._feed(st, level + 1, downsample2(pending))
            if st["strip_rows"][level]:
                self._emit(st, level, np.concatenate(st["strip"][level]))
                st["strip"][level], st["strip_rows"][level] = [], 0
        for level in range(st["base"], min(st["top"] + 2, len(self.sizes))):
            if st["rows"][level] != self.sizes[level][1]:
                raise RuntimeError(f"level {level} received {st['rows'][level]} rows, expected {self.sizes[level][1]}")

    def _park(self, level: int, x: int, y: int, rows: np.ndarray) -> None:
        w = self.sizes[level][0]
        if self._coarse is None:
            self._coarse = self._coarse_path.open("w+b")
            self._coarse_level = level
        px = self.channels * self.dtype.itemsize
        for i in range(rows.shape[0]):
            os.pwrite(self._coarse.fileno(), rows[i].tobytes(), ((y + i) * w + x) * px)

    # -- tiles --------------------------------------------------------------------------------------------------
    def _emit(self, st: dict[str, Any], level: int, block: np.ndarray) -> None:
        """Queue the tiles of one tile row of ``level`` for compression."""
        t = self.tile
        ty = st["emitted"][level]
        st["emitted"][level] += 1
        x0 = st["x"] >> level
        for bx in range(0, block.shape[1], t):
            part = block[:, bx : bx + t]
            if part.shape[:2] != (t, t):
                padded = np.zeros((t, t, self.channels), self.dtype)
                padded[: part.shape[0], : part.shape[1]] = part
                part = padded
            for plane in self.planes:
                data = np.ascontiguousarray(part if plane is None else part[:, :, plane : plane + 1])
                self._slots.acquire()
                fut = self._pool.submit(self._compress, (plane, level, ty, (x0 + bx) // t), data)
                fut.add_done_callback(lambda _f: self._slots.release())

    def _compress(self, key: tuple[int | None, int, int, int], data: np.ndarray) -> None:
        try:
            payload = self._encode(data)
            with self._lock:
                offset = self._end
                self._end += len(payload)
            os.pwrite(self._store.fileno(), payload, offset)
            self.index[key] = (offset, len(payload))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by write()/finish()
            self._error = self._error or exc

    def finish(self) -> None:
        """Build the coarse levels, wait for every tile; raise the first compression error."""
        if self._state is not None:
            raise ValueError(f"stripe at column {self._state['x']} is incomplete")
        covered = sum(w for _, w in self._stripes_done)
        if covered != self.sizes[0][0]:
            raise RuntimeError(f"stripes cover {covered} of {self.sizes[0][0]} columns")
        if self._coarse is not None:
            level = self._coarse_level
            w, h = self.sizes[level]
            st = self._start(0, w, level, full=True)
            row_bytes = w * self.channels * self.dtype.itemsize
            for y in range(0, h, self.tile):
                n = min(self.tile, h - y)
                raw = os.pread(self._coarse.fileno(), n * row_bytes, y * row_bytes)
                self._feed(st, level, np.frombuffer(raw, self.dtype).reshape(n, w, self.channels))
            self._finish_stripe(st)
            self._coarse.close()
            self._coarse = None
        for _ in range(4 * _COMMIT_WORKERS):  # every queued tile has finished once all slots are free
            self._slots.acquire()
        for _ in range(4 * _COMMIT_WORKERS):
            self._slots.release()
        self._store.close()
        if self._error is not None:
            raise self._error

    def tiles(self, plane: int | None, level: int) -> Iterator[tuple[bytes, int]]:
        """The compressed tiles of one level and plane in TIFF order, as ``(bytes, bytecount)``."""
        w, h = self.sizes[level]
        t = self.tile
        with self._store_path.open("rb") as fh:
            for ty in range(-(-h // t)):
                for tx in range(-(-w // t)):
                    offset, n = self.index[(plane, level, ty, tx)]
                    data = os.pread(fh.fileno(), n, offset)
                    yield data, n

    def raw_tiles(self, plane: int | None, level: int) -> Iterator[np.ndarray]:
        """The tiles of an uncompressed level as arrays: tifffile takes ``(bytes, bytecount)`` only when it
        compresses."""
        shape = (self.tile, self.tile, 3 if plane is None else 1)
        for data, _ in self.tiles(plane, level):
            yield np.frombuffer(data, self.dtype).reshape(shape)

    def close(self) -> None:
        for f in (self._store, self._coarse):
            if f is not None and not f.closed:
                f.close()

    def write_tiff(self, path: Path, spec: OutputSpec, xml: str) -> None:
        """The OME-TIFF: per plane, a full-resolution page followed by its reduced levels in SubIFDs."""
        import tifffile

        raw = self.compression == "none"
        common: dict[str, Any] = {"tile": (self.tile, self.tile), "compression": None if raw else self.compression,
                                  "dtype": self.dtype, "metadata": None, "software": f"lpfm-toolkit {__version__}",
                                  "photometric": "rgb" if self.rgb else "minisblack"}
        if self.compression == "jpeg":
            common["compressionargs"] = {"level": self.quality}
            if self.rgb:
                factors, colorspace = _SUBSAMPLING[self.subsampling]
                common["subsampling"] = factors
                common["compressionargs"]["outcolorspace"] = colorspace
        resolution = (1e4 / spec.mpp[0], 1e4 / spec.mpp[1]) if spec.mpp else None
        description = xml.encode("utf-8")  # see build_ome_xml: UTF-8, never character references
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            for i, plane in enumerate(self.planes):
                for level, (lw, lh) in enumerate(self.sizes):
                    lres = (resolution[0] / 2**level, resolution[1] / 2**level) if resolution else None
                    extra = {"subifds": len(self.sizes) - 1, "description": description if i == 0 else None} \
                        if level == 0 else {"subfiletype": 1}
                    data = self.raw_tiles(plane, level) if raw else self.tiles(plane, level)
                    tw.write(data, shape=(lh, lw, 3) if self.rgb else (lh, lw), resolution=lres,
                             resolutionunit="CENTIMETER" if lres else None, **extra, **common)


class OmeTiffWriter(SinkWriter):
    """Encodes one result into compressed tiles as it arrives; ``commit`` writes the OME-TIFF and sidecar."""

    def __init__(self, final: Path, spec: OutputSpec, tile: int, compression: str, *,
                 jpeg_quality: int = JPEG_QUALITY, jpeg_subsampling: str = JPEG_SUBSAMPLING) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.final, self.spec, self.tile = final, spec, tile
        compression = resolve_compression(compression, spec)
        ome_pixel_type(spec.dtype)  # a clear error now for dtypes OME-TIFF cannot hold
        if compression == "jpeg" and np.dtype(spec.dtype) != np.uint8:
            raise ConfigError(f"JPEG cannot store {np.dtype(spec.dtype).name} pixels",
                              "use --compression zlib (lossless) for 16-bit or float images")
        if not 1 <= int(jpeg_quality) <= 100 or jpeg_subsampling not in _SUBSAMPLING:
            raise ConfigError(f"JPEG quality {jpeg_quality} / sub-sampling {jpeg_subsampling!r} is not supported",
                              f"use a quality from 1 to 100 and one of {', '.join(_SUBSAMPLING)}")
        self.compression = compression
        self.jpeg_quality, self.jpeg_subsampling = int(jpeg_quality), jpeg_subsampling
        final.parent.mkdir(parents=True, exist_ok=True)
        self._scratch = Path(tempfile.mkdtemp(prefix=".lpfm-scratch-", dir=final.parent))
        n_levels = n_pyramid_levels(spec.width, spec.height, tile)
        self._pool = ThreadPoolExecutor(_COMMIT_WORKERS, thread_name_prefix="lpfm-encode")
        img: _TilePyramid | None = None
        try:  # a second scratch file that cannot be opened must not leave the first one (or the folder) behind
            img = _TilePyramid(self._scratch, "img", spec.width, spec.height, len(spec.channel_names),
                               np.dtype(spec.dtype), tile, n_levels, compression, spec.is_rgb, self._pool,
                               self.jpeg_quality, self.jpeg_subsampling)
            unc = _TilePyramid(self._scratch, "unc", spec.width, spec.height, 1, np.dtype(np.float32), tile,
                               n_levels, "zlib", False, self._pool) if spec.uncertainty else None
        except BaseException:
            self._pool.shutdown(wait=False)
            if img is not None:
                img.close()
            shutil.rmtree(self._scratch, ignore_errors=True)
            raise
        self._img, self._unc = img, unc
        self.column_alignment = self._img.alignment
        self._done = False

    def write_block(self, x: int, rows: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        self._img.write(x, rows)
        if self._unc is not None:
            if uncertainty is None:
                raise ValueError("this output expects an uncertainty map with every row")
            self._unc.write(x, uncertainty.astype(np.float32))

    def write_rows(self, rows: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        self.write_block(0, rows, uncertainty)

    @property
    def uncertainty_path(self) -> Path:
        return uncertainty_path(self.final)

    def compression_info(self) -> dict[str, Any]:
        """How the pixels were stored: codec, and for JPEG its quality (and chroma sub-sampling for RGB)."""
        info: dict[str, Any] = {"compression": self.compression}
        if self.compression == "jpeg":
            info["jpeg_quality"] = self.jpeg_quality
            if self.spec.is_rgb:
                info["jpeg_subsampling"] = self.jpeg_subsampling
        return info

    def commit(self, provenance: Provenance) -> OutputRef:
        extra: dict[str, Any] = {"sidecar": str(sidecar_path(self.final)), "levels": [list(s) for s in self._img.sizes],
                                 **self.compression_info(), "tile": self.tile}
        if self._unc is not None:
            extra["uncertainty"] = str(self.uncertainty_path)
        provenance.output.update({"uri": str(self.final.resolve()), "format": "ome-tiff", **extra})
        # The OME-XML is built and validated while the last tiles are still being compressed.
        xml = build_ome_xml(self.spec, provenance, self.spec.channel_names, self._img.dtype, self.spec.is_rgb)
        validate_ome_xml(xml)
        self._img.finish()
        tmp_tiff = self._scratch / "out.ome.tiff"
        self._img.write_tiff(tmp_tiff, self.spec, xml)
        tmp_unc = None
        if self._unc is not None:
            unc_spec = OutputSpec(self.spec.name + " uncertainty", self.spec.width, self.spec.height,
                                  ["uncertainty"], np.dtype(np.float32), self.spec.mpp)
            unc_xml = build_ome_xml(unc_spec, provenance, ["uncertainty"], np.dtype(np.float32), False)
            self._unc.finish()
            tmp_unc = self._scratch / "unc.ome.tiff"
            self._unc.write_tiff(tmp_unc, unc_spec, unc_xml)
        self._pool.shutdown()
        tmp_json = self._scratch / "out.json"
        tmp_json.write_text(provenance.to_json(), encoding="utf-8")
        # The sidecar lands last: its presence is what marks the result complete for find().
        if tmp_unc is not None:
            os.replace(tmp_unc, self.uncertainty_path)
        os.replace(tmp_tiff, self.final)
        os.replace(tmp_json, sidecar_path(self.final))
        self._done = True
        shutil.rmtree(self._scratch, ignore_errors=True)
        log.info("wrote %s", self.final)
        return OutputRef(uri=str(self.final), provenance=provenance, extra=extra)

    def abort(self) -> None:
        if not self._done:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._img.close()
            if self._unc is not None:
                self._unc.close()
            shutil.rmtree(self._scratch, ignore_errors=True)


def resolve_compression(compression: str, spec: OutputSpec) -> str:
    """The codec ``compression`` means for ``spec``: ``auto`` is JPEG (quality 98, 4:4:4) for 8-bit RGB, else zlib.

    An enhancement must not lose its gain on the way to disk. Measured on enhanced H&E results
    (benchmarks/codec_bench.py, docs/benchmarks.md "Compression"), quality 98 without chroma sub-sampling loses
    ≤ 0.02 dB PSNR (≤ 0.08 dB for a result with half the error) at 0.55 of the uncompressed size; the old default,
    quality 90 with 4:2:0, lost up to 1.5 dB, and lossless zlib keeps 0.86 of the size. zlib (not zstd) for the
    rest: every Bio-Formats, QuPath and OMERO reads it.
    """
    if compression != "auto":
        return compression
    return "jpeg" if spec.is_rgb else "zlib"


class OmeTiffSink(Sink):
    """Writes each result as ``<directory>/<name>.ome.tiff`` (or to one given ``path``) + a JSON sidecar.

    ``<name>`` comes from the ``name`` template (:class:`NameTemplate`; default :data:`DEFAULT_NAME`,
    ``{stem}_{task}_{engine}[_{region}].{key}``) filled from the spec's ``file_fields``.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        path: str | Path | None = None,
        compression: str = "auto",
        tile: int = 512,
        overwrite: bool = False,
        jpeg_quality: int = JPEG_QUALITY,
        jpeg_subsampling: str = JPEG_SUBSAMPLING,
        name: str | NameTemplate | None = None,
    ) -> None:
        if (directory is None) == (path is None):
            raise ValueError("give exactly one of directory or path")
        if compression not in COMPRESSIONS:
            raise ConfigError(f"compression {compression!r} is not supported", f"use one of {', '.join(COMPRESSIONS)}")
        if tile % 16 or tile < 16:
            raise ConfigError(f"TIFF tile size {tile} is not a multiple of 16", "use 256 or 512")
        self.directory = Path(directory) if directory is not None else None
        self.path = Path(path) if path is not None else None
        self.compression, self.tile, self.overwrite = compression, tile, overwrite
        self.jpeg_quality, self.jpeg_subsampling = jpeg_quality, jpeg_subsampling
        self.naming = name if isinstance(name, NameTemplate) else NameTemplate(name)

    def target(self, key: str, spec: OutputSpec | str) -> Path:
        """Where the result of ``key`` goes: the template filled from ``spec.file_fields``; a bare name (or a
        spec without fields) gives the name older versions used (:meth:`legacy_target`)."""
        if self.path is not None:
            p = self.path
            return p if p.name.lower().endswith((".ome.tiff", ".ome.tif")) else p.with_name(p.name + ".ome.tiff")
        assert self.directory is not None
        if isinstance(spec, OutputSpec) and spec.file_fields is not None:
            return self.directory / f"{self.naming.render(spec.file_fields, key)}.ome.tiff"
        return self.legacy_target(key, spec.name if isinstance(spec, OutputSpec) else spec)

    def legacy_target(self, key: str, name: str) -> Path:
        """``<safe display name>.<key>.ome.tiff``: how results were named before name templates."""
        assert self.directory is not None
        return self.directory / f"{safe_filename(name)}.{key[:10]}.ome.tiff"

    def find(self, idempotency_key: str, spec_name: str) -> OutputRef | None:
        return self._find_at(self.target(idempotency_key, spec_name), idempotency_key)

    def find_spec(self, idempotency_key: str, spec: OutputSpec) -> OutputRef | None:
        """The result of this key under its name, else (default names only) under the name older versions gave
        it, so a re-run skips results made before name templates."""
        final = self.target(idempotency_key, spec)
        found = self._find_at(final, idempotency_key)
        if found is None and self.path is None and self.naming.is_default:
            legacy = self.legacy_target(idempotency_key, spec.name)
            if legacy != final:
                found = self._find_at(legacy, idempotency_key, shared=False)
        return found

    def find_file(self, idempotency_key: str, path: Path) -> OutputRef | None:
        """The result of this key at ``path`` (e.g. a path a worker reported), if complete."""
        return self._find_at(Path(path), idempotency_key, shared=False)

    def _find_at(self, final: Path, idempotency_key: str, shared: bool | None = None) -> OutputRef | None:
        """The complete result of ``idempotency_key`` at ``final``. When the name does not hold the key
        (``shared``: a ``path`` sink, or a template without ``{key}``), a result of another run there is refused."""
        side = sidecar_path(final)
        if not (final.exists() and side.exists()):
            return None
        try:
            prov = Provenance.from_json(side.read_text(encoding="utf-8"))
        except (ValueError, TypeError, json.JSONDecodeError):
            return None
        if prov.idempotency_key == idempotency_key:
            return OutputRef(uri=str(final), provenance=prov, extra={"sidecar": str(side)})
        shared = (self.path is not None or not self.naming.has_key) if shared is None else shared
        if shared and not self.overwrite:
            if self.path is not None:
                raise OutputExistsError(
                    f"{final} exists and was made by a different run",
                    "choose another --out, or add --force to replace it",
                )
            raise OutputExistsError(
                f"{final} exists and was made by a different run (--name {self.naming.text!r} has no {{key}})",
                "add {key} or {region} to --name, or --force to replace it",
            )
        return None

    def open(self, spec: OutputSpec, idempotency_key: str, source: dict[str, Any]) -> OmeTiffWriter:
        final = self.target(idempotency_key, spec)
        if source.get("system") == "file" and Path(str(source.get("uri", ""))).resolve() == final.resolve():
            raise OutputExistsError(f"refusing to write over the original {final}", "choose another --out")
        if self.path is not None and not self.overwrite and final.exists():
            raise OutputExistsError(
                f"{final} exists and is not an lpfm output of this run",
                "choose another --out, or add --force to replace it",
            )
        return OmeTiffWriter(
            final,
            spec,
            self.tile,
            self.compression,
            jpeg_quality=self.jpeg_quality,
            jpeg_subsampling=self.jpeg_subsampling,
        )


def read_provenance(path: str | Path) -> Provenance:
    """Provenance of an output: from its sidecar, else from the OME-XML inside the TIFF (or a JSON file)."""
    from lpfm_toolkit.errors import CorruptImageError, SlideNotFoundError

    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(f"{p} does not exist", "give an lpfm output (.ome.tiff) or its .lpfm.json sidecar")
    if p.suffix == ".json":
        return Provenance.from_json(p.read_text(encoding="utf-8"))
    side = sidecar_path(p)
    if side.exists():
        return Provenance.from_json(side.read_text(encoding="utf-8"))
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            xml = tif.ome_metadata or ""
    except tifffile.TiffFileError as exc:
        raise CorruptImageError(f"{p.name} is not a readable TIFF: {exc}") from exc
    from ome_types import from_xml

    ome = from_xml(xml) if xml else None
    if ome is not None and ome.structured_annotations is not None:
        for ann in ome.structured_annotations.comment_annotations:
            if ann.namespace == JSON_NAMESPACE:
                return Provenance.from_json(ann.value)
    raise CorruptImageError(f"{p.name} carries no lpfm provenance", "only outputs written by lpfm have one")

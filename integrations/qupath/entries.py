"""Project entries as data, and the JSON shapes QuPath gives them in each version (pure functions).

Shapes, from real QuPath-written projects (../shared/fixtures/qupath):

- ``project.qpproj`` (0.3 → 0.7): ``version, createTimestamp, modifyTimestamp, uri, lastID, images``; each
  image ``serverBuilder {builderType, providerClassName, uri, args, metadata}, entryID, randomizedName,
  imageName, metadata`` (+ optional ``description``; + ``tags`` since 0.7).
- ``data/<id>/server.json``: the builder itself, without ``builderType``, up to 0.4; since 0.5
  ``{"builder": {builderType, …}, "metadata": {…}}``. Compact JSON.
- ``data/<id>/summary.json``: ``timestamp, imageType, server {width, height, sizeC, …}, hierarchy
  {nObjects, objectTypeCounts, annotationClassificationCounts, detectionClassificationCounts}``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from lpfm_toolkit.sources.base import Level

#: metadata keys lpfm writes on every result entry (besides the provenance summary ``lpfm.*``)
KEY_IDEMPOTENCY = "lpfm.idempotency_key"
KEY_SOURCE_ENTRY = "lpfm.source.entry"
KEY_SOURCE_ENTRY_NAME = "lpfm.source.entry.name"
KEY_ANNOTATIONS = "lpfm.annotations"
KEY_SIDECAR = "lpfm.sidecar"

BIOFORMATS = "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder"
_RGB_COLORS = {"R": ("Red", -65536), "G": ("Green", -16711936), "B": ("Blue", -16776961)}
# QuPath's default fluorescence channel colours (ImageChannel.getDefaultChannelColor), packed ARGB ints
_DEFAULT_COLORS = [-65536, -16711936, -16776961, -256, -16711681, -65281, -1]
_PIXEL_TYPES = {"uint8": "UINT8", "int8": "INT8", "uint16": "UINT16", "int16": "INT16", "uint32": "UINT32",
                "int32": "INT32", "float32": "FLOAT32", "float64": "FLOAT64"}


def parse_version(text: str | None) -> tuple[int, int, int]:
    """``"0.6.0-rc3"`` → ``(0, 6, 0)``; unknown → the newest shape we know."""
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return (0, 7, 0)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def _innermost_builder(builder: dict[str, Any]) -> dict[str, Any]:
    """The ``uri`` builder under wrappers such as ``rotated`` or ``pyramidize``."""
    seen = 0
    while isinstance(builder, dict) and "uri" not in builder and isinstance(builder.get("builder"), dict) \
            and seen < 16:
        builder, seen = builder["builder"], seen + 1
    return builder


def _mpp(metadata: dict[str, Any]) -> tuple[float, float] | None:
    cal = metadata.get("pixelCalibration") or {}
    pw, ph = cal.get("pixelWidth") or {}, cal.get("pixelHeight") or {}
    if pw.get("unit") in ("µm", "um", "μm", "microns") and ph.get("unit") in ("µm", "um", "μm", "microns"):
        try:
            return (float(pw["value"]), float(ph["value"]))
        except (KeyError, TypeError, ValueError):
            return None
    return None


@dataclass(frozen=True)
class ProjectEntry:
    """One image of a QuPath project, as listed by the project (no pixels are read)."""

    id: str
    name: str
    uri: str | None
    builder_type: str = "uri"
    provider: str | None = None
    width: int | None = None
    height: int | None = None
    levels: tuple[Level, ...] = ()
    mpp: tuple[float, float] | None = None
    channels: tuple[str, ...] = ()
    pixel_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, compare=False)
    description: str | None = None
    tags: tuple[str, ...] = ()
    image_type: str | None = None  # from summary.json (BRIGHTFIELD_H_E, FLUORESCENCE, …)
    annotation_counts: dict[str, int] | None = field(default=None, compare=False)  # from summary.json

    @property
    def is_result(self) -> bool:
        """True for entries lpfm added (they carry an idempotency key)."""
        return KEY_IDEMPOTENCY in self.metadata

    @property
    def transformed(self) -> bool:
        """True when QuPath shows the image through a transform (rotation, …) lpfm does not apply."""
        return self.builder_type != "uri"

    @classmethod
    def from_json(cls, image: dict[str, Any], summary: dict[str, Any] | None = None) -> ProjectEntry:
        """An entry from its ``project.qpproj`` object (and ``summary.json`` when there is one)."""
        outer = image.get("serverBuilder") or {}
        builder = _innermost_builder(outer)
        md = builder.get("metadata") or outer.get("metadata") or {}
        levels = tuple(Level(int(lv["width"]), int(lv["height"]), float(lv["downsample"]))
                       for lv in md.get("levels") or [] if {"width", "height", "downsample"} <= set(lv))
        counts = None
        image_type = None
        if summary:
            image_type = summary.get("imageType")
            counts = (summary.get("hierarchy") or {}).get("annotationClassificationCounts")
        meta = {str(k): str(v) for k, v in (image.get("metadata") or {}).items()}
        return cls(
            id=str(image.get("entryID")),
            name=str(image.get("imageName") or md.get("name") or f"entry {image.get('entryID')}"),
            uri=builder.get("uri"),
            builder_type=str(outer.get("builderType", "uri")),
            provider=builder.get("providerClassName"),
            width=md.get("width"),
            height=md.get("height"),
            levels=levels,
            mpp=_mpp(md),
            channels=tuple(str(c.get("name", "")) for c in md.get("channels") or []),
            pixel_type=md.get("pixelType"),
            metadata=meta,
            description=image.get("description"),
            tags=tuple(str(t) for t in image.get("tags") or []),
            image_type=image_type,
            annotation_counts={str(k): int(v) for k, v in counts.items()} if counts else None,
        )


@dataclass(frozen=True)
class ImageInfo:
    """What QuPath's server metadata says about an output image (read from the written file)."""

    name: str
    width: int
    height: int
    levels: tuple[Level, ...]
    channel_names: tuple[str, ...]
    dtype: str  # numpy name
    mpp: tuple[float, float] | None
    tile_width: int = 256
    tile_height: int = 256


def server_metadata(info: ImageInfo, channel_colors: list[int] | None = None) -> dict[str, Any]:
    """``ImageServerMetadata`` as QuPath serialises it in ``serverBuilder.metadata``."""
    is_rgb = tuple(info.channel_names) == ("R", "G", "B") and info.dtype == "uint8"
    if is_rgb:
        channels = [{"name": _RGB_COLORS[c][0], "color": _RGB_COLORS[c][1]} for c in info.channel_names]
    else:
        colors = channel_colors if channel_colors and len(channel_colors) == len(info.channel_names) else \
            [_DEFAULT_COLORS[i % len(_DEFAULT_COLORS)] for i in range(len(info.channel_names))]
        channels = [{"name": n, "color": int(c)} for n, c in zip(info.channel_names, colors)]
    if info.mpp:
        cal = {"pixelWidth": {"value": float(info.mpp[0]), "unit": "µm"},
               "pixelHeight": {"value": float(info.mpp[1]), "unit": "µm"}}
    else:
        cal = {"pixelWidth": {"value": 1.0, "unit": "px"}, "pixelHeight": {"value": 1.0, "unit": "px"}}
    cal.update({"zSpacing": {"value": 1.0, "unit": "z-slice"}, "timeUnit": "SECONDS", "timepoints": []})
    return {
        "name": info.name,
        "width": info.width,
        "height": info.height,
        "sizeZ": 1,
        "sizeT": 1,
        "channelType": "DEFAULT",
        "isRGB": is_rgb,
        "pixelType": _PIXEL_TYPES.get(info.dtype, "FLOAT32"),
        "levels": [{"downsample": float(lv.downsample), "width": lv.width, "height": lv.height}
                   for lv in info.levels],
        "channels": channels,
        "pixelCalibration": cal,
        "preferredTileWidth": info.tile_width,
        "preferredTileHeight": info.tile_height,
    }


def server_builder(uri: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``serverBuilder`` QuPath writes for an OME-TIFF opened with Bio-Formats."""
    return {"builderType": "uri", "providerClassName": BIOFORMATS, "uri": uri, "args": ["--series", "0"],
            "metadata": metadata}


def entry_json(version: tuple[int, int, int], entry_id: int, name: str, builder: dict[str, Any],
               metadata: dict[str, str]) -> dict[str, Any]:
    """A new ``images[]`` element in the shape QuPath ``version`` writes."""
    entry: dict[str, Any] = {
        "serverBuilder": builder,
        "entryID": entry_id,
        "randomizedName": str(uuid.uuid4()),
        "imageName": name,
        "metadata": dict(metadata),
    }
    if version >= (0, 7, 0):
        entry["tags"] = []
    return entry


def server_json(version: tuple[int, int, int], builder: dict[str, Any]) -> dict[str, Any]:
    """``data/<id>/server.json``: the builder without ``builderType`` before 0.5, nested under ``builder`` since."""
    if version >= (0, 5, 0):
        return {"builder": builder, "metadata": builder.get("metadata", {})}
    return {k: v for k, v in builder.items() if k != "builderType"}

"""What every source gives: pixels at any pyramid level, and annotations.

A source is opened into an :class:`ImageHandle` (a context manager). Handles only read; nothing in
the toolkit writes through a handle, so originals cannot be modified by a run.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lpfm_toolkit.errors import RegionError


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels and its downsample relative to level 0."""

    width: int
    height: int
    downsample: float


@dataclass(frozen=True)
class Region:
    """A rectangle ``x, y, width, height`` in pixels of one pyramid level."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Region:
        """Parse ``"x,y,w,h"`` as typed on a command line."""
        try:
            x, y, w, h = (int(v) for v in text.replace(" ", "").split(","))
        except ValueError as exc:
            raise RegionError(
                f"region {text!r} is not four integers", "write it as x,y,width,height, e.g. 0,0,1024,1024"
            ) from exc
        return cls(x, y, w, h)

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.width, self.height)

    def scaled(self, factor: float) -> Region:
        """The same rectangle in a coordinate system ``factor`` times finer."""
        return Region(
            round(self.x * factor), round(self.y * factor), round(self.width * factor), round(self.height * factor)
        )


@dataclass
class Annotation:
    """A region of interest: a shapely geometry in level-0 pixels, with its class and identity."""

    geometry: Any  # shapely.geometry.base.BaseGeometry (shapely is imported by the readers only)
    class_name: str | None = None
    id: str | None = None
    name: str | None = None
    source: str = ""
    properties: dict[str, Any] = field(default_factory=dict)

    def bounds_region(self, downsample: float = 1.0) -> Region:
        """The integer bounding box of the geometry at a level of ``downsample``."""
        minx, miny, maxx, maxy = self.geometry.bounds
        x0, y0 = int(np.floor(minx / downsample)), int(np.floor(miny / downsample))
        x1, y1 = int(np.ceil(maxx / downsample)), int(np.ceil(maxy / downsample))
        return Region(x0, y0, max(1, x1 - x0), max(1, y1 - y0))


class ImageHandle(abc.ABC):
    """An open image: pyramid levels, pixel size, channels, and region reads.

    ``read_region`` returns ``(H, W, C)`` arrays in the image's own dtype, ``C`` equal to
    ``len(self.channel_names)``. RGB brightfield has three channels named R, G, B.
    """

    #: identifies where the pixels came from (``file``, ``qupath``, ``omero``)
    system: str = "file"

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """A stable identifier of the image (path, URI, or ``omero://host/image/ID``)."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short human name (file name, image name)."""

    @property
    @abc.abstractmethod
    def levels(self) -> list[Level]:
        """Pyramid levels, finest first."""

    @property
    @abc.abstractmethod
    def dtype(self) -> np.dtype:
        """Pixel type of ``read_region``'s output."""

    @property
    @abc.abstractmethod
    def channel_names(self) -> list[str]:
        """One name per channel."""

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Level-0 pixel size in µm (x, y), or None when the file does not say."""
        return None

    @property
    def is_rgb(self) -> bool:
        return self.channel_names == ["R", "G", "B"] and self.dtype == np.uint8

    @abc.abstractmethod
    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read a region already checked to lie inside ``level``."""

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels of ``(x, y, width, height)`` at ``level`` as ``(H, W, C)``; the region must lie inside."""
        self.check_region(level, Region(x, y, width, height))
        out = self._read(level, x, y, width, height)
        if out.ndim == 2:
            out = out[:, :, None]
        return out

    def check_region(self, level: int, region: Region) -> None:
        """Raise :class:`RegionError` unless ``region`` lies inside ``level``."""
        if not 0 <= level < len(self.levels):
            raise RegionError(
                f"level {level} does not exist in {self.name}",
                f"choose a level from 0 to {len(self.levels) - 1}",
            )
        lv = self.levels[level]
        if region.width <= 0 or region.height <= 0:
            raise RegionError(f"region {region.as_tuple()} is empty", "width and height must be positive")
        if region.x < 0 or region.y < 0 or region.x + region.width > lv.width or region.y + region.height > lv.height:
            raise RegionError(
                f"region {region.as_tuple()} lies outside level {level} of {self.name} ({lv.width}×{lv.height})",
                f"keep x+width ≤ {lv.width} and y+height ≤ {lv.height}",
            )

    def full_region(self, level: int = 0) -> Region:
        lv = self.levels[level]
        return Region(0, 0, lv.width, lv.height)

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """Pixel size in µm at ``level``."""
        if self.mpp is None:
            return None
        ds = self.levels[level].downsample
        return (self.mpp[0] * ds, self.mpp[1] * ds)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The finest level whose downsample does not exceed ``downsample``."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample + 1e-6:
                best = i
        return best

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """A small view of the whole image read from the coarsest level that is large enough."""
        from lpfm_toolkit.imageops import resize  # local: keeps handles free of scikit-image at import

        level = len(self.levels) - 1
        for i, lv in enumerate(self.levels):
            if max(lv.width, lv.height) <= max_size * 2:
                level = i
                break
        lv = self.levels[level]
        img = self.read_region(level, 0, 0, lv.width, lv.height)
        scale = max_size / max(lv.width, lv.height)
        if scale < 1:
            img = resize(img, (max(1, round(lv.height * scale)), max(1, round(lv.width * scale))))
        return img

    def annotations(self) -> list[Annotation]:
        """Annotations attached to the image (none for plain files)."""
        return []

    def fingerprint(self) -> str:
        """Identity of the pixels used in idempotency keys; overridden by sources that can do better."""
        return self.uri

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for ``lpfm info`` and provenance."""
        return {
            "system": self.system,
            "uri": self.uri,
            "name": self.name,
            "levels": [{"width": lv.width, "height": lv.height, "downsample": lv.downsample} for lv in self.levels],
            "mpp": list(self.mpp) if self.mpp else None,
            "channels": self.channel_names,
            "dtype": str(np.dtype(self.dtype)),
        }

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles or sessions."""

    def __enter__(self) -> ImageHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoredMetadataHandle(ImageHandle):
    """A handle whose metadata is read once when it opens and kept in ``_levels``, ``_dtype``, ``_channels``, ``_mpp``."""

    _levels: list[Level]
    _dtype: np.dtype
    _channels: list[str]
    _mpp: tuple[float, float] | None = None

    @property
    def levels(self) -> list[Level]:
        return self._levels

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def channel_names(self) -> list[str]:
        return list(self._channels)

    @property
    def mpp(self) -> tuple[float, float] | None:
        """The recorded pixel size; None when the file records none, or nonsense (zero, negative, NaN, inf)."""
        mpp = self._mpp
        if mpp is not None and not all(math.isfinite(v) and 0 < v < 1e6 for v in mpp):
            return None
        return mpp


def of_classes(annotations: Sequence[Annotation], classes: Sequence[str]) -> list[Annotation]:
    """The annotations (ROIs) whose class is one of ``classes``, compared without case or surrounding spaces."""
    wanted = {c.strip().lower() for c in classes}
    return [a for a in annotations if a.class_name and a.class_name.strip().lower() in wanted]

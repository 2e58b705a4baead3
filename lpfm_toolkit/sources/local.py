"""Local slides and images: OpenSlide (SVS, NDPI, MRXS, SCN, …), tifffile (OME-TIFF, plain TIFF), Pillow.

All readers give the same :class:`~lpfm_toolkit.sources.base.ImageHandle` API. Nothing here writes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import stat
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lpfm_toolkit.errors import (
    CorruptImageError,
    LpfmError,
    SlideNotFoundError,
    SlideUnreadableError,
    UnsupportedFormatError,
)
from lpfm_toolkit.sources.base import ImageHandle, Level, StoredMetadataHandle

log = logging.getLogger(__name__)

OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff"}
TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8", ".tf2"}
PILLOW_SUFFIXES = {".png", ".jpg", ".jpeg"}
SUPPORTED = "SVS, NDPI, MRXS, SCN, BIF, OME-TIFF, TIFF, PNG, JPEG"
#: the largest level-0 side accepted (pixels); the biggest scanned slides are about 250 000 px wide
MAX_SIDE = 1 << 19


def _short(exc: BaseException, limit: int = 160) -> str:
    """An exception as one short line (damaged headers can make tifffile quote kilobytes)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_declared_size(path: Path, level0: Level) -> None:
    """Refuse a header that declares an impossible image (a crafted or damaged file), before any planning."""
    if not 0 < level0.width <= MAX_SIDE or not 0 < level0.height <= MAX_SIDE:
        raise CorruptImageError(
            f"{path.name} declares {level0.width}×{level0.height} px, beyond any slide (at most {MAX_SIDE} px a side)",
            "the header is damaged or not a slide's",
        )


FINGERPRINT_PREFIX = "file-sha256:"


def file_fingerprint(path: Path) -> str:
    """sha256 of the whole file: any edit, even one that keeps the size, changes it; moving the file does not.

    Costs one read of the file (about 1 GB/s here; see docs/reliability.md), done once per run.
    """
    h = hashlib.sha256()
    with path.open("rb") as fh:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return f"{FINGERPRINT_PREFIX}{h.hexdigest()}"


class _InFlightReads:
    """Counts reads in progress so that closing a reader waits for them.

    A C reader closed while another thread is inside it crashes the process (OpenSlide aborts on
    ``tc->outstanding == 0``): a stop request (SIGTERM, Ctrl-C) can unwind the main thread while a prefetch
    thread is still reading. ``close`` therefore waits for the reads in flight; reads after it are refused.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._n = 0
        self.closed = False

    @contextmanager
    def reading(self, name: str) -> Iterator[None]:
        with self._cond:
            if self.closed:
                raise LpfmError(f"{name} was closed before a queued read began", "run again")
            self._n += 1
        try:
            yield
        finally:
            with self._cond:
                self._n -= 1
                self._cond.notify_all()

    def close(self) -> bool:
        """Refuse new reads, wait for those in flight; False when it was closed already."""
        with self._cond:
            if self.closed:
                return False
            self.closed = True
            self._cond.wait_for(lambda: self._n == 0)
            return True


class _FileHandle(StoredMetadataHandle):
    system = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reads = _InFlightReads()

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """As :meth:`ImageHandle.read_region`; :meth:`close` waits until it returns."""
        with self._reads.reading(self.name):
            return super().read_region(level, x, y, width, height)

    @property
    def uri(self) -> str:
        return str(self.path.resolve())

    @property
    def name(self) -> str:
        name = self.path.name
        for suffix in (".ome.tiff", ".ome.tif"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return self.path.stem

    def fingerprint(self) -> str:
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            cached = self._fingerprint = file_fingerprint(self.path)
        return cached


class OpenSlideHandle(_FileHandle):
    """A slide read through OpenSlide (RGB, uint8; transparent areas composited on white)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedFormatError(
                f"{path.name} is not a format OpenSlide reads", f"supported: {SUPPORTED}"
            ) from exc
        except openslide.OpenSlideError as exc:
            raise CorruptImageError(
                f"{path.name} could not be opened: {exc}",
                "the file may be truncated or damaged; copy it again from its source",
            ) from exc
        try:
            self._levels = [
                Level(int(w), int(h), float(ds))
                for (w, h), ds in zip(self._slide.level_dimensions, self._slide.level_downsamples)
            ]
            if not self._levels:
                raise CorruptImageError(
                    f"{path.name} holds no image level",
                    "the file may be truncated or damaged; copy it again from its source",
                )
            check_declared_size(path, self._levels[0])
        except CorruptImageError:
            self._slide.close()
            raise
        props = self._slide.properties
        try:
            self._mpp: tuple[float, float] | None = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
        except (KeyError, ValueError):
            self._mpp = None
        self.vendor = props.get("openslide.vendor", "")
        self._dtype = np.dtype(np.uint8)
        self._channels = ["R", "G", "B"]

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        import openslide

        ds = self._levels[level].downsample
        try:
            rgba = np.asarray(self._slide.read_region((round(x * ds), round(y * ds)), level, (width, height)))
        except openslide.OpenSlideError as exc:
            raise CorruptImageError(
                f"reading {self.path.name} failed: {exc}",
                "the file may be truncated or damaged; copy it again from its source",
            ) from exc
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        rgb = rgba[:, :, :3].astype(np.uint16)
        # OpenSlide returns premultiplied RGBA; transparent (no tissue scanned) becomes white.
        return (rgb + (255 - alpha)).clip(0, 255).astype(np.uint8)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["reader"] = "openslide"
        out["vendor"] = self.vendor
        return out

    def close(self) -> None:
        if self._reads.close():
            self._slide.close()


class TiffHandle(_FileHandle):
    """OME-TIFF (pyramids in SubIFDs), plain tiled or stripped TIFF; 8/16-bit, RGB or multi-channel."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(str(path))
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError, struct.error) as exc:
            raise CorruptImageError(
                f"{path.name} is not a readable TIFF: {_short(exc)}",
                "the file may be truncated or damaged; copy it again from its source",
            ) from exc
        try:
            self._parse(path, zarr)
        except CorruptImageError:
            self._tif.close()
            raise
        except Exception as exc:  # tifffile and zarr raise many types on damaged headers
            self._tif.close()
            raise CorruptImageError(
                f"{path.name} is not a readable TIFF: {_short(exc)}",
                "the file may be truncated or damaged; copy it again from its source",
            ) from exc

    def _parse(self, path: Path, zarr: Any) -> None:
        if not self._tif.series:
            raise CorruptImageError(
                f"{path.name} holds no image", "the file may be truncated or damaged; copy it again from its source"
            )
        series = self._tif.series[0]
        self._axes = series.axes
        if "Y" not in self._axes or "X" not in self._axes:
            raise CorruptImageError(f"{path.name} is not an image (axes {self._axes})", "give a 2-D image or slide")
        shapes = [lv.shape for lv in series.levels]
        yi, xi = self._axes.index("Y"), self._axes.index("X")
        w0 = shapes[0][xi]
        self._levels = [Level(int(s[xi]), int(s[yi]), float(w0 / s[xi])) for s in shapes]
        check_declared_size(path, self._levels[0])
        self._zarr = [zarr.open(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]
        self._dtype = np.dtype(series.dtype)
        self._channels = self._channel_names(series)
        self._mpp = self._read_mpp()

    def _channel_names(self, series: Any) -> list[str]:
        axes, shape = self._axes, series.shape
        if "S" in axes and shape[axes.index("S")] in (3, 4) and self._tif.pages[0].photometric in (2, 6):
            n_extra = shape[axes.index("C")] if "C" in axes else 1
            if n_extra == 1:
                return ["R", "G", "B"]
        n = 1
        for ax in "CS":
            if ax in axes:
                n *= shape[axes.index(ax)]
        names = self._ome_channel_names()
        if names and len(names) == n:
            return names
        return [f"C{i}" for i in range(n)]

    def _ome_channel_names(self) -> list[str]:
        xml = self._tif.ome_metadata
        if not xml:
            return []
        names = re.findall(r"<(?:\w+:)?Channel\b[^>]*?\bName=\"([^\"]*)\"", xml)
        return names

    def _read_mpp(self) -> tuple[float, float] | None:
        xml = self._tif.ome_metadata
        if xml:
            mx = re.search(r"PhysicalSizeX=\"([0-9.eE+-]+)\"", xml)
            my = re.search(r"PhysicalSizeY=\"([0-9.eE+-]+)\"", xml)
            ux = re.search(r"PhysicalSizeXUnit=\"([^\"]+)\"", xml)
            if mx:
                factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(ux.group(1) if ux else "µm", 1.0)
                x = float(mx.group(1)) * factor
                y = float(my.group(1)) * factor if my else x
                return (x, y)
        page = self._tif.pages[0]
        try:
            unit = page.tags["ResolutionUnit"].value
            xres = page.tags["XResolution"].value
            yres = page.tags["YResolution"].value
        except KeyError:
            return None
        per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit))
        if not per_unit or not xres[0] or not yres[0]:
            return None
        return (per_unit * xres[1] / xres[0], per_unit * yres[1] / yres[0])

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        index: list[Any] = []
        for ax in self._axes:
            if ax == "Y":
                index.append(slice(y, y + height))
            elif ax == "X":
                index.append(slice(x, x + width))
            elif ax in "CS":
                index.append(slice(None))
            else:
                index.append(0)  # first T/Z/… plane
        try:
            arr = np.asarray(self._zarr[level][tuple(index)])
        except Exception as exc:  # decoders raise many types on damaged data
            raise CorruptImageError(
                f"reading {self.path.name} failed: {exc}",
                "the file may be truncated or damaged; copy it again from its source",
            ) from exc
        kept = [ax for ax in self._axes if ax in "YXCS"]
        order = [kept.index("Y"), kept.index("X")] + [i for i, ax in enumerate(kept) if ax in "CS"]
        arr = arr.transpose(order)
        h, w = arr.shape[:2]
        arr = arr.reshape(h, w, -1)
        if len(self._channels) == 3 and arr.shape[2] == 4:
            arr = arr[:, :, :3]  # RGBA → RGB
        return np.ascontiguousarray(arr)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["reader"] = "tifffile"
        out["axes"] = self._axes
        out["ome"] = bool(self._tif.is_ome)
        return out

    def close(self) -> None:
        if self._reads.close():
            self._tif.close()


class PillowHandle(_FileHandle):
    """A PNG or JPEG crop (one level). Pixel size is unknown unless given."""

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        super().__init__(path)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                if mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr"):
                    im = im.convert("RGB")
                elif mode == "I;16":
                    pass
                elif mode not in ("RGB", "L"):
                    im = im.convert("RGB")
                self._pixels = np.asarray(im)
        except Image.DecompressionBombError as exc:
            raise CorruptImageError(
                f"{path.name} declares too many pixels for a PNG/JPEG crop ({_short(exc)})",
                "convert it to a tiled (OME-)TIFF pyramid first",
            ) from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise CorruptImageError(
                f"{path.name} is not a readable image: {_short(exc)}",
                "the file may be truncated or damaged; export it again",
            ) from exc
        if self._pixels.ndim == 2:
            self._pixels = self._pixels[:, :, None]
        self._mpp = (mpp, mpp) if mpp else None
        h, w, c = self._pixels.shape
        self._levels = [Level(w, h, 1.0)]
        self._dtype = self._pixels.dtype
        self._channels = ["R", "G", "B"] if c == 3 else [f"C{i}" for i in range(c)]

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._pixels[y : y + height, x : x + width]


def open_local(path: str | Path, mpp: float | None = None) -> ImageHandle:
    """Open a local slide or image, choosing the reader by content and suffix."""
    p = Path(path).expanduser()
    try:
        p.stat()
    except FileNotFoundError:
        pass
    except OSError as exc:  # name too long, loops, I/O errors of the file system
        shown = p.name if len(p.name) <= 60 else p.name[:59] + "…"
        raise SlideNotFoundError(
            f"{shown} cannot be opened ({exc.strerror or exc})", "check the path (and that the drive is mounted)"
        ) from exc
    if not p.exists():
        shown = str(p) if len(str(p)) <= 200 else "…" + str(p)[-199:]
        raise SlideNotFoundError(f"{shown} does not exist", "check the path (and that the drive is mounted)")
    if p.is_dir():
        raise UnsupportedFormatError(f"{p} is a folder", "give the slide file itself (for MRXS, the .mrxs file)")
    mode = p.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = (
            "a named pipe (FIFO)"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise UnsupportedFormatError(
            f"{p.name} is {kind}, not an image file", "give a slide file; copy streamed data to a file first"
        )
    if p.stat().st_size == 0:
        raise CorruptImageError(f"{p.name} is empty (0 bytes)", "copy it again from its source")
    try:
        with p.open("rb"):
            pass
    except PermissionError as exc:
        raise SlideUnreadableError(
            f"{p.name} cannot be read (permission denied)",
            "ask its owner for read access, or copy it somewhere readable",
        ) from exc
    if mpp is not None:
        from lpfm_toolkit.config import check_mpp

        check_mpp(mpp)
    name = p.name.lower()
    suffix = p.suffix.lower()
    if suffix in PILLOW_SUFFIXES:
        return PillowHandle(p, mpp)
    if name.endswith((".ome.tif", ".ome.tiff", ".ome.btf")):
        return TiffHandle(p)
    if suffix in OPENSLIDE_SUFFIXES or suffix not in TIFF_SUFFIXES:
        import openslide

        # OpenSlide takes vendor formats and tiled 8-bit RGB TIFF ("generic-tiff"); untiled, 16-bit and
        # multi-channel TIFFs are not detected by it and go to tifffile below.
        if openslide.OpenSlide.detect_format(str(p)) is not None:
            return OpenSlideHandle(p)
    if suffix in TIFF_SUFFIXES or _looks_like_tiff(p):
        return TiffHandle(p)
    raise UnsupportedFormatError(f"{p.name}: format not recognised", f"supported: {SUPPORTED}")


def _looks_like_tiff(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(4)
    return head[:2] in (b"II", b"MM")

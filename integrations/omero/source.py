"""OMERO images as :class:`~lpfm_toolkit.sources.base.ImageHandle` s: pyramid tiles and ROIs.

Pixels come through a RawPixelsStore: its resolution descriptions give the pyramid, ``setResolutionLevel``
and ``getTile`` read it. Requests are split so that none exceeds the server's maximum plane size or
half of Ice's message size limit, and halved again if the server still answers ``MemoryLimitException``.
ROIs become shapely geometries in level-0 pixels, their text (or the ROI's name/description) as class.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from lpfm_toolkit.errors import CorruptImageError, RegionError
from lpfm_toolkit.integrations.omero.session import (
    OmeroSession,
    describe_server_error,
    is_session_lost,
    memory_limit_types,
    permission_error,
    permission_types,
)
from lpfm_toolkit.sources.base import Annotation, Level, StoredMetadataHandle

log = logging.getLogger(__name__)

#: OMERO pixel type → numpy dtype (data on the wire is big-endian)
PIXEL_TYPES: dict[str, str] = {
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "float": "f4",
    "double": "f8",
}
#: used when the client does not say (omero.constants.MESSAGESIZEMAX is in KiB)
DEFAULT_MESSAGE_SIZE_KB = 65536
MIN_CHUNK = 16


def numpy_dtype(pixel_type: str) -> np.dtype:
    try:
        return np.dtype(PIXEL_TYPES[pixel_type])
    except KeyError as exc:
        raise CorruptImageError(
            f"OMERO pixel type {pixel_type!r} is not supported", f"supported: {', '.join(PIXEL_TYPES)}"
        ) from exc


def pixel_type_name(dtype: np.dtype) -> str:
    """numpy dtype → OMERO pixel type name."""
    kind = np.dtype(dtype).str[1:]
    for name, code in PIXEL_TYPES.items():
        if code == kind:
            return name
    raise CorruptImageError(f"dtype {np.dtype(dtype)} cannot be stored in OMERO", "use uint8, uint16 or float32")


def rvalue(x: Any) -> Any:
    """Unwrap an OMERO rtype (or pass plain values through)."""
    return x.getValue() if hasattr(x, "getValue") else x


@dataclass(frozen=True)
class ReadLimits:
    """The largest request the server accepts: plane edge (pixels) and message size (bytes)."""

    max_width: int
    max_height: int
    max_bytes: int
    tile_width: int
    tile_height: int

    def chunk(self, bytes_per_pixel: int) -> tuple[int, int]:
        """Request size aligned to the server's tiles, within the plane and message limits."""
        w = max(MIN_CHUNK, min(self.max_width, max(self.tile_width, 1024)))
        h = max(MIN_CHUNK, min(self.max_height, max(self.tile_height, 1024)))
        budget = max(MIN_CHUNK * MIN_CHUNK, self.max_bytes // max(1, bytes_per_pixel))
        while w * h > budget and (w > MIN_CHUNK or h > MIN_CHUNK):
            if h >= w:
                h = max(MIN_CHUNK, h // 2)
            else:
                w = max(MIN_CHUNK, w // 2)
        return w, h


def message_budget(conn: Any) -> int:
    """Bytes one call may carry: half the client's ``Ice.MessageSizeMax`` (room for Ice's framing)."""
    kb = DEFAULT_MESSAGE_SIZE_KB
    try:
        text = conn.c.getProperty("Ice.MessageSizeMax")
        if text:
            kb = int(text)
    except (AttributeError, ValueError):
        pass
    return kb * 1024 // 2


def read_limits(conn: Any, rps: Any) -> ReadLimits:
    """Limits from the server (max plane size, tile size) and the client (Ice.MessageSizeMax)."""
    max_w, max_h = conn.getMaxPlaneSize()
    tile_w, tile_h = rps.getTileSize()
    return ReadLimits(int(max_w), int(max_h), message_budget(conn), int(tile_w), int(tile_h))


# -- ROIs -----------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_points(text: str) -> list[tuple[float, float]]:
    """OMERO's ``"x1,y1 x2,y2 …"`` (older ``points[…]`` forms too) → coordinate pairs."""
    if "points[" in text:
        text = text[text.index("points[") + 7 :].split("]")[0]
    numbers = [float(v) for v in _NUMBER.findall(text)]
    return list(zip(numbers[0::2], numbers[1::2]))


def format_points(points: list[tuple[float, float]]) -> str:
    return " ".join(f"{x:g},{y:g}" for x, y in points)


def shape_kind(shape: Any) -> str:
    """``Rectangle``, ``Ellipse``, ``Polygon`` … from the model class (``RectangleI`` → ``Rectangle``)."""
    name = type(shape).__name__
    return name[:-1] if name.endswith("I") else name


def shape_geometry(shape: Any) -> Any:
    """A shapely geometry in image pixels for one OMERO shape (its affine transform applied), or None."""
    from shapely import affinity
    from shapely.geometry import LineString, Point, Polygon, box

    kind = shape_kind(shape)
    g: Any
    if kind == "Rectangle":
        x, y, w, h = (
            float(rvalue(shape.getX())),
            float(rvalue(shape.getY())),
            float(rvalue(shape.getWidth())),
            float(rvalue(shape.getHeight())),
        )
        g = box(x, y, x + w, y + h)
    elif kind == "Mask":  # a raster ROI: its bounding box is what a region selection needs
        x, y, w, h = (
            float(rvalue(shape.getX())),
            float(rvalue(shape.getY())),
            float(rvalue(shape.getWidth())),
            float(rvalue(shape.getHeight())),
        )
        g = box(x, y, x + w, y + h)
    elif kind == "Ellipse":
        cx, cy = float(rvalue(shape.getX())), float(rvalue(shape.getY()))
        rx, ry = float(rvalue(shape.getRadiusX())), float(rvalue(shape.getRadiusY()))
        g = affinity.scale(Point(cx, cy).buffer(1.0, 64), rx, ry, origin=(cx, cy))
    elif kind in ("Polygon", "Polyline"):
        pts = parse_points(str(rvalue(shape.getPoints()) or ""))
        if kind == "Polygon" and len(pts) >= 3:
            g = Polygon(pts)
            if not g.is_valid:
                g = g.buffer(0)
        elif len(pts) >= 2:
            g = LineString(pts)
        else:
            return None
    elif kind == "Line":
        g = LineString(
            [
                (float(rvalue(shape.getX1())), float(rvalue(shape.getY1()))),
                (float(rvalue(shape.getX2())), float(rvalue(shape.getY2()))),
            ]
        )
    elif kind in ("Point", "Label"):
        g = Point(float(rvalue(shape.getX())), float(rvalue(shape.getY())))
    else:
        return None
    t = shape.getTransform()
    if t is not None:
        g = affinity.affine_transform(
            g,
            [
                float(rvalue(t.getA00())),
                float(rvalue(t.getA01())),
                float(rvalue(t.getA10())),
                float(rvalue(t.getA11())),
                float(rvalue(t.getA02())),
                float(rvalue(t.getA12())),
            ],
        )
    return g


def roi_annotations(rois: list[Any], image_uri: str) -> list[Annotation]:
    """One :class:`Annotation` per supported shape; class = shape text, else ROI name, else description."""
    out: list[Annotation] = []
    for roi in rois:
        roi_name = rvalue(roi.getName()) if roi.getName() is not None else None
        roi_desc = rvalue(roi.getDescription()) if roi.getDescription() is not None else None
        for shape in roi.copyShapes():
            geom = shape_geometry(shape)
            if geom is None:
                log.info("ROI %s: shape type %s is not supported; skipped", rvalue(roi.getId()), shape_kind(shape))
                continue
            text = rvalue(shape.getTextValue()) if shape.getTextValue() is not None else None
            cls = next((v.strip() for v in (text, roi_name, roi_desc) if v and str(v).strip()), None)
            sid = int(rvalue(shape.getId()))
            out.append(
                Annotation(
                    geometry=geom,
                    class_name=cls,
                    id=f"Shape:{sid}",
                    name=roi_name or f"ROI {rvalue(roi.getId())}",
                    source=image_uri,
                    properties={
                        "roi_id": int(rvalue(roi.getId())),
                        "shape_id": sid,
                        "type": shape_kind(shape),
                        "theZ": rvalue(shape.getTheZ()),
                        "theT": rvalue(shape.getTheT()),
                    },
                )
            )
    return out


def image_uri(session: OmeroSession, image_id: int) -> str:
    """``omero://host/image/ID``: how provenance and annotations name an OMERO image."""
    return f"omero://{session.host}/image/{image_id}"


def find_rois(session: OmeroSession, image_id: int) -> list[Any]:
    """The ROIs of image ``image_id`` as ``omero.model.RoiI`` with their shapes (in the current group)."""
    result = session.call(
        lambda c: c.getRoiService().findByImage(image_id, None, c.SERVICE_OPTS), f"read the ROIs of image {image_id}"
    )
    return list(result.rois)


def list_rois(session: OmeroSession, image_id: int) -> tuple[str, list[Any]]:
    """The name and ROIs of an image, read without opening its pixels (what choosing ROIs by class needs);
    give the ROIs to :class:`OmeroImageHandle` (``rois=``) to open the image once for the run."""
    image = session.get_image(image_id)
    session.use_group_of(image)  # the ROIs are read in the image's own group, as the handle reads them
    return str(image.getName() or f"Image {image_id}"), find_rois(session, image_id)


# -- the handle -----------------------------------------------------------------------------------------------
class OmeroImageHandle(StoredMetadataHandle):
    """An OMERO image (plane ``z``, ``t``): pyramid levels, channels, pixel size, tiles and ROIs."""

    system = "omero"

    def __init__(
        self, session: OmeroSession, image_id: int, *, z: int = 0, t: int = 0, rois: list[Any] | None = None
    ) -> None:
        """Open image ``image_id`` (plane ``z``, ``t``); ``rois``: its ROIs when already read (see :func:`list_rois`)."""
        self.session = session
        image = session.get_image(image_id)
        session.use_group_of(image)  # reads and writes then act in the image's own group
        self.group_id = int(image._obj.getDetails().getGroup().getId().getValue())
        self.image_id = int(image.getId())
        self.source_id = self.image_id
        self._name = str(image.getName() or f"Image {self.image_id}")
        self.size_x, self.size_y = int(image.getSizeX()), int(image.getSizeY())
        self.size_z, self.size_c, self.size_t = int(image.getSizeZ()), int(image.getSizeC()), int(image.getSizeT())
        if not (0 <= z < self.size_z and 0 <= t < self.size_t):
            raise RegionError(
                f"plane z={z}, t={t} does not exist in OMERO image {self.image_id}",
                f"choose z < {self.size_z} and t < {self.size_t}",
            )
        self.z, self.t = z, t
        self.pixel_type = str(image.getPixelsType())
        self._dtype = numpy_dtype(self.pixel_type)
        self.pixels_id = int(image.getPixelsId())
        # in µm whatever unit the server stores (a bare getPixelSizeX() returns the stored unit's number)
        px, py = image.getPixelSizeX(units="MICROMETER"), image.getPixelSizeY(units="MICROMETER")
        px, py = (float(v.getValue()) if v is not None else None for v in (px, py))
        self._mpp = (px, py if py else px) if px else None
        self.dataset_ids = [int(p.getId()) for p in (image.listParents() or []) if p.OMERO_CLASS == "Dataset"]
        self._channels = self._channel_names(image)
        self._lock = threading.RLock()
        self._rps: Any = None
        self._rps_conn: Any = None
        self._rps_level: int | None = None
        self._rois: list[Any] | None = list(rois) if rois is not None else None
        self._uuid: str | None = None
        self._levels: list[Level] = []
        self._limits: ReadLimits | None = None
        self._chunk_override: tuple[int, int] | None = None
        with self._lock:
            try:
                self._open_store()
            except Exception as exc:
                if not is_session_lost(exc):
                    raise
                self._reopen_after(exc)  # one reconnect, like every other call

    # -- metadata ----------------------------------------------------------------------------------------------
    def _channel_names(self, image: Any) -> list[str]:
        channels = image.getChannels(noRE=True) or []
        labels = [str(ch.getLabel() or "") for ch in channels]
        if self.size_c == 3 and self._dtype == np.uint8:
            colours = []
            for ch in channels:
                lc = ch._obj  # the model ChannelI: red/green/blue as rints
                colours.append(tuple(rvalue(getattr(lc, f"get{c}")()) for c in ("Red", "Green", "Blue")))
            rgb_names = [v.lower() for v in labels] in (["r", "g", "b"], ["red", "green", "blue"])
            rgb_colours = colours == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
            if rgb_names or rgb_colours:
                return ["R", "G", "B"]
        names = [lab or f"C{i}" for i, lab in enumerate(labels)] if labels else [f"C{i}" for i in range(self.size_c)]
        return names

    @property
    def uri(self) -> str:
        return image_uri(self.session, self.image_id)

    @property
    def name(self) -> str:
        return self._name

    def fingerprint(self) -> str:
        """Server database, image and pixels ids, shape and type: a re-import gets a new identity."""
        return (
            f"omero:{self._server_uuid()}:image:{self.image_id}:pixels:{self.pixels_id}:"
            f"{self.size_x}x{self.size_y}x{self.size_c}:z{self.z}t{self.t}:{self.pixel_type}"
        )

    def _server_uuid(self) -> str:
        if self._uuid is None:
            self._uuid = str(
                self.session.call(lambda c: c.getConfigService().getDatabaseUuid(), "read the server's identity")
            )
        return self._uuid

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            {
                "image_id": self.image_id,
                "pixels_id": self.pixels_id,
                "pixel_type": self.pixel_type,
                "size": {"x": self.size_x, "y": self.size_y, "z": self.size_z, "c": self.size_c, "t": self.size_t},
                "plane": {"z": self.z, "t": self.t},
                "datasets": self.dataset_ids,
            }
        )
        return info

    # -- pixels --------------------------------------------------------------------------------------------------
    def _open_store(self) -> None:
        """A RawPixelsStore of our own on the current gateway; reads the pyramid and the request limits."""
        conn = self.session.conn
        rps = None
        try:
            rps = conn.c.sf.createRawPixelsStore(conn.SERVICE_OPTS)
            rps.setPixelsId(self.pixels_id, True, conn.SERVICE_OPTS)
            descriptions = rps.getResolutionDescriptions(conn.SERVICE_OPTS)
            self._limits = read_limits(conn, rps)
        except BaseException as exc:
            if rps is not None:  # a stateful service: close it, or it stays open on the server until timeout
                try:
                    rps.close(conn.SERVICE_OPTS)
                except Exception as close_exc:
                    log.debug("closing the RawPixelsStore: %s", describe_server_error(close_exc))
            if isinstance(exc, permission_types()):
                raise permission_error(exc, f"read the pixels of image {self.image_id}") from exc
            raise
        self._rps, self._rps_level, self._rps_conn = rps, None, conn
        # descriptions: largest first; OMERO numbers resolution levels the other way (n-1 = full size)
        full = descriptions[0].sizeX if descriptions else self.size_x
        self._levels = [Level(int(d.sizeX), int(d.sizeY), full / float(d.sizeX)) for d in descriptions] or [
            Level(self.size_x, self.size_y, 1.0)
        ]

    def _reopen_after(self, exc: BaseException) -> None:
        self.session.reconnect(exc)
        self._rps = None
        self._open_store()

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        with self._lock:  # the pipeline prefetches on a thread while a channels-mode sink reads originals
            out = np.empty((height, width, self.size_c), dtype=self._dtype)
            assert self._limits is not None
            cw, ch = self._chunk_override or self._limits.chunk(self._dtype.itemsize)
            for y0 in range(0, height, ch):
                for x0 in range(0, width, cw):
                    h, w = min(ch, height - y0), min(cw, width - x0)
                    out[y0 : y0 + h, x0 : x0 + w] = self._read_chunk(level, x + x0, y + y0, w, h)
            return out

    def _read_chunk(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """One request per channel; on MemoryLimitException split in four, on session loss reconnect once."""
        lost_once = False
        while True:
            try:
                return self._get_tiles(level, x, y, w, h)
            except memory_limit_types() as exc:
                if w <= MIN_CHUNK and h <= MIN_CHUNK:
                    raise CorruptImageError(
                        f"OMERO refuses even {w}×{h} tiles of image {self.image_id} ({describe_server_error(exc)})",
                        "raise Ice.MessageSizeMax in the client configuration",
                    ) from exc
                nw, nh = max(MIN_CHUNK, (w + 1) // 2), max(MIN_CHUNK, (h + 1) // 2)
                self._chunk_override = (nw, nh)
                log.warning("OMERO message size limit hit at %d×%d; reading %d×%d tiles", w, h, nw, nh)
                out = np.empty((h, w, self.size_c), dtype=self._dtype)
                for y0 in range(0, h, nh):
                    for x0 in range(0, w, nw):
                        hh, ww = min(nh, h - y0), min(nw, w - x0)
                        out[y0 : y0 + hh, x0 : x0 + ww] = self._read_chunk(level, x + x0, y + y0, ww, hh)
                return out
            except permission_types() as exc:
                raise permission_error(exc, f"read the pixels of image {self.image_id}") from exc
            except Exception as exc:
                if lost_once or not is_session_lost(exc):
                    raise
                lost_once = True
                log.warning(
                    "reading image %s: %s; reconnecting and resuming at tile (%d, %d)",
                    self.image_id,
                    describe_server_error(exc),
                    x,
                    y,
                )
                self._reopen_after(exc)

    def _get_tiles(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        conn = self.session.conn
        if self._rps is None or self._rps_conn is not conn:  # the session reconnected since (e.g. in a sink)
            self._open_store()
        rps = self._rps
        n = len(self._levels)
        if self._rps_level != level:
            if n > 1:
                rps.setResolutionLevel(n - 1 - level, conn.SERVICE_OPTS)
            self._rps_level = level
        wire = self._dtype.newbyteorder(">")
        out = np.empty((h, w, self.size_c), dtype=self._dtype)
        for c in range(self.size_c):
            raw = rps.getTile(self.z, c, self.t, x, y, w, h, conn.SERVICE_OPTS)
            if len(raw) != w * h * wire.itemsize:
                raise CorruptImageError(
                    f"OMERO returned {len(raw)} bytes for a {w}×{h} tile of image {self.image_id}",
                    "the pixel data on the server may be incomplete",
                )
            out[:, :, c] = np.frombuffer(raw, dtype=wire).reshape(h, w)
        return out

    # -- ROIs ----------------------------------------------------------------------------------------------------
    def roi_objects(self) -> list[Any]:
        """The image's ROIs as ``omero.model.RoiI`` with their shapes (fetched once)."""
        if self._rois is None:
            self._rois = find_rois(self.session, self.image_id)
        return self._rois

    def annotations(self) -> list[Annotation]:
        return roi_annotations(self.roi_objects(), self.uri)

    def close(self) -> None:
        with self._lock:
            rps, self._rps = self._rps, None
            if rps is not None:
                try:
                    rps.close()
                except Exception as exc:  # a lost connection cannot close its services; nothing leaks server-side
                    log.debug("closing the RawPixelsStore: %s", describe_server_error(exc))

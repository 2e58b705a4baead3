"""Results as new OMERO images next to the original, with ROIs carried over and provenance attached.

Rows from the pipeline are held locally (in memory when small, in a temporary file otherwise) and sent
at ``commit``: small results with ``createImageFromNumpySeq``, larger ones plane by plane, tile by tile into
a new pixels object (the order OMERO's pyramid writer needs). Nothing reaches the server until the
pixels are complete, and a failed upload deletes the partial image. Each new image carries a
MapAnnotation in the ``lpfm-toolkit/provenance`` namespace (holding the idempotency key, looked up before
any work starts) and the full provenance JSON as a file annotation.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from lpfm_toolkit.errors import LpfmError, RegionError
from lpfm_toolkit.integrations.omero.session import (
    OmeroPermissionError,
    OmeroSession,
    SessionLostError,
    describe_server_error,
    is_session_lost,
    permission_error,
    permission_types,
)
from lpfm_toolkit.integrations.omero.source import (
    OmeroImageHandle,
    format_points,
    message_budget,
    parse_points,
    pixel_type_name,
    rvalue,
    shape_kind,
)
from lpfm_toolkit.provenance import NAMESPACE, Provenance
from lpfm_toolkit.sinks.base import OutputRef, OutputSpec, Sink, SinkWriter

log = logging.getLogger(__name__)

KEY = "lpfm.idempotency_key"
STATE = "lpfm.state"
#: who is uploading a partial image: ``host:pid:token`` (token: random per process)
WRITER = "lpfm.writer"
MODES = ("new", "channels")
#: the idempotency key of a ``channels`` result: the same work as a plain one, a different image
CHANNELS_KEY_SUFFIX = ":channels"
#: results up to this many bytes (and within the server's plane size) go through createImageFromNumpySeq
SMALL_BYTES = 64 * 1024 * 1024
#: above this many bytes, rows are spooled to a temporary file instead of memory
SPOOL_BYTES = 256 * 1024 * 1024


# -- ROI copies -----------------------------------------------------------------------------------------------
class ShapeMapping:
    """Level-0 image coordinates of the original → pixels of the result: ``q = (p / ds - origin) · scale``."""

    def __init__(self, downsample: float, origin: tuple[int, int], scale: float) -> None:
        self.k = scale / downsample
        self.ox, self.oy = origin[0] * scale, origin[1] * scale

    def point(self, x: float, y: float) -> tuple[float, float]:
        return x * self.k - self.ox, y * self.k - self.oy

    def length(self, v: float) -> float:
        return v * self.k


_COPIED_FIELDS = (
    "TextValue",
    "StrokeColor",
    "FillColor",
    "StrokeWidth",
    "FontSize",
    "FontFamily",
    "FontStyle",
    "Locked",
    "TheZ",
    "TheT",
)


def copy_shape(shape: Any, m: ShapeMapping, keep_channel: bool) -> Any:
    """A new, unsaved shape of the same type, moved and scaled into the result's pixel grid."""
    import omero.model
    from omero.rtypes import rdouble, rstring

    kind = shape_kind(shape)
    new = type(shape)()
    for f in _COPIED_FIELDS + (("TheC",) if keep_channel else ()):
        getter = getattr(shape, f"get{f}", None)
        if getter is not None and getter() is not None:
            getattr(new, f"set{f}")(getter())
    t = shape.getTransform()
    if t is not None:  # keep the coordinates, compose the mapping into the transform
        nt = omero.model.AffineTransformI()
        for name in ("A00", "A01", "A10", "A11"):
            getattr(nt, f"set{name}")(rdouble(float(rvalue(getattr(t, f"get{name}")())) * m.k))
        ox, oy = m.point(float(rvalue(t.getA02())), float(rvalue(t.getA12())))
        nt.setA02(rdouble(ox))
        nt.setA12(rdouble(oy))
        for name in ("X", "Y", "Width", "Height", "RadiusX", "RadiusY", "X1", "Y1", "X2", "Y2", "Points", "Bytes"):
            getter = getattr(shape, f"get{name}", None)
            if getter is not None and getter() is not None:
                getattr(new, f"set{name}")(getter())
        new.setTransform(nt)
        return new
    if kind in ("Rectangle", "Mask"):
        x, y = m.point(float(rvalue(shape.getX())), float(rvalue(shape.getY())))
        w, h = m.length(float(rvalue(shape.getWidth()))), m.length(float(rvalue(shape.getHeight())))
        new.setX(rdouble(x))
        new.setY(rdouble(y))
        new.setWidth(rdouble(w))
        new.setHeight(rdouble(h))
        if kind == "Mask" and shape.getBytes() is not None:
            new.setBytes(
                rescale_mask(
                    shape.getBytes(),
                    int(float(rvalue(shape.getWidth()))),
                    int(float(rvalue(shape.getHeight()))),
                    max(1, round(w)),
                    max(1, round(h)),
                )
            )
    elif kind == "Ellipse":
        x, y = m.point(float(rvalue(shape.getX())), float(rvalue(shape.getY())))
        new.setX(rdouble(x))
        new.setY(rdouble(y))
        new.setRadiusX(rdouble(m.length(float(rvalue(shape.getRadiusX())))))
        new.setRadiusY(rdouble(m.length(float(rvalue(shape.getRadiusY())))))
    elif kind in ("Point", "Label"):
        x, y = m.point(float(rvalue(shape.getX())), float(rvalue(shape.getY())))
        new.setX(rdouble(x))
        new.setY(rdouble(y))
    elif kind == "Line":
        x1, y1 = m.point(float(rvalue(shape.getX1())), float(rvalue(shape.getY1())))
        x2, y2 = m.point(float(rvalue(shape.getX2())), float(rvalue(shape.getY2())))
        new.setX1(rdouble(x1))
        new.setY1(rdouble(y1))
        new.setX2(rdouble(x2))
        new.setY2(rdouble(y2))
    elif kind in ("Polygon", "Polyline"):
        pts = [m.point(x, y) for x, y in parse_points(str(rvalue(shape.getPoints()) or ""))]
        new.setPoints(rstring(format_points(pts)))
    else:
        return None
    return new


def rescale_mask(data: bytes, width: int, height: int, new_width: int, new_height: int) -> bytes:
    """OMERO mask bits (row-major, MSB first) resampled by nearest neighbour to a new size."""
    bits = np.unpackbits(np.frombuffer(bytes(data), np.uint8))[: width * height].reshape(height, width)
    ys = np.minimum(height - 1, (np.arange(new_height) * height / new_height).astype(int))
    xs = np.minimum(width - 1, (np.arange(new_width) * width / new_width).astype(int))
    return np.packbits(bits[ys][:, xs].ravel()).tobytes()


def copy_rois(
    rois: list[Any], annotations_by_shape: dict[int, Any], region_box: Any, m: ShapeMapping, keep_channel: bool
) -> list[Any]:
    """New RoiI objects holding the shapes that touch ``region_box`` (level-0 shapely box), mapped by ``m``."""
    import omero.model

    out = []
    for roi in rois:
        shapes = []
        for shape in roi.copyShapes():
            geom = annotations_by_shape.get(int(rvalue(shape.getId())))
            if geom is None or not geom.intersects(region_box):
                continue
            new = copy_shape(shape, m, keep_channel)
            if new is not None:
                shapes.append(new)
        if shapes:
            new_roi = omero.model.RoiI()
            if roi.getName() is not None:
                new_roi.setName(roi.getName())
            if roi.getDescription() is not None:
                new_roi.setDescription(roi.getDescription())
            for s in shapes:
                new_roi.addShape(s)
            out.append(new_roi)
    return out


# -- who is uploading ------------------------------------------------------------------------------------------
_TOKEN = uuid.uuid4().hex[:12]
#: images this process is uploading right now (created, not yet complete or deleted)
_UPLOADING: set[int] = set()


def writer_id() -> str:
    """``host:pid:token`` of this process, recorded on a partial image while it uploads."""
    return f"{socket.gethostname()}:{os.getpid()}:{_TOKEN}"


def writer_gone(writer: str, image_id: int) -> bool:
    """True only when the uploader ``writer`` of ``image_id`` provably stopped: its process is gone on this host,
    or it is this process and this process is not uploading that image."""
    host, pid, token = (writer.split(":") + ["", "", ""])[:3] if writer.count(":") == 2 else ("", "", "")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host, or no writer recorded (an older version): cannot be proven
    if int(pid) == os.getpid():
        return token == _TOKEN and image_id not in _UPLOADING
    from lpfm_toolkit.jobs.scratch import pid_alive

    return not pid_alive(int(pid))


def provenance_from_pairs(pairs: dict[str, str], uri: str) -> Provenance:
    """A provenance record rebuilt from a result's key-value annotation (when its JSON file was removed)."""
    region = [int(v) for v in pairs.get("lpfm.source.region", "").split(",") if v.strip().lstrip("-").isdigit()]
    level = pairs.get("lpfm.source.level", "")
    seed = pairs.get("lpfm.seed", "0")
    return Provenance(
        source={
            "system": pairs.get("lpfm.source.system", ""),
            "uri": pairs.get("lpfm.source.uri", ""),
            "level": int(level) if level.isdigit() else None,
            "region": region or None,
        },
        prompt=pairs.get("lpfm.prompt", ""),
        task={"kind": pairs.get("lpfm.task", ""), "scale": pairs.get("lpfm.task.scale", "1")},
        engine={
            "name": pairs.get("lpfm.engine", ""),
            "model": pairs.get("lpfm.model") or None,
            "model_sha256": pairs.get("lpfm.model.sha256") or None,
        },
        seed=int(seed) if seed.lstrip("-").isdigit() else 0,
        idempotency_key=pairs.get(KEY, ""),
        output={"uri": uri, "rebuilt_from": "the image's key-value annotation (the provenance file was removed)"},
        input_sha256=pairs.get("lpfm.input.sha256") or None,
        output_sha256=pairs.get("lpfm.output.sha256") or None,
    )


# -- the sink -------------------------------------------------------------------------------------------------
class OmeroSink(Sink):
    """New images in the source's dataset (or ``dataset``): ``mode`` ``new`` or ``channels``."""

    def __init__(
        self,
        session: OmeroSession,
        handle: OmeroImageHandle,
        *,
        mode: str = "new",
        dataset: int | str | None = None,
        copy_rois: bool = True,
        spool_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if mode not in MODES:
            raise RegionError(f"output mode {mode!r} is not known", f"use one of {', '.join(MODES)}")
        self.session, self.handle, self.mode = session, handle, mode
        self.copy_rois = copy_rois
        self.spool_dir = spool_dir
        self._dataset_arg = dataset
        self._dataset_id: int | None | bool = False  # False: not resolved yet; None: orphaned

    @property
    def dataset_id(self) -> int | None:
        """The dataset new images go to: the one given (id or name, created if absent) or the source's."""
        if self._dataset_id is False:
            arg = self._dataset_arg
            if arg is None:
                self._dataset_id = self.handle.dataset_ids[0] if self.handle.dataset_ids else None
            elif isinstance(arg, int) or str(arg).isdigit():
                ds = self.session.get_dataset(int(arg))
                group = int(ds._obj.getDetails().getGroup().getId().getValue())
                if group != self.handle.group_id:
                    raise OmeroPermissionError(
                        f"dataset {arg} is in group {group}, image {self.handle.image_id} in group "
                        f"{self.handle.group_id}: OMERO does not link across groups",
                        "choose a dataset of the image's group, or give a name to create one there",
                    )
                self._dataset_id = int(ds.getId())
            else:
                self._dataset_id = self._dataset_by_name(str(arg))
        return self._dataset_id  # type: ignore[return-value]

    def _dataset_by_name(self, name: str) -> int:
        import omero.model
        from omero.rtypes import rstring

        def find(conn: Any) -> int:
            uid = conn.getUserId()
            for ds in conn.getObjects("Dataset", attributes={"name": name}):
                if int(ds._obj.getDetails().getOwner().getId().getValue()) == uid:
                    return int(ds.getId())
            ds = omero.model.DatasetI()
            ds.setName(rstring(name))
            saved = conn.getUpdateService().saveAndReturnObject(ds, conn.SERVICE_OPTS)
            log.info("created dataset %r (%s)", name, rvalue(saved.getId()))
            return int(rvalue(saved.getId()))

        return self.session.call(find, f"find or create dataset {name!r}")

    # -- idempotency ---------------------------------------------------------------------------------------------
    def find(self, idempotency_key: str, spec_name: str) -> OutputRef | None:
        """An image already made with this key (complete), or None.

        Nothing is deleted that this run did not create, except a partial upload that is provably abandoned
        by a writer of ours: marked ``lpfm.state=writing`` by this user, with a writer (``host:pid:token``)
        whose process is gone on this host, or that is this process and no longer uploading. Partial images
        of other users, of live or unknown writers (another host, an older version), and complete results
        (also those whose provenance file a user removed) are left alone.
        """
        key = self._mode_key(idempotency_key)
        images = self.session.call(
            lambda c: list(c.getObjectsByMapAnnotations("Image", key=KEY, value=key, ns=NAMESPACE)),
            "look for earlier results",
        )
        found: OutputRef | None = None
        me: int | None = None
        for image in images:
            image_id = int(image.getId())
            pairs, prov = self._read_provenance(image_id)
            state = pairs.get(STATE)
            if pairs.get(KEY) != key:
                continue  # the key is on another annotation of the image, not our marker: not ours to judge
            if state == "complete":
                if prov is None:
                    log.warning(
                        "image %s is a complete lpfm result whose provenance file was removed; kept, and "
                        "its provenance rebuilt from its key-value annotation",
                        image_id,
                    )
                    prov = provenance_from_pairs(pairs, self._uri(image_id))
                if found is None:
                    found = OutputRef(
                        uri=self._uri(image_id),
                        provenance=prov,
                        extra={
                            "image_id": image_id,
                            "name": image.getName(),
                            "mode": self.mode,
                            "provenance_file": prov.output.get("rebuilt_from") is None,
                        },
                    )
                continue
            if state != "writing":
                log.warning("image %s carries the key of %s with state %r; left alone", image_id, spec_name, state)
                continue
            if me is None:
                me = int(self.session.call(lambda c: c.getUserId(), "read your user id"))
            owner = int(image._obj.getDetails().getOwner().getId().getValue())
            if owner != me:
                log.warning("image %s looks like a partial lpfm result of another user; left alone", image_id)
                continue
            if not writer_gone(pairs.get(WRITER, ""), image_id):
                log.warning(
                    "image %s is a partial result of %s still being uploaded, or by a writer this run cannot "
                    "check (%s); left alone",
                    image_id,
                    spec_name,
                    pairs.get(WRITER) or "no writer recorded",
                )
                continue
            log.warning("deleting image %s: a partial result of an interrupted run (%s)", image_id, spec_name)
            self._delete(image_id)
        return found

    def _mode_key(self, key: str) -> str:
        # the same work written as a channels image is a different result from a plain one
        return key if self.mode == "new" else key + CHANNELS_KEY_SUFFIX

    def _read_provenance(self, image_id: int) -> tuple[dict[str, str], Provenance | None]:
        """The key-value pairs of our marker annotation, and the provenance file (None when absent)."""
        from omero.gateway import FileAnnotationWrapper, MapAnnotationWrapper

        def read(conn: Any) -> tuple[dict[str, str], Provenance | None]:
            pairs: dict[str, str] = {}
            prov = None
            for link in conn.getAnnotationLinks("Image", parent_ids=[image_id], ns=NAMESPACE):
                ann = link.getAnnotation()
                if isinstance(ann, MapAnnotationWrapper):
                    values = dict((k, v) for k, v in ann.getValue())
                    if KEY in values and (not pairs or values.get(STATE) == "complete"):
                        pairs = values
                elif isinstance(ann, FileAnnotationWrapper):
                    text = b"".join(ann.getFileInChunks()).decode("utf-8", errors="replace")
                    try:
                        prov = Provenance.from_json(text)
                    except (ValueError, TypeError, KeyError):
                        log.warning("image %s: its provenance file cannot be read; ignored", image_id)
            return pairs, prov

        return self.session.call(read, f"read the provenance of image {image_id}")

    def _uri(self, image_id: int) -> str:
        return f"omero://{self.session.host}/image/{image_id}"

    def _delete(self, image_id: int) -> None:
        self.session.call(
            lambda c: c.deleteObjects("Image", [image_id], deleteAnns=True, deleteChildren=True, wait=True),
            f"delete the partial image {image_id}",
        )

    def open(self, spec: OutputSpec, idempotency_key: str, source: dict[str, Any]) -> SinkWriter:
        self.dataset_id  # noqa: B018 - resolve (and check) the target before any pixels are computed
        return OmeroWriter(self, spec, self._mode_key(idempotency_key), source)


class OmeroWriter(SinkWriter):
    """Collects one result's rows locally, then creates the OMERO image at :meth:`commit`."""

    def __init__(self, sink: OmeroSink, spec: OutputSpec, key: str, source: dict[str, Any]) -> None:
        self.sink, self.spec, self.key, self.source = sink, spec, key, source
        h = sink.handle
        self.scale = spec.width / source["region"][2]
        self.level = int(source["level"])
        self.region = tuple(int(v) for v in source["region"])
        self.dtype = np.dtype(spec.dtype)
        names = list(spec.channel_names)
        label = spec.name.rsplit("[lpfm ", 1)[-1].rstrip("]") if "[lpfm " in spec.name else "lpfm"
        if sink.mode == "channels":
            self.channel_names = [f"{c} (original)" for c in h.channel_names] + [f"{c} ({label})" for c in names]
        else:
            self.channel_names = names
        if spec.uncertainty and sink.mode == "channels":
            self.channel_names.append(f"uncertainty ({label})")
        elif spec.uncertainty:
            log.warning("%s: the uncertainty is kept only with the output mode 'channels'", spec.name)
        self.n_orig = len(h.channel_names) if sink.mode == "channels" else 0
        shape = (spec.height, spec.width, len(self.channel_names))
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self._spool_path: Path | None = None
        if nbytes > SPOOL_BYTES:
            fd, path = tempfile.mkstemp(prefix="lpfm-omero-", suffix=".raw", dir=sink.spool_dir)
            os.close(fd)
            self._spool_path = Path(path)
            self.pixels = np.memmap(path, dtype=self.dtype, mode="w+", shape=shape)
        else:
            self.pixels = np.zeros(shape, dtype=self.dtype)
        self.nbytes = nbytes
        self._row = 0
        self.image_id: int | None = None
        self._done = False

    # -- rows --------------------------------------------------------------------------------------------------
    def write_rows(self, rows: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        n = rows.shape[0]
        if self._row + n > self.spec.height:
            raise RegionError(f"{self._row + n} rows written to a {self.spec.height}-row result")
        a, b = self._row, self._row + n
        c0 = self.n_orig
        self.pixels[a:b, :, c0 : c0 + rows.shape[2]] = rows
        if self.sink.mode == "channels":
            from lpfm_toolkit.pipeline import from_float  # keeps the connector's import free of the engine

            self.pixels[a:b, :, :c0] = self._original_rows(a, b)
            if self.spec.uncertainty:
                unc = uncertainty if uncertainty is not None else np.zeros((n, rows.shape[1], 1), np.float32)
                # standard deviation in [0, 1] stored in the result's pixel type (the provenance says so)
                self.pixels[a:b, :, -1:] = from_float(np.clip(unc, 0, 1), self.dtype)
        self._row = b

    def _original_rows(self, a: int, b: int) -> np.ndarray:
        """Original pixels for result rows ``a:b``, repeated ``scale`` times (no interpolation invented)."""
        s = self.scale
        x, y, w, h = self.region
        src_a, src_b = int(a // s), min(h, int(np.ceil(b / s)))
        orig = self.sink.handle.read_region(self.level, x, y + src_a, w, src_b - src_a)
        if orig.dtype != self.dtype:
            from lpfm_toolkit.pipeline import from_float, to_float

            orig = from_float(to_float(orig), self.dtype)
        k = round(s)
        if k > 1:
            orig = orig.repeat(k, axis=0).repeat(k, axis=1)
        off = a - src_a * k
        return orig[off : off + (b - a), : self.spec.width]

    # -- commit ------------------------------------------------------------------------------------------------
    def commit(self, provenance: Provenance) -> OutputRef:
        if self._row != self.spec.height:
            raise RegionError(f"result incomplete: {self._row} of {self.spec.height} rows written")
        self._record(provenance)
        try:
            for attempt in (0, 1):
                try:
                    image_id = self._create(provenance)
                    break
                except Exception as exc:
                    lost = is_session_lost(exc)
                    self._cleanup_partial()  # keeps the id when the connection is gone
                    if attempt == 0 and lost:
                        log.warning(
                            "upload of %r interrupted (%s); reconnecting and uploading again",
                            self.spec.name,
                            describe_server_error(exc),
                        )
                        try:
                            self.sink.session.reconnect(exc)
                        except LpfmError as again:
                            raise self._left_behind(again) from exc
                        self._cleanup_partial()
                        continue
                    if self.image_id is not None:
                        raise self._left_behind(exc) from exc
                    if isinstance(exc, permission_types()):
                        raise permission_error(
                            exc, f"write {self.spec.name!r} (dataset {self.sink.dataset_id})"
                        ) from exc
                    if lost:
                        raise SessionLostError(
                            f"the OMERO session was lost while uploading {self.spec.name!r} "
                            f"({describe_server_error(exc)})",
                            "nothing was left behind; re-run the same command",
                        ) from exc
                    raise
        finally:
            self._release_spool()
        self._done = True
        ref = OutputRef(
            uri=self.sink._uri(image_id),
            provenance=provenance,
            extra={
                "image_id": image_id,
                "name": self.spec.name,
                "mode": self.sink.mode,
                "dataset_id": self.sink.dataset_id,
            },
        )
        log.info("created OMERO image %s (%s)", image_id, self.spec.name)
        return ref

    def _record(self, prov: Provenance) -> None:
        prov.output.update(
            {
                "system": "omero",
                "mode": self.sink.mode,
                "channels": self.channel_names,
                "shape": [self.spec.height, self.spec.width, len(self.channel_names)],
                "dtype": str(self.dtype),
            }
        )
        if self.sink.mode == "channels":
            prov.output["original_channels"] = list(range(self.n_orig))
            prov.output["original_upsampling"] = "nearest (pixel replication)"
            if self.spec.uncertainty:
                prov.output["uncertainty_channel"] = len(self.channel_names) - 1
                prov.output["uncertainty_scale"] = "standard deviation × max of the pixel type"
        elif self.spec.uncertainty:
            prov.output["uncertainty"] = "not stored (output mode new; use channels)"
        prov.idempotency_key = self.key

    def _create(self, prov: Provenance) -> int:
        """Upload pixels, attach metadata, ROIs and provenance; returns the new image id."""
        conn = self.sink.session.conn
        ds_id = self.sink.dataset_id
        max_w, max_h = conn.getMaxPlaneSize()
        plane_bytes = self.spec.width * self.spec.height * self.dtype.itemsize  # one setPlane call
        small = (
            self.nbytes <= SMALL_BYTES
            and self.spec.width <= max_w
            and self.spec.height <= max_h
            and plane_bytes <= message_budget(conn)
        )
        description = (
            f"lpfm-toolkit result: {prov.prompt!r} on {self.source.get('uri')} "
            f"region {list(self.region)} at level {self.level}. Provenance: namespace {NAMESPACE}."
        )
        if small:
            self.image_id = self._create_small(conn, description, ds_id)
        else:
            self.image_id = self._create_tiled(conn, description, ds_id)
        image_id = self.image_id
        _UPLOADING.add(image_id)
        marker = self._add_map(conn, image_id, {KEY: self.key, STATE: "writing", WRITER: writer_id()})
        self._set_metadata(conn, image_id)
        prov.output.update({"uri": self.sink._uri(image_id), "image_id": image_id, "dataset_id": ds_id})
        if self.sink.copy_rois:
            n = self._copy_rois(conn, image_id)
            prov.output["rois_copied"] = n
        self._add_file(conn, image_id, prov)
        pairs = {
            **prov.summary(),
            "lpfm.output.uri": self.sink._uri(image_id),
            "lpfm.mode": self.sink.mode,
            KEY: self.key,
            STATE: "complete",
        }
        self._update_map(conn, marker, pairs)
        _UPLOADING.discard(image_id)
        return image_id

    def _create_small(self, conn: Any, description: str, ds_id: int | None) -> int:
        dataset = conn.getObject("Dataset", ds_id) if ds_id is not None else None
        planes = (np.ascontiguousarray(self.pixels[:, :, c]) for c in range(self.pixels.shape[2]))
        image = conn.createImageFromNumpySeq(
            planes,
            self.spec.name,
            sizeZ=1,
            sizeC=self.pixels.shape[2],
            sizeT=1,
            description=description,
            dataset=dataset,
        )
        return int(image.getId())

    def _create_tiled(self, conn: Any, description: str, ds_id: int | None) -> int:
        """A new pixels object filled tile by tile, plane after plane (what OMERO's pyramid writer needs)."""
        import omero.model
        from omero.rtypes import rlong

        ptype = conn.getQueryService().findByQuery(
            f"from PixelsType as p where p.value='{pixel_type_name(self.dtype)}'", None, conn.SERVICE_OPTS
        )
        n_c = self.pixels.shape[2]
        iid = conn.getPixelsService().createImage(
            self.spec.width,
            self.spec.height,
            1,
            1,
            list(range(n_c)),
            ptype,
            self.spec.name,
            description,
            conn.SERVICE_OPTS,
        )
        image_id = int(rvalue(iid))
        self.image_id = image_id  # from here on a failure must delete it
        _UPLOADING.add(image_id)
        image = conn.getObject("Image", image_id)
        pid = int(image.getPixelsId())
        rps = conn.c.sf.createRawPixelsStore(conn.SERVICE_OPTS)
        try:
            rps.setPixelsId(pid, True, conn.SERVICE_OPTS)
            tw, th = (int(v) for v in rps.getTileSize(conn.SERVICE_OPTS))
            budget = message_budget(conn)
            while tw * th * self.dtype.itemsize > budget and th > 1:
                th //= 2
            wire = self.dtype.newbyteorder(">")
            for c in range(n_c):
                plane = self.pixels[:, :, c]
                for y in range(0, self.spec.height, th):
                    for x in range(0, self.spec.width, tw):
                        tile = np.ascontiguousarray(plane[y : y + th, x : x + tw], dtype=wire)
                        rps.setTile(tile.tobytes(), 0, c, 0, x, y, tile.shape[1], tile.shape[0], conn.SERVICE_OPTS)
            rps.save(conn.SERVICE_OPTS)
        finally:
            try:
                rps.close(conn.SERVICE_OPTS)
            except Exception as exc:
                log.debug("closing the RawPixelsStore: %s", describe_server_error(exc))
        pixels_service = conn.getPixelsService()
        for c in range(n_c):
            plane = self.pixels[:, :, c]
            pixels_service.setChannelGlobalMinMax(pid, c, float(plane.min()), float(plane.max()), conn.SERVICE_OPTS)
        if ds_id is not None:
            link = omero.model.DatasetImageLinkI()
            link.setParent(omero.model.DatasetI(rlong(ds_id), False))
            link.setChild(omero.model.ImageI(rlong(image_id), False))
            conn.getUpdateService().saveObject(link, conn.SERVICE_OPTS)
        return image_id

    def _set_metadata(self, conn: Any, image_id: int) -> None:
        """Physical pixel size and channel names (and R/G/B colours) of the new image.

        Saved in separate calls, each object with unloaded references to the others, so that no save
        carries a stale copy of an object another save just changed.
        """
        import omero.model
        from omero.model.enums import UnitsLength
        from omero.rtypes import rint, rstring

        image = conn.getObject("Image", image_id)
        pid = int(image.getPixelsId())
        update = conn.getUpdateService()
        if self.spec.mpp:
            pixels = conn.getQueryService().get("Pixels", pid, conn.SERVICE_OPTS)
            pixels.setPhysicalSizeX(omero.model.LengthI(float(self.spec.mpp[0]), UnitsLength.MICROMETER))
            pixels.setPhysicalSizeY(omero.model.LengthI(float(self.spec.mpp[1]), UnitsLength.MICROMETER))
            update.saveObject(pixels, conn.SERVICE_OPTS)
        colours = {"R": (255, 0, 0), "G": (0, 255, 0), "B": (0, 0, 255)}
        logical, coloured = [], []
        for ch, name in zip(image.getChannels(noRE=True), self.channel_names):
            obj = ch._obj
            lc = obj.getLogicalChannel()
            lc.setName(rstring(name))
            logical.append(lc)
            rgb = colours.get(name.split(" ")[0])
            if rgb is not None:
                for setter, value in zip((obj.setRed, obj.setGreen, obj.setBlue, obj.setAlpha), (*rgb, 255)):
                    setter(rint(value))
                obj.setPixels(omero.model.PixelsI(pid, False))
                obj.setLogicalChannel(omero.model.LogicalChannelI(lc.getId(), False))
                coloured.append(obj)
        if logical:
            update.saveArray(logical, conn.SERVICE_OPTS)
        if coloured:
            update.saveArray(coloured, conn.SERVICE_OPTS)

    def _copy_rois(self, conn: Any, image_id: int) -> int:
        import omero.model
        from shapely.geometry import box

        handle = self.sink.handle
        rois = handle.roi_objects()
        if not rois:
            return 0
        ds = handle.levels[self.level].downsample
        x, y, w, h = self.region
        region_box = box(x * ds, y * ds, (x + w) * ds, (y + h) * ds)
        geoms = {int(a.properties["shape_id"]): a.geometry for a in handle.annotations()}
        keep_channel = self.sink.mode == "channels" or self.channel_names == handle.channel_names
        new_rois = copy_rois(rois, geoms, region_box, ShapeMapping(ds, (x, y), self.scale), keep_channel)
        for roi in new_rois:
            roi.setImage(omero.model.ImageI(image_id, False))
        if new_rois:
            conn.getUpdateService().saveAndReturnArray(new_rois, conn.SERVICE_OPTS)
        return len(new_rois)

    def _add_map(self, conn: Any, image_id: int, pairs: dict[str, str]) -> Any:
        import omero.model
        from omero.rtypes import rstring

        ann = omero.model.MapAnnotationI()
        ann.setNs(rstring(NAMESPACE))
        ann.setMapValue([omero.model.NamedValue(k, v) for k, v in pairs.items()])
        link = omero.model.ImageAnnotationLinkI()
        link.setParent(omero.model.ImageI(image_id, False))
        link.setChild(ann)
        saved = conn.getUpdateService().saveAndReturnObject(link, conn.SERVICE_OPTS)
        return saved.getChild()

    def _update_map(self, conn: Any, ann: Any, pairs: dict[str, str]) -> None:
        import omero.model

        ann.setMapValue([omero.model.NamedValue(k, v) for k, v in pairs.items()])
        conn.getUpdateService().saveObject(ann, conn.SERVICE_OPTS)

    def _add_file(self, conn: Any, image_id: int, prov: Provenance) -> None:
        import omero.model

        with tempfile.TemporaryDirectory(prefix="lpfm-omero-") as tmp:
            path = Path(tmp) / f"lpfm-provenance-{self.key[:16]}.json"
            path.write_text(prov.to_json(), encoding="utf-8")
            fa = conn.createFileAnnfromLocalFile(
                str(path),
                mimetype="application/json",
                ns=NAMESPACE,
                desc=f"lpfm-toolkit provenance of image {image_id}",
            )
        link = omero.model.ImageAnnotationLinkI()
        link.setParent(omero.model.ImageI(image_id, False))
        link.setChild(omero.model.FileAnnotationI(fa.getId(), False))
        conn.getUpdateService().saveObject(link, conn.SERVICE_OPTS)

    # -- failure -----------------------------------------------------------------------------------------------
    def _left_behind(self, exc: BaseException) -> Exception:
        """The error to raise when a partial image could not be deleted: it names the image."""
        if self.image_id is None:
            return exc if isinstance(exc, Exception) else RuntimeError(str(exc))
        why = exc.message if isinstance(exc, LpfmError) else describe_server_error(exc)
        return SessionLostError(
            f"writing {self.spec.name!r} failed ({why}) and the partial image {self.image_id} could not be deleted",
            "it is marked lpfm.state=writing: the next run of the same command deletes it (or delete it in OMERO.web)",
        )

    def _cleanup_partial(self) -> None:
        """Delete the image a failed upload created; keep its id when the connection is gone."""
        image_id, self.image_id = self.image_id, None
        if image_id is None:
            return
        _UPLOADING.discard(image_id)  # not being uploaded any more: a later find() may delete a leftover
        conn = self.sink.session.conn
        if conn is None:
            self.image_id = image_id
            return
        try:
            conn.deleteObjects("Image", [image_id], deleteAnns=True, deleteChildren=True, wait=True)
            log.info("deleted the partial image %s", image_id)
        except Exception as exc:
            self.image_id = image_id  # marked "writing": the next run's find() deletes it
            log.warning("could not delete the partial image %s: %s", image_id, describe_server_error(exc))

    def _release_spool(self) -> None:
        if self._spool_path is not None:
            del self.pixels
            self._spool_path.unlink(missing_ok=True)
            self._spool_path = None
            self.pixels = np.zeros((0, 0, 0), self.dtype)

    def abort(self) -> None:
        """Nothing was sent before commit; delete what a failed commit created and drop the local rows."""
        if not self._done:
            try:
                self._cleanup_partial()
            finally:
                self._release_spool()

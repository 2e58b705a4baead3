"""A fake OMERO server for the connector's tests, checked against the real omero-py API.

The gateway and every service proxy are ``create_autospec`` of the real omero-py classes, so a call the
connector makes with a wrong name or signature fails here as it would against a server. Objects are real
``omero.model`` instances, wrapped by the real gateway wrappers (``ImageWrapper`` …), whose own queries
reach the fake query service: an unknown query fails the test instead of returning something invented.

Faults are injected per method: ``server.inject("getTile", exc, after=3)`` raises ``exc`` on the 4th call;
connection-type faults also kill that gateway (every later call on it fails, as on a dead connection),
so the connector must reconnect through a new gateway.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import create_autospec

import numpy as np
import pytest

try:  # the test modules skip themselves without omero-py; this file must still import then
    import Ice
    import omero
    import omero.api
    import omero.clients
    import omero.gateway
    import omero.model
    import omero.sys
    from omero.model.enums import UnitsLength
    from omero.rtypes import rdouble, rint, rlong, rstring, unwrap
except ImportError:  # pragma: no cover - the Python 3.11 main suite
    omero = None

BIG_ENDIAN = {"uint8": ">u1", "uint16": ">u2", "int16": ">i2", "float": ">f4", "int8": ">i1", "uint32": ">u4",
              "int32": ">i4", "double": ">f8"}
USER_ID, GROUP_ID, OTHER_GROUP = 2, 3, 5


def _lost() -> Exception:
    return Ice.ConnectionLostException()


# Autospecs of omero-py's big classes take ~0.1 s each to build; tests reuse them, reset, across tests.
_SPARE: dict[Any, list[Any]] = {}


class SpecPool:
    """Hands out ``create_autospec(cls, instance=True)`` mocks, reusing ones released by earlier tests."""

    def __init__(self) -> None:
        self.used: list[tuple[Any, Any]] = []

    def get(self, cls: Any) -> Any:
        spare = _SPARE.setdefault(cls, [])
        mock = spare.pop() if spare else create_autospec(cls, instance=True)
        self.used.append((cls, mock))
        return mock

    def release(self) -> None:
        for cls, mock in self.used:
            mock.reset_mock(return_value=True, side_effect=True)  # signatures stay checked
            _SPARE[cls].append(mock)
        self.used.clear()


@dataclass
class Fault:
    method: str
    exc: BaseException
    after: int = 0  # let this many calls through first
    times: int = 1
    kills: bool = False  # the gateway is dead afterwards
    seen: int = 0


@dataclass
class FakeImage:
    """Pixels (level 0 first, each (H, W, C)) and the real model object of one image."""

    obj: Any
    levels: list[np.ndarray]
    pixel_type: str
    group: int = GROUP_ID
    rois: list[Any] = field(default_factory=list)
    written: set[tuple[int, int, int, int]] = field(default_factory=set)
    write_log: list[tuple[int, int, int]] = field(default_factory=list)  # (c, y, x) of setTile calls
    saved: bool = True


class FakeOmeroServer:
    """Images, datasets, ROIs, annotations and files in memory, served through autospecced gateways."""

    def __init__(self, max_plane: tuple[int, int] = (3192, 3192), tile: tuple[int, int] = (256, 256),
                 message_size_kb: int = 65536) -> None:
        self._ids = itertools.count(100)
        self.specs = SpecPool()
        self.max_plane = max_plane
        self.tile = tile
        self.message_size_kb = message_size_kb
        self.images: dict[int, FakeImage] = {}
        self.datasets: dict[int, Any] = {}
        self.dataset_links: list[tuple[int, int]] = []
        self.projects: dict[int, Any] = {}
        self.project_links: list[tuple[int, int]] = []  # (project, dataset)
        self.link_ids: dict[tuple[int, int], int] = {}  # (image, annotation) → link id
        self.annotations: dict[int, Any] = {}
        self.image_ann_links: list[tuple[int, int]] = []
        self.files: dict[int, bytes] = {}
        self.faults: list[Fault] = []
        self.calls: list[str] = []
        self.gateways: list[Any] = []
        self.deleted: list[int] = []
        self.read_only_groups: set[int] = set()
        self.valid_session_keys: set[str] = {"session-key-1"}
        self.passwords = {"alice": "s3cret"}
        self.keepalives = 0
        self.tile_requests: list[tuple[int, int, int, int, int]] = []  # (level, x, y, w, h)

    def next_id(self) -> int:
        return next(self._ids)

    # -- content ---------------------------------------------------------------------------------------------
    def add_dataset(self, name: str, group: int = GROUP_ID) -> int:
        ds = omero.model.DatasetI(self.next_id(), True)
        ds.setName(rstring(name))
        self._details(ds, group)
        self.datasets[int(ds.getId().getValue())] = ds
        return int(ds.getId().getValue())

    def add_project(self, name: str, datasets: list[int], group: int = GROUP_ID) -> int:
        pr = omero.model.ProjectI(self.next_id(), True)
        pr.setName(rstring(name))
        self._details(pr, group)
        pid = int(pr.getId().getValue())
        self.projects[pid] = pr
        self.project_links += [(pid, d) for d in datasets]
        return pid

    def tag_image(self, image_id: int, text: str, ns: str | None = None) -> int:
        """Link a tag ``text`` (made once, as a user in OMERO.web would) to an image; returns the tag id."""
        tag = next((a for a in self.annotations.values() if isinstance(a, omero.model.TagAnnotationI)
                    and unwrap(a.getTextValue()) == text and unwrap(a.getNs()) == ns), None)
        if tag is None:
            tag = omero.model.TagAnnotationI(self.next_id(), True)
            tag.setTextValue(rstring(text))
            if ns is not None:
                tag.setNs(rstring(ns))
            self._details(tag, GROUP_ID)
            self.annotations[int(tag.getId().getValue())] = tag
        self.image_ann_links.append((image_id, int(tag.getId().getValue())))
        return int(tag.getId().getValue())

    def add_pairs(self, image_id: int, pairs: dict[str, str], ns: str | None = None) -> int:
        """A key-value annotation on an image (OMERO.web's client namespace unless ``ns``)."""
        ann = omero.model.MapAnnotationI(self.next_id(), True)
        ann.setNs(rstring(ns or "openmicroscopy.org/omero/client/mapAnnotation"))
        ann.setMapValue([omero.model.NamedValue(k, v) for k, v in pairs.items()])
        self._details(ann, GROUP_ID)
        self.annotations[int(ann.getId().getValue())] = ann
        self.image_ann_links.append((image_id, int(ann.getId().getValue())))
        return int(ann.getId().getValue())

    def tags_of(self, image_id: int) -> list[str]:
        return sorted(unwrap(a.getTextValue()) for a in self.annotations_of(image_id)
                      if isinstance(a, omero.model.TagAnnotationI))

    def link_id(self, image_id: int, ann_id: int) -> int:
        if (image_id, ann_id) not in self.link_ids:
            self.link_ids[(image_id, ann_id)] = self.next_id()
        return self.link_ids[(image_id, ann_id)]

    def _details(self, obj: Any, group: int) -> None:
        obj.getDetails().setGroup(omero.model.ExperimenterGroupI(group, False))
        obj.getDetails().setOwner(omero.model.ExperimenterI(USER_ID, False))

    def add_image(self, name: str, levels: list[np.ndarray], *, dataset: int | None = None,
                  channel_names: list[str] | None = None, rgb_colours: bool = False, mpp: float | None = 0.5,
                  group: int = GROUP_ID, unit: str = "MICROMETER") -> int:
        """An image whose pyramid is ``levels`` (level 0 first, (H, W, C))."""
        base = levels[0]
        h, w, c = base.shape
        ptype = {np.dtype("uint8"): "uint8", np.dtype("uint16"): "uint16", np.dtype("float32"): "float",
                 np.dtype("int16"): "int16"}[base.dtype]
        img = omero.model.ImageI(self.next_id(), True)
        img.setName(rstring(name))
        self._details(img, group)
        pix = omero.model.PixelsI(self.next_id(), True)
        for attr, v in (("SizeX", w), ("SizeY", h), ("SizeZ", 1), ("SizeC", c), ("SizeT", 1)):
            getattr(pix, f"set{attr}")(rint(v))
        pt = omero.model.PixelsTypeI()
        pt.setValue(rstring(ptype))
        pix.setPixelsType(pt)
        if mpp is not None:
            pix.setPhysicalSizeX(omero.model.LengthI(mpp, getattr(UnitsLength, unit)))
            pix.setPhysicalSizeY(omero.model.LengthI(mpp, getattr(UnitsLength, unit)))
        colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
        for i in range(c):
            ch = omero.model.ChannelI(self.next_id(), True)
            lc = omero.model.LogicalChannelI(self.next_id(), True)
            if channel_names:
                lc.setName(rstring(channel_names[i]))
            ch.setLogicalChannel(lc)
            r, g, b = colours[i] if rgb_colours and i < 3 else (255, 255, 255)
            ch.setRed(rint(r))
            ch.setGreen(rint(g))
            ch.setBlue(rint(b))
            ch.setAlpha(rint(255))
            pix.addChannel(ch)
        img.addPixels(pix)
        iid = int(img.getId().getValue())
        self.images[iid] = FakeImage(img, [np.ascontiguousarray(lv) for lv in levels], ptype, group)
        if dataset is not None:
            self.dataset_links.append((dataset, iid))
        return iid

    def add_roi(self, image_id: int, *shapes: Any, name: str | None = None, description: str | None = None) -> int:
        roi = omero.model.RoiI(self.next_id(), True)
        if name:
            roi.setName(rstring(name))
        if description:
            roi.setDescription(rstring(description))
        for s in shapes:
            s.setId(rlong(self.next_id()))
            roi.addShape(s)
        roi.setImage(omero.model.ImageI(image_id, False))
        self.images[image_id].rois.append(roi)
        return int(roi.getId().getValue())

    def pixels_by_id(self, pixels_id: int) -> Any:
        for im in self.images.values():
            if int(im.obj.getPrimaryPixels().getId().getValue()) == int(pixels_id):
                return im.obj.getPrimaryPixels()
        return None

    def pixels_of(self, image_id: int) -> np.ndarray:
        return self.images[image_id].levels[0]

    def images_in(self, dataset_id: int) -> list[int]:
        return [i for d, i in self.dataset_links if d == dataset_id and i in self.images]

    def annotations_of(self, image_id: int) -> list[Any]:
        return [self.annotations[a] for i, a in self.image_ann_links if i == image_id and a in self.annotations]

    def map_of(self, image_id: int) -> dict[str, str]:
        for ann in self.annotations_of(image_id):
            if isinstance(ann, omero.model.MapAnnotationI):
                return {nv.name: nv.value for nv in ann.getMapValue()}
        return {}

    def snapshot(self) -> dict[int, bytes]:
        """Bytes of every existing image's pixels and ROI count: to prove originals are untouched."""
        return {i: im.levels[0].tobytes() + str(len(im.rois)).encode() for i, im in self.images.items()}

    # -- faults --------------------------------------------------------------------------------------------------
    def inject(self, method: str, exc: BaseException, *, after: int = 0, times: int = 1,
               kills: bool | None = None) -> Fault:
        kills = isinstance(exc, (Ice.ConnectionLostException, Ice.ObjectNotExistException,
                                 omero.SessionTimeoutException)) if kills is None else kills
        f = Fault(method, exc, after, times, kills)
        self.faults.append(f)
        return f

    def _enter(self, gw: FakeGateway, method: str) -> None:
        self.calls.append(method)
        if not gw.alive:
            raise _lost()
        for f in self.faults:
            if f.method == method and f.times > 0:
                if f.seen < f.after:
                    f.seen += 1
                    continue
                f.times -= 1
                if f.kills:
                    gw.alive = False
                raise f.exc

    # -- gateways ------------------------------------------------------------------------------------------------
    def make_gateway(self, settings: Any) -> Any:
        """What ``session._make_gateway`` returns: an autospecced BlitzGateway backed by this server."""
        gw = FakeGateway(self, settings)
        self.gateways.append(gw)
        return gw.conn


class FakeGateway:
    """One connection: an autospec of BlitzGateway whose methods act on the server."""

    def __init__(self, server: FakeOmeroServer, settings: Any = None) -> None:
        self.server, self.settings, self.alive = server, settings, True
        self.connected = False
        self.closed: bool | None = None
        conn = server.specs.get(omero.gateway.BlitzGateway)
        conn.SERVICE_OPTS = omero.gateway.ServiceOptsDict()
        conn.host = getattr(settings, "host", None) or "omero.example.org"
        conn.c = server.specs.get(omero.clients.BaseClient)
        conn.c.sf = server.specs.get(omero.api.ServiceFactoryPrx)
        conn.c.getProperty.side_effect = lambda key: str(server.message_size_kb) if key == "Ice.MessageSizeMax" else ""
        conn.c.sf.createRawPixelsStore.side_effect = lambda *a, **k: FakeRawPixelsStore(self).proxy
        conn.c.sf.createRawFileStore.side_effect = lambda *a, **k: self._raw_file_store()
        self.conn = conn
        self._services: dict[str, Any] = {}
        for getter, name in (("getQueryService", "query"), ("getUpdateService", "update"),
                             ("getPixelsService", "pixels"), ("getRoiService", "roi"),
                             ("getConfigService", "config")):
            getattr(conn, getter).side_effect = lambda *a, _n=name: self.service(_n)
        for name in ("connect", "close", "keepAlive", "getEventContext", "getObject", "getObjects", "getMaxPlaneSize",
                     "createImageFromNumpySeq", "getObjectsByMapAnnotations", "getAnnotationLinks",
                     "createFileAnnfromLocalFile", "deleteObjects", "getUserId", "getObjectsByAnnotations"):
            getattr(conn, name).side_effect = self._guard(name, getattr(self, f"_{name}"))

    def service(self, name: str) -> Any:
        """The service proxy ``name``, autospecced on first use (building every spec up front is slow)."""
        if name in self._services:
            return self._services[name]
        g = self._guard
        if name == "query":
            svc = self.server.specs.get(omero.api.IQueryPrx)
            svc.findByQuery.side_effect = g("findByQuery", self._find_by_query)
            svc.findAllByQuery.side_effect = g("findAllByQuery", self._find_all_by_query)
            svc.get.side_effect = g("get", self._get)
        elif name == "update":
            svc = self.server.specs.get(omero.api.IUpdatePrx)
            svc.saveObject.side_effect = g("saveObject", lambda o, ctx=None: self._save(o))
            svc.saveAndReturnObject.side_effect = g("saveAndReturnObject", lambda o, ctx=None: self._save(o))
            svc.saveArray.side_effect = g("saveArray", lambda objs, ctx=None: [self._save(o) for o in objs] and None)
            svc.saveAndReturnArray.side_effect = g("saveAndReturnArray",
                                                   lambda objs, ctx=None: [self._save(o) for o in objs])
        elif name == "pixels":
            svc = self.server.specs.get(omero.api.IPixelsPrx)
            svc.createImage.side_effect = g("createImage", self._create_image)
            svc.setChannelGlobalMinMax.side_effect = g("setChannelGlobalMinMax", lambda *a, **k: None)
        elif name == "roi":
            svc = self.server.specs.get(omero.api.IRoiPrx)
            svc.findByImage.side_effect = g("findByImage", self._find_rois)
        else:
            svc = self.server.specs.get(omero.api.IConfigPrx)
            svc.getDatabaseUuid.side_effect = g("getDatabaseUuid", lambda ctx=None: "db-uuid-1")
        self._services[name] = svc
        return svc

    def _guard(self, name: str, func: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.server._enter(self, name)
            return func(*args, **kwargs)

        return call

    def group_ctx(self) -> int | None:
        g = self.conn.SERVICE_OPTS.getOmeroGroup()
        return None if g is None else int(g)

    def visible(self, group: int) -> bool:
        g = self.group_ctx()
        return g in (None, -1) and group == GROUP_ID or g == -1 or g == group

    def _check_write(self) -> None:
        g = self.group_ctx()
        if (GROUP_ID if g in (None, -1) else g) in self.server.read_only_groups:
            raise omero.SecurityViolation(None, None, "Cannot write in a read-only group")

    # -- gateway methods -----------------------------------------------------------------------------------------
    def _connect(self, sUuid: str | None = None) -> bool:
        s = self.settings
        if sUuid is not None:
            ok = sUuid in self.server.valid_session_keys
        else:
            ok = s is not None and self.server.passwords.get(s.user) == s.password
        self.connected = ok
        return ok

    def _close(self, hard: bool = True) -> None:
        self.closed = hard
        self.alive = False

    def _keepAlive(self) -> bool:
        self.server.keepalives += 1
        return True

    def _getEventContext(self) -> Any:
        ctx = omero.sys.EventContext()
        ctx.userId, ctx.groupId, ctx.memberOfGroups, ctx.isAdmin = USER_ID, GROUP_ID, [GROUP_ID, OTHER_GROUP], False
        return ctx

    def _getUserId(self) -> int:
        return USER_ID

    def _getMaxPlaneSize(self) -> tuple[int, int]:
        return self.server.max_plane

    def _getObject(self, obj_type: str, oid: int | None = None, params: Any = None, attributes: Any = None,
                   opts: Any = None) -> Any:
        found = list(self._getObjects(obj_type, None if oid is None else [oid], params, attributes, opts=opts))
        assert len(found) <= 1, "getObject found more than one object"
        return found[0] if found else None

    def _getObjects(self, obj_type: str, ids: Any = None, params: Any = None, attributes: Any = None,
                    respect_order: bool = False, opts: Any = None) -> Any:
        kind = obj_type.lower()
        if kind == "image":
            cands = [(i, im.obj, im.group) for i, im in self.server.images.items()]
            if opts and "dataset" in opts:
                inside = set(self.server.images_in(int(opts["dataset"])))
                cands = [c for c in cands if c[0] in inside]
            wrap = omero.gateway.ImageWrapper
        elif kind == "dataset":
            cands = [(i, d, int(d.getDetails().getGroup().getId().getValue())) for i, d in self.server.datasets.items()]
            if opts and "project" in opts:
                inside = {d for p, d in self.server.project_links if p == int(opts["project"])}
                cands = [c for c in cands if c[0] in inside]
            wrap = omero.gateway.DatasetWrapper
        elif kind == "project":
            cands = [(i, pr, int(pr.getDetails().getGroup().getId().getValue())) for i, pr in self.server.projects.items()]
            wrap = omero.gateway.ProjectWrapper
        elif kind == "tagannotation":
            cands = [(i, a, -2) for i, a in self.server.annotations.items() if isinstance(a, omero.model.TagAnnotationI)]
            wrap = omero.gateway.TagAnnotationWrapper
        elif kind == "experimentergroup":
            cands = []
            wrap = omero.gateway.ExperimenterGroupWrapper
            for gid, name in ((GROUP_ID, "lab"), (OTHER_GROUP, "other-lab")):
                g = omero.model.ExperimenterGroupI(gid, True)
                g.setName(rstring(name))
                cands.append((gid, g, -2))
        else:
            raise AssertionError(f"the fake does not serve getObjects({obj_type!r})")
        out = []
        for oid, obj, group in cands:
            if ids is not None and oid not in [int(i) for i in ids]:
                continue
            if group != -2 and not self.visible(group):
                continue
            if attributes and any(unwrap(getattr(obj, f"get{k[0].upper()}{k[1:]}")()) != v
                                  for k, v in attributes.items()):
                continue
            out.append(wrap(self.conn, obj))
        return iter(out)

    def _createImageFromNumpySeq(self, zctPlanes: Any, imageName: str, sizeZ: int = 1, sizeC: int = 1,
                                 sizeT: int = 1, description: str | None = None, dataset: Any = None,
                                 sourceImageId: Any = None, channelList: Any = None) -> Any:
        assert sizeZ == 1 and sizeT == 1
        self._check_write()
        planes = [next(zctPlanes) for _ in range(sizeC)]
        for p in planes:
            assert p.ndim == 2 and p.dtype.name in BIG_ENDIAN or p.dtype.name == "float32", p.dtype
            h, w = p.shape
            assert w <= self.server.max_plane[0] and h <= self.server.max_plane[1], "plane above the max plane size"
            if p.nbytes > self.server.message_size_kb * 1024:
                raise Ice.MemoryLimitException()  # setPlane sends a whole plane in one message
        stack = np.stack(planes, axis=-1)
        iid = self.server.add_image(imageName, [stack], mpp=None, group=self._write_group())
        self.server.images[iid].obj.setDescription(rstring(description or ""))
        if dataset is not None:
            self.server.dataset_links.append((int(dataset.getId()), iid))
        return omero.gateway.ImageWrapper(self.conn, self.server.images[iid].obj)

    def _write_group(self) -> int:
        g = self.group_ctx()
        return GROUP_ID if g in (None, -1) else g

    def _getObjectsByMapAnnotations(self, obj_type: str, key: str | None = None, value: str | None = None,
                                    ns: str | None = None, opts: Any = None) -> Any:
        assert obj_type == "Image"
        out = []
        for iid, aid in self.server.image_ann_links:
            ann = self.server.annotations.get(aid)
            if iid not in self.server.images or not isinstance(ann, omero.model.MapAnnotationI):
                continue
            if ns is not None and unwrap(ann.getNs()) != ns:
                continue
            pairs = [(nv.name, nv.value) for nv in ann.getMapValue()]
            if any((key is None or k == key) and (value is None or v == value) for k, v in pairs):
                if self.visible(self.server.images[iid].group):
                    out.append(omero.gateway.ImageWrapper(self.conn, self.server.images[iid].obj))
        return iter(out)

    def _getObjectsByAnnotations(self, obj_type: str, annids: Any) -> Any:
        assert obj_type == "Image"
        wanted = {int(a) for a in annids}
        ids = sorted({i for i, a in self.server.image_ann_links if a in wanted and i in self.server.images})
        return iter([omero.gateway.ImageWrapper(self.conn, self.server.images[i].obj) for i in ids
                     if self.visible(self.server.images[i].group)])

    def _getAnnotationLinks(self, parent_type: str, parent_ids: Any = None, ann_ids: Any = None, ns: Any = None,
                            params: Any = None) -> Any:
        assert parent_type == "Image"
        out = []
        for iid, aid in self.server.image_ann_links:
            if parent_ids is not None and iid not in parent_ids:
                continue
            ann = self.server.annotations[aid]
            if ns is not None and unwrap(ann.getNs()) != ns:
                continue
            if ann_ids is not None and aid not in [int(a) for a in ann_ids]:
                continue
            link = omero.model.ImageAnnotationLinkI(self.server.link_id(iid, aid), True)
            link.setParent(self.server.images[iid].obj)
            link.setChild(ann)
            out.append(omero.gateway.AnnotationLinkWrapper(self.conn, link))
        return iter(out)

    def _createFileAnnfromLocalFile(self, localPath: str, origFilePathAndName: Any = None, mimetype: Any = None,
                                    ns: Any = None, desc: Any = None) -> Any:
        self._check_write()
        data = Path(localPath).read_bytes()
        of = omero.model.OriginalFileI(self.server.next_id(), True)
        of.setName(rstring(Path(localPath).name))
        of.setSize(rlong(len(data)))
        of.setMimetype(rstring(mimetype or ""))
        self.server.files[int(of.getId().getValue())] = data
        fa = omero.model.FileAnnotationI(self.server.next_id(), True)
        fa.setFile(of)
        fa.setNs(rstring(ns or ""))
        self.server.annotations[int(fa.getId().getValue())] = fa
        return omero.gateway.FileAnnotationWrapper(self.conn, fa)

    def _deleteObjects(self, graph_spec: str, obj_ids: list[int], deleteAnns: bool = False,
                       deleteChildren: bool = False, dryRun: bool = False, wait: bool = False) -> Any:
        assert wait
        if graph_spec == "ImageAnnotationLink":
            self._check_write()
            doomed = {int(i) for i in obj_ids}
            self.server.image_ann_links = [(i, a) for i, a in self.server.image_ann_links
                                           if self.server.link_ids.get((i, a)) not in doomed]
            return None
        assert graph_spec == "Image"
        for iid in obj_ids:
            iid = int(iid)
            if iid not in self.server.images:
                continue
            del self.server.images[iid]
            self.server.deleted.append(iid)
            if deleteAnns:
                for i, a in list(self.server.image_ann_links):
                    if i == iid:
                        self.server.annotations.pop(a, None)
            self.server.image_ann_links = [(i, a) for i, a in self.server.image_ann_links if i != iid]
            self.server.dataset_links = [(d, i) for d, i in self.server.dataset_links if i != iid]
        return None

    # -- services ------------------------------------------------------------------------------------------------
    def _find_by_query(self, query: str, params: Any, ctx: Any = None) -> Any:
        m = re.fullmatch(r"from PixelsType as p where p.value='(\w+)'", query)
        if m:
            pt = omero.model.PixelsTypeI(self.server.next_id(), True)
            pt.setValue(rstring(m.group(1)))
            return pt
        if query.startswith("select p from Pixels p join fetch p.channels as c join fetch c.logicalChannel"):
            pixels = self.server.pixels_by_id(unwrap(params.map["pid"]))
            return copy.deepcopy(pixels)  # a server returns copies: changes count only once saved
        raise AssertionError(f"the fake does not answer the query {query!r}")

    def _find_all_by_query(self, query: str, params: Any, ctx: Any = None) -> Any:
        m = re.fullmatch(r"from DatasetImageLink as c where c.child.id=(\d+)", query)
        if m:
            iid = int(m.group(1))
            out = []
            for d, i in self.server.dataset_links:
                if i == iid:
                    link = omero.model.DatasetImageLinkI(self.server.next_id(), True)
                    link.setParent(self.server.datasets[d])
                    link.setChild(omero.model.ImageI(iid, False))
                    out.append(link)
            return out
        if re.fullmatch(r"from WellSample as c where c.image.id=\d+", query):
            return []  # the fake holds no plates
        raise AssertionError(f"the fake does not answer the query {query!r}")

    def _get(self, klass: str, oid: int, ctx: Any = None) -> Any:
        if klass == "Pixels" and self.server.pixels_by_id(oid) is not None:
            return copy.deepcopy(self.server.pixels_by_id(oid))
        raise omero.ValidationException(None, None, f"no {klass} {oid}")

    def _save(self, obj: Any) -> Any:
        self._check_write()
        s = self.server
        if isinstance(obj, omero.model.DatasetImageLinkI):
            s.dataset_links.append((int(unwrap(obj.getParent().getId())), int(unwrap(obj.getChild().getId()))))
            return obj
        if isinstance(obj, omero.model.ImageAnnotationLinkI):
            iid = int(unwrap(obj.getParent().getId()))
            assert iid in s.images, f"link to a missing image {iid}"
            child = obj.getChild()
            if child.getId() is None:  # a new annotation saved through its link
                child.setId(rlong(s.next_id()))
                s._details(child, self._write_group())
                s.annotations[int(child.getId().getValue())] = child
            aid = int(unwrap(child.getId()))
            assert aid in s.annotations
            s.image_ann_links.append((iid, aid))
            obj.setChild(s.annotations[aid])
            return obj
        if isinstance(obj, omero.model.MapAnnotationI):
            aid = int(unwrap(obj.getId()))
            s.annotations[aid] = obj
            return obj
        if isinstance(obj, omero.model.RoiI):
            iid = int(unwrap(obj.getImage().getId()))
            obj.setId(rlong(s.next_id()))
            for shape in obj.copyShapes():
                shape.setId(rlong(s.next_id()))
            s.images[iid].rois.append(obj)
            return obj
        if isinstance(obj, omero.model.DatasetI):
            obj.setId(rlong(s.next_id()))
            s._details(obj, self._write_group())
            s.datasets[int(obj.getId().getValue())] = obj
            return obj
        if isinstance(obj, omero.model.PixelsI):
            stored = s.pixels_by_id(unwrap(obj.getId()))
            stored.setPhysicalSizeX(obj.getPhysicalSizeX())
            stored.setPhysicalSizeY(obj.getPhysicalSizeY())
            return obj
        if isinstance(obj, (omero.model.ChannelI, omero.model.LogicalChannelI)):
            for im in s.images.values():
                for ch in im.obj.getPrimaryPixels().copyChannels():
                    if isinstance(obj, omero.model.LogicalChannelI) and \
                            unwrap(ch.getLogicalChannel().getId()) == unwrap(obj.getId()):
                        ch.getLogicalChannel().setName(obj.getName())
                        return obj
                    if isinstance(obj, omero.model.ChannelI) and unwrap(ch.getId()) == unwrap(obj.getId()):
                        for colour in ("Red", "Green", "Blue", "Alpha"):
                            getattr(ch, f"set{colour}")(getattr(obj, f"get{colour}")())
                        return obj
            raise AssertionError(f"no {type(obj).__name__} {unwrap(obj.getId())} to update")
        raise AssertionError(f"the fake does not save {type(obj).__name__}")

    def _create_image(self, sizeX: int, sizeY: int, sizeZ: int, sizeT: int, channelList: list[int],
                      pixelsType: Any, name: str, description: str, ctx: Any = None) -> Any:
        self._check_write()
        ptype = unwrap(pixelsType.getValue())
        dtype = np.dtype(BIG_ENDIAN[ptype]).newbyteorder("=")
        arr = np.zeros((sizeY, sizeX, len(channelList)), dtype)
        iid = self.server.add_image(name, [arr], mpp=None, group=self._write_group())
        self.server.images[iid].obj.setDescription(rstring(description))
        self.server.images[iid].saved = False
        return rlong(iid)

    def _find_rois(self, imageId: int, opts: Any, ctx: Any = None) -> Any:
        result = omero.api.RoiResult()
        result.rois = list(self.server.images[int(imageId)].rois)
        return result

    def _raw_file_store(self) -> Any:
        rfs = self.server.specs.get(omero.api.RawFileStorePrx)
        state: dict[str, Any] = {}

        def set_file(fid: int, ctx: Any = None) -> None:
            state["data"] = self.server.files[int(unwrap(fid))]

        rfs.setFileId.side_effect = self._guard("setFileId", set_file)
        rfs.size.side_effect = self._guard("size", lambda ctx=None: len(state["data"]))
        rfs.read.side_effect = self._guard("read", lambda pos, n, ctx=None: state["data"][pos : pos + n])
        rfs.close.side_effect = lambda ctx=None: None
        return rfs


class FakeRawPixelsStore:
    """A RawPixelsStore over one image: resolution levels, tiles, and in-order tile writes."""

    def __init__(self, gw: FakeGateway) -> None:
        self.gw, self.server = gw, gw.server
        self.image: FakeImage | None = None
        self.level = 0  # OMERO numbering: n-1 is full resolution
        p = self.server.specs.get(omero.api.RawPixelsStorePrx)
        for name in ("setPixelsId", "getResolutionDescriptions", "getResolutionLevels", "setResolutionLevel",
                     "getTileSize", "getTile", "setTile", "save", "close"):
            getattr(p, name).side_effect = self.gw._guard(name, getattr(self, name))
        self.proxy = p

    def setPixelsId(self, pixelsId: int, bypassOriginalFile: bool, ctx: Any = None) -> None:
        for im in self.server.images.values():
            if int(im.obj.getPrimaryPixels().getId().getValue()) == pixelsId:
                if not self.gw.visible(im.group):
                    raise omero.SecurityViolation(None, None, "image not in the current group")
                self.image = im
                self.level = len(im.levels) - 1
                return
        raise omero.ValidationException(None, None, f"no pixels {pixelsId}")

    def getResolutionDescriptions(self, ctx: Any = None) -> list[Any]:
        out = []
        for lv in self.image.levels:
            d = omero.api.ResolutionDescription()
            d.sizeX, d.sizeY = lv.shape[1], lv.shape[0]
            out.append(d)
        return out

    def getResolutionLevels(self, ctx: Any = None) -> int:
        return len(self.image.levels)

    def setResolutionLevel(self, resolutionLevel: int, ctx: Any = None) -> None:
        assert 0 <= resolutionLevel < len(self.image.levels)
        self.level = resolutionLevel

    def getTileSize(self, ctx: Any = None) -> list[int]:
        return list(self.server.tile)

    def _array(self) -> np.ndarray:
        return self.image.levels[len(self.image.levels) - 1 - self.level]

    def getTile(self, z: int, c: int, t: int, x: int, y: int, w: int, h: int, ctx: Any = None) -> bytes:
        arr = self._array()
        mw, mh = self.server.max_plane
        if w > mw or h > mh:
            raise omero.ApiUsageException(None, None, f"tile {w}×{h} exceeds the maximum plane size")
        nbytes = w * h * arr.dtype.itemsize
        if nbytes > self.server.message_size_kb * 1024:
            raise Ice.MemoryLimitException()
        if not (0 <= x and 0 <= y and x + w <= arr.shape[1] and y + h <= arr.shape[0] and z == 0 and t == 0):
            raise omero.ApiUsageException(None, None, "tile outside the plane")
        self.server.tile_requests.append((len(self.image.levels) - 1 - self.level, x, y, w, h))
        return np.ascontiguousarray(arr[y : y + h, x : x + w, c], dtype=BIG_ENDIAN[self.image.pixel_type]).tobytes()

    def setTile(self, buf: bytes, z: int, c: int, t: int, x: int, y: int, w: int, h: int, ctx: Any = None) -> None:
        im = self.image
        assert not im.saved, "setTile on an image that is not new"
        arr = im.levels[0]
        if len(buf) != w * h * arr.dtype.itemsize:
            raise omero.ApiUsageException(None, None, "buffer size does not match the tile")
        if len(buf) > self.server.message_size_kb * 1024:
            raise Ice.MemoryLimitException()
        # OMERO's pyramid writer takes tiles in order: plane by plane, rows top to bottom, left to right
        if im.write_log:
            pc, py, px = im.write_log[-1]
            assert (c, y, x) > (pc, py, px), f"tile ({c}, {y}, {x}) written after ({pc}, {py}, {px})"
        im.write_log.append((c, y, x))
        arr[y : y + h, x : x + w, c] = np.frombuffer(buf, BIG_ENDIAN[im.pixel_type]).reshape(h, w)

    def save(self, ctx: Any = None) -> Any:
        self.image.saved = True
        return None

    def close(self, ctx: Any = None) -> None:
        return None


# -- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOmeroServer]:
    """A fresh fake server; every new gateway the connector makes is one of its connections."""
    from lpfm_toolkit.integrations.omero import session as session_mod

    if omero is None:
        pytest.skip("omero-py is not installed")
    srv = FakeOmeroServer()
    monkeypatch.setattr(session_mod, "_make_gateway", srv.make_gateway)
    for var in ("OMERO_HOST", "OMERO_PORT", "OMERO_USER", "OMERO_PASSWORD", "OMERO_SESSION_KEY", "OMERO_GROUP",
                "OMERO_SECURE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LPFM_CONFIG", "/nonexistent/lpfm-config.toml")
    yield srv
    srv.specs.release()


@pytest.fixture
def settings() -> Any:
    from lpfm_toolkit.integrations.omero.session import OmeroSettings

    return OmeroSettings(host="omero.example.org", user="alice", password="s3cret")


def pyramid(base: np.ndarray, n: int = 3) -> list[np.ndarray]:
    """Level 0 and n-1 halvings by 2×2 means."""
    levels = [base]
    for _ in range(n - 1):
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].astype(np.float32)
        levels.append(((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4).astype(base.dtype))
    return levels


@pytest.fixture
def make_pyramid() -> Any:
    return pyramid


def rect(x: float, y: float, w: float, h: float, text: str | None = None) -> Any:
    r = omero.model.RectangleI()
    r.setX(rdouble(x))
    r.setY(rdouble(y))
    r.setWidth(rdouble(w))
    r.setHeight(rdouble(h))
    if text is not None:
        r.setTextValue(rstring(text))
    r.setTheZ(rint(0))
    r.setTheT(rint(0))
    return r


@pytest.fixture
def make_rect() -> Any:
    return rect


@pytest.fixture(scope="session")
def sample_pyramid(sample_slide: Path) -> list[np.ndarray]:
    """The bundled SVS's pyramid levels as arrays (read with tifffile: no OpenSlide needed on 3.10)."""
    import tifffile

    with tifffile.TiffFile(sample_slide) as tif:
        return [lv.asarray() for lv in tif.series[0].levels]

"""The paquo backend: a QuPath project through QuPath's own Java classes (needs a QuPath installation).

paquo starts a JVM when ``paquo.projects`` is imported, so this module imports it only inside
:class:`PaquoBackend`; :func:`find_qupath_installation` looks for QuPath without starting Java.
NOT exercised in CI (no QuPath there): see tests/qupath/test_paquo_live.py, run with ``--qupath``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lpfm_toolkit.errors import MissingDependencyError, ProjectError
from lpfm_toolkit.integrations.qupath.entries import KEY_IDEMPOTENCY, ProjectEntry, parse_version
from lpfm_toolkit.integrations.qupath.geojson import parse_feature
from lpfm_toolkit.sources.base import Annotation, Level

log = logging.getLogger(__name__)


def find_qupath_installation() -> str | None:
    """The QuPath folder paquo would use (``PAQUO_QUPATH_DIR``, its search paths), or None; starts no JVM."""
    try:
        from paquo._config import settings, to_kwargs
        from paquo.jpype_backend import find_qupath
    except ImportError as exc:  # paquo, JPype1 or dynaconf missing
        log.debug("paquo not usable: %s", exc)
        return None
    try:
        info = find_qupath(**to_kwargs(settings))
    except (ValueError, OSError) as exc:
        log.debug("no QuPath installation: %s", exc)
        return None
    return str(info.app_dir)


class PaquoBackend:
    """Entries, hierarchy annotations and new entries through ``paquo.projects.QuPathProject``."""

    name = "paquo"

    def __init__(self, qpproj: Path, readonly: bool = False) -> None:
        try:
            from paquo.projects import QuPathProject as PaquoProject
        except ImportError as exc:
            raise MissingDependencyError(f"the paquo backend needs paquo and its Java bridge ({exc})",
                                         "install it with: pip install 'lpfm-toolkit[qupath]'") from exc
        except ValueError as exc:  # paquo raises ValueError("no valid qupath installation found")
            raise MissingDependencyError(f"the paquo backend needs a QuPath installation ({exc})",
                                         "install QuPath and set PAQUO_QUPATH_DIR, or use --backend file") from exc
        self.path = qpproj
        self.directory = qpproj.parent
        self._qp = PaquoProject(qpproj, mode="r" if readonly else "r+")
        self._raw = json.loads(qpproj.read_text(encoding="utf-8-sig"))

    @property
    def version_text(self) -> str | None:
        return self._qp.version or self._raw.get("version")

    @property
    def version(self) -> tuple[int, int, int]:
        return parse_version(self.version_text)

    @property
    def project_uri(self) -> str | None:
        return self._raw.get("uri")

    @staticmethod
    def _entry(img: Any) -> ProjectEntry:
        try:
            uri = img.uri
        except (RuntimeError, NotImplementedError):
            uri = None
        try:
            levels = tuple(Level(int(d["width"]), int(d["height"]), float(d["downsample"]))
                           for d in img.downsample_levels)
            width, height = int(img.width), int(img.height)
        except Exception as exc:  # the Java side raises many kinds when the file is missing
            log.debug("no server metadata for %s: %s", img.image_name, exc)
            levels, width, height = (), None, None
        image_type = getattr(img.image_type, "name", None)
        return ProjectEntry(id=str(img.entry_id), name=str(img.image_name), uri=uri, width=width, height=height,
                            levels=levels, metadata={str(k): str(v) for k, v in dict(img.metadata).items()},
                            description=img.description or None, image_type=image_type)

    def _image(self, entry_id: str) -> Any:
        for img in self._qp.images:
            if str(img.entry_id) == str(entry_id):
                return img
        raise ProjectError(f"entry {entry_id} is not in {self.path}", "list the entries with: lpfm qupath list")

    def entries(self) -> list[ProjectEntry]:
        return [self._entry(img) for img in self._qp.images]

    def hierarchy_annotations(self, entry: ProjectEntry) -> list[Annotation]:
        """Annotations of the entry's object hierarchy (its ``.qpdata``), via GeoJSON as paquo exports them."""
        img = self._image(entry.id)
        return [parse_feature(obj.to_geojson(), source=f"qupath:{self.path}#{entry.id}")
                for obj in img.hierarchy.annotations]

    def _path_class(self, name: str, color: Sequence[int] | None) -> Any:
        from paquo.classes import QuPathPathClass

        for pc in self._qp.path_classes:
            if pc.name == name:
                return pc
        pc = QuPathPathClass(name, color=tuple(color) if color else None)
        self._qp.path_classes = [*self._qp.path_classes, pc]
        return pc

    def add_entry(self, name: str, image: Path, builder: dict[str, Any], metadata: dict[str, str],
                  annotations: Sequence[Annotation] = (), image_type: str | None = None) -> ProjectEntry:
        """Add ``image`` as a new entry with ``metadata`` and ``annotations`` and save the project."""
        from paquo.images import QuPathImageType

        key = metadata.get(KEY_IDEMPOTENCY)
        for img in self._qp.images:
            if key and dict(img.metadata).get(KEY_IDEMPOTENCY) == key:
                return self._entry(img)
        kind = QuPathImageType[image_type] if image_type in QuPathImageType.__members__ else None
        img = self._qp.add_image(str(image), image_type=kind, allow_duplicates=True)
        img.image_name = name
        img.metadata = dict(metadata)
        for ann in annotations:
            try:
                pc = self._path_class(ann.class_name, ann.properties.get("color")) if ann.class_name else None
                obj = img.hierarchy.add_annotation(roi=ann.geometry, path_class=pc)
                if ann.name:
                    obj.name = ann.name
                if ann.properties.get("isLocked"):
                    obj.locked = True
            except Exception as exc:  # keep the other annotations; the GeoJSON file has all
                log.warning("annotation %s not added to entry %s: %s", ann.id, name, exc)
        self._qp.save()
        return self._entry(img)

    def close(self) -> None:
        """paquo keeps no file open; the JVM lives until the process ends."""

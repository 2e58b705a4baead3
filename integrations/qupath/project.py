"""A QuPath project as a toolkit source and sink: :class:`QuPathProject`.

``QuPathProject.open(path)`` picks a backend: ``paquo`` (QuPath's own classes) when a QuPath installation
is found, else the pure-Python ``file`` backend. Both list entries, resolve moved images, give each
entry as an :class:`~lpfm_toolkit.sources.base.ImageHandle` with its annotations, and add results as new
entries.

Annotations, in order of precedence: ``--annotations`` (a GeoJSON file for one entry, or a folder laid
out like the convention below); the entry's object hierarchy (paquo backend); for lpfm results, the
GeoJSON their metadata points to; the convention ``<project folder>/annotations/<entryID>.geojson``
(written by ``export_annotations.groovy``), or ``annotations/<image name>.geojson`` /
``annotations/<image name without extension>.geojson`` for exports made by hand.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from lpfm_toolkit.errors import ConfigError, ProjectError, SlideNotFoundError
from lpfm_toolkit.integrations.qupath import geojson
from lpfm_toolkit.integrations.qupath.entries import (
    KEY_ANNOTATIONS,
    KEY_IDEMPOTENCY,
    ProjectEntry,
)
from lpfm_toolkit.integrations.qupath.files import FileBackend, project_file
from lpfm_toolkit.integrations.qupath.uris import Remap, Resolution, resolve_image
from lpfm_toolkit.sources.base import Annotation, ImageHandle, Level

log = logging.getLogger(__name__)

Backend = Literal["auto", "file", "paquo"]
BACKENDS = ("auto", "file", "paquo")
ANNOTATIONS_DIR = "annotations"
DEFAULT_OUTPUT_DIR = "lpfm-outputs"


def _name_stems(name: str) -> list[str]:
    """``a.ome.tiff`` → ``a.ome.tiff``, ``a`` (candidate GeoJSON names for an image name)."""
    out = [name]
    lower = name.lower()
    for ext in (".ome.tiff", ".ome.tif"):
        if lower.endswith(ext):
            out.append(name[: -len(ext)])
    suffix = PurePosixPath(name).suffix
    if suffix and " " not in suffix and len(suffix) <= 6:  # an extension, not "x.svs Tumor [lpfm sr×2]"
        out.append(name[: -len(suffix)])
    return list(dict.fromkeys(s for s in out if s))


def relative_to_project(path: Path, directory: Path) -> str:
    """``path`` relative to the project folder when inside it (POSIX separators), else absolute."""
    try:
        return Path(path).resolve().relative_to(directory.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


class QuPathProject:
    """A QuPath project: entries, their images and annotations, and new result entries."""

    def __init__(self, backend: Any, remaps: Sequence[Remap] = (), annotations: Path | None = None,
                 readonly: bool = False) -> None:
        self._backend = backend
        self.remaps = list(remaps)
        self.annotations_path = Path(annotations) if annotations is not None else None
        self.readonly = readonly
        self._entries: list[ProjectEntry] | None = None

    @classmethod
    def open(cls, path: str | Path, backend: Backend = "auto", *, remaps: Sequence[Remap] = (),
             annotations: str | Path | None = None, readonly: bool = False) -> QuPathProject:
        """Open the project at ``path`` (its folder or ``project.qpproj``).

        ``backend``: ``auto`` (paquo when QuPath is installed, else file), ``file`` or ``paquo``.
        ``remaps``: ``--remap OLD=NEW`` rules for images that moved. ``annotations``: a GeoJSON file or folder.
        """
        if backend not in BACKENDS:
            raise ConfigError(f"unknown QuPath backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        qpproj = project_file(path)
        if annotations is not None and not Path(annotations).exists():
            raise ProjectError(f"annotation file or folder {annotations} does not exist",
                               "export annotations with export_annotations.groovy, or fix the --annotations path")
        chosen = backend
        if backend == "auto":
            from lpfm_toolkit.integrations.qupath.paquo_backend import find_qupath_installation

            found = find_qupath_installation()
            chosen = "paquo" if found else "file"
            log.info("QuPath backend: %s%s", chosen, f" (QuPath at {found})" if found else " (no QuPath found)")
        if chosen == "paquo":
            from lpfm_toolkit.integrations.qupath.paquo_backend import PaquoBackend

            impl: Any = PaquoBackend(qpproj, readonly=readonly)
        else:
            impl = FileBackend(qpproj)
        return cls(impl, remaps, Path(annotations) if annotations is not None else None, readonly)

    # -- what the project is -------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The ``project.qpproj`` file."""
        return self._backend.path

    @property
    def directory(self) -> Path:
        return self._backend.directory

    @property
    def backend(self) -> str:
        """``file`` or ``paquo``."""
        return self._backend.name

    @property
    def version(self) -> str | None:
        """The QuPath version that last wrote the project (``"0.5.1"``)."""
        return self._backend.version_text

    @property
    def entries(self) -> list[ProjectEntry]:
        """Every entry, in project order."""
        if self._entries is None:
            self._entries = self._backend.entries()
        return list(self._entries)

    def entry(self, ref: str) -> ProjectEntry:
        """The entry whose ID or image name is ``ref``."""
        ref = str(ref)
        by_id = [e for e in self.entries if e.id == ref]
        if by_id:
            return by_id[0]
        by_name = [e for e in self.entries if e.name == ref]
        if len(by_name) == 1:
            return by_name[0]
        if len(by_name) > 1:
            raise ProjectError(f"{len(by_name)} entries are named {ref!r} (IDs {', '.join(e.id for e in by_name)})",
                               "select the image by its ID instead")
        sample = ", ".join(f"{e.id}: {e.name}" for e in self.entries[:8])
        more = " …" if len(self.entries) > 8 else ""
        raise ProjectError(f"no entry {ref!r} in {self.path}",
                           f"use an ID or image name from `lpfm qupath list` ({sample}{more})")

    def select(self, refs: Sequence[str] | None = None) -> list[ProjectEntry]:
        """Entries named by ID or name; without ``refs``, every entry that is not itself an lpfm result."""
        if refs:
            return list(dict.fromkeys(self.entry(r) for r in refs))
        return [e for e in self.entries if not e.is_result]

    def find_result(self, idempotency_key: str) -> ProjectEntry | None:
        """The entry lpfm added for this idempotency key, if any."""
        for e in self.entries:
            if e.metadata.get(KEY_IDEMPOTENCY) == idempotency_key:
                return e
        return None

    # -- images --------------------------------------------------------------------------------------
    def resolution(self, entry: ProjectEntry) -> Resolution:
        """Where the entry's image file is (remaps, stored path, relative to the project)."""
        if entry.uri is None:
            return Resolution(None, "missing", ())
        return resolve_image(entry.uri, self.directory, self._backend.project_uri, self.remaps)

    def resolve(self, entry: ProjectEntry) -> Path:
        """The entry's image file, or :class:`SlideNotFoundError` listing where it was looked for."""
        if entry.transformed:
            raise ProjectError(f"entry {entry.id} ({entry.name}) shows its image through a "
                               f"{entry.builder_type!r} transform, which lpfm does not apply",
                               "export the transformed image to a file in QuPath and add that instead")
        if entry.uri is None:
            raise ProjectError(f"entry {entry.id} ({entry.name}) has no image URI", "is the project damaged?")
        res = self.resolution(entry)
        if res.path is None:
            raise SlideNotFoundError(f"image of entry {entry.id} ({entry.name}) not found; tried "
                                     + "; ".join(res.tried),
                                     "if the images moved, add --remap OLD_FOLDER=NEW_FOLDER")
        return res.path

    def open_entry(self, entry: ProjectEntry) -> QuPathEntryHandle:
        """The entry as an :class:`ImageHandle`: pixels from its image file, annotations from the project."""
        from lpfm_toolkit.sources import open_image

        return QuPathEntryHandle(self, entry, open_image(self.resolve(entry)))

    # -- annotations ---------------------------------------------------------------------------------
    def annotation_file(self, entry: ProjectEntry) -> Path | None:
        """The GeoJSON that holds the entry's annotations, by the precedence in the module docstring."""
        if self.annotations_path is not None and self.annotations_path.is_file():
            return self.annotations_path
        if self.annotations_path is None and entry.metadata.get(KEY_ANNOTATIONS):
            p = Path(entry.metadata[KEY_ANNOTATIONS])
            p = p if p.is_absolute() else self.directory / p
            if p.is_file():
                return p
        folder = self.annotations_path if self.annotations_path is not None else self.directory / ANNOTATIONS_DIR
        stems = [entry.id] if entry.is_result else [entry.id, *_name_stems(entry.name)]  # results: never by name
        for stem in stems:
            for suffix in (".geojson", ".json"):
                p = folder / f"{stem}{suffix}"
                if p.is_file():
                    return p
        return None

    def annotations(self, entry: ProjectEntry, classes: Sequence[str] | None = None,
                    names: Sequence[str] | None = None, ids: Sequence[str] | None = None) -> list[Annotation]:
        """The entry's annotations (level-0 pixels), filtered by class and by name or id."""
        found: list[Annotation] | None = None
        if self.annotations_path is None:
            found = self._backend.hierarchy_annotations(entry)
        if found is None:
            path = self.annotation_file(entry)
            found = geojson.read_geojson(path) if path is not None else []
        return geojson.select(found, classes, names, ids)

    def annotation_counts(self, entry: ProjectEntry) -> dict[str, int] | None:
        """Annotations per class (``Unclassified`` for none) from GeoJSON or hierarchy, else summary.json."""
        has_source = self.annotation_file(entry) is not None or self._backend.name == "paquo"
        if has_source:
            try:
                anns = self.annotations(entry)
            except ProjectError as exc:
                log.warning("annotations of entry %s unreadable: %s", entry.id, exc)
            else:
                return dict(Counter(a.class_name or "Unclassified" for a in anns))
        return dict(entry.annotation_counts) if entry.annotation_counts is not None else None

    # -- writing results -----------------------------------------------------------------------------
    def add_result(self, name: str, image: Path, builder: dict[str, Any], metadata: dict[str, str],
                   annotations: Sequence[Annotation] = (), source: ProjectEntry | None = None) -> ProjectEntry:
        """Add a new entry for an output image (existing entries are never changed)."""
        if self.readonly:
            raise ProjectError(f"{self.path} was opened read-only", "open it without readonly to add results")
        kwargs: dict[str, Any] = {}
        if self._backend.name == "paquo":
            kwargs["image_type"] = source.image_type if source is not None else None
        entry = self._backend.add_entry(name, Path(image), builder, metadata, annotations, **kwargs)
        self._entries = None
        return entry

    def sink(self, entry: ProjectEntry, output_dir: str | Path | None = None, *, compression: str = "auto",
             tile: int = 512, carry: Sequence[Annotation] | None = None, name: str | None = None) -> Any:
        """A :class:`~lpfm_toolkit.integrations.qupath.sink.QuPathSink` adding results of ``entry`` here.

        ``carry``: annotations copied (clipped, shifted, rescaled) onto each result; default: all of the entry's.
        ``name``: the output file name template (``--name``; default ``{stem}_{task}_{engine}[_{region}].{key}``).
        """
        from lpfm_toolkit.integrations.qupath.sink import QuPathSink

        out = Path(output_dir) if output_dir is not None else self.directory / DEFAULT_OUTPUT_DIR
        anns = list(carry) if carry is not None else self.annotations(entry)
        return QuPathSink(self, entry, out, annotations=anns, compression=compression, tile=tile, name=name)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> QuPathProject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QuPathProject({str(self.path)!r}, backend={self.backend!r}, version={self.version!r})"


class QuPathEntryHandle(ImageHandle):
    """One project entry as an image: pixels through its (resolved) image file, annotations from the project."""

    system = "qupath"

    def __init__(self, project: QuPathProject, entry: ProjectEntry, image: ImageHandle) -> None:
        self.project = project
        self.entry = entry
        self.image = image
        self.source_id = entry.id  # recorded as lpfm.source.id in provenance

    @property
    def uri(self) -> str:
        return self.image.uri

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def levels(self) -> list[Level]:
        return self.image.levels

    @property
    def dtype(self) -> Any:
        return self.image.dtype

    @property
    def channel_names(self) -> list[str]:
        return self.image.channel_names

    @property
    def mpp(self) -> tuple[float, float] | None:
        return self.image.mpp or self.entry.mpp

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> Any:
        return self.image.read_region(level, x, y, width, height)

    def annotations(self) -> list[Annotation]:
        return self.project.annotations(self.entry)

    def fingerprint(self) -> str:
        return self.image.fingerprint()

    def describe(self) -> dict[str, Any]:
        return {**self.image.describe(), "system": self.system, "name": self.name,
                "project": str(self.project.path), "entry_id": self.entry.id}

    def close(self) -> None:
        self.image.close()


__all__ = ["QuPathProject", "QuPathEntryHandle", "ProjectEntry"]

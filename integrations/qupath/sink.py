"""Results as new QuPath project entries: :class:`QuPathSink`.

Composes :class:`~lpfm_toolkit.sinks.ometiff.OmeTiffSink`: the pixels become a pyramidal OME-TIFF (+ its
``.lpfm.json`` provenance sidecar) in the output folder; then the carried-over annotations are written
beside it as ``<output>.geojson`` and a new entry is added whose metadata holds the provenance summary,
the source entry and the idempotency key. A result whose file exists but whose entry does not (a run
interrupted between the two) gets its entry on the next run instead of being computed again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lpfm_toolkit.integrations.qupath.entries import (
    KEY_ANNOTATIONS,
    KEY_IDEMPOTENCY,
    KEY_SIDECAR,
    KEY_SOURCE_ENTRY,
    KEY_SOURCE_ENTRY_NAME,
    ImageInfo,
    ProjectEntry,
    server_builder,
    server_metadata,
)
from lpfm_toolkit.integrations.qupath.geojson import carry_over, write_geojson
from lpfm_toolkit.integrations.qupath.uris import as_local, path_from_uri, uri_from_path
from lpfm_toolkit.provenance import Provenance
from lpfm_toolkit.sinks.base import OutputRef, OutputSpec, Sink, SinkWriter
from lpfm_toolkit.sinks.ometiff import OmeTiffSink, sidecar_path
from lpfm_toolkit.sources.base import Annotation, Level

log = logging.getLogger(__name__)


def _downsample(full: tuple[int, int], level: tuple[int, int]) -> float:
    """QuPath-style downsample of a level: the mean of both ratios, snapped to an integer when within 1 %."""
    ds = (full[0] / level[0] + full[1] / level[1]) / 2
    return float(round(ds)) if abs(ds - round(ds)) <= 0.01 * ds else round(ds, 6)


def geojson_path(image: Path) -> Path:
    """``x.<key>.ome.tiff`` → ``x.<key>.geojson`` (the carried-over annotations of a result)."""
    name = image.name
    for ext in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(ext):
            return image.with_name(name[: -len(ext)] + ".geojson")
    return image.with_name(name + ".geojson")


def image_info(path: Path, prov: Provenance) -> ImageInfo:
    """The output's size, pyramid, channels and pixel size as recorded by the OME-TIFF writer."""
    out = prov.output
    height, width = int(out["shape"][0]), int(out["shape"][1])
    sizes = out.get("levels") or [[width, height]]
    levels = tuple(Level(int(w), int(h), _downsample((width, height), (int(w), int(h)))) for w, h in sizes)
    tile = int(out.get("tile") or 512)
    mpp = out.get("mpp")
    return ImageInfo(name=path.name, width=width, height=height, levels=levels,
                     channel_names=tuple(out.get("channels") or ()), dtype=str(out.get("dtype", "uint8")),
                     mpp=(float(mpp[0]), float(mpp[1])) if mpp else None, tile_width=tile, tile_height=tile)


def _annotation_label(source: dict[str, Any]) -> str:
    ann = source.get("annotation") or {}
    if not ann:
        return ""
    cls = f"{ann.get('class')}: " if ann.get("class") else ""
    return f"{cls}{ann.get('name') or ''} ({ann.get('id')})".replace(" ()", "").strip()


def _provenance_from_metadata(meta: dict[str, str], key: str) -> Provenance:
    """A partial record from entry metadata, for results whose sidecar is gone."""
    return Provenance(source={"system": meta.get("lpfm.source.system", ""), "uri": meta.get("lpfm.source.uri", ""),
                              "id": meta.get(KEY_SOURCE_ENTRY, "")},
                      prompt=meta.get("lpfm.prompt", ""),
                      task={"kind": meta.get("lpfm.task", ""), "scale": int(meta.get("lpfm.task.scale", "1"))},
                      engine={"name": meta.get("lpfm.engine", "")}, seed=int(meta.get("lpfm.seed", "0")),
                      idempotency_key=key)


class QuPathSink(Sink):
    """Adds each result of one source entry to the project as a new entry."""

    def __init__(self, project: Any, entry: ProjectEntry, directory: Path, *,
                 annotations: Sequence[Annotation] = (), compression: str = "auto", tile: int = 512,
                 name: str | None = None) -> None:
        self.project = project
        self.entry = entry
        self.directory = Path(directory)
        self.annotations = list(annotations)
        self.files = OmeTiffSink(self.directory, compression=compression, tile=tile, name=name)

    def _rel(self, path: Path) -> str:
        from lpfm_toolkit.integrations.qupath.project import relative_to_project

        return relative_to_project(path, self.project.directory)

    def _ref(self, entry: ProjectEntry, key: str) -> OutputRef:
        """An :class:`OutputRef` for an existing result entry."""
        prov: Provenance | None = None
        side = entry.metadata.get(KEY_SIDECAR)
        if side:
            p = Path(side) if Path(side).is_absolute() else self.project.directory / side
            try:
                prov = Provenance.from_json(p.read_text(encoding="utf-8"))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("provenance sidecar of entry %s unreadable (%s); using its metadata", entry.id, exc)
        if prov is None:
            prov = _provenance_from_metadata(entry.metadata, key)
        image = as_local(path_from_uri(entry.uri)) if entry.uri else None
        return OutputRef(uri=str(image) if image else str(entry.uri), provenance=prov,
                         extra={"entry_id": entry.id, "entry_name": entry.name, "project": str(self.project.path),
                                "sidecar": side, "annotations": entry.metadata.get(KEY_ANNOTATIONS)})

    def find(self, idempotency_key: str, spec_name: str) -> OutputRef | None:
        return self._find(idempotency_key, lambda: self.files.find(idempotency_key, spec_name))

    def find_spec(self, idempotency_key: str, spec: OutputSpec) -> OutputRef | None:
        return self._find(idempotency_key, lambda: self.files.find_spec(idempotency_key, spec))

    def find_file(self, idempotency_key: str, image: Path) -> OutputRef | None:
        """The entry of this key, else the finished file ``image`` of this key (its entry added now), else None."""
        return self._find(idempotency_key, lambda: self.files.find_file(idempotency_key, image))

    def _find(self, idempotency_key: str, find_file: Any) -> OutputRef | None:
        """The result entry of this key; else its file (``find_file()``), whose missing entry is added now."""
        entry = self.project.find_result(idempotency_key)
        if entry is not None:
            return self._ref(entry, idempotency_key)
        ref = find_file()
        if ref is None:
            return None
        log.info("%s exists without a project entry (interrupted run?): adding the entry", ref.uri)
        entry = self.register(Path(ref.uri), ref.provenance)
        return self._ref(entry, idempotency_key)

    def open(self, spec: OutputSpec, idempotency_key: str, source: dict[str, Any]) -> SinkWriter:
        return QuPathSinkWriter(self, self.files.open(spec, idempotency_key, source))

    def register(self, image: Path, prov: Provenance) -> ProjectEntry:
        """Write the carried-over annotations beside ``image`` and add its entry to the project."""
        src = prov.source
        scale = float(prov.tiling.get("scale") or prov.task.get("scale") or 1)
        carried = carry_over(self.annotations, src["region"], float(src.get("downsample") or 1.0), scale,
                             key=prov.idempotency_key)
        metadata = dict(prov.summary())
        label = _annotation_label(src)
        if label:
            metadata["lpfm.source.annotation"] = label  # the sidecar keeps the full geometry
        else:
            metadata.pop("lpfm.source.annotation", None)
        metadata[KEY_SOURCE_ENTRY] = self.entry.id
        metadata[KEY_SOURCE_ENTRY_NAME] = self.entry.name
        metadata[KEY_IDEMPOTENCY] = prov.idempotency_key
        side = sidecar_path(image)
        if side.exists():
            metadata[KEY_SIDECAR] = self._rel(side)
        if carried:
            metadata[KEY_ANNOTATIONS] = self._rel(write_geojson(geojson_path(image), carried))
        info = image_info(image, prov)
        builder = server_builder(uri_from_path(image.resolve()), server_metadata(info))
        name = str(prov.output.get("name") or image.name)
        return self.project.add_result(name, image, builder, metadata, carried, source=self.entry)


class QuPathSinkWriter(SinkWriter):
    """Streams rows into the OME-TIFF writer; ``commit`` also adds the project entry."""

    def __init__(self, sink: QuPathSink, inner: SinkWriter) -> None:
        self.sink = sink
        self.inner = inner

    @property
    def column_alignment(self) -> int | None:  # type: ignore[override]
        return self.inner.column_alignment

    def write_rows(self, rows: Any, uncertainty: Any = None) -> None:
        self.inner.write_rows(rows, uncertainty)

    def write_block(self, x: int, rows: Any, uncertainty: Any = None) -> None:
        self.inner.write_block(x, rows, uncertainty)

    def commit(self, provenance: Provenance) -> OutputRef:
        ref = self.inner.commit(provenance)  # the file and its sidecar are complete from here on
        entry = self.sink.register(Path(ref.uri), ref.provenance)
        extra = {**ref.extra, "entry_id": entry.id, "entry_name": entry.name, "project": str(self.sink.project.path),
                 "annotations": entry.metadata.get(KEY_ANNOTATIONS)}
        return OutputRef(uri=ref.uri, provenance=ref.provenance, extra=extra)

    def abort(self) -> None:
        self.inner.abort()


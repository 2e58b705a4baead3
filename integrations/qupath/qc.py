"""QC over a QuPath project: :func:`qc_project`, what ``lpfm qc PROJECT`` calls.

Each selected entry is assessed (:func:`lpfm_toolkit.qc.assess`); its flagged regions become annotations of
the classes ``lpfm: out of focus``, ``lpfm: noisy`` and ``lpfm: compressed`` with the scores as QuPath
measurements. Like every lpfm result they go in beside the project and into it without touching an
existing entry: the GeoJSON, JSON, CSV and heat map are written to ``<project>/lpfm-qc/``, and a new entry
``<image> [lpfm qc]`` showing the *same* image file carries the annotations (paquo backend: in its
hierarchy; file backend: through ``lpfm.annotations``, loaded by ``import_lpfm_annotations.groovy``) and the
summary as metadata. Re-running with the same settings finds that entry by its key and does nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpfm_toolkit.batch import BatchProgressFn, Outcome
from lpfm_toolkit.engine.estimate import Thresholds
from lpfm_toolkit.errors import LpfmError, ProjectError
from lpfm_toolkit.integrations.qupath.entries import (
    BIOFORMATS,
    KEY_ANNOTATIONS,
    KEY_IDEMPOTENCY,
    KEY_SOURCE_ENTRY,
    KEY_SOURCE_ENTRY_NAME,
    ImageInfo,
    ProjectEntry,
    server_builder,
    server_metadata,
)
from lpfm_toolkit.integrations.qupath.geojson import write_geojson
from lpfm_toolkit.integrations.qupath.project import QuPathProject, relative_to_project
from lpfm_toolkit.qc import SlideQC, assess, output_stem, qc_features, write_outputs
from lpfm_toolkit.sources.base import ImageHandle, Region

log = logging.getLogger(__name__)

QC_DIR = "lpfm-qc"
#: progress(entry) → a context manager yielding the per-tile progress callback
ProgressFactory = Callable[[ProjectEntry], AbstractContextManager[Callable[[int, int], None] | None]]


@dataclass
class EntryQC:
    """What QC did for one entry."""

    entry: ProjectEntry
    status: str  # done · skipped (same QC already in the project) · failed
    qc: SlideQC | None = None
    qc_entry: str | None = None  # "ID: name" of the entry carrying the annotations
    files: dict[str, Path] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def qc_metadata(qc: SlideQC) -> dict[str, str]:
    """The summary as QuPath entry metadata (string values)."""
    s = qc.summary()
    meta = {
        "lpfm.task": "qc",
        "lpfm.qc.level": str(qc.level),
        "lpfm.qc.estimator": str(qc.estimator.get("name")),
        "lpfm.qc.flagged_fraction": f"{s['flagged_fraction']:.4f}",
        "lpfm.qc.out_of_focus_fraction": f"{s['out_of_focus_fraction']:.4f}",
        "lpfm.qc.noisy_fraction": f"{s['noisy_fraction']:.4f}",
        "lpfm.qc.compressed_fraction": f"{s['compressed_fraction']:.4f}",
        "lpfm.qc.tissue_tiles": str(s["tissue_tiles"]),
    }
    if s["median_noise_sigma"] is not None:
        meta["lpfm.qc.median_noise_sigma"] = f"{s['median_noise_sigma']:.2f}"
    if s["median_blur_sigma"] is not None:
        meta["lpfm.qc.median_blur_sigma"] = f"{s['median_blur_sigma']:.2f}"
    return meta


def _builder(entry: ProjectEntry, handle: ImageHandle, image: Path) -> dict[str, Any]:
    """A server builder for the entry's own image file, with the reader QuPath used for it."""
    from lpfm_toolkit.integrations.qupath.uris import uri_from_path

    lv = handle.levels[0]
    info = ImageInfo(
        name=entry.name,
        width=lv.width,
        height=lv.height,
        levels=tuple(handle.levels),
        channel_names=tuple(handle.channel_names),
        dtype=str(handle.dtype),
        mpp=handle.mpp,
    )
    builder = server_builder(uri_from_path(image.resolve()), server_metadata(info))
    if entry.provider:
        builder["providerClassName"] = entry.provider
    if entry.provider and entry.provider != BIOFORMATS:
        builder["args"] = []
    return builder


def qc_project(
    project: QuPathProject,
    *,
    images: Sequence[str] | None = None,
    level: int = 0,
    region: Region | None = None,
    tile: int = 256,
    estimator: Any = None,
    thresholds: Thresholds | None = None,
    output_dir: str | Path | None = None,
    write: bool = True,
    force: bool = False,
    progress: ProgressFactory | None = None,
    on_outcome: Callable[[EntryQC], None] | None = None,
) -> list[EntryQC]:
    """Assess the selected entries (default: all that are not lpfm results) and add the QC to the project.

    ``write=False`` only writes the files in ``output_dir`` (default ``<project>/lpfm-qc``), no entries.
    """
    entries = project.select(images)
    if not entries:
        raise ProjectError(f"{project.path} has no entries to check", "add images to the project in QuPath")
    out_dir = Path(output_dir) if output_dir is not None else project.directory / QC_DIR
    outcomes: list[EntryQC] = []
    for entry in entries:
        t0 = time.perf_counter()
        outcome = _qc_entry(
            project,
            entry,
            level=level,
            region=region,
            tile=tile,
            estimator=estimator,
            thresholds=thresholds,
            out_dir=out_dir,
            write=write,
            force=force,
            progress=progress,
        )
        outcome.seconds = time.perf_counter() - t0
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes


def _qc_entry(
    project: QuPathProject,
    entry: ProjectEntry,
    *,
    level: int,
    region: Region | None,
    tile: int,
    estimator: Any,
    thresholds: Thresholds | None,
    out_dir: Path,
    write: bool,
    force: bool,
    progress: ProgressFactory | None,
) -> EntryQC:
    try:
        image = project.resolve(entry)
        handle = project.open_entry(entry)
    except LpfmError as exc:
        return EntryQC(entry, "failed", error=str(exc))
    with handle:
        try:
            with progress(entry) if progress is not None else nullcontext() as update:
                qc = assess(
                    handle,
                    level=level,
                    region=region,
                    tile=tile,
                    estimator=estimator,
                    thresholds=thresholds,
                    progress=update,
                )
        except (LpfmError, OSError, ValueError, RuntimeError, MemoryError) as exc:
            log.debug("QC of entry %s failed", entry.id, exc_info=True)
            return EntryQC(entry, "failed", error=f"{type(exc).__name__}: {exc}")
        key = qc.key()
        existing = project.find_result(key)
        if existing is not None and not force:
            return EntryQC(entry, "skipped", qc, qc_entry=f"{existing.id}: {existing.name}")
        files = write_outputs(qc, handle, out_dir)
        features = qc_features(qc)
        files["geojson"] = write_geojson(out_dir / f"{output_stem(qc)}.qc.geojson", features)
        if not write:
            return EntryQC(entry, "done", qc, files=files)
        metadata = qc_metadata(qc)
        metadata[KEY_IDEMPOTENCY] = key
        metadata[KEY_SOURCE_ENTRY] = entry.id
        metadata[KEY_SOURCE_ENTRY_NAME] = entry.name
        metadata[KEY_ANNOTATIONS] = relative_to_project(files["geojson"], project.directory)
        metadata["lpfm.qc.report"] = relative_to_project(files["json"], project.directory)
        try:
            added = project.add_result(
                f"{entry.name} [lpfm qc]", image, _builder(entry, handle, image), metadata, features, source=entry
            )
        except LpfmError as exc:
            return EntryQC(entry, "failed", qc, files=files, error=str(exc))
    return EntryQC(entry, "done", qc, qc_entry=f"{added.id}: {added.name}", files=files)


def auto_enhance_project(
    project: QuPathProject,
    options: Any,
    *,
    images: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    annotation_refs: Sequence[str] | None = None,
    level: int = 0,
    seed: int = 0,
    output_dir: str | Path | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    compression: str = "auto",
    tiff_tile: int = 512,
    force: bool = False,
    estimator: Any = None,
    thresholds: Thresholds | None = None,
    progress: BatchProgressFn | None = None,
    items: Sequence[Any] | None = None,
) -> list[Outcome]:
    """``lpfm qupath enhance --auto``: in each selected entry (or each annotation of ``classes`` /
    ``annotation_refs``), enhance only what QC flags, each region with its task, into a new entry ``<image>
    [lpfm auto]`` (:func:`lpfm_toolkit.qc.auto_enhance`).

    ``options``: the :class:`~lpfm_toolkit.options.EngineOptions` each task's engine is built from (checked
    against the first entry's channels before any model loads; models load once for the whole run).
    ``estimator``: default the learned one when it loads (:func:`lpfm_toolkit.qc.get_estimator`). One
    :class:`~lpfm_toolkit.batch.Outcome` per item, through the one batch runner; an item QC flags nothing in
    is ``nothing to do``. ``Outcome.detail`` holds ``entry_id``, ``region``, the ``qc`` report and, for
    results, ``result_entry_id`` and ``output``.
    """
    from lpfm_toolkit.integrations.qupath.workflow import _open_entry, result_outcome, run_entry_items, select_items
    from lpfm_toolkit.qc import AutoRun

    auto = AutoRun(options, estimator=estimator, thresholds=thresholds)
    if items is None:
        items = select_items(project, images=images, classes=classes, annotation_refs=annotation_refs, level=level)

    run = {"seed": seed, "tile_size": tile_size, "overlap": overlap, "force": force}

    def enhance_one(item: Any, handle: Any, sink: Any, tiles: Callable[[int, int], None]) -> Outcome:
        done = lambda result, report: result_outcome(item, result, qc=report)  # noqa: E731
        return auto.outcome(
            item.label, handle, sink, done, level=item.level, annotation=item.annotation, progress=tiles, **run
        )

    return run_entry_items(
        project, items, _open_entry(project, output_dir, compression, tiff_tile), enhance_one, progress=progress
    )

"""Run the toolkit over a QuPath project: :func:`enhance_project`, the one function ``lpfm qupath enhance`` calls.

Each work item (a whole image at a level, or one annotation's bounding box) runs through the one batch
runner (:func:`lpfm_toolkit.batch.run_items`): a failing item is recorded (which one, which exception) and the
run goes on with the next. Finished work is found through the idempotency key in the result entries'
metadata and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpfm_toolkit.batch import BatchProgressFn, KeptOpen, Outcome, Status, run_items
from lpfm_toolkit.engine.base import Engine
from lpfm_toolkit.errors import ProjectError
from lpfm_toolkit.integrations.qupath.entries import ProjectEntry
from lpfm_toolkit.integrations.qupath.project import QuPathProject
from lpfm_toolkit.pipeline import run_selection
from lpfm_toolkit.prompts import Task, parse_prompt
from lpfm_toolkit.sources.base import Annotation

log = logging.getLogger(__name__)


def _label(ann: Annotation) -> str:
    return f"{ann.class_name + ': ' if ann.class_name else ''}{ann.name or ann.id}"


@dataclass(frozen=True)
class EntryItem:
    """One unit of work of a project: an entry's whole image, or one of its annotations.

    ``nothing``: why there is nothing to run for it (a point annotation, no matching annotation).
    """

    entry: ProjectEntry
    annotation: Annotation | None
    level: int
    nothing: str | None = None

    @property
    def region(self) -> str:
        if self.annotation is not None:
            return _label(self.annotation)
        return "annotations" if self.nothing else f"whole image (level {self.level})"

    @property
    def label(self) -> str:
        return f"{self.entry.id}: {self.entry.name} · {self.region}"


def select_items(
    project: QuPathProject,
    *,
    images: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    annotation_refs: Sequence[str] | None = None,
    level: int = 0,
) -> list[EntryItem]:
    """The work of a run, in order; raises :class:`ProjectError` (before any work) when nothing matches at all.

    ``images``: entry IDs or names (default: every entry that is not an lpfm result). Without ``classes`` and
    ``annotation_refs`` each whole image at ``level`` is one item; with them, each matching annotation with an
    area is (points and lines are items with nothing to do).
    """
    entries = project.select(images)
    if not entries:
        raise ProjectError(f"{project.path} has no entries to enhance", "add images to the project in QuPath")
    if not (classes or annotation_refs):
        return [EntryItem(entry, None, level) for entry in entries]
    seen: set[str] = set()
    selections: dict[str, list[Annotation]] = {}
    for entry in entries:
        seen.update(a.class_name or "Unclassified" for a in project.annotations(entry))
        selections[entry.id] = project.annotations(entry, classes, annotation_refs, annotation_refs)
    if not any(selections.values()):
        wanted = ", ".join([*(classes or []), *(annotation_refs or [])])
        raise ProjectError(
            f"no annotation matches {wanted} in the selected entries",
            f"classes found: {', '.join(sorted(seen)) or 'none (export annotations first)'}",
        )
    items: list[EntryItem] = []
    for entry in entries:
        anns = selections[entry.id]
        if not anns:
            items.append(EntryItem(entry, None, level, nothing="no matching annotation"))
        for ann in anns:
            areal = ann.geometry is not None and ann.geometry.area > 0
            why = (
                None
                if areal
                else f"{ann.geometry.geom_type if ann.geometry is not None else 'no'} geometry has no area"
            )
            items.append(EntryItem(entry, ann, level, nothing=why))
    return items


def _open_entry(
    project: QuPathProject, output_dir: str | Path | None, compression: str, tile: int, name: str | None = None
) -> Any:
    """``open(entry) -> (handle, sink)`` for :class:`~lpfm_toolkit.batch.KeptOpen`."""

    def open_(entry: ProjectEntry) -> tuple[Any, Any]:
        handle = project.open_entry(entry)
        try:
            return handle, project.sink(entry, output_dir, compression=compression, tile=tile, name=name)
        except BaseException:
            handle.close()
            raise

    return open_


def enhance_project(
    project: QuPathProject,
    prompt: str | Task,
    engine: Engine,
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
    samples_uncertainty: bool = False,
    progress: BatchProgressFn | None = None,
    items: Sequence[EntryItem] | None = None,
    name: str | None = None,
) -> list[Outcome]:
    """Enhance the selected entries (or their annotations of ``classes`` / ``annotation_refs``) into new entries.

    One :class:`~lpfm_toolkit.batch.Outcome` per item (see :func:`select_items`; ``items`` when already
    selected); ``Outcome.detail`` holds ``entry_id``, ``region`` and, for results, ``result_entry_id`` and
    ``output`` (the OME-TIFF). ``name``: the OME-TIFFs' file name template (``--name``; default
    ``{stem}_{task}_{engine}[_{region}].{key}``).
    """
    task = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if items is None:
        items = select_items(project, images=images, classes=classes, annotation_refs=annotation_refs, level=level)
    run = {"tile_size": tile_size, "overlap": overlap, "force": force, "samples_uncertainty": samples_uncertainty}

    def enhance_one(item: EntryItem, handle: Any, sink: Any, tiles: Callable[[int, int], None]) -> Outcome:
        result = run_selection(
            handle, sink, engine, task, level=item.level, annotation=item.annotation, seed=seed, progress=tiles, **run
        )
        return result_outcome(item, result)

    return run_entry_items(
        project, items, _open_entry(project, output_dir, compression, tiff_tile, name), enhance_one, progress=progress
    )


def result_outcome(item: EntryItem, result: Any, **detail: Any) -> Outcome:
    """The :class:`Outcome` of an item whose result was added to the project (or found there)."""
    extra = result.output.extra
    return Outcome(
        item.label,
        Status.SKIPPED if result.skipped else Status.DONE,
        result=f"entry {extra.get('entry_id')}: {extra.get('entry_name')}",
        detail={"result_entry_id": extra.get("entry_id"), "output": result.output.uri, **detail},
    )


def run_entry_items(
    project: QuPathProject,
    items: Sequence[EntryItem],
    open_entry: Callable[[ProjectEntry], tuple[Any, Any]],
    enhance_one: Callable[[EntryItem, Any, Any, Callable[[int, int], None]], Outcome],
    *,
    progress: BatchProgressFn | None = None,
) -> list[Outcome]:
    """The loop of every QuPath enhancement: each entry opened once (``open_entry`` → handle and sink), its
    items run as ``enhance_one(item, handle, sink, tiles)`` through the one batch runner."""
    current: KeptOpen[ProjectEntry, tuple[Any, Any]] = KeptOpen(open_entry, lambda opened: opened[0].close())

    def run_one(item: EntryItem, tiles: Callable[[int, int], None]) -> Outcome:
        if item.nothing:
            return Outcome(item.label, Status.NOTHING, error=item.nothing)
        handle, sink = current.get(item.entry)
        return enhance_one(item, handle, sink, tiles)

    with current:
        outcomes = run_items(items, run_one, progress=progress)  # LpfmError, OSError, ValueError, … are recorded
    for item, outcome in zip(items, outcomes, strict=True):
        outcome.detail = {"entry_id": item.entry.id, "region": item.region, **outcome.detail}
    return outcomes

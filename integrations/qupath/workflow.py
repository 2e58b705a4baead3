"""Run the toolkit over a QuPath project: :func:`enhance_project`, the one function ``lpfm qupath enhance`` calls.

Entries are processed one after another; a failing entry or annotation is recorded (which one, which
exception) and the run goes on with the next. Finished work is found through the idempotency key in
the result entries' metadata and skipped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from lpfm_toolkit.engine.base import Engine
from lpfm_toolkit.errors import LpfmError, ProjectError
from lpfm_toolkit.integrations.qupath.entries import ProjectEntry
from lpfm_toolkit.integrations.qupath.project import QuPathProject
from lpfm_toolkit.pipeline import ProgressFn, WorkItem, plan, run_item
from lpfm_toolkit.prompts import Task, parse_prompt
from lpfm_toolkit.sources.base import Annotation

log = logging.getLogger(__name__)

#: progress(entry, item) → a context manager yielding the per-tile progress callback (the CLI's progress bar)
ProgressFactory = Callable[[ProjectEntry, WorkItem], AbstractContextManager[ProgressFn | None]]

DONE, SKIPPED, FAILED, NOTHING = "done", "skipped", "failed", "nothing to do"


@dataclass
class EntryOutcome:
    """What happened to one work item (or to an entry that produced none)."""

    entry: ProjectEntry
    item: str  # "whole image (level 0)" or the annotation label
    status: str  # done · skipped · failed · nothing to do
    result_entry: str | None = None  # "ID: name" of the result entry
    output: str | None = None  # the OME-TIFF
    error: str | None = None
    seconds: float = 0.0


@contextlib.contextmanager
def _no_progress(entry: ProjectEntry, item: WorkItem) -> Iterator[None]:
    yield None


def _label(ann: Annotation) -> str:
    return f"{ann.class_name + ': ' if ann.class_name else ''}{ann.name or ann.id}"


def _areal(item_annotations: Sequence[Annotation], entry: ProjectEntry) -> tuple[list[Annotation], list[EntryOutcome]]:
    """Annotations with an area (points and lines have no region to enhance), and outcomes for the rest."""
    keep, dropped = [], []
    for ann in item_annotations:
        if ann.geometry is not None and ann.geometry.area > 0:
            keep.append(ann)
        else:
            dropped.append(EntryOutcome(entry, _label(ann), NOTHING,
                                        error=f"{ann.geometry.geom_type if ann.geometry is not None else 'no'} "
                                              "geometry has no area"))
    return keep, dropped


def enhance_project(project: QuPathProject, prompt: str | Task, engine: Engine, *,
                    images: Sequence[str] | None = None, classes: Sequence[str] | None = None,
                    annotation_refs: Sequence[str] | None = None, level: int = 0, seed: int = 0,
                    output_dir: str | Path | None = None, tile_size: int | None = None,
                    overlap: int | None = None, compression: str = "auto", tiff_tile: int = 512,
                    force: bool = False, samples_uncertainty: bool = False,
                    progress: ProgressFactory | None = None,
                    on_outcome: Callable[[EntryOutcome], None] | None = None) -> list[EntryOutcome]:
    """Enhance the selected entries (or their annotations of ``classes`` / ``annotation_refs``) into new entries.

    ``images``: entry IDs or names (default: every entry that is not an lpfm result). Without ``classes``
    and ``annotation_refs`` each whole image at ``level`` is one work item; with them, each matching
    annotation's bounding box is.
    """
    task = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    entries = project.select(images)
    if not entries:
        raise ProjectError(f"{project.path} has no entries to enhance", "add images to the project in QuPath")
    by_annotation = bool(classes or annotation_refs)
    selections: dict[str, list[Annotation]] = {}
    if by_annotation:
        seen: set[str] = set()
        for entry in entries:
            all_anns = project.annotations(entry)
            seen.update(a.class_name or "Unclassified" for a in all_anns)
            selections[entry.id] = project.annotations(entry, classes, annotation_refs, annotation_refs)
        if not any(selections.values()):
            wanted = ", ".join([*(classes or []), *(annotation_refs or [])])
            raise ProjectError(f"no annotation matches {wanted} in the selected entries",
                               f"classes found: {', '.join(sorted(seen)) or 'none (export annotations first)'}")
    progress = progress or _no_progress
    outcomes: list[EntryOutcome] = []

    def record(outcome: EntryOutcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    for entry in entries:
        anns, dropped = _areal(selections.get(entry.id, []), entry) if by_annotation else (None, [])
        for d in dropped:
            record(d)
        if by_annotation and not anns:
            if not dropped:
                record(EntryOutcome(entry, "annotations", NOTHING, error="no matching annotation"))
            continue
        try:
            handle = project.open_entry(entry)
        except LpfmError as exc:
            record(EntryOutcome(entry, "open image", FAILED, error=str(exc)))
            continue
        with handle:
            try:
                sink = project.sink(entry, output_dir, compression=compression, tile=tiff_tile)
            except LpfmError as exc:
                record(EntryOutcome(entry, "annotations", FAILED, error=str(exc)))
                continue
            items: list[WorkItem] = []
            for ann in anns if anns is not None else [None]:
                try:  # one annotation outside the image must not cost the others
                    items += plan(handle, task, level=level, annotations=[ann] if ann is not None else None,
                                  seed=seed)
                except LpfmError as exc:
                    label = _label(ann) if ann is not None else f"whole image (level {level})"
                    record(EntryOutcome(entry, label, FAILED, error=str(exc)))
            for item in items:
                label = item.label if item.annotation is not None else f"whole image (level {item.level})"
                t0 = time.perf_counter()
                try:
                    with progress(entry, item) as update:
                        result = run_item(handle, item, engine, sink, tile_size=tile_size, overlap=overlap,
                                          force=force, samples_uncertainty=samples_uncertainty, progress=update)
                except (LpfmError, OSError, ValueError, RuntimeError, MemoryError) as exc:
                    log.debug("entry %s, %s failed", entry.id, label, exc_info=True)
                    record(EntryOutcome(entry, label, FAILED, error=f"{type(exc).__name__}: {exc}",
                                        seconds=time.perf_counter() - t0))
                    continue
                extra = result.output.extra
                record(EntryOutcome(entry, label, SKIPPED if result.skipped else DONE,
                                    result_entry=f"{extra.get('entry_id')}: {extra.get('entry_name')}",
                                    output=result.output.uri, seconds=time.perf_counter() - t0))
    return outcomes

"""Enhance OMERO images, datasets or ROIs of a class: the one workflow the CLI, the OMERO.script and
scheduled jobs call.

Each work item (an image, or one ROI of a class) runs through the one batch runner
(:func:`lpfm_toolkit.batch.run_items`) and is recorded exactly as an :class:`~lpfm_toolkit.batch.Outcome`:
done, skipped (done before: nothing new), nothing to do (no ROI of the class), failed with its error, or not
run because the time budget or the session ran out; one item failing does not stop the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lpfm_toolkit.batch import BatchProgressFn, KeptOpen, Outcome, Status, run_items
from lpfm_toolkit.errors import LpfmError, RegionError
from lpfm_toolkit.integrations.omero.session import (
    OmeroSession,
    SessionLostError,
    describe_server_error,
    is_session_lost,
    server_error_types,
)
from lpfm_toolkit.sources.base import of_classes

log = logging.getLogger(__name__)

SESSION_LOST = "the OMERO session was lost"


def dataset_image_ids(session: OmeroSession, dataset_id: int) -> list[int]:
    """Ids of the images in a dataset, in id order, leaving out lpfm results (they carry our provenance)."""
    from lpfm_toolkit.provenance import NAMESPACE

    session.get_dataset(dataset_id)
    ids = session.call(
        lambda c: sorted(int(i.getId()) for i in c.getObjects("Image", opts={"dataset": int(dataset_id)})),
        f"list the images of dataset {dataset_id}",
    )
    if not ids:
        return []
    results = session.call(
        lambda c: {
            int(link.getParent().getId()) for link in c.getAnnotationLinks("Image", parent_ids=ids, ns=NAMESPACE)
        },
        f"find earlier lpfm results in dataset {dataset_id}",
    )
    if results:
        log.info("dataset %s: leaving out %d lpfm results", dataset_id, len(results))
    return [i for i in ids if i not in results]


def _text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LpfmError) else describe_server_error(exc)


def _halt(exc: BaseException) -> str | None:
    """Why the rest of a batch cannot run after ``exc`` (the session is gone), or None."""
    return SESSION_LOST if isinstance(exc, SessionLostError) or is_session_lost(exc) else None


@dataclass(frozen=True)
class ImageItem:
    """One unit of work: an image, or one of its ROIs. ``nothing``: why there is nothing to run for it;
    ``error``: what went wrong while selecting it (raised again when it runs, so it is recorded in order)."""

    image_id: int
    name: str
    annotation: Any = None
    nothing: str | None = None
    error: BaseException | None = None
    #: the image's ROIs as read while selecting (shared by its items): the run opens the image once, with them
    rois: Any = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """``image 42 · slide.svs · Tumor: T1`` (the name is known once the image was opened)."""
        parts = [f"image {self.image_id}"]
        if self.name != parts[0]:
            parts.append(self.name)
        if self.annotation is not None:
            ann = self.annotation
            parts.append(f"{ann.class_name + ': ' if ann.class_name else ''}{ann.name or ann.id or 'ROI'}")
        return " · ".join(parts)


def select_items(session: OmeroSession, image_ids: Sequence[int], roi_classes: Sequence[str] = ()) -> list[ImageItem]:
    """The items of a run: each image, or each of its ROIs of ``roi_classes``.

    ROIs are read without opening the images' pixels; the items keep them (``rois``), so that the run opens each
    image once and copies the very ROIs it selected.
    """
    from lpfm_toolkit.integrations.omero.source import image_uri, list_rois, roi_annotations

    if not roi_classes:
        return [ImageItem(i, f"image {i}") for i in image_ids]
    items: list[ImageItem] = []
    lost = False
    for image_id in image_ids:
        if lost:  # the batch halts at the first lost session: the rest are listed, not opened
            items.append(ImageItem(image_id, f"image {image_id}"))
            continue
        try:
            name, rois = list_rois(session, image_id)
            anns = of_classes(roi_annotations(rois, image_uri(session, image_id)), roi_classes)
        except (LpfmError, *server_error_types()) as exc:
            items.append(ImageItem(image_id, f"image {image_id}", error=exc))
            lost = _halt(exc) is not None
            continue
        if not anns:
            items.append(ImageItem(image_id, name, nothing=f"no ROI of class {', '.join(roi_classes)}"))
        items += [ImageItem(image_id, name, annotation=a, rois=rois) for a in anns]
    return items


def _open_image(
    session: OmeroSession, output: str, target_dataset: int | str | None, rois: dict[int, Any] | None = None
) -> Any:
    """``open(image_id) -> (handle, sink)`` for :class:`~lpfm_toolkit.batch.KeptOpen`; ``rois``: the ROIs already
    read, by image id (the handle then does not read them again)."""
    from lpfm_toolkit.integrations.omero.sink import OmeroSink
    from lpfm_toolkit.integrations.omero.source import OmeroImageHandle

    known = rois if rois is not None else {}

    def open_(image_id: int) -> tuple[Any, Any]:
        handle = OmeroImageHandle(session, image_id, rois=known.get(image_id))
        try:
            return handle, OmeroSink(session, handle, mode=output, dataset=target_dataset)
        except BaseException:
            handle.close()
            raise

    return open_


def enhance_omero(
    session: OmeroSession,
    *,
    prompt: str,
    image_ids: Sequence[int] = (),
    dataset_id: int | None = None,
    roi_classes: Sequence[str] = (),
    output: str = "new",
    target_dataset: int | str | None = None,
    engine: Any = None,
    options: Any = None,
    level: int = 0,
    seed: int = 0,
    tile_size: int | None = None,
    overlap: int | None = None,
    force: bool = False,
    uncertainty: bool | None = None,
    time_budget_s: float | None = None,
    progress: BatchProgressFn | None = None,
) -> list[Outcome]:
    """Enhance images (or their ROIs of ``roi_classes``) and write new images next to them in OMERO.

    ``engine``: a built engine, or None to build it from ``options`` (an
    :class:`~lpfm_toolkit.options.EngineOptions`; default: the settings') once the images are found.
    One :class:`~lpfm_toolkit.batch.Outcome` per item; ``detail`` holds ``image_id`` and, for results,
    ``new_image_id`` and ``name``.
    """
    from lpfm_toolkit.pipeline import run_selection
    from lpfm_toolkit.prompts import parse_prompt

    task = parse_prompt(prompt)
    ids = images_to_run(session, image_ids, dataset_id)
    if engine is None:
        from lpfm_toolkit.options import EngineOptions, build_engine

        options = options if options is not None else EngineOptions.from_settings()
        engine = build_engine(options, task)  # the engine is loaded only when there is work
    if uncertainty is None:
        uncertainty = options is not None and options.samples > 1
    run = {"tile_size": tile_size, "overlap": overlap, "force": force, "samples_uncertainty": uncertainty}

    def enhance_one(item: ImageItem, handle: Any, sink: Any, tiles: Callable[[int, int], None]) -> Outcome:
        result = run_selection(
            handle, sink, engine, task, level=level, annotation=item.annotation, seed=seed, progress=tiles, **run
        )
        return result_outcome(item, result)

    return run_image_items(session, ids, roi_classes, output, target_dataset, enhance_one,
                           time_budget_s=time_budget_s, progress=progress)


def images_to_run(session: OmeroSession, image_ids: Sequence[int], dataset_id: int | None) -> list[int]:
    """``image_ids`` and then the images of ``dataset_id`` (each once); none at all is an error."""
    ids = [int(i) for i in image_ids]
    if dataset_id is not None:
        ids += [i for i in dataset_image_ids(session, int(dataset_id)) if i not in ids]
    if not ids:
        raise RegionError("no images to enhance", "give --image IDs or a --dataset that holds images")
    return ids


def result_outcome(item: ImageItem, result: Any, **detail: Any) -> Outcome:
    """The :class:`Outcome` of an item whose result was written (or found) on the server."""
    new_id = result.output.extra.get("image_id")
    return Outcome(
        item.label,
        Status.SKIPPED if result.skipped else Status.DONE,
        result=f"image {new_id}" if new_id is not None else result.output.uri,
        detail={"new_image_id": new_id, "name": result.output.extra.get("name"), **detail},
    )


def run_image_items(
    session: OmeroSession,
    ids: Sequence[int],
    roi_classes: Sequence[str],
    output: str,
    target_dataset: int | str | None,
    enhance_one: Callable[[ImageItem, Any, Any, Callable[[int, int], None]], Outcome],
    *,
    time_budget_s: float | None = None,
    progress: BatchProgressFn | None = None,
) -> list[Outcome]:
    """The loop of every OMERO enhancement: items of ``ids`` (one per ROI of ``roi_classes``), each image
    opened once with its sink, ``enhance_one(item, handle, sink, tiles)`` run through the one batch runner
    with the session kept alive, halting when the session is lost and at the time budget."""
    listed: dict[int, Any] = {}  # ROIs read while selecting, by image: each image is opened once
    current: KeptOpen[int, tuple[Any, Any]] = KeptOpen(
        _open_image(session, output, target_dataset, listed), lambda opened: opened[0].close()
    )

    def run_one(item: ImageItem, tiles: Callable[[int, int], None]) -> Outcome:
        if item.error is not None:
            raise item.error
        if item.nothing:
            return Outcome(item.label, Status.NOTHING, error=item.nothing)
        handle, sink = current.get(item.image_id)
        return enhance_one(item, handle, sink, tiles)

    with session.keepalive():
        items = select_items(session, ids, roi_classes)
        listed.update((item.image_id, item.rois) for item in items if item.rois is not None)
        with current:
            outcomes = run_items(
                items,
                run_one,
                progress=progress,
                catch=(LpfmError, *server_error_types()),
                describe=_text,
                halt=_halt,
                budget_s=time_budget_s,
            )
    for item, outcome in zip(items, outcomes, strict=True):
        outcome.detail = {"image_id": item.image_id, **outcome.detail}
        if outcome.status is Status.FAILED:
            log.error("%s failed: %s", outcome.item, outcome.error)
    return outcomes


def new_image_ids(outcomes: Sequence[Outcome]) -> list[int]:
    """The ids of the images a run created (in order)."""
    return [
        o.detail["new_image_id"]
        for o in outcomes
        if o.status is Status.DONE and o.detail.get("new_image_id") is not None
    ]

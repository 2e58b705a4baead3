"""Enhance OMERO images, datasets or ROIs of a class: the one workflow the CLI, the OMERO.script and
scheduled jobs call.

Each work item is recorded exactly (created, skipped as already done, failed with its error, or not run
because the time budget or the session ran out); one item failing does not stop the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lpfm_toolkit.errors import LpfmError, RegionError
from lpfm_toolkit.integrations.omero.session import (
    OmeroSession,
    SessionLostError,
    describe_server_error,
    is_session_lost,
    server_error_types,
)

log = logging.getLogger(__name__)

#: item_progress(label, done_tiles, total_tiles) for the item being run
ItemProgress = Callable[[str, int, int], None]


@dataclass
class ItemOutcome:
    """What happened to one work item."""

    image_id: int
    label: str
    status: str  # created | exists (done before: nothing new) | no match (no ROI of the class) | failed | not run
    new_image_id: int | None = None
    name: str | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class OmeroRun:
    """All outcomes of one ``enhance_omero`` call, in order."""

    outcomes: list[ItemOutcome] = field(default_factory=list)

    @property
    def new_image_ids(self) -> list[int]:
        return [o.new_image_id for o in self.outcomes if o.status == "created" and o.new_image_id is not None]

    @property
    def failed(self) -> list[ItemOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def not_run(self) -> list[ItemOutcome]:
        return [o for o in self.outcomes if o.status == "not run"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.status] = out.get(o.status, 0) + 1
        return out


def dataset_image_ids(session: OmeroSession, dataset_id: int) -> list[int]:
    """Ids of the images in a dataset, in id order, leaving out lpfm results (they carry our provenance)."""
    from lpfm_toolkit.provenance import NAMESPACE

    session.get_dataset(dataset_id)
    ids = session.call(lambda c: sorted(int(i.getId()) for i in c.getObjects("Image", opts={"dataset": int(dataset_id)})),
                       f"list the images of dataset {dataset_id}")
    if not ids:
        return []
    results = session.call(
        lambda c: {int(link.getParent().getId()) for link in c.getAnnotationLinks("Image", parent_ids=ids, ns=NAMESPACE)},
        f"find earlier lpfm results in dataset {dataset_id}")
    if results:
        log.info("dataset %s: leaving out %d lpfm results", dataset_id, len(results))
    return [i for i in ids if i not in results]


def _text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LpfmError) else describe_server_error(exc)


def select_annotations(annotations: Sequence[Any], roi_classes: Sequence[str]) -> list[Any]:
    """Annotations whose class is one of ``roi_classes`` (compared without case)."""
    wanted = {c.strip().lower() for c in roi_classes}
    return [a for a in annotations if a.class_name and a.class_name.strip().lower() in wanted]


def enhance_omero(session: OmeroSession, *, prompt: str, image_ids: Sequence[int] = (),
                  dataset_id: int | None = None, roi_classes: Sequence[str] = (), output: str = "new",
                  target_dataset: int | str | None = None, engine: Any = None, engine_name: str = "auto",
                  engine_options: dict[str, Any] | None = None, level: int = 0, seed: int = 0,
                  tile_size: int | None = None, overlap: int | None = None, force: bool = False,
                  uncertainty: bool = False, time_budget_s: float | None = None, progress: ItemProgress | None = None,
                  on_outcome: Callable[[ItemOutcome], None] | None = None) -> OmeroRun:
    """Enhance images (or their ROIs of ``roi_classes``) and write new images next to them in OMERO."""
    from lpfm_toolkit.integrations.omero.sink import OmeroSink
    from lpfm_toolkit.integrations.omero.source import OmeroImageHandle
    from lpfm_toolkit.pipeline import plan, run_item
    from lpfm_toolkit.prompts import parse_prompt

    task = parse_prompt(prompt)
    if engine is None:
        from lpfm_toolkit.engine import get_engine  # the engine is loaded only when work starts

        engine = get_engine(engine_name, **(engine_options or {}))
    ids = [int(i) for i in image_ids]
    if dataset_id is not None:
        ids += [i for i in dataset_image_ids(session, int(dataset_id)) if i not in ids]
    if not ids:
        raise RegionError("no images to enhance", "give --image IDs or a --dataset that holds images")

    run = OmeroRun()
    started = time.monotonic()
    item_seconds: list[float] = []

    def record(outcome: ItemOutcome) -> None:
        run.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    def over_budget() -> bool:
        if time_budget_s is None:
            return False
        expected = max(item_seconds) if item_seconds else 0.0
        return time.monotonic() - started + expected > time_budget_s

    stop_reason: str | None = None
    with session.keepalive():
        for image_id in ids:
            if stop_reason is not None:
                record(ItemOutcome(image_id, f"image {image_id}", "not run", error=stop_reason))
                continue
            try:
                handle = OmeroImageHandle(session, image_id)
            except (LpfmError, *server_error_types()) as exc:
                record(ItemOutcome(image_id, f"image {image_id}", "failed", error=_text(exc)))
                if isinstance(exc, SessionLostError) or is_session_lost(exc):
                    stop_reason = "not run: the OMERO session was lost"
                continue
            with handle:
                try:
                    anns = None
                    if roi_classes:
                        anns = select_annotations(handle.annotations(), roi_classes)
                        if not anns:
                            record(ItemOutcome(image_id, handle.name, "no match",
                                               error=f"no ROI of class {', '.join(roi_classes)}"))
                            continue
                    items = plan(handle, task, level=level, annotations=anns, seed=seed)
                except (LpfmError, *server_error_types()) as exc:
                    record(ItemOutcome(image_id, handle.name, "failed", error=_text(exc)))
                    continue
                sink = OmeroSink(session, handle, mode=output, dataset=target_dataset)
                for item in items:
                    label = f"{handle.name}: {item.label}"
                    if stop_reason is not None or over_budget():
                        stop_reason = stop_reason or "not run: the time budget would be exceeded"
                        record(ItemOutcome(image_id, label, "not run", error=stop_reason))
                        continue
                    t0 = time.monotonic()
                    cb = (lambda d, t, _label=label: progress(_label, d, t)) if progress is not None else None
                    try:
                        result = run_item(handle, item, engine, sink, tile_size=tile_size, overlap=overlap,
                                          force=force, samples_uncertainty=uncertainty, progress=cb)
                    except Exception as exc:
                        if not isinstance(exc, (LpfmError, *server_error_types())):
                            raise  # a bug, not a server condition: let it surface with its traceback
                        msg = _text(exc)
                        log.error("%s failed: %s", label, msg)
                        record(ItemOutcome(image_id, label, "failed", error=msg,
                                           seconds=time.monotonic() - t0))
                        if isinstance(exc, SessionLostError) or is_session_lost(exc):
                            stop_reason = "not run: the OMERO session was lost"
                        continue
                    dt = time.monotonic() - t0
                    if not result.skipped:
                        item_seconds.append(dt)
                    record(ItemOutcome(image_id, label, "exists" if result.skipped else "created",
                                       new_image_id=result.output.extra.get("image_id"),
                                       name=result.output.extra.get("name"), seconds=dt))
    return run

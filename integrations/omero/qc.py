"""QC of OMERO images and datasets: :func:`qc_omero`, what ``lpfm qc --omero-image/--omero-dataset`` calls.

Each image is assessed tile by tile through its pyramid (:func:`lpfm_toolkit.qc.assess`). On the server the
image gets one ROI per flagged region — a polygon whose text is the class (``lpfm: out of focus``,
``lpfm: noisy``, ``lpfm: compressed``), its scores in the ROI description — and a MapAnnotation in the
namespace ``lpfm-toolkit/qc`` with the summary and the QC key. Pixels are never touched, nor any ROI or
annotation that is not ours. A dataset gets an OMERO.table (the bulk-annotation namespace, so OMERO.web
shows it) with one row per image, worst first. An image whose QC with the same key is on the server is
skipped unless forced; earlier QC ROIs made with other settings are left in place.
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
from lpfm_toolkit.errors import LpfmError, RegionError
from lpfm_toolkit.integrations.omero.session import (
    OmeroSession,
    describe_server_error,
    server_error_types,
)
from lpfm_toolkit.qc import QC_NAMESPACE, SlideQC, assess, flagged_regions, rank, write_outputs
from lpfm_toolkit.sources.base import Region

log = logging.getLogger(__name__)

KEY = "lpfm.qc.key"
TABLE_NAMESPACE = "openmicroscopy.org/omero/bulk_annotations"
#: progress(label) → a context manager yielding the per-tile progress callback
ProgressFactory = Callable[[str], AbstractContextManager[Callable[[int, int], None] | None]]


@dataclass
class ImageQC:
    """What QC did for one OMERO image."""

    image_id: int
    status: str  # done · skipped (the same QC is on the server) · failed
    qc: SlideQC | None = None
    rois: int = 0
    files: dict[str, Path] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class OmeroQCRun:
    outcomes: list[ImageQC] = field(default_factory=list)
    table_file_id: int | None = None


def summary_pairs(qc: SlideQC) -> dict[str, str]:
    """The map annotation's key-value pairs."""
    s = qc.summary()
    pairs = {
        KEY: qc.key(),
        "lpfm.qc.level": str(qc.level),
        "lpfm.qc.tile": str(qc.tile),
        "lpfm.qc.estimator": str(qc.estimator.get("name")),
        "lpfm.qc.tissue_tiles": str(s["tissue_tiles"]),
    }
    for k in (
        "flagged_fraction",
        "out_of_focus_fraction",
        "noisy_fraction",
        "compressed_fraction",
        "median_noise_sigma",
        "median_blur_sigma",
    ):
        if s[k] is not None:
            pairs[f"lpfm.qc.{k}"] = f"{s[k]:.4g}"
    t = qc.thresholds
    pairs["lpfm.qc.thresholds"] = f"blur>{t.blur:g}px noise>{t.noise:g} quality<{t.quality:g}"
    if s["worst_regions"]:
        w = s["worst_regions"][0]
        pairs["lpfm.qc.worst_region"] = f"{w['x']},{w['y']},{w['width']},{w['height']} ({', '.join(w['defects'])})"
    return pairs


def _colour(rgb: tuple[int, int, int], alpha: int = 255) -> int:
    """OMERO's packed RGBA colour as the signed 32-bit int it stores."""
    v = (rgb[0] << 24) | (rgb[1] << 16) | (rgb[2] << 8) | alpha
    return v - (1 << 32) if v >= 1 << 31 else v


def qc_rois(qc: SlideQC, image_id: int, z: int = 0, t: int = 0) -> list[Any]:
    """One unsaved ``RoiI`` (a polygon) per flagged region, in level-0 pixels."""
    import omero.model
    from omero.rtypes import rint, rstring

    from lpfm_toolkit.integrations.omero.source import format_points

    out = []
    for reg in flagged_regions(qc):
        poly = omero.model.PolygonI()
        poly.setPoints(rstring(format_points([(float(x), float(y)) for x, y in reg.geometry.exterior.coords[:-1]])))
        poly.setTextValue(rstring(reg.class_name))
        poly.setStrokeColor(rint(_colour(reg.color)))
        poly.setFillColor(rint(_colour(reg.color, 40)))
        poly.setTheZ(rint(z))
        poly.setTheT(rint(t))
        roi = omero.model.RoiI()
        roi.setName(rstring(reg.class_name))
        scores = ", ".join(f"{k}={v:g}" for k, v in reg.measurements(qc.mpp).items())
        roi.setDescription(rstring(f"lpfm qc {qc.key()}: {scores}"))
        roi.addShape(poly)
        roi.setImage(omero.model.ImageI(image_id, False))
        out.append(roi)
    return out


def _find_existing(session: OmeroSession, image_id: int, key: str) -> bool:
    images = session.call(
        lambda c: list(c.getObjectsByMapAnnotations("Image", key=KEY, value=key, ns=QC_NAMESPACE)),
        "look for earlier QC",
    )
    return any(int(i.getId()) == image_id for i in images)


def _write_to_image(session: OmeroSession, qc: SlideQC, image_id: int, z: int, t: int) -> int:
    import omero.model
    from omero.rtypes import rstring

    rois = qc_rois(qc, image_id, z, t)

    def save(conn: Any) -> None:
        update = conn.getUpdateService()
        if rois:
            update.saveAndReturnArray(rois, conn.SERVICE_OPTS)
        ann = omero.model.MapAnnotationI()
        ann.setNs(rstring(QC_NAMESPACE))
        ann.setMapValue([omero.model.NamedValue(k, v) for k, v in summary_pairs(qc).items()])
        link = omero.model.ImageAnnotationLinkI()
        link.setParent(omero.model.ImageI(image_id, False))
        link.setChild(ann)
        update.saveAndReturnObject(link, conn.SERVICE_OPTS)

    session.call(save, f"add QC ROIs and a map annotation to image {image_id}")
    return len(rois)


def qc_table_columns(results: Sequence[SlideQC]) -> list[Any]:
    """The dataset QC table's columns (``omero.grid``), one row per image, worst first."""
    from omero.grid import DoubleColumn, ImageColumn, LongColumn, StringColumn

    ranked = rank(results)
    summaries = [q.summary() for q in ranked]

    def num(key: str) -> list[float]:
        return [float("nan") if s[key] is None else float(s[key]) for s in summaries]

    names = [q.name for q in ranked]
    return [
        ImageColumn("Image", "", [int(q.source_id or 0) for q in ranked]),
        StringColumn("Name", "", max([len(n.encode()) for n in names] + [1]), names),
        LongColumn("Rank", "worst first", list(range(1, len(ranked) + 1))),
        DoubleColumn("Flagged fraction", "of tissue", num("flagged_fraction")),
        DoubleColumn("Out of focus fraction", "of tissue", num("out_of_focus_fraction")),
        DoubleColumn("Noisy fraction", "of tissue", num("noisy_fraction")),
        DoubleColumn("Compressed fraction", "of tissue", num("compressed_fraction")),
        DoubleColumn("Median noise sigma", "0-255", num("median_noise_sigma")),
        DoubleColumn("Median blur sigma", "px", num("median_blur_sigma")),
        LongColumn("Tissue tiles", "", [int(s["tissue_tiles"]) for s in summaries]),
    ]


def write_dataset_table(session: OmeroSession, dataset_id: int, results: Sequence[SlideQC]) -> int:
    """An OMERO.table of ``results`` linked to the dataset; returns its OriginalFile id."""
    import omero.model
    from omero.rtypes import rstring

    columns = qc_table_columns(results)

    def write(conn: Any) -> int:
        resources = conn.c.sf.sharedResources()
        repo_id = resources.repositories().descriptions[0].getId().getValue()
        table = resources.newTable(repo_id, f"lpfm-qc-dataset-{dataset_id}.h5")
        if table is None:
            raise RegionError("the OMERO server refused to create a table", "ask the admin whether OMERO.tables runs")
        try:
            table.initialize(columns)
            table.addData(columns)
            original = table.getOriginalFile()
        finally:
            table.close()
        file_id = int(original.getId().getValue())
        fa = omero.model.FileAnnotationI()
        fa.setFile(omero.model.OriginalFileI(file_id, False))
        fa.setNs(rstring(TABLE_NAMESPACE))
        fa.setDescription(rstring("lpfm qc: one row per image, worst first"))
        link = omero.model.DatasetAnnotationLinkI()
        link.setParent(omero.model.DatasetI(dataset_id, False))
        link.setChild(fa)
        conn.getUpdateService().saveAndReturnObject(link, conn.SERVICE_OPTS)
        return file_id

    return session.call(write, f"write the QC table of dataset {dataset_id}")


def qc_omero(
    session: OmeroSession,
    *,
    image_ids: Sequence[int] = (),
    dataset_id: int | None = None,
    level: int = 0,
    region: Region | None = None,
    tile: int = 256,
    estimator: Any = None,
    thresholds: Thresholds | None = None,
    output_dir: str | Path = "lpfm-qc",
    write: bool = True,
    force: bool = False,
    progress: ProgressFactory | None = None,
    on_outcome: Callable[[ImageQC], None] | None = None,
) -> OmeroQCRun:
    """Assess images (and every image of ``dataset_id``), write reports locally and the QC to the server."""
    from lpfm_toolkit.integrations.omero.source import OmeroImageHandle
    from lpfm_toolkit.integrations.omero.workflow import dataset_image_ids

    ids = [int(i) for i in image_ids]
    if dataset_id is not None:
        ids += [i for i in dataset_image_ids(session, int(dataset_id)) if i not in ids]
    if not ids:
        raise RegionError("no images to check", "give --omero-image IDs or an --omero-dataset that holds images")
    run = OmeroQCRun()
    errors = (LpfmError, OSError, ValueError, RuntimeError, MemoryError, *server_error_types())
    for image_id in ids:
        t0 = time.perf_counter()
        outcome = ImageQC(image_id, "failed")
        try:
            with OmeroImageHandle(session, image_id) as handle:
                with progress(f"{image_id}: {handle.name}") if progress is not None else nullcontext() as update:
                    qc = assess(
                        handle,
                        level=level,
                        region=region,
                        tile=tile,
                        estimator=estimator,
                        thresholds=thresholds,
                        progress=update,
                    )
                outcome.qc = qc
                outcome.files = write_outputs(qc, handle, output_dir)
                if not write:
                    outcome.status = "done"
                elif not force and _find_existing(session, image_id, qc.key()):
                    outcome.status = "skipped"
                else:
                    outcome.rois = _write_to_image(session, qc, image_id, handle.z, handle.t)
                    outcome.status = "done"
        except errors as exc:
            log.debug("QC of image %s failed", image_id, exc_info=True)
            outcome.error = str(exc) if isinstance(exc, LpfmError) else describe_server_error(exc)
        outcome.seconds = time.perf_counter() - t0
        run.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    results = [o.qc for o in run.outcomes if o.qc is not None]
    if dataset_id is not None and write and results:
        run.table_file_id = write_dataset_table(session, int(dataset_id), results)
    return run


def auto_enhance_omero(
    session: OmeroSession,
    options: Any,
    *,
    image_ids: Sequence[int] = (),
    dataset_id: int | None = None,
    roi_classes: Sequence[str] = (),
    output: str = "new",
    target_dataset: int | str | None = None,
    level: int = 0,
    seed: int = 0,
    tile_size: int | None = None,
    overlap: int | None = None,
    force: bool = False,
    estimator: Any = None,
    thresholds: Thresholds | None = None,
    time_budget_s: float | None = None,
    progress: BatchProgressFn | None = None,
) -> list[Outcome]:
    """``lpfm omero enhance --auto``: in each image (or each ROI of ``roi_classes``), enhance only what QC
    flags, each region with its task, into a new OMERO image next to it (:func:`lpfm_toolkit.qc.auto_enhance`).

    The items, sinks, error handling, halting on a lost session and time budget are those of
    :func:`~lpfm_toolkit.integrations.omero.workflow.enhance_omero`, through the one batch runner. ``options``:
    the :class:`~lpfm_toolkit.options.EngineOptions` each task's engine is built from (models load once, when
    the first item needs them). An item QC flags nothing in is ``nothing to do``. ``Outcome.detail`` holds
    ``image_id``, the ``qc`` report and, for results, ``new_image_id`` and ``name``.
    """
    from lpfm_toolkit.integrations.omero.workflow import images_to_run, result_outcome, run_image_items
    from lpfm_toolkit.qc import AutoRun

    auto = AutoRun(options, estimator=estimator, thresholds=thresholds)
    ids = images_to_run(session, image_ids, dataset_id)

    run = {"level": level, "seed": seed, "tile_size": tile_size, "overlap": overlap, "force": force}

    def enhance_one(item: Any, handle: Any, sink: Any, tiles: Callable[[int, int], None]) -> Outcome:
        done = lambda result, report: result_outcome(item, result, qc=report)  # noqa: E731
        return auto.outcome(item.label, handle, sink, done, annotation=item.annotation, progress=tiles, **run)

    return run_image_items(session, ids, roi_classes, output, target_dataset, enhance_one,
                           time_budget_s=time_budget_s, progress=progress)

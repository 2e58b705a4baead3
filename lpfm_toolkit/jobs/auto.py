"""``--auto`` jobs: QC picks the tiles and their tasks (:func:`lpfm_toolkit.qc.auto_enhance`) in a job.

A job whose prompt is ``auto`` (``lpfm jobs add --auto``, a QuPath entry flagged ``lpfm.enhance = auto``, an
OMERO image tagged ``lpfm:auto``) runs here instead of with one task. Its store key cannot be the output's
idempotency key, which depends on the QC plan (known only once every tile is scored); it is a digest of what
decides the plan and the pixels — the source's identity, level, region or ROIs, seed, tiling, the estimator
and thresholds, each task's resolved engine options and the output settings — with ``auto`` in it, so it
never equals a prompt job's key. Workers run it as any job (:func:`lpfm_toolkit.jobs.spec.compute`), so
``lpfm jobs run`` reports it with the same outcomes and exit codes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from typing import Any

from lpfm_toolkit.pipeline import ProgressFn

#: the prompt that makes a job an ``--auto`` job
AUTO_PROMPT = "auto"
#: what a finished ``--auto`` job that found nothing to enhance records as its result
NOTHING_FLAGGED = "nothing flagged: no output (the image needs no enhancement)"

_cache = threading.local()


def is_auto(prompt: str | None) -> bool:
    """True for the prompt of an ``--auto`` job."""
    return (prompt or "").strip().lower() == AUTO_PROMPT


def _runner(spec: Any) -> Any:
    """The :class:`~lpfm_toolkit.qc.AutoRun` of ``spec``'s engine options, kept per thread (models load once)."""
    from lpfm_toolkit.qc import AutoRun

    cache: dict[Any, Any] = getattr(_cache, "runs", None) or {}
    _cache.runs = cache
    if spec.options not in cache:
        cache[spec.options] = AutoRun(spec.options)
    return cache[spec.options]


def _selections(handle: Any, spec: Any) -> list[dict[str, Any]]:
    """What each ``auto_enhance`` call of the job covers: its region, or one ROI of ``roi_classes`` each."""
    from lpfm_toolkit.sources import Region

    if spec.roi_classes:
        from lpfm_toolkit.jobs.spec import job_rois

        return [{"annotation": a} for a in job_rois(handle, spec)]
    region = Region(*spec.region) if spec.region is not None else None
    if region is not None:
        handle.check_region(spec.level, region)
    return [{"region": region}]


def prepare_auto(spec: Any) -> tuple[Any, str]:
    """:func:`lpfm_toolkit.jobs.spec.prepare` for an ``--auto`` job: checks and its store key (see the module)."""
    from lpfm_toolkit.jobs.spec import _source
    from lpfm_toolkit.qc import resolve_auto_options

    source = _source(spec)
    with source.open(spec) as handle:
        if not 0 <= spec.level < len(handle.levels):
            from lpfm_toolkit.errors import RegionError

            raise RegionError(
                f"level {spec.level} does not exist in {handle.name}",
                f"choose a level from 0 to {len(handle.levels) - 1}",
            )
        selections = _selections(handle, spec)
        resolved = resolve_auto_options(spec.options, handle.channel_names)
        names = {o.engine for o in resolved.values()}
        if spec.engine == "auto" and len(names) == 1:  # every worker runs the same engine
            spec = dataclasses.replace(spec, engine=names.pop())
        estimator = _runner(spec).estimator_for(handle.is_rgb)
        source.sink(spec, handle)  # the output folder is checked here, not by the first worker
        blob = {
            "auto": True,
            "identity": {"system": handle.system, "fingerprint": handle.fingerprint()},
            "level": spec.level,
            "selections": [_where(s) for s in selections],
            "seed": spec.seed,
            "tiling": {"tile": spec.tile, "overlap": spec.overlap},
            "estimator": estimator.describe(),
            "engines": {k: _key_options(o) for k, o in sorted(resolved.items())},
            "output": {
                "compression": spec.compression,
                "tiff_tile": spec.tiff_tile,
                "name": getattr(spec, "name", None),
            },
        }
    return spec, "auto-" + hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _where(selection: dict[str, Any]) -> Any:
    """A selection as the key sees it: the region, an ROI's id and shape, or None (the whole level)."""
    ann = selection.get("annotation")
    if ann is not None:
        return [ann.id, ann.geometry.wkt if ann.geometry is not None else None]
    region = selection.get("region")
    return list(region.as_tuple()) if region is not None else None


def _key_options(options: Any) -> dict[str, Any]:
    """The options that change pixels (not the device, threads or the trust flag)."""
    return {k: v for k, v in options.to_dict().items() if k not in ("device", "threads", "trust_pickle", "compile")}


def compute_auto(spec: Any, progress: ProgressFn | None = None) -> Any:
    """:func:`lpfm_toolkit.jobs.spec.compute` for an ``--auto`` job: one :func:`~lpfm_toolkit.qc.auto_enhance`
    per selection; a selection where QC flags nothing writes nothing (``uri`` empty)."""
    from lpfm_toolkit.jobs.scratch import clean_scratch
    from lpfm_toolkit.jobs.spec import JobResult, _job_key, _source
    from lpfm_toolkit.jobs.store import worker_id

    source = _source(spec)
    t0 = time.perf_counter()
    folder = source.output_dir(spec)
    if folder is not None:
        clean_scratch(folder)
    with source.open(spec) as handle:
        sink = source.sink(spec, handle)
        auto = _runner(spec)
        runs = [
            auto(
                handle,
                sink,
                level=spec.level,
                seed=spec.seed,
                tile_size=spec.tile,
                overlap=spec.overlap,
                verify=spec.verify,
                progress=progress,
                **selection,
            )
            for selection in _selections(handle, spec)
        ]
    made = [r.result for r in runs if r.result is not None]
    return JobResult(
        key=_job_key([r.provenance.idempotency_key for r in made]) if made else "",
        uri=" ".join(r.output.uri for r in made),
        name=" ".join(r.provenance.output.get("name", "") for r in made),
        skipped=bool(made) and all(r.skipped for r in made),
        seconds=round(time.perf_counter() - t0, 3),
        worker=worker_id(),
        remade="; ".join(r.remade for r in made if getattr(r, "remade", None)) or None,
    )

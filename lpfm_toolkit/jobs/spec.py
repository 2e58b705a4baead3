"""What one job does, as plain data, and the function that does it in any process.

A :class:`JobSpec` is JSON: a source (a slide file, or a QuPath project and entry), the region, the prompt,
the engine and its settings, tiling, output folder and compression. :func:`job_key` opens the source and
computes the pipeline's idempotency key (the store's primary key); :func:`compute` runs the job into an
OME-TIFF and returns a picklable :class:`JobResult` — it is what pool and Dask workers run, holding no open
handles between calls except a per-thread engine cache; :func:`finalize` does what must happen in the
coordinating process (adding QuPath entries). :func:`execute` is both, for use in one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpfm_toolkit.engine.base import Engine
from lpfm_toolkit.errors import ConfigError
from lpfm_toolkit.jobs.store import one_line_error, worker_id
from lpfm_toolkit.options import EngineOptions
from lpfm_toolkit.pipeline import ProgressFn
from lpfm_toolkit.sources.base import ImageHandle

log = logging.getLogger(__name__)

#: fields added after the first release: left out of :meth:`JobSpec.to_dict` at their defaults, so specs
#: (and the watcher's recipes) written before them stay the same
_LATER_FIELDS = {"roi_classes": (), "output_mode": "new", "target_dataset": None, "verify": "quick",
                 "sampler": None, "tta": False, "compile": False, "name": None}
#: the engine options a job stores (an :class:`~lpfm_toolkit.options.EngineOptions` less ``threads``, which is
#: the runner's: each worker gets its share of the host's cores)
SPEC_OPTIONS = ("engine", "method", "model", "device", "steps", "samples", "sampler", "tta", "trust_pickle", "compile")


@dataclass(frozen=True)
class JobSpec:
    """One work item as data (picklable, JSON round-trips through :meth:`to_dict` / :meth:`from_dict`).

    ``kind`` ``file``: ``source`` is a slide. ``kind`` ``qupath``: ``source`` is the ``project.qpproj`` and
    ``entry`` the entry ID; the result is added to the project as a new entry. ``kind`` ``omero``:
    ``source`` is the server (``omero://host:port``) and ``entry`` the image ID; results become new OMERO
    images (``output_mode``, ``target_dataset`` as in ``lpfm omero enhance``), one per ROI of
    ``roi_classes`` when given. ``region`` is x, y, width, height at ``level`` (``None``: the whole level).
    ``out``: the output folder, ``name`` the output file name template (``--name``; None: the default).
    Kinds are resolved through :mod:`lpfm_toolkit.jobs.sources`.
    """

    source: str
    prompt: str
    out: str
    kind: str = "file"
    entry: str | None = None
    level: int = 0
    region: tuple[int, int, int, int] | None = None
    engine: str = "auto"
    method: str | None = None
    model: str | None = None
    device: str | None = None
    steps: int | None = None
    samples: int = 1
    trust_pickle: bool = False
    seed: int = 0
    tile: int | None = None
    overlap: int | None = None
    compression: str = "auto"
    tiff_tile: int = 512
    remaps: tuple[str, ...] = field(default=())  # QuPath --remap OLD=NEW rules
    roi_classes: tuple[str, ...] = field(default=())  # OMERO: one result per ROI of these classes
    output_mode: str = "new"  # OMERO: new | channels
    target_dataset: str | None = None  # OMERO: dataset id or name for the results
    verify: str = "quick"  # how an existing output is checked before it counts as done: quick | full
    sampler: str | None = None  # engine options added after the first release (see SPEC_OPTIONS)
    tta: bool = False
    compile: bool = False
    name: str | None = None  # file sources: the output file name template (--name); None: the default

    def __post_init__(self) -> None:
        from lpfm_toolkit.jobs.sources import kinds

        if self.kind not in kinds():
            raise ConfigError(f"unknown job kind {self.kind!r}", f"use one of {', '.join(kinds())}")
        if self.name is not None:
            from lpfm_toolkit.sinks.ometiff import NameTemplate

            NameTemplate(self.name)  # one clear line for a bad template, when the job is made
        needs = {"qupath": "an entry ID", "omero": "an image ID"}
        if self.kind in needs and not self.entry:
            raise ConfigError(f"a {self.kind} job needs {needs[self.kind]}", "give the item of the source to enhance")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["region"] = list(self.region) if self.region is not None else None
        d["remaps"] = list(self.remaps)
        d["roi_classes"] = list(self.roi_classes)
        for name, default in _LATER_FIELDS.items():
            if d[name] == (list(default) if isinstance(default, tuple) else default):
                del d[name]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"job spec has unknown fields {', '.join(sorted(unknown))}",
                              "it was written by a newer lpfm-toolkit; upgrade, or re-add the job")
        d = dict(data)
        if d.get("region") is not None:
            d["region"] = tuple(int(v) for v in d["region"])
        d["remaps"] = tuple(d.get("remaps") or ())
        d["roi_classes"] = tuple(d.get("roi_classes") or ())
        return cls(**d)

    @property
    def auto(self) -> bool:
        """An ``--auto`` job (prompt ``auto``): QC picks the tiles and their tasks (:mod:`lpfm_toolkit.jobs.auto`)."""
        from lpfm_toolkit.jobs.auto import is_auto

        return is_auto(self.prompt)

    @property
    def options(self) -> EngineOptions:
        """The job's engine options (checked as any options are; hashable, so equal ones share an engine)."""
        return EngineOptions.from_dict({name: getattr(self, name) for name in SPEC_OPTIONS})

    @staticmethod
    def options_fields(options: EngineOptions) -> dict[str, Any]:
        """The :class:`JobSpec` fields that store ``options`` (``JobSpec(..., **JobSpec.options_fields(o))``)."""
        return {name: getattr(options, name) for name in SPEC_OPTIONS}

    def recipe(self) -> str:
        """A digest of everything but the source: two specs with the same recipe do the same thing to a file."""
        d = self.to_dict()
        for k in ("source", "entry"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        """How the job is shown: ``slide.svs (entry 3) · sr x2 · level 0 · x,y,w,h``."""
        if self.kind == "omero":
            where = f"{self.source.rstrip('/')}/image/{self.entry}"
        else:
            where = Path(self.source).name + (f" (entry {self.entry})" if self.entry else "")
        region = ",".join(map(str, self.region)) if self.region else "whole"
        if self.roi_classes:
            region = "ROIs " + ", ".join(self.roi_classes)
        return f"{where} · {self.prompt} · level {self.level} · {region}"


@dataclass(frozen=True)
class JobResult:
    """What a worker sends back (picklable): the output and whether it was already there."""

    key: str
    uri: str
    name: str
    skipped: bool
    seconds: float
    worker: str
    remade: str | None = None  # an earlier output of the same key failed its check: why it was made again


# Engines are expensive to build (the learned model loads its weights): one per thread and option set.
_engines = threading.local()


def engine_for(spec: JobSpec) -> Engine:
    """The engine ``spec`` asks for, cached per thread of this process."""
    from lpfm_toolkit.options import build_engine

    cache: dict[EngineOptions, Engine] = getattr(_engines, "cache", None) or {}
    _engines.cache = cache
    options = spec.options
    if options not in cache:
        cache[options] = build_engine(options)
    return cache[options]


def _source(spec: JobSpec) -> Any:
    from lpfm_toolkit.jobs.sources import source_for

    return source_for(spec.kind)


def job_rois(handle: ImageHandle, spec: JobSpec) -> list[Any]:
    """The ROIs of ``spec.roi_classes`` in ``handle``; none is an error (the job would do nothing)."""
    from lpfm_toolkit.sources.base import of_classes

    anns = of_classes(handle.annotations(), spec.roi_classes)
    if not anns:
        from lpfm_toolkit.errors import RegionError

        raise RegionError(f"{handle.name} has no ROI of class {', '.join(spec.roi_classes)}",
                          "draw or class ROIs, or queue the whole image")
    return anns


def _items(handle: ImageHandle, spec: JobSpec) -> list[Any]:
    """The work items of a job: its region, or one per ROI of ``roi_classes`` (sources that have ROIs)."""
    from lpfm_toolkit.pipeline import plan
    from lpfm_toolkit.prompts import parse_prompt
    from lpfm_toolkit.sources import Region

    task = parse_prompt(spec.prompt)
    if spec.roi_classes:
        return plan(handle, task, level=spec.level, annotations=job_rois(handle, spec), seed=spec.seed)
    region = Region(*spec.region) if spec.region is not None else None
    return plan(handle, task, level=spec.level, region=region, seed=spec.seed)


def _tiling(spec: JobSpec, engine: Engine) -> dict[str, int]:
    """The tiling ``run_item`` will use (it is part of the idempotency key)."""
    return {"tile": spec.tile or engine.tile_size, "overlap": engine.overlap if spec.overlap is None else spec.overlap}


def _key(key_for: Any, handle: ImageHandle, item: Any, engine: Engine, spec: JobSpec, sink: Any) -> str:
    """The key :func:`run_item` computes for this job in :func:`compute`: same tiling, and what the sink the
    job writes to adds to it (compression, JPEG settings), asked of that sink, not restated here."""
    import inspect

    params = inspect.signature(key_for).parameters
    extra: dict[str, Any] = {}
    if "compression" in params:
        extra["compression"] = getattr(sink, "compression", None)
    if "uncertainty" in params:
        extra["uncertainty"] = spec.samples > 1
    if "jpeg" in params:
        extra["jpeg"] = (sink.jpeg_quality, sink.jpeg_subsampling) if hasattr(sink, "jpeg_quality") else None
    return str(key_for(handle, item, engine, _tiling(spec, engine), **extra))


def _job_key(keys: list[str]) -> str:
    """One item: its idempotency key; several (ROIs): a digest of theirs, in order."""
    return keys[0] if len(keys) == 1 else hashlib.sha256(" ".join(keys).encode()).hexdigest()


def prepare(spec: JobSpec) -> tuple[JobSpec, str]:
    """``spec`` ready to queue, and its idempotency key (the pipeline's); checks source, prompt, region, engine.

    The source is opened first (a missing file fails before any model loads); ``engine="auto"`` is replaced
    by the engine it resolves to here, so every worker runs the same one.
    """
    from lpfm_toolkit.pipeline import key_for

    if spec.auto:
        from lpfm_toolkit.jobs.auto import prepare_auto

        return prepare_auto(spec)
    handle = _source(spec).open(spec)
    with handle:
        items = _items(handle, spec)
        engine = engine_for(spec)
        if spec.engine == "auto":
            spec = dataclasses.replace(spec, engine=engine.name)
            _engines.cache[spec.options] = engine
        engine.check(items[0].task, handle.channel_names)
        sink = _source(spec).sink(spec, handle)
        return spec, _named_key(_job_key([_key(key_for, handle, item, engine, spec, sink) for item in items]), spec)


def _named_key(key: str, spec: JobSpec) -> str:
    """The store key of a job: the pipeline's key, and the file name template only when one other than the default
    is given — so default names keep every key as it was, and asking for the same result under another name is a
    new job (it writes that file) instead of one already done."""
    from lpfm_toolkit.sinks.ometiff import NameTemplate

    if spec.name is None or NameTemplate(spec.name).is_default:
        return key
    return hashlib.sha256(f"{key} name={spec.name}".encode()).hexdigest()


def job_key(spec: JobSpec) -> str:
    """The pipeline's idempotency key of ``spec`` (see :func:`prepare`)."""
    return prepare(spec)[1]


def output_dir(spec: JobSpec) -> Path | None:
    """The local folder the job's results are written to (None for sources that write elsewhere)."""
    return _source(spec).output_dir(spec)


def marked_sink(folder: Path, compression: str, tile: int, name: str | None = None) -> Any:
    """An OME-TIFF sink whose writers mark their scratch folder with this process (see :mod:`.scratch`);
    ``name``: its file name template (``--name``)."""
    from lpfm_toolkit.jobs.scratch import mark_scratch, signals_deferred
    from lpfm_toolkit.sinks.ometiff import OmeTiffSink

    class MarkedSink(OmeTiffSink):
        def open(self, *args: Any, **kwargs: Any) -> Any:
            with signals_deferred():  # a stop request waits until the new folder is marked
                writer = super().open(*args, **kwargs)
                scratch = getattr(writer, "_scratch", None)
                if isinstance(scratch, Path):
                    mark_scratch(scratch)
            return writer

    return MarkedSink(folder, compression=compression, tile=tile, name=name)


def compute(spec: JobSpec | dict[str, Any], progress: ProgressFn | None = None) -> JobResult:
    """Run one job (skipped when its outputs already exist and pass their check); the worker side of a job.

    An existing output is checked before it counts as done (``spec.verify``: ``quick`` reads its header,
    levels, size and provenance; ``full`` decodes every level); a damaged one is made again (``remade``).

    Scratch folders in the output folder left by writers that died on this host are removed first.
    """
    from lpfm_toolkit.jobs.scratch import clean_scratch
    from lpfm_toolkit.pipeline import output_name, run_item

    spec = spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)
    if spec.auto:
        from lpfm_toolkit.jobs.auto import compute_auto

        return compute_auto(spec, progress)
    source = _source(spec)
    t0 = time.perf_counter()
    engine = engine_for(spec)
    folder = source.output_dir(spec)
    if folder is not None:
        clean_scratch(folder)
    handle = source.open(spec)
    with handle:
        sink = source.sink(spec, handle)
        results, names = [], []
        for item in _items(handle, spec):
            results.append(run_item(handle, item, engine, sink, tile_size=spec.tile, overlap=spec.overlap,
                                    samples_uncertainty=spec.samples > 1, progress=progress, verify=spec.verify))
            names.append(output_name(handle, item.task, item))
    return JobResult(key=_job_key([r.provenance.idempotency_key for r in results]),
                     uri=" ".join(r.output.uri for r in results), name=" ".join(names),
                     skipped=all(r.skipped for r in results), seconds=round(time.perf_counter() - t0, 3),
                     worker=worker_id(),
                     remade="; ".join(r.remade for r in results if getattr(r, "remade", None)) or None)


def finalize(spec: JobSpec | dict[str, Any], result: JobResult) -> str:
    """The coordinator's part of a finished job (its source's follow-up); returns the result URI to record.

    For QuPath jobs it adds the result as a new project entry (once) and returns ``<file>#entry=<ID>``; for
    OMERO jobs it marks the original ``lpfm:done``.
    """
    spec = spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)
    uri = str(_source(spec).finalize(spec, result))
    if not uri and spec.auto:  # QC flagged nothing: there is no output
        from lpfm_toolkit.jobs.auto import NOTHING_FLAGGED

        return NOTHING_FLAGGED
    return uri


def failed_for_good(spec: JobSpec | dict[str, Any], error: str) -> None:
    """The coordinator's follow-up of a job that used its last attempt (OMERO: mark the original failed)."""
    spec = spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)
    _source(spec).failed(spec, error)


def execute(spec: JobSpec | dict[str, Any], progress: ProgressFn | None = None) -> str:
    """Run one job completely in this process and return its output URI (idempotent: repeats do nothing)."""
    return finalize(spec, compute(spec, progress))


def configure_threads(threads: int | None) -> None:
    """Cap this process's math threads (torch, OpenMP, BLAS) before any engine is built."""
    if not threads:
        return
    from lpfm_toolkit.engine.device import set_process_threads  # no torch import

    set_process_threads(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # C libraries not yet loaded
        os.environ[var] = str(threads)
    import sys

    if "torch" in sys.modules:  # already imported (in-process runs): set it directly
        from lpfm_toolkit.engine.device import configure_cpu_threads

        configure_cpu_threads(threads)


def run_job(spec: dict[str, Any], threads: int | None = None) -> tuple[str, Any]:
    """What runners send to a worker: ``("ok", JobResult)`` or ``("error", one line)`` — never raises.

    Errors travel as text because not every exception pickles across processes.
    """
    try:
        configure_threads(threads)
        return "ok", compute(spec)
    except Exception as exc:  # noqa: BLE001 - every failure of a job is recorded, none stops the runner
        log.debug("job failed", exc_info=True)
        return "error", one_line_error(exc)


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
from lpfm_toolkit.pipeline import ProgressFn
from lpfm_toolkit.sources.base import ImageHandle

log = logging.getLogger(__name__)

KINDS = ("file", "qupath")


@dataclass(frozen=True)
class JobSpec:
    """One work item as data (picklable, JSON round-trips through :meth:`to_dict` / :meth:`from_dict`).

    ``kind`` ``file``: ``source`` is a slide. ``kind`` ``qupath``: ``source`` is the ``project.qpproj`` and
    ``entry`` the entry ID; the result is added to the project as a new entry. ``region`` is x, y, width,
    height at ``level`` (``None``: the whole level). ``out``: the output folder.
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

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown job kind {self.kind!r}", f"use one of {', '.join(KINDS)}")
        if self.kind == "qupath" and not self.entry:
            raise ConfigError("a QuPath job needs an entry ID", "give the entry of the project to enhance")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["region"] = list(self.region) if self.region is not None else None
        d["remaps"] = list(self.remaps)
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
        return cls(**d)

    @property
    def engine_options(self) -> tuple[Any, ...]:
        return (self.engine, self.method, self.model, self.device, self.steps, self.samples, self.trust_pickle)

    def recipe(self) -> str:
        """A digest of everything but the source: two specs with the same recipe do the same thing to a file."""
        d = self.to_dict()
        for k in ("source", "entry"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        """How the job is shown: ``slide.svs (entry 3) · sr x2 · level 0 · x,y,w,h``."""
        where = Path(self.source).name + (f" (entry {self.entry})" if self.entry else "")
        region = ",".join(map(str, self.region)) if self.region else "whole"
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


# Engines are expensive to build (the learned model loads its weights): one per thread and option set.
_engines = threading.local()


def engine_for(spec: JobSpec) -> Engine:
    """The engine ``spec`` asks for, cached per thread of this process."""
    from lpfm_toolkit.engine import get_engine

    cache: dict[tuple[Any, ...], Engine] = getattr(_engines, "cache", None) or {}
    _engines.cache = cache
    if spec.engine_options not in cache:
        cache[spec.engine_options] = get_engine(spec.engine, method=spec.method, model=spec.model,
                                                device=spec.device, steps=spec.steps, samples=spec.samples,
                                                trust_pickle=spec.trust_pickle)
    return cache[spec.engine_options]


def _open(spec: JobSpec) -> ImageHandle:
    """The source as an image handle (a QuPath entry's reads its image file; the project is only read)."""
    if spec.kind == "qupath":
        from lpfm_toolkit.integrations.qupath import QuPathProject, parse_remaps

        project = QuPathProject.open(spec.source, backend="file", remaps=parse_remaps(list(spec.remaps)),
                                     readonly=True)
        return project.open_entry(project.entry(spec.entry or ""))
    from lpfm_toolkit.sources import open_image

    return open_image(spec.source)


def _item(handle: ImageHandle, spec: JobSpec) -> Any:
    from lpfm_toolkit.pipeline import plan
    from lpfm_toolkit.prompts import parse_prompt
    from lpfm_toolkit.sources import Region

    region = Region(*spec.region) if spec.region is not None else None
    return plan(handle, parse_prompt(spec.prompt), level=spec.level, region=region, seed=spec.seed)[0]


def _tiling(spec: JobSpec, engine: Engine) -> dict[str, int]:
    """The tiling ``run_item`` will use (it is part of the idempotency key)."""
    return {"tile": spec.tile or engine.tile_size, "overlap": engine.overlap if spec.overlap is None else spec.overlap}


def _key(key_for: Any, handle: ImageHandle, item: Any, engine: Engine, spec: JobSpec) -> str:
    """The key :func:`run_item` computes for this job in :func:`compute` (same tiling, compression, samples)."""
    import inspect

    extra: dict[str, Any] = {}
    params = inspect.signature(key_for).parameters
    if "compression" in params:  # outputs' compression and uncertainty map are part of newer keys
        extra = {"compression": spec.compression, "uncertainty": spec.samples > 1}
    return str(key_for(handle, item, engine, _tiling(spec, engine), **extra))


def prepare(spec: JobSpec) -> tuple[JobSpec, str]:
    """``spec`` ready to queue, and its idempotency key (the pipeline's); checks source, prompt, region, engine.

    The source is opened first (a missing file fails before any model loads); ``engine="auto"`` is replaced
    by the engine it resolves to here, so every worker runs the same one.
    """
    from lpfm_toolkit.pipeline import key_for

    handle = _open(spec)
    with handle:
        item = _item(handle, spec)
        engine = engine_for(spec)
        if spec.engine == "auto":
            spec = dataclasses.replace(spec, engine=engine.name)
            _engines.cache[spec.engine_options] = engine
        engine.check(item.task, handle.channel_names)
        return spec, _key(key_for, handle, item, engine, spec)


def job_key(spec: JobSpec) -> str:
    """The pipeline's idempotency key of ``spec`` (see :func:`prepare`)."""
    return prepare(spec)[1]


def output_dir(spec: JobSpec) -> Path:
    """Where the OME-TIFF goes (for QuPath jobs without ``out``: the project's ``lpfm-outputs``)."""
    if spec.out:
        return Path(spec.out)
    if spec.kind == "qupath":
        from lpfm_toolkit.integrations.qupath.project import DEFAULT_OUTPUT_DIR

        return Path(spec.source).parent / DEFAULT_OUTPUT_DIR
    raise ConfigError("the job has no output folder", "add it again with --out DIR")


def _marked_sink(folder: Path, compression: str, tile: int) -> Any:
    """An OME-TIFF sink whose writers mark their scratch folder with this process (see :mod:`.scratch`)."""
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

    return MarkedSink(folder, compression=compression, tile=tile)


def compute(spec: JobSpec | dict[str, Any], progress: ProgressFn | None = None) -> JobResult:
    """Run one job into an OME-TIFF (skipped when the output already exists); the worker side of a job.

    Scratch folders in the output folder left by writers that died on this host are removed first.
    """
    from lpfm_toolkit.jobs.scratch import clean_scratch
    from lpfm_toolkit.pipeline import output_name, run_item

    spec = spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)
    t0 = time.perf_counter()
    engine = engine_for(spec)
    folder = output_dir(spec)
    clean_scratch(folder)
    sink = _marked_sink(folder, spec.compression, spec.tiff_tile)
    handle = _open(spec)
    with handle:
        item = _item(handle, spec)
        result = run_item(handle, item, engine, sink, tile_size=spec.tile, overlap=spec.overlap,
                          samples_uncertainty=spec.samples > 1, progress=progress)
        name = output_name(handle, item.task, item)
    return JobResult(key=result.provenance.idempotency_key, uri=result.output.uri, name=name,
                     skipped=result.skipped, seconds=round(time.perf_counter() - t0, 3), worker=worker_id())


def finalize(spec: JobSpec | dict[str, Any], result: JobResult) -> str:
    """The coordinator's part of a finished job; returns the result URI to record.

    For QuPath jobs, adds the result as a new project entry (once: an existing entry with the same key is
    reused), and returns ``<output file>#entry=<ID>``.
    """
    spec = spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)
    if spec.kind != "qupath":
        return result.uri
    from lpfm_toolkit.integrations.qupath import QuPathProject, parse_remaps

    with QuPathProject.open(spec.source, backend="file", remaps=parse_remaps(list(spec.remaps))) as project:
        entry = project.entry(spec.entry or "")
        ref = project.sink(entry, output_dir(spec), compression=spec.compression,
                           tile=spec.tiff_tile).find(result.key, result.name)
    if ref is None:
        from lpfm_toolkit.errors import ProjectError

        raise ProjectError(f"the result {result.uri} of entry {spec.entry} disappeared before it was added",
                           "retry the job")
    return f"{ref.uri}#entry={ref.extra.get('entry_id')}"


def execute(spec: JobSpec | dict[str, Any], progress: ProgressFn | None = None) -> str:
    """Run one job completely in this process and return its output URI (idempotent: repeats do nothing)."""
    return finalize(spec, compute(spec, progress))


def configure_threads(threads: int | None) -> None:
    """Cap this process's math threads (torch, OpenMP, BLAS) before any engine is built."""
    if not threads:
        return
    for var in ("LPFM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
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


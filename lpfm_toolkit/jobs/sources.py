"""Job sources: what a job's ``kind`` means, as a registry resolved only when a job of that kind is touched.

A :class:`JobSource` opens the job's image, says where its result goes (a sink), and does the follow-up in
the coordinating process (``finalize`` after success, ``failed`` once a job failed for good). ``file`` lives
here; ``qupath`` and ``omero`` live with their connectors and are named by ``module:attribute`` strings, so
importing :mod:`lpfm_toolkit.jobs` imports no connector. :func:`register_source` adds a kind.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lpfm_toolkit.errors import ConfigError

if TYPE_CHECKING:  # only for type hints: nothing is imported at run time
    from lpfm_toolkit.jobs.spec import JobResult, JobSpec
    from lpfm_toolkit.sinks.base import Sink
    from lpfm_toolkit.sources.base import ImageHandle


class JobSource(Protocol):
    """How jobs of one kind reach their image and deliver their result."""

    def open(self, spec: JobSpec) -> ImageHandle:
        """The image to enhance (a context manager; the worker closes it)."""

    def sink(self, spec: JobSpec, handle: ImageHandle) -> Sink:
        """Where the worker writes the result."""

    def output_dir(self, spec: JobSpec) -> Path | None:
        """The local folder results are written to (scratch folders are cleaned there), or None."""

    def finalize(self, spec: JobSpec, result: JobResult) -> str:
        """The coordinator's follow-up of a finished job; returns the result URI to record."""

    def failed(self, spec: JobSpec, error: str) -> None:
        """The coordinator's follow-up of a job that failed for good (e.g. mark the original)."""


#: kind → ``module:attribute`` of its source (a class, instantiated once without arguments)
_REGISTRY: dict[str, str] = {
    "file": "lpfm_toolkit.jobs.sources:FileSource",
    "qupath": "lpfm_toolkit.integrations.qupath.jobsource:QuPathSource",
    "omero": "lpfm_toolkit.integrations.omero.jobsource:OmeroSource",
}
_RESOLVED: dict[str, JobSource] = {}


def kinds() -> tuple[str, ...]:
    """The job kinds known (registered), without importing any of them."""
    return tuple(_REGISTRY)


def register_source(kind: str, target: str) -> None:
    """Make ``kind`` mean the source at ``target`` (``"package.module:ClassName"``), imported when first used."""
    if ":" not in target:
        raise ConfigError(f"job source {target!r} is not 'module:attribute'", "e.g. 'mypackage.jobs:MySource'")
    _REGISTRY[kind] = target
    _RESOLVED.pop(kind, None)


def source_for(kind: str) -> JobSource:
    """The source of ``kind``, importing its module on first use."""
    if kind not in _RESOLVED:
        try:
            target = _REGISTRY[kind]
        except KeyError:
            raise ConfigError(f"unknown job kind {kind!r}", f"use one of {', '.join(_REGISTRY)}") from None
        module, _, attr = target.partition(":")
        _RESOLVED[kind] = getattr(importlib.import_module(module), attr)()
    return _RESOLVED[kind]


class FileSource:
    """``kind = "file"``: ``source`` is a slide file; the result is an OME-TIFF (+ sidecar) in ``out``."""

    def open(self, spec: JobSpec) -> ImageHandle:
        from lpfm_toolkit.sources import open_image

        return open_image(spec.source)

    def output_dir(self, spec: JobSpec) -> Path | None:
        if not spec.out:
            raise ConfigError("the job has no output folder", "add it again with --out DIR")
        return Path(spec.out)

    def sink(self, spec: JobSpec, handle: ImageHandle) -> Sink:
        from lpfm_toolkit.jobs.spec import marked_sink

        folder = self.output_dir(spec)
        assert folder is not None
        return marked_sink(folder, spec.compression, spec.tiff_tile, spec.name)

    def finalize(self, spec: JobSpec, result: JobResult) -> str:
        return result.uri

    def failed(self, spec: JobSpec, error: str) -> None:
        return None


def describe(kind: str) -> Any:
    """The registry entry of ``kind`` (for messages and tests)."""
    return _REGISTRY.get(kind)

"""Where results go. Sinks never modify an original: each result is a new file, entry or image.

The pipeline calls ``sink.find(key)`` first (idempotency), then ``sink.open(spec)`` and streams
full-width rows, top to bottom, into the writer; ``commit(provenance)`` finalises atomically and
``abort()`` removes every trace of a partial write. A writer that sets ``column_alignment`` also takes
vertical stripes (``write_block``): each stripe's rows top to bottom, stripes left to right, each
starting on a multiple of the alignment — then wide results never exist as full-width rows anywhere.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lpfm_toolkit.provenance import Provenance


@dataclass(frozen=True)
class OutputSpec:
    """Shape and meaning of the pixels a writer receives."""

    name: str  # human name of the result (e.g. "CMU-1 [lpfm sr×2]")
    width: int
    height: int
    channel_names: list[str]
    dtype: np.dtype
    mpp: tuple[float, float] | None  # µm per pixel of the output (source mpp / scale)
    uncertainty: bool = False  # writer also receives a float32 (H, W, 1) uncertainty row stream
    #: what file sinks name the file from (``{stem}``, ``{task}``, …: :data:`~lpfm_toolkit.sinks.ometiff.NAME_FIELDS`);
    #: ``None``: a spec made without them, named from ``name`` as before
    file_fields: dict[str, str] | None = None

    @property
    def is_rgb(self) -> bool:
        return self.channel_names == ["R", "G", "B"] and np.dtype(self.dtype) == np.uint8


@dataclass
class OutputRef:
    """Where a committed result lives."""

    uri: str  # file path, QuPath entry, omero://host/image/ID
    provenance: Provenance
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"image_id": 123, "sidecar": "..."}


class SinkWriter(abc.ABC):
    """Receives one result's rows; a context manager that aborts unless committed."""

    #: stripes must start on multiples of this many output columns; ``None``: full-width rows only
    column_alignment: int | None = None

    def write_block(self, x: int, rows: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        """Append rows ``(h, w, C)`` of the stripe starting at column ``x`` (writers with an alignment)."""
        raise NotImplementedError(f"{type(self).__name__} takes full-width rows only")

    @abc.abstractmethod
    def write_rows(self, rows: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        """Append full-width rows ``(h, W, C)`` in the spec's dtype (and ``(h, W, 1)`` float32 uncertainty)."""

    @abc.abstractmethod
    def commit(self, provenance: Provenance) -> OutputRef:
        """Finish the result and make it visible, atomically."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove everything written so far."""

    def __enter__(self) -> SinkWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


class Sink(abc.ABC):
    """A destination for results."""

    @abc.abstractmethod
    def find(self, idempotency_key: str, spec_name: str) -> OutputRef | None:
        """A result already committed for this key, if any (then the work is skipped)."""

    def find_spec(self, idempotency_key: str, spec: OutputSpec) -> OutputRef | None:
        """:meth:`find` given the whole spec (what the pipeline calls); file sinks name their files from it."""
        return self.find(idempotency_key, spec.name)

    @abc.abstractmethod
    def open(self, spec: OutputSpec, idempotency_key: str, source: dict[str, Any]) -> SinkWriter:
        """Start writing one result."""

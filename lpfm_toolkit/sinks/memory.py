"""An in-memory sink: results as numpy arrays (notebooks, tests, small regions)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lpfm_toolkit.provenance import Provenance
from lpfm_toolkit.sinks.base import OutputRef, OutputSpec, Sink, SinkWriter


class ArrayWriter(SinkWriter):
    column_alignment = 1

    def __init__(self, sink: ArraySink, key: str, spec: OutputSpec) -> None:
        self.sink, self.key, self.spec = sink, key, spec
        self._pixels = np.zeros((spec.height, spec.width, len(spec.channel_names)), spec.dtype)
        self._unc = np.zeros((spec.height, spec.width, 1), np.float32) if spec.uncertainty else None
        self._next: dict[int, int] = {}  # stripe x → next row

    def write_block(self, x: int, rows: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        y = self._next.get(x, 0)
        n, w = rows.shape[:2]
        self._pixels[y : y + n, x : x + w] = rows
        if self._unc is not None and uncertainty is not None:
            self._unc[y : y + n, x : x + w] = uncertainty
        self._next[x] = y + n

    def write_rows(self, rows: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        self.write_block(0, rows, uncertainty)

    def commit(self, provenance: Provenance) -> OutputRef:
        pixels, unc = self._pixels, self._unc
        ref = OutputRef(uri=f"memory:{self.key[:12]}", provenance=provenance,
                        extra={"pixels": pixels, "uncertainty": unc})
        self.sink.results[self.key] = ref
        return ref

    def abort(self) -> None:
        self._next.clear()


class ArraySink(Sink):
    """Keeps every committed result in ``results[key]``; ``ref.extra["pixels"]`` is the ``(H, W, C)`` array."""

    def __init__(self) -> None:
        self.results: dict[str, OutputRef] = {}

    def find(self, idempotency_key: str, spec_name: str) -> OutputRef | None:
        return self.results.get(idempotency_key)

    def open(self, spec: OutputSpec, idempotency_key: str, source: dict[str, Any]) -> ArrayWriter:
        return ArrayWriter(self, idempotency_key, spec)

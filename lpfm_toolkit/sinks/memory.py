"""An in-memory sink: results as numpy arrays (notebooks, tests, small regions)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lpfm_toolkit.provenance import Provenance
from lpfm_toolkit.sinks.base import OutputRef, OutputSpec, Sink, SinkWriter


class ArrayWriter(SinkWriter):
    def __init__(self, sink: ArraySink, key: str, spec: OutputSpec) -> None:
        self.sink, self.key, self.spec = sink, key, spec
        self._rows: list[np.ndarray] = []
        self._unc: list[np.ndarray] = []

    def write_rows(self, rows: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        self._rows.append(rows.copy())
        if uncertainty is not None:
            self._unc.append(uncertainty.copy())

    def commit(self, provenance: Provenance) -> OutputRef:
        pixels = np.concatenate(self._rows) if self._rows else np.zeros((0, self.spec.width, 0))
        unc = np.concatenate(self._unc) if self._unc else None
        ref = OutputRef(uri=f"memory:{self.key[:12]}", provenance=provenance,
                        extra={"pixels": pixels, "uncertainty": unc})
        self.sink.results[self.key] = ref
        return ref

    def abort(self) -> None:
        self._rows.clear()
        self._unc.clear()


class ArraySink(Sink):
    """Keeps every committed result in ``results[key]``; ``ref.extra["pixels"]`` is the ``(H, W, C)`` array."""

    def __init__(self) -> None:
        self.results: dict[str, OutputRef] = {}

    def find(self, idempotency_key: str, spec_name: str) -> OutputRef | None:
        return self.results.get(idempotency_key)

    def open(self, spec: OutputSpec, idempotency_key: str, source: dict[str, Any]) -> ArrayWriter:
        return ArrayWriter(self, idempotency_key, spec)

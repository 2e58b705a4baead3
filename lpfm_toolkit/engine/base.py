"""The engine contract: batches of tiles in, enhanced tiles (and optional uncertainty) out.

Engines see float32 tiles in [0, 1], shaped ``(N, H, W, C)``, and return ``(N, H·s, W·s, C_out)``
for a task of scale ``s``. Tiling, blending, reading and writing live in :mod:`lpfm_toolkit.pipeline`;
engines hold only the per-tile maths (diffusers' split of pipeline vs. model vs. scheduler).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lpfm_toolkit.errors import TaskNotSupportedError
from lpfm_toolkit.prompts import Task, TaskKind


@dataclass
class EngineOutput:
    """Enhanced tiles and, for stochastic engines, their per-pixel standard deviation."""

    pixels: np.ndarray  # (N, H*s, W*s, C_out) float32 in [0, 1]
    uncertainty: np.ndarray | None = None  # (N, H*s, W*s, 1) float32, std over samples


class Engine(abc.ABC):
    """One way of turning degraded tiles into enhanced ones."""

    name: str = "engine"
    #: tile edge and overlap the engine works best with (LPFM: 256 px tiles, 32 px overlap)
    tile_size: int = 256
    overlap: int = 32
    batch_size: int = 4

    def check(self, task: Task, channel_names: Sequence[str]) -> None:
        """Raise :class:`TaskNotSupportedError` if this engine cannot run ``task`` on these channels."""

    def output_channels(self, task: Task, channel_names: Sequence[str]) -> list[str]:
        """Channel names of the output (virtual staining turns fluorescence into R, G, B)."""
        if task.kind is TaskKind.VIRTUAL_STAIN:
            return ["R", "G", "B"]
        return list(channel_names)

    def needs_overview(self, task: Task) -> bool:
        """Whether :meth:`prepare` uses the region's overview (reading it costs time on big regions)."""
        return type(self).prepare is not Engine.prepare

    def prepare(self, task: Task, overview: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Fit whole-region statistics (e.g. stain vectors) on a low-resolution ``overview`` in [0, 1]."""

    @abc.abstractmethod
    def process(self, tiles: np.ndarray, task: Task, seeds: Sequence[int]) -> EngineOutput:
        """Enhance a batch; ``seeds[i]`` seeds any randomness of tile ``i``."""

    def describe(self) -> dict[str, Any]:
        """What determines this engine's output, for provenance and idempotency keys."""
        return {"name": self.name}


class IdentityEngine(Engine):
    """Returns its input, upsampled by pixel replication for scale-changing tasks.

    Used to prove that tiling and blending are lossless, and to measure pipeline overhead.
    """

    name = "identity"

    def needs_overview(self, task: Task) -> bool:
        return False

    def process(self, tiles: np.ndarray, task: Task, seeds: Sequence[int]) -> EngineOutput:
        s = task.scale
        out = tiles if s == 1 else tiles.repeat(s, axis=1).repeat(s, axis=2)
        return EngineOutput(np.ascontiguousarray(out, dtype=np.float32))


def unsupported(engine: str, task: Task, why: str, fix: str) -> TaskNotSupportedError:
    return TaskNotSupportedError(f"the {engine} engine cannot run {task.label}: {why}", fix)

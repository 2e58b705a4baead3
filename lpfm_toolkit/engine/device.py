"""Where and how networks run: device choice (CUDA → MPS → CPU), precision, CPU threads, batch sizes."""

from __future__ import annotations

import logging
import os
from typing import Any

from lpfm_toolkit.errors import ConfigError

log = logging.getLogger(__name__)


def select_device(requested: str | None = None) -> Any:
    """``torch.device`` to use: the requested one (checked), else CUDA, else MPS, else CPU."""
    import torch

    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {requested!r}", "use cpu, cuda, cuda:1 or mps") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was requested but CUDA is not available", "use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {requested} does not exist ({torch.cuda.device_count()} CUDA devices)")
        if device.type == "mps" and not _mps_available():
            raise ConfigError("device mps was requested but MPS is not available", "use --device cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"device {requested!r} is not supported", "use cpu, cuda or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def free_cores() -> int:
    """CPU cores this process may use that other processes are not already keeping busy."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover - Windows
        busy = 0.0
    return max(1, min(n, int(round(n - busy))))


_process_threads: int | None = None


def set_process_threads(threads: int | None) -> None:
    """The math-thread cap of this whole process (a pool or Dask worker's share of the cores).

    Engines built later with ``threads=None`` use it instead of the free cores. ``LPFM_THREADS`` is not read
    here: it reaches an engine through the settings (:class:`~lpfm_toolkit.options.EngineOptions`).
    """
    global _process_threads
    _process_threads = max(1, int(threads)) if threads else None


def process_threads() -> int | None:
    """The cap set by :func:`set_process_threads` (None: the free cores)."""
    return _process_threads


def configure_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: the process's cap, else the free cores).

    Oversubscribing cores that another process keeps busy cut throughput by an order of magnitude on
    a 2-core machine, so the default is the free cores, not all cores.
    """
    import torch

    if threads is None:
        threads = _process_threads or free_cores()
    threads = max(1, int(threads))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def autocast_dtype(device: Any) -> Any:
    """Mixed-precision dtype for inference: bf16 on CUDA GPUs that support it, else fp16; none on CPU/MPS."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cuda_batch_size(device: Any, bytes_per_tile: int, limit: int = 64) -> int:
    """Tiles per batch that fit in half of the free GPU memory (at least 1)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(limit, int(0.5 * free // max(1, bytes_per_tile))))

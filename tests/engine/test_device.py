"""Device choice CUDA → MPS → CPU, explicit overrides, CPU threads."""

from __future__ import annotations

import pytest
import torch

from lpfm_toolkit.engine import device as D
from lpfm_toolkit.errors import ConfigError


def test_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert D.select_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(D, "_mps_available", lambda: True)
    assert D.select_device().type == "mps"
    monkeypatch.setattr(D, "_mps_available", lambda: False)
    assert D.select_device().type == "cpu"


def test_explicit_device_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(D, "_mps_available", lambda: False)
    assert D.select_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        D.select_device("cuda")
    with pytest.raises(ConfigError, match="MPS is not available"):
        D.select_device("mps")
    with pytest.raises(ConfigError, match="unknown device"):
        D.select_device("gpu-please")


def test_cpu_override_wins_over_available_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert D.select_device("cpu").type == "cpu"


def test_free_cores_subtracts_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(D.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert D.free_cores() == 3
    monkeypatch.setattr(D.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert D.free_cores() == 1


def test_configure_threads_honours_the_process_cap_and_argument_not_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(D, "free_cores", lambda: 2)
    monkeypatch.setattr(D, "_process_threads", None)  # an in-process job earlier in this session may have set it
    try:
        monkeypatch.setenv("LPFM_THREADS", "1")  # read by the settings (EngineOptions), not behind their back
        assert D.configure_cpu_threads() == 2 and torch.get_num_threads() == 2
        D.set_process_threads(1)  # a pool worker's share
        assert D.process_threads() == 1
        assert D.configure_cpu_threads() == 1 and torch.get_num_threads() == 1
        assert D.configure_cpu_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        D.set_process_threads(None)
        torch.set_num_threads(before)


def test_no_autocast_on_cpu() -> None:
    assert D.autocast_dtype(torch.device("cpu")) is None


def test_cuda_batch_size_uses_half_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))
    assert D.cuda_batch_size("cuda", 1 << 28) == 16
    assert D.cuda_batch_size("cuda", 1 << 40) == 1
    assert D.cuda_batch_size("cuda", 1, limit=32) == 32

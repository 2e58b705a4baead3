"""The refiner's noise schedule travels in the bundle (scheduler/scheduler_config.json, diffusers' from_config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lpfm_toolkit.engine import bundle as B
from lpfm_toolkit.engine.models.refiner import make_scheduler
from lpfm_toolkit.errors import ModelError


def test_new_bundles_save_the_schedule_and_sampling_uses_it(tmp_path: Path, bundle_factory) -> None:
    path = bundle_factory(tmp_path / "b")
    saved = json.loads((path / B.SCHEDULER_FILE).read_text())
    assert saved["beta_schedule"] == "squaredcos_cap_v2" and saved["prediction_type"] == "sample"
    assert B.SCHEDULER_FILE in B.read_index(path)["files"]  # covered by a checksum
    assert B.verify(path) == []
    bundle = B.load_bundle(path)
    assert bundle.scheduler_config is not None
    for kind in ("ddim", "dpm"):
        from_bundle = make_scheduler(kind, config=bundle.scheduler_config)
        built_in = make_scheduler(kind)
        assert type(from_bundle) is type(built_in)
        assert torch.equal(from_bundle.alphas_cumprod, built_in.alphas_cumprod)


def test_a_bundle_trained_with_another_schedule_is_sampled_with_it(tmp_path: Path, bundle_factory) -> None:
    path = bundle_factory(tmp_path / "b")
    config = json.loads((path / B.SCHEDULER_FILE).read_text())
    config["beta_schedule"] = "linear"
    (path / B.SCHEDULER_FILE).write_text(json.dumps(config))
    index = B.read_index(path)
    index["files"][B.SCHEDULER_FILE] = B.sha256_file(path / B.SCHEDULER_FILE)
    (path / "model_index.json").write_text(json.dumps(index))
    bundle = B.load_bundle(path)
    linear = make_scheduler("dpm", config=bundle.scheduler_config)
    assert linear.config.beta_schedule == "linear"
    assert not torch.allclose(linear.alphas_cumprod, make_scheduler("dpm").alphas_cumprod)


def test_old_bundles_keep_the_built_in_schedule(tmp_path: Path, bundle_factory) -> None:
    path = bundle_factory(tmp_path / "b")
    (path / B.SCHEDULER_FILE).unlink()
    index = B.read_index(path)
    del index["files"][B.SCHEDULER_FILE]
    (path / "model_index.json").write_text(json.dumps(index))
    assert B.load_bundle(path).scheduler_config is None
    assert B.load_bundle("lpfm-tiny").scheduler_config is None  # the shipped bundle predates the file


def test_an_unlisted_or_broken_schedule_is_refused(tmp_path: Path, bundle_factory) -> None:
    path = bundle_factory(tmp_path / "b")
    index = B.read_index(path)
    del index["files"][B.SCHEDULER_FILE]
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="not covered by a checksum"):
        B.load_bundle(path)
    (path / B.SCHEDULER_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="not readable JSON"):
        B.load_bundle(path, check=False)

"""LpfmEngine: per-tile seeds make pixels independent of batching; shapes, checks, provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lpfm_toolkit.engine.base import EngineOutput
from lpfm_toolkit.engine.lpfm import LpfmEngine
from lpfm_toolkit.errors import ConfigError, TaskNotSupportedError
from lpfm_toolkit.prompts import Task, TaskKind, parse_prompt

RGB = ["R", "G", "B"]


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.random.default_rng(0).random((4, 24, 32, 3), dtype=np.float32)


def _engine(bundle: Path, **kw) -> LpfmEngine:
    return LpfmEngine.from_options(str(bundle), device="cpu", **kw)


@pytest.mark.parametrize("prompt", ["sr x2", "denoise"])
def test_same_pixels_whatever_batch_size_or_order(tiny_bundle: Path, tiles: np.ndarray, prompt: str) -> None:
    engine = _engine(tiny_bundle, steps=2, samples=2)
    task = parse_prompt(prompt)
    seeds = [101, 102, 103, 104]
    whole = engine.process(tiles, task, seeds)
    singles = [engine.process(tiles[i : i + 1], task, seeds[i : i + 1]) for i in range(4)]
    order = [2, 0, 3, 1]
    shuffled = engine.process(tiles[order], task, [seeds[i] for i in order])
    np.testing.assert_array_equal(whole.pixels, np.concatenate([s.pixels for s in singles]))
    np.testing.assert_array_equal(whole.uncertainty, np.concatenate([s.uncertainty for s in singles]))
    np.testing.assert_array_equal(whole.pixels[order], shuffled.pixels)
    again = _engine(tiny_bundle, steps=2, samples=2).process(tiles, task, seeds)
    np.testing.assert_array_equal(whole.pixels, again.pixels)


def test_seed_changes_samples_and_uncertainty_has_right_shape(tiny_bundle: Path, tiles: np.ndarray) -> None:
    engine = _engine(tiny_bundle, steps=2, samples=3)
    task = Task(TaskKind.SUPER_RESOLUTION, scale=2)
    a = engine.process(tiles[:1], task, [1])
    b = engine.process(tiles[:1], task, [2])
    assert isinstance(a, EngineOutput)
    assert a.pixels.shape == (1, 48, 64, 3) and a.pixels.dtype == np.float32
    assert a.uncertainty is not None and a.uncertainty.shape == (1, 48, 64, 1)
    assert (a.uncertainty >= 0).all() and a.uncertainty.max() > 0
    assert not np.array_equal(a.pixels, b.pixels)
    assert 0 <= a.pixels.min() and a.pixels.max() <= 1


def test_steps_zero_is_deterministic_restorer_only(tiny_bundle: Path, tiles: np.ndarray) -> None:
    engine = _engine(tiny_bundle, steps=0, samples=4)
    out1 = engine.process(tiles, Task(TaskKind.DEBLUR), [1, 2, 3, 4])
    out2 = engine.process(tiles, Task(TaskKind.DEBLUR), [5, 6, 7, 8])
    assert out1.uncertainty is None
    np.testing.assert_array_equal(out1.pixels, out2.pixels)
    assert engine.describe()["samples"] == 1 and engine.describe()["sampler"] == "none"


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_super_resolution_output_sizes(tiny_bundle: Path, scale: int) -> None:
    engine = _engine(tiny_bundle, steps=0)
    out = engine.process(np.full((1, 10, 12, 3), 0.5, np.float32), Task(TaskKind.SUPER_RESOLUTION, scale=scale), [0])
    assert out.pixels.shape == (1, 10 * scale, 12 * scale, 3)


def test_dpm_solver_sampler_runs(tiny_bundle: Path, tiles: np.ndarray) -> None:
    from lpfm_toolkit.engine.bundle import load_bundle

    engine = LpfmEngine(load_bundle(tiny_bundle), device="cpu", steps=3, samples=2, sampler="dpm")
    out = engine.process(tiles[:1], Task(TaskKind.DENOISE), [9])
    assert out.pixels.shape == (1, 24, 32, 3) and np.isfinite(out.pixels).all()
    assert engine.describe()["sampler"] == "dpm"


def test_describe_names_bundle_and_checksum(tiny_bundle: Path) -> None:
    from lpfm_toolkit.engine.bundle import load_bundle

    d = _engine(tiny_bundle, steps=2, samples=2).describe()
    assert d["name"] == "lpfm" and d["model"] == "tiny-test"
    assert d["model_sha256"] == load_bundle(tiny_bundle).sha256 and len(d["model_sha256"]) == 64
    expected = {"steps": 2, "samples": 2, "sampler": "ddim", "device": "cpu", "dtype": "float32"}
    assert {k: d[k] for k in expected} == expected


def test_default_steps_come_from_the_bundle(tiny_bundle: Path) -> None:
    assert _engine(tiny_bundle).steps == 2


def test_check_refuses_untrained_tasks_and_wrong_channels(tiny_bundle: Path) -> None:
    engine = _engine(tiny_bundle, steps=0)
    engine.check(parse_prompt("sr x4"), RGB)
    with pytest.raises(TaskNotSupportedError, match="not trained"):
        engine.check(parse_prompt("AF -> H&E"), ["AF"])
    with pytest.raises(TaskNotSupportedError, match="3-channel"):
        engine.check(parse_prompt("denoise"), ["DAPI", "FITC"])


def test_bad_options_are_config_errors(tiny_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="samples"):
        _engine(tiny_bundle, samples=0)
    with pytest.raises(ConfigError, match="steps"):
        _engine(tiny_bundle, steps=-1)


def test_runs_through_the_pipeline_with_provenance(tiny_bundle: Path, sample_slide: Path) -> None:
    from lpfm_toolkit.pipeline import plan, run_item
    from lpfm_toolkit.sinks.memory import ArraySink
    from lpfm_toolkit.sources import open_image
    from lpfm_toolkit.sources.base import Region

    engine = _engine(tiny_bundle, steps=1, samples=2)
    task = parse_prompt("sr x2")
    with open_image(sample_slide) as handle:
        (item,) = plan(handle, task, region=Region(600, 900, 90, 70), seed=7)
        sink = ArraySink()
        result = run_item(handle, item, engine, sink, tile_size=48, overlap=8, samples_uncertainty=True)
        again = run_item(handle, item, _engine(tiny_bundle, steps=1, samples=2), ArraySink(), tile_size=48,
                         overlap=8, samples_uncertainty=True)
    px = result.output.extra["pixels"]
    assert px.shape == (140, 180, 3)
    np.testing.assert_array_equal(px, again.output.extra["pixels"])
    unc = result.output.extra["uncertainty"]
    assert unc is not None and unc.shape[:2] == (140, 180) and unc.max() > 0
    text = str(result.provenance.to_dict())
    assert engine.describe()["model_sha256"] in text


def test_samples_without_steps_use_the_bundles_refine_steps(tiny_bundle: Path) -> None:
    from lpfm_toolkit.engine.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    bundle.index = {**bundle.index, "default_steps": 0, "refine_steps": 3}
    assert LpfmEngine(bundle, device="cpu").steps == 0
    assert LpfmEngine(bundle, device="cpu", samples=4).steps == 3
    assert LpfmEngine(bundle, device="cpu", samples=4, steps=0).steps == 0

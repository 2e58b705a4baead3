"""Training: the model learns, resume is exact, the smoke recipe produces a verified bundle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lpfm_toolkit.engine import train as T
from lpfm_toolkit.engine.bundle import load_bundle, verify


@pytest.fixture(scope="module")
def bank(sample_slide: Path) -> T.TileBank:
    return T.TileBank.from_paths([sample_slide], holdout=0.2)


def test_holdout_band_is_disjoint_and_at_the_bottom(bank: T.TileBank) -> None:
    (train,), (val,) = bank.train, bank.val
    assert train.shape[0] + val.shape[0] == 2967 and val.shape[0] == 593
    crops = bank.crops(4, 32, np.random.default_rng(0), split="val")
    assert crops.shape == (4, 3, 32, 32) and 0 <= float(crops.min()) and float(crops.max()) <= 1


def test_a_tiny_restorer_learns_to_denoise(bank: T.TileBank, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = replace(T.RECIPES["smoke"], crop=32, batch=8, restorer_steps=250, lr=2e-3, validate_every=250,
                     checkpoint_every=250, task_weights={"denoise": 1.0},
                     restorer={"channels": [16, 32], "blocks": [1, 1]})
    model = T.train_restorer(bank, config, tmp_path, resume=False)
    records = [r for r in map(eval_json, (tmp_path / "restorer" / "log.jsonl").read_text().splitlines())]
    final = records[-1]
    assert final["step"] == 250
    # denoising σ 10–50 on held-out crops: the network must beat its own noisy input clearly
    assert final["val_denoise_psnr"] > final["val_denoise_input_psnr"] + 3.0, final
    assert model.training is False


def eval_json(line: str) -> dict:
    import json

    return json.loads(line)


def test_resume_continues_exactly(bank: T.TileBank, tmp_path: Path) -> None:
    config = replace(T.RECIPES["smoke"], restorer_steps=6, checkpoint_every=3, validate_every=100)
    straight = T.train_restorer(bank, config, tmp_path / "a", resume=False)
    T.train_restorer(bank, replace(config, restorer_steps=3), tmp_path / "b", resume=False)
    resumed = T.train_restorer(bank, config, tmp_path / "b", resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_smoke_recipe_writes_a_verified_bundle(sample_slide: Path, tmp_path: Path) -> None:
    config = T.recipe("smoke", images=[str(sample_slide)])
    seen: list[str] = []
    out = T.train(config, tmp_path / "work", out=tmp_path / "bundle", name="smoke-test",
                  progress=lambda stage, step, total, values: seen.append(stage))
    assert out is not None and verify(out) == []
    assert {"encoder", "restorer", "refiner"} <= set(seen)
    bundle = load_bundle(out)
    assert bundle.name == "smoke-test" and "sr4" in bundle.tasks
    card = (out / "MODEL_CARD.md").read_text()
    assert "cmu_small_region.svs" in card and "holdout" in card


def test_unknown_recipe_and_stage_are_config_errors(tmp_path: Path) -> None:
    from lpfm_toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown recipe"):
        T.recipe("huge")
    with pytest.raises(ConfigError, match="unknown stages"):
        T.train(T.recipe("smoke"), tmp_path, stages=["decoder"])


def _write_pairs(folder: Path, n: int = 2, size: int = 48) -> None:
    """Synthetic registered pairs: one fluorescence channel → an H&E-like false colouring of it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "source").mkdir(parents=True)
    (folder / "target").mkdir(parents=True)
    for i in range(n):
        f = rng.random((size, size)).astype(np.float32)
        rgb = np.stack([1 - 0.3 * f, 1 - 0.8 * f, 1 - 0.4 * f], axis=-1)
        Image.fromarray((f * 255).astype(np.uint8)).save(folder / "source" / f"p{i}.png")
        Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / "target" / f"p{i}.png")


def test_virtual_staining_trains_from_pairs_and_runs(tmp_path: Path) -> None:
    from lpfm_toolkit.engine.lpfm import LpfmEngine
    from lpfm_toolkit.errors import TaskNotSupportedError
    from lpfm_toolkit.prompts import parse_prompt

    _write_pairs(tmp_path / "pairs")
    config = replace(T.RECIPES["smoke"], pairs=str(tmp_path / "pairs"), restorer_steps=60, lr=3e-3,
                     checkpoint_every=60)
    out = T.train_stain_bundle(config, tmp_path / "work", tmp_path / "bundle", "af-he", "AF", "H&E")
    losses = [eval_json(line)["loss"] for line in (tmp_path / "work" / "stain" / "log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert verify(out) == []
    engine = LpfmEngine.from_options(str(out), device="cpu")
    task = parse_prompt("AF -> H&E")
    engine.check(task, ["AF"])
    with pytest.raises(TaskNotSupportedError, match="translates AF→H&E"):
        engine.check(parse_prompt("H&E -> PAS"), ["R", "G", "B"])
    res = engine.process(np.random.default_rng(1).random((1, 32, 32, 1), dtype=np.float32), task, [0])
    assert res.pixels.shape == (1, 32, 32, 3)
    assert engine.output_channels(task, ["AF"]) == ["R", "G", "B"]


def test_pairs_folder_must_be_registered(tmp_path: Path) -> None:
    from PIL import Image

    from lpfm_toolkit.errors import ConfigError

    _write_pairs(tmp_path / "pairs", n=1)
    Image.new("RGB", (20, 20)).save(tmp_path / "pairs" / "target" / "p0.png")
    with pytest.raises(ConfigError, match="registered to the same size"):
        T.read_pairs(tmp_path / "pairs")
    with pytest.raises(ConfigError, match="source/"):
        T.read_pairs(tmp_path)


def test_wall_time_budget_stops_early_and_checkpoints(bank: T.TileBank, tmp_path: Path) -> None:
    config = replace(T.RECIPES["smoke"], restorer_steps=10_000, max_minutes=0.02, validate_every=10_000)
    T.train_restorer(bank, config, tmp_path, resume=False)
    records = [eval_json(line) for line in (tmp_path / "restorer" / "log.jsonl").read_text().splitlines()]
    assert 0 < records[-1]["step"] < 10_000 and records[-1].get("final") is True
    assert "val_sr2_psnr" in records[-1]
    assert (tmp_path / "restorer" / "checkpoint.safetensors").is_file()
    assert (tmp_path / "restorer" / "final" / "model.safetensors").is_file()


def test_large_slides_are_sampled_as_tissue_regions(sample_slide: Path) -> None:
    regions = T.slide_regions(sample_slide, max_pixels=4 * 256 * 256, region=256, seed=1)
    assert len(regions) == 4 and all(r.shape == (256, 256, 3) for r in regions)
    assert all(T.is_tissue(r) for r in regions)
    again = T.slide_regions(sample_slide, max_pixels=4 * 256 * 256, region=256, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(regions, again))
    (whole,) = T.slide_regions(sample_slide)
    assert whole.shape == (2967, 2220, 3)

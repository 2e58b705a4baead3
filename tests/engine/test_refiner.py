"""The refiner's space-to-depth option: shapes, tile multiples, and bundles written before the option existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from lpfm_toolkit.engine.models.refiner import Refiner, RefinerConfig  # noqa: E402

SMALL = {"block_out_channels": [8, 16], "norm_num_groups": 4, "feature_dim": 16}


def _inputs(size: int, n: int = 2) -> tuple:
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn((n, 3, size, size), generator=g)
    restored = torch.rand((n, 3, size, size), generator=g)
    return noisy, torch.tensor([10, 900][:n]), restored, torch.tensor([0, 4][:n]), torch.randn((n, 16), generator=g)


@pytest.mark.parametrize("unshuffle", [1, 2, 4])
def test_output_has_the_input_shape_and_multiple_counts_the_unshuffle(unshuffle: int) -> None:
    torch.manual_seed(0)
    model = Refiner(**SMALL, unshuffle=unshuffle).eval()
    assert model.multiple == unshuffle * 2
    assert model.unet.config.in_channels == 6 * unshuffle**2
    size = 2 * model.multiple
    with torch.no_grad():
        out = model(*_inputs(size))
    assert out.shape == (2, 3, size, size)
    assert torch.isfinite(out).all()


def test_unshuffled_output_depends_on_every_pixel_position() -> None:
    """Pixel (un)shuffle must route each input position to its own output position, not blur them together."""
    torch.manual_seed(0)
    model = Refiner(**SMALL, unshuffle=2).eval()
    noisy, t, restored, task, feats = _inputs(8, n=1)
    with torch.no_grad():
        base = model(noisy, t, restored, task, feats)
        bumped = noisy.clone()
        bumped[..., 3, 5] += 1.0
        moved = model(bumped, t, restored, task, feats)
    changed = (moved - base).abs().sum(dim=1)[0]
    assert changed[3, 5] > 0
    assert changed.shape == (8, 8)


def test_bad_unshuffle_is_rejected() -> None:
    with pytest.raises(ValueError, match="unshuffle"):
        Refiner(**SMALL, unshuffle=0)


def test_config_without_unshuffle_loads_as_full_resolution(tmp_path: Path) -> None:
    """Bundles written before ``unshuffle`` existed have no such key: they load as the old full-resolution UNet."""
    from lpfm_toolkit.engine.bundle import load_component, save_component

    torch.manual_seed(0)
    old = Refiner(**SMALL).eval()
    save_component(tmp_path / "refiner", old)
    meta = json.loads((tmp_path / "refiner" / "config.json").read_text())
    del meta["config"]["unshuffle"]
    (tmp_path / "refiner" / "config.json").write_text(json.dumps(meta))
    loaded = load_component(tmp_path / "refiner", "refiner")
    assert loaded.config.unshuffle == 1 == RefinerConfig().unshuffle
    with torch.no_grad():
        assert torch.equal(loaded(*_inputs(8)), old(*_inputs(8)))


def test_engine_refines_tiles_not_divisible_by_the_multiple(tmp_path: Path, components_factory) -> None:
    """The engine pads to ``multiple`` (here 8) and crops back, so any tile size works."""
    import numpy as np

    from lpfm_toolkit.engine.bundle import load_bundle, write_bundle
    from lpfm_toolkit.engine.lpfm import LpfmEngine
    from lpfm_toolkit.prompts import Task, TaskKind

    components = components_factory(0)
    torch.manual_seed(0)
    components["refiner"] = Refiner(**SMALL, unshuffle=4)
    path = write_bundle(tmp_path / "b", name="u4", components=components, dtype="float32",
                        tasks=["denoise"], training={"note": "untrained"})
    engine = LpfmEngine(load_bundle(path), device="cpu", steps=2, samples=2)
    assert engine.refiner.multiple == 8
    tiles = np.random.default_rng(0).random((1, 21, 19, 3), dtype=np.float32)
    out = engine.process(tiles, Task(TaskKind.DENOISE), [7])
    assert out.pixels.shape == (1, 21, 19, 3)
    assert out.uncertainty is not None and out.uncertainty.shape == (1, 21, 19, 1)
    assert float(out.uncertainty.mean()) > 0

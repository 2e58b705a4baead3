"""Issue 11: auto→classical fallback, encoder conditioning, --tta, the learned stainer, tuned baselines,
fluorescence and IHC simulation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lpfm_toolkit.engine import bundle as B  # noqa: E402
from lpfm_toolkit.prompts import parse_prompt  # noqa: E402


def _conditioned_bundle(path: Path, stainer: bool = False) -> Path:
    from lpfm_toolkit.engine.models.encoder import StainEncoder
    from lpfm_toolkit.engine.models.refiner import Refiner
    from lpfm_toolkit.engine.models.restorer import Restorer

    torch.manual_seed(0)
    restorer = Restorer(channels=[8, 16], blocks=[1, 1], extra_cond_dim=16)
    torch.nn.init.normal_(restorer.tail.weight, std=0.05)
    torch.nn.init.normal_(restorer.extra_proj.weight, std=0.5)
    for block in restorer.dec:
        torch.nn.init.normal_(block.film.weight, std=0.5)
    comps = {
        "restorer": restorer,
        "encoder": StainEncoder(channels=[8, 16], feature_dim=16, projection_dim=8),
        "refiner": Refiner(block_out_channels=[8, 16], norm_num_groups=4, feature_dim=16),
    }
    tasks = ["sr2", "sr4", "sr8", "deblur", "denoise", "restore"]
    stains = None
    if stainer:
        comps["stainer"] = Restorer(channels=[8, 16], blocks=[1, 1], in_channels=2, out_channels=3, residual=False)
        tasks.append("virtual_stain")
        stains = {"source": ["fluorescence", "AF"], "target": "H&E"}
    return B.write_bundle(path, name="cond-test", components=comps, dtype="float32", tasks=tasks, stains=stains)


def test_auto_runs_classical_for_tasks_the_default_bundle_lacks(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from lpfm_toolkit import engine as E
    from lpfm_toolkit.engine import lpfm as L
    from lpfm_toolkit.engine.classical import ClassicalEngine

    shipped = tmp_path / "bundles"
    shutil.copytree(tiny_bundle, shipped / B.DEFAULT_BUNDLE)
    monkeypatch.setattr(B, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(L, "SHIPPED_DIR", shipped)
    for prompt in ("AF -> H&E", "normalize stain"):
        task = parse_prompt(prompt)
        assert not B.trained_for(task)
        assert E.default_engine_name(task) == "classical"
        assert isinstance(E.get_engine("auto", task=task), ClassicalEngine)
    assert E.default_engine_name(parse_prompt("denoise")) == "lpfm"
    assert E.default_engine_name() == "lpfm"
    # a bundle trained for virtual staining of fluorescence/AF keeps AF → H&E on the learned engine
    _conditioned_bundle(tmp_path / "vs", stainer=True)
    assert B.trained_for(parse_prompt("AF -> H&E"), tmp_path / "vs")
    assert not B.trained_for(parse_prompt("normalize stain"), tmp_path / "vs")
    # the learned stainer takes two channels: one-channel autofluorescence stays classical under auto
    assert B.trained_for(parse_prompt("AF -> H&E"), tmp_path / "vs", channels=2)
    assert not B.trained_for(parse_prompt("AF -> H&E"), tmp_path / "vs", channels=1)
    assert not B.trained_for(parse_prompt("denoise"), tmp_path / "vs", channels=1)
    assert E.default_engine_name(parse_prompt("denoise"), channels=1) == "classical"
    assert not B.trained_for(parse_prompt("denoise"), tmp_path / "missing")


def test_encoder_conditioned_restorer_uses_the_features(tmp_path: Path) -> None:
    from lpfm_toolkit.engine.lpfm import LpfmEngine

    engine = LpfmEngine.from_options(model=str(_conditioned_bundle(tmp_path / "c")), steps=0)
    task = parse_prompt("denoise")
    tiles = np.random.default_rng(0).random((1, 32, 32, 3)).astype(np.float32)
    with_feats = engine.process(tiles, task, [0]).pixels
    engine.condition_on_encoder = False
    without = engine.process(tiles, task, [0]).pixels
    assert with_feats.shape == without.shape == (1, 32, 32, 3)
    assert np.abs(with_feats - without).max() > 1e-4


def test_tta_is_equivariant_and_recorded(tmp_path: Path, tiny_bundle: Path) -> None:
    from lpfm_toolkit.engine.lpfm import LpfmEngine

    plain = LpfmEngine.from_options(model=str(tiny_bundle), steps=0)
    tta = LpfmEngine.from_options(model=str(tiny_bundle), steps=0, tta=True)
    task = parse_prompt("super-resolution x2")
    x = np.random.default_rng(1).random((1, 24, 24, 3)).astype(np.float32)
    a = tta.process(x, task, [0]).pixels[0]
    b = tta.process(np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2))), task, [0]).pixels[0]
    assert np.allclose(np.rot90(a, 1, axes=(0, 1)), b, atol=1e-5)  # the 8-fold average commutes with rotation
    p = plain.process(x, task, [0]).pixels[0]
    assert np.abs(a - p).max() > 1e-6
    assert tta.describe()["tta"] is True and "tta" not in plain.describe()


def test_learned_stainer_runs_two_channel_fluorescence(tmp_path: Path) -> None:
    from lpfm_toolkit.engine.lpfm import LpfmEngine
    from lpfm_toolkit.errors import TaskNotSupportedError

    engine = LpfmEngine.from_options(model=str(_conditioned_bundle(tmp_path / "s", stainer=True)), steps=2)
    task = parse_prompt("AF -> H&E")
    engine.check(task, ["nuclear", "AF"])
    with pytest.raises(TaskNotSupportedError, match="2 fluorescence channels"):
        engine.check(task, ["R", "G", "B"])
    assert engine.needs_overview(task)
    fluo = np.random.default_rng(2).random((2, 32, 32, 2)).astype(np.float32) * 0.3
    engine.prepare(task, fluo[0])
    out = engine.process(fluo, task, [0, 1])
    assert out.pixels.shape == (2, 32, 32, 3) and out.uncertainty is None  # no refinement for staining
    assert engine.output_channels(task, ["nuclear", "AF"]) == ["R", "G", "B"]


def test_tuned_baselines_use_the_truth() -> None:
    from lpfm_toolkit.engine import degrade as G
    from lpfm_toolkit.engine import evaluate as E

    labels = [c.label for c in E.tuned_candidates("denoise", G.Degradation(noise_sigma=31))]
    assert "tuned:bm3d true σ" in labels and "classical:bm3d σ estimated" in labels
    assert any(lab.startswith("tuned:nlm") for lab in labels)
    rng = np.random.default_rng(3)
    from scipy import ndimage

    clean = ndimage.gaussian_filter(rng.random((40, 40, 3)), (2, 2, 0)) * 0.8 + 0.1
    noisy = np.clip(clean + rng.standard_normal(clean.shape) * 31 / 255, 0, 1).astype(np.float32)
    task = parse_prompt("denoise")
    for cand in E.tuned_candidates("denoise", G.Degradation(noise_sigma=31)):
        if "bm3d" in cand.label:
            out = cand.engine.process(noisy[None], task, [0]).pixels[0]
            assert E.psnr(out, clean) > E.psnr(noisy, clean) + 3, cand.label
    d = G.Degradation(kernel_size=11, sigma_x=2.0, sigma_y=1.5, theta=0.5)
    blurred = d.apply(torch.from_numpy(clean.astype(np.float32)).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    wiener = [c for c in E.tuned_candidates("deblur", d) if "wiener" in c.label]
    best = max(E.psnr(c.engine.process(blurred[None], parse_prompt("deblur"), [0]).pixels[0], clean) for c in wiener)
    assert best > E.psnr(blurred, clean) + 1
    assert [c.label for c in E.tuned_candidates("sr2", None)] == ["tuned:spline"]


def test_fluorescence_simulation_follows_the_stains() -> None:
    from lpfm_toolkit.engine.fluorescence import normalise_fluorescence, simulate_fluorescence
    from lpfm_toolkit.engine.models.encoder import hed_to_rgb, rgb_to_hed, simulate_ihc

    g = torch.Generator().manual_seed(0)
    fields = torch.nn.functional.interpolate(torch.rand(2, 2, 8, 8, generator=g), size=(48, 48), mode="bicubic")
    hed = torch.zeros(2, 3, 48, 48)
    hed[:, 0] = fields[:, 0].clamp(0, 1) * 0.9  # independent haematoxylin and eosin maps
    hed[:, 1] = fields[:, 1].clamp(0, 1) * 0.6
    rgb = hed_to_rgb(hed)
    fluo = simulate_fluorescence(rgb, g, noise=False)
    assert fluo.shape == (2, 2, 48, 48) and float(fluo.min()) >= 0 and float(fluo.max()) <= 1

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    for i in range(2):
        assert corr(fluo[i, 0], hed[i, 0]) > corr(fluo[i, 0], hed[i, 1]) + 0.3  # nuclear channel follows H
        assert corr(fluo[i, 1], hed[i, 1]) > corr(fluo[i, 1], hed[i, 0]) + 0.3  # cytoplasm channel follows E
    noisy = simulate_fluorescence(rgb, torch.Generator().manual_seed(0))
    assert float((noisy - fluo).abs().mean()) > 0
    assert float(torch.quantile(normalise_fluorescence(fluo).flatten(2), 0.995, dim=2).max()) <= 0.76
    ihc = simulate_ihc(rgb, torch.Generator().manual_seed(1))
    dab = rgb_to_hed(ihc)[:, 2]
    assert ihc.shape == rgb.shape and float(dab.max()) > 0.3 and float(rgb_to_hed(rgb)[:, 2].abs().max()) < 0.05


def test_zoomed_crops_and_stain_augmentation_are_seeded() -> None:
    from lpfm_toolkit.engine import train as T

    rng = np.random.default_rng(0)
    img = np.clip(rng.random((200, 200, 3)) * 0.6 + 0.2, 0, 1).astype(np.float32)
    bank = T.TileBank([img], holdout=0.2)
    cfg = T.recipe("smoke")

    def batch(step: int) -> torch.Tensor:
        r, g = T.batch_rng(0, step, 1)
        c = bank.crops(4, 32, r, zoom=(1.0, 2.0))
        return T.stain_augment(c, cfg, r, g)

    a, b = batch(3), batch(3)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, batch(4))
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert T._wanted_stages(cfg) == ("encoder", "restorer", "stainer", "refiner")
    assert "stainer" not in T._wanted_stages(T.recipe("tiny"))
    assert "stainer" in T._wanted_stages(T.recipe("tiny-blind"))


def test_blind_pairs_are_the_network_inputs_of_each_task() -> None:
    from lpfm_toolkit.engine import train as T

    clean = torch.rand(3, 3, 32, 32) * 0.5 + 0.25
    g = torch.Generator().manual_seed(0)
    x = T.degraded_pairs(clean, ["sr4", "denoise", "deblur"], g, blind=True)
    assert x.shape == clean.shape  # SR inputs come back cubic-upsampled to the clean size
    y = T.degraded_pairs(clean, ["sr4", "denoise", "deblur"], torch.Generator().manual_seed(0), blind=True)
    assert torch.equal(x, y)
    assert float((x - clean).abs().mean()) > 0.005

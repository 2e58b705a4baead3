"""The learned degradation estimator: shipped as safetensors, loaded without pickle, trained on training
sources only, and scored on tissue from other scanners and stains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lpfm_toolkit.engine.estimate_learned import (
    ESTIMATOR_DIR,
    N_BANDS,
    N_SPECTRAL,
    LearnedEstimator,
    tile_features,
    train,
    training_set,
)
from lpfm_toolkit.engine.estimate_synthetic import (
    degrade_region,
    score_estimates,
    source_tissue,
    synthetic_slide,
    tissue_mosaic,
)
from lpfm_toolkit.errors import ModelError
from lpfm_toolkit.pipeline import to_float

pytestmark = pytest.mark.qc


@pytest.fixture(scope="module")
def eval_tissue() -> list[np.ndarray]:
    return list(source_tissue("eval").values())


def test_shipped_estimator_is_safetensors_with_its_checksum() -> None:
    files = sorted(p.name for p in ESTIMATOR_DIR.iterdir())
    assert files == ["config.json", "model.safetensors"]  # nothing pickled
    cfg = json.loads((ESTIMATOR_DIR / "config.json").read_text())
    assert cfg["class"] == "EstimatorMLP" and len(cfg["sha256"]) == 64
    # trained on the training split only: no evaluation image among its sources
    assert not set(cfg["training"]["data"]) & set(source_tissue("eval"))
    est = LearnedEstimator.load()
    assert est.describe() == {"name": "learned", "sha256": cfg["sha256"]}


def test_damaged_weights_are_refused(tmp_path: Path) -> None:
    folder = shutil.copytree(ESTIMATOR_DIR, tmp_path / "estimator")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match the sha256"):
        LearnedEstimator.load(folder)
    with pytest.raises(ModelError, match="no learned estimator"):
        LearnedEstimator.load(tmp_path / "nowhere")


def test_sources_are_split_by_file() -> None:
    train, held_out = source_tissue("train"), source_tissue("eval")
    assert not set(train) & set(held_out) and len(held_out) == 3
    for img in held_out.values():  # 40× scans brought to 0.5 µm/px
        assert img.dtype == np.uint8 and img.shape[2] == 3 and max(img.shape[:2]) <= 1000


def test_spectral_features_ignore_the_tissue_contrast(eval_tissue: list[np.ndarray]) -> None:
    """The spectrum's shape (what the blur estimate reads) is the same for a paler copy of the tile."""
    tile = to_float(eval_tissue[1][200:456, 300:556])
    pale = 0.5 + 0.5 * (tile - 0.5)
    f, tissue, _ = tile_features(tile)
    g, *_ = tile_features(pale)
    assert f.shape == (N_SPECTRAL,) and tissue > 0.5
    np.testing.assert_allclose(f[: N_BANDS + 1], g[: N_BANDS + 1], atol=1e-3)
    assert g[N_BANDS + 1] < f[N_BANDS + 1] - 0.5  # the level itself drops (log10 of a quarter the power)


def test_learned_blur_follows_sigma_under_noise(eval_tissue: list[np.ndarray]) -> None:
    """On a tissue crop of a scanner it never saw, the blur estimate grows with σ, with σ 25 noise on top."""
    clean = eval_tissue[2][300:600, 300:600]
    rng = np.random.default_rng(0)
    est = LearnedEstimator.load()
    tiles = [to_float(degrade_region(clean, (22, 22, 256, 256), s, 25.0, 0, rng)) for s in (0.0, 1.5, 2.5, 4.0)]
    blur = [e.blur_sigma for e in est.estimate(tiles)]
    assert blur == sorted(blur) and blur[0] < 1.8 < blur[1], blur


def test_learned_estimator_detects_each_defect_on_other_scanners(eval_tissue: list[np.ndarray]) -> None:
    s = synthetic_slide(
        tissue_mosaic(eval_tissue, 1536, 1536, seed=9, patch=256),
        seed=9,
        block=1,
        p_blur=0.35,
        p_noise=0.35,
        p_jpeg=0.3,
    )
    tiles = [to_float(s.image[t.y : t.y + t.size, t.x : t.x + t.size]) for t in s.truth]
    scores = score_estimates(s.truth, LearnedEstimator.load().estimate(tiles))
    for defect in ("blur", "noise", "jpeg"):
        assert scores[defect]["auc"] >= 0.9, (defect, scores[defect])
    assert scores["fpr_any_clean"] <= 0.1


def test_training_round_trip(tmp_path: Path) -> None:
    """A few steps on labelled crops of the training sources; save and load give the same estimates."""
    import torch

    torch.set_num_threads(1)
    sources = [img[:600, :600] for img in source_tissue("train").values()][:2]
    data = training_set(sources, 6, crops=(64,), seed=3)
    assert data["f"].shape == (6, N_SPECTRAL) and data["y"].shape == (6, 3)
    assert np.isfinite(data["f"]).all() and (data["y"] >= 0).all()
    est = train(data, steps=2, batch=4)
    est.save(tmp_path / "est")
    again = LearnedEstimator.load(tmp_path / "est")
    x = [to_float(sources[0][:64, :64]), to_float(sources[1][300:428, 300:396])]  # tiles of different shapes
    a, b = est.estimate(x), again.estimate(x)
    assert len(a) == 2 and a[1].tissue > 0.25
    np.testing.assert_array_equal([list(e.to_dict().values()) for e in a], [list(e.to_dict().values()) for e in b])


def test_a_40x_scan_as_scanned_is_not_called_blurry() -> None:
    """Clean tissue at 0.23 µm/px spans more pixels: the classical σ reads its own point-spread function as
    blur (about half the tiles over 1.8 px); the learned estimator, trained at random scales, flags none."""
    from lpfm_toolkit.engine.estimate import ClassicalEstimator
    from lpfm_toolkit.engine.estimate_synthetic import TRAINING_DATA, _read_source

    img = _read_source(TRAINING_DATA / "eval" / "openslide-OS-2-Ki67-hamamatsu.ome.tif", 1.0)  # not resampled
    tiles = [to_float(img[y : y + 256, x : x + 256]) for y in (256, 1024, 1792) for x in (256, 1024, 1792)]
    learned = LearnedEstimator.load().estimate(tiles)
    classical = ClassicalEstimator().estimate(tiles)
    judged = [i for i, e in enumerate(classical) if e.tissue >= 0.25]
    assert len(judged) >= 5
    assert not any(learned[i].flags()["out_of_focus"] for i in judged)
    assert sum(classical[i].flags()["out_of_focus"] for i in judged) >= 2  # the case the learned one fixes

"""The learned degradation estimator: shipped as safetensors, loaded without pickle, trained on the blind model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lpfm_toolkit.engine.estimate_learned import ESTIMATOR_DIR, LearnedEstimator, train, training_set
from lpfm_toolkit.engine.estimate_synthetic import sample_tissue, score_estimates, synthetic_slide, tissue_mosaic
from lpfm_toolkit.errors import ModelError
from lpfm_toolkit.pipeline import to_float

pytestmark = pytest.mark.qc


def test_shipped_estimator_is_safetensors_with_its_checksum() -> None:
    files = sorted(p.name for p in ESTIMATOR_DIR.iterdir())
    assert files == ["config.json", "model.safetensors"]  # nothing pickled
    cfg = json.loads((ESTIMATOR_DIR / "config.json").read_text())
    assert cfg["class"] == "EstimatorNet" and len(cfg["sha256"]) == 64
    assert cfg["training"]["degradations"].startswith("blind_degrade")
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


def test_learned_estimator_detects_each_defect_on_held_out_tissue() -> None:
    s = synthetic_slide(
        tissue_mosaic(sample_tissue("holdout"), 1536, 1536, seed=9),
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
    """A few steps on labels from the blind degradation model; save and load give the same estimates."""
    import torch

    torch.set_num_threads(1)
    data = training_set(sample_tissue("train"), 6, crop=64, seed=3)
    assert data["x"].shape == (6, 64, 64, 3) and data["f"].shape == (6, 6) and data["y"].shape == (6, 3)
    assert np.isfinite(data["f"]).all() and (data["y"] >= 0).all()
    est = train(data, steps=2, batch=4)
    est.save(tmp_path / "est")
    again = LearnedEstimator.load(tmp_path / "est")
    x = data["x"][:2]
    assert [e.to_dict() for e in est.estimate(x)] == [e.to_dict() for e in again.estimate(x)]

"""The degradation estimator and ``lpfm qc`` on real tissue from the sample slide with known defects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from lpfm_toolkit.engine.estimate import ClassicalEstimator, Thresholds, estimate_jpeg, luminance, tissue_mask
from lpfm_toolkit.engine.estimate_synthetic import (
    jpeg_roundtrip,
    roc_auc,
    sample_tissue,
    score_estimates,
    synthetic_slide,
    tissue_mosaic,
)
from lpfm_toolkit.pipeline import to_float
from lpfm_toolkit.sources import Region, open_image

pytestmark = pytest.mark.qc


@pytest.fixture(scope="module")
def tissue_tile(sample_slide: Path) -> np.ndarray:
    """A dense tissue tile (8-bit) from the sample slide."""
    with open_image(sample_slide) as h:
        return h.read_region(0, 1000, 1300, 256, 256)


@pytest.fixture(scope="module")
def synthetic() -> object:
    """A 1536² slide of held-out real tissue with pasted blur, noise and JPEG regions (36 tiles)."""
    clean = tissue_mosaic(sample_tissue("holdout"), 1536, 1536, seed=7)
    return synthetic_slide(clean, seed=7, block=1, p_blur=0.35, p_noise=0.35, p_jpeg=0.3)


def test_clean_tissue_is_not_flagged(tissue_tile: np.ndarray) -> None:
    e = ClassicalEstimator().estimate_tile(to_float(tissue_tile))
    assert e.tissue > 0.9
    assert e.flags() == {"out_of_focus": False, "noisy": False, "compressed": False}
    assert 0.3 < e.blur_sigma < 1.5 and e.noise_sigma < 5 and e.jpeg_quality == 100


def test_blur_sigma_follows_the_true_blur(tissue_tile: np.ndarray) -> None:
    est = ClassicalEstimator()
    clean = to_float(tissue_tile)
    sigmas = [est.estimate_tile(ndimage.gaussian_filter(clean, (s, s, 0))).blur_sigma for s in (1.0, 2.0, 3.0)]
    assert sigmas[0] < sigmas[1] < sigmas[2]
    # √(σ² + a sharp scan's ~0.7²), read up to ~20 % low at large σ where neighbouring edges merge
    assert 1.5 < sigmas[1] < 2.5 and 2.2 < sigmas[2] < 3.6


def test_noise_sigma_is_measured_and_noise_does_not_hide_blur(tissue_tile: np.ndarray) -> None:
    est = ClassicalEstimator()
    rng = np.random.default_rng(0)
    clean = to_float(tissue_tile)
    noisy = np.clip(clean + rng.normal(0, 25 / 255, clean.shape), 0, 1).astype(np.float32)
    e = est.estimate_tile(noisy)
    assert 20 < e.noise_sigma < 30 and e.flags()["noisy"]
    blurred_noisy = np.clip(ndimage.gaussian_filter(clean, (2.5, 2.5, 0)) + rng.normal(0, 20 / 255, clean.shape), 0, 1)
    e2 = est.estimate_tile(blurred_noisy.astype(np.float32))
    assert e2.flags()["out_of_focus"] and e2.flags()["noisy"]


@pytest.mark.parametrize("quality", [35, 50, 75])
def test_jpeg_quality_is_read_at_any_grid_offset(tissue_tile: np.ndarray, quality: int) -> None:
    shifted = jpeg_roundtrip(tissue_tile, quality)[3:, 5:]  # the 8×8 grid no longer starts at the corner
    q, score = estimate_jpeg(luminance(to_float(shifted)))
    assert q == quality and score > 0.5
    q0, _ = estimate_jpeg(luminance(to_float(tissue_tile)))
    assert q0 == 100  # the sample slide's own RGB-space JPEG leaves no trace in the luminance


def test_glass_is_not_tissue_and_gets_no_blur_estimate() -> None:
    glass = np.full((256, 256, 3), 0.93, np.float32) + np.random.default_rng(1).normal(0, 0.01, (256, 256, 3))
    glass = np.clip(glass, 0, 1).astype(np.float32)
    assert tissue_mask(glass).mean() < 0.01
    e = ClassicalEstimator().estimate_tile(glass)
    assert np.isnan(e.blur_sigma) and not any(e.flags().values())


def test_roc_auc() -> None:
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    assert roc_auc(np.array([1.0, 1.0]), np.array([1, 0], bool)) == 0.5  # ties count half
    assert roc_auc(np.array([np.nan, 2.0]), np.array([0, 1], bool)) == 1.0  # no estimate ranks lowest


def test_classical_estimator_on_a_synthetic_slide(synthetic: object) -> None:
    s = synthetic
    assert any(t.clean for t in s.truth) and any(t.blur for t in s.truth) and any(t.noise for t in s.truth)
    tiles = [to_float(s.image[t.y : t.y + t.size, t.x : t.x + t.size]) for t in s.truth]
    scores = score_estimates(s.truth, ClassicalEstimator().estimate(tiles))
    assert scores["blur"]["auc"] >= 0.9
    assert scores["noise"]["auc"] >= 0.85
    assert scores["jpeg"]["auc"] >= 0.9
    assert scores["fpr_any_clean"] <= 0.1
    # where nothing was pasted, the image is the clean tissue, byte for byte
    for t in s.truth:
        if t.clean:
            window = (slice(t.y, t.y + t.size), slice(t.x, t.x + t.size))
            assert np.array_equal(s.image[window], s.clean[window])


def test_assess_streams_tiles_and_summarises(synthetic: object, tmp_path: Path) -> None:
    from lpfm_toolkit.qc import assess, flagged_regions, write_outputs

    path = synthetic.write(tmp_path / "syn.ome.tiff")
    calls: list[tuple[int, int]] = []
    with open_image(path) as h:
        qc = assess(h, tile=256, progress=lambda d, n: calls.append((d, n)))
        files = write_outputs(qc, h, tmp_path / "out")
    assert calls[-1] == (36, 36)
    s = qc.summary()
    truth = {(t.x, t.y): t for t in synthetic.truth}
    for tq in qc.tiles:
        t = truth[(tq.x, tq.y)]
        if t.clean and t.tissue >= 0.5:
            assert not tq.flagged, (tq, t)
    assert 0 < s["flagged_fraction"] <= 1 and s["worst_regions"]
    worst = s["worst_regions"][0]
    assert not truth[(worst["x"], worst["y"])].clean
    doc = json.loads(files["json"].read_text())
    assert doc["summary"] == json.loads(json.dumps(s)) and len(doc["tiles"]) == 36
    assert files["csv"].read_text().splitlines()[0].startswith("x,y,width,height,tissue,blur_sigma")
    from PIL import Image

    png = Image.open(files["png"])
    assert png.size[0] > 4 * 256 and png.mode == "RGB"
    regions = flagged_regions(qc)
    assert {r.class_name for r in regions} <= {"lpfm: out of focus", "lpfm: noisy", "lpfm: compressed"}
    assert all(r.geometry.area >= 256 * 256 for r in regions)


def test_assess_a_region_at_a_level(sample_slide: Path) -> None:
    from lpfm_toolkit.qc import assess, tile_boxes

    with open_image(sample_slide) as h:
        qc = assess(h, region=Region(500, 700, 700, 300), tile=256, thresholds=Thresholds(noise=50))
    assert [(t.x, t.y, t.width, t.height) for t in qc.tiles] == tile_boxes(Region(500, 700, 700, 300), 256)
    assert all(t.width == 256 and t.height == 256 for t in qc.tiles)
    assert max(t.x + t.width for t in qc.tiles) == 1200 and max(t.y + t.height for t in qc.tiles) == 1000


def test_cli_qc_writes_reports_and_ranks(synthetic: object, sample_slide: Path, tmp_path: Path) -> None:
    from lpfm_toolkit.cli.main import cli

    path = synthetic.write(tmp_path / "syn.ome.tiff")
    out = tmp_path / "qc"
    res = CliRunner().invoke(
        cli, ["qc", str(sample_slide), str(path), "--estimator", "classical", "--out", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    ranked = json.loads(res.output[res.output.index("[") :])
    assert [r["name"] for r in ranked] == ["syn", "cmu_small_region"]  # the degraded slide first
    assert len(list(out.glob("*.qc.json"))) == 2 and (out / "qc-ranking.csv").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to check"),
        (["/nonexistent/slide.svs"], "does not exist"),
        (["SAMPLE", "--tile", "8"], "--tile 8 is out of range"),
        (["SAMPLE", "--estimator", "classical", "--level", "3"], "level 3 does not exist"),
    ],
)
def test_cli_qc_bad_input_is_one_line(args: list[str], message: str, sample_slide: Path) -> None:
    from lpfm_toolkit.cli.main import cli

    args = [str(sample_slide) if a == "SAMPLE" else a for a in args]
    res = CliRunner().invoke(cli, ["qc", *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_fluorescence_is_assessed_with_the_classical_estimator() -> None:
    from lpfm_toolkit.engine.estimate_learned import LearnedEstimator
    from lpfm_toolkit.qc import assess
    from lpfm_toolkit.sources.base import ImageHandle, Level

    rng = np.random.default_rng(2)
    nuclei = ndimage.gaussian_filter((rng.random((512, 512)) > 0.995).astype(np.float32), 3) * 40000
    img = np.stack([nuclei, nuclei * 0.5 + 3000], axis=-1)
    img[:, 256:] += rng.normal(0, 4000, (512, 256, 2))  # a noisy right half
    pixels = np.clip(img, 0, 65535).astype(np.uint16)

    class Fluo(ImageHandle):
        uri = "memory://fluo"
        name = "fluo"
        dtype = np.dtype(np.uint16)
        channel_names = ["DAPI", "AF"]
        levels = [Level(512, 512, 1.0)]

        def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
            return pixels[y : y + h, x : x + w]

    qc = assess(Fluo(), estimator=LearnedEstimator.load(), tile=256)  # RGB-only learned → classical
    assert qc.estimator["name"] == "classical"
    left = [t for t in qc.tiles if t.x == 0]
    right = [t for t in qc.tiles if t.x == 256]
    assert min(t.estimate.noise_sigma for t in right) > 3 * max(t.estimate.noise_sigma for t in left)

"""Classical baselines do what they claim on real tissue from the sample slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from lpfm_toolkit.engine import get_engine
from lpfm_toolkit.engine.classical import ClassicalEngine, beer_lambert_he, macenko_stain_matrix
from lpfm_toolkit.errors import ConfigError, TaskNotSupportedError
from lpfm_toolkit.pipeline import to_float
from lpfm_toolkit.prompts import parse_prompt
from lpfm_toolkit.sources import open_image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture(scope="module")
def clean(sample_slide: Path) -> np.ndarray:
    with open_image(sample_slide) as h:
        return to_float(h.read_region(0, 1000, 1300, 192, 192))


def _run(engine: ClassicalEngine, prompt: str, img: np.ndarray) -> np.ndarray:
    task = parse_prompt(prompt)
    engine.check(task, ["R", "G", "B"])
    engine.prepare(task, img)
    return engine.process(img[None], task, [0]).pixels[0]


@pytest.mark.parametrize("method", ["nlm", "tv", "wavelet"])
def test_denoisers_improve_psnr(clean: np.ndarray, method: str) -> None:
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 31 / 255, clean.shape), 0, 1).astype(np.float32)
    out = _run(ClassicalEngine(method), "denoise", noisy)
    assert psnr(out, clean) > psnr(noisy, clean) + 2.0


@pytest.mark.parametrize("method", ["richardson_lucy", "wiener"])
def test_deconvolution_improves_psnr(clean: np.ndarray, method: str) -> None:
    blurred = ndimage.gaussian_filter(clean, sigma=(1.5, 1.5, 0), mode="reflect").astype(np.float32)
    out = _run(ClassicalEngine(method), "deblur", blurred)
    inner = (slice(16, -16), slice(16, -16))
    assert psnr(out[inner], clean[inner]) > psnr(blurred[inner], clean[inner]) + 0.5


@pytest.mark.parametrize("method", ["bicubic", "lanczos"])
@pytest.mark.parametrize("scale", [2, 4])
def test_interpolation_beats_pixel_replication(clean: np.ndarray, method: str, scale: int) -> None:
    small = clean.reshape(192 // scale, scale, 192 // scale, scale, 3).mean(axis=(1, 3)).astype(np.float32)
    out = _run(ClassicalEngine(method), f"sr x{scale}", small)
    assert out.shape == clean.shape
    nearest = small.repeat(scale, 0).repeat(scale, 1)
    assert psnr(out, clean) > psnr(nearest, clean)


def test_macenko_undoes_a_stain_shift(clean: np.ndarray) -> None:
    he = macenko_stain_matrix(clean)
    assert he[0, 0] > he[1, 0]  # hematoxylin absorbs more red than eosin
    od = -np.log(np.clip(clean, 1 / 255, 1))
    shifted = np.exp(-(od * np.array([1.3, 0.8, 1.1]))).astype(np.float32)  # a different scanner/stain batch
    a = _run(ClassicalEngine(), "normalize stain", clean)
    b = _run(ClassicalEngine(), "normalize stain", shifted)
    assert np.abs(a - b).mean() < np.abs(clean - shifted).mean() * 0.6


def test_beer_lambert_false_colour_looks_like_he() -> None:
    nuclear = np.zeros((32, 32), np.float32)
    nuclear[8:16, 8:16] = 1.0
    cyto = np.full((32, 32), 0.5, np.float32)
    rgb = beer_lambert_he(nuclear, cyto)
    nucleus, stroma = rgb[12, 12], rgb[28, 28]
    assert nucleus.mean() < stroma.mean()  # nuclei are darker
    assert nucleus[2] > nucleus[1]  # hematoxylin: blue-purple
    assert stroma[0] > stroma[1]  # eosin: pink


def test_fluorescence_to_he_runs_through_engine() -> None:
    rng = np.random.default_rng(0)
    fluo = rng.random((64, 64, 2), dtype=np.float32)
    engine = ClassicalEngine()
    out = _run_channels(engine, "AF -> H&E", fluo, ["DAPI", "AF"])
    assert out.shape == (64, 64, 3)
    assert engine.output_channels(parse_prompt("AF -> H&E"), ["DAPI", "AF"]) == ["R", "G", "B"]


def _run_channels(engine: ClassicalEngine, prompt: str, img: np.ndarray, names: list[str]) -> np.ndarray:
    task = parse_prompt(prompt)
    engine.check(task, names)
    engine.prepare(task, img)
    return engine.process(img[None], task, [0]).pixels[0]


def test_unsupported_combinations_say_what_to_do() -> None:
    engine = ClassicalEngine()
    with pytest.raises(TaskNotSupportedError, match="trained bundle"):
        engine.check(parse_prompt("H&E -> PAS"), ["R", "G", "B"])
    with pytest.raises(TaskNotSupportedError, match="fluorescence channels"):
        engine.check(parse_prompt("AF -> H&E"), ["R", "G", "B"])
    with pytest.raises(TaskNotSupportedError, match="--method"):
        ClassicalEngine("nlm").check(parse_prompt("sr x2"), ["R", "G", "B"])
    with pytest.raises(ConfigError, match="unknown classical method"):
        get_engine("classical", method="magic")
    with pytest.raises(ConfigError, match="unknown engine"):
        get_engine("quantum")


@pytest.mark.parametrize("method", ["richardson_lucy", "wiener"])
def test_deconvolution_does_not_ring_at_tile_edges(clean: np.ndarray, method: str) -> None:
    blurred = ndimage.gaussian_filter(clean, sigma=(1.5, 1.5, 0), mode="reflect").astype(np.float32)
    err = np.abs(_run(ClassicalEngine(method), "deblur", blurred) - clean).mean(axis=-1)
    edge = np.concatenate([err[:8].ravel(), err[-8:].ravel(), err[:, :8].ravel(), err[:, -8:].ravel()]).mean()
    assert edge < 1.3 * err[48:-48, 48:-48].mean()

"""LPFM's degradation protocol: kernels, down-sampling, noise levels, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from lpfm_toolkit.engine import degrade as G


def test_gaussian_kernel_is_normalised_and_anisotropic() -> None:
    k = G.gaussian_kernel(15, 3.5, 1.5, 0.0)
    assert k.shape == (15, 15) and math.isclose(float(k.sum()), 1.0, rel_tol=1e-6)
    coords = torch.arange(-7, 8, dtype=torch.float32)
    var_x = float((k.sum(dim=0) * coords**2).sum())
    var_y = float((k.sum(dim=1) * coords**2).sum())
    assert var_x > 2 * var_y  # wider along x (σ 3.5) than along y (σ 1.5) when θ = 0
    rotated = G.gaussian_kernel(15, 3.5, 1.5, math.pi / 2)
    assert torch.allclose(rotated, k.T, atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        G.gaussian_kernel(8, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("method", G.DOWN_METHODS)
@pytest.mark.parametrize("scale", [2, 4, 8])
def test_downsampling_sizes_and_range(method: str, scale: int) -> None:
    x = torch.rand(2, 3, 64, 48)
    y = G.Degradation(scale=scale, down_method=method).apply(x)
    assert y.shape == (2, 3, 64 // scale, 48 // scale)
    assert 0 <= float(y.min()) and float(y.max()) <= 1


def test_blur_preserves_flat_images_and_smooths_edges() -> None:
    flat = torch.full((1, 3, 32, 32), 0.4)
    d = G.Degradation(kernel_size=11, sigma_x=2.5, sigma_y=1.5, theta=0.3)
    assert torch.allclose(d.apply(flat), flat, atol=1e-6)
    edge = torch.zeros(1, 1, 32, 32)
    edge[..., 16:] = 1
    blurred = G.blur(edge, G.gaussian_kernel(11, 2.5, 2.5, 0))
    assert 0.2 < float(blurred[0, 0, 16, 15]) < 0.5


@pytest.mark.parametrize("sigma", G.NOISE_SIGMAS)
def test_noise_level_matches_sigma_on_the_255_scale(sigma: int) -> None:
    x = torch.full((1, 3, 128, 128), 0.5)
    g = torch.Generator().manual_seed(0)
    y = G.Degradation(noise_sigma=sigma).apply(x, g)
    assert abs(float((y - x).std()) * 255 - sigma) < 1.0


def test_same_generator_seed_same_degradation() -> None:
    x = torch.rand(1, 3, 32, 32)
    for name in ("sr4", "deblur", "denoise", "restore"):
        a = G.random_degradation(name, torch.Generator().manual_seed(5))
        b = G.random_degradation(name, torch.Generator().manual_seed(5))
        assert a == b
        ya = a.apply(x, torch.Generator().manual_seed(1))
        yb = b.apply(x, torch.Generator().manual_seed(1))
        assert torch.equal(ya, yb)


def test_random_degradations_stay_within_the_protocol() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        d = G.random_degradation("deblur", g)
        assert d.kernel_size in G.KERNEL_SIZES and 1.5 <= d.sigma_x <= 3.5 and 1.5 <= d.sigma_y <= 3.5
        s = G.random_degradation("sr8", g)
        assert s.scale == 8 and s.down_method in G.DOWN_METHODS
    with pytest.raises(ValueError, match="no degradation protocol"):
        G.random_degradation("virtual_stain", g)


def test_evaluation_protocol_covers_the_reported_degradations() -> None:
    proto = G.evaluation_protocol()
    assert {"sr-x2", "sr-x4", "denoise-s21", "denoise-s31", "denoise-s41", "deblur"} <= set(proto)
    assert proto["denoise-s41"][1].noise_sigma == 41

"""LPFM's degradation protocol: kernels, down-sampling, noise levels, reproducibility."""

from __future__ import annotations

import math

import numpy as np
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


# ------------------------------------------------------------------------------------ blind degradations


def _tissue_like(seed: int = 0, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    x = ndimage.gaussian_filter(rng.random((size, size, 3)), (1.5, 1.5, 0))
    return np.clip((x - x.min()) / (x.max() - x.min()) * 0.8 + 0.1, 0, 1)


@pytest.mark.parametrize("kernel", G.BLIND_DOWN_KERNELS + G.EVAL_ONLY_DOWN_KERNELS)
@pytest.mark.parametrize("scale", [2, 4, 8])
def test_blind_down_kernels_shrink_exactly_and_keep_flat_images(kernel: str, scale: int) -> None:
    img = _tissue_like()
    assert G.downsample_np(img, scale, kernel, 0.8).shape == (64 // scale, 64 // scale, 3)
    flat = np.full((40, 48, 3), 0.37)
    assert np.allclose(G.downsample_np(flat, scale, kernel, 0.8), 0.37, atol=1e-4)


def test_blind_down_kernels_differ_from_each_other() -> None:
    img = _tissue_like(1)
    outs = {k: G.downsample_np(img, 2, k, 0.8) for k in G.BLIND_DOWN_KERNELS}
    keys = list(outs)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert np.abs(outs[a] - outs[b]).max() > 1e-3, (a, b)


def test_blur_kernels_sum_to_one_and_report_their_width() -> None:
    iso = G.gaussian_kernel_np(2.0, 2.0, 0.0)
    assert math.isclose(iso.sum(), 1.0) and abs(G.kernel_sigma(iso) - 2.0) < 0.05
    disk = G.disk_kernel(3.0)
    assert math.isclose(disk.sum(), 1.0) and abs(G.kernel_sigma(disk) - 1.5) < 0.1  # a disk's RMS is r/2 per axis
    motion = G.motion_kernel(8.0, 0.0)
    assert math.isclose(motion.sum(), 1.0)
    assert motion.sum(axis=1).max() > 0.9  # horizontal motion: nearly all weight on the centre row
    assert G.kernel_sigma(motion) > G.kernel_sigma(G.motion_kernel(3.0, 0.0))


@pytest.mark.parametrize("task", G.BLIND_TASKS)
def test_blind_degrade_is_deterministic_and_reports_the_truth(task: str) -> None:
    img = _tissue_like(2)
    for seed in range(12):
        a, info = G.blind_degrade(img, seed, task)
        b, info_b = G.blind_degrade(img, seed, task)
        assert np.array_equal(a, b) and info == info_b
        s = info["scale"]
        assert a.shape == (64 // s, 64 // s, 3) and a.dtype == np.float32
        assert np.allclose(a * 255, np.round(a * 255), atol=1e-3)  # 8-bit steps
        assert set(info["order"]) <= {"blur", "down", "noise", "jpeg"}
        assert (info["blur_kind"] != "none") == ("blur" in info["order"])
        assert (info["jpeg_quality"] > 0) == ("jpeg" in info["order"])
        assert 0 <= info["noise_sigma"] <= 50 and (info["jpeg_quality"] == 0 or 30 <= info["jpeg_quality"] <= 95)
        if task.startswith("sr"):
            assert s == int(task[2:]) and info["down_kernel"] in G.BLIND_DOWN_KERNELS
        if task == "deblur":
            assert info["blur_sigma"] > 0.3
        if task == "denoise":
            assert info["noise_sigma_total"] > 3


def test_blind_noise_sigma_matches_what_was_added() -> None:
    img = np.full((96, 96, 3), 0.5)
    p = G.BlindParams(noise_sigma=25.0, order=["noise"])
    out, added = G.apply_blind(img, p, np.random.default_rng(0))
    assert abs(added - 25.0) < 1.0 and abs(float(np.std(out - 0.5)) * 255 - 25.0) < 1.5


def test_jpeg_quality_orders_the_error() -> None:
    img = _tissue_like(3)
    err = [float(np.abs(G.jpeg_np(img, q) - img).mean()) for q in (30, 60, 95)]
    assert err[0] > err[1] > err[2] > 0


def test_blind_protocol_entry_has_the_tensor_interface() -> None:
    d = G.blind_protocol_entry(scale=2, down_kernel="skimage")
    x = torch.from_numpy(_tissue_like(4).astype(np.float32)).permute(2, 0, 1)[None]
    y = d.apply(x, torch.Generator().manual_seed(0))
    assert y.shape == (1, 3, 32, 32) and d.to_dict()["down_kernel"] == "skimage"
    with pytest.raises(ValueError, match="kernel"):
        G.downsample_np(_tissue_like(), 2, "nearest-ish")

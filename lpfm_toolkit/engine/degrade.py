"""LPFM's degradation protocol: clean tiles → degraded tiles, for training pairs and for evaluation.

- super-resolution: down-sampling ×2/×4/×8 by area, bilinear or bicubic (anti-aliased) interpolation;
- deblur: anisotropic Gaussian blur, kernel 7/11/15 px, σ 1.5–3.5 along two rotated axes;
- denoise: additive Gaussian noise σ 21/31/41 (on the 0–255 scale) plus, in training, Poisson shot noise;
- restore: mixtures (blur, then ×2 down/up-sampling, then noise).

All functions take ``(N, C, H, W)`` float tensors in [0, 1] and a ``torch.Generator`` so that every
degradation is reproducible from a seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DOWN_METHODS = ("area", "bilinear", "bicubic")
KERNEL_SIZES = (7, 11, 15)
NOISE_SIGMAS = (21, 31, 41)


@dataclass(frozen=True)
class Degradation:
    """One concrete degradation; ``apply`` turns clean tiles into what the engine would receive."""

    scale: int = 1
    down_method: str = "bicubic"
    kernel_size: int = 0  # 0 = no blur
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    noise_sigma: float = 0.0  # Gaussian σ on the 0–255 scale
    poisson_peak: float = 0.0  # photons at white; 0 = no shot noise
    restore_down: bool = False  # mixed restoration: ×2 down then bicubic back up

    def apply(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Degrade ``clean`` (N, C, H, W) in [0, 1]; the result is smaller by ``scale``."""
        x = clean
        if self.kernel_size:
            x = blur(x, gaussian_kernel(self.kernel_size, self.sigma_x, self.sigma_y, self.theta))
        if self.restore_down:
            h, w = x.shape[-2:]
            x = downsample(x, 2, "bicubic")
            x = upsample(x, size=(h, w))
        if self.scale > 1:
            x = downsample(x, self.scale, self.down_method)
        if self.poisson_peak > 0:
            x = poisson_noise(x, self.poisson_peak, generator)
        if self.noise_sigma > 0:
            x = x + torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * (self.noise_sigma / 255)
        return x.clamp(0, 1)

    def to_dict(self) -> dict:
        return asdict(self)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """An anisotropic Gaussian kernel (size × size) with axes rotated by ``theta``, summing to 1."""
    if size % 2 == 0 or size < 1:
        raise ValueError(f"kernel size {size} must be odd and positive")
    r = size // 2
    coords = torch.arange(-r, r + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy
    v = -s * xx + c * yy
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (k / k.sum()).float()


def blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each channel with ``kernel`` (reflect padding, same size)."""
    n, ch, h, w = x.shape
    r = kernel.shape[-1] // 2
    mode = "reflect" if min(h, w) > r else "replicate"
    padded = F.pad(x, (r, r, r, r), mode=mode)
    weight = kernel.to(x).expand(ch, 1, *kernel.shape)
    return F.conv2d(padded, weight, groups=ch)


def downsample(x: torch.Tensor, scale: int, method: str) -> torch.Tensor:
    """Down-sample by an integer ``scale`` with area, bilinear or bicubic (anti-aliased) interpolation."""
    if method not in DOWN_METHODS:
        raise ValueError(f"down-sampling method {method!r} is not supported; use one of {DOWN_METHODS}")
    h, w = x.shape[-2:]
    size = (h // scale, w // scale)
    if method == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=method, align_corners=False, antialias=True)


def upsample(x: torch.Tensor, scale: int = 1, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bicubic up-sampling: the first step of super-resolution, shared by training and inference."""
    if size is None:
        size = (x.shape[-2] * scale, x.shape[-1] * scale)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def poisson_noise(x: torch.Tensor, peak: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shot noise: counts ~ Poisson(x · peak), returned as counts / peak."""
    return torch.poisson(x.clamp(0, 1) * peak, generator=generator) / peak


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _pick(g: torch.Generator, options: tuple) -> object:
    return options[int(torch.randint(len(options), (), generator=g))]


def _random_blur(g: torch.Generator) -> dict:
    return {
        "kernel_size": int(_pick(g, KERNEL_SIZES)),
        "sigma_x": _u(g, 1.5, 3.5),
        "sigma_y": _u(g, 1.5, 3.5),
        "theta": _u(g, 0.0, math.pi),
    }


def random_degradation(task_name: str, g: torch.Generator) -> Degradation:
    """A random degradation for training a task (code names from :mod:`taskcodes`)."""
    if task_name.startswith("sr"):
        return Degradation(scale=int(task_name[2:]), down_method=str(_pick(g, DOWN_METHODS)))
    if task_name == "deblur":
        return Degradation(**_random_blur(g))
    if task_name == "denoise":
        poisson = _u(g, 30.0, 255.0) if float(torch.rand((), generator=g)) < 0.3 else 0.0
        return Degradation(noise_sigma=_u(g, 10.0, 50.0), poisson_peak=poisson)
    if task_name == "restore":
        return Degradation(**_random_blur(g), restore_down=bool(torch.rand((), generator=g) < 0.5),
                           noise_sigma=_u(g, 5.0, 30.0))
    raise ValueError(f"no degradation protocol for task {task_name!r}")


def evaluation_protocol() -> dict[str, tuple[str, Degradation]]:
    """The fixed degradations reported in model cards: label → (task code name, degradation)."""
    blur_kw = {"kernel_size": 11, "sigma_x": 2.5, "sigma_y": 1.5, "theta": math.pi / 4}
    return {
        "sr-x2": ("sr2", Degradation(scale=2, down_method="bicubic")),
        "sr-x4": ("sr4", Degradation(scale=4, down_method="bicubic")),
        "sr-x8": ("sr8", Degradation(scale=8, down_method="bicubic")),
        "denoise-s21": ("denoise", Degradation(noise_sigma=21)),
        "denoise-s31": ("denoise", Degradation(noise_sigma=31)),
        "denoise-s41": ("denoise", Degradation(noise_sigma=41)),
        "deblur": ("deblur", Degradation(**blur_kw)),
        "restore": ("restore", Degradation(**blur_kw, restore_down=True, noise_sigma=15)),
    }

"""LPFM's degradation protocol: clean tiles → degraded tiles, for training pairs and for evaluation.

- super-resolution: down-sampling ×2/×4/×8 by area, bilinear or bicubic (anti-aliased) interpolation;
- deblur: anisotropic Gaussian blur, kernel 7/11/15 px, σ 1.5–3.5 along two rotated axes;
- denoise: additive Gaussian noise σ 21/31/41 (on the 0–255 scale) plus, in training, Poisson shot noise;
- restore: mixtures (blur, then ×2 down/up-sampling, then noise).

All functions take ``(N, C, H, W)`` float tensors in [0, 1] and a ``torch.Generator`` so that every
degradation is reproducible from a seed.

The *blind* superset (BSRGAN / Real-ESRGAN style, numpy only, see :func:`blind_degrade`) is what the
restorer trains on and what the degradation estimator learns to measure: random down-sampling kernels
(area, bilinear, bicubic, Lanczos, Gaussian pre-filter of random σ then spline or cubic, aliasing cubic
sampling), isotropic/anisotropic Gaussian, defocus (disk) and motion blur, Gaussian + Poisson noise with
σ in [0, 50], JPEG at quality 30–95, in random order. Every draw returns its ground-truth parameters.
Torch is imported only by the tensor functions, so the blind part runs without it.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

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
        import torch

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
    import torch

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
    import torch.nn.functional as F

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
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    size = (h // scale, w // scale)
    if method == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=method, align_corners=False, antialias=True)


def upsample(x: torch.Tensor, scale: int = 1, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bicubic up-sampling: the first step of super-resolution, shared by training and inference."""
    import torch.nn.functional as F

    if size is None:
        size = (x.shape[-2] * scale, x.shape[-1] * scale)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def poisson_noise(x: torch.Tensor, peak: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shot noise: counts ~ Poisson(x · peak), returned as counts / peak."""
    import torch

    return torch.poisson(x.clamp(0, 1) * peak, generator=generator) / peak


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    import torch

    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _pick(g: torch.Generator, options: tuple) -> object:
    import torch

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
    import torch

    if task_name == "denoise":
        poisson = _u(g, 30.0, 255.0) if float(torch.rand((), generator=g)) < 0.3 else 0.0
        return Degradation(noise_sigma=_u(g, 10.0, 50.0), poisson_peak=poisson)
    if task_name == "restore":
        return Degradation(
            **_random_blur(g), restore_down=bool(torch.rand((), generator=g) < 0.5), noise_sigma=_u(g, 5.0, 30.0)
        )
    raise ValueError(f"no degradation protocol for task {task_name!r}")


def evaluation_protocol() -> dict[str, tuple[str, Degradation | BlindDegradation]]:
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
        # scikit-image's anti-aliased rescale (Gaussian σ = (s − 1)/2, then linear): a kernel training never used
        "sr-x2-skimage": ("sr2", blind_protocol_entry(scale=2, down_kernel="skimage")),
        "sr-x4-skimage": ("sr4", blind_protocol_entry(scale=4, down_kernel="skimage")),
    }


# ------------------------------------------------------------------------------------ blind degradations

#: down-sampling kernels the blind training draws from (``skimage`` is kept out: evaluation only)
BLIND_DOWN_KERNELS = ("area", "bilinear", "bicubic", "lanczos", "gauss_spline", "gauss_cubic", "cubic_sample")
EVAL_ONLY_DOWN_KERNELS = ("skimage",)
BLUR_KINDS = ("none", "gaussian_iso", "gaussian_aniso", "defocus", "motion")
BLIND_TASKS = ("sr2", "sr4", "sr8", "deblur", "denoise", "restore", "any")


@dataclass
class BlindParams:
    """One draw of the blind degradation model; :meth:`to_dict` adds the ground truth an estimator needs."""

    scale: int = 1
    down_kernel: str = "none"
    prefilter_sigma: float = 0.0  # Gaussian pre-filter of the gauss_* kernels, in input pixels
    blur_kind: str = "none"
    sigma_x: float = 0.0  # Gaussian blur σ along its two axes (pixels of the grid it is applied on)
    sigma_y: float = 0.0
    theta: float = 0.0
    radius: float = 0.0  # defocus disk radius
    length: float = 0.0  # motion length
    angle: float = 0.0  # motion direction (radians)
    blur_on_low: bool = False  # blur after down-sampling instead of before
    noise_sigma: float = 0.0  # additive Gaussian σ on the 0–255 scale
    poisson_peak: float = 0.0  # photons at white; 0 = no shot noise
    jpeg_quality: int = 0  # 0 = no JPEG
    jpeg_before_noise: bool = False
    order: list[str] = field(default_factory=list)

    def kernel(self) -> np.ndarray | None:
        """The blur kernel (None for no blur), summing to 1."""
        if self.blur_kind in ("gaussian_iso", "gaussian_aniso"):
            return gaussian_kernel_np(self.sigma_x, self.sigma_y, self.theta)
        if self.blur_kind == "defocus":
            return disk_kernel(self.radius)
        if self.blur_kind == "motion":
            return motion_kernel(self.length, self.angle)
        return None

    def to_dict(self) -> dict[str, Any]:
        """All fields plus ``blur_sigma`` (the kernel's RMS width, pixels of its grid) and ``blur_sigma_out``
        (the same in pixels of the degraded image)."""
        d = asdict(self)
        k = self.kernel()
        sigma = kernel_sigma(k) if k is not None else 0.0
        d["blur_sigma"] = sigma
        d["blur_sigma_out"] = sigma if (self.blur_on_low or self.scale == 1) else sigma / self.scale
        return d


def gaussian_kernel_np(sigma_x: float, sigma_y: float, theta: float, size: int | None = None) -> np.ndarray:
    """An anisotropic Gaussian kernel rotated by ``theta`` (numpy), odd size ≈ 6σ, summing to 1."""
    if size is None:
        size = min(2 * math.ceil(3 * max(sigma_x, sigma_y, 0.3)) + 1, 41)
    r = size // 2
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy
    k = np.exp(-0.5 * ((u / max(sigma_x, 1e-3)) ** 2 + (v / max(sigma_y, 1e-3)) ** 2))
    return k / k.sum()


def disk_kernel(radius: float, supersample: int = 8) -> np.ndarray:
    """A defocus (pill-box) kernel of ``radius`` pixels, anti-aliased by supersampling."""
    r = math.ceil(radius)
    n = 2 * r + 1
    sub = (np.arange(n * supersample) + 0.5) / supersample - (r + 0.5)
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    inside = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    k = inside.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
    if k.sum() == 0:
        k[r, r] = 1.0
    return k / k.sum()


def motion_kernel(length: float, angle: float) -> np.ndarray:
    """A straight motion-blur kernel: a line of ``length`` pixels at ``angle``, splatted bilinearly."""
    r = math.ceil(length / 2) + 1
    n = 2 * r + 1
    k = np.zeros((n, n))
    for t in np.linspace(-length / 2, length / 2, max(int(length * 8), 2)):
        x, y = r + t * math.cos(angle), r + t * math.sin(angle)
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                if 0 <= y0 + dy < n and 0 <= x0 + dx < n:
                    k[y0 + dy, x0 + dx] += wy * wx
    return k / k.sum()


def kernel_sigma(k: np.ndarray) -> float:
    """RMS radius of a kernel over its two axes: sqrt((var_x + var_y) / 2); a Gaussian's σ for isotropic ones."""
    r = k.shape[0] // 2
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    w = k / k.sum()
    mx, my = float((w * xx).sum()), float((w * yy).sum())
    return float(math.sqrt(0.5 * ((w * (xx - mx) ** 2).sum() + (w * (yy - my) ** 2).sum())))


def convolve_np(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Convolve each channel of (H, W, C) ``img`` with ``k`` (reflect borders, same size)."""
    from scipy import ndimage

    return np.stack([ndimage.convolve(img[..., c], k, mode="reflect") for c in range(img.shape[-1])], axis=-1)


def _keys(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(
        t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1, np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0)
    )


def _cubic_sample_axis(x: np.ndarray, scale: int, axis: int) -> np.ndarray:
    """Cubic-convolution sampling at the output pixel centres along ``axis``, without anti-aliasing
    (what OpenCV's INTER_CUBIC does when shrinking)."""
    n = x.shape[axis] // scale
    pos = (np.arange(n) + 0.5) * scale - 0.5
    base = np.floor(pos).astype(int)
    out = 0.0
    size = x.shape[axis]
    for tap in (-1, 0, 1, 2):
        idx = base + tap
        idx = np.where(idx < 0, -idx, idx)
        idx = np.where(idx >= size, 2 * size - 2 - idx, idx)
        w = _keys(pos - (base + tap))
        shape = [1] * x.ndim
        shape[axis] = n
        out = out + np.take(x, idx, axis=axis) * w.reshape(shape)
    return np.asarray(out)


def downsample_np(img: np.ndarray, scale: int, kernel: str, prefilter_sigma: float = 0.0) -> np.ndarray:
    """Shrink (H, W, C) float ``img`` by an integer ``scale`` with one of the blind kernels (or ``skimage``)."""
    if scale == 1:
        return img
    h, w = (img.shape[0] // scale) * scale, (img.shape[1] // scale) * scale
    img = img[:h, :w]
    oh, ow = h // scale, w // scale
    if kernel == "area":
        return img.reshape(oh, scale, ow, scale, -1).mean(axis=(1, 3))
    if kernel in ("bilinear", "bicubic", "lanczos"):
        from PIL import Image

        flt = {
            "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC,
            "lanczos": Image.Resampling.LANCZOS,
        }[kernel]
        chans = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), mode="F").resize((ow, oh), flt)
            )
            for c in range(img.shape[-1])
        ]
        return np.stack(chans, axis=-1).astype(np.float64)
    if kernel == "skimage":
        from skimage.transform import rescale

        return rescale(img, 1 / scale, anti_aliasing=True, channel_axis=-1, order=1, mode="reflect")[:oh, :ow]
    if kernel in ("gauss_spline", "gauss_cubic", "cubic_sample"):
        from scipy import ndimage

        x = img
        if kernel != "cubic_sample" and prefilter_sigma > 0:
            x = np.stack(
                [ndimage.gaussian_filter(x[..., c], prefilter_sigma, mode="reflect") for c in range(x.shape[-1])],
                axis=-1,
            )
        if kernel == "gauss_spline":
            ys = (np.arange(oh) + 0.5) * scale - 0.5
            xs = (np.arange(ow) + 0.5) * scale - 0.5
            grid = np.stack(np.meshgrid(ys, xs, indexing="ij"))
            return np.stack(
                [ndimage.map_coordinates(x[..., c], grid, order=3, mode="mirror") for c in range(x.shape[-1])], axis=-1
            )
        return _cubic_sample_axis(_cubic_sample_axis(x, scale, 0), scale, 1)
    raise ValueError(
        f"unknown down-sampling kernel {kernel!r}; use one of {BLIND_DOWN_KERNELS + EVAL_ONLY_DOWN_KERNELS}"
    )


def jpeg_np(img: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip (H, W, 3) ``img`` in [0, 1] through 8-bit JPEG at ``quality`` (4:2:0, as scanners store tiles)."""
    from PIL import Image

    u8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64) / 255


def _sample_blur(
    rng: np.random.Generator,
    p: BlindParams,
    lo: float,
    hi: float,
    kinds: tuple[str, ...] = BLUR_KINDS[1:],
    weights: tuple[float, ...] = (0.25, 0.4, 0.2, 0.15),
) -> None:
    kind = str(rng.choice(kinds, p=np.asarray(weights) / sum(weights)))
    p.blur_kind = kind
    if kind == "gaussian_iso":
        p.sigma_x = p.sigma_y = float(rng.uniform(lo, hi))
    elif kind == "gaussian_aniso":
        p.sigma_x, p.sigma_y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        p.theta = float(rng.uniform(0, math.pi))
    elif kind == "defocus":
        p.radius = float(rng.uniform(max(lo, 0.5) * 1.2, hi * 1.6))  # disk RMS radius is r / √2
    else:
        p.length = float(rng.uniform(max(2 * lo, 1.5), 3 * hi))  # line RMS length is L / √12 (one axis)
        p.angle = float(rng.uniform(0, math.pi))


def _sample_noise(rng: np.random.Generator, p: BlindParams, hi: float, p_poisson: float = 0.3) -> None:
    p.noise_sigma = float(rng.uniform(0, hi))
    if rng.random() < p_poisson:
        p.poisson_peak = float(np.exp(rng.uniform(math.log(20), math.log(500))))


def sample_blind(rng: np.random.Generator, task: str = "any", scale: int | None = None) -> BlindParams:
    """Draw blind degradation parameters for ``task`` (a task code name, or ``any`` for a free mixture).

    The task's own degradation is always present (SR: a random down-sampling kernel; deblur: a random
    blur; denoise: noise of σ 5–50); the others join with smaller probability and strength, so the
    network learns to undo its task whatever else the image went through.
    """
    if task not in BLIND_TASKS:
        raise ValueError(f"no blind degradation for task {task!r}; use one of {', '.join(BLIND_TASKS)}")
    p = BlindParams()
    if task.startswith("sr"):
        p.scale = int(task[2:])
    elif task == "any":
        p.scale = int(scale if scale is not None else rng.choice([1, 2, 4], p=[0.6, 0.25, 0.15]))
    if p.scale > 1:
        p.down_kernel = str(rng.choice(BLIND_DOWN_KERNELS))
        if p.down_kernel.startswith("gauss_"):
            p.prefilter_sigma = float(rng.uniform(0.5, 1.5) * max((p.scale - 1) / 2, 0.5))
    if task.startswith("sr"):
        if rng.random() < 0.3:
            _sample_blur(rng, p, 0.3, 1.2)
            p.blur_on_low = bool(rng.random() < 0.3)
        if rng.random() < 0.25:
            _sample_noise(rng, p, 12.0, p_poisson=0.2)
        if rng.random() < 0.3:
            p.jpeg_quality = int(rng.integers(60, 96))
    elif task == "deblur":
        _sample_blur(rng, p, 0.8, 3.5)
        if rng.random() < 0.25:
            _sample_noise(rng, p, 8.0, p_poisson=0.2)
        if rng.random() < 0.25:
            p.jpeg_quality = int(rng.integers(70, 96))
    elif task == "denoise":
        _sample_noise(rng, p, 50.0)
        p.noise_sigma = max(p.noise_sigma, 5.0) if p.poisson_peak == 0 else p.noise_sigma
        if rng.random() < 0.15:
            _sample_blur(rng, p, 0.3, 1.0)
        if rng.random() < 0.2:
            p.jpeg_quality = int(rng.integers(70, 96))
    else:  # restore / any: a free mixture
        if rng.random() < 0.7:
            _sample_blur(rng, p, 0.5, 3.0)
            p.blur_on_low = bool(p.scale > 1 and rng.random() < 0.3)
        if rng.random() < 0.7:
            _sample_noise(rng, p, 50.0 if task == "any" else 30.0)
        if rng.random() < 0.6:
            p.jpeg_quality = int(rng.integers(30, 96))
    if p.jpeg_quality and (p.noise_sigma > 0 or p.poisson_peak > 0):
        p.jpeg_before_noise = bool(rng.random() < 0.2)
    order = ["blur", "down"] if not p.blur_on_low else ["down", "blur"]
    order += ["jpeg", "noise"] if p.jpeg_before_noise else ["noise", "jpeg"]
    p.order = [op for op in order if _active(p, op)]
    return p


def _active(p: BlindParams, op: str) -> bool:
    return {
        "blur": p.blur_kind != "none",
        "down": p.scale > 1,
        "noise": p.noise_sigma > 0 or p.poisson_peak > 0,
        "jpeg": p.jpeg_quality > 0,
    }[op]


def apply_blind(clean: np.ndarray, params: BlindParams, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Degrade (H, W, 3) ``clean`` in [0, 1] by ``params``; returns (8-bit-quantised float32 image, the noise
    σ actually added, on the 0–255 scale)."""
    x = np.asarray(clean, dtype=np.float64)
    noise_std = 0.0
    for op in params.order:
        if op == "blur":
            x = convolve_np(x, params.kernel())  # type: ignore[arg-type]
        elif op == "down":
            x = downsample_np(x, params.scale, params.down_kernel, params.prefilter_sigma)
        elif op == "noise":
            before = np.clip(x, 0, 1)
            y = before
            if params.poisson_peak > 0:
                y = rng.poisson(before * params.poisson_peak) / params.poisson_peak
            if params.noise_sigma > 0:
                y = y + rng.standard_normal(y.shape) * (params.noise_sigma / 255)
            noise_std = float(np.std(y - before) * 255)
            x = y
        elif op == "jpeg":
            x = jpeg_np(x, params.jpeg_quality)
    x = np.round(np.clip(x, 0, 1) * 255) / 255  # what an 8-bit file holds
    return x.astype(np.float32), noise_std


def blind_degrade(
    clean: np.ndarray, seed: int | np.random.Generator, task: str = "any", scale: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Degrade (H, W, 3) ``clean`` in [0, 1] with a random blind degradation; deterministic given ``seed``.

    Returns the degraded image (smaller by ``params['scale']``, float32 in [0, 1], 8-bit steps) and the
    ground truth as a dict: scale, down_kernel, prefilter_sigma, blur_kind, blur_sigma (kernel RMS width),
    blur_sigma_out (in degraded-image pixels), noise_sigma, poisson_peak, noise_sigma_total (the σ
    actually added, 0–255 scale), jpeg_quality (0 = none), order, and the kernel parameters.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    params = sample_blind(rng, task, scale)
    out, noise_std = apply_blind(clean, params, rng)
    info = params.to_dict()
    info["noise_sigma_total"] = noise_std
    return out, info


@dataclass(frozen=True)
class BlindDegradation:
    """A fixed blind degradation with the tensor interface of :class:`Degradation` (for evaluation)."""

    params: BlindParams

    @property
    def scale(self) -> int:
        return self.params.scale

    def apply(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        import torch

        seed = int(torch.randint(0, 2**62, (), generator=generator)) if generator is not None else 0
        rng = np.random.default_rng(seed)
        outs = [apply_blind(t.permute(1, 2, 0).cpu().numpy(), self.params, rng)[0] for t in clean]
        return torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).to(clean)

    def to_dict(self) -> dict[str, Any]:
        return self.params.to_dict()


def blind_protocol_entry(scale: int = 1, down_kernel: str = "none", **kwargs: Any) -> BlindDegradation:
    """A fixed :class:`BlindDegradation` (evaluation entries such as skimage's anti-aliased ×2)."""
    p = BlindParams(scale=scale, down_kernel=down_kernel, **kwargs)
    if scale > 1 and down_kernel == "none":
        raise ValueError("a scale above 1 needs a down-sampling kernel")
    p.order = [op for op in ["blur", "down", "noise", "jpeg"] if _active(p, op)]
    return BlindDegradation(p)

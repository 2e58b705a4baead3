"""Classical baselines that need no weights: what every learned model is measured against.

Super-resolution: bicubic, Lanczos (Pillow). Deblurring: Richardson–Lucy, Wiener (scikit-image) with a
Gaussian PSF. Denoising: non-local means, total variation, wavelet (scikit-image). Degradations are local,
so the noise σ and the PSF's σ are estimated **per tile** by the same estimator ``lpfm qc`` uses
(:mod:`lpfm_toolkit.engine.estimate`), not once per region: a noisy quadrant of a clean region gets its own σ. Stain normalisation: Macenko. Virtual staining of two-channel
fluorescence (nuclear + cytoplasm) into H&E: Beer–Lambert false colouring (Giacomelli et al. 2016).
Whole-region statistics are fitted in :meth:`ClassicalEngine.prepare` so tiles agree and no seam shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lpfm_toolkit.engine.base import Engine, EngineOutput, unsupported
from lpfm_toolkit.errors import ConfigError
from lpfm_toolkit.prompts import Stain, Task, TaskKind

METHODS: dict[TaskKind, tuple[str, ...]] = {
    TaskKind.SUPER_RESOLUTION: ("bicubic", "lanczos"),
    TaskKind.DEBLUR: ("richardson_lucy", "wiener"),
    TaskKind.DENOISE: ("nlm", "tv", "wavelet"),
    TaskKind.RESTORE: ("nlm+richardson_lucy",),
    TaskKind.STAIN_NORMALIZE: ("macenko",),
    TaskKind.VIRTUAL_STAIN: ("beer_lambert",),
}
ALL_METHODS = tuple(sorted({m for ms in METHODS.values() for m in ms}))

# Macenko et al. 2009 reference H&E stain vectors (optical density, rows: H, E) and 99th-pct concentrations.
REFERENCE_HE = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
REFERENCE_MAX_C = np.array([1.9705, 1.0308])
# Giacomelli et al. 2016: per-channel (R, G, B) absorption of hematoxylin and eosin for false colouring.
BETA_H = np.array([0.860, 1.000, 0.300])
BETA_E = np.array([0.050, 1.000, 0.544])
K_FALSE_COLOUR = 2.5
#: σ (px) of a sharp scan's own point-spread function, as the blur estimator reads it on the sample slide
SHARP_SCAN_SIGMA = 0.8


def gaussian_psf(sigma: float, size: int | None = None) -> np.ndarray:
    """A normalised isotropic Gaussian point-spread function."""
    size = size or int(2 * np.ceil(3 * sigma) + 1)
    ax = np.arange(size) - (size - 1) / 2
    k = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    return k / k.sum()


def macenko_stain_matrix(rgb: np.ndarray, alpha: float = 1.0, beta: float = 0.15) -> np.ndarray:
    """Estimate the 2×3 H&E stain matrix of an RGB image in [0, 1] (Macenko et al. 2009)."""
    od = -np.log(np.clip(rgb.reshape(-1, 3), 1 / 255, 1.0))
    od = od[np.all(od > beta, axis=1)]
    if od.shape[0] < 100:
        raise ConfigError(
            "too little stained tissue to estimate stain vectors", "select a region with tissue, or use a larger region"
        )
    _, eigvecs = np.linalg.eigh(np.cov(od.T))
    plane = eigvecs[:, 1:3]
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.array([v1, v2]) if v1[0] > v2[0] else np.array([v2, v1])  # hematoxylin has more red absorption
    he = he * np.sign(he.sum(axis=1, keepdims=True))
    return he / np.linalg.norm(he, axis=1, keepdims=True)


def stain_concentrations(rgb: np.ndarray, he: np.ndarray) -> np.ndarray:
    od = -np.log(np.clip(rgb.reshape(-1, 3), 1 / 255, 1.0))
    c, *_ = np.linalg.lstsq(he.T, od.T, rcond=None)
    return c.T  # (N, 2)


def beer_lambert_he(nuclear: np.ndarray, cytoplasm: np.ndarray) -> np.ndarray:
    """False-colour H&E from nuclear and cytoplasm intensities in [0, 1] (Giacomelli et al. 2016)."""
    od = K_FALSE_COLOUR * (nuclear[..., None] * BETA_H + cytoplasm[..., None] * BETA_E)
    return np.exp(-od).astype(np.float32)


class ClassicalEngine(Engine):
    """Weight-free baselines; ``method`` picks one of :data:`METHODS` for the task (default: the first)."""

    name = "classical"
    batch_size = 1

    def __init__(
        self,
        method: str | None = None,
        *,
        psf_sigma: float | None = None,
        rl_iterations: int = 20,
        wiener_balance: float = 0.05,
    ) -> None:
        if method is not None and method not in ALL_METHODS:
            raise ConfigError(f"unknown classical method {method!r}", f"use one of {', '.join(ALL_METHODS)}")
        self.method = method
        self.psf_sigma, self.rl_iterations, self.wiener_balance = psf_sigma, rl_iterations, wiener_balance
        self._stain: np.ndarray | None = None
        self._max_c: np.ndarray | None = None
        self._fluo_scale: np.ndarray | None = None
        self._task_method: str | None = None

    #: PSF σ used where a tile shows too few edges to measure its blur, and the range estimates are kept in
    FALLBACK_PSF_SIGMA = 1.5
    PSF_RANGE = (0.5, 4.0)

    def method_for(self, task: Task) -> str:
        allowed = METHODS[task.kind]
        if self.method is None:
            return allowed[0]
        if self.method not in allowed:
            raise unsupported(
                self.name,
                task,
                f"method {self.method!r} is for another task",
                f"for {task.label} use --method {' or '.join(allowed)}",
            )
        return self.method

    def check(self, task: Task, channel_names: Sequence[str]) -> None:
        self._task_method = self.method_for(task)  # recorded in provenance: the method that runs
        rgb = list(channel_names) == ["R", "G", "B"]
        if task.kind is TaskKind.STAIN_NORMALIZE and not rgb:
            raise unsupported(
                self.name, task, "stain normalisation needs an RGB brightfield image", "use it on H&E slides"
            )
        if task.kind is TaskKind.VIRTUAL_STAIN:
            if task.target_stain is not Stain.HE or task.source_stain not in (Stain.AF, Stain.FLUORESCENCE):
                raise unsupported(
                    self.name,
                    task,
                    "only fluorescence/autofluorescence → H&E false colouring is classical",
                    "H&E → special stains needs a trained bundle: --engine lpfm --model PATH",
                )
            if rgb or len(channel_names) > 4:
                raise unsupported(
                    self.name,
                    task,
                    f"false colouring needs 1–2 fluorescence channels, got "
                    f"{len(channel_names)} ({', '.join(channel_names)})",
                    "give the nuclear (first) and cytoplasm/autofluorescence (second) channels",
                )

    def needs_overview(self, task: Task) -> bool:
        return task.kind in (TaskKind.STAIN_NORMALIZE, TaskKind.VIRTUAL_STAIN)

    def prepare(self, task: Task, overview: np.ndarray) -> None:
        self._task_method = self.method_for(task)
        if task.kind is TaskKind.STAIN_NORMALIZE:
            self._stain = macenko_stain_matrix(overview)
            c = stain_concentrations(overview, self._stain)
            self._max_c = np.percentile(c, 99, axis=0)
        if task.kind is TaskKind.VIRTUAL_STAIN:
            self._fluo_scale = np.maximum(np.percentile(overview.reshape(-1, overview.shape[-1]), 99.5, axis=0), 1e-6)

    def process(self, tiles: np.ndarray, task: Task, seeds: Sequence[int]) -> EngineOutput:
        method = self._task_method or self.method_for(task)
        out = [self._one(t, task, method) for t in tiles]
        return EngineOutput(np.stack(out).astype(np.float32))

    def _one(self, tile: np.ndarray, task: Task, method: str) -> np.ndarray:
        from skimage import restoration

        kind = task.kind
        if kind is TaskKind.SUPER_RESOLUTION:
            return _resize_pil(tile, task.scale, method)
        if kind is TaskKind.DEBLUR:
            return self._deblur(tile, method)
        if kind is TaskKind.DENOISE:
            return self._denoise(tile, method)
        if kind is TaskKind.RESTORE:
            return self._deblur(self._denoise(tile, "nlm"), "richardson_lucy", psf_from=tile)
        if kind is TaskKind.STAIN_NORMALIZE:
            assert self._stain is not None and self._max_c is not None
            c = stain_concentrations(tile, self._stain) * (REFERENCE_MAX_C / self._max_c)
            rgb = np.exp(-(c @ REFERENCE_HE))
            return np.clip(rgb.reshape(tile.shape), 0, 1)
        if kind is TaskKind.VIRTUAL_STAIN:
            assert self._fluo_scale is not None
            f = np.clip(tile / self._fluo_scale, 0, 1)
            if f.shape[2] >= 2:
                nuclear, cyto = f[:, :, 0], f[:, :, 1]
            else:
                nuclear, cyto = np.zeros(f.shape[:2], np.float32), f[:, :, 0]
            return beer_lambert_he(nuclear, cyto)
        raise AssertionError(restoration)  # unreachable: check() covers every kind

    def tile_noise_sigma(self, tile: np.ndarray) -> float:
        """This tile's noise σ in [0, 1] units (the same estimate ``lpfm qc`` reports, divided by 255)."""
        from lpfm_toolkit.engine.estimate import estimate_noise

        return estimate_noise(tile) / 255.0

    def tile_psf_sigma(self, tile: np.ndarray) -> float:
        """The PSF σ to deconvolve this tile with: ``psf_sigma`` when given, else the blur the estimator
        measures beyond a sharp scan's own (clipped to :attr:`PSF_RANGE`; the fallback where it cannot)."""
        if self.psf_sigma is not None:
            return self.psf_sigma
        import math

        from lpfm_toolkit.engine.estimate import ClassicalEstimator

        e = ClassicalEstimator().estimate_tile(tile)
        if math.isnan(e.blur_sigma):
            return self.FALLBACK_PSF_SIGMA
        extra = math.sqrt(max(e.blur_sigma**2 - SHARP_SCAN_SIGMA**2, 0.0))
        return float(np.clip(extra, *self.PSF_RANGE))

    def _deblur(self, tile: np.ndarray, method: str, psf_from: np.ndarray | None = None) -> np.ndarray:
        from skimage import restoration

        psf = gaussian_psf(self.tile_psf_sigma(tile if psf_from is None else psf_from))
        # Reflect-pad by the PSF's reach: Wiener's FFT wraps around, and both methods ring at hard edges.
        from scipy.fft import next_fast_len

        pad = psf.shape[0]
        h, w = tile.shape[:2]
        # pad a little more on the far sides so the FFT size factors into small primes (much faster)
        extra = (next_fast_len(h + 2 * pad) - h - 2 * pad, next_fast_len(w + 2 * pad) - w - 2 * pad)
        chans = []
        for c in range(tile.shape[2]):
            ch = np.pad(
                tile[:, :, c].astype(np.float64), ((pad, pad + extra[0]), (pad, pad + extra[1])), mode="reflect"
            )
            if method == "wiener":
                res = restoration.wiener(ch, psf, self.wiener_balance, clip=False)
            else:
                res = restoration.richardson_lucy(np.clip(ch, 1e-4, 1), psf, num_iter=self.rl_iterations, clip=False)
            chans.append(res[pad : pad + h, pad : pad + w])
        return np.clip(np.stack(chans, axis=-1), 0, 1)

    def _denoise(self, tile: np.ndarray, method: str) -> np.ndarray:
        from skimage import restoration

        sigma = self.tile_noise_sigma(tile)
        if method == "tv":
            out = restoration.denoise_tv_chambolle(tile, weight=max(sigma, 1e-3) * 1.2, channel_axis=-1)
        elif method == "wavelet":
            out = restoration.denoise_wavelet(
                tile,
                sigma=sigma,
                channel_axis=-1,
                mode="soft",
                method="BayesShrink",
                convert2ycbcr=tile.shape[2] == 3,
                rescale_sigma=True,
            )
        else:
            out = restoration.denoise_nl_means(
                tile, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6, channel_axis=-1
            )
        return np.clip(out, 0, 1)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method or self._task_method or "default",
            "psf_sigma": self.psf_sigma,
            "noise_sigma": "per tile",
            "rl_iterations": self.rl_iterations,
            "wiener_balance": self.wiener_balance,
        }


def _resize_pil(tile: np.ndarray, scale: int, method: str) -> np.ndarray:
    from PIL import Image

    resample = Image.Resampling.LANCZOS if method == "lanczos" else Image.Resampling.BICUBIC
    h, w = tile.shape[:2]
    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(tile[:, :, c], dtype=np.float32), mode="F").resize(
                (w * scale, h * scale), resample
            )
        )
        for c in range(tile.shape[2])
    ]
    return np.clip(np.stack(chans, axis=-1), 0, 1)

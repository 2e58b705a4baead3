"""Two-channel fluorescence simulated from real H&E, for training and scoring learned virtual staining.

Colour deconvolution (Macenko's per-tile stain vectors, or Ruifrok & Johnston's fixed ones) gives
haematoxylin and eosin densities; a nuclear dye
(Hoechst/DAPI/propidium-iodide-like, as in MUSE, FIBI or CHIMP imaging) emits in proportion to the light it
absorbs, ``1 − exp(−k·c)``, and eosin fluoresces likewise. The simulation adds channel cross-talk, a
background offset, tissue autofluorescence, optical blur, exposure (gain) and Poisson–Gaussian noise.
Channel 0 is nuclear, channel 1 cytoplasm/eosin, as the classical Beer–Lambert false colouring expects.

This is a simulation: a model trained on it has never seen a real fluorescence image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lpfm_toolkit.engine.models.encoder import rgb_to_hed


def _u(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand((n, 1, 1, 1), generator=g)


def _gauss_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample isotropic Gaussian blur (σ per sample, pixels)."""
    out = torch.empty_like(x)
    r = 4
    coords = torch.arange(-r, r + 1, dtype=x.dtype)
    for i in range(len(x)):
        k1 = torch.exp(-0.5 * (coords / float(sigma[i])) ** 2)
        k1 = k1 / k1.sum()
        k = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 2 * r + 1, 2 * r + 1)
        pad = F.pad(x[i : i + 1], (r, r, r, r), mode="reflect")
        out[i] = F.conv2d(pad, k, groups=x.shape[1])[0]
    return out


def stain_densities(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) H&E → (N, 2, H, W) haematoxylin and eosin densities, each scaled to its 99th percentile.

    Per tile, Macenko's stain vectors (estimated from the tile) unmix the optical density; a tile with too
    little stained tissue for that falls back to Ruifrok & Johnston's fixed H&E vectors.
    """
    import numpy as np

    from lpfm_toolkit.engine.classical import macenko_stain_matrix, stain_concentrations
    from lpfm_toolkit.errors import ConfigError

    x = rgb.detach().cpu().permute(0, 2, 3, 1).double().numpy()
    fixed = rgb_to_hed(rgb.detach().cpu()).clamp(min=0)[:, :2].permute(0, 2, 3, 1).double().numpy()
    out = np.empty(x.shape[:3] + (2,))
    for i, img in enumerate(x):
        try:
            c = stain_concentrations(img, macenko_stain_matrix(img)).reshape(img.shape[:2] + (2,))
        except (ConfigError, np.linalg.LinAlgError, ValueError):
            c = fixed[i]
        c = np.clip(c, 0, None)
        out[i] = c / np.maximum(np.percentile(c.reshape(-1, 2), 99, axis=0), 1e-3)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()


def simulate_fluorescence(
    rgb: torch.Tensor, generator: torch.Generator | None = None, noise: bool = True
) -> torch.Tensor:
    """(N, 3, H, W) H&E in [0, 1] → (N, 2, H, W) nuclear/eosin fluorescence in [0, 1]."""
    n = rgb.shape[0]
    g = generator
    dens = stain_densities(rgb)
    hem, eos = dens[:, :1], dens[:, 1:2]
    nuc = 1 - torch.exp(-_u(n, 1.0, 2.5, g) * hem)
    cyt = 1 - torch.exp(-_u(n, 1.0, 2.5, g) * eos)
    nuc, cyt = nuc + _u(n, 0.0, 0.15, g) * cyt, cyt + _u(n, 0.0, 0.15, g) * nuc  # cross-talk
    auto = _u(n, 0.0, 0.1, g) * ((hem + eos) / 2).clamp(max=1)  # tissue autofluorescence in both channels
    x = torch.cat([nuc + auto, cyt + auto], dim=1)
    x = _gauss_blur(x, _u(n, 0.3, 1.2, g).flatten())
    x = x + _u(n, 0.0, 0.08, g)  # background (stray light, mounting medium)
    p995 = torch.quantile(x.flatten(2), 0.995, dim=2)[..., None, None].clamp(min=1e-3)
    x = x / p995 * _u(n, 0.5, 1.0, g)  # exposure
    if noise:
        peak = torch.exp(_u(n, 3.9, 6.9, g))  # 50–1000 photons at full scale
        x = torch.poisson(x.clamp(0, 1) * peak, generator=g) / peak
        x = x + torch.randn(x.shape, generator=g) * _u(n, 0.0, 0.02, g)
    return x.clamp(0, 1)


def normalise_fluorescence(x: torch.Tensor, p995: torch.Tensor | None = None, level: float = 0.75) -> torch.Tensor:
    """Scale each channel so its 99.5th percentile (given, or of ``x``) sits at ``level``, as the model trained."""
    if p995 is None:
        p995 = torch.quantile(x.flatten(2), 0.995, dim=2)[..., None, None]
    return (x / p995.clamp(min=1e-6) * level).clamp(0, 1)

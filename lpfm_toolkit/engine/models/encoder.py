"""The StainEncoder: a small CNN trained contrastively to be invariant to stain colour.

Two views of a tile under different stain colour must map together (InfoNCE, SimCLR): one view with
HED-space jitter (haematoxylin/eosin/DAB concentrations scaled and shifted), the other re-stained with the
Macenko stain vectors and concentration scale of another tile of the batch, then jittered too.
Its pooled features condition the refiner, as LPFM's stain-invariant encoder conditions its diffusion model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Ruifrok & Johnston's H, E, DAB optical-density vectors (rows), as in scikit-image's rgb2hed.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


@dataclass
class EncoderConfig:
    in_channels: int = 3
    channels: list[int] = field(default_factory=lambda: [32, 64, 96, 128])
    feature_dim: int = 128
    projection_dim: int = 64

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StainEncoder(nn.Module):
    """Strided CNN → global average pool → ``feature_dim`` features; ``project`` is the contrastive head."""

    def __init__(self, config: EncoderConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = config or EncoderConfig(**kwargs)
        c = self.config
        layers: list[nn.Module] = []
        prev = c.in_channels
        for ch in c.channels:
            layers += [nn.Conv2d(prev, ch, 3, stride=2, padding=1), nn.GroupNorm(min(8, ch), ch), nn.GELU()]
            prev = ch
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(prev, c.feature_dim)
        self.head = nn.Sequential(
            nn.Linear(c.feature_dim, c.feature_dim), nn.GELU(), nn.Linear(c.feature_dim, c.projection_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, feature_dim) of tiles (N, C, H, W) in [0, 1]."""
        h = self.body(x * 2 - 1).mean(dim=(-2, -1))
        return self.out(h)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features), dim=-1)


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """Colour deconvolution of (N, 3, H, W) RGB in [0, 1] into H, E, DAB optical densities."""
    od = -torch.log(rgb.clamp(1e-6, 1).double())
    return torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB.to(rgb.device)).to(rgb.dtype)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    od = torch.einsum("nchw,cd->ndhw", hed.double(), _RGB_FROM_HED.to(hed.device))
    return torch.exp(-od).clamp(0, 1).to(hed.dtype)


def hed_jitter(
    rgb: torch.Tensor, generator: torch.Generator | None = None, sigma: float = 0.25, bias: float = 0.05
) -> torch.Tensor:
    """Re-stain each tile: per-tile H/E/DAB densities scaled by 1±``sigma`` and shifted by ±``bias``."""
    n = rgb.shape[0]
    alpha = 1 + (torch.rand((n, 3, 1, 1), generator=generator) * 2 - 1) * sigma
    beta = (torch.rand((n, 3, 1, 1), generator=generator) * 2 - 1) * bias
    return hed_to_rgb(rgb_to_hed(rgb) * alpha.to(rgb) + beta.to(rgb))


def macenko_restain(rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Re-render each tile with the stain of another tile of the batch (Macenko et al. 2009).

    Each tile's H&E stain vectors and stain concentrations are estimated; the concentrations, rescaled to
    the partner's 99th percentiles, are rendered with the partner's stain vectors. A tile (or partner) with
    too little stained tissue to estimate keeps its own colours.
    """
    import numpy as np

    from lpfm_toolkit.engine.classical import macenko_stain_matrix, stain_concentrations
    from lpfm_toolkit.errors import ConfigError

    x = rgb.detach().cpu().permute(0, 2, 3, 1).double().numpy()
    stains: list[tuple[Any, Any, Any] | None] = []
    for img in x:
        try:
            he = macenko_stain_matrix(img)
        except (ConfigError, np.linalg.LinAlgError):
            stains.append(None)
            continue
        c = stain_concentrations(img, he)
        stains.append((he, c, np.maximum(np.percentile(c, 99, axis=0), 1e-6)))
    partner = torch.randperm(len(x), generator=generator).tolist()
    out = x.copy()
    for i, j in enumerate(partner):
        own, other = stains[i], stains[j]
        if own is None or other is None:
            continue
        od = (own[1] * (other[2] / own[2])) @ other[0]
        out[i] = np.exp(-od).reshape(x[i].shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).clamp(0, 1).to(rgb.dtype).to(rgb.device)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Symmetric InfoNCE (NT-Xent) between two batches of normalised embeddings."""
    logits = z1 @ z2.T / temperature
    target = torch.arange(len(z1), device=z1.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def simulate_ihc(rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Re-render H&E tiles as haematoxylin + DAB (IHC-like) by colour deconvolution: a smooth random field
    marks a random fraction of the haematoxylin as DAB-positive, eosin nearly vanishes.

    A stain augmentation only: it is not a real IHC source and is never reported as one.
    """
    n, _, h, w = rgb.shape
    hed = rgb_to_hed(rgb).clamp(min=0)
    coarse = torch.rand((n, 1, max(h // 6, 2), max(w // 6, 2)), generator=generator)
    field_ = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    frac = 0.1 + 0.5 * torch.rand((n, 1, 1, 1), generator=generator)
    thr = torch.quantile(field_.flatten(1), 1 - frac.flatten(), dim=1).diagonal().view(n, 1, 1, 1)
    pos = torch.sigmoid((field_ - thr) * 25)
    dab_gain = 1.0 + 1.5 * torch.rand((n, 1, 1, 1), generator=generator)
    h_gain = 0.6 + 0.6 * torch.rand((n, 1, 1, 1), generator=generator)
    e_gain = 0.15 * torch.rand((n, 1, 1, 1), generator=generator)
    hem = hed[:, :1] * (1 - 0.7 * pos) * h_gain
    dab = hed[:, :1] * pos * dab_gain
    return hed_to_rgb(torch.cat([hem, hed[:, 1:2] * e_gain, dab], dim=1).to(rgb.dtype))

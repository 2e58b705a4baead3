"""The Restorer: a compact task-conditioned U-Net, one forward pass per tile (the ``--steps 0`` path).

Residual output (``x + f(x)``), GELU convolution blocks, FiLM conditioning by a task embedding (plus
optional extra features, e.g. the stain encoder's). Super-resolution runs on the bicubic-upsampled input,
so one network serves ×2, ×4 and ×8.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lpfm_toolkit.engine.taskcodes import NUM_TASKS


@dataclass
class RestorerConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: list[int] = field(default_factory=lambda: [24, 48, 96, 160])
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 2])  # per level; the last level is the bottleneck
    num_tasks: int = NUM_TASKS
    cond_dim: int = 64
    extra_cond_dim: int = 0  # size of extra conditioning features (0 = task only)
    residual: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FiLMBlock(nn.Module):
    """conv → GELU → FiLM(cond) → conv, added to the input."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv1(x))
        gamma, beta = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = h * (1 + gamma) + beta
        return x + self.conv2(h)


class Restorer(nn.Module):
    """Multi-scale U-Net restorer; ``forward(x, task)`` with ``x`` (N, C, H, W) in [0, 1]."""

    def __init__(self, config: RestorerConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = config or RestorerConfig(**kwargs)
        c = self.config
        ch = c.channels
        self.task_embed = nn.Embedding(c.num_tasks, c.cond_dim)
        self.extra_proj = nn.Linear(c.extra_cond_dim, c.cond_dim) if c.extra_cond_dim else None
        self.head = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.enc = nn.ModuleList(
            nn.ModuleList(FiLMBlock(ch[i], c.cond_dim) for _ in range(c.blocks[i])) for i in range(len(ch))
        )
        self.down = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 2, stride=2) for i in range(len(ch) - 1))
        self.up = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch[i + 1], ch[i] * 4, 1), nn.PixelShuffle(2)) for i in range(len(ch) - 1)
        )
        self.dec = nn.ModuleList(FiLMBlock(ch[i], c.cond_dim) for i in range(len(ch) - 1))
        self.tail = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)
        if c.residual:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    @property
    def multiple(self) -> int:
        """Input sizes are padded to a multiple of this."""
        return 2 ** (len(self.config.channels) - 1)

    def condition(self, task: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.task_embed(task)
        if self.extra_proj is not None and extra is not None:
            cond = cond + self.extra_proj(extra)
        return cond

    def forward(self, x: torch.Tensor, task: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        h0, w0 = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h0) % m, (-w0) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h0, w0) > max(ph, pw) else "replicate")
        cond = self.condition(task, extra)
        h = self.head(x)
        skips = []
        for i, blocks in enumerate(self.enc):
            for block in blocks:
                h = block(h, cond)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)
        for i in reversed(range(len(self.up))):
            h = self.up[i](h) + skips[i]
            h = self.dec[i](h, cond)
        out = self.tail(h)
        if self.config.residual:
            out = out + x[:, : out.shape[1]]
        return out[..., :h0, :w0]

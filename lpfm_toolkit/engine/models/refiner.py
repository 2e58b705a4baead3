"""The Refiner: a diffusers ``UNet2DModel`` that samples the residual detail the restorer could not recover.

Residual formulation (ResShift-like): the diffusion variable is ``(clean − restored) · residual_scale``;
the UNet sees it concatenated with the restored tile, and a class embedding made of the task embedding plus
a projection of the stain encoder's features. The network predicts the clean residual (``sample``
prediction), which keeps few-step DDIM / DPM-Solver sampling accurate.

With ``unshuffle`` r > 1 the UNet runs on a space-to-depth view: the concatenated ``[noisy, restored]``
input is ``pixel_unshuffle``-d by r (r² times the channels at 1/r the resolution) and the output is
``pixel_shuffle``-d back. Like latent diffusion working at reduced resolution, this lets wider channels run
at the same cost, so the convolutions, not GroupNorm/SiLU/memory traffic, dominate the forward on a CPU.
``unshuffle`` 1 (the default, and what bundles without the field get) is the full-resolution UNet. Step maths live in diffusers'
schedulers; the sampling loop lives in :mod:`lpfm_toolkit.engine.lpfm`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lpfm_toolkit.engine.taskcodes import NUM_TASKS

SCHEDULERS = ("ddim", "dpm")


@dataclass
class RefinerConfig:
    channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_tasks: int = NUM_TASKS
    feature_dim: int = 128
    residual_scale: float = 5.0
    num_train_timesteps: int = 1000
    unshuffle: int = 1  # space-to-depth factor of the UNet's input (1: full resolution)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Refiner(nn.Module):
    """``forward(noisy, t, restored, task, features)`` → predicted scaled residual."""

    def __init__(self, config: RefinerConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.config = config or RefinerConfig(**kwargs)
        c = self.config
        if c.unshuffle < 1:
            raise ValueError(f"unshuffle must be 1 or more (got {c.unshuffle})")
        n = len(c.block_out_channels)
        r2 = c.unshuffle**2
        self.unet = UNet2DModel(
            sample_size=64,
            in_channels=2 * c.channels * r2,
            out_channels=c.channels * r2,
            block_out_channels=tuple(c.block_out_channels),
            down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n,
            layers_per_block=c.layers_per_block,
            norm_num_groups=c.norm_num_groups,
            add_attention=False,
            class_embed_type="identity",
        )
        embed_dim = c.block_out_channels[0] * 4
        self.task_embed = nn.Embedding(c.num_tasks, embed_dim)
        self.feature_proj = nn.Linear(c.feature_dim, embed_dim)

    @property
    def multiple(self) -> int:
        """Tile heights and widths must be divisible by this (unshuffle × the UNet's down-sampling)."""
        return self.config.unshuffle * 2 ** (len(self.config.block_out_channels) - 1)

    def to_latent(self, residual: torch.Tensor) -> torch.Tensor:
        return residual * self.config.residual_scale

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.config.residual_scale

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, restored: torch.Tensor, task: torch.Tensor,
                features: torch.Tensor) -> torch.Tensor:
        emb = self.task_embed(task) + self.feature_proj(features)
        if t.ndim == 0:
            t = t.expand(noisy.shape[0])
        x = torch.cat([noisy, restored * 2 - 1], dim=1)
        r = self.config.unshuffle
        if r == 1:
            return self.unet(x, t, class_labels=emb.to(x.dtype)).sample
        out = self.unet(F.pixel_unshuffle(x, r), t, class_labels=emb.to(x.dtype)).sample
        return F.pixel_shuffle(out, r)


def make_scheduler(kind: str, num_train_timesteps: int = 1000, config: dict[str, Any] | None = None) -> Any:
    """A diffusers scheduler for sample-prediction residual diffusion: ``ddim`` or ``dpm`` (DPM-Solver++).

    ``config`` is the noise schedule a bundle was trained with (its ``scheduler/scheduler_config.json``), loaded
    with diffusers' ``from_config``; without it (bundles written before it was saved) the built-in schedule below.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = {"num_train_timesteps": num_train_timesteps, "beta_schedule": "squaredcos_cap_v2",
              "prediction_type": "sample", "timestep_spacing": "trailing"}
    if kind == "ddim":
        extra: dict[str, Any] = {"clip_sample": False, "set_alpha_to_one": True}
        cls: Any = DDIMScheduler
    elif kind == "dpm":
        extra = {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True}
        cls = DPMSolverMultistepScheduler
    else:
        raise ValueError(f"sampler {kind!r} is not supported; use one of {SCHEDULERS}")
    if config is not None:
        return cls.from_config(dict(config), **extra)
    return cls(**common, **extra)


def scheduler_config(num_train_timesteps: int = 1000) -> dict[str, Any]:
    """The training noise schedule as diffusers saves it (``scheduler_config.json``)."""
    return dict(make_scheduler("ddim", num_train_timesteps).config)

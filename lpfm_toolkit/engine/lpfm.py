"""The LPFM engine: restorer (one pass) and, with ``steps > 0``, residual diffusion refinement.

Per tile: super-resolution inputs are bicubic-upsampled, the restorer predicts the clean tile (a residual
over its input, conditioned on the stain encoder's features when the bundle was trained so), and the
refiner samples ``samples`` residuals with a diffusers scheduler (DDIM or DPM-Solver). The output is the
mean of the samples and, with two or more samples, their per-pixel standard deviation is the uncertainty.
Every random draw of a tile comes from a generator seeded by that tile's seed, so the pixels do not
depend on batch size, order or device. ``tta=True`` averages the restorer over the 8 flips/rotations of
the tile. Virtual staining runs the bundle's ``stainer`` on per-channel normalised fluorescence.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from lpfm_toolkit.engine.base import Engine, EngineOutput, unsupported
from lpfm_toolkit.engine.bundle import DEFAULT_BUNDLE, SHIPPED_DIR, Bundle, load_bundle, stains_match
from lpfm_toolkit.engine.taskcodes import TASK_NAMES, task_code
from lpfm_toolkit.errors import ConfigError
from lpfm_toolkit.prompts import Task, TaskKind

log = logging.getLogger(__name__)


def default_bundle_available() -> bool:
    """True when the shipped default bundle and the libraries to run it are installed."""
    if not (SHIPPED_DIR / DEFAULT_BUNDLE / "model_index.json").is_file():
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "safetensors"))


def _task_name(task: Task) -> str:
    return TASK_NAMES[task_code(task)]


class LpfmEngine(Engine):
    """Runs a model bundle on tiles."""

    name = "lpfm"
    tile_size = 256
    overlap = 32
    batch_size = 4

    def __init__(
        self,
        bundle: Bundle,
        device: str | None = None,
        steps: int | None = None,
        samples: int = 1,
        sampler: str | None = None,
        threads: int | None = None,
        compile: bool = False,
        tta: bool = False,
    ) -> None:
        import torch

        from lpfm_toolkit.engine.device import autocast_dtype, configure_cpu_threads, cuda_batch_size, select_device
        from lpfm_toolkit.engine.models.refiner import SCHEDULERS

        self.bundle = bundle
        self.device = select_device(device)
        if steps is None:
            # several samples only make sense refined: then use the bundle's refinement steps
            default = int(bundle.index.get("default_steps", 0))
            steps = default if samples == 1 else max(default, int(bundle.index.get("refine_steps", 0)))
        self.steps = int(steps)
        self.samples = int(samples)
        self.sampler = sampler or str(bundle.index.get("default_sampler", "ddim"))
        self.tta = bool(tta)
        #: False runs an encoder-conditioned restorer with its features zeroed (the ablation in docs/engine.md)
        self.condition_on_encoder = True
        self._fluo_p995: Any = None
        if self.steps < 0:
            raise ConfigError(f"steps must be 0 or more (got {self.steps})")
        if self.samples < 1:
            raise ConfigError(f"samples must be 1 or more (got {self.samples})")
        if self.sampler not in SCHEDULERS:
            raise ConfigError(f"sampler {self.sampler!r} is not supported", f"use one of {', '.join(SCHEDULERS)}")
        if self.steps > 0 and "refiner" not in bundle.components:
            raise ConfigError(f"bundle {bundle.name} has no refiner; use --steps 0")
        self.amp_dtype = autocast_dtype(self.device)
        self.threads = configure_cpu_threads(threads) if self.device.type == "cpu" else None
        self.restorer = bundle.components["restorer"].to(self.device)
        self.encoder = bundle.components.get("encoder")
        self.refiner = bundle.components.get("refiner")
        self.stainer = bundle.components.get("stainer")
        if self.stainer is not None:
            self.stainer = self.stainer.to(self.device)
        if self.restorer.config.extra_cond_dim and self.encoder is None:
            raise ConfigError(
                f"bundle {bundle.name}: its restorer is conditioned on the stain encoder, "
                "but the bundle has no encoder",
                "restore the bundle's encoder/ folder",
            )
        if self.encoder is not None:
            self.encoder = self.encoder.to(self.device)
        if self.refiner is not None:
            self.refiner = self.refiner.to(self.device)
        if self.device.type == "cuda":
            for m in (self.restorer, self.encoder, self.refiner):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
            # activations of the widest levels, per output pixel, for every sample drawn
            per_tile = 4 * (self.tile_size * 4) ** 2 * 256 * max(1, self.samples)
            self.batch_size = cuda_batch_size(self.device, per_tile)
        if compile:
            self.restorer = torch.compile(self.restorer)
            if self.refiner is not None:
                self.refiner = torch.compile(self.refiner)

    @classmethod
    def from_options(
        cls,
        model: str | None = None,
        device: str | None = None,
        steps: int | None = None,
        samples: int = 1,
        trust_pickle: bool = False,
        tta: bool = False,
        sampler: str | None = None,
        threads: int | None = None,
        compile: bool = False,
    ) -> LpfmEngine:
        """Load a shipped bundle by name, a bundle folder, or (``None``) the default ``lpfm-tiny``.

        ``compile`` wraps the networks in ``torch.compile`` (``LPFM_COMPILE=1`` reaches it through the settings:
        :class:`~lpfm_toolkit.options.EngineOptions`).
        """
        return cls(
            load_bundle(model, trust_pickle=trust_pickle),
            device=device,
            steps=steps,
            samples=samples,
            sampler=sampler,
            threads=threads,
            compile=compile,
            tta=tta,
        )

    # ------------------------------------------------------------------------------------- contract

    def check(self, task: Task, channel_names: Sequence[str]) -> None:
        if task.kind in (TaskKind.VIRTUAL_STAIN, TaskKind.STAIN_NORMALIZE):
            if _task_name(task) not in self.bundle.tasks:
                raise unsupported(
                    self.name,
                    task,
                    f"bundle {self.bundle.name} was not trained for it",
                    "use the classical engine (--engine classical) or a bundle trained with "
                    "'lpfm train --task stain --pairs DIR'",
                )
            stains = self.bundle.index.get("stains")
            source = getattr(task.source_stain, "value", None)
            target = getattr(task.target_stain, "value", None)
            if task.kind is TaskKind.VIRTUAL_STAIN and stains and not stains_match(stains, source, target):
                raise unsupported(
                    self.name,
                    task,
                    f"bundle {self.bundle.name} translates {stains['source']}→{stains['target']}",
                    "use a bundle trained for this pair",
                )
            if task.kind is TaskKind.VIRTUAL_STAIN and self.stainer is not None:
                expected = self.stainer.config.in_channels
                if len(channel_names) != expected:
                    raise unsupported(
                        self.name,
                        task,
                        f"its stainer needs {expected} fluorescence channels "
                        f"(nuclear first, then cytoplasm/autofluorescence), got "
                        f"{len(channel_names)} ({', '.join(channel_names)})",
                        "give two channels, or use --engine classical (1–2 channels)",
                    )
                return
        elif _task_name(task) not in self.bundle.tasks:
            raise unsupported(
                self.name,
                task,
                f"bundle {self.bundle.name} was trained for {', '.join(self.bundle.tasks)}",
                "choose one of those tasks or another bundle",
            )
        expected = self.restorer.config.in_channels
        if len(channel_names) != expected:
            raise unsupported(
                self.name,
                task,
                f"it needs {expected}-channel (RGB) input, got "
                f"{len(channel_names)} channels ({', '.join(channel_names)})",
                "use an RGB brightfield image or the classical engine",
            )

    def needs_overview(self, task: Task) -> bool:
        return task.kind is TaskKind.VIRTUAL_STAIN and self.stainer is not None

    def prepare(self, task: Task, overview: np.ndarray) -> None:
        """Virtual staining: each fluorescence channel's 99.5th percentile over the region, for normalising."""
        if self.needs_overview(task):
            import torch

            flat = overview.reshape(-1, overview.shape[-1]).astype(np.float32)
            p = np.maximum(np.percentile(flat, 99.5, axis=0), 1e-6)
            self._fluo_p995 = torch.from_numpy(p.astype(np.float32)).view(1, -1, 1, 1).to(self.device)

    def describe(self) -> dict[str, Any]:
        extra = {"tta": True} if self.tta else {}
        return {
            **extra,
            "name": self.name,
            "model": self.bundle.name,
            "model_sha256": self.bundle.sha256,
            "sampler": self.sampler if self.steps else "none",
            "steps": self.steps,
            "samples": self.samples if self.steps else 1,
            "device": self.device.type,
            "dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32",
        }

    def process(self, tiles: np.ndarray, task: Task, seeds: Sequence[int]) -> EngineOutput:
        import torch

        if tiles.ndim != 4 or len(seeds) != len(tiles):
            raise ValueError(f"expected (N, H, W, C) tiles and N seeds, got {tiles.shape} and {len(seeds)} seeds")
        n = tiles.shape[0]
        # CPU: one tile per forward, because batched convolutions round differently (~1e-7) by batch size,
        # and the promise is bit-identical pixels whatever the batching; GPUs batch for throughput.
        per_chunk = 1 if self.device.type == "cpu" else max(1, self.batch_size)
        pixels, uncert = [], []
        x_all = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32)).permute(0, 3, 1, 2)
        for start in range(0, n, per_chunk):
            x = x_all[start : start + per_chunk]
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            else:
                x = x.to(self.device)
            mean, std = self.enhance(x, task, list(seeds[start : start + per_chunk]))
            pixels.append(mean.permute(0, 2, 3, 1).float().cpu().numpy())
            if std is not None:
                uncert.append(std.permute(0, 2, 3, 1).float().cpu().numpy())
        return EngineOutput(
            np.concatenate(pixels).astype(np.float32, copy=False),
            np.concatenate(uncert).astype(np.float32, copy=False) if uncert else None,
        )

    # -------------------------------------------------------------------------------------- maths

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def restore(self, x: Any, task: Task) -> Any:
        """The restorer's output for (N, C, H, W) tiles in [0, 1] on the engine's device, and its input."""
        import torch

        from lpfm_toolkit.engine.degrade import upsample

        if task.kind is TaskKind.VIRTUAL_STAIN and self.stainer is not None:
            return self._stain(x), x
        if task.scale > 1:
            x = upsample(x, task.scale)
        code = torch.full((x.shape[0],), task_code(task), device=self.device, dtype=torch.long)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            if not self.tta:
                return self._restore_once(x, code).float().clamp(0, 1), x
            acc = torch.zeros_like(x[:, : self.restorer.config.out_channels], dtype=torch.float32)
            for k in range(4):
                for flip in (False, True):
                    t = torch.rot90(x, k, dims=(-2, -1))
                    t = torch.flip(t, dims=(-1,)) if flip else t
                    y = self._restore_once(t.contiguous(), code).float()
                    y = torch.flip(y, dims=(-1,)) if flip else y
                    acc += torch.rot90(y, -k, dims=(-2, -1))
            return (acc / 8).clamp(0, 1), x

    def _restore_once(self, x: Any, code: Any) -> Any:
        import torch

        feats = None
        if self.restorer.config.extra_cond_dim:
            if self.condition_on_encoder:
                feats = self.encoder(x)  # type: ignore[misc]
            else:  # the ablation: what training's feature dropout showed the network
                feats = torch.zeros((x.shape[0], self.restorer.config.extra_cond_dim), device=x.device)
        return self.restorer(x, code, feats)

    def _stain(self, x: Any) -> Any:
        """Fluorescence (N, 2, H, W) → H&E with the stainer, channels normalised as in training."""
        import torch

        from lpfm_toolkit.engine.fluorescence import normalise_fluorescence

        code = torch.full((x.shape[0],), TASK_NAMES.index("virtual_stain"), device=self.device, dtype=torch.long)
        with torch.inference_mode():
            x = normalise_fluorescence(x.float(), self._fluo_p995)
            return self.stainer(x, code).float().clamp(0, 1)  # type: ignore[misc]

    def enhance(self, x: Any, task: Task, seeds: Sequence[int]) -> tuple[Any, Any]:
        """(mean, std or None) for a chunk of tiles; ``std`` is the per-pixel std over samples."""
        import torch

        restored, inp = self.restore(x, task)
        if self.steps == 0 or self.refiner is None or task.kind is TaskKind.VIRTUAL_STAIN:
            return restored, None
        k = self.samples
        n, c, h, w = restored.shape
        noise = (
            torch.stack(
                [
                    torch.randn((k, c, h, w), generator=torch.Generator().manual_seed(int(s) & 0xFFFF_FFFF_FFFF_FFFF))
                    for s in seeds
                ]
            )
            .reshape(n * k, c, h, w)
            .to(self.device)
        )
        samples = self.refine(restored, inp, task, noise).reshape(n, k, c, h, w)
        mean = samples.mean(dim=1)
        std = samples.var(dim=1, unbiased=False).mean(dim=1, keepdim=True).sqrt() if k > 1 else None
        return mean.clamp(0, 1), std

    def refine(self, restored: Any, inp: Any, task: Task, noise: Any) -> Any:
        """Sample ``len(noise) / len(restored)`` residuals per tile with the diffusers scheduler."""
        import torch
        import torch.nn.functional as F

        from lpfm_toolkit.engine.models.refiner import make_scheduler

        assert self.refiner is not None and self.encoder is not None
        n = restored.shape[0]
        k = noise.shape[0] // n
        h, w = restored.shape[-2:]
        m = self.refiner.multiple
        ph, pw = (-h) % m, (-w) % m
        cond = F.pad(restored, (0, pw, 0, ph), mode="replicate") if ph or pw else restored
        cond = cond.repeat_interleave(k, dim=0)
        latent = F.pad(noise, (0, pw, 0, ph)) if ph or pw else noise
        scheduler = make_scheduler(
            self.sampler, self.refiner.config.num_train_timesteps, config=self.bundle.scheduler_config
        )
        scheduler.set_timesteps(self.steps)
        task_ids = torch.full((n * k,), task_code(task), device=self.device, dtype=torch.long)
        with torch.inference_mode(), self._autocast():
            feats = self.encoder(inp).float().repeat_interleave(k, dim=0)
            latent = latent * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                pred = self.refiner(latent, t.to(self.device), cond, task_ids, feats).float()
                latent = scheduler.step(pred, t, latent).prev_sample
        residual = self.refiner.from_latent(latent[..., :h, :w])
        return (restored.repeat_interleave(k, dim=0) + residual).clamp(0, 1)

"""Training: degraded/clean pairs from clean slides → stain encoder, restorer, stainer, refiner → a model bundle.

Degradations are the blind superset of :func:`lpfm_toolkit.engine.degrade.blind_degrade` (random kernels,
blur, noise, JPEG, random order) unless a recipe sets ``blind=False`` (LPFM's discrete protocol). Clean crops
are stain-augmented (HED jitter, IHC-like H+DAB re-rendering) and scale-augmented (``zoom``). The restorer is
conditioned on the frozen stain encoder's features (``condition_restorer``); the stainer maps simulated
two-channel fluorescence (:mod:`lpfm_toolkit.engine.fluorescence`) to the H&E it was simulated from.

Each stage checkpoints to ``work_dir/<stage>/checkpoint.safetensors`` (weights, optimiser moments, step)
and resumes from it; batches are drawn from a generator seeded by ``(seed, step)`` so a resumed run sees
the same data as an uninterrupted one. Losses go to ``work_dir/<stage>/log.jsonl``.

The held-out part of every training image is a band of rows at the bottom (``holdout`` of its height):
no crop used for training touches it, and evaluation reads only from it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lpfm_toolkit.engine import degrade
from lpfm_toolkit.engine.models.encoder import StainEncoder, hed_jitter, info_nce, macenko_restain, simulate_ihc
from lpfm_toolkit.engine.models.refiner import Refiner, make_scheduler
from lpfm_toolkit.engine.models.restorer import Restorer
from lpfm_toolkit.engine.taskcodes import TASK_NAMES
from lpfm_toolkit.errors import ConfigError

log = logging.getLogger(__name__)

#: progress(stage, step, total_steps, latest values)
TrainProgress = Callable[[str, int, int, dict[str, float]], None]

SAMPLE_SLIDE = Path(__file__).resolve().parents[1] / "data" / "cmu_small_region.svs"
#: openly licensed training images kept in the source tree (not in the wheel); see training_data/SOURCES.md
TRAINING_DATA = Path(__file__).resolve().parents[2] / "training_data" / "train"
STAGES = ("encoder", "restorer", "stainer", "refiner")
REQUIRED_STAGES = ("encoder", "restorer", "refiner")


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved into the bundle's model card)."""

    images: list[str] = field(default_factory=lambda: [str(SAMPLE_SLIDE)])
    holdout: float = 0.2  # bottom fraction of each image's rows kept for validation
    crop: int = 64
    batch: int = 16
    seed: int = 0
    lr: float = 5e-4
    encoder_steps: int = 300
    restorer_steps: int = 1600
    refiner_steps: int = 1700
    refiner_batch: int = 8
    checkpoint_every: int = 100
    max_minutes: float | None = None  # per stage and process: anneal the learning rate over wall time, stop at it
    validate_every: int = 250
    task_weights: dict[str, float] = field(
        default_factory=lambda: {"sr2": 1.0, "sr4": 1.5, "sr8": 0.5, "deblur": 1.5, "denoise": 1.5, "restore": 0.5}
    )
    restorer: dict[str, Any] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)
    # space-to-depth by 4 with 64–128 channels: compute-bound on a CPU (docs/benchmarks.md, "Efficiency")
    refiner: dict[str, Any] = field(
        default_factory=lambda: {"block_out_channels": [64, 128, 128], "unshuffle": 4, "norm_num_groups": 16}
    )
    pairs: str | None = None  # folder of registered source/target pairs for virtual staining
    device: str | None = None  # None: CUDA → MPS → CPU
    blind: bool = False  # blind degradation superset instead of LPFM's discrete protocol
    zoom: tuple[float, float] = (1.0, 1.0)  # crops of zoom×crop pixels shrunk to crop (scale augmentation)
    stain_jitter: float = 0.0  # probability of HED jitter of a clean restorer crop
    ihc_sim: float = 0.0  # probability of re-rendering a clean crop as H+DAB
    condition_restorer: bool = False  # FiLM-condition the restorer on the stain encoder's features
    cond_dropout: float = 0.0  # fraction of samples trained with the encoder features zeroed
    encoder_degraded: bool = False  # encoder views degraded (blind) as well as re-stained
    stainer_steps: int = 0  # 0 = no learned virtual staining
    stainer: dict[str, Any] = field(default_factory=dict)
    stage_minutes: dict[str, float] = field(default_factory=dict)  # per-stage wall-time budgets

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPES: dict[str, TrainConfig] = {
    # LPFM's discrete protocol on the bundled slide: the recipe of the shipped lpfm-tiny restorer, encoder
    # and refiner (its stainer comes from a tiny-blind run; see the model card)
    "tiny": TrainConfig(),
    # blind degradations, stain-diverse data, encoder-conditioned restorer, simulated fluorescence → H&E;
    # sized for ≤ 2 h on two CPU cores (1 thread): each stage stops at its wall-time budget. Its first run
    # lost to "tiny" on the cross-source set (docs/engine.md), so it does not make the default bundle.
    "tiny-blind": TrainConfig(
        images=[str(SAMPLE_SLIDE), str(TRAINING_DATA)],
        holdout=0.15,
        blind=True,
        zoom=(1.0, 2.0),
        stain_jitter=0.5,
        ihc_sim=0.25,
        condition_restorer=True,
        cond_dropout=0.2,
        encoder_degraded=True,
        encoder_steps=600,
        restorer_steps=6000,
        stainer_steps=2000,
        refiner_steps=2500,
        lr=6e-4,
        stainer={"channels": [16, 32, 64, 96], "blocks": [1, 1, 1, 1]},
        task_weights={"sr2": 1.5, "sr4": 1.5, "sr8": 0.5, "deblur": 1.5, "denoise": 1.5, "restore": 0.5},
        checkpoint_every=25,
        stage_minutes={"encoder": 5, "restorer": 80, "stainer": 6, "refiner": 8},
    ),
    # a seconds-long run that exercises every stage (tests, smoke checks)
    "smoke": TrainConfig(
        crop=32,
        batch=4,
        encoder_steps=4,
        restorer_steps=6,
        refiner_steps=4,
        checkpoint_every=3,
        validate_every=3,
        restorer={"channels": [8, 16], "blocks": [1, 1]},
        blind=True,
        zoom=(1.0, 1.5),
        stain_jitter=0.5,
        ihc_sim=0.5,
        condition_restorer=True,
        cond_dropout=0.2,
        encoder_degraded=True,
        stainer_steps=4,
        stainer={"channels": [8, 16], "blocks": [1, 1]},
        encoder={"channels": [8, 16], "feature_dim": 16, "projection_dim": 8},
        refiner={"block_out_channels": [16, 16], "norm_num_groups": 8},
    ),
}


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """A named recipe with fields replaced by ``overrides`` (``None`` values are ignored)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}", f"choose one of: {', '.join(RECIPES)}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------------------- data


class TileBank:
    """Clean RGB pixels of the training images, split into a training part and a held-out band."""

    def __init__(self, images: Sequence[np.ndarray], holdout: float) -> None:
        if not images:
            raise ConfigError("no training images")
        self.train: list[np.ndarray] = []
        self.val: list[np.ndarray] = []
        for im in images:
            cut = int(round(im.shape[0] * (1 - holdout)))
            self.train.append(im[:cut])
            if holdout > 0:
                self.val.append(im[cut:])

    @classmethod
    def from_paths(
        cls, paths: Sequence[str | Path], holdout: float, max_pixels: int = 16_000_000, seed: int = 0
    ) -> TileBank:
        """Whole images up to ``max_pixels``; from larger slides, tissue regions (see :func:`slide_regions`)."""
        images: list[np.ndarray] = []
        for p in expand_paths(paths):
            images.extend(slide_regions(p, max_pixels=max_pixels, seed=seed))
        return cls(images, holdout)

    def crops(
        self,
        n: int,
        size: int,
        rng: np.random.Generator,
        split: str = "train",
        augment: bool = True,
        zoom: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        """``n`` random tissue crops (N, 3, size, size) in [0, 1]; background crops are mostly rejected.

        With ``zoom`` (lo, hi) > 1, each crop covers ``f·size`` pixels (f log-uniform in [lo, hi]) shrunk to
        ``size`` by area averaging: the same tissue seen at a coarser pixel size.
        """
        pool = self.train if split == "train" else self.val
        pool = [im for im in pool if im.shape[0] >= size and im.shape[1] >= size]
        if not pool:
            raise ConfigError(f"no {split} image is at least {size}×{size} pixels")
        out = np.empty((n, size, size, 3), np.float32)
        for i in range(n):
            f = float(np.exp(rng.uniform(np.log(zoom[0]), np.log(zoom[1])))) if zoom[1] > zoom[0] else zoom[0]
            for attempt in range(20):
                im = pool[int(rng.integers(len(pool)))]
                src = min(int(round(size * f)), im.shape[0], im.shape[1])
                y = int(rng.integers(im.shape[0] - src + 1))
                x = int(rng.integers(im.shape[1] - src + 1))
                crop = im[y : y + src, x : x + src]
                if is_tissue(crop) or attempt == 19:
                    break
            if src != size:
                crop = _shrink(crop, size)
            if augment:
                crop = np.rot90(crop, int(rng.integers(4)))
                if rng.integers(2):
                    crop = crop[:, ::-1]
            out[i] = crop
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _shrink(crop: np.ndarray, size: int) -> np.ndarray:
    """Area-average (PIL box filter) an (h, w, 3) float crop down to size × size."""
    from PIL import Image

    return np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(crop[..., c]), mode="F").resize((size, size), Image.Resampling.BOX)
            )
            for c in range(3)
        ],
        axis=-1,
    )


def is_tissue(crop: np.ndarray) -> bool:
    """True when at least a fifth of the crop is stained (not glass background)."""
    chroma = crop.max(axis=-1) - crop.min(axis=-1)
    return bool(((chroma > 0.08) | (crop.mean(axis=-1) < 0.75)).mean() > 0.2)


def slide_regions(
    path: str | Path, max_pixels: int = 16_000_000, region: int = 1024, seed: int = 0
) -> list[np.ndarray]:
    """RGB pixels for training from one image, in memory bounded by ``max_pixels``.

    Small images come back whole. From a whole-slide image, non-overlapping ``region``-pixel squares of
    level 0 whose thumbnail is mostly tissue are read, a seeded random choice of as many as fit.
    """
    from lpfm_toolkit.sources import open_image

    with open_image(path) as handle:
        lv = handle.levels[0]
        if lv.width * lv.height <= max_pixels:
            return [_to_rgb_float(handle.read_region(0, 0, 0, lv.width, lv.height))]
        thumb = _to_rgb_float(handle.thumbnail(1024))
        sy, sx = thumb.shape[0] / lv.height, thumb.shape[1] / lv.width
        cells = []
        for y in range(0, lv.height - region + 1, region):
            for x in range(0, lv.width - region + 1, region):
                t = thumb[
                    int(y * sy) : max(int((y + region) * sy), int(y * sy) + 1),
                    int(x * sx) : max(int((x + region) * sx), int(x * sx) + 1),
                ]
                if t.size and is_tissue(t):
                    cells.append((x, y))
        if not cells:
            raise ConfigError(f"no tissue found in {path}", "check the slide, or pass tissue crops instead")
        rng = np.random.default_rng(seed)
        chosen = rng.permutation(len(cells))[: max(1, max_pixels // (region * region))]
        log.info("%s: training on %d of %d tissue regions of %d px", Path(path).name, len(chosen), len(cells), region)
        return [_to_rgb_float(handle.read_region(0, *cells[i], region, region)) for i in sorted(chosen)]


def _to_rgb_float(px: np.ndarray) -> np.ndarray:
    px = np.asarray(px)
    if px.ndim == 2:
        px = px[..., None]
    scale = float(np.iinfo(px.dtype).max) if np.issubdtype(px.dtype, np.integer) else 1.0
    rgb = np.repeat(px, 3, axis=-1) if px.shape[-1] == 1 else px[..., :3]
    return np.ascontiguousarray(rgb, dtype=np.float32) / scale


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image files inside any folder."""
    suffixes = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".png", ".jpg", ".jpeg", ".scn", ".vms", ".bif"}
    out: list[Path] = []
    for p in map(Path, paths):
        if p == TRAINING_DATA and not p.exists():
            log.warning("%s is not here (installed from a wheel?): training on the other images only", p)
            continue
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in suffixes))
        else:
            out.append(p)
    if not out:
        raise ConfigError(f"no images found in {', '.join(map(str, paths))}")
    return out


def read_rgb(path: str | Path, max_pixels: int = 64_000_000) -> np.ndarray:
    """The full-resolution RGB pixels of an image as float32 (H, W, 3) in [0, 1]."""
    px = read_channels(path, max_pixels)
    if px.shape[-1] == 1:
        px = np.repeat(px, 3, axis=-1)
    return np.ascontiguousarray(px[..., :3])


def read_channels(path: str | Path, max_pixels: int = 64_000_000) -> np.ndarray:
    """All channels of an image at full resolution as float32 (H, W, C) in [0, 1]."""
    from lpfm_toolkit.sources import open_image

    with open_image(path) as handle:
        lv = handle.levels[0]
        if lv.width * lv.height > max_pixels:
            raise ConfigError(
                f"{path} has {lv.width}×{lv.height} pixels at level 0",
                "crop tissue regions into smaller files, or pass a folder of tiles",
            )
        px = handle.read_region(0, 0, 0, lv.width, lv.height)
    px = np.asarray(px)
    if px.ndim == 2:
        px = px[..., None]
    scale = float(np.iinfo(px.dtype).max) if np.issubdtype(px.dtype, np.integer) else 1.0
    return np.ascontiguousarray(px, dtype=np.float32) / scale


def batch_rng(seed: int, step: int, stream: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """Generators for one batch, fixed by (seed, step) so resumed runs see the same data."""
    ss = np.random.SeedSequence([seed, step, stream])
    g = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
    return np.random.default_rng(ss), g


def degraded_pairs(clean: torch.Tensor, tasks: Sequence[str], g: torch.Generator, blind: bool = False) -> torch.Tensor:
    """Network inputs for ``clean`` under each sample's task (SR inputs are bicubic-upsampled back).

    ``blind``: the blind superset (:func:`degrade.blind_degrade`, seeded from ``g``) instead of LPFM's protocol.
    """
    out = torch.empty_like(clean)
    size = clean.shape[-2:]
    for i, name in enumerate(tasks):
        if blind:
            seed = int(torch.randint(0, 2**62, (), generator=g))
            arr, _ = degrade.blind_degrade(clean[i].permute(1, 2, 0).numpy(), seed, task=name)
            low = torch.from_numpy(arr).permute(2, 0, 1)[None]
        else:
            low = degrade.random_degradation(name, g).apply(clean[i : i + 1], g)
        out[i] = degrade.upsample(low, size=size)[0] if low.shape[-2:] != size else low[0]
    return out


def stain_augment(
    clean: torch.Tensor, config: TrainConfig, rng: np.random.Generator, g: torch.Generator
) -> torch.Tensor:
    """HED jitter (probability ``stain_jitter``) and H+DAB re-rendering (``ihc_sim``) of clean crops."""
    out = clean
    if config.ihc_sim > 0:
        pick = torch.from_numpy(rng.random(len(clean)) < config.ihc_sim)
        if pick.any():
            out = out.clone()
            out[pick] = simulate_ihc(clean[pick], g)
    if config.stain_jitter > 0:
        pick = torch.from_numpy(rng.random(len(clean)) < config.stain_jitter)
        if pick.any():
            out = out.clone()
            out[pick] = hed_jitter(out[pick], g, sigma=0.2, bias=0.03)
    return out.clamp(0, 1).contiguous()


def validation_set(bank: TileBank, config: TrainConfig, n: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed held-out crops per task: name → (network input, clean)."""
    out = {}
    rng, g = batch_rng(config.seed, 0, stream=99)
    clean = bank.crops(n, max(config.crop, 64), rng, split="val" if bank.val else "train", augment=False)
    for name in config.task_weights:
        out[name] = (degraded_pairs(clean, [name] * n, g, blind=config.blind), clean)
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(F.mse_loss(a.clamp(0, 1), b))
    return 10 * math.log10(1 / max(mse, 1e-12))


# ---------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, meta: dict[str, Any]
) -> None:
    """Weights and Adam moments in safetensors (no pickle), written atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"optim.{i}.{key}"] = value.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "meta": json.dumps(meta)})
    tmp.replace(path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights and optimiser moments; returns the step to continue from."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        step = int(f.metadata()["step"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        state = {
            key.split(".", 2)[2]: v if key.endswith(".step") else v.to(p.device)
            for key, v in tensors.items()
            if key.startswith(f"optim.{i}.")
        }
        if state:
            optimizer.state[p] = state
    return step


def _checkpoint_elapsed(path: Path) -> float:
    """Wall time the stage had spent when ``path`` was written (0 for checkpoints without it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata().get("meta", "{}"))
    return float(meta.get("elapsed_s", 0.0))


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _cosine(step: int, frac: float, lr: float, warmup: int = 50) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 1 % of ``lr`` as ``frac`` goes 0 → 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 1e-2 * lr + (1 - 1e-2) * lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _loop(
    stage: str,
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    total: int,
    config: TrainConfig,
    work_dir: Path,
    step_fn: Callable[[int], dict[str, float]],
    validate: Callable[[], dict[str, float]] | None,
    progress: TrainProgress | None,
    resume: bool,
) -> torch.nn.Module:
    """The shared loop: lr schedule, checkpoints, resume, logs, progress."""
    stage_dir = work_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt = stage_dir / "checkpoint.safetensors"
    optimizer = torch.optim.Adam(params, lr=config.lr)
    step = load_checkpoint(ckpt, model, optimizer) if resume and ckpt.exists() else 0
    spent = _checkpoint_elapsed(ckpt) if step else 0.0
    if step:
        log.info("%s: resuming at step %d (%.0f s spent before)", stage, step, spent)
    logfile = stage_dir / "log.jsonl"
    t0 = time.monotonic() - spent  # a resumed stage keeps its place in the wall-time schedule
    minutes = config.stage_minutes.get(stage, config.max_minutes)
    budget = minutes * 60 if minutes else None
    values: dict[str, float] = {}
    stopped_early = False
    while step < total:
        # with a wall-time budget the schedule follows whichever of steps or time runs out first
        frac = step / total if budget is None else max(step / total, (time.monotonic() - t0) / budget)
        if frac >= 1:
            log.info("%s: time budget reached at step %d", stage, step)
            stopped_early = True
            save_checkpoint(
                ckpt,
                model,
                optimizer,
                step,
                {"stage": stage, "stopped_by": "max_minutes", "elapsed_s": time.monotonic() - t0},
            )
            break
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, frac, config.lr)
        model.train()
        values = step_fn(step)
        loss = values.pop("_loss_tensor")  # type: ignore[arg-type]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        record = {"step": step, "time_s": round(time.monotonic() - t0, 2), **values}
        if validate is not None and (step % config.validate_every == 0 or step == total):
            model.eval()
            with torch.no_grad():
                record.update({f"val_{k}": v for k, v in validate().items()})
            values.update({k: v for k, v in record.items() if k.startswith("val_")})
        _append_log(logfile, record)
        if step % config.checkpoint_every == 0 or step == total:
            save_checkpoint(ckpt, model, optimizer, step, {"stage": stage, "elapsed_s": time.monotonic() - t0})
        if progress is not None:
            progress(stage, step, total, values)
    model.eval()
    if validate is not None and stopped_early:
        with torch.no_grad():
            _append_log(logfile, {"step": step, "final": True, **{f"val_{k}": v for k, v in validate().items()}})
    return model


# --------------------------------------------------------------------------------------------- stages


def _sample_tasks(config: TrainConfig, rng: np.random.Generator, n: int) -> list[str]:
    names = list(config.task_weights)
    w = np.array([config.task_weights[k] for k in names], dtype=np.float64)
    return [names[i] for i in rng.choice(len(names), size=n, p=w / w.sum())]


def train_restorer(
    bank: TileBank,
    config: TrainConfig,
    work_dir: Path,
    progress: TrainProgress | None = None,
    resume: bool = True,
    encoder: StainEncoder | None = None,
) -> Restorer:
    """L1 regression of clean tiles from degraded ones, all tasks in every batch.

    With ``config.condition_restorer`` the frozen ``encoder``'s features of the degraded input condition
    every block (FiLM); a ``cond_dropout`` fraction of samples sees them zeroed, which is also what the
    ablation "without the encoder" runs.
    """
    torch.manual_seed(config.seed)
    dev = _device(config)
    conditioned = config.condition_restorer and encoder is not None
    extra = {"extra_cond_dim": encoder.config.feature_dim} if conditioned else {}  # type: ignore[union-attr]
    model = Restorer(**{**config.restorer, **extra}).to(dev)
    if conditioned:
        encoder.to(dev).eval().requires_grad_(False)  # type: ignore[union-attr]
    codes = {name: TASK_NAMES.index(name) for name in config.task_weights}
    val = {k: (a.to(dev), b.to(dev)) for k, (a, b) in validation_set(bank, config).items()}

    def features(inputs: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor | None:
        if not conditioned:
            return None
        with torch.no_grad():
            feats = encoder(inputs)  # type: ignore[misc]
        if rng is not None and config.cond_dropout > 0:
            keep = torch.from_numpy(rng.random(len(inputs)) >= config.cond_dropout).to(feats)
            feats = feats * keep[:, None]
        return feats

    def step_fn(step: int) -> dict[str, float]:
        rng, g = batch_rng(config.seed, step, stream=1)
        clean = bank.crops(config.batch, config.crop, rng, zoom=config.zoom)
        clean = stain_augment(clean, config, rng, g)
        tasks = _sample_tasks(config, rng, config.batch)
        inputs = degraded_pairs(clean, tasks, g, blind=config.blind).to(dev, non_blocking=True)
        clean = clean.to(dev, non_blocking=True)
        out = model(inputs, torch.tensor([codes[t] for t in tasks], device=dev), features(inputs, rng))
        loss = F.l1_loss(out, clean)
        return {"_loss_tensor": loss, "loss": float(loss.detach())}  # type: ignore[dict-item]

    def validate() -> dict[str, float]:
        scores = {}
        for name, (inputs, clean) in val.items():
            out = model(inputs, torch.full((len(inputs),), codes[name], device=dev), features(inputs))
            scores[f"{name}_psnr"] = round(psnr(out, clean), 3)
            scores[f"{name}_input_psnr"] = round(psnr(inputs, clean), 3)
        return scores

    _loop(
        "restorer",
        model,
        list(model.parameters()),
        config.restorer_steps,
        config,
        work_dir,
        step_fn,
        validate,
        progress,
        resume,
    )
    _save_component(work_dir / "restorer", model)
    return model


def train_encoder(
    bank: TileBank, config: TrainConfig, work_dir: Path, progress: TrainProgress | None = None, resume: bool = True
) -> StainEncoder:
    """SimCLR/InfoNCE: a HED-jittered view and a Macenko re-stained (then jittered) view of each crop map
    together, other crops apart."""
    torch.manual_seed(config.seed + 1)
    dev = _device(config)
    model = StainEncoder(**config.encoder).to(dev)

    def view(x: torch.Tensor, rng: np.random.Generator, g: torch.Generator) -> torch.Tensor:
        if not config.encoder_degraded:
            return x
        # what the restorer will feed it: a degraded (then up-sampled) tile, or now and then a clean one
        tasks = [t if rng.random() < 0.8 else "none" for t in _sample_tasks(config, rng, len(x))]
        out = x.clone()
        idx = [i for i, t in enumerate(tasks) if t != "none"]
        if idx:
            out[idx] = degraded_pairs(x[idx], [tasks[i] for i in idx], g, blind=True)
        return out

    def step_fn(step: int) -> dict[str, float]:
        rng, g = batch_rng(config.seed, step, stream=2)
        clean = bank.crops(max(config.batch, 8), config.crop, rng, zoom=config.zoom)
        if config.ihc_sim > 0:
            clean = stain_augment(clean, replace(config, stain_jitter=0.0), rng, g)
        z1 = model.project(model(view(hed_jitter(clean, g), rng, g).to(dev)))
        z2 = model.project(model(view(hed_jitter(macenko_restain(clean, g), g), rng, g).to(dev)))
        loss = info_nce(z1, z2)
        return {"_loss_tensor": loss, "loss": float(loss.detach())}  # type: ignore[dict-item]

    _loop(
        "encoder",
        model,
        list(model.parameters()),
        config.encoder_steps,
        config,
        work_dir,
        step_fn,
        None,
        progress,
        resume,
    )
    _save_component(work_dir / "encoder", model)
    return model


def train_refiner(
    bank: TileBank,
    config: TrainConfig,
    work_dir: Path,
    restorer: Restorer,
    encoder: StainEncoder,
    progress: TrainProgress | None = None,
    resume: bool = True,
    follow_restorer: Path | None = None,
    follow_every: int = 50,
) -> Refiner:
    """Denoising diffusion on the residual clean − restored, conditioned on the restored tile and task.

    ``follow_restorer``: a restorer checkpoint still being trained by another process; its weights are
    reloaded every ``follow_every`` steps so the refiner tracks the restorer it will run behind.
    """
    torch.manual_seed(config.seed + 2)
    dev = _device(config)
    refiner_cfg = {"feature_dim": encoder.config.feature_dim, **config.refiner}
    model = Refiner(**refiner_cfg).to(dev)
    scheduler = make_scheduler("ddim", model.config.num_train_timesteps)
    alphas = scheduler.alphas_cumprod.to(dev)
    codes = {name: TASK_NAMES.index(name) for name in config.task_weights}
    restorer.to(dev).eval().requires_grad_(False)
    encoder.to(dev).eval().requires_grad_(False)

    def step_fn(step: int) -> dict[str, float]:
        if follow_restorer is not None and step % follow_every == 0 and follow_restorer.exists():
            _follow(follow_restorer, restorer)
        rng, g = batch_rng(config.seed, step, stream=3)
        clean = bank.crops(config.refiner_batch, config.crop, rng, zoom=config.zoom)
        clean = stain_augment(clean, config, rng, g)
        tasks = _sample_tasks(config, rng, config.refiner_batch)
        task_ids = torch.tensor([codes[t] for t in tasks], device=dev)
        inputs = degraded_pairs(clean, tasks, g, blind=config.blind).to(dev)
        clean = clean.to(dev)
        with torch.no_grad():
            feats = encoder(inputs)
            extra = feats if restorer.config.extra_cond_dim else None
            restored = restorer(inputs, task_ids, extra).clamp(0, 1)
        target = model.to_latent(clean - restored)
        t = torch.randint(0, model.config.num_train_timesteps, (len(clean),), generator=g)
        noise = torch.randn(target.shape, generator=g).to(dev)
        t = t.to(dev)
        a = alphas[t].float().view(-1, 1, 1, 1)
        noisy = a.sqrt() * target + (1 - a).sqrt() * noise
        pred = model(noisy, t, restored, task_ids, feats)
        loss = F.mse_loss(pred, target)
        return {"_loss_tensor": loss, "loss": float(loss.detach())}  # type: ignore[dict-item]

    _loop(
        "refiner",
        model,
        list(model.parameters()),
        config.refiner_steps,
        config,
        work_dir,
        step_fn,
        None,
        progress,
        resume,
    )
    _save_component(work_dir / "refiner", model)
    return model


def train_stainer(
    bank: TileBank, config: TrainConfig, work_dir: Path, progress: TrainProgress | None = None, resume: bool = True
) -> Restorer:
    """Learned virtual staining on simulation: two-channel fluorescence simulated from clean H&E crops
    (:func:`lpfm_toolkit.engine.fluorescence.simulate_fluorescence`) → that H&E, L1, task code virtual_stain."""
    from lpfm_toolkit.engine.fluorescence import simulate_fluorescence

    torch.manual_seed(config.seed + 3)
    dev = _device(config)
    model = Restorer(**{**config.stainer, "in_channels": 2, "out_channels": 3, "residual": False}).to(dev)
    code = TASK_NAMES.index("virtual_stain")
    rng_v, g_v = batch_rng(config.seed, 0, stream=98)
    val_clean = bank.crops(8, max(config.crop, 64), rng_v, split="val" if bank.val else "train", augment=False)
    val_in = simulate_fluorescence(val_clean, g_v).to(dev)
    val_clean = val_clean.to(dev)

    def step_fn(step: int) -> dict[str, float]:
        rng, g = batch_rng(config.seed, step, stream=5)
        clean = bank.crops(config.batch, config.crop, rng, zoom=config.zoom)
        if config.stain_jitter > 0:  # H&E of other labs' colours, never IHC: the target is H&E
            clean = stain_augment(clean, replace(config, ihc_sim=0.0), rng, g)
        fluo = simulate_fluorescence(clean, g).to(dev)
        loss = F.l1_loss(model(fluo, torch.full((len(fluo),), code, device=dev)), clean.to(dev))
        return {"_loss_tensor": loss, "loss": float(loss.detach())}  # type: ignore[dict-item]

    def validate() -> dict[str, float]:
        out = model(val_in, torch.full((len(val_in),), code, device=dev))
        return {"virtual_stain_psnr": round(psnr(out, val_clean), 3)}

    _loop(
        "stainer",
        model,
        list(model.parameters()),
        config.stainer_steps,
        config,
        work_dir,
        step_fn,
        validate,
        progress,
        resume,
    )
    _save_component(work_dir / "stainer", model)
    return model


def _device(config: TrainConfig) -> torch.device:
    from lpfm_toolkit.engine.device import select_device

    return select_device(config.device)


def _follow(checkpoint: Path, model: torch.nn.Module) -> None:
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        state = {k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}  # noqa: SIM118
        step = f.metadata().get("step")
    model.load_state_dict(state)
    log.info("refiner now follows restorer step %s", step)


def _save_component(folder: Path, model: torch.nn.Module) -> None:
    from lpfm_toolkit.engine.bundle import save_component

    save_component(folder / "final", model)


def _load_final(work_dir: Path, stage: str) -> torch.nn.Module:
    from lpfm_toolkit.engine.bundle import load_component

    folder = work_dir / stage / "final"
    if not folder.exists():
        raise ConfigError(f"stage {stage!r} has not finished in {work_dir}", f"run it first: --stages {stage}")
    return load_component(folder, stage)


def _wanted_stages(config: TrainConfig) -> tuple[str, ...]:
    return tuple(s for s in STAGES if s != "stainer" or config.stainer_steps > 0)


def train(
    config: TrainConfig,
    work_dir: str | Path,
    out: str | Path | None = None,
    stages: Sequence[str] = STAGES,
    progress: TrainProgress | None = None,
    resume: bool = True,
    name: str = "lpfm-custom",
) -> Path | None:
    """Run the chosen stages, then (when all components exist) write a bundle to ``out``."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown stages {sorted(unknown)}", f"choose from {', '.join(STAGES)}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    bank = TileBank.from_paths(config.images, config.holdout)
    timings: dict[str, float] = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        t0 = time.monotonic()
        if stage == "encoder":
            train_encoder(bank, config, work_dir, progress, resume)
        elif stage == "restorer":
            encoder = _load_final(work_dir, "encoder") if config.condition_restorer else None
            train_restorer(bank, config, work_dir, progress, resume, encoder=encoder)  # type: ignore[arg-type]
        elif stage == "stainer":
            if config.stainer_steps > 0:
                train_stainer(bank, config, work_dir, progress, resume)
        else:
            restorer = _load_final(work_dir, "restorer")
            encoder = _load_final(work_dir, "encoder")
            train_refiner(bank, config, work_dir, restorer, encoder, progress, resume)  # type: ignore[arg-type]
        timings[stage] = time.monotonic() - t0
        _record_timing(work_dir, stage, timings[stage])
    if out is None or not all((work_dir / s / "final").exists() for s in _wanted_stages(config)):
        return None
    return export_bundle(work_dir, out, name=name)


def _record_timing(work_dir: Path, stage: str, seconds: float) -> None:
    path = work_dir / "timings.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[stage] = data.get(stage, 0.0) + round(seconds, 1)
    path.write_text(json.dumps(data, indent=2))


def export_bundle(
    work_dir: str | Path,
    out: str | Path,
    name: str,
    metrics: dict[str, Any] | None = None,
    card_notes: str = "",
    **index_options: Any,
) -> Path:
    """Package the finished components of ``work_dir`` as a bundle folder with a model card."""
    from lpfm_toolkit.engine.bundle import write_bundle

    work_dir = Path(work_dir)
    config = json.loads((work_dir / "config.json").read_text())
    timings_path = work_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    components = {
        stage: _load_final(work_dir, stage)
        for stage in STAGES
        if stage in REQUIRED_STAGES or (work_dir / stage / "final").exists()
    }
    if "stainer" in components and "tasks" not in index_options:
        index_options["tasks"] = [*config.get("task_weights", {}), "virtual_stain"]
        index_options.setdefault("stains", {"source": ["fluorescence", "AF"], "target": "H&E"})
    return write_bundle(
        out,
        name=name,
        components=components,
        training=config,
        timings=timings,
        metrics=metrics,
        notes=card_notes,
        **index_options,
    )


# ---------------------------------------------------------------------------------- virtual staining


def read_pairs(folder: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Registered (source, target) image pairs from ``folder/source/NAME.*`` and ``folder/target/NAME.*``."""
    folder = Path(folder)
    src_dir, tgt_dir = folder / "source", folder / "target"
    if not src_dir.is_dir() or not tgt_dir.is_dir():
        raise ConfigError(
            f"{folder} must hold 'source/' and 'target/' folders of registered images",
            "name each pair the same in both, e.g. source/a.tif and target/a.png",
        )
    targets = {p.stem: p for p in expand_paths([tgt_dir])}
    pairs = []
    for src in expand_paths([src_dir]):
        if src.stem not in targets:
            raise ConfigError(f"{src.name} has no target image with the same name in {tgt_dir}")
        a, b = read_channels(src), read_rgb(targets[src.stem])
        if a.shape[:2] != b.shape[:2]:
            raise ConfigError(
                f"pair {src.stem}: source is {a.shape[1]}×{a.shape[0]}, target "
                f"{b.shape[1]}×{b.shape[0]}; pairs must be registered to the same size"
            )
        pairs.append((a, b))
    if len({a.shape[-1] for a, _ in pairs}) > 1:
        raise ConfigError("source images have different channel counts")
    return pairs


def train_stain(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    config: TrainConfig,
    work_dir: Path,
    progress: TrainProgress | None = None,
    resume: bool = True,
) -> Restorer:
    """A restorer mapping source-stain crops to registered target-stain crops (L1), task code virtual_stain."""
    torch.manual_seed(config.seed)
    channels = pairs[0][0].shape[-1]
    dev = _device(config)
    model = Restorer(**{**config.restorer, "in_channels": channels, "out_channels": 3, "residual": channels == 3}).to(
        dev
    )
    code = TASK_NAMES.index("virtual_stain")
    size = config.crop
    usable = [(a, b) for a, b in pairs if min(a.shape[:2]) >= size]
    if not usable:
        raise ConfigError(f"no pair is at least {size}×{size} pixels", "lower --crop")

    def sample(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(config.batch):
            a, b = usable[int(rng.integers(len(usable)))]
            y = int(rng.integers(a.shape[0] - size + 1))
            x = int(rng.integers(a.shape[1] - size + 1))
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            ca, cb = (np.rot90(c[y : y + size, x : x + size], k) for c in (a, b))
            xs.append(ca[:, ::-1] if flip else ca)
            ys.append(cb[:, ::-1] if flip else cb)
        to_t = lambda v: torch.from_numpy(np.ascontiguousarray(np.stack(v))).permute(0, 3, 1, 2)  # noqa: E731
        return to_t(xs), to_t(ys)

    def step_fn(step: int) -> dict[str, float]:
        rng, _ = batch_rng(config.seed, step, stream=4)
        src, tgt = (v.to(dev) for v in sample(rng))
        loss = F.l1_loss(model(src, torch.full((len(src),), code, device=dev)), tgt)
        return {"_loss_tensor": loss, "loss": float(loss.detach())}  # type: ignore[dict-item]

    _loop(
        "stain",
        model,
        list(model.parameters()),
        config.restorer_steps,
        config,
        work_dir,
        step_fn,
        None,
        progress,
        resume,
    )
    _save_component(work_dir / "stain", model)
    return model


def train_stain_bundle(
    config: TrainConfig,
    work_dir: str | Path,
    out: str | Path,
    name: str,
    source_stain: str,
    target_stain: str,
    progress: TrainProgress | None = None,
    resume: bool = True,
) -> Path:
    """Train virtual staining from ``config.pairs`` and write a restorer-only bundle for that translation."""
    from lpfm_toolkit.engine.bundle import write_bundle

    if not config.pairs:
        raise ConfigError("virtual-stain training needs registered pairs", "pass --pairs DIR")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    t0 = time.monotonic()
    model = train_stain(read_pairs(config.pairs), config, work_dir, progress, resume)
    _record_timing(work_dir, "stain", time.monotonic() - t0)
    return write_bundle(
        out,
        name=name,
        components={"restorer": model},
        training=config.to_dict(),
        timings=json.loads((work_dir / "timings.json").read_text()),
        tasks=["virtual_stain"],
        stains={"source": source_stain, "target": target_stain},
    )

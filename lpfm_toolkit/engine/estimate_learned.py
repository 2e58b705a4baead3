"""The learned degradation estimator: a tiny CNN of its own, trained on the blind degradation model.

Labels come for free: :func:`lpfm_toolkit.engine.degrade.blind_degrade` returns, with each degraded crop,
the blur kernel's RMS width, the noise σ actually added and the JPEG quality. The network sees the tile's
pixels (three strided convolutions, global average pooling) *and* the classical estimator's five numbers
(blur σ, noise σ, JPEG quality and grid score, tissue fraction), so it starts from the baseline and learns
where the baseline is wrong — noise hidden by JPEG, blur under noise, defocus and motion kernels.

Outputs: the added blur σ (px), the noise σ (0–255), and whether the tile went through JPEG with its
quality. It is shipped as ``estimator/config.json`` + ``estimator/model.safetensors`` in the default bundle
and loaded without pickle. Importing this module imports torch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lpfm_toolkit.engine.estimate import ClassicalEstimator, TileEstimate
from lpfm_toolkit.errors import ModelError

log = logging.getLogger(__name__)

ESTIMATOR_DIR = Path(__file__).resolve().parents[1] / "bundles" / "lpfm-tiny" / "estimator"
#: σ of a sharp scan's own point-spread function (px), added in quadrature to the predicted extra blur so
#: the learned blur σ is on the classical estimator's (effective σ) scale
SHARP_SIGMA = 0.8
N_FEATURES = 6
#: the blind model's task recipes drawn for training crops. Its free mixture alone; adding its blur- and
#: noise-dominated recipes ("any", "any", "deblur", "denoise") was tried and ranked σ no better (docs/qc.md).
TASK_MIX = ("any",)


def classical_features(est: TileEstimate) -> list[float]:
    """The classical estimate as network inputs, scaled to about unit range (NaN blur → 0 and a flag)."""
    blur_known = not math.isnan(est.blur_sigma)
    return [
        est.blur_sigma / 4.0 if blur_known else 0.0,
        1.0 if blur_known else 0.0,
        est.noise_sigma / 25.0,
        est.jpeg_quality / 100.0,
        est.jpeg_score,
        est.tissue,
    ]


class EstimatorNet(nn.Module):
    """Pixels → pooled features, concatenated with the classical features → four outputs."""

    def __init__(self, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.width, self.hidden = width, hidden
        self.body = nn.Sequential(
            nn.Conv2d(3, width // 2, 4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width // 2, width, 4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.GELU(),
        )
        self.head = nn.Sequential(nn.Linear(2 * width + N_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, 4))

    def forward(self, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """``x`` (N, 3, H, W) in [0, 1], ``feats`` (N, 6) → (N, 4): blur σ/2, noise σ/25, JPEG logit, quality/100."""
        pooled = self.body(x - 0.5).mean(dim=(2, 3))
        return self.head(torch.cat([pooled, feats], dim=1))

    def config(self) -> dict[str, Any]:
        return {"width": self.width, "hidden": self.hidden}


class LearnedEstimator:
    """Per-tile estimates from :class:`EstimatorNet`, on the same :class:`TileEstimate` scale as the classical one."""

    name = "learned"

    def __init__(self, net: EstimatorNet, checksum: str = "", brightfield: bool = True) -> None:
        self.net = net.eval()
        self.checksum = checksum
        self.classical = ClassicalEstimator(brightfield)

    @classmethod
    def load(cls, folder: str | Path = ESTIMATOR_DIR) -> LearnedEstimator:
        """Load ``config.json`` + safetensors weights from ``folder`` (no pickle)."""
        from safetensors.torch import load_file

        from lpfm_toolkit.engine.bundle import sha256_file

        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise ModelError(
                f"no learned estimator in {folder}",
                "use --estimator classical, or train one with `python benchmarks/qc_bench.py train`",
            )
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.get("class") != "EstimatorNet":
            raise ModelError(
                f"{cfg_path} is not an estimator config (class {cfg.get('class')!r})",
                "point at a bundle's estimator/ folder",
            )
        weights = folder / cfg.get("weights", "model.safetensors")
        if not weights.is_file():
            raise ModelError(f"the estimator weights {weights} are missing", "reinstall lpfm-toolkit")
        checksum = sha256_file(weights)
        if cfg.get("sha256") and cfg["sha256"] != checksum:
            raise ModelError(
                f"{weights} does not match the sha256 in {cfg_path}",
                "the file changed or is damaged: reinstall lpfm-toolkit or retrain the estimator",
            )
        net = EstimatorNet(**cfg.get("config", {}))
        try:
            net.load_state_dict(load_file(str(weights)))
        except (OSError, RuntimeError) as exc:
            raise ModelError(
                f"the estimator weights {weights} do not load ({exc})",
                "reinstall lpfm-toolkit or retrain the estimator",
            ) from exc
        return cls(net, checksum)

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp))
        tmp.chmod(0o644)  # package data: readable by everyone, like the other bundle files
        tmp.replace(folder / "model.safetensors")
        from lpfm_toolkit.engine.bundle import sha256_file

        self.checksum = sha256_file(folder / "model.safetensors")
        cfg = {
            "class": "EstimatorNet",
            "sha256": self.checksum,
            "config": self.net.config(),
            "weights": "model.safetensors",
            "sharp_sigma": SHARP_SIGMA,
            **(extra or {}),
        }
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return folder

    @torch.no_grad()
    def estimate(self, tiles: np.ndarray | Sequence[np.ndarray]) -> list[TileEstimate]:
        """Estimates for float tiles ``(N, H, W, 3)`` in [0, 1]."""
        base = self.classical.estimate(tiles)
        x = torch.from_numpy(np.ascontiguousarray(np.stack(list(tiles)), dtype=np.float32)).permute(0, 3, 1, 2)
        f = torch.tensor([classical_features(e) for e in base], dtype=torch.float32)
        out = self.net(x, f).numpy()
        res = []
        for e, o in zip(base, out):
            added = max(float(o[0]) * 2.0, 0.0)
            jpeg = float(o[2]) > 0.0
            quality = float(np.clip(o[3] * 100.0, 1.0, 100.0)) if jpeg else 100.0
            blur = math.sqrt(SHARP_SIGMA**2 + added**2) if e.tissue >= 0.05 else float("nan")
            res.append(
                TileEstimate(
                    tissue=e.tissue,
                    blur_sigma=blur,
                    noise_sigma=max(float(o[1]) * 25.0, 0.0),
                    jpeg_quality=quality,
                    jpeg_score=float(1 / (1 + math.exp(-float(o[2])))),
                    edges=e.edges,
                )
            )
        return res

    def estimate_tile(self, tile: np.ndarray) -> TileEstimate:
        return self.estimate(tile[None])[0]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.checksum}


# -- training -------------------------------------------------------------------------------------------------
def training_set(
    tissue: np.ndarray,
    n: int,
    crop: int = 128,
    seed: int = 0,
    p_clean: float = 0.3,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """``n`` crops of ``tissue`` (8-bit RGB) through the blind degradation model, with their labels.

    A fraction ``p_clean`` stays undegraded (the blind model almost always degrades something, but most of
    a slide is fine). Labels: added blur σ (kernel RMS width), noise σ added, JPEG quality (0: none).
    """
    from lpfm_toolkit.engine.degrade import blind_degrade
    from lpfm_toolkit.engine.estimate import tissue_mask

    rng = np.random.default_rng(seed)
    est = ClassicalEstimator()
    h, w = tissue.shape[:2]
    xs, fs, ys = [], [], []
    while len(xs) < n:
        y0, x0 = int(rng.integers(0, h - crop)), int(rng.integers(0, w - crop))
        clean = tissue[y0 : y0 + crop, x0 : x0 + crop].astype(np.float32) / 255
        if tissue_mask(clean).mean() < 0.25 and rng.random() < 0.8:
            continue  # mostly tissue, some glass
        clean = np.rot90(clean, int(rng.integers(0, 4)))
        if rng.random() < p_clean:
            img, label = clean, (0.0, 0.0, 0.0)
        else:
            task = TASK_MIX[0] if len(TASK_MIX) == 1 else str(rng.choice(TASK_MIX))
            img, info = blind_degrade(np.ascontiguousarray(clean), rng, task=task, scale=1)
            label = (float(info["blur_sigma_out"]), float(info["noise_sigma_total"]), float(info["jpeg_quality"]))
        img = np.ascontiguousarray(img, dtype=np.float32)
        xs.append(img)
        fs.append(classical_features(est.estimate_tile(img)))
        ys.append(label)
        if progress is not None:
            progress(len(xs), n)
    f = np.nan_to_num(np.asarray(fs, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return {"x": np.stack(xs), "f": f, "y": np.asarray(ys, np.float32)}


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    blur, noise, quality = y[:, 0], y[:, 1], y[:, 2]
    jpeg = (quality > 0).float()
    loss = nn.functional.l1_loss(out[:, 0], blur / 2.0) + nn.functional.l1_loss(out[:, 1], noise / 25.0)
    loss = loss + nn.functional.binary_cross_entropy_with_logits(out[:, 2], jpeg)
    if jpeg.sum() > 0:
        loss = loss + (jpeg * (out[:, 3] - quality / 100.0).abs()).sum() / jpeg.sum()
    return loss


def train(
    data: dict[str, np.ndarray],
    *,
    steps: int = 1500,
    batch: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    feature_dropout: float = 0.0,
    progress: Callable[[int, int, float], None] | None = None,
) -> LearnedEstimator:
    """Train an :class:`EstimatorNet` on :func:`training_set` output (Adam, cosine decay, flips).

    ``feature_dropout``: the fraction of samples whose classical numbers are hidden (zeroed), so the network
    also learns to read the pixels where the classical estimate fails.
    """
    torch.manual_seed(seed)
    net = EstimatorNet(width=width)
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).contiguous()
    f = torch.from_numpy(data["f"])
    y = torch.from_numpy(data["y"])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb = x[idx]
        if step % 2:
            xb = xb.flip(3)
        fb = f[idx]
        if feature_dropout > 0:
            fb = fb * (torch.rand((batch, 1), generator=g) >= feature_dropout).float()
        out = net(xb, fb)
        loss = loss_fn(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None and (step % 50 == 0 or step == steps - 1):
            progress(step + 1, steps, loss.item())
    log.info("estimator trained: %d steps in %.0f s", steps, time.perf_counter() - t0)
    return LearnedEstimator(net)

"""The learned degradation estimator: a small MLP on cheap per-tile spectral features.

:func:`tile_features` describes a tile by the *shape* of its luminance power spectrum (normalised by its
own low-frequency level, so the tissue's contrast drops out: blur shows as how fast the power falls, noise
as a flat floor), the chroma's spectrum, the 8-px block grid's harmonics, Donoho's noise σ, the classical
JPEG table fit, tissue fraction and contrast — no classical blur estimate, which is the costly part.
:class:`EstimatorMLP` maps them to the added blur σ (px), the noise σ (0–255), and whether the tile went
through JPEG with its quality.

Labels come for free: training crops of the training sources are degraded by a scanner's Gaussian blur →
noise → JPEG with known parameters, or by :func:`lpfm_toolkit.engine.degrade.blind_degrade`, which returns
the kernel's RMS width, the noise σ actually added and the JPEG quality. It is shipped as
``estimator/config.json`` + ``estimator/model.safetensors`` in the default bundle and loaded without
pickle; the older :class:`EstimatorNet` (a CNN joined with the classical numbers) still loads. Importing
this module imports torch.
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
#: classical numbers the older EstimatorNet takes
N_FEATURES = 6


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


#: radial bands of the power spectrum (0–0.5 cycles/px, and the corners beyond) and of the chroma's
N_BANDS, N_CHROMA = 24, 8
#: features per tile: luminance spectrum (normalised), its level, noise, chroma spectrum, 8-px block
#: harmonics, JPEG quality and grid score, tissue fraction and tissue contrast
N_SPECTRAL = (N_BANDS + 1) + 2 + (N_CHROMA + 1) + 2 + 3 + 4
_GEOMETRY: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def _geometry(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hann window (normalised to unit power), radial band index of every rfft2 bin (-1: DC), the same for
    the chroma's coarser bands, and the band sizes — cached per tile shape."""
    key = (h, w)
    if key not in _GEOMETRY:
        win = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
        win /= math.sqrt(float((win**2).sum()))
        r = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
        band = np.minimum((r / 0.5 * N_BANDS).astype(np.int64), N_BANDS)
        chroma = np.minimum((r / 0.5 * N_CHROMA).astype(np.int64), N_CHROMA)
        band[0, 0], chroma[0, 0] = N_BANDS + 1, N_CHROMA + 1  # DC: a bin of its own, dropped
        _GEOMETRY[key] = (
            win,
            band.ravel(),
            chroma.ravel(),
            np.maximum(np.bincount(band.ravel(), minlength=N_BANDS + 2)[: N_BANDS + 1], 1),
            np.maximum(np.bincount(chroma.ravel(), minlength=N_CHROMA + 2)[: N_CHROMA + 1], 1),
        )
    return _GEOMETRY[key]


def _log_bands(p: np.ndarray, index: np.ndarray, counts: np.ndarray) -> np.ndarray:
    sums = np.bincount(index, weights=p.ravel(), minlength=len(counts) + 1)[: len(counts)]
    return np.log10(sums / counts + 1e-12)


def tile_features(tile: np.ndarray) -> tuple[np.ndarray, float, int]:
    """The learned estimator's inputs for one float RGB tile in [0, 1], its tissue fraction and the number
    of edge-capable pixels (tissue pixels) — no blur estimate of the classical kind, which is the costly part.

    The luminance's power spectrum in radial bands, normalised by its own level at 0.02–0.08 cycles/px (so
    the tissue's contrast drops out and only the *shape* — how fast power falls, where the noise floor
    starts — remains); the chroma's spectrum (4:2:0 JPEG removes chroma above 0.25 cycles/px); the power at
    the 8-px block grid's harmonics against their neighbours; Donoho's noise σ on the luminance; the
    classical JPEG quantisation test; tissue fraction and the tissue's contrast.
    """
    from lpfm_toolkit.engine.estimate import estimate_jpeg, luminance, tissue_mask

    h, w = tile.shape[:2]
    mask = tissue_mask(tile)
    tissue = float(mask.mean())
    gray = luminance(tile)
    win, band, chroma_band, counts, chroma_counts = _geometry(h, w)
    chroma = tile[..., 2] - tile[..., 0] if tile.shape[-1] == 3 else gray
    both = np.fft.rfft2(np.stack([(gray - gray.mean()) * win, (chroma - chroma.mean()) * win]))
    power = both.real**2 + both.imag**2
    p, pc = power[0], power[1]
    spec = _log_bands(p, band, counts)
    level = float(spec[1:4].mean())
    import pywt

    hh = pywt.dwt2(gray, "db2", mode="symmetric")[1][2]
    noise = float(np.median(np.abs(hh))) / 0.6745
    log_noise = math.log10(noise**2 + 1e-8)
    cspec = _log_bands(pc, chroma_band, chroma_counts)
    clevel = float(cspec[1:3].mean())
    # 8-px block grid: power along the harmonics k/8 of both axes against the bins 3 away
    cols = np.log10(p.sum(axis=0) + 1e-12)
    rows = np.log10(np.fft.fftshift(p.sum(axis=1)) + 1e-12)
    block = []
    for k in (1, 2, 3):
        vals = []
        for line, n, centre in ((cols, w, 0), (rows, h, h // 2)):
            i = centre + int(round(k * n / 8))
            if 3 <= i < len(line) - 3:
                vals.append(line[i] - 0.5 * (line[i - 3] + line[i + 3]))
        block.append(float(np.mean(vals)) if vals else 0.0)
    quality, score = estimate_jpeg(gray)
    contrast = float(gray[mask].std()) if mask.sum() > 16 else 0.0
    feats = np.concatenate(
        [
            spec - level,
            [level, log_noise],
            cspec - clevel,
            [clevel, level - log_noise],
            block,
            [quality / 100.0, score, tissue, math.log10(contrast + 1e-4)],
        ]
    ).astype(np.float32)
    return feats, tissue, int(mask.sum())


def _quality(out: np.ndarray, feats: np.ndarray) -> float:
    """JPEG quality: 100 unless the network says JPEG; then the classical quantisation-table fit where it
    found a strong grid (an exact table match), else the network's own estimate."""
    from lpfm_toolkit.engine.estimate import JPEG_SCORE_MIN

    if out[2] <= 0.0:
        return 100.0
    if feats[_SCORE] >= JPEG_SCORE_MIN and feats[_QUALITY] < 1.0:
        return float(feats[_QUALITY]) * 100.0
    return float(np.clip(out[3] * 100.0, 1.0, 99.0))


#: where tile_features keeps the classical JPEG quality (/100) and grid score
_QUALITY, _SCORE = N_SPECTRAL - 4, N_SPECTRAL - 3


class EstimatorMLP(nn.Module):
    """Tile features (:func:`tile_features`, standardised by the stored training mean and std) → four
    outputs: log(added blur σ + 0.5), log(noise σ + 1), JPEG logit, quality/100."""

    def __init__(self, n_in: int = N_SPECTRAL, hidden: int = 128) -> None:
        super().__init__()
        self.n_in, self.hidden = n_in, hidden
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("std", torch.ones(n_in))
        self.body = nn.Sequential(
            nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 4)
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.body((f - self.mean) / self.std)

    def config(self) -> dict[str, Any]:
        return {"n_in": self.n_in, "hidden": self.hidden}


NETS: dict[str, type[nn.Module]] = {"EstimatorNet": EstimatorNet, "EstimatorMLP": EstimatorMLP}


class LearnedEstimator:
    """Per-tile estimates from a trained network, on the same :class:`TileEstimate` scale as the classical
    one: :class:`EstimatorMLP` on spectral features (the shipped one), or the older :class:`EstimatorNet`."""

    name = "learned"

    def __init__(self, net: nn.Module, checksum: str = "", brightfield: bool = True) -> None:
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
        if cfg.get("class") not in NETS:
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
        net = NETS[cfg["class"]](**cfg.get("config", {}))
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
            "class": type(self.net).__name__,
            "sha256": self.checksum,
            "config": self.net.config(),
            "weights": "model.safetensors",
            "sharp_sigma": SHARP_SIGMA,
            **(extra or {}),
        }
        tmp_cfg = folder / ".config.json.tmp"
        tmp_cfg.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        tmp_cfg.replace(folder / "config.json")
        return folder

    @torch.no_grad()
    def estimate(self, tiles: np.ndarray | Sequence[np.ndarray]) -> list[TileEstimate]:
        """Estimates for float tiles ``(N, H, W, 3)`` in [0, 1] (a sequence may mix tile sizes)."""
        if isinstance(self.net, EstimatorMLP):
            return self._estimate_mlp(tiles)
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

    def _estimate_mlp(self, tiles: np.ndarray | Sequence[np.ndarray]) -> list[TileEstimate]:
        from lpfm_toolkit.engine.estimate import MIN_TISSUE

        rows = [tile_features(np.asarray(t, dtype=np.float32)) for t in tiles]
        if not rows:
            return []
        out = self.net(torch.from_numpy(np.stack([r[0] for r in rows]))).numpy().astype(np.float64)
        res = []
        for (feats, tissue, _), o in zip(rows, out):
            added = max(math.exp(o[0]) - 0.5, 0.0)
            res.append(
                TileEstimate(
                    tissue=tissue,
                    blur_sigma=math.sqrt(SHARP_SIGMA**2 + added**2) if tissue >= MIN_TISSUE else float("nan"),
                    noise_sigma=max(math.exp(o[1]) - 1.0, 0.0),
                    jpeg_quality=_quality(o, feats),
                    jpeg_score=float(1 / (1 + math.exp(-o[2]))),
                    edges=0,  # no edge selection: the spectrum covers the whole tile
                )
            )
        return res

    def estimate_tile(self, tile: np.ndarray) -> TileEstimate:
        return self.estimate(tile[None])[0]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.checksum}


# -- training -------------------------------------------------------------------------------------------------
#: added Gaussian blur σ (px), noise σ (0–255) and JPEG quality of the "scanner" degradations drawn for
#: training (wider than the synthetic slides' ranges, so their ends are not the edge of what was seen)
TRAIN_BLUR, TRAIN_NOISE, TRAIN_QUALITY = (0.3, 4.8), (2.0, 48.0), (20, 95)


def degrade_crop(clean: np.ndarray, rng: np.random.Generator, p_clean: float = 0.2) -> tuple[np.ndarray, tuple]:
    """One training crop (8-bit RGB, with ``MARGIN`` px of context on every side) degraded, and its label
    (added blur σ, noise σ, JPEG quality or 0), at the crop's centre size.

    ``p_clean`` stay clean; of the rest, a quarter go through the blind degradation model's free mixture
    (anisotropic, defocus and motion kernels, shot noise, either order) and the others through a scanner's
    Gaussian blur → Gaussian noise → JPEG, each present with probability 0.55 (at least one).
    """
    from lpfm_toolkit.engine.degrade import blind_degrade
    from lpfm_toolkit.engine.estimate_synthetic import degrade_region

    m = MARGIN
    h, w = clean.shape[0] - 2 * m, clean.shape[1] - 2 * m
    if rng.random() < p_clean:
        return clean[m : m + h, m : m + w].astype(np.float32) / 255, (0.0, 0.0, 0.0)
    if rng.random() < 0.25:
        img, info = blind_degrade(clean[m : m + h, m : m + w].astype(np.float32) / 255, rng, task="any", scale=1)
        label = (float(info["blur_sigma_out"]), float(info["noise_sigma_total"]), float(info["jpeg_quality"]))
        return np.ascontiguousarray(img, dtype=np.float32), label
    while True:
        blur = float(rng.uniform(*TRAIN_BLUR)) if rng.random() < 0.55 else 0.0
        noise = float(rng.uniform(*TRAIN_NOISE)) if rng.random() < 0.55 else 0.0
        quality = int(rng.integers(TRAIN_QUALITY[0], TRAIN_QUALITY[1] + 1)) if rng.random() < 0.55 else 0
        if blur or noise or quality:
            break
    u8 = degrade_region(clean, (m, m, w, h), blur, noise, quality, rng, margin=m)
    return u8.astype(np.float32) / 255, (blur, noise, float(quality))


MARGIN = 16


def training_set(
    sources: Sequence[np.ndarray],
    n: int,
    crops: Sequence[int] = (256, 256, 256, 128),
    seed: int = 0,
    p_clean: float = 0.2,
    p_ihc: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """``n`` crops of the 8-bit RGB ``sources`` through :func:`degrade_crop`, as features and labels.

    Each crop is drawn from a random source at a random scale (0.5–1×, so sources scanned at 40× are seen
    near 20× too), sometimes re-rendered as haematoxylin + DAB (``p_ihc``: a stain augmentation, not an IHC
    source), then degraded. Returns ``f`` (n, :data:`N_SPECTRAL`) and ``y`` (n, 3): added blur σ, noise σ,
    JPEG quality (0: none).
    """
    from PIL import Image

    from lpfm_toolkit.engine.estimate import tissue_mask

    rng = np.random.default_rng(seed)
    weights = np.array([math.sqrt(s.shape[0] * s.shape[1]) for s in sources], np.float64)
    weights /= weights.sum()
    fs, ys = [], []
    while len(fs) < n:
        src = sources[int(rng.choice(len(sources), p=weights))]
        size = int(crops[int(rng.integers(0, len(crops)))]) + 2 * MARGIN
        scale = float(rng.uniform(0.5, 1.0))
        c = int(round(size / scale))
        if c > min(src.shape[:2]):
            c, scale = min(src.shape[:2]), 1.0
            size = min(size, c)
        y0, x0 = int(rng.integers(0, src.shape[0] - c + 1)), int(rng.integers(0, src.shape[1] - c + 1))
        crop = np.rot90(src[y0 : y0 + c, x0 : x0 + c, :3], int(rng.integers(0, 4)))
        if c != size:
            crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.LANCZOS))
        if tissue_mask(crop.astype(np.float32) / 255).mean() < 0.25 and rng.random() < 0.8:
            continue  # mostly tissue, some glass
        if rng.random() < p_ihc:
            from lpfm_toolkit.engine.models.encoder import simulate_ihc

            t = torch.from_numpy(crop.astype(np.float32) / 255).permute(2, 0, 1)[None]
            gen = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
            ihc = simulate_ihc(t, gen)[0].permute(1, 2, 0).clamp(0, 1).numpy()
            crop = np.round(ihc * 255).astype(np.uint8)
        img, label = degrade_crop(np.ascontiguousarray(crop), rng, p_clean)
        fs.append(tile_features(img)[0])
        ys.append(label)
        if progress is not None:
            progress(len(fs), n)
    f = np.nan_to_num(np.stack(fs).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return {"f": f, "y": np.asarray(ys, np.float32)}


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 on log(blur σ + 0.5) and log(noise σ + 1), cross-entropy on JPEG yes/no, L1 on quality/100."""
    blur, noise, quality = y[:, 0], y[:, 1], y[:, 2]
    jpeg = (quality > 0).float()
    loss = nn.functional.l1_loss(out[:, 0], torch.log(blur + 0.5))
    loss = loss + nn.functional.l1_loss(out[:, 1], torch.log(noise + 1.0))
    loss = loss + nn.functional.binary_cross_entropy_with_logits(out[:, 2], jpeg)
    if jpeg.sum() > 0:
        loss = loss + (jpeg * (out[:, 3] - quality / 100.0).abs()).sum() / jpeg.sum()
    return loss


def train(
    data: dict[str, np.ndarray],
    *,
    steps: int = 6000,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    hidden: int = 128,
    progress: Callable[[int, int, float], None] | None = None,
) -> LearnedEstimator:
    """Train an :class:`EstimatorMLP` on :func:`training_set` output (Adam, cosine decay, weight decay)."""
    torch.manual_seed(seed)
    f = torch.from_numpy(data["f"])
    y = torch.from_numpy(data["y"])
    net = EstimatorMLP(f.shape[1], hidden=hidden)
    net.mean.copy_(f.mean(0))
    net.std.copy_(f.std(0).clamp(min=1e-3))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, f.shape[0], (batch,), generator=g)
        loss = loss_fn(net(f[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None and (step % 500 == 0 or step == steps - 1):
            progress(step + 1, steps, loss.item())
    log.info("estimator trained: %d steps in %.0f s", steps, time.perf_counter() - t0)
    return LearnedEstimator(net.eval())

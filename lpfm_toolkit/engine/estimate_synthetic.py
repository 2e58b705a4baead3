"""Synthetic QC slides from real tissue: regions of known blur σ, noise σ and JPEG quality pasted onto a
mosaic of a real slide's pixels, with the truth for every tile. They score degradation estimators
(``benchmarks/qc_bench.py``, ``tests/test_qc*.py``) and let a lab check QC on its own tissue.

Degradations are applied to whole regions (blocks of ``block × block`` tiles on the tile grid) in a
scanner's order — blur, then noise, then JPEG — so every tile has exactly one known set of parameters.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: ranges of the pasted defects: Gaussian blur σ (px), Gaussian noise σ (0–255), JPEG quality
BLUR_RANGE = (1.5, 4.0)
NOISE_RANGE = (10.0, 40.0)
QUALITY_RANGE = (30, 60)


@dataclass(frozen=True)
class TileTruth:
    """The known degradation of one tile (``blur``/``noise`` 0 and ``quality`` 0 mean none)."""

    x: int
    y: int
    size: int
    blur: float
    noise: float
    quality: int
    tissue: float  # fraction of tissue in the clean tile (from the classical tissue mask)

    @property
    def clean(self) -> bool:
        return self.blur == 0 and self.noise == 0 and self.quality == 0


@dataclass
class SyntheticSlide:
    """An 8-bit RGB image, its clean original, and the truth per tile of a ``tile``-px grid."""

    image: np.ndarray
    clean: np.ndarray
    tile: int
    truth: list[TileTruth] = field(default_factory=list)

    def truth_at(self, x: int, y: int) -> TileTruth | None:
        for t in self.truth:
            if t.x == x and t.y == y:
                return t
        return None

    def write(self, path: str | Path, mpp: float = 0.5) -> Path:
        """Write the degraded image as an uncompressed tiled OME-TIFF (lossless, so no JPEG is added)."""
        import tifffile

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tifffile.imwrite(
            tmp,
            self.image,
            tile=(256, 256),
            photometric="rgb",
            compression=None,
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
            ome=True,
        )
        tmp.replace(path)
        return path

    def truth_records(self) -> list[dict[str, Any]]:
        return [asdict(t) for t in self.truth]


def jpeg_roundtrip(u8: np.ndarray, quality: int) -> np.ndarray:
    """An 8-bit RGB image through Pillow's JPEG (YCbCr 4:2:0) at ``quality`` and back."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def tissue_mosaic(
    source: np.ndarray | Sequence[np.ndarray],
    height: int,
    width: int,
    seed: int = 0,
    patch: int = 512,
    min_tissue: float = 0.3,
) -> np.ndarray:
    """A ``height × width`` image of randomly flipped/rotated ``patch``-px crops of ``source`` (8-bit RGB,
    or several: each crop from a random one), each with at least ``min_tissue`` tissue (a few glass patches
    are kept, as on a real slide)."""
    from lpfm_toolkit.engine.estimate import tissue_mask

    rng = np.random.default_rng(seed)
    sources = [source] if isinstance(source, np.ndarray) else list(source)
    out = np.empty((height, width, 3), np.uint8)
    p = min([patch] + [min(s.shape[:2]) for s in sources])
    for y in range(0, height, p):
        for x in range(0, width, p):
            for _ in range(20):
                src = sources[int(rng.integers(0, len(sources)))]
                sh, sw = src.shape[:2]
                cy, cx = int(rng.integers(0, sh - p + 1)), int(rng.integers(0, sw - p + 1))
                crop = src[cy : cy + p, cx : cx + p, :3]
                if tissue_mask(crop.astype(np.float32) / 255).mean() >= min_tissue or rng.random() < 0.1:
                    break
            crop = np.rot90(crop, int(rng.integers(0, 4)))
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            h, w = min(p, height - y), min(p, width - x)
            out[y : y + h, x : x + w] = crop[:h, :w]
    return out


def degrade_region(
    clean: np.ndarray,
    box: tuple[int, int, int, int],
    blur: float,
    noise: float,
    quality: int,
    rng: np.random.Generator,
    margin: int = 16,
) -> np.ndarray:
    """The pixels of ``box`` (x, y, w, h) of ``clean`` (8-bit RGB) blurred (Gaussian σ), then noisy (σ on
    0–255), then JPEG-compressed (``quality``; 0 for none), as a scanner would; blur sees ``margin`` px of
    real context around the box."""
    from scipy import ndimage

    x0, y0, w, h = box
    ya, xa = max(0, y0 - margin), max(0, x0 - margin)
    yb, xb = min(clean.shape[0], y0 + h + margin), min(clean.shape[1], x0 + w + margin)
    region = clean[ya:yb, xa:xb].astype(np.float32) / 255
    if blur:
        region = ndimage.gaussian_filter(region, (blur, blur, 0), mode="reflect")
    region = region[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w]
    if noise:
        region = region + rng.normal(0, noise / 255, region.shape).astype(np.float32)
    u8 = np.clip(np.round(region * 255), 0, 255).astype(np.uint8)
    return jpeg_roundtrip(u8, quality) if quality else u8


def synthetic_slide(
    clean: np.ndarray,
    *,
    tile: int = 256,
    block: int = 2,
    seed: int = 0,
    p_blur: float = 0.3,
    p_noise: float = 0.3,
    p_jpeg: float = 0.25,
) -> SyntheticSlide:
    """Paste degradations onto ``clean`` (8-bit RGB) in regions of ``block × block`` tiles.

    Each region independently gets Gaussian blur (σ in :data:`BLUR_RANGE`) with probability ``p_blur``,
    noise (:data:`NOISE_RANGE`) with ``p_noise`` and JPEG (:data:`QUALITY_RANGE`) with ``p_jpeg``; about
    ``(1-p_blur)(1-p_noise)(1-p_jpeg)`` of the regions stay clean.
    """
    from lpfm_toolkit.engine.estimate import tissue_mask

    rng = np.random.default_rng(seed)
    h, w = clean.shape[:2]
    img = clean.copy()
    size = tile * block
    truth: list[TileTruth] = []
    for y0 in range(0, h - tile + 1, size):
        for x0 in range(0, w - tile + 1, size):
            y1, x1 = min(h, y0 + size), min(w, x0 + size)
            blur = float(rng.uniform(*BLUR_RANGE)) if rng.random() < p_blur else 0.0
            noise = float(rng.uniform(*NOISE_RANGE)) if rng.random() < p_noise else 0.0
            quality = int(rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1)) if rng.random() < p_jpeg else 0
            if blur or noise or quality:
                img[y0:y1, x0:x1] = degrade_region(clean, (x0, y0, x1 - x0, y1 - y0), blur, noise, quality, rng)
            for ty in range(y0, y1 - tile + 1, tile):
                for tx in range(x0, x1 - tile + 1, tile):
                    frac = float(tissue_mask(clean[ty : ty + tile, tx : tx + tile].astype(np.float32) / 255).mean())
                    truth.append(TileTruth(tx, ty, tile, round(blur, 3), round(noise, 3), quality, round(frac, 4)))
    return SyntheticSlide(img, clean, tile, truth)


def sample_tissue(part: str = "holdout") -> np.ndarray:
    """Real tissue from the bundled sample slide (which is in the wheel): its bottom 20 % (``holdout``) or
    the rest (``train``), 8-bit RGB — for tests and pictures that need tissue without the repository. The
    learned estimator is trained on the whole slide; its numbers are measured on :func:`source_tissue`
    ``("eval")``."""
    from importlib import resources

    from lpfm_toolkit.sources import open_image

    path = Path(str(resources.files("lpfm_toolkit") / "data" / "cmu_small_region.svs"))
    with open_image(path) as h:
        lv = h.levels[0]
        cut = int(lv.height * 0.8)
        if part == "holdout":
            return h.read_region(0, 0, cut, lv.width, lv.height - cut)
        if part == "train":
            return h.read_region(0, 0, 0, lv.width, cut)
    raise ValueError(f"part {part!r} is not 'holdout' or 'train'")


#: the repository's training and cross-source evaluation images (training_data/SOURCES.md); not in the wheel
TRAINING_DATA = Path(__file__).resolve().parents[2] / "training_data"
#: the pixel size every source is brought to (µm/px): the training slides' 20× scale
TARGET_MPP = 0.5


def _read_source(path: Path, mpp: float | None) -> np.ndarray:
    """An image's full level 0 as 8-bit RGB, its grey glass (if any) brought to white, resampled (Lanczos)
    to :data:`TARGET_MPP` when its pixel size is known and finer."""
    from PIL import Image

    from lpfm_toolkit.sources import open_image

    with open_image(path) as h:
        lv = h.levels[0]
        img = h.read_region(0, 0, 0, lv.width, lv.height)[..., :3]
        mpp = mpp or (h.mpp[0] if h.mpp else None)
    white = np.percentile(img.reshape(-1, 3), 99.5, axis=0)
    if float(white.max() - white.min()) < 16 and float(white.min()) > 180:
        # grey glass darker than white (Hamamatsu ~229, Olympus ~216): brought to white, as the tissue
        # mask's fixed optical-density threshold expects (docs/qc.md, limits)
        img = np.clip(np.round(img.astype(np.float32) * (255.0 / white)), 0, 255).astype(np.uint8)
    if mpp and mpp < TARGET_MPP * 0.95:
        f = mpp / TARGET_MPP
        size = (round(img.shape[1] * f), round(img.shape[0] * f))
        img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(size, Image.LANCZOS))
    return np.ascontiguousarray(img, dtype=np.uint8)


def source_tissue(split: str) -> dict[str, np.ndarray]:
    """The real tissue of one split, by file name, 8-bit RGB at about 0.5 µm/px.

    ``train``: the bundled sample slide and ``training_data/train/`` (what the learned estimator is trained
    on). ``eval``: ``training_data/eval/`` — other scanners (Hamamatsu, Olympus), other tissue and a real
    Ki67 IHC stain, never used in training; scanned at 0.23–0.35 µm/px and resampled to 0.5 µm/px, the scale
    QC reads a 20× slide at.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r} is not 'train' or 'eval'")
    folder = TRAINING_DATA / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: the training images live in the repository, not the wheel")
    out: dict[str, np.ndarray] = {}
    if split == "train":
        from importlib import resources

        out["cmu_small_region.svs"] = _read_source(
            Path(str(resources.files("lpfm_toolkit") / "data" / "cmu_small_region.svs")), None
        )
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in (".svs", ".tif", ".tiff", ".png"):
            out[path.name] = _read_source(path, None)
    return out


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U; ties count half); NaN scores rank lowest."""
    from scipy.stats import rankdata

    s = np.where(np.isnan(scores), -np.inf, np.asarray(scores, np.float64))
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_estimates(
    truth: list[TileTruth],
    estimates: list[Any],
    thresholds: Any = None,
    min_tissue: float = 0.25,
    sparse: tuple[float, float] = (0.25, 0.6),
) -> dict[str, Any]:
    """Detection and σ-accuracy of per-tile ``estimates`` (TileEstimate-like) against ``truth``.

    Only tiles with at least ``min_tissue`` tissue are scored. Per defect: ROC AUC of the estimate as a
    detector (blur σ, noise σ, 100 − JPEG quality), Spearman ρ of the estimate with the true value over the
    tiles that have the defect, and the false-positive rate at ``thresholds`` on clean tiles — all clean
    tissue, and the sparse ones (tissue fraction in ``sparse``: loose stroma, fat), where blur detectors fail.
    """
    from scipy.stats import spearmanr

    from lpfm_toolkit.engine.estimate import Thresholds

    thresholds = thresholds or Thresholds()
    keep = [i for i, t in enumerate(truth) if t.tissue >= min_tissue]
    tr = [truth[i] for i in keep]
    es = [estimates[i] for i in keep]
    out: dict[str, Any] = {"tiles": len(tr)}
    columns = {
        "blur": (np.array([t.blur for t in tr]), np.array([e.blur_sigma for e in es], np.float64), 1.0),
        "noise": (np.array([t.noise for t in tr]), np.array([e.noise_sigma for e in es], np.float64), 1.0),
        "jpeg": (
            np.array([t.quality for t in tr], np.float64),
            np.array([e.jpeg_quality for e in es], np.float64),
            -1.0,
        ),
    }
    flags = [e.flags(thresholds, min_tissue) for e in es]
    flag_key = {"blur": "out_of_focus", "noise": "noisy", "jpeg": "compressed"}
    clean = np.array([t.clean for t in tr])
    sparse_clean = clean & np.array([sparse[0] <= t.tissue < sparse[1] for t in tr])
    for name, (true, est, sign) in columns.items():
        pos = true > 0
        detector = sign * est if sign > 0 else 100.0 - est
        has = pos & ~np.isnan(est)
        rho = float(spearmanr(true[has], est[has])[0]) if has.sum() > 2 else float("nan")
        alone = has & np.array([sum(map(bool, (t.blur, t.noise, t.quality))) == 1 for t in tr])
        rho_alone = float(spearmanr(true[alone], est[alone])[0]) if alone.sum() > 2 else float("nan")
        mixed = has & ~alone
        rho_mixed = float(spearmanr(true[mixed], est[mixed])[0]) if mixed.sum() > 2 else float("nan")
        flagged = np.array([f[flag_key[name]] for f in flags])
        # how the other defects confound this one: ρ where each other defect is on top, and how often the
        # tiles with only other defects are flagged for this one
        others = {k: v[0] > 0 for k, v in columns.items() if k != name}
        with_other = {}
        for other, present in others.items():
            both = has & present
            with_other[other] = float(spearmanr(true[both], est[both])[0]) if both.sum() > 2 else float("nan")
        only_others = ~pos & ~clean
        out[name] = {
            "spearman_with": with_other,
            "flagged_without_it": float(flagged[only_others].mean()) if only_others.any() else float("nan"),
            "positives": int(pos.sum()),
            "auc": roc_auc(detector, pos),
            "spearman": rho,
            "spearman_alone": rho_alone,  # tiles with only this defect
            "spearman_mixed": rho_mixed,  # tiles with this defect and another
            "tpr": float(flagged[pos].mean()) if pos.any() else float("nan"),
            "fpr_clean": float(flagged[clean].mean()) if clean.any() else float("nan"),
            "fpr_sparse": float(flagged[sparse_clean].mean()) if sparse_clean.any() else float("nan"),
        }
    anyflag = np.array([any(f.values()) for f in flags])
    out["clean_tiles"] = int(clean.sum())
    out["sparse_clean_tiles"] = int(sparse_clean.sum())
    out["fpr_any_clean"] = float(anyflag[clean].mean()) if clean.any() else float("nan")
    out["fpr_any_sparse"] = float(anyflag[sparse_clean].mean()) if sparse_clean.any() else float("nan")
    return out

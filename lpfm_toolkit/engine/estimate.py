"""Degradation estimates per tile, without weights: focus (as an effective Gaussian σ), noise σ, JPEG
quality, effective resolution, and the tissue mask that keeps glass and sparse stroma or fat from being
called blurry.

The **blur** estimate is the re-blur gradient ratio (Zhuo & Sim 2011): at an edge blurred by a Gaussian of
σ, the gradient magnitude measured at scale ``s`` is ``A / √(2π(σ² + s²))``, so the ratio ``r`` of the
magnitudes at two scales ``s_a < s_b`` gives ``σ² = (r² s_b² − s_a²) / (1 − r²)`` whatever the edge's
contrast ``A``. It is taken over the strongest edges inside the tissue mask, after removing the noise's own
gradient energy (known for white noise of the estimated σ), so faint stroma is not "blurry" and noise does
not look "sharp". A tile with too few edges gets no blur estimate (NaN) instead of a guess.

**Noise** is Donoho's wavelet MAD estimate (as :func:`skimage.restoration.estimate_sigma`) on each channel, on the 0–255 scale.
**JPEG** is found from the quantisation it leaves in each 8×8 block's DCT coefficients (see
:func:`estimate_jpeg`): the quality of the standard table that fits, 100 when none does. It reads JPEG in
YCbCr (what re-compression, exports and most scanners write); scanners that compress R, G and B directly
(some Aperio files, the sample slide among them) leave no trace in the luminance and read as uncompressed. **Effective resolution** is the full width
at half maximum of the effective point-spread function, ``2.355·σ``, in µm when the pixel size is known.

Everything here is numpy/scipy/scikit-image; importing it imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: scales (px) of the two gradient measurements of the re-blur ratio
SCALE_A, SCALE_B = 1.0, 2.0
#: fraction of the tissue pixels, strongest edges first, used for the blur ratio
EDGE_FRACTION = 0.1
#: a tile needs at least this many edge pixels (and this much tissue) for a blur estimate
MIN_EDGE_PIXELS = 200
MIN_TISSUE = 0.05
#: the ratio of squared gradients above which edges are indistinguishable from flat; blur σ is capped here
MAX_RATIO = 0.97
MAX_BLUR = 8.0
#: optical density (summed over R, G, B) above which a brightfield pixel is tissue, and saturation
TISSUE_OD = 0.25
TISSUE_SAT = 0.08
#: default flag thresholds: effective blur σ (px), noise σ (0–255), JPEG quality
BLUR_THRESHOLD = 1.8
NOISE_THRESHOLD = 8.0
QUALITY_THRESHOLD = 60.0
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class Thresholds:
    """When a tile is flagged: blur σ above ``blur`` px, noise σ above ``noise``, JPEG quality below ``quality``."""

    blur: float = BLUR_THRESHOLD
    noise: float = NOISE_THRESHOLD
    quality: float = QUALITY_THRESHOLD

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class TileEstimate:
    """What one tile looks like: NaN where a quantity cannot be measured (glass has no edges)."""

    tissue: float  # fraction of tissue pixels
    blur_sigma: float  # effective Gaussian σ of the tile's point-spread function, px (NaN: too few edges)
    noise_sigma: float  # noise σ on the 0–255 scale
    jpeg_quality: float  # estimated JPEG quality (100: no compression found)
    jpeg_score: float  # strength of the JPEG quantisation grid, 0 (none) to 1
    edges: int = 0  # edge pixels the classical blur estimate used (0 from the learned estimator)

    def flags(self, thresholds: Thresholds = Thresholds(), min_tissue: float = 0.25) -> dict[str, bool]:
        """``out_of_focus``, ``noisy``, ``compressed`` for this tile (only tiles with enough tissue are judged)."""
        judged = self.tissue >= min_tissue
        return {
            "out_of_focus": bool(judged and not math.isnan(self.blur_sigma) and self.blur_sigma > thresholds.blur),
            "noisy": bool(judged and self.noise_sigma > thresholds.noise),
            "compressed": bool(judged and self.jpeg_quality < thresholds.quality),
        }

    def resolution(self, mpp: float | None = None) -> float:
        """Effective resolution: FWHM of the point-spread function, in µm with ``mpp``, else px."""
        if math.isnan(self.blur_sigma):
            return float("nan")
        return 2.3548 * self.blur_sigma * (mpp if mpp else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def luminance(tile: np.ndarray) -> np.ndarray:
    """One float32 channel: luma of RGB, the mean of other channel counts."""
    if tile.shape[-1] == 3:
        return tile @ _LUMA
    return tile.mean(axis=-1, dtype=np.float32)


def tissue_mask(tile: np.ndarray, brightfield: bool = True) -> np.ndarray:
    """Pixels that are tissue. Brightfield: enough optical density or colour (glass is bright and grey).

    Fluorescence: pixels brighter than the tile's dim background (Otsu on the luminance, when the tile is
    not uniform).
    """
    if brightfield and tile.shape[-1] == 3:
        # on 4×4 block means (pixel noise on glass is not colour, and a 4 px mask is fine enough), then
        # summed optical density > TISSUE_OD  ⇔  the product of the channels < exp(-TISSUE_OD), no logarithms
        h, w = tile.shape[:2]
        hb, wb = -(-h // 4), -(-w // 4)
        padded = tile if (h % 4, w % 4) == (0, 0) else np.pad(tile, ((0, hb * 4 - h), (0, wb * 4 - w), (0, 0)), "edge")
        # two contiguous sums (5× faster than a mean over axes 1 and 3)
        rows = padded.reshape(hb, 4, wb * 4, 3).sum(axis=1, dtype=np.float32)
        small = rows.reshape(hb, wb, 4, 3).sum(axis=2) * np.float32(1 / 16)
        r, g, b = (np.maximum(small[..., c], 1 / 255) for c in range(3))
        dense = r * g * b < math.exp(-TISSUE_OD)
        mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
        mask = dense | (mx - mn > TISSUE_SAT * np.maximum(mx, 1e-3))
        return np.repeat(np.repeat(mask, 4, axis=0), 4, axis=1)[:h, :w]
    g = luminance(tile)
    if float(g.max() - g.min()) < 1e-3:
        return np.zeros(g.shape, bool)
    from skimage.filters import threshold_otsu

    return g > threshold_otsu(g)


def estimate_noise(tile: np.ndarray) -> float:
    """Noise σ on the 0–255 scale: the mean over channels of Donoho's estimate, the median absolute finest
    diagonal db2 wavelet coefficient / 0.6745 (what :func:`skimage.restoration.estimate_sigma` computes)."""
    import pywt

    sig = []
    for c in range(tile.shape[-1]):
        hh = pywt.dwt2(tile[..., c].astype(np.float32, copy=False), "db2", mode="symmetric")[1][2]
        sig.append(float(np.median(np.abs(hh))) / 0.6745)
    return float(np.mean(sig)) * 255.0


def estimate_blur(gray: np.ndarray, mask: np.ndarray, noise_sigma: float = 0.0) -> tuple[float, int]:
    """Effective Gaussian σ (px) of the edges inside ``mask``, and how many edge pixels it used.

    ``noise_sigma`` (0–255) removes the noise's expected gradient energy at each scale first.
    """
    from scipy import ndimage

    a = ndimage.gaussian_gradient_magnitude(gray, SCALE_A)
    b = ndimage.gaussian_gradient_magnitude(gray, SCALE_B)
    # Ignore a border as wide as the larger filter's reach: reflection invents edges there.
    m = int(math.ceil(3 * SCALE_B))
    inner = np.zeros_like(mask)
    inner[m:-m, m:-m] = mask[m:-m, m:-m]
    vals_b = b[inner]
    if vals_b.size < MIN_EDGE_PIXELS / EDGE_FRACTION:
        return float("nan"), 0
    k = int(vals_b.size * (1.0 - EDGE_FRACTION))
    thr = np.partition(vals_b, k)[k]
    sel = inner & (b >= thr)
    n = int(sel.sum())
    if n < MIN_EDGE_PIXELS:
        return float("nan"), n
    s2n = (noise_sigma / 255.0) ** 2
    a2 = float(np.mean(a[sel] ** 2)) - s2n / (4 * math.pi * SCALE_A**4)
    b2 = float(np.mean(b[sel] ** 2)) - s2n / (4 * math.pi * SCALE_B**4)
    if a2 <= 0 or b2 <= 0:
        return float("nan"), n  # edges drowned in noise
    r2 = b2 / a2
    if r2 >= MAX_RATIO:
        return float("nan"), n  # flatter than any edge: no blur can be read
    sigma2 = (r2 * SCALE_B**2 - SCALE_A**2) / (1.0 - r2)
    return float(min(math.sqrt(max(sigma2, 0.0)), MAX_BLUR)), n


# fmt: off
_JPEG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float32).reshape(8, 8)
# fmt: on
#: the qualities the quantisation test tries (IJG scaling of the standard luminance table)
JPEG_QUALITIES = np.arange(20, 99)
#: a quantisation-grid score at least this high means "JPEG-compressed at that quality"
JPEG_SCORE_MIN = 0.5


def jpeg_table(quality: float) -> np.ndarray:
    """The standard (IJG) luminance quantisation table at ``quality`` (1–100)."""
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    return np.clip(np.floor((_JPEG_LUMA * scale + 50.0) / 100.0), 1, 255)


_TABLES = np.stack([jpeg_table(float(q)) for q in JPEG_QUALITIES])
# per table, the coefficients it is scored on — steps smaller than the rounding noise of decoded 8-bit pixels
# say nothing, nor does DC — and their steps
_TABLE_INDEX = [np.flatnonzero((t >= 3).ravel() & (np.arange(64) > 0)) for t in _TABLES]
_TABLE_STEPS = [t.ravel()[i] for t, i in zip(_TABLES, _TABLE_INDEX)]


def _dct_matrix() -> np.ndarray:
    k, n = np.arange(8)[:, None], np.arange(8)[None, :]
    c = np.cos(np.pi * (2 * n + 1) * k / 16) * np.sqrt(2 / 8)
    c[0] /= np.sqrt(2)
    return c.astype(np.float32)


_DCT = _dct_matrix()  # orthonormal DCT-II, the transform JPEG uses on 8×8 blocks


def _dct_blocks(g: np.ndarray, oy: int, ox: int, limit: int | None = None) -> np.ndarray:
    h, w = (g.shape[0] - oy) // 8 * 8, (g.shape[1] - ox) // 8 * 8
    if limit is not None and w >= 8:
        h = min(h, -(-limit // (w // 8)) * 8)  # only the block rows the first ``limit`` blocks lie in
    b = g[oy : oy + h, ox : ox + w].reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
    if limit is not None:
        b = b[:limit]
    return _DCT @ (b - 128.0) @ _DCT.T


def _grid_offset(g: np.ndarray, oy: int | None, ox: int | None, limit: int) -> int:
    """The offset (0–7) along the axis given as None where the high frequencies across it are most often
    zero: the first ``limit`` blocks of each trial grid, trials of the same grid size in one transform."""
    h, w = g.shape
    crops = {}
    for o in range(8):
        y0, x0 = (oy, o) if ox is None else (o, ox)
        hh, ww = (h - y0) // 8 * 8, (w - x0) // 8 * 8
        hh = min(hh, -(-limit // max(ww // 8, 1)) * 8)  # only the block rows the first blocks lie in
        crops[o] = g[y0 : y0 + hh, x0 : x0 + ww]
    zeros = np.zeros(8)
    for shape in {c.shape for c in crops.values()}:
        group = [o for o, c in crops.items() if c.shape == shape]
        hh, ww = shape
        b = np.stack([crops[o] for o in group]).reshape(len(group), hh // 8, 8, ww // 8, 8)
        b = b.transpose(0, 1, 3, 2, 4).reshape(len(group), -1, 8, 8)[:, :limit]
        c = _DCT @ (b - 128.0) @ _DCT.T
        hf = c[:, :, :, 5:] if ox is None else c[:, :, 5:, :]
        zeros[group] = (np.abs(hf) < 0.6).reshape(len(group), -1).mean(axis=1)
    return int(np.argmax(zeros))


def estimate_jpeg(gray: np.ndarray, max_blocks: int = 256) -> tuple[float, float]:
    """JPEG quality (100: no compression found) and the strength of its quantisation grid (0–1).

    JPEG rounds each 8×8 block's DCT coefficients to multiples of a quantisation table; decoded pixels keep
    that trace. The block grid is found first (where high frequencies are most often zero: the grid is not
    assumed to start at the tile's corner), then each candidate quality's table is scored by how close the
    coefficients lie to its multiples (mean cosine of their phase). ``gray`` is luminance in [0, 1].
    """
    g = gray.astype(np.float32, copy=False) * 255.0
    if min(g.shape) < 24:
        return 100.0, 0.0
    # The grid offset along x shows in the horizontal high frequencies even when y is off, and vice versa:
    # 8 + 8 trials instead of 64.
    ox = _grid_offset(g, 0, None, max_blocks)
    oy = _grid_offset(g, None, ox, max_blocks)
    c = _dct_blocks(g, oy, ox, max_blocks).reshape(-1, 64)
    scores = np.full(len(JPEG_QUALITIES), -1.0)

    def score(tables: Sequence[int]) -> None:
        # all of ``tables`` in one pass: the coefficients each is scored on, side by side
        idx = np.concatenate([_TABLE_INDEX[i] for i in tables])
        step = np.concatenate([_TABLE_STEPS[i] for i in tables])
        which = np.repeat(np.arange(len(tables)), [len(_TABLE_INDEX[i]) for i in tables])
        coef = c[:, idx]
        big = np.abs(coef) >= 0.5 * step  # zeros are multiples of every step: they prove nothing
        n = big.sum(axis=0)
        cos = np.where(big, np.cos(2 * np.pi * (coef / step)), 0.0).sum(axis=0)
        n_t = np.bincount(which, weights=n, minlength=len(tables))
        cos_t = np.bincount(which, weights=cos, minlength=len(tables))
        for j, i in enumerate(tables):
            scores[i] = float(cos_t[j] / n_t[j]) if n_t[j] >= 50 else 0.0

    # Scores change smoothly with quality: every 5th table first, then every table near the best two.
    score(range(0, len(JPEG_QUALITIES), 5))
    fine = {
        i
        for centre in np.argsort(scores)[-2:]
        for i in range(max(0, centre - 4), min(len(JPEG_QUALITIES), centre + 5))
        if scores[i] < -0.5
    }
    if fine:
        score(sorted(fine))
    k = int(np.argmax(scores))  # neighbouring qualities share most steps: their scores come close
    score = float(max(scores[k], 0.0))
    return (float(JPEG_QUALITIES[k]) if score >= JPEG_SCORE_MIN else 100.0), score


class ClassicalEstimator:
    """Per-tile degradation estimates with no weights; the baseline every learned estimator is measured against."""

    name = "classical"

    def __init__(self, brightfield: bool = True) -> None:
        self.brightfield = brightfield

    def estimate_tile(self, tile: np.ndarray) -> TileEstimate:
        """Estimates for one float tile in [0, 1], ``(H, W, C)``."""
        mask = tissue_mask(tile, self.brightfield)
        tissue = float(mask.mean())
        noise = estimate_noise(tile)
        gray = luminance(tile)
        blur, edges = (float("nan"), 0)
        if tissue >= MIN_TISSUE:
            blur, edges = estimate_blur(gray, mask, noise)
        quality, score = estimate_jpeg(gray)
        return TileEstimate(
            tissue=tissue, blur_sigma=blur, noise_sigma=noise, jpeg_quality=quality, jpeg_score=score, edges=edges
        )

    def estimate(self, tiles: np.ndarray | Sequence[np.ndarray]) -> list[TileEstimate]:
        """Estimates for a batch of float tiles ``(N, H, W, C)`` in [0, 1]."""
        return [self.estimate_tile(t) for t in tiles]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "scales": [SCALE_A, SCALE_B], "edge_fraction": EDGE_FRACTION}

"""Small pixel operations shared by sources, sinks and engines (pure functions, numpy in/out)."""

from __future__ import annotations

import numpy as np


def resize(img: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize ``(H, W[, C])`` to ``shape`` (H, W) with anti-aliasing, keeping the dtype."""
    from skimage.transform import resize as _resize

    out_shape = shape + img.shape[2:]
    out = _resize(img, out_shape, order=order, anti_aliasing=order > 0 and shape[0] < img.shape[0],
                  preserve_range=True)
    if img.dtype.kind in "ui":
        info = np.iinfo(img.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(img.dtype)
    return out.astype(img.dtype)


def downsample2(img: np.ndarray) -> np.ndarray:
    """Halve ``(H, W, C)`` by 2×2 mean (odd edges: the last row/column is averaged with itself)."""
    h, w = img.shape[:2]
    if h % 2:
        img = np.concatenate([img, img[-1:]], axis=0)
    if w % 2:
        img = np.concatenate([img, img[:, -1:]], axis=1)
    if img.dtype in (np.uint8, np.uint16):  # exact in integers: floor(sum / 4 + 0.5) == (sum + 2) >> 2
        wide = np.uint16 if img.dtype == np.uint8 else np.uint32
        acc = img[0::2, 0::2].astype(wide)
        acc += img[1::2, 0::2]
        acc += img[0::2, 1::2]
        acc += img[1::2, 1::2]
        acc += 2
        acc >>= 2
        return acc.astype(img.dtype)
    if img.dtype.kind in "ui":  # other integers (int8/16, int32, uint32): exact in int64, same rounding
        acc = img[0::2, 0::2].astype(np.int64)
        acc += img[1::2, 0::2]
        acc += img[0::2, 1::2]
        acc += img[1::2, 1::2]
        acc += 2
        acc >>= 2  # an arithmetic shift floors negative sums too
        return acc.astype(img.dtype)
    f = img if img.dtype == np.float64 else img.astype(np.float32)  # float64 stays float64
    out = 0.25 * (f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2])
    return out.astype(img.dtype)

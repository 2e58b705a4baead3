"""The 2×2 mean that builds every pyramid level: exact for every integer type, no float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from lpfm_toolkit.imageops import downsample2


def _reference(img: np.ndarray) -> np.ndarray:
    """floor(mean + 0.5) of each 2×2 block, in Python integers (odd edges repeat the last row/column)."""
    h, w = img.shape[:2]
    pad = np.pad(img.astype(object), ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = pad[0::2, 0::2] + pad[1::2, 0::2] + pad[0::2, 1::2] + pad[1::2, 1::2]
    return np.vectorize(lambda v: (v + 2) // 4)(s).astype(img.dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.uint32])
def test_integer_levels_are_exact_even_beyond_float32(dtype: type) -> None:
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    img = rng.integers(info.min, info.max, size=(7, 9, 2), dtype=dtype, endpoint=True)
    img[0, 0] = info.max  # a block of extremes: the sum needs more bits than the type
    img[0, 1] = img[1, 0] = img[1, 1] = info.max
    out = downsample2(img)
    assert out.dtype == dtype and out.shape == (4, 5, 2)
    np.testing.assert_array_equal(out, _reference(img))
    assert out[0, 0, 0] == info.max


def test_large_uint32_values_keep_their_low_bits() -> None:
    img = np.full((2, 2, 1), 2**31 + 1, dtype=np.uint32)  # float32 would round it to 2**31
    assert downsample2(img)[0, 0, 0] == 2**31 + 1


def test_float64_is_averaged_in_float64() -> None:
    img = np.full((2, 2, 1), 1.0 + 2**-40, dtype=np.float64)
    out = downsample2(img)
    assert out.dtype == np.float64 and out[0, 0, 0] == 1.0 + 2**-40

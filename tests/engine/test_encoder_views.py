"""The stain encoder's training views: Macenko re-staining takes on another tile's stain."""

from __future__ import annotations

import numpy as np
import torch

from lpfm_toolkit.engine.classical import macenko_stain_matrix
from lpfm_toolkit.engine.models.encoder import macenko_restain

STAIN_A = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
STAIN_B = np.array([[0.45, 0.85, 0.27], [0.25, 0.75, 0.61]])


def _tile(stain: np.ndarray, seed: int, size: int = 64) -> np.ndarray:
    """A synthetic H&E tile: random H and E concentrations rendered with the given stain vectors."""
    rng = np.random.default_rng(seed)
    stain = stain / np.linalg.norm(stain, axis=1, keepdims=True)
    c = np.stack([rng.gamma(2.0, 0.4, size * size), rng.gamma(2.0, 0.3, size * size)], axis=1)
    return np.exp(-(c @ stain)).reshape(size, size, 3)


def test_restained_tile_takes_its_partners_stain_vectors() -> None:
    tiles = np.stack([_tile(STAIN_A, 1), _tile(STAIN_B, 2)])
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).float()
    g = torch.Generator().manual_seed(0)
    while True:  # find a seed whose permutation swaps the two tiles
        state = g.get_state()
        if torch.randperm(2, generator=g).tolist() == [1, 0]:
            g.set_state(state)
            break
    out = macenko_restain(batch, g).permute(0, 2, 3, 1).double().numpy()
    assert out.shape == tiles.shape and out.min() >= 0 and out.max() <= 1
    before = macenko_stain_matrix(tiles[0])
    after = macenko_stain_matrix(out[0])
    target = macenko_stain_matrix(tiles[1])
    assert np.abs(after - target).max() < 0.05 < np.abs(before - target).max()
    # the tissue's structure (concentration pattern) is kept: optical densities stay strongly correlated
    od_in, od_out = -np.log(tiles[0].clip(1 / 255)), -np.log(out[0].clip(1 / 255))
    assert np.corrcoef(od_in.sum(-1).ravel(), od_out.sum(-1).ravel())[0, 1] > 0.95


def test_tiles_without_tissue_keep_their_colours() -> None:
    blank = np.ones((2, 64, 64, 3)) * 0.97
    batch = torch.from_numpy(blank).permute(0, 3, 1, 2).float()
    out = macenko_restain(batch, torch.Generator().manual_seed(1))
    np.testing.assert_allclose(out.numpy(), batch.numpy(), atol=1e-6)

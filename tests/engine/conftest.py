"""Fixtures for engine tests: tiny, seeded, untrained bundles that load in milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

TINY_RESTORER = {"channels": [8, 16], "blocks": [1, 1]}
TINY_ENCODER = {"channels": [8, 16], "feature_dim": 16, "projection_dim": 8}
TINY_REFINER = {"block_out_channels": [8, 16], "norm_num_groups": 4, "feature_dim": 16}


def make_components(seed: int = 0) -> dict:
    from lpfm_toolkit.engine.models.encoder import StainEncoder
    from lpfm_toolkit.engine.models.refiner import Refiner
    from lpfm_toolkit.engine.models.restorer import Restorer

    torch.manual_seed(seed)
    restorer = Restorer(**TINY_RESTORER)
    # non-zero tail so the restorer is not the identity (its residual tail starts at zero)
    torch.nn.init.normal_(restorer.tail.weight, std=0.01)
    return {"restorer": restorer, "encoder": StainEncoder(**TINY_ENCODER), "refiner": Refiner(**TINY_REFINER)}


def write_tiny_bundle(path: Path, seed: int = 0, dtype: str = "float32", default_steps: int = 2) -> Path:
    from lpfm_toolkit.engine.bundle import write_bundle

    return write_bundle(path, name="tiny-test", components=make_components(seed), dtype=dtype,
                        default_steps=default_steps,
                        tasks=["sr2", "sr4", "sr8", "deblur", "denoise", "restore"],
                        training={"note": "untrained test bundle"})


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    """Tiny networks gain nothing from threads, and oversubscribed cores on shared CI runners cost 4×."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-test")


@pytest.fixture(scope="session")
def bundle_factory():
    """``bundle_factory(path, seed=0, dtype="float32", default_steps=2)`` writes an untrained tiny bundle."""
    return write_tiny_bundle


@pytest.fixture(scope="session")
def components_factory():
    """``components_factory(seed)`` → untrained tiny restorer, encoder and refiner."""
    return make_components

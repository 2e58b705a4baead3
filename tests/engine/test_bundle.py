"""Bundle round trip, checksums, tampering and the pickle policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lpfm_toolkit.engine import bundle as B
from lpfm_toolkit.errors import ModelError


def test_round_trip_restores_identical_weights_and_outputs(tmp_path: Path, components_factory) -> None:
    comps = components_factory(3)
    path = B.write_bundle(tmp_path / "b", name="rt", components=comps, dtype="float32", tasks=["sr2"])
    assert B.verify(path) == []
    loaded = B.load_bundle(path)
    assert loaded.name == "rt" and loaded.tasks == ["sr2"]
    assert set(loaded.components) == {"restorer", "encoder", "refiner"}
    for role, model in comps.items():
        a, b = model.state_dict(), loaded.components[role].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 16, 16)
    task = torch.tensor([0, 4])
    assert torch.equal(comps["restorer"].eval()(x, task), loaded.components["restorer"](x, task))


def test_float16_bundle_loads_as_float32_close_to_original(tmp_path: Path, components_factory) -> None:
    comps = components_factory(4)
    path = B.write_bundle(tmp_path / "h", name="half", components=comps, dtype="float16", tasks=["sr2"])
    loaded = B.load_bundle(path)
    w = loaded.components["restorer"].head.weight
    assert w.dtype == torch.float32
    assert torch.allclose(w, comps["restorer"].head.weight, atol=1e-3)


def test_checksum_changes_with_weights_and_card_states_hashes(tmp_path: Path, bundle_factory) -> None:
    a = bundle_factory(tmp_path / "a", seed=0)
    b = bundle_factory(tmp_path / "b", seed=1)
    c = bundle_factory(tmp_path / "c", seed=0)
    sha = {p.name: B.load_bundle(p).sha256 for p in (a, b, c)}
    assert sha["a"] == sha["c"] != sha["b"]
    card = (a / "MODEL_CARD.md").read_text()
    index = json.loads((a / "model_index.json").read_text())
    for rel, digest in index["files"].items():
        if rel.endswith(".safetensors"):
            assert digest in card


def test_tampered_weights_fail_verify_and_load(tmp_path: Path, bundle_factory) -> None:
    path = bundle_factory(tmp_path / "t")
    weights = path / "restorer" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    problems = B.verify(path)
    assert any("restorer/model.safetensors" in p and "mismatch" in p for p in problems)
    with pytest.raises(ModelError, match="sha256"):
        B.load_bundle(path)


def test_unlisted_file_and_missing_card_are_reported(tmp_path: Path, bundle_factory) -> None:
    path = bundle_factory(tmp_path / "u")
    (path / "refiner" / "extra.safetensors").write_bytes(b"x")
    (path / "MODEL_CARD.md").unlink()
    problems = B.verify(path)
    assert "refiner/extra.safetensors: not covered by a checksum" in problems
    assert "MODEL_CARD.md: missing" in problems


def _pickled_bundle(tmp_path: Path, bundle_factory) -> Path:
    path = bundle_factory(tmp_path / "p")
    folder = path / "restorer"
    state = B.load_component(folder, "restorer").state_dict()
    torch.save(state, folder / "model.pt")
    (folder / "model.safetensors").unlink()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["weights"] = "model.pt"
    (folder / "config.json").write_text(json.dumps(cfg))
    return path


def test_pickled_weights_are_refused_unless_trusted(tmp_path: Path, bundle_factory) -> None:
    path = _pickled_bundle(tmp_path, bundle_factory)
    with pytest.raises(ModelError, match="refusing to load the pickled checkpoint"):
        B.load_bundle(path, check=False)
    loaded = B.load_bundle(path, check=False, trust_pickle=True)
    assert "restorer" in loaded.components


def test_trusted_pickle_still_rejects_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weights": np.dtype("float32"), "callable": print}, path)
    with pytest.raises(ModelError, match="weights_only"):
        B.read_weights(path, trust_pickle=True)


class _Opaque:
    """Not a tensor: the weights-only unpickler refuses it."""


def test_trusted_pickle_refusal_does_not_relay_torchs_advice_to_disable_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "opaque.pt"
    torch.save({"obj": _Opaque()}, path)
    with pytest.raises(ModelError) as info:
        B.read_weights(path, trust_pickle=True)
    text = f"{info.value} {getattr(info.value, 'fix', '')}"
    assert "_Opaque" in text and "safetensors" in text
    assert "weights_only=False" not in text and "weights_only set to False" not in text
    assert "safe_globals" not in text and "arbitrary code" not in text.replace("can run arbitrary code", "")


def test_resolve_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model bundle named"):
        B.resolve("no-such-bundle")
    single = tmp_path / "w.safetensors"
    single.write_bytes(b"")
    with pytest.raises(ModelError, match="single weight file"):
        B.resolve(single)
    with pytest.raises(ModelError, match="no model_index.json"):
        B.load_bundle(tmp_path)


def test_component_of_the_wrong_role_is_rejected(tmp_path: Path, bundle_factory) -> None:
    path = bundle_factory(tmp_path / "r")
    shutil.rmtree(path / "restorer")
    shutil.copytree(path / "encoder", path / "restorer")
    with pytest.raises(ModelError, match="expected the restorer"):
        B.load_bundle(path, check=False)

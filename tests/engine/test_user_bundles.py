"""Bundles a lab keeps in its user bundle folder are listed and found by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lpfm_toolkit.cli.main import cli
from lpfm_toolkit.engine import bundle as B
from lpfm_toolkit.errors import ModelError


def test_user_bundles_are_listed_and_resolved_by_name(
    tmp_path: Path, bundle_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    monkeypatch.setenv("LPFM_MODELS_DIR", str(models))
    with pytest.raises(ModelError, match="user bundles in"):
        B.resolve("lab-v1")
    bundle_factory(models / "lab-v1")
    (models / "not-a-bundle").mkdir()
    assert B.user_bundles() == ["lab-v1"]
    assert B.resolve("lab-v1") == models / "lab-v1"
    assert B.resolve("lpfm-tiny") == B.SHIPPED_DIR / "lpfm-tiny"  # shipped names win
    out = CliRunner().invoke(cli, ["models", "list"], env={"COLUMNS": "200", "LPFM_MODELS_DIR": str(models)})
    assert out.exit_code == 0, out.output
    rows = {line.split("│")[1].strip(): line for line in out.output.splitlines() if line.count("│") > 3}
    assert "lpfm-tiny" in rows and "shipped" in rows["lpfm-tiny"]
    assert "lab-v1" in rows and "user" in rows["lab-v1"]
    assert "not-a-bundle" not in rows
    verified = CliRunner().invoke(cli, ["models", "verify", "lab-v1"], env={"LPFM_MODELS_DIR": str(models)})
    assert verified.exit_code == 0, verified.output


def test_default_user_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LPFM_MODELS_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert B.user_models_dir() == tmp_path / "lpfm" / "models"
    assert B.user_bundles() == []  # a folder that does not exist lists nothing

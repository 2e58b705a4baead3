"""Choosing the backend: file without QuPath, paquo when QuPath is found; paquo is never imported eagerly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lpfm_toolkit.cli.main import cli
from lpfm_toolkit.errors import ConfigError, MissingDependencyError
from lpfm_toolkit.integrations.qupath import QuPathProject, paquo_backend
from lpfm_toolkit.integrations.qupath.files import FileBackend


def test_auto_uses_the_file_backend_without_qupath(bundled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paquo_backend, "find_qupath_installation", lambda: None)
    project = QuPathProject.open(bundled / "own" / "0.5.1-synthetic")
    assert project.backend == "file" and isinstance(project._backend, FileBackend)


def test_auto_uses_paquo_when_qupath_is_found(bundled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[Path, bool]] = []

    class RecordingBackend(FileBackend):  # stands in for PaquoBackend: records how it was opened
        name = "paquo"

        def __init__(self, qpproj: Path, readonly: bool = False) -> None:
            opened.append((qpproj, readonly))
            super().__init__(qpproj)

        def hierarchy_annotations(self, entry):  # the hierarchy wins over the GeoJSON convention
            return []

    monkeypatch.setattr(paquo_backend, "find_qupath_installation", lambda: "/opt/QuPath-0.6.0")
    monkeypatch.setattr(paquo_backend, "PaquoBackend", RecordingBackend)
    folder = bundled / "own" / "0.5.1-synthetic"
    project = QuPathProject.open(folder, readonly=True)
    assert project.backend == "paquo" and opened == [(folder / "project.qpproj", True)]
    assert project.annotations(project.entry("1")) == []
    assert QuPathProject.open(folder, backend="file").backend == "file"  # overridable


def test_paquo_backend_without_qupath_is_a_clear_error(bundled: Path) -> None:
    if paquo_backend.find_qupath_installation() is not None:
        pytest.skip("a QuPath installation is present: the missing-QuPath error cannot be provoked here")
    with pytest.raises(MissingDependencyError) as err:
        QuPathProject.open(bundled / "own" / "0.5.1-synthetic", backend="paquo")
    assert "paquo" in str(err.value) and ("lpfm-toolkit[qupath]" in str(err.value) or "QuPath" in str(err.value))
    with pytest.raises(ConfigError, match="unknown QuPath backend"):
        QuPathProject.open(bundled / "own" / "0.5.1-synthetic", backend="java")  # type: ignore[arg-type]


def test_cli_paquo_backend_error_is_one_line(bundled: Path) -> None:
    if paquo_backend.find_qupath_installation() is not None:
        pytest.skip("a QuPath installation is present")
    result = CliRunner().invoke(cli, ["qupath", "list", str(bundled / "own" / "0.5.1-synthetic"), "--backend", "paquo"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "error:" in result.output


def test_nothing_heavy_no_paquo_no_jvm_at_import_or_with_the_file_backend(bundled: Path) -> None:
    code = f"""
import sys, json
import lpfm_toolkit.integrations.qupath as q
first = sorted(m for m in sys.modules if m.split('.')[0] in ('paquo', 'jpype', '_jpype'))
q.QuPathProject.open({str(bundled / 'own' / '0.5.1-synthetic')!r}, backend='file').entries
second = sorted(m for m in sys.modules if m.split('.')[0] in ('paquo', 'jpype', '_jpype'))
q.QuPathProject.open({str(bundled / 'own' / '0.5.1-synthetic')!r}).entries  # auto: looks for QuPath only
third = sorted(m for m in sys.modules if m in ('paquo.projects', 'paquo.java', 'paquo.images'))
jvm = 'jpype' in sys.modules and sys.modules['jpype'].isJVMStarted()
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'skimage', 'omero'))
print(json.dumps([first, second, third, jvm, heavy]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    first, second, third, jvm, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert first == [] and second == [] and third == [] and jvm is False and heavy == []


def test_qupath_help_lists_the_commands() -> None:
    result = CliRunner().invoke(cli, ["qupath", "--help"])
    assert result.exit_code == 0 and "list" in result.output and "enhance" in result.output
    result = CliRunner().invoke(cli, ["qupath", "enhance", "--help"])
    for option in ("--prompt", "--image", "--class", "--level", "--engine", "--model", "--annotations", "--remap",
                   "--force", "--backend", "--out"):
        assert option in result.output

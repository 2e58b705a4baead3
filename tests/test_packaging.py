"""Packaging guards: one import namespace, no heavy imports at import time, explicit package list."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "omero", "paquo", "diffusers", "skimage", "Ice")


def _imported_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint('MODULES:', ' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/")
    last = out.stdout.strip().splitlines()[-1]  # the help text printed before it must not be parsed
    assert last.startswith("MODULES:")
    return set(last.split()[1:])


@pytest.mark.parametrize("code", [
    "import lpfm_toolkit",
    "import lpfm_toolkit.engine",
    "import lpfm_toolkit.integrations",
    "from lpfm_toolkit.cli.main import cli\ntry:\n    cli.main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass",
])
def test_no_heavy_imports(code: str) -> None:
    loaded = _imported_after(code)
    assert not loaded & set(HEAVY), f"{code!r} imported {sorted(loaded & set(HEAVY))}"


def test_lpfm_help_lists_commands() -> None:
    exe = Path(sys.executable).with_name("lpfm")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    for cmd in ("enhance", "demo", "info", "provenance", "config"):
        assert cmd in out.stdout


def test_package_list_matches_tree() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for root, prefix in (("lpfm_toolkit", "lpfm_toolkit"), ("cli", "lpfm_toolkit.cli"),
                         ("integrations", "lpfm_toolkit.integrations")):
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / root)
            found.add(".".join([prefix, *rel.parts]) if rel.parts else prefix)
    assert found == declared
    for pkg in declared:
        if pkg in mapping:
            assert (REPO / mapping[pkg] / "__init__.py").exists()


def test_one_namespace_no_top_level_cli_or_integrations_imports() -> None:
    offenders = []
    for root in ("lpfm_toolkit", "cli", "integrations", "tests", "benchmarks"):
        for path in (REPO / root).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        offenders.append(f"{path}: relative import")
                    names = [node.module or ""]
                offenders += [f"{path}: import {n}" for n in names if n.split(".")[0] in ("cli", "integrations")]
    assert offenders == []


def test_sample_slide_and_attribution_are_package_data() -> None:
    from importlib import resources

    data = resources.files("lpfm_toolkit") / "data"
    assert (data / "cmu_small_region.svs").is_file()
    assert "CC0" in (data / "ATTRIBUTION.md").read_text()

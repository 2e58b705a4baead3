"""Fixtures for the QuPath tests: real QuPath-written projects (../shared) and bundled copies.

Sample projects are written by the ``qp`` helpers in ``tests/conftest.py`` (tests elsewhere need them too)."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data" / "qupath"


@pytest.fixture(scope="session")
def qupath_fixtures(shared_dir: Path) -> Path:
    """``../shared/fixtures/qupath`` (skips loudly when absent: the real files were NOT read)."""
    root = shared_dir / "fixtures" / "qupath"
    if not root.is_dir():
        pytest.skip(f"{root} not present: the real QuPath-written fixtures were NOT read")
    return root


@pytest.fixture(scope="session")
def bundled() -> Path:
    """``tests/data/qupath``: MIT-licensed real projects and this project's own fixtures."""
    return DATA

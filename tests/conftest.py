"""Shared pytest options and fixtures.

Opt-in suites: ``--qupath`` (paquo against a real QuPath installation) and ``--omero-host`` … (a real
OMERO server). Without them those tests are skipped with a message saying so; a skip is never a pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE_SLIDE = REPO / "lpfm_toolkit" / "data" / "cmu_small_region.svs"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lpfm live suites")
    group.addoption("--qupath", action="store_true", default=False,
                    help="run the paquo backend tests (needs a QuPath installation, PAQUO_QUPATH_DIR)")
    group.addoption("--omero-host", default=os.environ.get("LPFM_TEST_OMERO_HOST"),
                    help="run the live OMERO suite against this server")
    group.addoption("--omero-port", default=os.environ.get("LPFM_TEST_OMERO_PORT", "4064"))
    group.addoption("--omero-user", default=os.environ.get("LPFM_TEST_OMERO_USER"))
    group.addoption("--omero-password", default=os.environ.get("LPFM_TEST_OMERO_PASSWORD"))
    group.addoption("--omero-group", default=os.environ.get("LPFM_TEST_OMERO_GROUP"))
    group.addoption("--omero-secure", default="true", help="use an encrypted connection (true/false)")


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    """The bundled CC0 sample slide (Aperio SVS, 2220×2967, 0.499 µm/px)."""
    return SAMPLE_SLIDE


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (QuPath fixtures); tests that need it skip loudly without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present: the real QuPath-written fixtures were NOT read")
    return SHARED

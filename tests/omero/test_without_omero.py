"""Without omero-py (the Python 3.11 main suite): the command still loads and says what to install."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from lpfm_toolkit.cli.main import cli

pytestmark = pytest.mark.skipif(importlib.util.find_spec("omero") is not None,
                                reason="omero-py is installed: this checks the message shown when it is not")


def test_help_works_and_first_use_names_the_extra(monkeypatch) -> None:
    monkeypatch.setenv("OMERO_PASSWORD", "x")
    res = CliRunner().invoke(cli, ["omero", "--help"])
    assert res.exit_code == 0 and "enhance" in res.output and "info" in res.output
    res = CliRunner().invoke(cli, ["omero", "--host", "h", "--user", "u", "info", "1"])
    assert res.exit_code == 2 and "pip install 'lpfm-toolkit[omero]'" in res.output


def test_connector_modules_import_without_omero() -> None:
    from lpfm_toolkit.integrations.omero import session, sink, source, workflow  # noqa: F401

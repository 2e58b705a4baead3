"""Settings in sections ([engine] [tiling] [output] [omero] [jobs]): keys are the flags' names, old flat keys
still read, every value with its origin, and `lpfm config show` printing each section."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lpfm_toolkit.config import KEYS, SECTIONS, Settings, load_settings
from lpfm_toolkit.errors import ConfigError
from lpfm_toolkit.options import EngineOptions

SECTIONED = """
[engine]
engine = "lpfm"
sampler = "dpm"
threads = 2
[tiling]
tile = 128
overlap = 16
[output]
out = "results"
tiff_tile = 256
[omero]
host = "omero.example.org"
secure = false
[jobs]
store = "/data/jobs.sqlite"
workers = 2
"""


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> tuple[Settings, Path]:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    return load_settings(env=env or {}, path=cfg), cfg


def test_sections_are_read_with_their_origin(tmp_path: Path) -> None:
    s, cfg = _load(tmp_path, SECTIONED, {"LPFM_TILE": "256", "LPFM_OMERO_PORT": "4065", "LPFM_JOBS_WORKERS": "3"})
    assert (s.engine, s.sampler, s.threads, s.overlap, s.output_dir, s.tiff_tile) == (
        "lpfm",
        "dpm",
        2,
        16,
        "results",
        256,
    )
    assert s.tile_size == 256 and s.origin["tile_size"] == "env:LPFM_TILE"  # the environment beats the file
    assert (s.omero_host, s.omero_secure, s.omero_port) == ("omero.example.org", False, 4065)
    assert (s.jobs_store, s.jobs_workers) == ("/data/jobs.sqlite", 3) and s.origin["jobs_store"] == str(cfg)
    sections = s.sections()
    assert list(sections) == list(SECTIONS) == ["engine", "tiling", "output", "omero", "jobs"]
    assert ("tile", "256", "env:LPFM_TILE") in sections["tiling"]
    assert ("sampler", "'dpm'", str(cfg)) in sections["engine"] and ("model", "None", "default") in sections["engine"]
    opts = EngineOptions.from_settings(s)
    assert (opts.engine, opts.sampler, opts.threads) == ("lpfm", "dpm", 2) and opts.origin_of("sampler") == str(cfg)


def test_old_flat_keys_and_variables_still_work(tmp_path: Path) -> None:
    s, cfg = _load(
        tmp_path,
        '[lpfm]\ntile_size = 64\noutput_dir = "old"\nomero_host = "h"\n',
        {"LPFM_OMERO_USER": "alice", "LPFM_TILE_SIZE": "96"},
    )
    assert (s.tile_size, s.output_dir, s.omero_host, s.omero_user) == (96, "old", "h", "alice")
    assert s.origin["tile_size"] == "env:LPFM_TILE_SIZE" and s.origin["output_dir"] == str(cfg)
    both, _ = _load(tmp_path, "", {"LPFM_TILE_SIZE": "96", "LPFM_TILE": "128"})
    assert both.tile_size == 128  # the current name wins over the old one


def test_flags_and_keys_agree() -> None:
    """Every key is the name of its flag: [tiling] tile is --tile, [output] out is --out, [jobs] store --store."""
    from lpfm_toolkit.cli.main import cli

    flags: set[str] = set()
    for command in ("enhance", "jobs", "omero"):
        group = cli.get_command(None, command)  # type: ignore[arg-type]
        subs = [group] if command == "enhance" else list(group.commands.values()) + [group]  # type: ignore[union-attr]
        for sub in subs:
            flags |= {o for p in sub.params for o in getattr(p, "opts", [])}
    for key in KEYS:
        assert "--" + key.name.replace("_", "-") in flags, key


def test_bad_settings_are_one_line_naming_the_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'tile_sise' in \[tiling\]"):
        _load(tmp_path, "[tiling]\ntile_sise = 3\n")
    with pytest.raises(ConfigError, match=r"config.toml: tile_size=8 is out of range"):
        _load(tmp_path, "[tiling]\ntile = 8\n")
    with pytest.raises(ConfigError, match="secrets are not read"):
        _load(tmp_path, '[omero]\npassword = "x"\n')
    with pytest.raises(ConfigError, match="unknown setting 'trust_pickle'"):  # only the flag unpickles weights
        _load(tmp_path, "[engine]\ntrust_pickle = true\n")


def test_config_show_prints_every_section_with_origins(tmp_path: Path, monkeypatch) -> None:
    from lpfm_toolkit.cli.main import cli

    cfg = tmp_path / "config.toml"
    cfg.write_text(SECTIONED)
    monkeypatch.setenv("LPFM_CONFIG", str(cfg))
    monkeypatch.setenv("LPFM_COMPILE", "1")
    res = CliRunner().invoke(cli, ["config", "show"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for section in SECTIONS:
        assert f"[{section}]" in res.output
    assert "env:LPFM_COMPILE" in res.output and "LPFM_JOBS_STORE" in res.output and str(cfg) in res.output

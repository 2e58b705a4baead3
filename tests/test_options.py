"""One EngineOptions: layers and origins, one-line errors, job-spec and provenance round trips, the engine built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lpfm_toolkit.config import load_settings
from lpfm_toolkit.errors import ConfigError, TaskNotSupportedError
from lpfm_toolkit.options import SAMPLERS, EngineOptions, build_engine
from lpfm_toolkit.prompts import parse_prompt

RGB = ["R", "G", "B"]


def _settings(tmp_path: Path, text: str = "", env: dict[str, str] | None = None):
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    return load_settings(env=env or {}, path=cfg), cfg


def test_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    env = {"LPFM_STEPS": "3", "LPFM_THREADS": "2", "LPFM_SAMPLER": "dpm", "LPFM_TRUST_PICKLE": "1"}
    settings, cfg = _settings(tmp_path, "engine = 'lpfm'\nsamples = 4\nsteps = 8\n", env)
    opts = EngineOptions.from_settings(settings, samples=2, tta=True, compile=False)
    assert (opts.engine, opts.samples, opts.steps, opts.sampler, opts.threads) == ("lpfm", 2, 3, "dpm", 2)
    assert opts.tta is True and opts.compile is False and opts.trust_pickle is False
    assert opts.origin_of("engine") == str(cfg)
    assert opts.origin_of("steps") == "env:LPFM_STEPS" and opts.origin_of("threads") == "env:LPFM_THREADS"
    assert opts.origin_of("samples") == "flag" and opts.origin_of("tta") == "flag"
    assert opts.origin_of("compile") == "default" and opts.origin_of("model") == "default"
    # a settings file or the environment never switches on unpickling: only the flag does
    assert EngineOptions.from_settings(settings, trust_pickle=True).trust_pickle is True
    assert opts.explicit() == {"samples", "tta"}
    assert ("sampler", "'dpm'", "env:LPFM_SAMPLER") in opts.rows()


def test_equal_options_are_one_engine_whatever_their_origin() -> None:
    a = EngineOptions(engine="classical", method="wiener")
    b = EngineOptions().with_flags(engine="classical", method="wiener")
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert b.origin_of("method") == "flag" and a.origin_of("method") == "default"
    with pytest.raises(AttributeError):
        a.engine = "lpfm"  # type: ignore[misc]


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"steps": "four"}, "--steps: steps='four' is not a whole number"),
        ({"steps": 2.5}, "--steps: steps=2.5 is not a whole number"),
        ({"samples": 0}, "--samples: samples=0 is out of range (1–64)"),
        ({"threads": 0}, "--threads: threads=0 is out of range"),
        ({"sampler": "euler"}, "--sampler: sampler='euler' is not one of ddim, dpm"),
        ({"engine": "magic"}, "--engine: engine='magic' is not one of auto, lpfm, classical, identity"),
        ({"method": "sharpen"}, "--method: method='sharpen' is not one of"),
        ({"device": "gpu0"}, "--device: device='gpu0' is not a device"),
        ({"tta": "maybe"}, "--tta: tta='maybe' is not on or off"),
        ({"model": "  "}, "--model: model='  ' is empty"),
        ({"colour": "red"}, "unknown engine option colour"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        EngineOptions().with_flags(**flags)
    text = str(info.value)
    assert message in text and "\n" not in text and " — " in text


def test_bad_values_from_the_environment_or_file_name_where_they_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"env:LPFM_SAMPLER: sampler='fast' is not one of ddim, dpm"):
        _settings(tmp_path, env={"LPFM_SAMPLER": "fast"})
    with pytest.raises(ConfigError, match=r"env:LPFM_COMPILE: compile='sometimes' is not on or off"):
        _settings(tmp_path, env={"LPFM_COMPILE": "sometimes"})
    with pytest.raises(ConfigError, match=r"config.toml: steps=-1 is out of range"):
        _settings(tmp_path, "[engine]\nsteps = -1\n")
    settings, _ = _settings(tmp_path, env={"LPFM_COMPILE": "0", "LPFM_THREADS": ""})
    assert EngineOptions.from_settings(settings).compile is False


def test_flag_names_and_setting_keys_agree() -> None:
    from lpfm_toolkit.options import flag_name

    assert [flag_name(n) for n in EngineOptions.names()] == [
        "--engine",
        "--method",
        "--model",
        "--device",
        "--steps",
        "--samples",
        "--sampler",
        "--tta",
        "--trust-pickle",
        "--threads",
        "--compile",
    ]


def test_samplers_are_the_engines() -> None:
    pytest.importorskip("torch")
    from lpfm_toolkit.engine.models.refiner import SCHEDULERS

    assert SAMPLERS == SCHEDULERS


def test_job_spec_round_trip() -> None:
    opts = EngineOptions().with_flags(
        engine="lpfm", model="lpfm-tiny", steps=4, samples=3, sampler="dpm", tta=True, trust_pickle=True, threads=1
    )
    data = json.loads(json.dumps(opts.to_dict()))
    back = EngineOptions.from_dict(data)
    assert back == opts and back.origin_of("sampler") == "job" and "sampler" in back.explicit()
    assert EngineOptions.from_dict({"engine": "identity"}) == EngineOptions(engine="identity")
    with pytest.raises(ConfigError, match="unknown keys scheduler"):
        EngineOptions.from_dict({"scheduler": "dpm"})


def test_from_provenance_of_a_learned_result() -> None:
    desc = {
        "name": "lpfm",
        "model": "lpfm-tiny",
        "model_sha256": "ab" * 32,
        "sampler": "dpm",
        "steps": 4,
        "samples": 3,
        "device": "cuda",
        "dtype": "bfloat16",
        "tta": True,
    }
    opts = EngineOptions.from_provenance(desc)
    assert (opts.engine, opts.model, opts.steps, opts.samples, opts.sampler, opts.tta) == (
        "lpfm",
        "lpfm-tiny",
        4,
        3,
        "dpm",
        True,
    )
    assert opts.device is None  # reproduced on whatever device is here
    assert opts.origin_of("sampler") == "provenance"
    moved = EngineOptions.from_provenance({**desc, "model_path": "/old/place"}, model="/new/place", trust_pickle=True)
    assert moved.model == "/new/place" and moved.trust_pickle
    restorer_only = EngineOptions.from_provenance({**desc, "steps": 0, "sampler": "none", "samples": 1})
    assert restorer_only.steps == 0 and restorer_only.sampler is None
    stored = EngineOptions.from_provenance({"name": "lpfm", "options": opts.to_dict(), "device": "cuda"})
    assert stored == opts
    pickled = EngineOptions.from_provenance({"name": "lpfm", "options": {**opts.to_dict(), "trust_pickle": True}})
    assert pickled.trust_pickle is False  # an edited record cannot switch on unpickling


def test_from_provenance_of_a_classical_result() -> None:
    from lpfm_toolkit.engine.classical import ClassicalEngine

    opts = EngineOptions.from_provenance(ClassicalEngine(method="wiener").describe())
    assert (opts.engine, opts.method) == ("classical", "wiener")
    assert EngineOptions.from_provenance({"name": "classical", "method": "default"}).method is None
    record = SimpleNamespace(engine={"name": "identity", "device": "cpu"})  # a Provenance: its engine block
    assert EngineOptions.from_provenance(record) == EngineOptions(engine="identity")
    with pytest.raises(ConfigError, match="unknown engine 'warp'"):
        EngineOptions.from_provenance({"name": "warp"})
    with pytest.raises(ConfigError, match="names no engine"):
        EngineOptions.from_provenance({})


def test_resolved_refuses_explicit_options_of_another_engine_and_drops_settings_ones(tmp_path: Path) -> None:
    task = parse_prompt("deblur")
    with pytest.raises(ConfigError, match="--sampler is a setting of the lpfm engine, not of the classical engine"):
        EngineOptions().with_flags(engine="classical", sampler="dpm").resolved(task, RGB)
    with pytest.raises(ConfigError, match="--method wiener is a classical method"):
        EngineOptions().with_flags(engine="identity", method="wiener").resolved(task, RGB)
    with pytest.raises(TaskNotSupportedError):
        EngineOptions().with_flags(engine="classical", method="bicubic").resolved(task, RGB)
    settings, _ = _settings(tmp_path, "method = 'wiener'\nsteps = 4\n", {"LPFM_SAMPLER": "dpm"})
    opts = EngineOptions.from_settings(settings, engine="identity")
    resolved = opts.resolved(task, RGB)
    assert (resolved.engine, resolved.method, resolved.steps, resolved.sampler) == ("identity", None, None, None)
    auto = EngineOptions(engine="auto", method="wiener").resolved(task, RGB)
    assert auto.engine in ("lpfm", "classical")


def test_build_engine_passes_every_option(monkeypatch) -> None:
    import lpfm_toolkit.engine as engine_pkg

    engine = build_engine(EngineOptions(engine="classical", method="richardson_lucy"))
    assert engine.name == "classical" and engine.describe()["method"] == "richardson_lucy"
    assert build_engine(EngineOptions(engine="identity")).name == "identity"
    seen = {}
    monkeypatch.setattr(
        engine_pkg, "get_engine", lambda name, **kw: seen.update(name=name, **kw) or SimpleNamespace(name="lpfm")
    )
    build_engine(EngineOptions(engine="lpfm", sampler="dpm", steps=2, threads=1, compile=True), task="t")
    assert seen["name"] == "lpfm" and seen["sampler"] == "dpm" and seen["threads"] == 1 and seen["compile"] is True
    assert seen["task"] == "t" and seen["steps"] == 2


def test_importing_options_and_batch_loads_no_torch() -> None:
    code = "import sys, lpfm_toolkit.options, lpfm_toolkit.batch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_sampler_reaches_the_learned_engine() -> None:
    pytest.importorskip("diffusers")
    engine = build_engine(EngineOptions().with_flags(engine="lpfm", sampler="dpm", steps=1, threads=1))
    assert engine.sampler == "dpm" and engine.describe()["sampler"] == "dpm" and engine.threads == 1
    # the record it leaves rebuilds the same options
    again = EngineOptions.from_provenance(engine.describe())
    assert (again.sampler, again.steps, again.model) == ("dpm", 1, engine.describe()["model"])


def test_provenance_records_the_options_and_gives_them_back(sample_slide: Path) -> None:
    from lpfm_toolkit.pipeline import plan, run_item
    from lpfm_toolkit.sinks.memory import ArraySink
    from lpfm_toolkit.sources import Region, open_image

    options = EngineOptions().with_flags(engine="classical", method="wiener", threads=1)
    task = parse_prompt("deblur")
    with open_image(sample_slide) as handle:
        (item,) = plan(handle, task, region=Region(900, 1200, 64, 64))
        resolved = options.resolved(task, handle.channel_names)
        engine = build_engine(resolved, task)
        prov = run_item(handle, item, engine, ArraySink()).provenance
    assert prov.engine["options"]["method"] == "wiener" and prov.engine["options"]["engine"] == "classical"
    again = EngineOptions.from_provenance(prov)
    assert again.threads is None  # reproduced with this machine's threads
    assert again.updated({"threads": 1}, "flag") == resolved and again.origin_of("method") == "provenance"


def test_cli_flags_reach_the_options_and_are_checked_before_any_work(sample_slide: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lpfm_toolkit.cli.main import cli

    args = ["enhance", str(sample_slide), "-p", "sr x2", "--region", "900,1200,64,64", "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(cli, [*args, "--engine", "classical", "--sampler", "dpm"], env={"LPFM_CONFIG": "/none"})
    assert res.exit_code == 2 and "--sampler is a setting of the lpfm engine" in res.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    res = CliRunner().invoke(cli, [*args, "--engine", "classical", "--threads", "0"], env={"LPFM_CONFIG": "/none"})
    assert res.exit_code == 2 and "--threads: threads=0 is out of range" in res.output
    res = CliRunner().invoke(cli, [*args, "--engine", "classical"], env={"LPFM_CONFIG": "/none", "LPFM_THREADS": "1"})
    assert res.exit_code == 0, res.output
    (sidecar,) = (tmp_path / "o").glob("*.lpfm.json")
    options = json.loads(sidecar.read_text())["engine"]["options"]
    assert options["threads"] == 1 and options["engine"] == "classical"

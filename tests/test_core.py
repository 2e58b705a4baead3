"""Prompts, provenance records and idempotency keys, settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from lpfm_toolkit.config import Settings, load_settings
from lpfm_toolkit.errors import ConfigError, LpfmError, PromptError
from lpfm_toolkit.prompts import Stain, Task, TaskKind, parse_prompt
from lpfm_toolkit.provenance import Provenance, idempotency_key, scrub


@pytest.mark.parametrize(
    "text,kind,scale",
    [
        ("super-resolve x4", TaskKind.SUPER_RESOLUTION, 4),
        ("sr x2", TaskKind.SUPER_RESOLUTION, 2),
        ("SR ×8", TaskKind.SUPER_RESOLUTION, 8),
        ("4x upscale", TaskKind.SUPER_RESOLUTION, 4),
        ("Increase the resolution of the H&E pathology image by 4 times", TaskKind.SUPER_RESOLUTION, 4),
        ("denoise", TaskKind.DENOISE, 1),
        ("Remove the noise inside the H&E pathology image", TaskKind.DENOISE, 1),
        ("deblur", TaskKind.DEBLUR, 1),
        ("Remove the blur of the out-of-focus H&E image", TaskKind.DEBLUR, 1),
        ("Restore the low-quality H&E pathology image", TaskKind.RESTORE, 1),
        ("remove blur and noise", TaskKind.RESTORE, 1),
        ("normalize stain", TaskKind.STAIN_NORMALIZE, 1),
    ],
)
def test_prompts(text: str, kind: TaskKind, scale: int) -> None:
    task = parse_prompt(text)
    assert (task.kind, task.scale) == (kind, scale)
    assert task.prompt == text


@pytest.mark.parametrize(
    "text,src,dst",
    [
        ("Translate the autofluorescence image to hematoxylin and eosin stained image", Stain.AF, Stain.HE),
        ("AF -> H&E", Stain.AF, Stain.HE),
        ("H&E -> PAS", Stain.HE, Stain.PAS),
        ("H&E to Masson's trichrome", Stain.HE, Stain.MT),
        ("virtual staining H&E → PASM", Stain.HE, Stain.PASM),
    ],
)
def test_staining_prompts(text: str, src: Stain, dst: Stain) -> None:
    task = parse_prompt(text)
    assert task.kind is TaskKind.VIRTUAL_STAIN and (task.source_stain, task.target_stain) == (src, dst)


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty prompt"),
        ("make it pretty", "not understood"),
        ("sr x3", "scale 3"),
        ("upscale", "without a scale"),
        ("translate to H&E", "source and a target"),
    ],
)
def test_bad_prompts_list_what_is_understood(text: str, message: str) -> None:
    with pytest.raises(PromptError, match=message) as info:
        parse_prompt(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LpfmError)
    if "not understood" in message:
        assert "examples" in str(info.value) and "sr x2" in str(info.value)


def test_task_round_trip_and_labels() -> None:
    task = parse_prompt("AF -> H&E")
    assert Task.from_dict(task.to_dict()) == task
    assert task.slug == "stain-af-he" and task.label == "AF→H&E"
    assert parse_prompt("sr x4").label == "sr×4"


def test_idempotency_key_ignores_wording_but_not_substance() -> None:
    src, region, eng = {"fingerprint": "a"}, {"region": [0, 0, 10, 10]}, {"name": "classical"}
    k1 = idempotency_key(src, region, parse_prompt("sr x2").to_dict(), eng, 0)
    k2 = idempotency_key(src, region, parse_prompt("super-resolve by 2").to_dict(), eng, 0)
    assert k1 == k2
    assert k1 != idempotency_key(src, region, parse_prompt("sr x4").to_dict(), eng, 0)
    assert k1 != idempotency_key(src, region, parse_prompt("sr x2").to_dict(), eng, 1)
    assert k1 != idempotency_key({"fingerprint": "b"}, region, parse_prompt("sr x2").to_dict(), eng, 0)
    assert k1 != idempotency_key(src, region, parse_prompt("sr x2").to_dict(), {"name": "lpfm"}, 0)


def test_provenance_never_carries_secrets() -> None:
    prov = Provenance(
        source={"system": "omero", "uri": "omero://h/image/1", "password": "hunter2", "nested": {"session_key": "abc"}},
        prompt="denoise",
        task={"kind": "denoise"},
        engine={"name": "classical"},
        seed=0,
        idempotency_key="k",
    )
    text = prov.to_json()
    assert "hunter2" not in text and "abc" not in text
    back = Provenance.from_json(text)
    assert back.source["uri"] == "omero://h/image/1"
    assert scrub({"Password": 1, "ok": [{"token": 2, "x": 3}]}) == {"ok": [{"x": 3}]}
    assert all(isinstance(v, str) for v in prov.summary().values())


def test_settings_layers(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("tile_size = 128\nengine = 'classical'\n")
    s = load_settings(env={"LPFM_ENGINE": "identity", "LPFM_OMERO_SECURE": "false", "OTHER": "x"}, path=cfg)
    assert s.tile_size == 128 and s.origin["tile_size"] == str(cfg)
    assert s.engine == "identity" and s.origin["engine"] == "env:LPFM_ENGINE"
    assert s.omero_secure is False
    flagged = s.replace(engine="classical", seed=None)
    assert flagged.engine == "classical" and flagged.origin["engine"] == "flag" and s.engine == "identity"
    with pytest.raises(ConfigError, match="not a valid int"):
        Settings().apply({"tile_size": "big"}, "test")
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings().apply({"tile_sise": 1}, "test")


def test_the_word_if_is_not_immunofluorescence() -> None:
    task = parse_prompt("convert this H&E to PAS if possible")
    assert (task.source_stain, task.target_stain) == (Stain.HE, Stain.PAS)
    assert parse_prompt("IF -> H&E").source_stain is Stain.FLUORESCENCE  # the upper-case abbreviation still is


def test_long_prompts_are_not_echoed_whole() -> None:
    for text in ("x" * 10_000, "make it pretty " * 30):
        with pytest.raises(PromptError) as info:
            parse_prompt(text)
        assert len(info.value.message) < 200


@pytest.mark.parametrize(
    "name,value",
    [
        ("tile_size", "0"),
        ("tile_size", "99999999999999999999"),
        ("samples", "0"),
        ("steps", "-4"),
        ("overlap", "-1"),
        ("seed", "-1"),
        ("tiff_tile", "300"),
        ("compression", "gzip"),
        ("engine", "magic"),
    ],
)
def test_settings_out_of_range_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(env={f"LPFM_{name.upper()}": value}, path=Path("/nonexistent/config.toml"))


@pytest.mark.parametrize("mpp", [-0.5, 0.0, float("nan"), float("inf"), 1e9])
def test_mpp_must_be_a_pixel_size(mpp: float) -> None:
    from lpfm_toolkit.config import check_mpp

    with pytest.raises(ConfigError, match="mpp"):
        check_mpp(mpp)

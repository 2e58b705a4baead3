"""The ``lpfm`` CLI end to end on the sample slide and on OME-TIFFs (click's CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tiffslide
from click.testing import CliRunner
from ome_types import from_xml

from lpfm_toolkit.cli.main import cli

REGION = "1000,1300,256,192"


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(cli, list(args), catch_exceptions=False)


def check_output(path: Path, width: int, height: int, mpp: float | None, channels: int = 3) -> None:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert series.levels[0].shape[:2] == (height, width) or series.levels[0].shape[1:] == (height, width)
        from_xml(tif.ome_metadata, validate=True)
        last = series.levels[-1].shape
        assert max(last) <= 512 or max(last[1:]) <= 512
    if channels == 3:
        slide = tiffslide.TiffSlide(path)
        assert slide.dimensions == (width, height)
        assert len(slide.level_dimensions) == len(series.levels)
        if mpp:
            assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)


@pytest.mark.parametrize(
    "prompt,scale",
    [
        ("sr x2", 2),
        ("super-resolve x4", 4),
        ("SR ×8", 8),
        ("deblur", 1),
        ("denoise", 1),
        ("Restore the low-quality H&E pathology image", 1),
        ("normalize stain", 1),
    ],
)
def test_enhance_every_classical_task_on_sample_slide(
    runner: CliRunner, sample_slide: Path, tmp_path: Path, prompt: str, scale: int
) -> None:
    res = invoke(
        runner,
        "enhance",
        str(sample_slide),
        "--prompt",
        prompt,
        "--region",
        REGION,
        "--engine",
        "classical",
        "--out",
        str(tmp_path),
    )
    assert res.exit_code == 0, res.output
    (out,) = tmp_path.glob("*.ome.tiff")
    assert f"wrote {out}" in res.output
    check_output(out, 256 * scale, 192 * scale, 0.499 / scale)
    side = json.loads(next(tmp_path.glob("*.lpfm.json")).read_text())
    assert side["prompt"] == prompt and side["engine"]["name"] == "classical"


def test_enhance_ome_tiff_input_at_a_level(runner: CliRunner, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = (rng.random((600, 800, 3)) * 255).astype(np.uint8)
    src = tmp_path / "in.ome.tiff"
    with tifffile.TiffWriter(src, bigtiff=True, ome=True) as tw:
        tw.write(
            img,
            subifds=1,
            tile=(128, 128),
            metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
            photometric="rgb",
        )
        tw.write(img[::2, ::2], subfiletype=1, tile=(128, 128), photometric="rgb")
    before = src.read_bytes()
    res = invoke(
        runner,
        "enhance",
        str(src),
        "-p",
        "sr x2",
        "--level",
        "1",
        "--engine",
        "classical",
        "--out",
        str(tmp_path / "out"),
    )
    assert res.exit_code == 0, res.output
    (out,) = (tmp_path / "out").glob("*.ome.tiff")
    check_output(out, 800, 600, 0.5)  # level 1 is 1 µm/px; ×2 gives 0.5 µm/px
    assert src.read_bytes() == before  # the original is untouched


def test_fluorescence_to_he_on_16bit_ome_tiff(runner: CliRunner, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 4000, (2, 300, 300), dtype=np.uint16)
    src = tmp_path / "fluo.ome.tiff"
    tifffile.imwrite(
        src,
        img,
        ome=True,
        tile=(128, 128),
        metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "AF"]}, "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3},
    )
    res = invoke(
        runner,
        "enhance",
        str(src),
        "-p",
        "Translate the autofluorescence image to hematoxylin and eosin stained image",
        "--engine",
        "classical",
        "--out",
        str(tmp_path / "o"),
    )
    assert res.exit_code == 0, res.output
    (out,) = (tmp_path / "o").glob("*.ome.tiff")
    check_output(out, 300, 300, 0.3)
    assert tifffile.imread(out).dtype == np.uint8


def test_rerun_skips_and_force_redoes(runner: CliRunner, sample_slide: Path, tmp_path: Path) -> None:
    args = [
        "enhance",
        str(sample_slide),
        "-p",
        "sr x2",
        "--region",
        REGION,
        "--engine",
        "classical",
        "--out",
        str(tmp_path),
    ]
    first = invoke(runner, *args)
    out = next(tmp_path.glob("*.ome.tiff"))
    mtime = out.stat().st_mtime_ns
    second = invoke(runner, *args)
    assert first.exit_code == second.exit_code == 0
    assert "already done" in second.output and out.stat().st_mtime_ns == mtime
    third = invoke(runner, *args, "--force")
    assert "wrote" in third.output and out.stat().st_mtime_ns != mtime
    assert len(list(tmp_path.glob("*.ome.tiff"))) == 1


def test_demo_writes_pyramid_and_sidecar(runner: CliRunner, tmp_path: Path) -> None:
    res = invoke(runner, "demo", "--engine", "classical", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    out = next(tmp_path.glob("*.ome.tiff"))
    assert str(out) in res.output and "provenance:" in res.output
    check_output(out, 1024, 1024, 0.2495)
    from PIL import Image

    png = tmp_path / "demo-before-after.png"
    assert f"before/after: {png}" in res.output
    with Image.open(png) as im:
        assert im.size == (2 * (384 + 10) + 10, 384 + 40)  # input and output side by side


def test_provenance_show_and_reproduce(runner: CliRunner, sample_slide: Path, tmp_path: Path) -> None:
    invoke(
        runner,
        "enhance",
        str(sample_slide),
        "-p",
        "denoise",
        "--region",
        REGION,
        "--engine",
        "classical",
        "--method",
        "tv",
        "--out",
        str(tmp_path),
    )
    out = next(tmp_path.glob("*.ome.tiff"))
    shown = invoke(runner, "provenance", "show", str(out))
    assert shown.exit_code == 0 and "lpfm.idempotency_key" in shown.output and "denoise" in shown.output
    as_json = invoke(runner, "provenance", "show", str(out), "--json")
    assert json.loads(as_json.output)["engine"]["method"] == "tv"
    rep = invoke(runner, "reproduce", str(out))
    assert rep.exit_code == 0 and "identical pixels" in rep.output
    # a sidecar edited after the fact no longer agrees with the record inside the image: refused, not believed
    side = next(tmp_path.glob("*.lpfm.json"))
    old = json.loads(side.read_text())
    del old["tiling"]["checksums"]
    edited = tmp_path / "edited" / side.name
    edited.parent.mkdir()
    edited.write_text(json.dumps(old))
    side.write_text(json.dumps(old))
    rep = invoke(runner, "reproduce", str(out))
    assert rep.exit_code == 2 and "disagree on tiling.checksums" in rep.output
    shown = runner.invoke(cli, ["provenance", "show", str(out)])
    assert shown.exit_code == 1 and "disagree on tiling.checksums" in shown.output
    # a record alone whose checksum was in the earlier (whole-array sha256) form is refused clearly
    old["output"]["uri"] = str(tmp_path / "moved-away.ome.tiff")
    edited.write_text(json.dumps(old))
    rep = invoke(runner, "reproduce", str(edited))
    assert rep.exit_code == 2 and "older form" in rep.output and "--force" in rep.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["enhance", "missing.svs", "-p", "sr x2"], "does not exist"),
        (["enhance", "{slide}", "-p", "make it pretty"], "prompt not understood"),
        (["enhance", "{slide}", "-p", "sr x3"], "scale 3 is not supported"),
        (["enhance", "{slide}", "-p", "sr x2", "--region", "2000,0,500,500"], "lies outside level 0"),
        (["enhance", "{slide}", "-p", "sr x2", "--region", "a,b"], "is not four integers"),
        (["enhance", "{slide}", "-p", "H&E -> PAS", "--engine", "classical"], "trained bundle"),
        (["enhance", "{corrupt}", "-p", "denoise"], "copy it again"),
        (["info", "{corrupt}"], "copy it again"),
    ],
)
def test_user_errors_are_one_line_exit_2(
    runner: CliRunner, sample_slide: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    corrupt = tmp_path / "broken.svs"
    corrupt.write_bytes(sample_slide.read_bytes()[:5000])
    args = [a.format(slide=sample_slide, corrupt=corrupt) for a in args]
    res = runner.invoke(cli, [*args, "--out", str(tmp_path / "o")] if args[0] == "enhance" else args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert res.output.strip().count("\n") == 0 or res.output.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.ome.tiff"))


def test_debug_shows_traceback(runner: CliRunner) -> None:
    res = runner.invoke(cli, ["--debug", "enhance", "missing.svs", "-p", "sr x2"])
    assert res.exit_code != 0 and isinstance(res.exception, FileNotFoundError)


def test_info_and_config(runner: CliRunner, sample_slide: Path, tmp_path: Path, monkeypatch) -> None:
    res = invoke(runner, "info", str(sample_slide), "--json")
    assert json.loads(res.output)["mpp"] == [0.499, 0.499]
    cfg = tmp_path / "config.toml"
    cfg.write_text('[lpfm]\ntile_size = 128\ncompression = "zlib"\n')
    monkeypatch.setenv("LPFM_CONFIG", str(cfg))
    monkeypatch.setenv("LPFM_SEED", "7")
    res = invoke(runner, "config", "show")
    assert "env:LPFM_SEED" in res.output and str(cfg) in res.output
    cfg.write_text('[lpfm]\nomero_password = "x"\n')
    res = runner.invoke(cli, ["config", "show"])
    assert res.exit_code == 2 and "secrets are not read" in res.output

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


def _tiny_bundle(path: Path, seed: int = 0) -> Path:
    """An untrained, seeded bundle of tiny networks (loads in milliseconds)."""
    torch = pytest.importorskip("torch")
    from lpfm_toolkit.engine.bundle import write_bundle
    from lpfm_toolkit.engine.models.encoder import StainEncoder
    from lpfm_toolkit.engine.models.refiner import Refiner
    from lpfm_toolkit.engine.models.restorer import Restorer

    torch.manual_seed(seed)
    restorer = Restorer(channels=[8, 16], blocks=[1, 1])
    torch.nn.init.normal_(restorer.tail.weight, std=0.01)
    components = {
        "restorer": restorer,
        "encoder": StainEncoder(channels=[8, 16], feature_dim=16, projection_dim=8),
        "refiner": Refiner(block_out_channels=[8, 16], norm_num_groups=4, feature_dim=16),
    }
    return write_bundle(
        path,
        name="tiny-test",
        components=components,
        dtype="float32",
        default_steps=1,
        tasks=["sr2", "denoise"],
        training={"note": "untrained test bundle"},
    )


def test_reproduce_finds_a_moved_bundle_restores_the_sampler_and_checks_the_model(
    sample_slide: Path, tmp_path: Path
) -> None:
    import shutil

    from lpfm_toolkit.engine.bundle import load_bundle
    from lpfm_toolkit.engine.lpfm import LpfmEngine
    from lpfm_toolkit.errors import ModelError
    from lpfm_toolkit.pipeline import plan, run_item
    from lpfm_toolkit.prompts import parse_prompt
    from lpfm_toolkit.sinks.ometiff import OmeTiffSink
    from lpfm_toolkit.sources import Region, open_image
    from lpfm_toolkit.verify import reproduce

    bundle = _tiny_bundle(tmp_path / "bundles" / "tiny-test")
    engine = LpfmEngine(load_bundle(bundle), device="cpu", steps=2, samples=2, sampler="dpm")  # not the default
    with open_image(sample_slide) as h:
        item = plan(h, parse_prompt("denoise"), region=Region(1000, 1300, 48, 48), seed=3)[0]
        res = run_item(
            h, item, engine, OmeTiffSink(tmp_path / "out"), tile_size=32, overlap=8, samples_uncertainty=True
        )
    out = Path(res.output.uri)
    assert res.provenance.engine["model_path"] == str(bundle.resolve())
    assert reproduce(out).identical  # found by its folder; sampler dpm and 2 samples restored
    moved = tmp_path / "elsewhere" / "tiny-test"
    shutil.move(bundle, moved)
    with pytest.raises(ModelError, match="--model"):
        reproduce(out)
    assert reproduce(out, model=str(moved)).identical
    other = _tiny_bundle(tmp_path / "other" / "tiny-test", seed=1)  # same name, other weights
    with pytest.raises(ModelError, match="checksum"):
        reproduce(out, model=str(other))


def test_verify_command_and_stored_checksums(runner: CliRunner, sample_slide: Path, tmp_path: Path) -> None:
    invoke(
        runner,
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
    )
    out = next(tmp_path.glob("*.ome.tiff"))
    side = json.loads(next(tmp_path.glob("*.lpfm.json")).read_text())
    assert side["stored"]["file_size"] == out.stat().st_size
    assert len(side["stored"]["levels"]) == len(side["output"]["levels"])
    assert side["stored"]["levels"][0] != side["output_sha256"]  # JPEG: the decoded pixels differ from those written
    res = invoke(runner, "verify", str(out))
    assert res.exit_code == 0 and "checksums match" in res.output
    quick = invoke(runner, "verify", str(out), "--quick")
    assert quick.exit_code == 0 and "header" in quick.output


def test_demo_twice_replaces_its_own_preview(runner: CliRunner, tmp_path: Path) -> None:
    for prompt in ("denoise", "deblur"):
        res = invoke(
            runner, "demo", "--engine", "classical", "-p", prompt, "--region", "900,1200,64,64", "--out", str(tmp_path)
        )
        assert res.exit_code == 0, res.output
    from lpfm_toolkit.preview import is_preview

    assert is_preview(tmp_path / "demo-before-after.png")


def test_an_unexpected_exception_is_one_line_not_a_traceback(
    runner: CliRunner, sample_slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lpfm_toolkit.sources.local as local

    def broken(*args, **kwargs):
        raise TypeError("something\nthe authors did not foresee")

    monkeypatch.setattr(local.OpenSlideHandle, "describe", broken)
    res = runner.invoke(cli, ["info", str(sample_slide)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip() == (
        "error: unexpected TypeError: something the authors did not foresee — this is a "
        "bug in lpfm; re-run with --debug and report the traceback"
    )
    debug = runner.invoke(cli, ["--debug", "info", str(sample_slide)])
    assert isinstance(debug.exception, TypeError)


def test_single_file_out_with_one_f_reruns_and_verifies(runner: CliRunner, sample_slide: Path, tmp_path: Path) -> None:
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
        str(tmp_path / "Result.OME.TIF"),
    ]
    assert invoke(runner, *args).exit_code == 0
    assert (tmp_path / "Result.lpfm.json").is_file()
    again = invoke(runner, *args)
    assert "already done" in again.output
    assert invoke(runner, "verify", str(tmp_path / "Result.OME.TIF")).exit_code == 0
    other = runner.invoke(cli, [*args[:5], "0,0,64,64", *args[6:]])
    assert other.exit_code == 2 and "different run" in other.output


def test_verify_a_folder_of_outputs(runner: CliRunner, sample_slide: Path, tmp_path: Path) -> None:
    for region in (REGION, "0,0,64,64"):
        invoke(
            runner,
            "enhance",
            str(sample_slide),
            "-p",
            "sr x2",
            "--region",
            region,
            "--engine",
            "classical",
            "--out",
            str(tmp_path / "results"),
        )
    (tmp_path / "results" / "notes.txt").write_text("not ours")
    ok = invoke(runner, "verify", str(tmp_path / "results"))
    assert ok.exit_code == 0 and "2 ok, 0 damaged" in ok.output
    victim = sorted((tmp_path / "results").glob("*.ome.tiff"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    bad = runner.invoke(cli, ["verify", str(tmp_path / "results")])
    assert bad.exit_code == 1 and "1 ok, 1 damaged" in bad.output and "error: 1 of 2 outputs" in bad.output
    assert f"damaged: {victim}" in bad.output
    empty = runner.invoke(cli, ["verify", str(tmp_path)])  # only sub-folders' outputs count: found at any depth
    assert empty.exit_code == 1
    nothing = tmp_path / "empty"
    nothing.mkdir()
    res = runner.invoke(cli, ["verify", str(nothing)])
    assert res.exit_code == 2 and "holds no lpfm outputs" in res.output

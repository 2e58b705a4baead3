"""``lpfm enhance --auto``: only flagged tiles change, each with the matching task, and they score better after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lpfm_toolkit.engine.classical import ClassicalEngine
from lpfm_toolkit.engine.estimate_synthetic import degrade_region, sample_tissue, tissue_mosaic
from lpfm_toolkit.sinks.memory import ArraySink
from lpfm_toolkit.sources import open_image

pytestmark = pytest.mark.qc

NOISY = (0, 0, 512, 512)  # σ 30 noise
BLURRED = (512, 512, 512, 512)  # Gaussian blur σ 3


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """1024² of held-out real tissue: a noisy quarter, a blurred quarter, two clean ones (as a tiled TIFF)."""
    import tifffile

    clean = tissue_mosaic(sample_tissue("holdout"), 1024, 1024, seed=4, min_tissue=0.6)
    img = clean.copy()
    rng = np.random.default_rng(0)
    for box, blur, noise in ((NOISY, 0.0, 30.0), (BLURRED, 3.0, 0.0)):
        x, y, w, h = box
        img[y : y + h, x : x + w] = degrade_region(clean, box, blur, noise, 0, rng)
    path = tmp_path_factory.mktemp("auto") / "degraded.tiff"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
    return path, img, clean


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_auto_enhances_only_flagged_tiles_with_the_right_task(slide: tuple[Path, np.ndarray, np.ndarray]) -> None:
    from lpfm_toolkit.qc import auto_enhance

    path, img, clean = slide
    with open_image(path) as h:
        res = auto_enhance(h, ArraySink(), lambda task: ClassicalEngine())
    engine = res.result.provenance.engine
    out = res.result.output.extra["pixels"]
    assert engine["name"] == "auto" and set(engine["engines"]) >= {"deblur", "denoise"}
    # pixels no flagged tile reaches are the input's, bit for bit
    touched = np.zeros(img.shape[:2], bool)
    for region in res.report["regions"]:
        x, y, w, h = region["bounds"]
        touched[y : y + h, x : x + w] = True
    assert touched.any() and not touched.all()
    assert np.array_equal(out[~touched], img[~touched])
    # the matching task where the defect is: the regions' tasks cover both defects
    tasks = {r["task"] for r in res.report["regions"]}
    assert "denoise" in tasks and ("deblur" in tasks or "restore" in tasks)
    inner_noisy = (slice(32, 480), slice(32, 480))
    inner_blurred = (slice(544, 992), slice(544, 992))
    assert touched[inner_noisy].all() and touched[inner_blurred].all()
    # closer to the clean tissue than before
    assert _psnr(out[inner_noisy], clean[inner_noisy]) > _psnr(img[inner_noisy], clean[inner_noisy]) + 2.0
    assert _psnr(out[inner_blurred], clean[inner_blurred]) > _psnr(img[inner_blurred], clean[inner_blurred])
    # re-scored with the same estimator: each region improves on what it was flagged for
    for region in res.report["regions"]:
        before, after = region["before"], region["after"]
        if region["task"] == "denoise":
            assert after["noise_sigma"] < 0.6 * before["noise_sigma"]
        if region["task"] == "deblur":
            assert after["blur_sigma"] < before["blur_sigma"]
    assert engine["qc"]["flagged_tiles"] == res.report["flagged_tiles"] > 0  # in provenance too


def test_auto_on_a_clean_region_writes_nothing(sample_slide: Path) -> None:
    from lpfm_toolkit.qc import auto_enhance

    sink = ArraySink()
    with open_image(sample_slide) as h:
        from lpfm_toolkit.sources import Region

        res = auto_enhance(h, sink, lambda task: ClassicalEngine(), region=Region(900, 1200, 480, 480))
    assert res.result is None and res.report["flagged_tiles"] == 0 and not sink.results


def test_cli_enhance_auto(slide: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from lpfm_toolkit.cli.main import cli

    path, img, _ = slide
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["enhance", str(path), "--auto", "--engine", "classical", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "lpfm enhance --auto" in res.output and "denoise" in res.output
    (sidecar,) = out.glob("*.lpfm.json")
    prov = json.loads(sidecar.read_text())
    assert prov["engine"]["name"] == "auto" and prov["engine"]["qc"]["flagged_tiles"] > 0
    assert set(prov["engine"]["engines"]) >= {"denoise"}
    (tiff,) = out.glob("*.ome.tiff")
    assert "[lpfm auto]" in prov["output"]["name"] and tiff.name.startswith("degraded_auto_")
    # --name names the --auto output as any other (the same key: the file name is not part of it)
    named = tmp_path / "named"
    args = ["enhance", str(path), "--auto", "--engine", "classical", "--out", str(named), "--name", "{stem}-qc-{key}"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    (renamed,) = named.glob("*.ome.tiff")
    key = prov["idempotency_key"][:10]
    assert renamed.name == f"degraded-qc-{key}.ome.tiff", renamed.name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no prompt"),
        (["--auto", "-p", "denoise"], "not both"),
        (["--auto", "--preview", "p.png"], "--preview is not available"),
        (["--auto", "--engine", "classical", "--method", "nlm"], "--method"),
        (["--auto", "--samples", "2"], "--samples"),
        (["--auto", "--name", "{stem}/{task}"], "path separator"),
        (["--auto", "--name", "{nosuch}"], "--name"),
    ],
)
def test_cli_enhance_auto_bad_input(args: list[str], message: str, sample_slide: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lpfm_toolkit.cli.main import cli

    res = CliRunner().invoke(cli, ["enhance", str(sample_slide), *args, "--out", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_auto_output_records_its_plan_and_reproduces(
    slide: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Provenance holds every flagged tile's task and quarters, each task's engine options and before/after per
    region and per slide; `lpfm reproduce` re-runs exactly that plan and finds the same pixels."""
    import json

    from click.testing import CliRunner

    from lpfm_toolkit.cli.main import cli

    path, _, _ = slide
    out = tmp_path / "auto.ome.tiff"
    res = CliRunner().invoke(cli, ["enhance", str(path), "--auto", "--engine", "classical", "--out", str(out)])
    assert res.exit_code == 0, res.output
    prov = json.loads(out.with_name("auto.lpfm.json").read_text())
    eng = prov["engine"]
    plan, qc = eng["plan"], eng["qc"]
    assert len(plan["tiles"]) == qc["flagged_tiles"] > 0
    assert {t[2] for t in plan["tiles"]} == set(qc["tasks"]) and all(0 < t[3] < 16 for t in plan["tiles"])
    assert all(e["options"]["engine"] == "classical" for e in eng["engines"].values())
    slide_qc = qc["slide"]
    assert slide_qc["flagged_before"] == qc["flagged_tiles"] and slide_qc["flagged_after"] == qc["still_flagged"]
    assert slide_qc["flagged_fraction_after"] < slide_qc["flagged_fraction_before"]
    assert all(r["before"] and r["after"] for r in qc["regions"])
    rep = CliRunner().invoke(cli, ["reproduce", str(out)])
    assert rep.exit_code == 0, rep.output
    assert "identical pixels" in rep.output


def test_reproduce_runs_the_recorded_plan_not_a_new_one(
    slide: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A record whose plan was changed (one flagged tile dropped) reproduces to other pixels: the plan is used."""
    import json

    from lpfm_toolkit.errors import ProvenanceError
    from lpfm_toolkit.qc import auto_engine_for_record

    path, _, _ = slide
    with open_image(path) as h:
        from lpfm_toolkit.qc import auto_enhance

        res = auto_enhance(h, ArraySink(), lambda task: ClassicalEngine())
    desc = json.loads(json.dumps(res.result.provenance.engine))
    engine = auto_engine_for_record(desc, level=0, seed=0)
    assert sorted(engine.tiles) == sorted(s for s, t in engine.tiles.items() if t.task)
    assert len(engine.tiles) == res.report["flagged_tiles"]
    desc["plan"]["tiles"][0][3] = 0 if desc["plan"]["tiles"][0][3] != 0 else 1
    changed = auto_engine_for_record(desc, level=0, seed=0)
    first = min(changed.tiles.values(), key=lambda t: (t.y, t.x))
    assert first.mask == desc["plan"]["tiles"][0][3]
    del desc["plan"]
    with pytest.raises(ProvenanceError, match="does not record its plan"):
        auto_engine_for_record(desc, level=0, seed=0)


def _glass(shape: tuple[int, int]) -> np.ndarray:
    return np.full((*shape, 3), (243, 242, 244), np.uint8)


def test_glass_inside_a_noisy_area_is_denoised_with_it(tmp_path: Path) -> None:
    """Glass (too little tissue to judge) with noise σ 15 next to noisy tissue is denoised too; noisy-looking glass
    that touches no judged noisy quarter is left exactly as it is."""
    import tifffile

    from lpfm_toolkit.qc import auto_enhance

    clean = tissue_mosaic(sample_tissue("holdout"), 512, 1024, seed=4, min_tissue=0.6)
    clean[:256, :384] = _glass((256, 384))  # glass in the top of the noisy left part
    clean[:, 736:] = _glass((512, 288))  # glass along the right edge, away from the noisy part
    img = clean.copy()
    rng = np.random.default_rng(1)
    img[:, :512] = degrade_region(clean, (0, 0, 512, 512), 0.0, 15.0, 0, rng)
    img[:, 800:] = degrade_region(clean, (800, 0, 224, 512), 0.0, 15.0, 0, rng)  # isolated noisy glass
    path = tmp_path / "glass.tiff"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
    with open_image(path) as h:
        res = auto_enhance(h, ArraySink(), lambda task: ClassicalEngine())
    out = res.result.output.extra["pixels"]
    assert res.report["slide"]["background_quarters"] > 0
    inner_glass = (slice(16, 200), slice(16, 320))
    before = np.std(img[inner_glass].astype(np.float64) - clean[inner_glass])
    after = np.std(out[inner_glass].astype(np.float64) - clean[inner_glass])
    assert after < 0.5 * before, (before, after)
    far = (slice(0, 512), slice(832, 1024))
    assert np.array_equal(out[far], img[far])  # noisy glass with no noisy tissue beside it: not judged, untouched


def test_auto_on_an_annotation_enhances_its_bounding_box(slide: tuple[Path, np.ndarray, np.ndarray]) -> None:
    """QuPath classes and OMERO ROIs: --auto over an annotation's box, which provenance names."""
    from shapely.geometry import box

    from lpfm_toolkit.qc import auto_enhance
    from lpfm_toolkit.sources.base import Annotation

    path, img, _ = slide
    ann = Annotation(box(100, 60, 420, 380), class_name="Tumor", id="a1", name="T1")
    with open_image(path) as h:
        res = auto_enhance(h, ArraySink(), lambda task: ClassicalEngine(), annotation=ann)
    prov = res.result.provenance
    assert prov.source["region"] == [100, 60, 320, 320] and prov.source["annotation"]["id"] == "a1"
    assert res.result.output.extra["pixels"].shape == (320, 320, 3) and "Tumor T1 [lpfm auto]" in prov.output["name"]
    assert "denoise" in res.report["tasks"]  # the box lies in the noisy quarter

"""``lpfm qupath enhance --auto`` on a real QuPath-written project: new entries, only what QC flags enhanced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lpfm_toolkit.cli.main import cli
from lpfm_toolkit.engine.estimate_synthetic import degrade_region, sample_tissue, tissue_mosaic

pytestmark = pytest.mark.qc

DATA = Path(__file__).resolve().parent / "data" / "qupath"
REAL_061 = DATA / "mit" / "0.6.0-rc3-metadata-qupath"  # written by QuPath 0.6.0-rc3, 107 entries (MIT)
FIRST_IMAGE = "kontrol15.01.25_14_6_134952.svs"
OLD_FOLDER = "E:/KONTROLHE_2025/OCAK15.01.25_HE_0"


@pytest.fixture(scope="module")
def degraded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """512² of held-out real tissue, noise σ 30 in its left half, named like the project's first image."""
    import tifffile

    clean = tissue_mosaic(sample_tissue("holdout"), 512, 512, seed=4, min_tissue=0.6)
    img = clean.copy()
    img[:, :256] = degrade_region(clean, (0, 0, 256, 512), 0.0, 30.0, 0, np.random.default_rng(0))
    path = tmp_path_factory.mktemp("slides") / FIRST_IMAGE
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
    return path, img


def test_qupath_enhance_auto_adds_one_entry_and_reproduces(degraded: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    import tifffile

    slide, img = degraded
    folder = tmp_path / "project"
    shutil.copytree(REAL_061, folder, copy_function=shutil.copyfile)
    before = json.loads((folder / "project.qpproj").read_text(encoding="utf-8"))
    args = [
        "qupath",
        "enhance",
        str(folder),
        "--auto",
        "--image",
        "1",
        "--engine",
        "classical",
        "--compression",
        "zlib",
    ]
    args += ["--remap", f"{OLD_FOLDER}={slide.parent}"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "1 done" in res.output and "denoise" in res.output  # the batch summary and the before/after table
    after = json.loads((folder / "project.qpproj").read_text(encoding="utf-8"))
    assert after["images"][: len(before["images"])] == before["images"]  # no existing entry touched
    (new,) = after["images"][len(before["images"]) :]
    assert new["imageName"].endswith("[lpfm auto]") and new["metadata"]["lpfm.source.entry"] == "1"
    (tiff,) = (folder / "lpfm-outputs").glob("*.ome.tiff")
    prov = json.loads(tiff.with_name(tiff.name.replace(".ome.tiff", ".lpfm.json")).read_text())
    assert prov["engine"]["name"] == "auto" and prov["source"]["system"] == "qupath"
    assert set(prov["engine"]["qc"]["tasks"]) == {"denoise"}
    out = tifffile.imread(tiff)
    right = (slice(0, 512), slice(320, 512))  # the clean half, away from the noisy one
    assert np.array_equal(out[right], img[right])
    noisy = (slice(16, 496), slice(16, 240))
    assert np.std(out[noisy].astype(float) - img[noisy]) > 10  # the noisy half was denoised
    again = CliRunner().invoke(cli, args)  # the same run finds its result by its key
    assert again.exit_code == 0 and "1 skipped" in again.output, again.output
    rep = CliRunner().invoke(cli, ["reproduce", str(tiff)])  # pixels from the entry's image file, the plan re-run
    assert rep.exit_code == 0 and "identical pixels" in rep.output, rep.output


def test_qupath_enhance_auto_and_prompt_exclude_each_other(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    shutil.copytree(REAL_061, folder, copy_function=shutil.copyfile)
    for args, message in (([], "no prompt given"), (["--auto", "-p", "denoise"], "not both")):
        res = CliRunner().invoke(cli, ["qupath", "enhance", str(folder), *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output

"""``lpfm models``, ``lpfm evaluate`` and ``lpfm train`` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from lpfm_toolkit.cli.main import cli


def test_models_verify_ok_and_info_json(tiny_bundle: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["models", "verify", str(tiny_bundle)])
    assert res.exit_code == 0, res.output
    assert "ok tiny-test" in res.output
    res = runner.invoke(cli, ["models", "info", str(tiny_bundle), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["name"] == "tiny-test" and len(data["sha256"]) == 64


def test_models_verify_fails_cleanly_on_a_damaged_bundle(tmp_path: Path, bundle_factory) -> None:
    path = bundle_factory(tmp_path / "damaged")
    (path / "encoder" / "model.safetensors").write_bytes(b"not weights")
    res = CliRunner().invoke(cli, ["models", "verify", str(path)])
    assert res.exit_code == 2
    assert "encoder/model.safetensors: sha256 mismatch" in res.output
    assert "Traceback" not in res.output


def test_models_list_runs() -> None:
    res = CliRunner().invoke(cli, ["models", "list"])
    assert res.exit_code == 0, res.output
    assert "name" in res.output


def test_evaluate_writes_tables_and_html(tiny_bundle: Path, tmp_path: Path, sample_slide: Path) -> None:
    out = tmp_path / "eval"
    res = CliRunner().invoke(
        cli,
        [
            "evaluate",
            str(sample_slide),
            "--model",
            str(tiny_bundle),
            "--steps",
            "0",
            "--steps",
            "1",
            "--samples",
            "2",
            "--tiles",
            "3",
            "--tile",
            "64",
            "--degradations",
            "sr-x2,denoise-s31",
            "--tta",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    methods = {(r["protocol"], r["method"]) for r in report["rows"]}
    assert ("sr-x2", "classical:bicubic") in methods and ("denoise-s31", "tiny-test steps=0") in methods
    assert ("denoise-s31", "tuned:bm3d true σ") in methods and ("sr-x2", "tuned:spline") in methods
    assert ("sr-x2", "tiny-test steps=0 +tta") in methods
    assert "tiny-test steps=1 samples=2" in report["spearman"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 8 and "uncertainty" in html


def test_train_smoke_recipe_from_the_cli(tmp_path: Path, sample_slide: Path) -> None:
    res = CliRunner().invoke(
        cli,
        [
            "train",
            "--recipe",
            "smoke",
            "-i",
            str(sample_slide),
            "--work-dir",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path / "b"),
            "--name",
            "cli-smoke",
            "--threads",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "model_index.json").is_file()
    res = CliRunner().invoke(cli, ["train", "--recipe", "nope"])
    assert res.exit_code == 2 and "unknown recipe" in res.output

"""Output file names: ``{stem}_{task}_{engine}[_{region}].{key}.ome.tiff``, ``--name TEMPLATE``, results of older
versions (named from the display name) still found, and ``--out`` names that are files where folders are wanted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from shapely.geometry import box

from lpfm_toolkit.cli.main import cli
from lpfm_toolkit.errors import ConfigError
from lpfm_toolkit.prompts import parse_prompt
from lpfm_toolkit.sinks.base import OutputSpec
from lpfm_toolkit.sinks.ometiff import (
    DEFAULT_NAME,
    NameTemplate,
    OmeTiffSink,
    image_stem,
    name_fields,
    safe_filename,
    task_slug,
)

REGION = "1000,1300,64,48"
STEM = "cmu_small_region"  # the bundled sample slide is cmu_small_region.svs


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def enhance(slide: Path, out: Path, *extra: str, prompt: str = "sr x2", region: str = REGION):
    return invoke(
        "enhance", str(slide), "-p", prompt, "--region", region, "--engine", "classical", "--out", str(out), *extra
    )


def key_of(tiff: Path) -> str:
    side = tiff.with_name(tiff.name[: -len(".ome.tiff")] + ".lpfm.json")
    return json.loads(side.read_text(encoding="utf-8"))["idempotency_key"]


# ------------------------------------------------------------------------------------------- the parts


@pytest.mark.parametrize(
    "name,stem",
    [
        ("CMU-1.svs", "CMU-1"),
        ("slide.ome.tiff", "slide"),
        ("Slide.OME.TIF", "Slide"),
        ("my slide (1).ndpi", "my_slide_1"),
        ("a.b.v2.tif", "a.b.v2"),
        ("CMU-1.svs.ome.tif", "CMU-1"),
        ("CMU-1_srx2_lpfm.0123456789.ome.tiff", "CMU-1_srx2_lpfm"),  # an lpfm output enhanced again
        ("Färbung µ×2.svs", "Farbung_x2"),
        ("細胞.svs", "image"),
        ("no-extension", "no-extension"),
        (".svs", "svs"),
    ],
)
def test_image_stem_drops_the_image_extensions(name: str, stem: str) -> None:
    assert image_stem(name) == stem


@pytest.mark.parametrize(
    "prompt,slug",
    [
        ("sr x2", "srx2"),
        ("Super-resolve this image 4x", "srx4"),
        ("SR ×8", "srx8"),
        ("deblur", "deblur"),
        ("denoise", "denoise"),
        ("Restore the low-quality H&E pathology image", "restore"),
        ("normalize stain", "stain-normalize"),
        ("AF -> H&E", "AF-to-HE"),
        ("Translate the autofluorescence image to hematoxylin and eosin stained image", "AF-to-HE"),
    ],
)
def test_task_part_does_not_depend_on_how_the_prompt_was_worded(prompt: str, slug: str) -> None:
    assert task_slug(parse_prompt(prompt)) == slug


def test_default_name_has_the_region_only_when_one_restricts_the_work() -> None:
    task = parse_prompt("sr x2")
    engine = {"name": "classical", "method": "bicubic"}
    key = "0123456789abcdef" * 4
    whole = name_fields("CMU-1.svs", task, engine, 0, None)
    assert NameTemplate().render(whole, key) == "CMU-1_srx2_classical.0123456789"
    part = name_fields("CMU-1.svs", task, engine, 1, "10-20-300-400")
    assert NameTemplate().render(part, key) == "CMU-1_srx2_classical_10-20-300-400.0123456789"
    ann = name_fields("CMU-1.svs", task, {"name": "lpfm", "model": "lpfm-tiny"}, 0, "Tumor t 1")
    assert NameTemplate().render(ann, key) == "CMU-1_srx2_lpfm_Tumor-t-1.0123456789"
    every = "{stem}|{task}|{prompt}|{engine}|{method}|{region}|{level}|{key}"
    assert NameTemplate(every).render(part, key) == "CMU-1_srx2_sr_x2_classical_bicubic_10-20-300-400_1_0123456789"
    for ext in (".ome.tiff", ".OME.TIF", ".tif"):  # the extension is the writer's (.ome.tiff)
        assert NameTemplate("{stem}" + ext).render(whole, key) == "CMU-1"
    assert NameTemplate(DEFAULT_NAME + ".ome.tiff").is_default and not NameTemplate("{stem}.{key}").is_default


@pytest.mark.parametrize(
    "template,words",
    [
        ("{stem}_{colour}", "unknown placeholder {colour}"),
        ("", "--name is empty"),
        ("   ", "--name is empty"),
        ("out/{stem}", "path separator"),
        ("..\\{stem}", "path separator"),
        ("{region}", "empty file name"),
        ("{stem}[_{region}", "unmatched [ or ]"),
        ("{stem}[[_{region}]]", "unmatched [ or ]"),
        ("{stem:>20}", "write placeholders plainly"),
        ("{stem!r}", "write placeholders plainly"),
        ("{}", "write placeholders plainly"),
        ("{stem", "is not a valid template"),
    ],
)
def test_bad_templates_are_refused_with_one_line(template: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        NameTemplate(template)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_optional_part_is_kept_when_its_placeholders_are_filled() -> None:
    fields = {"stem": "s", "region": ""}
    assert NameTemplate("[{stem}_]{key}").render(fields, "k" * 64) == "s_kkkkkkkkkk"
    assert NameTemplate("{stem}[_{region}_x]").render(fields, "k" * 64) == "s"


def test_a_spec_without_fields_and_a_bare_name_get_the_old_name(tmp_path: Path) -> None:
    sink = OmeTiffSink(tmp_path)
    key = "ab" * 32
    old = tmp_path / "CMU-1.svs_lpfm_srx2.ababababab.ome.tiff"
    assert sink.target(key, "CMU-1.svs [lpfm sr×2]") == old
    spec = OutputSpec("CMU-1.svs [lpfm sr×2]", 4, 4, ["R", "G", "B"], np.dtype(np.uint8), None)
    assert sink.target(key, spec) == old
    fields = name_fields("CMU-1.svs", parse_prompt("sr x2"), {"name": "identity"}, 0, None)
    assert (
        sink.target(key, dataclasses.replace(spec, file_fields=fields)).name
        == "CMU-1_srx2_identity.ababababab.ome.tiff"
    )
    assert safe_filename("CMU-1.svs [lpfm sr×2]") == "CMU-1.svs_lpfm_srx2"


# ------------------------------------------------------------------------------------------- lpfm enhance


def test_enhance_names_the_file_from_stem_task_engine_region_and_key(sample_slide: Path, tmp_path: Path) -> None:
    res = enhance(sample_slide, tmp_path)
    assert res.exit_code == 0, res.output
    (tiff,) = tmp_path.glob("*.ome.tiff")
    assert tiff.name == f"{STEM}_srx2_classical_1000-1300-64-48.{key_of(tiff)[:10]}.ome.tiff"
    assert ".svs" not in tiff.name
    assert (tmp_path / f"{STEM}_srx2_classical_1000-1300-64-48.{key_of(tiff)[:10]}.lpfm.json").is_file()
    # the display name (OME-XML image name, QuPath/OMERO names) is unchanged
    assert json.loads(tiff.with_name(tiff.name.replace(".ome.tiff", ".lpfm.json")).read_text())["output"]["name"] == (
        "cmu_small_region [lpfm sr×2]"
    )
    again = enhance(sample_slide, tmp_path)
    assert again.exit_code == 0 and f"already done: {tiff}" in again.output


def test_name_template_and_its_rerun(sample_slide: Path, tmp_path: Path) -> None:
    res = enhance(sample_slide, tmp_path, "--name", "{task}-{stem}_L{level}_{method}[_{region}]_{key}")
    assert res.exit_code == 0, res.output
    (tiff,) = tmp_path.glob("*.ome.tiff")
    assert tiff.name == f"srx2-{STEM}_L0_bicubic_1000-1300-64-48_{key_of(tiff)[:10]}.ome.tiff"
    again = enhance(sample_slide, tmp_path, "--name", "{task}-{stem}_L{level}_{method}[_{region}]_{key}")
    assert again.exit_code == 0 and "already done" in again.output
    assert len(list(tmp_path.glob("*.ome.tiff"))) == 1


@pytest.mark.parametrize("template", ["{stem}_{colour}", "a/{stem}", "{region}", ""])
def test_bad_name_fails_before_the_engine_is_built(
    sample_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str
) -> None:
    import lpfm_toolkit.options

    def no_engine(*args: object, **kwargs: object) -> None:
        raise AssertionError("the engine was built before --name was checked")

    monkeypatch.setattr(lpfm_toolkit.options, "build_engine", no_engine)
    res = enhance(sample_slide, tmp_path / "out", "--name", template)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--name" in lines[0], res.output
    assert not list(tmp_path.rglob("*.ome.tiff"))


def test_name_without_key_refuses_to_replace_another_runs_result(sample_slide: Path, tmp_path: Path) -> None:
    assert enhance(sample_slide, tmp_path, "--name", "{stem}_enhanced").exit_code == 0
    tiff = tmp_path / f"{STEM}_enhanced.ome.tiff"
    first = key_of(tiff)
    other = enhance(sample_slide, tmp_path, "--name", "{stem}_enhanced", prompt="deblur")
    assert other.exit_code == 2 and "made by a different run" in other.output and "{key}" in other.output
    assert key_of(tiff) == first
    forced = enhance(sample_slide, tmp_path, "--name", "{stem}_enhanced", "--force", prompt="deblur")
    assert forced.exit_code == 0, forced.output
    assert key_of(tiff) != first and len(list(tmp_path.glob("*.ome.tiff"))) == 1


def test_name_and_a_file_out_together_are_refused(sample_slide: Path, tmp_path: Path) -> None:
    res = enhance(sample_slide, tmp_path / "x.ome.tiff", "--name", "{stem}")
    assert res.exit_code == 2 and "both name the file" in res.output
    assert not (tmp_path / "x.ome.tiff").exists()


def test_result_of_an_older_version_is_found_under_its_old_name(
    sample_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before name templates, files were ``<safe display name>.<key>.ome.tiff``: a re-run must skip them."""

    def old_target(self: OmeTiffSink, key: str, spec: OutputSpec | str) -> Path:
        return self.legacy_target(key, spec.name if isinstance(spec, OutputSpec) else spec)

    with monkeypatch.context() as m:  # write as the older version did
        m.setattr(OmeTiffSink, "target", old_target)
        assert enhance(sample_slide, tmp_path).exit_code == 0
    (old,) = tmp_path.glob("*.ome.tiff")
    assert old.name == f"cmu_small_region_lpfm_srx2.{key_of(old)[:10]}.ome.tiff"
    before = old.stat().st_mtime_ns
    again = enhance(sample_slide, tmp_path)
    assert again.exit_code == 0 and f"already done: {old}" in again.output
    assert list(tmp_path.glob("*.ome.tiff")) == [old] and old.stat().st_mtime_ns == before
    # a custom --name asks for another file: it is made, the old one stays
    named = enhance(sample_slide, tmp_path, "--name", "{stem}.{key}")
    assert named.exit_code == 0 and "wrote" in named.output
    assert sorted(p.name for p in tmp_path.glob("*.ome.tiff")) == sorted(
        [old.name, f"{STEM}.{key_of(old)[:10]}.ome.tiff"]
    )


def test_whole_level_has_no_region_part(tmp_path: Path) -> None:
    import tifffile

    img = tmp_path / "small image.tif"
    tifffile.imwrite(img, np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8), photometric="rgb")
    res = invoke(
        "enhance", str(img), "-p", "denoise", "--engine", "classical", "--mpp", "0.5", "--out", str(tmp_path / "o")
    )
    assert res.exit_code == 0, res.output
    (tiff,) = (tmp_path / "o").glob("*.ome.tiff")
    assert tiff.name == f"small_image_denoise_classical.{key_of(tiff)[:10]}.ome.tiff"


def test_region_of_an_annotation_is_its_class_and_name(sample_slide: Path) -> None:
    from lpfm_toolkit.pipeline import output_fields, plan
    from lpfm_toolkit.sources import Annotation, open_image

    class Engine:
        def describe(self) -> dict:
            return {"name": "classical", "method": "bicubic"}

    with open_image(sample_slide) as handle:
        anns = [
            Annotation(box(900, 1200, 1020, 1300), "Tumor", "id-1", "t 1"),
            Annotation(box(900, 1200, 1020, 1300), None, "00000000-0000-4000-8000-000000000002", None),
        ]
        items = plan(handle, parse_prompt("sr x2"), annotations=anns)
        assert [output_fields(handle, i, Engine())["region"] for i in items] == [
            "Tumor-t-1",
            "00000000-0000-4000-8000-000000000002",
        ]
        (whole,) = plan(handle, parse_prompt("sr x2"))
        assert output_fields(handle, whole, Engine())["region"] == ""


# ------------------------------------------------------------------------------------------- --out


@pytest.mark.parametrize("name", ["single.tif", "single.TIFF", "single.png", "single.svs"])
def test_out_naming_a_non_ome_file_says_why_and_creates_nothing(sample_slide: Path, tmp_path: Path, name: str) -> None:
    res = enhance(sample_slide, tmp_path / name)
    assert res.exit_code != 0 and "lpfm writes pyramidal OME-TIFF" in res.output
    assert "single.ome.tiff" in res.output
    assert not (tmp_path / name).exists()


def test_out_ome_tiff_writes_exactly_that_file(sample_slide: Path, tmp_path: Path) -> None:
    res = enhance(sample_slide, tmp_path / "single.ome.tiff")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single.lpfm.json", "single.ome.tiff"]


def test_an_existing_folder_named_like_a_file_is_a_folder(sample_slide: Path, tmp_path: Path) -> None:
    folder = tmp_path / "results.tif"
    folder.mkdir()
    assert enhance(sample_slide, folder).exit_code == 0
    assert len(list(folder.glob("*.ome.tiff"))) == 1


@pytest.mark.parametrize("command", [["jobs", "add"], ["qupath", "enhance"]])
def test_folder_out_of_jobs_and_qupath_refuses_a_file_name(sample_slide: Path, tmp_path: Path, command: list) -> None:
    res = invoke(
        *command,
        str(sample_slide),
        "-p",
        "sr x2",
        "--out",
        str(tmp_path / "single.tif"),
        *(["--store", str(tmp_path / "s.sqlite")] if command[0] == "jobs" else []),
    )
    assert res.exit_code != 0 and "looks like a file name" in res.output, res.output
    assert not (tmp_path / "single.tif").exists()


# ------------------------------------------------------------------------------------------- jobs


def test_job_keys_do_not_change_with_default_names_and_do_with_a_custom_one(sample_slide: Path, tmp_path: Path) -> None:
    from lpfm_toolkit.jobs import JobSpec
    from lpfm_toolkit.jobs.spec import job_key

    spec = JobSpec(
        source=str(sample_slide), prompt="sr x2", out=str(tmp_path), region=(1000, 1300, 64, 48), engine="classical"
    )
    assert "name" not in spec.to_dict()  # specs written before --name stay byte-identical
    plain = job_key(spec)
    assert job_key(dataclasses.replace(spec, name=DEFAULT_NAME)) == plain
    custom = job_key(dataclasses.replace(spec, name="{stem}_{key}"))
    assert custom != plain and len(custom) == len(plain)
    assert JobSpec.from_dict(dataclasses.replace(spec, name="{stem}_{key}").to_dict()).name == "{stem}_{key}"
    with pytest.raises(ConfigError, match="unknown placeholder"):
        dataclasses.replace(spec, name="{nope}")


def test_jobs_write_files_under_the_template(sample_slide: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "jobs.sqlite")
    out = tmp_path / "out"
    base = ["--region", REGION, "--engine", "classical", "--out", str(out), "--store", store]
    assert invoke("jobs", "add", str(sample_slide), "-p", "sr x2", *base).exit_code == 0
    named = invoke("jobs", "add", str(sample_slide), "-p", "sr x2", "--name", "{stem}_job_{key}", *base)
    assert named.exit_code == 0 and "added 1 job(s), 0 already" in named.output, named.output
    again = invoke("jobs", "add", str(sample_slide), "-p", "sr x2", "--name", "{stem}_job_{key}", *base)
    assert "added 0 job(s), 1 already" in again.output
    run = invoke("jobs", "run", "--store", store)
    assert run.exit_code == 0, run.output
    names = sorted(p.name for p in out.glob("*.ome.tiff"))
    key = key_of(out / names[0])[:10]
    assert names == sorted([f"{STEM}_srx2_classical_1000-1300-64-48.{key}.ome.tiff", f"{STEM}_job_{key}.ome.tiff"])
    bad = invoke("jobs", "add", str(sample_slide), "-p", "sr x2", "--name", "{x}", *base)
    assert bad.exit_code == 2 and "unknown placeholder {x}" in bad.output

"""Hostile inputs, options, output targets and records for ``lpfm enhance / verify / provenance / reproduce``.

Every case checks: the exit status; one ``error:`` line naming the problem (no traceback); that every file
that existed before is byte-identical after; and, when the command failed, that nothing new that looks
finished (an image, a sidecar, a PNG, a scratch folder) was left. Files are made by ``hostile_corpus.py``.
Most cases run in-process (click's CliRunner); those that must prove no model was loaded, or need a
resource limit, run the real CLI in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lpfm_toolkit.cli.main import cli

sys.path.insert(0, str(Path(__file__).parent))
import hostile_corpus as C  # noqa: E402 - the generators beside this file

pytestmark = pytest.mark.hostile

ENV = {"LPFM_CONFIG": "/nonexistent/lpfm-config.toml", "COLUMNS": "250"}
REGION = "700,1200,64,64"
FINISHED = (".ome.tiff", ".ome.tif", ".lpfm.json", ".png", ".partial")


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: files by sha256, links by target, folders and pipes by kind."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "special"
    return out


def assert_untouched_and_nothing_finished(folder: Path, before: dict[str, str], failed: bool) -> None:
    after = snapshot(folder)
    changed = [name for name, h in before.items() if after.get(name) != h]
    assert not changed, f"inputs changed or removed: {changed}"
    if failed:
        new = set(after) - set(before)
        leftovers = [n for n in new if after[n] != "dir" or ".lpfm-scratch-" in n]
        assert not leftovers, f"a failed run left {leftovers}"
        assert not [n for n in new if n.endswith(FINISHED)]


def one_error_line(res: Result, code: int, words: tuple[str, ...]) -> str:
    text = res.output
    assert res.exit_code == code, (res.exit_code, text)
    assert "Traceback" not in text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert len(errors[0]) < 600, "errors are one short line"
    return errors[0]


def run(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, args, env={**ENV, **(env or {})})


@dataclass
class Case:
    """A hostile command: ``build(work)`` makes its files and returns its arguments."""

    id: str
    build: Callable[[Path], list[str]]
    code: int = 2
    words: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def enhance(slide: str | Path, *extra: str, prompt: str = "sr x2", engine: str = "classical") -> list[str]:
    args = ["enhance", str(slide), "-p", prompt, *extra]
    if engine:
        args += ["--engine", engine]
    return args


def _out(w: Path) -> str:
    return str(w / "out")


# --------------------------------------------------------------------------------------------- inputs
INPUTS = [
    Case("missing-file", lambda w: enhance(w / "nosuch.svs", "--out", _out(w)), words=("does not exist",)),
    Case("empty-file", lambda w: enhance(C.garbage(w, "empty.svs", size=0), "--out", _out(w)), words=("empty",)),
    Case("fifo", lambda w: enhance(C.fifo(w), "--out", _out(w)), words=("named pipe",)),
    Case("dev-zero", lambda w: enhance("/dev/zero", "--out", _out(w)), words=("device",)),
    Case("folder", lambda w: enhance(w, "--out", _out(w)), words=("is a folder",)),
    Case(
        "dangling-symlink",
        lambda w: enhance(C.symlink(w, w / "gone.svs", "link.svs"), "--out", _out(w)),
        words=("does not exist",),
    ),
    Case(
        "symlink-loop",
        lambda w: enhance(
            (C.symlink(w, "loop-b.svs", "loop-a.svs"), C.symlink(w, "loop-a.svs", "loop-b.svs"))[0], "--out", _out(w)
        ),
        words=("Too many levels of symbolic links",),
    ),
    Case(
        "truncated-svs-third",
        lambda w: enhance(C.truncated(w, C.SAMPLE, 1 / 3, "cut.svs"), "--region", REGION, "--out", _out(w)),
        words=("copy it again",),
    ),
    Case(
        "truncated-svs-header",
        lambda w: enhance(C.truncated(w, C.SAMPLE, 0.002, "head.svs"), "--out", _out(w)),
        words=("copy it again",),
    ),
    Case("garbage-svs", lambda w: enhance(C.garbage(w, "noise.svs"), "--out", _out(w))),
    Case(
        "garbage-tiff-magic",
        lambda w: enhance(C.garbage(w, "noise.tiff", head=b"II*\x00"), "--out", _out(w)),
        words=("copy it again",),
    ),
    Case(
        "garbage-unknown-suffix",
        lambda w: enhance(C.garbage(w, "notes.xyz"), "--out", _out(w)),
        words=("not recognised",),
    ),
    Case(
        "header-1e6-squared",
        lambda w: enhance(C.huge_header_tiff(w, 10**6, 10**6), "--out", _out(w)),
        words=("declares 1000000×1000000",),
    ),
    Case(
        "header-too-many-output-pixels",
        lambda w: enhance(C.huge_header_tiff(w, 300_000, 300_000), "-p", "sr x8", "--out", _out(w)),
        words=("smaller --region",),
    ),
    Case("png-bomb", lambda w: enhance(C.png_bomb(w), "--out", _out(w)), words=("too many pixels",)),
    Case(
        "png-truncated",
        lambda w: enhance(C.truncated(w, C.png_bomb(w, 64, "ok.png"), 0.5, "cut.png"), "--out", _out(w)),
        words=("not a readable image",),
    ),
    Case(
        "jpeg-garbage",
        lambda w: enhance(C.garbage(w, "photo.jpg", head=b"\xff\xd8\xff\xe0"), "--out", _out(w)),
        words=("not a readable image",),
    ),
    Case(
        "float-nan",
        lambda w: enhance(C.float_with(w, float("nan"), "nan.ome.tiff"), "--out", _out(w), prompt="denoise"),
        words=("NaN or infinite", "x=30, y=40"),
    ),
    Case(
        "float-inf",
        lambda w: enhance(C.float_with(w, float("inf"), "inf.ome.tiff"), "--out", _out(w), prompt="denoise"),
        words=("NaN or infinite",),
    ),
]

# --------------------------------------------------------------------------------------------- options
OPTIONS = [
    Case("mpp-negative", lambda w: enhance(C.SAMPLE, "--mpp", "-0.25", "--out", _out(w)), words=("--mpp",)),
    Case("mpp-nan", lambda w: enhance(C.SAMPLE, "--mpp", "nan", "--out", _out(w)), words=("--mpp",)),
    Case("mpp-inf", lambda w: enhance(C.SAMPLE, "--mpp", "inf", "--out", _out(w)), words=("--mpp",)),
    Case("mpp-zero", lambda w: enhance(C.SAMPLE, "--mpp", "0", "--out", _out(w)), words=("--mpp",)),
    Case("tile-zero", lambda w: enhance(C.SAMPLE, "--tile", "0", "--out", _out(w)), words=("tile_size=0",)),
    Case(
        "tile-huge",
        lambda w: enhance(C.SAMPLE, "--tile", "99999999999999999999", "--out", _out(w)),
        words=("tile_size", "out of range"),
    ),
    Case(
        "env-tile-zero",
        lambda w: enhance(C.SAMPLE, "--out", _out(w)),
        env={"LPFM_TILE_SIZE": "0"},
        words=("LPFM_TILE_SIZE",),
    ),
    Case("samples-zero", lambda w: enhance(C.SAMPLE, "--samples", "0", "--out", _out(w)), words=("samples=0",)),
    Case(
        "steps-negative",
        lambda w: enhance(C.SAMPLE, "--steps", "-4", "--out", _out(w), engine="lpfm"),
        words=("steps=-4",),
    ),
    Case(
        "overlap-not-below-tile",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--tile", "64", "--overlap", "64", "--out", _out(w)),
        words=("overlap 64",),
    ),
    Case(
        "method-with-learned-engine",
        lambda w: enhance(C.SAMPLE, "--method", "tv", "--out", _out(w), prompt="denoise", engine="lpfm"),
        words=("--method tv",),
    ),
    Case(
        "samples-with-classical", lambda w: enhance(C.SAMPLE, "--samples", "4", "--out", _out(w)), words=("all zeros",)
    ),
    Case(
        "region-negative", lambda w: enhance(C.SAMPLE, "--region", "-5,0,10,10", "--out", _out(w)), words=("outside",)
    ),
    Case("region-empty", lambda w: enhance(C.SAMPLE, "--region", "0,0,0,10", "--out", _out(w)), words=("empty",)),
    Case(
        "region-not-numbers", lambda w: enhance(C.SAMPLE, "--region", "a,b", "--out", _out(w)), words=("four integers",)
    ),
    Case(
        "region-huge",
        lambda w: enhance(C.SAMPLE, "--region", "0,0,99999999999,10", "--out", _out(w)),
        words=("outside",),
    ),
    Case(
        "level-missing",
        lambda w: enhance(C.SAMPLE, "--level", "7", "--out", _out(w)),
        words=("level 7 does not exist",),
    ),
    Case(
        "level-negative",
        lambda w: enhance(C.SAMPLE, "--level", "-1", "--out", _out(w)),
        words=("level -1 does not exist",),
    ),
    Case("prompt-empty", lambda w: enhance(C.SAMPLE, "--out", _out(w), prompt=""), words=("empty prompt",)),
    Case(
        "prompt-10000-chars",
        lambda w: enhance(C.SAMPLE, "--out", _out(w), prompt="enhance " + "x" * 10_000),
        words=("too long",),
    ),
    Case(
        "prompt-if-is-not-fluorescence",
        lambda w: enhance(C.SAMPLE, "--out", _out(w), prompt="convert this H&E to PAS if possible"),
        words=("H&E→PAS",),
    ),
    Case("prompt-scale-3", lambda w: enhance(C.SAMPLE, "--out", _out(w), prompt="sr x3"), words=("scale 3",)),
    Case(
        "config-not-toml",
        lambda w: enhance(C.SAMPLE, "--out", _out(w)),
        env={"LPFM_CONFIG": "{cfg:engine = = 'x'}"},
        words=("not valid TOML",),
    ),
    Case(
        "config-binary",
        lambda w: enhance(C.SAMPLE, "--out", _out(w)),
        env={"LPFM_CONFIG": "{cfg:\udcff\udcfe}"},
        words=("not valid TOML",),
    ),
    Case(
        "config-with-password",
        lambda w: enhance(C.SAMPLE, "--out", _out(w)),
        env={"LPFM_CONFIG": "{cfg:omero_password = 'hunter2'}"},
        words=("secrets are not read",),
    ),
]


# --------------------------------------------------------------------------------------------- outputs
def _made(w: Path, name: str = "made.ome.tiff", region: str = REGION) -> Path:
    """An lpfm output (classical sr×2 of a small region of the sample) at ``w/name``."""
    res = run(enhance(C.SAMPLE, "--region", region, "--out", str(w / name)))
    assert res.exit_code == 0, res.output
    return w / name


def _made_without_sidecar(w: Path) -> Path:
    out = _made(w)
    (w / "made.lpfm.json").unlink()
    return out


OUTPUTS = [
    Case(
        "out-foreign-ome-tiff",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--out", str(C.foreign_ome_tiff(w))),
        words=("lpfm did not write",),
    ),
    Case(
        "out-foreign-ome-tiff-force",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--force", "--out", str(C.foreign_ome_tiff(w))),
        words=("not even with --force",),
    ),
    Case(
        "out-symlink-to-user-file",
        lambda w: enhance(
            C.SAMPLE, "--region", REGION, "--force", "--out", str(C.symlink(w, C.foreign_ome_tiff(w), "link.ome.tiff"))
        ),
        words=("symbolic link",),
    ),
    Case(
        "out-is-a-folder",
        lambda w: enhance(
            C.SAMPLE, "--region", REGION, "--out", str((w / "dir.ome.tiff").mkdir() or w / "dir.ome.tiff")
        ),
        words=("a folder",),
    ),
    Case(
        "out-under-a-file",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--out", str(C.garbage(w, "plain.txt") / "sub")),
        words=("is a file",),
    ),
    Case(
        "out-file-under-a-file",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--out", str(C.garbage(w, "plain.txt") / "x.ome.tiff")),
        words=("is a file",),
    ),
    Case(
        "out-unwritable-folder",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--out", "/proc/lpfm-out"),
        words=("cannot write in /proc",),
    ),
    Case(
        "out-unwritable-file",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--out", "/proc/x.ome.tiff"),
        words=("cannot write in /proc",),
    ),
    Case(
        "out-plain-tif-name",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--out", str(w / "single.tif")),
        words=("single.ome.tiff",),
    ),
    Case(
        "out-sidecar-name-taken",
        lambda w: enhance(
            C.SAMPLE, "--region", REGION, "--out", str((C.garbage(w, "x.lpfm.json"), w / "x.ome.tiff")[1])
        ),
        words=("not an lpfm sidecar",),
    ),
    Case(
        "out-ours-sidecar-removed",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--out", str(_made_without_sidecar(w))),
        words=("is missing",),
    ),
    Case(
        "out-ours-other-run",
        lambda w: enhance(C.SAMPLE, "--region", "0,0,64,64", "--out", str(_made(w))),
        words=("different run",),
    ),
    Case(
        "preview-unwritable",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--out", _out(w), "--preview", "/proc/before-after.png"),
        words=("--preview", "cannot write"),
    ),
    Case(
        "preview-user-png",
        lambda w: enhance(
            C.SAMPLE, "--region", REGION, "--out", _out(w), "--preview", str(C.png_bomb(w, 8, "holiday.png"))
        ),
        words=("not written by lpfm",),
    ),
    Case(
        "preview-is-a-folder",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--out", _out(w), "--preview", str(w)),
        words=("is a folder",),
    ),
]


# --------------------------------------------------------------------------------------------- records
def _sidecar(w: Path, text: str | bytes) -> Path:
    path = w / "bad.lpfm.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _good_record(w: Path) -> dict:
    return json.loads((_made(w).with_name("made.lpfm.json")).read_text())


def _edited(w: Path, edit: Callable[[dict], None]) -> Path:
    rec = _good_record(w)
    edit(rec)
    return _sidecar(w, json.dumps(rec))


BAD_RECORDS = [
    ("truncated-json", lambda w: _sidecar(w, '{"schema": "lpfm-toolkit/provenance/v1", "source": {'), "not valid JSON"),
    ("binary", lambda w: _sidecar(w, bytes(range(256)) * 4), "binary"),
    ("json-array", lambda w: _sidecar(w, "[1, 2, 3]"), "not an object"),
    ("json-string", lambda w: _sidecar(w, '"hello"'), "not an object"),
    ("deeply-nested", lambda w: _sidecar(w, "[" * 100_000 + "]" * 100_000), "bad.lpfm.json"),
    ("not-lpfm-json", lambda w: _sidecar(w, '{"name": "my settings"}'), "not an lpfm provenance record"),
    ("no-source", lambda w: _edited(w, lambda r: r.pop("source")), "'source'"),
    ("tile-abc", lambda w: _edited(w, lambda r: r["tiling"].update(tile="abc")), "tiling tile"),
    ("region-negative", lambda w: _edited(w, lambda r: r["source"].update(region=[-5, 0, 10, 10])), "negative"),
    ("region-three-numbers", lambda w: _edited(w, lambda r: r["source"].update(region=[0, 0, 10])), "four integers"),
    ("seed-text", lambda w: _edited(w, lambda r: r.update(seed="7")), "'seed'"),
    ("steps-text", lambda w: _edited(w, lambda r: r["engine"].update(steps="four")), "engine steps"),
    ("task-unknown", lambda w: _edited(w, lambda r: r["task"].update(kind="explode")), "task"),
    ("too-large", lambda w: _sidecar(w, b" " * (17 << 20)), "too large"),
]
RECORDS = [
    Case(f"show-{name}", (lambda b: lambda w: ["provenance", "show", str(b(w))])(build), words=(word,))
    for name, build, word in BAD_RECORDS
]
RECORDS += [
    Case(f"reproduce-{name}", (lambda b: lambda w: ["reproduce", str(b(w))])(build), words=(word,))
    for name, build, word in BAD_RECORDS[::3]
]
RECORDS += [
    Case("verify-foreign-tiff", lambda w: ["verify", str(C.foreign_ome_tiff(w))], words=("no lpfm provenance",)),
    Case("verify-missing", lambda w: ["verify", str(w / "gone.ome.tiff")], words=("does not exist",)),
    Case(
        "show-sidecar-is-folder",
        lambda w: ["provenance", "show", str((w / "d.lpfm.json").mkdir() or w / "d.lpfm.json")],
        words=("not a regular file",),
    ),
]


def _cut_end(out: Path, n: int = 300) -> Path:
    out.write_bytes(out.read_bytes()[:-n])
    return out


# names, pipes and links where a path is expected
PATHS = [
    Case("name-too-long", lambda w: enhance(w / ("x" * 300 + ".svs"), "--out", _out(w)), words=("cannot be opened",)),
    Case("newline-in-name", lambda w: enhance(w / "two\nlines.svs", "--out", _out(w)), words=("does not exist",)),
    Case(
        "out-is-the-source",
        lambda w: enhance(C.small_rgb(w), "--force", "--out", str(w / "crop.ome.tiff")),
        words=("lpfm did not write",),
    ),
    Case(
        "show-sidecar-fifo",
        lambda w: ["provenance", "show", str(C.fifo(w, "x.lpfm.json"))],
        words=("not a regular file",),
    ),
    Case(
        "show-output-fifo",
        lambda w: ["provenance", "show", str(C.fifo(w, "x.ome.tiff"))],
        words=("not a regular file",),
    ),
    Case(
        "out-sidecar-is-a-fifo",
        lambda w: enhance(C.SAMPLE, "--region", REGION, "--out", str((C.fifo(w, "x.lpfm.json"), w / "x.ome.tiff")[1])),
        words=("not an lpfm sidecar",),
    ),
    Case(
        "out-sidecar-links-elsewhere",
        lambda w: enhance(
            C.SAMPLE,
            "--region",
            REGION,
            "--out",
            str((C.symlink(w, "/etc/hostname", "x.lpfm.json"), w / "x.ome.tiff")[1]),
        ),
        words=("not an lpfm sidecar",),
    ),
    Case("verify-truncated-output", lambda w: ["verify", str(_cut_end(_made(w)))], code=1, words=("damaged",)),
]

CASES = INPUTS + OPTIONS + OUTPUTS + RECORDS + PATHS


def _config(env: dict[str, str], w: Path) -> dict[str, str]:
    """``{cfg:TEXT}`` in an env value: write TEXT to a config file in the case's folder and point there."""
    out = {}
    for k, v in env.items():
        if v.startswith("{cfg:"):
            cfg = w / "config.toml"
            cfg.write_bytes(v[5:-1].encode("utf-8", "surrogateescape"))
            v = str(cfg)
        out[k] = v
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case: Case, tmp_path: Path) -> None:
    work = tmp_path / "wörk dir ✓"  # every case also runs under a non-ASCII path with a space
    work.mkdir()
    args = case.build(work)
    env = _config(case.env, work)
    before = snapshot(work)
    res = run(args, env)
    one_error_line(res, case.code, case.words)
    assert_untouched_and_nothing_finished(work, before, failed=True)


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 55


# --------------------------------------------------------------------------------------------- subprocesses
PROBE = (
    "import sys\nfrom lpfm_toolkit.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
    "    code = e.code\nprint('model-loaded' if 'torch' in sys.modules else 'no-model', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def lpfm(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV}
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120, env=env, **kw
    )


@pytest.mark.parametrize(
    "args,word",
    [
        (["enhance", "nosuch.svs", "-p", "sr x2"], "does not exist"),
        (["enhance", str(C.SAMPLE), "-p", "sr x2", "--region", "2000,0,500,500"], "outside"),
        (["enhance", str(C.SAMPLE), "-p", "sr x2", "--out", "/proc/out"], "cannot write"),
        (["enhance", str(C.SAMPLE), "-p", "sr x2", "--preview", "/proc/p.png"], "cannot write"),
        (["enhance", str(C.SAMPLE), "-p", "denoise", "--method", "tv", "--engine", "lpfm"], "--method"),
        (["enhance", str(C.SAMPLE), "-p", "sr x2", "--engine", "lpfm", "--samples", "3", "--steps", "0"], "all zeros"),
    ],
    ids=["missing", "region", "out", "preview", "method", "samples-steps0"],
)
def test_fails_before_any_model_loads(args: list[str], word: str, tmp_path: Path) -> None:
    res = lpfm(*args, cwd=tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert lines[-1] == "no-model", "the model was loaded before a check that needs none"
    assert len(lines) == 2 and lines[0].startswith("error:") and word in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []


def test_full_disk_leaves_nothing_finished(tmp_path: Path) -> None:
    """Writes fail (EFBIG under a file-size limit, as ENOSPC would): one line, exit 1, no output, no scratch."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 << 10, 48 << 10))

    out = tmp_path / "out"
    res = lpfm(
        "enhance",
        str(C.SAMPLE),
        "-p",
        "sr x2",
        "--engine",
        "classical",
        "--region",
        "0,0,512,512",
        "--compression",
        "none",
        "--out",
        str(out),
        preexec_fn=limit,
    )
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "File too large" in res.stderr
    assert not out.exists() or [p.name for p in out.iterdir()] == []


# --------------------------------------------------------------------------------------------- damage and re-runs
def test_truncated_output_is_made_again(tmp_path: Path) -> None:
    out = _made(tmp_path)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    res = run(enhance(C.SAMPLE, "--region", REGION, "--out", str(out)))
    assert res.exit_code == 0 and "damaged" in res.output and "made it again" in res.output, res.output
    assert run(["verify", str(out)]).exit_code == 0


def test_same_size_edit_of_an_output_is_caught_by_verify(tmp_path: Path) -> None:
    region = "700,1200,256,256"  # its ×2 output fills one 512-px tile, so the edit lands in the image
    out = _made(tmp_path, region=region)  # JPEG: checked against the stored (decoded) checksums
    C.flip_pixel_byte(out)
    res = run(["verify", str(out)])
    assert res.exit_code == 1 and "damaged" in res.output and "Traceback" not in res.output, res.output
    quick = run(enhance(C.SAMPLE, "--region", region, "--out", str(out)))
    assert "already done" in quick.output  # the quick check reads the header only ...
    full = run(enhance(C.SAMPLE, "--region", region, "--out", str(out), "--verify"))
    assert full.exit_code == 0 and "made it again" in full.output  # ... --verify decodes it all
    assert run(["verify", str(out)]).exit_code == 0


def test_edited_sidecar_is_reported_and_not_reused(tmp_path: Path) -> None:
    out = _made(tmp_path)
    side = out.with_name("made.lpfm.json")
    rec = json.loads(side.read_text())
    rec["prompt"] = "something else"
    side.write_text(json.dumps(rec))
    shown = run(["provenance", "show", str(out)])
    assert shown.exit_code == 1 and "disagree on prompt" in shown.output
    assert run(["verify", str(out)]).exit_code == 1
    again = run(enhance(C.SAMPLE, "--region", REGION, "--out", str(out)))
    assert again.exit_code == 0 and "made it again" in again.output


def test_same_size_edit_of_the_source_is_not_already_done(tmp_path: Path) -> None:
    src = tmp_path / "slide.ome.tiff"
    C.small_rgb(tmp_path, src.name)
    out = tmp_path / "out"
    assert run(enhance(src, "--out", str(out))).exit_code == 0
    C.flip_byte(src, 0.7)  # inside the pixel data, far from both ends' first/last MiB rule of old
    res = run(enhance(src, "--out", str(out)))
    assert res.exit_code == 0 and "already done" not in res.output and "wrote" in res.output
    assert len(list(out.glob("*.ome.tiff"))) == 2


def test_lossless_rerun_does_not_reuse_a_jpeg_result(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run(enhance(C.SAMPLE, "--region", REGION, "--out", str(out)))
    again = run(enhance(C.SAMPLE, "--region", REGION, "--out", str(out), "--compression", "jpeg"))
    zlib = run(enhance(C.SAMPLE, "--region", REGION, "--out", str(out), "--compression", "zlib"))
    assert first.exit_code == again.exit_code == zlib.exit_code == 0
    assert "already done" in again.output  # auto is JPEG for 8-bit RGB: the same result
    assert "already done" not in zlib.output and "wrote" in zlib.output
    assert len(list(out.glob("*.ome.tiff"))) == 2


def test_source_changing_while_read_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lpfm_toolkit.engine.classical import ClassicalEngine

    (tmp_path / "in").mkdir()
    src = C.small_rgb(tmp_path / "in", "slide.ome.tiff", size=160)
    original = ClassicalEngine.process

    def process(self, tiles, task, seeds):  # the scanner is still writing the file
        with src.open("ab") as fh:
            fh.write(b"\0")
        return original(self, tiles, task, seeds)

    monkeypatch.setattr(ClassicalEngine, "process", process)
    (tmp_path / "out").mkdir()
    res = run(enhance(src, "--tile", "64", "--overlap", "8", "--out", str(tmp_path / "out")))
    one_error_line(res, 2, ("changed while it was being read",))
    assert_untouched_and_nothing_finished(tmp_path / "out", {}, failed=True)


def test_unicode_and_dash_paths_work(tmp_path: Path) -> None:
    folder = tmp_path / "Präparate 日本 ✓"
    folder.mkdir()
    src = C.small_rgb(folder, "-Schnitt 1 (neu).ome.tiff")
    res = run(enhance(src, "--out", str(folder / "Ergebnisse ü")))
    assert res.exit_code == 0, res.output
    (out,) = (folder / "Ergebnisse ü").glob("*.ome.tiff")
    assert run(["verify", str(out)]).exit_code == 0


# --------------------------------------------------------------------------------------------- QuPath projects
@pytest.mark.parametrize("kind", ["garbage-qpproj", "no-qpproj", "slide-moved-away"])
def test_hostile_qupath_projects(qp, kind: str, tmp_path: Path) -> None:
    feats = [qp.box_feature(100, 100, 64, 64, "Tumor", "a", "00000000-0000-4000-8000-00000000000a")]
    work = tmp_path / "lab ✓"
    project = qp.write_project(
        work / "proj",
        C.SAMPLE,
        "0.5.1",
        annotations=feats,
        old_uri="file:/D:/lab/proj/project.qpproj",
        image_uri="file:/D:/Slides/gone/cmu_small_region.svs",
    )
    if kind == "garbage-qpproj":
        C.garbage(project, "project.qpproj", head=b'{"version": "0.5.1", "images": [')
    elif kind == "no-qpproj":
        (project / "project.qpproj").unlink()
    before = snapshot(work)
    res = run(["qupath", "enhance", str(project), "--class", "Tumor", "--engine", "classical", "-p", "sr x2"])
    assert "Traceback" not in res.output
    if kind == "slide-moved-away":  # a batch: the item fails, the run says how to fix it, exit 1
        assert res.exit_code == 1 and "--remap" in res.output, res.output
    else:
        one_error_line(res, 2, ())
    assert_untouched_and_nothing_finished(work, before, failed=True)


def test_scratch_left_by_a_killed_run_is_removed_by_the_next(tmp_path: Path) -> None:
    import socket

    out = tmp_path / "out"
    stale = out / ".lpfm-scratch-abc123"  # what `kill -9` during a job's write leaves, marked with its writer
    stale.mkdir(parents=True)
    (stale / "img.tiles").write_bytes(b"\0" * 1000)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that has ended
    (stale / "lpfm-owner").write_text(f"{socket.gethostname()}:{gone.pid}")
    res = run(enhance(C.SAMPLE, "--region", REGION, "--out", str(out)))
    assert res.exit_code == 0 and "removed .lpfm-scratch-abc123" in res.output, res.output
    assert not stale.exists() and len(list(out.glob("*.ome.tiff"))) == 1

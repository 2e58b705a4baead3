"""file: URIs, remapping and relative resolution of moved images."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lpfm_toolkit.errors import ConfigError, ProjectError
from lpfm_toolkit.integrations.qupath.uris import (
    Remap,
    path_from_uri,
    relative_candidate,
    resolve_image,
    uri_from_path,
)


@pytest.mark.parametrize(("uri", "expected"), [
    ("file:/home/phm/Images/a.tif", PurePosixPath("/home/phm/Images/a.tif")),
    ("file:///home/phm/Images/a.tif", PurePosixPath("/home/phm/Images/a.tif")),
    ("file:/Users/x/Downloads/MTA3-8_GPC3%20(2).svs", PurePosixPath("/Users/x/Downloads/MTA3-8_GPC3 (2).svs")),
    ("file:/E:/KONTROLHE_2025/%C5%9EUBAT19.02.25_HE_0/k.svs", PureWindowsPath("E:/KONTROLHE_2025/ŞUBAT19.02.25_HE_0/k.svs")),
    ("file:/D:/QuPath%20COAD%20Project%20(Annotated)/project.qpproj",
     PureWindowsPath("D:/QuPath COAD Project (Annotated)/project.qpproj")),
    ("file:/I:/x.svs", PureWindowsPath("I:/x.svs")),
    ("file://fileserver/share/slides/a%20b.svs", PureWindowsPath("//fileserver/share/slides/a b.svs")),
])
def test_path_from_uri(uri: str, expected) -> None:
    got = path_from_uri(uri)
    assert got == expected and type(got) is type(expected)


def test_path_from_uri_refuses_other_schemes() -> None:
    with pytest.raises(ProjectError, match="not a file: URI"):
        path_from_uri("https://example.org/slide.svs")


@pytest.mark.parametrize(("path", "uri"), [
    (PurePosixPath("/data/Étude QuPath/a [lpfm sr×2].ome.tiff"),
     "file:/data/%C3%89tude%20QuPath/a%20%5Blpfm%20sr%C3%972%5D.ome.tiff"),
    (PureWindowsPath("C:\\Slides\\case (1).svs"), "file:/C:/Slides/case%20(1).svs"),
    (PureWindowsPath("\\\\server\\share\\a.svs"), "file://server/share/a.svs"),
])
def test_uri_from_path_encodes_like_java(path, uri: str) -> None:
    assert uri_from_path(path) == uri
    assert path_from_uri(uri) == path


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\x00"),
                        min_size=1, max_size=12).filter(lambda s: s not in (".", "..")), min_size=1, max_size=5))
def test_posix_round_trip(parts: list[str]) -> None:
    path = PurePosixPath("/", *parts)
    assert path_from_uri(uri_from_path(path)) == path


def test_uri_from_relative_path_is_refused() -> None:
    with pytest.raises(ProjectError):
        uri_from_path(PurePosixPath("relative/a.svs"))


def test_remap_parse_and_apply(tmp_path: Path) -> None:
    rule = Remap.parse("D:\\Slides=/mnt/slides")
    assert rule.apply(PureWindowsPath("d:/slides/sub/a.svs")) == Path("/mnt/slides/sub/a.svs")
    assert rule.apply(PureWindowsPath("E:/Slides/a.svs")) is None
    assert Remap.parse("file:/old/root=/new").apply(PurePosixPath("/old/root/x y.svs")) == Path("/new/x y.svs")
    assert Remap.parse("/old=/new").apply(PurePosixPath("/older/a.svs")) is None  # prefix of a folder name only
    for bad in ("no-equals", "=/new", "/old="):
        with pytest.raises(ConfigError):
            Remap.parse(bad)


def test_relative_candidate_follows_the_project() -> None:
    old_project = PurePosixPath("/home/a/proj/project.qpproj")
    assert relative_candidate(PurePosixPath("/home/a/images/x.svs"), old_project, Path("/new/p")) == \
        Path("/new/p/../images/x.svs")
    assert relative_candidate(PureWindowsPath("D:/p/img/x.svs"), PureWindowsPath("d:/P/project.qpproj"),
                              Path("/mnt/p")) == Path("/mnt/p/img/x.svs")
    # different drives (the 0.6.0-rc3 fixture: project on D:, images on E:) cannot be related
    assert relative_candidate(PureWindowsPath("E:/x.svs"), PureWindowsPath("D:/p/project.qpproj"), Path("/p")) is None


def test_resolve_image_order(tmp_path: Path) -> None:
    project = tmp_path / "moved" / "proj"
    (project.parent / "images").mkdir(parents=True)
    project.mkdir()
    image = project.parent / "images" / "Ş a.svs"
    image.write_bytes(b"x")
    old_project_uri = "file:/D:/work/proj/project.qpproj"
    uri = "file:/D:/work/images/%C5%9E%20a.svs"
    res = resolve_image(uri, project, old_project_uri)
    assert res.how == "relative" and res.path is not None and res.path.resolve() == image.resolve()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "Ş a.svs").write_bytes(b"y")
    res = resolve_image(uri, project, old_project_uri, [Remap.parse(f"D:/work/images={other}")])
    assert res.how == "remap" and res.path == other / "Ş a.svs"
    missing = resolve_image("file:/nowhere/a.svs", project, None)
    assert missing.path is None and missing.how == "missing" and "/nowhere/a.svs" in missing.tried

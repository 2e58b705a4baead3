"""``lpfm qc`` on OMERO images and datasets against the autospec'd fake server (real omero-py, Python 3.10)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

pytestmark = [pytest.mark.omero, pytest.mark.qc]

try:
    import omero
    import omero.grid
    import omero.model
    from omero.rtypes import unwrap
except ImportError:  # pragma: no cover - the Python 3.11 main suite
    omero = None


@pytest.fixture(scope="module")
def degraded(sample_pyramid: list[np.ndarray]) -> Any:
    """A 1024² slide of the sample's held-out bottom 20 % with pasted blur, noise and JPEG (per-tile truth)."""
    from lpfm_toolkit.engine.estimate_synthetic import synthetic_slide, tissue_mosaic

    base = sample_pyramid[0]
    holdout = base[int(base.shape[0] * 0.8) :]
    return synthetic_slide(
        tissue_mosaic(holdout, 1024, 1024, seed=5), seed=5, block=1, p_blur=0.4, p_noise=0.4, p_jpeg=0.3
    )


@pytest.fixture
def tables(server: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """OMERO.tables on the fake: autospecs of ``SharedResourcesPrx``/``TablePrx``; dataset annotation links saved."""
    from lpfm_toolkit.integrations.omero import session as session_mod

    made: list[dict[str, Any]] = []
    server.dataset_ann_links = []
    inner = session_mod._make_gateway

    def make(settings: Any) -> Any:
        conn = inner(settings)
        gw = server.gateways[-1]
        res = server.specs.get(omero.grid.SharedResourcesPrx)

        def repositories(_ctx: Any = None) -> Any:
            rm = omero.grid.RepositoryMap()
            rm.descriptions, rm.proxies = [omero.model.OriginalFileI(1, True)], []
            return rm

        def new_table(repo: int, path: str, _ctx: Any = None) -> Any:
            t = server.specs.get(omero.grid.TablePrx)
            rec: dict[str, Any] = {
                "repo": repo,
                "path": path,
                "file": omero.model.OriginalFileI(server.next_id(), True),
            }
            t.initialize.side_effect = lambda cols, _ctx=None: rec.__setitem__("columns", cols)
            t.addData.side_effect = lambda cols, _ctx=None: rec.__setitem__("data", cols)
            t.getOriginalFile.side_effect = lambda _ctx=None: rec["file"]
            t.close.side_effect = lambda _ctx=None: rec.__setitem__("closed", True)
            made.append(rec)
            return t

        res.repositories.side_effect = repositories
        res.newTable.side_effect = new_table
        conn.c.sf.sharedResources.side_effect = lambda _ctx=None: res
        update = gw.service("update")
        plain = update.saveAndReturnObject.side_effect

        def save(obj: Any, ctx: Any = None) -> Any:
            if isinstance(obj, omero.model.DatasetAnnotationLinkI):
                assert int(unwrap(obj.getParent().getId())) in server.datasets
                server.dataset_ann_links.append(obj)
                return obj
            return plain(obj, ctx)

        update.saveAndReturnObject.side_effect = save
        return conn

    monkeypatch.setattr(session_mod, "_make_gateway", make)
    return made


def _images(server: Any, degraded: Any, make_pyramid: Any) -> tuple[int, int, int]:
    ds = server.add_dataset("scans of the night")
    bad = server.add_image("degraded.svs", make_pyramid(degraded.image, 3), dataset=ds, rgb_colours=True)
    good = server.add_image("clean.svs", make_pyramid(degraded.clean, 3), dataset=ds, rgb_colours=True)
    return ds, bad, good


def test_qc_dataset_writes_rois_maps_and_a_table(
    server: Any, settings: Any, tables: list[dict[str, Any]], degraded: Any, make_pyramid: Any, tmp_path: Any
) -> None:
    from lpfm_toolkit.engine.estimate import ClassicalEstimator
    from lpfm_toolkit.integrations.omero.qc import KEY, qc_omero
    from lpfm_toolkit.integrations.omero.session import OmeroSession
    from lpfm_toolkit.qc import QC_NAMESPACE

    ds, bad, good = _images(server, degraded, make_pyramid)
    pixels = {i: server.images[i].levels[0].tobytes() for i in (bad, good)}
    with OmeroSession(settings) as session:
        run = qc_omero(session, dataset_id=ds, estimator=ClassicalEstimator(), output_dir=tmp_path)
    by_id = {o.image_id: o for o in run.outcomes}
    assert [o.status for o in run.outcomes] == ["done", "done"], [o.error for o in run.outcomes]
    assert by_id[bad].rois > 0 and by_id[good].rois == 0
    for i in (bad, good):
        assert server.images[i].levels[0].tobytes() == pixels[i]  # pixels never touched
    rois = server.images[bad].rois
    assert len(rois) == by_id[bad].rois
    classes = set()
    for roi in rois:
        (shape,) = roi.copyShapes()
        assert isinstance(shape, omero.model.PolygonI)
        classes.add(unwrap(shape.getTextValue()))
        assert unwrap(roi.getDescription()).startswith("lpfm qc qc-")
        xs = [float(p.split(",")[0]) for p in unwrap(shape.getPoints()).split()]
        assert min(xs) >= 0 and max(xs) <= 1024
    assert classes <= {"lpfm: out of focus", "lpfm: noisy", "lpfm: compressed"} and classes
    pairs = server.map_of(bad)
    assert pairs[KEY] == by_id[bad].qc.key()
    assert float(pairs["lpfm.qc.flagged_fraction"]) > float(server.map_of(good)["lpfm.qc.flagged_fraction"])
    ann = [a for a in server.annotations_of(bad) if isinstance(a, omero.model.MapAnnotationI)][0]
    assert unwrap(ann.getNs()) == QC_NAMESPACE
    # the dataset's QC table: one row per image, worst first, as an OMERO.table linked to the dataset
    (table,) = tables
    assert table["closed"] and run.table_file_id == int(unwrap(table["file"].getId()))
    cols = {c.name: c.values for c in table["data"]}
    assert cols["Image"] == [bad, good] and cols["Rank"] == [1, 2]
    assert cols["Flagged fraction"][0] > cols["Flagged fraction"][1]
    assert isinstance(table["columns"][0], omero.grid.ImageColumn)
    (link,) = server.dataset_ann_links
    assert int(unwrap(link.getParent().getId())) == ds
    assert unwrap(link.getChild().getNs()) == "openmicroscopy.org/omero/bulk_annotations"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json")  # local reports too

    with OmeroSession(settings) as session:  # the same QC again: found by its key, nothing added
        again = qc_omero(session, image_ids=[bad], estimator=ClassicalEstimator(), output_dir=tmp_path)
    assert again.outcomes[0].status == "skipped" and len(server.images[bad].rois) == len(rois)


def test_qc_failure_of_one_image_does_not_stop_the_others(
    server: Any, settings: Any, degraded: Any, make_pyramid: Any, tmp_path: Any
) -> None:
    from lpfm_toolkit.engine.estimate import ClassicalEstimator
    from lpfm_toolkit.integrations.omero.qc import qc_omero
    from lpfm_toolkit.integrations.omero.session import OmeroSession

    _, bad, good = _images(server, degraded, make_pyramid)
    server.read_only_groups.add(3)  # writing is refused: the image fails, reports are still written
    with OmeroSession(settings) as session:
        run = qc_omero(session, image_ids=[999, good], estimator=ClassicalEstimator(), output_dir=tmp_path)
    assert run.outcomes[0].status == "failed" and "999" in run.outcomes[0].error
    assert run.outcomes[1].status == "failed" and "refused" in run.outcomes[1].error
    assert run.outcomes[1].files["json"].is_file()
    with OmeroSession(settings) as session:
        dry = qc_omero(session, image_ids=[good], estimator=ClassicalEstimator(), output_dir=tmp_path, write=False)
    assert dry.outcomes[0].status == "done" and not server.images[good].rois


def test_cli_qc_omero_ranks_images(
    server: Any,
    tables: list[dict[str, Any]],
    degraded: Any,
    make_pyramid: Any,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lpfm_toolkit.cli.main import cli

    ds, bad, good = _images(server, degraded, make_pyramid)
    monkeypatch.setenv("OMERO_PASSWORD", "s3cret")
    res = CliRunner().invoke(
        cli,
        [
            "qc",
            "--omero-dataset",
            str(ds),
            "--host",
            "omero.example.org",
            "-u",
            "alice",
            "--estimator",
            "classical",
            "--out",
            str(tmp_path),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    ranked = json.loads(res.output[res.output.index("[") :])
    assert [r["id"] for r in ranked] == [str(bad), str(good)]
    assert f"QC table on dataset {ds}" in res.output

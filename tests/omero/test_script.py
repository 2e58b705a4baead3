"""The LPFM_Enhance OMERO.script: its parameters as OMERO parses them, and a run on the fake server."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib import resources

import pytest

pytest.importorskip("omero", reason="omero-py is not installed: the OMERO suite runs on Python 3.10 (.ci/omero-suite.sh)")

SCRIPT = resources.files("lpfm_toolkit.integrations.omero") / "scripts" / "LPFM_Enhance.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("LPFM_Enhance", str(SCRIPT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_omero_parses_the_script_parameters() -> None:
    # what the server does on upload: run the script in parse-only mode and read its JobParams. In a child
    # process, because parse_file leaves an Ice communicator behind that complains when Python exits.
    code = (
        "import json, sys, omero.scripts; from omero.rtypes import unwrap; "
        "p = omero.scripts.parse_file(sys.argv[1]); "
        "print(json.dumps({'name': p.name, 'inputs': {k: {'optional': v.optional, 'values': unwrap(v.values), "
        "'prototype': unwrap(v.prototype), 'min': unwrap(v.min)} for k, v in p.inputs.items()}}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(SCRIPT)], capture_output=True, text=True, check=True)
    params = json.loads(out.stdout.strip().splitlines()[-1])
    inputs = params["inputs"]
    assert params["name"] == "LPFM_Enhance.py"
    assert set(inputs) == {"Data_Type", "IDs", "Prompt", "Model", "ROI_Class", "Output_Mode", "Seed",
                           "Time_Limit_Minutes"}
    assert inputs["Data_Type"]["values"] == ["Image", "Dataset"]
    assert inputs["Output_Mode"]["values"] == ["new", "channels"]
    assert inputs["Prompt"]["prototype"] == "sr x2" and inputs["Prompt"]["optional"] is False
    assert inputs["IDs"]["optional"] is False and inputs["Seed"]["min"] == 0


def test_script_run_creates_images_and_reports_them(server, settings, script, make_pyramid, make_rect) -> None:
    import numpy as np

    base = np.random.default_rng(5).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    ds = server.add_dataset("d")
    iid = server.add_image("a.svs", make_pyramid(base, 2), dataset=ds, rgb_colours=True)
    server.add_roi(iid, make_rect(10, 10, 64, 64, "Tumor"))
    server.add_roi(iid, make_rect(100, 100, 64, 64, "Tumor"))
    conn = server.make_gateway(settings)
    conn.connect()
    params = {"Data_Type": "Dataset", "IDs": [ds], "Prompt": "sr x2", "Model": "classical", "ROI_Class": "Tumor",
              "Output_Mode": "new", "Seed": 0, "Time_Limit_Minutes": 5}
    message, new_ids, outcomes = script.run(conn, params)
    assert message == "lpfm: 2 done" and len(new_ids) == 2
    assert all(server.map_of(i)["lpfm.state"] == "complete" for i in new_ids)
    assert server.gateways[0].closed is None  # the script's own session is left to the script client
    message, new_ids, _ = script.run(conn, params)
    assert message == "lpfm: 2 skipped" and new_ids == []


def test_script_says_what_did_not_fit_in_the_time_limit(server, settings, script, make_pyramid, make_rect) -> None:
    import numpy as np

    iid = server.add_image("a.svs", [np.zeros((200, 200, 3), np.uint8)], rgb_colours=True)
    server.add_roi(iid, make_rect(0, 0, 32, 32, "Tumor"))
    conn = server.make_gateway(settings)
    conn.connect()
    message, new_ids, outcomes = script.run(conn, {"Data_Type": "Image", "IDs": [iid], "Prompt": "sr x2",
                                                   "Model": "classical", "ROI_Class": "Tumor",
                                                   "Time_Limit_Minutes": 0})
    assert new_ids == [] and [o.status for o in outcomes] == ["not run"]
    assert "Not run (time limit): 1; run the script again" in message


def test_model_parameter_chooses_the_engine(script, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LPFM_CONFIG", str(tmp_path / "none.toml"))
    assert script.engine_options(None).engine == "auto"
    assert script.engine_options("classical").engine == "classical"
    opts = script.engine_options("/models/he-v1")
    assert (opts.engine, opts.model) == ("lpfm", "/models/he-v1")

#!/usr/bin/env python
# SPDX-License-Identifier: GPL-3.0-or-later
"""LPFM_Enhance: enhance OMERO images (or their ROIs of a class) by prompt, from OMERO.web.

Upload this file as an official script (see docs/omero.md). It needs lpfm-toolkit installed in the Python
environment of the OMERO processor. Results are new images next to the originals, with the provenance
as key-value pairs (namespace lpfm-toolkit/provenance) and a JSON file annotation; re-running the same
request creates nothing new. Work that does not fit in the time limit is listed as "not run": run the
script again (finished results are skipped), or use the `lpfm omero enhance` command for large jobs.
"""

from __future__ import annotations

import logging
import time

import omero.scripts as scripts
from omero.gateway import BlitzGateway
from omero.model import ImageI
from omero.rtypes import rlong, robject, rstring

NAME = "LPFM_Enhance.py"
DESCRIPTION = (
    "Enhance images by prompt with lpfm-toolkit (super-resolution x2/x4/x8, deblur, denoise, virtual staining). "
    "Results are new images in the same dataset, with provenance; originals are never modified."
)
ENGINES = ("auto", "classical", "lpfm")


def parameters() -> list:
    """The script's inputs and outputs, as OMERO.web shows them."""
    return [
        scripts.String("Data_Type", optional=False, grouping="1", description="Choose images or datasets",
                       values=[rstring("Image"), rstring("Dataset")], default="Image"),
        scripts.List("IDs", optional=False, grouping="2", description="Image or dataset IDs").ofType(rlong(0)),
        scripts.String("Prompt", optional=False, grouping="3", default="sr x2",
                       description='What to do, e.g. "sr x2", "super-resolve x4", "denoise", "deblur", "AF -> H&E"; '
                                   '"auto": only the regions lpfm qc flags, each with its task'),
        scripts.String("Model", optional=True, grouping="4", default="auto",
                       description="auto, classical (no weights), or the name or folder of a model bundle"),
        scripts.String("ROI_Class", optional=True, grouping="5",
                       description="Only ROIs of this class (shape text or ROI name); one new image per ROI. "
                                   "Several classes: separate with commas"),
        scripts.String("Output_Mode", optional=False, grouping="6", default="new",
                       values=[rstring("new"), rstring("channels")],
                       description="new: the enhanced image; channels: original + enhanced channels in one image"),
        scripts.Long("Seed", optional=True, grouping="7", default=0, min=0, description="Random seed"),
        scripts.Long("Time_Limit_Minutes", optional=True, grouping="8", default=50, min=1,
                     description="Stop starting new work after this long (stay under the server's script limit)"),
    ]  # outputs (Message, New_Image) are set at the end; declaring them here would make them inputs too


def engine_options(model: str | None) -> object:
    """Model parameter → the :class:`~lpfm_toolkit.options.EngineOptions` of the run (settings of the server's
    lpfm installation, then this choice): an engine name, or a bundle name or folder for the lpfm engine."""
    from lpfm_toolkit.options import EngineOptions

    model = (model or "auto").strip()
    choice = {"engine": model} if model in ENGINES else {"engine": "lpfm", "model": model}
    return EngineOptions.from_settings(**choice)


def run(conn: BlitzGateway, params: dict) -> tuple[str, list[int], list]:
    """Run the request in ``params`` (unwrapped script inputs) on ``conn``; returns (message, new ids, outcomes)."""
    from lpfm_toolkit.batch import Status, summary
    from lpfm_toolkit.integrations.omero.session import OmeroSession
    from lpfm_toolkit.integrations.omero.workflow import enhance_omero, new_image_ids

    ids = [int(i) for i in params.get("IDs") or []]
    image_ids = ids if params.get("Data_Type", "Image") == "Image" else []
    dataset_ids = ids if params.get("Data_Type") == "Dataset" else []
    classes = [c.strip() for c in (params.get("ROI_Class") or "").split(",") if c.strip()]
    options = engine_options(params.get("Model"))
    minutes = params.get("Time_Limit_Minutes")
    budget = float(50 if minutes is None else minutes) * 60
    started = time.monotonic()
    session = OmeroSession(conn=conn)  # the script's own session: used, never closed here
    outcomes: list = []
    auto = str(params["Prompt"]).strip().lower() == "auto"  # lpfm enhance --auto: QC picks regions and tasks
    with session:
        targets = [(None, image_ids)] if image_ids else [(d, []) for d in dataset_ids]
        for dataset_id, images in targets:
            left = budget - (time.monotonic() - started)
            common = dict(image_ids=images, dataset_id=dataset_id, roi_classes=classes,
                          output=str(params.get("Output_Mode") or "new"), seed=int(params.get("Seed") or 0),
                          time_budget_s=max(0.0, left))
            if auto:
                from lpfm_toolkit.integrations.omero.qc import auto_enhance_omero

                outcomes += auto_enhance_omero(session, options, **common)
            else:
                outcomes += enhance_omero(session, prompt=str(params["Prompt"]), options=options, **common)
    message = "lpfm: " + summary(outcomes)
    not_run = [o for o in outcomes if o.status is Status.NOT_RUN]
    if not_run:
        message += f". Not run (time limit): {len(not_run)}; run the script again to continue"
    failed = [f"{o.item}: {o.error}" for o in outcomes if o.status is Status.FAILED]
    if failed:
        message += ". Failed: " + "; ".join(failed[:3]) + (" …" if len(failed) > 3 else "")
    return message, new_image_ids(outcomes), outcomes


def main() -> None:
    client = scripts.client(NAME, DESCRIPTION, *parameters(), version="1", authors=["lpfm-toolkit developers"],
                            institutions=["lpfm-toolkit"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = client.getInputs(unwrap=True)
        conn = BlitzGateway(client_obj=client)
        message, new_ids, outcomes = run(conn, params)
        from lpfm_toolkit.batch import summary_rows

        for item, status, result, seconds, note in summary_rows(outcomes):  # the job's stdout, for the admin
            print(f"{status.value:13} {item}  {result}  {seconds}  {note}")
        client.setOutput("Message", rstring(message))
        if new_ids:
            client.setOutput("New_Image", robject(ImageI(new_ids[0], False)))
    except Exception as exc:  # the message shows in OMERO.web; the traceback goes to the job's stderr
        client.setOutput("Message", rstring(f"lpfm failed: {exc}"))
        raise
    finally:
        client.closeSession()


if __name__ == "__main__":
    main()

"""``lpfm omero``: inspect OMERO images and enhance images, datasets or ROIs into new OMERO images."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import click

from lpfm_toolkit.cli.batch import batch_progress, report_batch
from lpfm_toolkit.cli.common import console, fail, handle_errors, levels_table
from lpfm_toolkit.cli.options import engine_flags, options_from_flags


def _settings(ctx: click.Context) -> Any:
    """OMERO settings from the group's flags, ``OMERO_*`` variables and the toolkit's settings file."""
    from lpfm_toolkit.config import load_settings
    from lpfm_toolkit.integrations.omero.session import OmeroSettings, omero_modules

    omero_modules()  # a clear "install lpfm-toolkit[omero]" before anything else
    settings = OmeroSettings.resolve(settings=load_settings(), **ctx.obj.get("omero_flags", {}))
    if settings.host and settings.user and not settings.password and not settings.session_key \
            and sys.stdin.isatty():
        # only the command line may ask; library code never prompts
        password = click.prompt(f"OMERO password for {settings.user}", hide_input=True)
        settings = dataclasses.replace(settings, password=password)
    return settings


@click.group()
@click.option("--host", default=None, help="OMERO server (or OMERO_HOST, or omero_host in the settings file).")
@click.option("--port", type=int, default=None, help="Port (default 4064).")
@click.option("--user", "-u", default=None, help="User name (or OMERO_USER). The password comes from "
              "OMERO_PASSWORD or a prompt, never a flag.")
@click.option("--session-key", default=None, metavar="-",
              help="Refused with a value (it would show in `ps`); `--session-key -` reads the key from standard "
              "input. Or set OMERO_SESSION_KEY / LPFM_OMERO_SESSION_KEY, or use --session-key-file.")
@click.option("--session-key-file", type=click.File("r"), default=None,
              help="Read the session key (from `omero sessions key`) from this file, or - for standard input.")
@click.option("--group", "-g", default=None, help="Group name or id to work in.")
@click.option("--secure/--insecure", default=None, help="Encrypt the connection (default: secure).")
@click.pass_context
def omero(ctx: click.Context, host: str | None, port: int | None, user: str | None, session_key: str | None,
          session_key_file: Any, group: str | None, secure: bool | None) -> None:
    """Run lpfm over OMERO images and ROIs; results become new images next to the originals.

    Join an existing session (OMERO.web, `omero login`) with OMERO_SESSION_KEY in the environment, or
    --session-key-file; a key given as a flag value would be visible to every user in `ps`.
    """
    ctx.ensure_object(dict)  # shared with the subcommands' contexts
    ctx.obj["omero_flags"] = {"host": host, "port": port, "user": user,
                               "session_key": session_key_from(session_key, session_key_file),
                               "group": group, "secure": secure}


def session_key_from(flag: str | None, key_file: Any) -> str | None:
    """The session key from ``--session-key -`` (stdin) or ``--session-key-file``; a flag value is refused.

    None: take it from the environment (``OMERO_SESSION_KEY``, ``LPFM_OMERO_SESSION_KEY``).
    """
    if flag is not None and flag != "-":
        fail("--session-key with a value puts the key in the process list, where every user can read it (ps)",
             "set OMERO_SESSION_KEY (or LPFM_OMERO_SESSION_KEY) instead, or pass --session-key-file FILE "
             "(- for standard input)")
    if flag == "-" and key_file is not None:
        fail("--session-key - and --session-key-file exclude each other", "give one of them")
    if flag == "-":
        text = sys.stdin.readline()
    elif key_file is not None:
        text = key_file.readline()
    else:
        return None
    key = text.strip()
    if not key:
        fail("the session key read was empty", "write the key from `omero sessions key` into the file or stdin")
    return key


@omero.command("info")
@click.argument("image_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def info(ctx: click.Context, image_id: int, as_json: bool) -> None:
    """Show size, pyramid levels, pixel size, channels and ROI classes of OMERO image IMAGE_ID."""
    from lpfm_toolkit.integrations.omero.session import OmeroSession
    from lpfm_toolkit.integrations.omero.source import OmeroImageHandle

    with OmeroSession(_settings(ctx)) as session, OmeroImageHandle(session, image_id) as handle:
        desc = handle.describe()
        classes: dict[str, int] = {}
        for ann in handle.annotations():
            key = ann.class_name or "(no class)"
            classes[key] = classes.get(key, 0) + 1
    desc["roi_classes"] = classes
    if as_json:
        console.print_json(json.dumps(desc))
        return
    table = levels_table(desc, f"{desc['name']}  (OMERO image {image_id}, {desc['pixel_type']})")
    console.print(table)
    size = desc["size"]
    console.print(f"channels: {', '.join(desc['channels'])}   Z={size['z']} T={size['t']}   "
                  f"datasets: {', '.join(map(str, desc['datasets'])) or 'none'}")
    rois = ", ".join(f"{k} ({v})" for k, v in sorted(classes.items())) or "none"
    console.print(f"ROI shapes by class: {rois}")


@omero.command("enhance")
@click.option("--image", "image_ids", type=int, multiple=True, help="OMERO image id (repeatable).")
@click.option("--dataset", "dataset_id", type=int, default=None, help="Every image of this dataset.")
@click.option("--roi-class", "roi_classes", multiple=True,
              help="Only the ROIs of this class (shape text, else ROI name); one new image per ROI (repeatable).")
@click.option("--prompt", "-p", default=None, help='What to do, e.g. "sr x2", "denoise", "AF -> H&E" (or --auto).')
@click.option("--auto", is_flag=True, help="Enhance only what lpfm qc flags, each region with its task (docs/qc.md).")
@click.option("--output", type=click.Choice(["new", "channels"]), default="new", show_default=True,
              help="new: the enhanced image; channels: original + enhanced (+ uncertainty) as one image.")
@click.option("--target-dataset", default=None,
              help="Dataset id or name for the results (default: the original's dataset; a name is created).")
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level to read.")
@engine_flags
@click.pass_context
@handle_errors
def enhance(ctx: click.Context, image_ids: tuple[int, ...], dataset_id: int | None, roi_classes: tuple[str, ...],
            prompt: str | None, output: str, target_dataset: str | None, level: int, force: bool, auto: bool = False,
            **flags: Any) -> None:
    """Enhance OMERO images (--image … or --dataset), or only their ROIs of a class, into new images."""
    from lpfm_toolkit.cli.qc import check_auto_prompt, report_auto_outcomes
    from lpfm_toolkit.errors import RegionError
    from lpfm_toolkit.integrations.omero.session import OmeroSession
    from lpfm_toolkit.integrations.omero.workflow import enhance_omero
    from lpfm_toolkit.prompts import parse_prompt

    if not image_ids and dataset_id is None:
        raise RegionError("nothing selected", "give --image ID (repeatable) or --dataset ID")
    check_auto_prompt(prompt, auto)
    if auto:  # QC picks the regions and their tasks (lpfm_toolkit.integrations.omero.qc.auto_enhance_omero)
        from lpfm_toolkit.integrations.omero.qc import auto_enhance_omero
        from lpfm_toolkit.qc import check_auto_options

        options, settings = options_from_flags(flags)
        check_auto_options(options)
        with OmeroSession(_settings(ctx)) as session, batch_progress("lpfm omero enhance · auto") as progress:
            outcomes = auto_enhance_omero(session, options, image_ids=image_ids, dataset_id=dataset_id,
                                          roi_classes=roi_classes, output=output, target_dataset=target_dataset,
                                          level=level, seed=settings.seed, tile_size=settings.tile_size,
                                          overlap=settings.overlap, force=force, progress=progress)
        report_auto_outcomes(outcomes)
        report_batch(outcomes, "lpfm omero enhance · auto")
        return
    assert prompt is not None
    task = parse_prompt(prompt)
    options, settings = options_from_flags(flags)
    omero_settings = _settings(ctx)
    with OmeroSession(omero_settings) as session, batch_progress(f"lpfm omero enhance · {task.label}") as progress:
        outcomes = enhance_omero(session, prompt=prompt, image_ids=image_ids, dataset_id=dataset_id,
                                 roi_classes=roi_classes, output=output, target_dataset=target_dataset,
                                 options=options, level=level, seed=settings.seed, tile_size=settings.tile_size,
                                 overlap=settings.overlap, force=force, progress=progress)
    report_batch(outcomes, f"lpfm omero enhance · {prompt}")


@omero.command("reproduce")
@click.argument("image")
@click.option("--model", default=None, help="The bundle folder the result was made with, if it has moved.")
@click.option("--trust-pickle", is_flag=True)
@click.pass_context
@handle_errors
def reproduce(ctx: click.Context, image: str, model: str | None, trust_pickle: bool) -> None:
    """Re-run result IMAGE (an id, or omero://HOST/image/ID) from its provenance and compare its pixels (exit 1
    if they differ): the source image is read again, nothing is written to the server."""
    from lpfm_toolkit.cli.common import progress_bar
    from lpfm_toolkit.cli.local import print_reproduce_report
    from lpfm_toolkit.integrations.omero.reproduce import parse_image_ref, reproduce_uri
    from lpfm_toolkit.integrations.omero.session import OmeroSession

    host, port, _ = parse_image_ref(image)
    flags = ctx.obj.setdefault("omero_flags", {})
    if host is not None and flags.get("host") is None:  # the server the URI names, unless --host says otherwise
        flags.update(host=host, port=flags.get("port") or port)
    with OmeroSession(_settings(ctx)) as session, session.keepalive(), progress_bar(f"reproducing {image}") as update:
        rep = reproduce_uri(image, session=session, model=model, trust_pickle=trust_pickle, progress=update)
    print_reproduce_report(rep)

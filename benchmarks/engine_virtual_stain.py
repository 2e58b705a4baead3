"""Learned virtual staining vs Beer–Lambert false colouring, on fluorescence simulated from held-out H&E.

The H&E of a cross-source image (training_data/eval, never trained on) is turned into two-channel
fluorescence by :func:`lpfm_toolkit.engine.fluorescence.simulate_fluorescence` (fixed seed); the bundle's
stainer and the classical Beer–Lambert engine each map it back to H&E, scored against the real H&E.
Both engines normalise the channels on the whole set (their ``prepare``), as ``lpfm enhance`` does on a
region. Usage::

    python benchmarks/engine_virtual_stain.py --model PATH [--tiles 12]

Writes ``benchmarks/results/engine_virtual_stain.json`` and a picture ``docs/img/virtual_stain.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lpfm_toolkit.engine import evaluate as E
from lpfm_toolkit.engine.classical import ClassicalEngine
from lpfm_toolkit.engine.fluorescence import simulate_fluorescence
from lpfm_toolkit.engine.lpfm import LpfmEngine
from lpfm_toolkit.engine.train import read_rgb
from lpfm_toolkit.prompts import parse_prompt

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "training_data/eval/openslide-OS-1-HE-hamamatsu.ome.tif"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tiles", type=int, default=12)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--picture", default=str(ROOT / "docs/img/virtual_stain.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    he = E.holdout_tiles(read_rgb(SOURCE), args.tile, args.tiles, holdout=1.0)
    g = torch.Generator().manual_seed(11)
    fluo = simulate_fluorescence(torch.from_numpy(he).permute(0, 3, 1, 2), g).permute(0, 2, 3, 1).numpy()
    task = parse_prompt("AF -> H&E")
    mosaic = np.concatenate(list(fluo), axis=1)
    results = {}
    outs = {}
    for label, engine in (
        ("Beer–Lambert (classical)", ClassicalEngine()),
        ("lpfm stainer", LpfmEngine.from_options(model=args.model, steps=0)),
    ):
        engine.check(task, ["nuclear", "cytoplasm"])
        engine.prepare(task, mosaic)
        out = np.stack([engine.process(f[None], task, [i]).pixels[0] for i, f in enumerate(fluo)])
        outs[label] = out
        results[label] = {
            "ssim": float(np.mean([E.ssim(o, t) for o, t in zip(out, he)])),
            "psnr": float(np.mean([E.psnr(o, t) for o, t in zip(out, he)])),
        }
    record = {"source": SOURCE.name, "tiles": len(he), "tile": args.tile, "results": results}
    out_path = ROOT / "benchmarks/results/engine_virtual_stain.json"
    out_path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    _picture(fluo[:3], outs, he[:3], Path(args.picture))


def _picture(fluo: np.ndarray, outs: dict[str, np.ndarray], he: np.ndarray, path: Path) -> None:
    from PIL import Image, ImageDraw

    n, t = len(fluo), fluo.shape[1]
    cols = ["fluorescence (false colour)", *outs, "real H&E"]
    canvas = Image.new("RGB", (len(cols) * (t + 6), 20 + n * (t + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(cols):
        draw.text((c * (t + 6) + 2, 4), name.replace("–", "-")[:40], fill="black")
    for r in range(n):
        f = fluo[r]
        false = np.stack([f[..., 0], f[..., 1], f[..., 0]], axis=-1)
        imgs = [false, *(o[r] for o in outs.values()), he[r]]
        for c, px in enumerate(imgs):
            canvas.paste(
                Image.fromarray((np.clip(px, 0, 1) * 255 + 0.5).astype(np.uint8)), (c * (t + 6), 20 + r * (t + 6))
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":
    main()

"""``lpfm enhance --auto`` on glass inside a noisy area: quarters with too little tissue to judge, before and
after they were flagged through their noisy neighbours (docs/qc.md, "Glass inside a noisy area").

The slide is the one of docs/qc.md's --auto picture (1024² of held-out tissue, blur σ 3 in the bottom-right
quarter) with noise σ 15 instead of 30 in the top-left quarter: at σ 30 the noise itself makes glass read as
25–40 % "tissue", so it is judged; at σ 10–20 it reads as 0–3 % and is not. Writes
``results/qc_auto_glass.png`` (input · --auto without the rule · --auto · clean: 256² of the noisy quarter where
glass meets tissue, ×2) and
``results/qc_auto_glass.json``.

    python benchmarks/qc_auto_glass.py [--engine auto|classical] [--noise 15]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="auto", help="the engine --auto enhances with (default: as lpfm enhance)")
    p.add_argument("--estimator", default="auto")
    p.add_argument("--noise", type=float, default=15.0)
    args = p.parse_args(argv)

    import tifffile
    from PIL import Image, ImageDraw

    from lpfm_toolkit.engine import get_engine
    from lpfm_toolkit.engine.estimate import tissue_mask
    from lpfm_toolkit.engine.estimate_synthetic import degrade_region, sample_tissue, tissue_mosaic
    from lpfm_toolkit.qc import auto_enhance, get_estimator
    from lpfm_toolkit.sinks.memory import ArraySink
    from lpfm_toolkit.sources import open_image

    clean = tissue_mosaic(sample_tissue("holdout"), 1024, 1024, seed=4, min_tissue=0.6)
    img = clean.copy()
    rng = np.random.default_rng(0)
    for box, blur, noise in (((0, 0, 512, 512), 0.0, args.noise), ((512, 512, 512, 512), 3.0, 0.0)):
        img[box[1] : box[1] + box[3], box[0] : box[0] + box[2]] = degrade_region(clean, box, blur, noise, 0, rng)
    est = get_estimator(args.estimator)
    quarter = (slice(0, 512), slice(0, 512))
    glass = ~tissue_mask(clean[quarter].astype(np.float32) / 255.0)  # glass of the clean quarter
    glass[:16] = glass[-16:] = False  # away from the quarter's borders
    glass[:, :16] = glass[:, -16:] = False
    outs, reports = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "glass.tiff"
        tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
        for rule in (False, True):
            with open_image(path) as h:
                res = auto_enhance(
                    h,
                    ArraySink(),
                    lambda task: get_engine(args.engine, task=task),
                    estimator=est,
                    glass_from_neighbours=rule,
                )
            outs[rule] = res.result.output.extra["pixels"]
            reports[rule] = res.report

    def noise_in_glass(a: np.ndarray) -> float:
        return round(float(np.std(a[quarter][glass].astype(np.float64) - clean[quarter][glass])), 2)

    def psnr(a: np.ndarray) -> float:
        mse = float(np.mean((a[quarter].astype(np.float64) - clean[quarter]) ** 2))
        return round(10 * np.log10(255.0**2 / mse), 2)

    record = {
        "noise_sigma": args.noise,
        "engine": args.engine,
        "estimator": est.describe().get("name"),
        "glass_pixels_in_noisy_quarter": int(glass.sum()),
        "error_sigma_in_glass": {
            "input": noise_in_glass(img),
            "auto_without_rule": noise_in_glass(outs[False]),
            "auto": noise_in_glass(outs[True]),
        },
        "psnr_noisy_quarter": {"input": psnr(img), "auto_without_rule": psnr(outs[False]), "auto": psnr(outs[True])},
        "flagged_tiles": {"without_rule": reports[False]["flagged_tiles"], "auto": reports[True]["flagged_tiles"]},
        "background_quarters": reports[True]["slide"]["background_quarters"],
        "report": reports[True],
    }
    crop = (slice(200, 456), slice(128, 384))  # glass meeting tissue, shown ×2 so the noise is visible
    gap = np.full((512, 8, 3), 255, np.uint8)

    def big(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a[crop], 2, axis=0), 2, axis=1)

    panel = np.concatenate([big(img), gap, big(outs[False]), gap, big(outs[True]), gap, big(clean)], 1)
    pic = Image.fromarray(panel)
    d = ImageDraw.Draw(pic)
    labels = (
        f"input: noise sigma {args.noise:g}",
        "--auto, glass not judged (before)",
        "--auto, glass from noisy neighbours",
        "clean",
    )
    for i, text in enumerate(labels):
        d.rectangle((i * 520, 0, i * 520 + 6 * len(text) + 6, 14), fill=(255, 255, 255))
        d.text((i * 520 + 3, 2), text, fill=(0, 0, 0))
    RESULTS.mkdir(exist_ok=True)
    pic.save(RESULTS / "qc_auto_glass.png")
    (RESULTS / "qc_auto_glass.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in record.items() if k != "report"}, indent=1))


if __name__ == "__main__":
    main()

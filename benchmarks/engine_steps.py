"""Quality vs network evaluations: PSNR of the refined output for 1, 2, 4, 10, 20 refiner evaluations.

On held-out tiles of the sample slide (bottom band), per degradation, DDIM and DPM-Solver, one sample and
the mean of ``--samples``; ``0`` evaluations is the restorer alone. Usage::

    python benchmarks/engine_steps.py [--model lpfm-tiny] [--tiles 8] [--tile 128] [--samples 4]

Writes ``benchmarks/results/engine_steps.json``; numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tiles", type=int, default=6)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--samples", type=int, default=1, help="also score the mean of this many samples")
    parser.add_argument("--steps", default="1,2,4,10,20")
    parser.add_argument("--samplers", default="ddim,dpm")
    parser.add_argument("--degradations", default="sr-x4,denoise-s31")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_steps.json")
    args = parser.parse_args()

    from lpfm_toolkit.engine.bundle import load_bundle
    from lpfm_toolkit.engine.degrade import evaluation_protocol
    from lpfm_toolkit.engine.evaluate import degrade_tiles, holdout_tiles, psnr
    from lpfm_toolkit.engine.lpfm import LpfmEngine
    from lpfm_toolkit.engine.taskcodes import task_from_name
    from lpfm_toolkit.engine.train import SAMPLE_SLIDE, read_rgb

    bundle = load_bundle(args.model)
    clean = holdout_tiles(read_rgb(SAMPLE_SLIDE), args.tile, args.tiles)
    protocol = evaluation_protocol()
    steps_list = [int(s) for s in args.steps.split(",")]
    rows = []
    for p_index, proto in enumerate(args.degradations.split(",")):
        task_name, degradation = protocol[proto]
        task = task_from_name(task_name)
        degraded = degrade_tiles(clean, degradation, p_index)
        configs = [("restorer", 0, 1)] + [(s, n, k) for s in args.samplers.split(",") for n in steps_list
                                          for k in sorted({1, args.samples})]
        for sampler, steps, samples in configs:
            engine = LpfmEngine(bundle, device="cpu", steps=steps, samples=samples,
                                sampler=None if sampler == "restorer" else sampler, threads=args.threads)
            t0 = time.perf_counter()
            out = np.concatenate([engine.process(degraded[i : i + 1], task, [1000 + i]).pixels
                                  for i in range(len(degraded))])
            seconds = (time.perf_counter() - t0) / len(degraded)
            row = {"degradation": proto, "sampler": sampler, "evaluations": steps, "samples": samples,
                   "psnr": float(np.mean([psnr(o, c) for o, c in zip(out, clean)])), "seconds_per_tile": seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": bundle.name, "model_sha256": bundle.sha256, "tiles": len(clean),
                                    "tile": args.tile, "rows": rows}, indent=2))
    print("\n| degradation | sampler | evaluations | samples | PSNR (dB) | s/tile |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['degradation']} | {r['sampler']} | {r['evaluations']} | {r['samples']} | {r['psnr']:.2f} | "
              f"{r['seconds_per_tile']:.2f} |")


if __name__ == "__main__":
    main()

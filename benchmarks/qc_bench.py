"""QC benchmarks: train the learned estimator, score both estimators on synthetic slides, time QC vs enhancement.

::

    python benchmarks/qc_bench.py train      # learned estimator → lpfm_toolkit/bundles/lpfm-tiny/estimator/
    python benchmarks/qc_bench.py evaluate   # ROC AUC, Spearman, false positives → benchmarks/results/qc_eval.json
    python benchmarks/qc_bench.py speed      # QC vs enhancement per gigapixel, peak memory → results/qc_speed.json

Training uses the sample slide's top 80 %; every evaluation slide is built from its bottom 20 % (held out).
Run at ``nice -n 10`` with one thread on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from lpfm_toolkit.engine.estimate_learned import ESTIMATOR_DIR, train, training_set
    from lpfm_toolkit.engine.estimate_synthetic import sample_tissue

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = training_set(
        sample_tissue("train"),
        args.samples,
        crop=args.crop,
        seed=args.seed,
        progress=lambda i, n: i % 500 == 0 and print(f"data {i}/{n}", flush=True),
    )
    t_data = time.perf_counter() - t0
    print(f"training set: {args.samples} crops in {t_data:.0f} s", flush=True)
    t1 = time.perf_counter()
    est = train(
        data,
        steps=args.steps,
        seed=args.seed,
        progress=lambda s, n, loss: print(f"step {s}/{n} loss {loss:.4f}", flush=True),
    )
    t_train = time.perf_counter() - t1
    out = Path(args.out) if args.out else ESTIMATOR_DIR
    est.save(
        out,
        {
            "training": {
                "data": "cmu_small_region.svs top 80 %",
                "degradations": "blind_degrade(task='any')",
                "samples": args.samples,
                "crop": args.crop,
                "steps": args.steps,
                "seed": args.seed,
                "threads": args.threads,
                "data_seconds": round(t_data),
                "train_seconds": round(t_train),
            }
        },
    )
    print(f"saved to {out} ({t_train:.0f} s training)")


def synthetic_set(n_slides: int, size: int, seed: int = 100) -> list[Any]:
    from lpfm_toolkit.engine.estimate_synthetic import sample_tissue, synthetic_slide, tissue_mosaic

    src = sample_tissue("holdout")
    return [synthetic_slide(tissue_mosaic(src, size, size, seed=seed + k), seed=seed + k) for k in range(n_slides)]


def tiles_of(slide: Any) -> list[np.ndarray]:
    return [slide.image[t.y : t.y + t.size, t.x : t.x + t.size].astype(np.float32) / 255 for t in slide.truth]


def cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from lpfm_toolkit.engine.estimate import ClassicalEstimator
    from lpfm_toolkit.engine.estimate_learned import LearnedEstimator
    from lpfm_toolkit.engine.estimate_synthetic import score_estimates

    torch.set_num_threads(args.threads)
    slides = synthetic_set(args.slides, args.size)
    truth = [t for s in slides for t in s.truth]
    result: dict[str, Any] = {
        "slides": args.slides,
        "size": args.size,
        "tile": 256,
        "source": "cmu_small_region.svs bottom 20 % (held out from training)",
    }
    estimators: list[Any] = [ClassicalEstimator()]
    try:
        estimators.append(LearnedEstimator.load(args.estimator) if args.estimator else LearnedEstimator.load())
    except Exception as exc:  # noqa: BLE001 - report and score the classical one alone
        print(f"no learned estimator: {exc}", file=sys.stderr)
    for est in estimators:
        t0 = time.perf_counter()
        ests = [e for s in slides for e in est.estimate(tiles_of(s))]
        result[est.name] = {**score_estimates(truth, ests), "seconds_per_tile": (time.perf_counter() - t0) / len(ests)}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "qc_eval.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--samples", type=int, default=3000)
    t.add_argument("--crop", type=int, default=128)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", default=None)
    e = sub.add_parser("evaluate")
    e.add_argument("--slides", type=int, default=6)
    e.add_argument("--size", type=int, default=2048)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--estimator", default=None, help="estimator folder (default: the shipped one)")
    args = p.parse_args(argv)
    {"train": cmd_train, "evaluate": cmd_evaluate}[args.cmd](args)


if __name__ == "__main__":
    main()

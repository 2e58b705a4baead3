"""Cross-source evaluation: bundles vs classical baselines on slides from sources the training never saw.

Sources are the images of ``training_data/eval/`` (see training_data/SOURCES.md): H&E from another scanner
and tissue, and real Ki67 IHC from two scanners. Every source gets the same held-out-style tiles (the whole
image is held out), degraded by LPFM's protocol plus scikit-image's anti-aliased down-sampling (a kernel the
blind training never used exactly). Baselines include those tuned on the truth (true σ, true kernel, BM3D).

Baselines do not depend on a model, so they are computed once (``--part baselines``) and reused; learned
candidates are scored on the same degraded tiles (``--part learned``). Usage::

    python benchmarks/engine_cross_source.py --part baselines
    python benchmarks/engine_cross_source.py --part learned --model new=PATH --model old=PATH [--ablate new] [--tta new]
    python benchmarks/engine_cross_source.py --part report

Writes ``benchmarks/results/engine_cross_source_{baselines,learned}.json`` and ``engine_cross_source.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from lpfm_toolkit.engine import evaluate as E
from lpfm_toolkit.engine.train import read_rgb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = {
    "H&E OS-1 (Hamamatsu)": ROOT / "training_data/eval/openslide-OS-1-HE-hamamatsu.ome.tif",
    "IHC Ki67 OS-2 (Hamamatsu)": ROOT / "training_data/eval/openslide-OS-2-Ki67-hamamatsu.ome.tif",
    "IHC Ki67 OS-2 (Olympus)": ROOT / "training_data/eval/openslide-OS-2-Ki67-olympus.ome.tif",
}
PROTOCOLS = ["sr-x2", "sr-x4", "sr-x2-skimage", "sr-x4-skimage", "denoise-s21", "denoise-s31", "denoise-s41", "deblur"]


def source_tiles(path: Path, tiles: int, tile: int) -> np.ndarray:
    return E.holdout_tiles(read_rgb(path), tile, tiles, holdout=1.0)


def run(args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.shard}" if args.shard else ""
    out_path = RESULTS / f"engine_cross_source_{args.part}{suffix}.json"
    data = json.loads(out_path.read_text()) if out_path.exists() and args.part == "learned" else {}
    candidates_spec = [m.split("=", 1) for m in args.model]
    for source, path in SOURCES.items():
        if args.source and source not in args.source:
            continue
        clean = source_tiles(path, args.tiles, args.tile)
        t0 = time.time()
        if args.part == "baselines":
            report = E.evaluate(clean, [], protocols=PROTOCOLS, seed=args.seed, bm3d_estimated=args.bm3d_estimated)
        else:
            from lpfm_toolkit.engine.lpfm import LpfmEngine

            cands = []
            for label, model in candidates_spec:
                eng = LpfmEngine.from_options(model=model, steps=0)
                cands.append(E.Candidate(f"lpfm:{label}", eng, learned=True))
                if label in args.ablate and eng.restorer.config.extra_cond_dim:
                    abl = LpfmEngine.from_options(model=model, steps=0)
                    abl.condition_on_encoder = False
                    cands.append(E.Candidate(f"lpfm:{label} without encoder features", abl, learned=True))
                if label in args.tta:
                    cands.append(
                        E.Candidate(
                            f"lpfm:{label} +tta", LpfmEngine.from_options(model=model, steps=0, tta=True), learned=True
                        )
                    )
            report = E.evaluate(clean, cands, protocols=PROTOCOLS, seed=args.seed, baselines=False)
        rows = [r for r in report.rows]
        data.setdefault(source, {"tiles": int(len(clean)), "tile": args.tile, "rows": []})
        done = {(r["protocol"], r["method"]) for r in rows}
        data[source]["rows"] = [r for r in data[source]["rows"] if (r["protocol"], r["method"]) not in done] + rows
        out_path.write_text(json.dumps(data, indent=1))
        print(f"{source}: {len(clean)} tiles, {time.time() - t0:.0f} s", flush=True)
    write_report()


def merge() -> None:
    """Join shard files (``engine_cross_source_<part>_<shard>.json``) into the part files."""
    for part in ("baselines", "learned"):
        path = RESULTS / f"engine_cross_source_{part}.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        for shard in sorted(RESULTS.glob(f"engine_cross_source_{part}_*.json")):
            for source, entry in json.loads(shard.read_text()).items():
                have = data.setdefault(source, {**entry, "rows": []})
                keys = {(r["protocol"], r["method"]) for r in entry["rows"]}
                have["rows"] = [r for r in have["rows"] if (r["protocol"], r["method"]) not in keys] + entry["rows"]
        if data:
            path.write_text(json.dumps(data, indent=1))


def write_report() -> Path:
    """Markdown: per source and degradation, the best baseline and each learned candidate (gain in dB)."""
    base = json.loads((RESULTS / "engine_cross_source_baselines.json").read_text())
    learned_path = RESULTS / "engine_cross_source_learned.json"
    learned = json.loads(learned_path.read_text()) if learned_path.exists() else {}
    lines = ["# Cross-source evaluation (sources never used in training)", ""]
    for source, b in base.items():
        rows = b["rows"] + learned.get(source, {}).get("rows", [])
        labels = list(dict.fromkeys(r["method"] for r in rows if r["learned"]))
        lines += [
            f"## {source} ({b['tiles']} tiles of {b['tile']} px)",
            "",
            "| degradation | best baseline | PSNR | " + " | ".join(labels) + " |",
            "|---|---|---|" + "---|" * len(labels),
        ]
        for proto in PROTOCOLS:
            cl = [r for r in rows if r["protocol"] == proto and not r["learned"]]
            if not cl:
                continue
            best = max(cl, key=lambda r: r["psnr"])
            cells = []
            for lab in labels:
                m = [r for r in rows if r["protocol"] == proto and r["method"] == lab]
                cells.append(f"{m[0]['psnr']:.2f} ({m[0]['psnr'] - best['psnr']:+.2f})" if m else "–")
            lines.append(f"| {proto} | {best['method']} | {best['psnr']:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    path = RESULTS / "engine_cross_source.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["baselines", "learned", "report", "merge"], required=True)
    ap.add_argument("--model", action="append", default=[], help="LABEL=BUNDLE (repeatable)")
    ap.add_argument("--ablate", action="append", default=[], help="also score LABEL with encoder features zeroed")
    ap.add_argument("--tta", action="append", default=[], help="also score LABEL with --tta")
    ap.add_argument("--tiles", type=int, default=10)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", action="append", default=[], help="only these sources (repeatable)")
    ap.add_argument("--shard", default="", help="write to a separate results file (parallel runs; --part merge joins)")
    ap.add_argument(
        "--bm3d-estimated",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also BM3D with σ estimated (slow: seconds per tile)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.part == "merge":
        merge()
    if args.part in ("report", "merge"):
        print(write_report().read_text())
    else:
        run(args)


if __name__ == "__main__":
    main()

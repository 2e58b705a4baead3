"""GPU throughput of the LPFM engine: tiles/s by batch size, precision and torch.compile, on CUDA.

Ready to run on a CUDA machine (it exits with a message elsewhere)::

    python benchmarks/engine_gpu.py [--model lpfm-tiny] [--tile 256] [--batches 1,4,16,64] [--compile]

For each batch size it times the restorer (``--steps 0``) and the refined path (``--steps 4 --samples 4``)
through :class:`LpfmEngine` (autocast bf16/fp16, channels_last, pinned memory, non-blocking copies), plus
float32 vs autocast matmul GFLOP/s as the ceiling. Writes ``benchmarks/results/engine_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 1

    from lpfm_toolkit.engine.bundle import load_bundle
    from lpfm_toolkit.engine.lpfm import LpfmEngine
    from lpfm_toolkit.prompts import Task, TaskKind

    n = 8192
    a, b = torch.rand(n, n, device="cuda"), torch.rand(n, n, device="cuda")
    results: dict = {"device": torch.cuda.get_device_name(), "tile": args.tile, "torch": torch.__version__,
                     "matmul_fp32_tflops": 2 * n**3 / timed(lambda: a @ b) / 1e12}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        results["matmul_bf16_tflops"] = 2 * n**3 / timed(lambda: a @ b) / 1e12
    bundle = load_bundle(args.model)
    task = Task(TaskKind.DENOISE)
    rows = []
    for steps, samples in [(0, 1), (4, 4)]:
        for bs in map(int, args.batches.split(",")):
            engine = LpfmEngine(bundle, device="cuda", steps=steps, samples=samples, compile=args.compile)
            engine.batch_size = bs
            tiles = np.random.default_rng(0).random((bs, args.tile, args.tile, 3), dtype=np.float32)
            seeds = list(range(bs))
            seconds = timed(lambda e=engine, t=tiles, s=seeds: e.process(t, task, s), repeat=3)
            row = {"steps": steps, "samples": samples, "batch": bs, "tiles_per_s": bs / seconds,
                   "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "dtype": engine.describe()["dtype"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    results["rows"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

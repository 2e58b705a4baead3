"""Engine efficiency: achieved GFLOP/s of the network forwards vs this machine's float32 matmul GFLOP/s.

FLOPs are counted with ``torch.utils.flop_counter`` (convolutions and matmuls; element-wise work is not
counted, so the ratio is a lower bound on the real work rate). On a shared machine the achievable rate
moves from second to second, so the matmul ceiling and the networks are timed in alternation (round robin,
best of ``--repeat`` each): a ratio compares runs made under the same load. Usage::

    python benchmarks/engine_throughput.py [--model lpfm-tiny] [--threads N] [--tile 256] [--repeat 7]

Writes ``benchmarks/results/engine_throughput.json``; numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).resolve().parent / "results"


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up (oneDNN primitive creation, allocator)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_times_interleaved(fns: dict, repeat: int) -> dict[str, float]:
    """Best time of each function, timed round robin so that all of them see the same load."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_throughput.json")
    args = parser.parse_args()

    from lpfm_toolkit.engine.bundle import load_bundle
    from lpfm_toolkit.engine.device import configure_cpu_threads
    from lpfm_toolkit.engine.lpfm import LpfmEngine
    from lpfm_toolkit.prompts import Task, TaskKind

    threads = configure_cpu_threads(args.threads)
    bundle = load_bundle(args.model)
    t = args.tile
    restorer, refiner, encoder = (bundle.components[k] for k in ("restorer", "refiner", "encoder"))
    x = torch.rand(1, 3, t, t)
    task = torch.tensor([4])
    feats = torch.zeros(1, encoder.config.feature_dim)
    step_t = torch.tensor([500])
    results: dict = {"threads": threads, "tile": t, "model": bundle.name, "model_sha256": bundle.sha256,
                     "loadavg_1min": os.getloadavg()[0], "torch": torch.__version__}
    n = 1024
    a, b = torch.rand(n, n), torch.rand(n, n)
    with torch.inference_mode():
        nets = {
            "restorer": lambda: restorer(x, task),
            "refiner (one evaluation)": lambda: refiner(x, step_t, x, task, feats),
            "encoder": lambda: encoder(x),
        }
        flops = {name: count_flops(fn) for name, fn in nets.items()}
        best = best_times_interleaved({"matmul": lambda: a @ b, **nets}, args.repeat)
    results["matmul_gflops"] = 2 * n**3 / best["matmul"] / 1e9
    for name in nets:
        gflops = flops[name] / best[name] / 1e9
        results[name] = {"gflop_per_tile": flops[name] / 1e9, "seconds_per_tile": best[name], "gflops": gflops,
                         "ratio_to_matmul": gflops / results["matmul_gflops"]}
    tiles = np.random.default_rng(0).random((2, t, t, 3), dtype=np.float32)
    for label, steps, samples, tk in [("denoise steps=0", 0, 1, Task(TaskKind.DENOISE)),
                                      ("sr x2 steps=0", 0, 1, Task(TaskKind.SUPER_RESOLUTION, scale=2)),
                                      ("denoise steps=4 samples=1", 4, 1, Task(TaskKind.DENOISE)),
                                      ("denoise steps=4 samples=4", 4, 4, Task(TaskKind.DENOISE))]:
        engine = LpfmEngine(bundle, device="cpu", steps=steps, samples=samples, threads=threads)
        seconds = best_time(lambda e=engine, tk=tk: e.process(tiles, tk, [1, 2]), max(1, args.repeat // 2))
        results[f"engine {label}"] = {"tiles_per_s": len(tiles) / seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"\nmatmul ceiling: {results['matmul_gflops']:.1f} GFLOP/s on {threads} thread(s)")
    for name in nets:
        r = results[name]
        print(f"{name}: {r['gflop_per_tile']:.2f} GFLOP/tile, {r['seconds_per_tile'] * 1e3:.0f} ms, "
              f"{r['gflops']:.1f} GFLOP/s = {100 * r['ratio_to_matmul']:.0f} % of matmul")


if __name__ == "__main__":
    main()

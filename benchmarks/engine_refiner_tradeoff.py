"""The refiner's fidelity/realism trade-off on the cross-source set, and the encoder's invariance.

Fidelity: PSNR and SSIM against the truth. Realism, with no downloaded weights: the ratio of the output's
high-frequency power (radial frequencies 0.25–0.5 cycles/px of the grey image) to the truth's (1 = as much
fine detail as the truth; below 1 = too smooth) and the Wasserstein-1 distance between the gradient-magnitude
histograms of output and truth (0 = same edge statistics). Scored for ``--steps 0`` (restorer only) and
refinement with 1, 2, 4 and 8 DDIM steps (single samples). Encoder invariance: cosine similarity of a tile's
features with those of the same tile re-stained / degraded, against other tiles' (and top-1 retrieval).
Usage::

    python benchmarks/engine_refiner_tradeoff.py --model PATH

Writes ``benchmarks/results/engine_refiner_tradeoff.json`` and ``docs/img/refiner_tradeoff.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lpfm_toolkit.engine import evaluate as E
from lpfm_toolkit.engine.degrade import evaluation_protocol
from lpfm_toolkit.engine.lpfm import LpfmEngine
from lpfm_toolkit.engine.taskcodes import task_from_name
from lpfm_toolkit.engine.train import read_rgb

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "H&E OS-1": ROOT / "training_data/eval/openslide-OS-1-HE-hamamatsu.ome.tif",
    "IHC OS-2": ROOT / "training_data/eval/openslide-OS-2-Ki67-hamamatsu.ome.tif",
}
PROTOCOLS = ["sr-x4", "denoise-s31", "deblur"]
STEPS = [0, 1, 2, 4, 8]


def hf_ratio(out: np.ndarray, truth: np.ndarray, lo: float = 0.25) -> float:
    """High-frequency power of ``out`` over that of ``truth`` (grey, radial frequency ≥ ``lo`` cycles/px)."""

    def power(x: np.ndarray) -> float:
        g = x.mean(axis=-1)
        f = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2
        fy = np.fft.fftshift(np.fft.fftfreq(g.shape[0]))[:, None]
        fx = np.fft.fftshift(np.fft.fftfreq(g.shape[1]))[None, :]
        return float(f[np.hypot(fy, fx) >= lo].sum())

    return power(out) / max(power(truth), 1e-12)


def grad_hist_w1(out: np.ndarray, truth: np.ndarray, bins: int = 64, top: float = 0.5) -> float:
    """Wasserstein-1 distance between the gradient-magnitude histograms of ``out`` and ``truth``."""

    def cdf(x: np.ndarray) -> np.ndarray:
        gy, gx = np.gradient(x.mean(axis=-1))
        h, _ = np.histogram(np.clip(np.hypot(gx, gy), 0, top), bins=bins, range=(0, top))
        return np.cumsum(h / h.sum())

    return float(np.abs(cdf(out) - cdf(truth)).sum() * top / bins)


def tradeoff(model: str, tiles: int, tile: int) -> list[dict]:
    rows = []
    protocol = evaluation_protocol()
    engines = {s: LpfmEngine.from_options(model=model, steps=s, samples=1) for s in STEPS}
    for source, path in SOURCES.items():
        clean = E.holdout_tiles(read_rgb(path), tile, tiles, holdout=1.0)
        for p_index, proto in enumerate(PROTOCOLS):
            task_name, degradation = protocol[proto]
            task = task_from_name(task_name)
            degraded = E.degrade_tiles(clean, degradation, 1000 + p_index)
            for s, eng in engines.items():
                outs = np.stack([eng.process(d[None], task, [i]).pixels[0] for i, d in enumerate(degraded)])
                rows.append(
                    {
                        "source": source,
                        "protocol": proto,
                        "steps": s,
                        "psnr": float(np.mean([E.psnr(o, c) for o, c in zip(outs, clean)])),
                        "ssim": float(np.mean([E.ssim(o, c) for o, c in zip(outs, clean)])),
                        "hf_ratio": float(np.mean([hf_ratio(o, c) for o, c in zip(outs, clean)])),
                        "grad_w1": float(np.mean([grad_hist_w1(o, c) for o, c in zip(outs, clean)])),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def encoder_invariance(model: str, tiles: int, tile: int) -> dict:
    """Cosine similarity of features: same tile under re-staining/degradation vs different tiles."""
    from lpfm_toolkit.engine.bundle import load_bundle
    from lpfm_toolkit.engine.models.encoder import hed_jitter, macenko_restain
    from lpfm_toolkit.engine.train import degraded_pairs

    enc = load_bundle(model).components["encoder"].eval()
    clean = np.concatenate([E.holdout_tiles(read_rgb(p), tile, tiles, holdout=1.0) for p in SOURCES.values()])
    x = torch.from_numpy(clean).permute(0, 3, 1, 2)
    g = torch.Generator().manual_seed(5)
    views = {
        "HED jitter": hed_jitter(x, g),
        "Macenko re-stain + jitter": hed_jitter(macenko_restain(x, g), g),
        "blind degradation": degraded_pairs(x, ["restore"] * len(x), g, blind=True),
        "SR x4 input (cubic up)": degraded_pairs(x, ["sr4"] * len(x), g, blind=True),
    }
    with torch.no_grad():
        f0 = torch.nn.functional.normalize(enc(x), dim=1)
        out = {}
        for name, v in views.items():
            f1 = torch.nn.functional.normalize(enc(v), dim=1)
            sim = f1 @ f0.T
            same = float(sim.diagonal().mean())
            other = float((sim.sum() - sim.diagonal().sum()) / (sim.numel() - len(sim)))
            top1 = float((sim.argmax(dim=1) == torch.arange(len(sim))).float().mean())
            out[name] = {"same_tile": same, "other_tiles": other, "top1_retrieval": top1}
    return {"tiles": len(x), "views": out}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(4.2 * len(PROTOCOLS), 3.6))
    for ax, proto in zip(axes, PROTOCOLS):
        for source, marker in zip(SOURCES, "os"):
            pts = [r for r in rows if r["protocol"] == proto and r["source"] == source]
            ax.plot([r["hf_ratio"] for r in pts], [r["psnr"] for r in pts], marker=marker, label=source)
            for r in pts:
                ax.annotate(
                    str(r["steps"]), (r["hf_ratio"], r["psnr"]), fontsize=8, xytext=(3, 3), textcoords="offset points"
                )
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{proto} (numbers: refiner steps)")
        ax.set_xlabel("high-frequency power / truth's (1 = as sharp as the truth)")
        ax.set_ylabel("PSNR (dB)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tiles", type=int, default=6)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--encoder-only", action="store_true", help="only the encoder invariance (any bundle)")
    ap.add_argument("--label", default="model", help="names the --encoder-only results file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    record = {"encoder_invariance": encoder_invariance(args.model, args.tiles, args.tile)}
    print(json.dumps(record, indent=1), flush=True)
    if args.encoder_only:
        (ROOT / f"benchmarks/results/engine_encoder_invariance_{args.label}.json").write_text(
            json.dumps(record, indent=1)
        )
        return
    record["tradeoff"] = tradeoff(args.model, args.tiles, args.tile)
    (ROOT / "benchmarks/results/engine_refiner_tradeoff.json").write_text(json.dumps(record, indent=1))
    plot(record["tradeoff"], ROOT / "docs/img/refiner_tradeoff.png")


if __name__ == "__main__":
    main()

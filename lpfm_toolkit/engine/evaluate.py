"""Score engines on held-out tiles under LPFM's degradation protocol: PSNR, SSIM, MAE, uncertainty honesty.

Clean tiles are cut from an image region (by default the held-out bottom band of the bundled slide),
degraded with :func:`lpfm_toolkit.engine.degrade.evaluation_protocol`, and restored by every classical
baseline of the task and by each LPFM configuration given. Results: a table (Markdown), a JSON record,
and an HTML report with before/after crops and uncertainty maps.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpfm_toolkit.engine.base import Engine, EngineOutput
from lpfm_toolkit.engine.classical import METHODS, ClassicalEngine
from lpfm_toolkit.engine.taskcodes import task_from_name
from lpfm_toolkit.errors import ConfigError

log = logging.getLogger(__name__)

#: progress(done, total) over (protocol entry × engine) runs
EvalProgress = Callable[[int, int], None]


@dataclass
class Candidate:
    """One engine configuration to score; ``label`` names it in tables."""

    label: str
    engine: Engine
    learned: bool = False


@dataclass
class EvalReport:
    """Per-task, per-candidate mean metrics, plus per-tile values and uncertainty correlations."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    per_tile: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    spearman: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def best(self, protocol: str, learned: bool) -> dict[str, Any] | None:
        rows = [r for r in self.rows if r["protocol"] == protocol and r["learned"] == learned]
        return max(rows, key=lambda r: r["psnr"]) if rows else None

    def to_markdown(self) -> str:
        lines = ["| degradation | method | PSNR (dB) | SSIM | MAE (/255) | s/tile |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(
                f"| {r['protocol']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                f"{r['mae'] * 255:.2f} | {r['seconds_per_tile']:.2f} |"
            )
        lines += [
            "",
            "| degradation | best classical | PSNR | best LPFM | PSNR | gain (dB) |",
            "|---|---|---|---|---|---|",
        ]
        for proto in dict.fromkeys(r["protocol"] for r in self.rows):
            c, m = self.best(proto, False), self.best(proto, True)
            if c and m:
                lines.append(
                    f"| {proto} | {c['method']} | {c['psnr']:.2f} | {m['method']} | {m['psnr']:.2f} | "
                    f"{m['psnr'] - c['psnr']:+.2f} |"
                )
        if self.spearman:
            lines += [
                "",
                "Spearman correlation of per-tile mean uncertainty with per-tile MSE (held-out tiles; ρ, p):",
                "",
            ]
            for label, per in self.spearman.items():
                lines.append(
                    f"- {label}: " + ", ".join(f"{k} ρ={v['rho']:+.2f} (p={v['p']:.2g})" for k, v in per.items())
                )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "spearman": self.spearman, "meta": self.meta, "per_tile": self.per_tile}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 10 * math.log10(1 / max(mse, 1e-12))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0))


def holdout_tiles(image: np.ndarray, tile: int, limit: int, holdout: float = 0.2) -> np.ndarray:
    """Non-overlapping tissue tiles (N, tile, tile, 3) from the bottom ``holdout`` band of ``image``."""
    from lpfm_toolkit.engine.train import is_tissue

    band = image[int(round(image.shape[0] * (1 - holdout))) :] if holdout > 0 else image
    tiles = [
        band[y : y + tile, x : x + tile]
        for y in range(0, band.shape[0] - tile + 1, tile)
        for x in range(0, band.shape[1] - tile + 1, tile)
    ]
    tiles = [t for t in tiles if is_tissue(t)]
    if not tiles:
        raise ConfigError(
            f"no tissue tile of {tile}×{tile} px in the held-out region", "use a smaller --tile or a region with tissue"
        )
    return np.stack(tiles[:limit]).astype(np.float32)


def degrade_tiles(clean: np.ndarray, degradation: Any, seed: int) -> np.ndarray:
    """Degrade (N, H, W, 3) tiles, tile ``i`` with a generator seeded by ``(seed, i)``, then quantise to 8 bits:
    what a degraded slide stores (and what keeps a deconvolution given the true kernel honest)."""
    import torch

    out = []
    for i, t in enumerate(clean):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        x = torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1)[None]
        out.append(degradation.apply(x, g)[0].permute(1, 2, 0).numpy())
    return (np.round(np.clip(np.stack(out), 0, 1) * 255) / 255).astype(np.float32)


class TunedClassicalEngine(Engine):
    """A classical baseline given the truth: the true noise σ, the true blur kernel, or spline up-sampling.

    ``method``: spline (cubic spline up-sampling), nlm, tv, wavelet, bm3d (true σ), bm3d-est (σ estimated
    with ``skimage.restoration.estimate_sigma``), wiener or richardson_lucy (the true kernel). ``strength``
    scales the denoiser's σ-derived parameter, the Wiener balance or the RL iteration count.
    """

    name = "classical-tuned"
    batch_size = 1

    def __init__(
        self, method: str, *, sigma: float = 0.0, kernel: np.ndarray | None = None, strength: float = 1.0
    ) -> None:
        self.method, self.sigma, self.kernel, self.strength = method, sigma, kernel, strength

    def needs_overview(self, task: Any) -> bool:
        return False

    def process(self, tiles: np.ndarray, task: Any, seeds: Sequence[int]) -> EngineOutput:
        return EngineOutput(np.stack([self._one(t, task) for t in tiles]).astype(np.float32))

    def _one(self, tile: np.ndarray, task: Any) -> np.ndarray:
        from skimage import restoration

        m, sigma = self.method, self.sigma
        if m == "spline":
            from skimage.transform import rescale

            return np.clip(rescale(tile, task.scale, order=3, channel_axis=-1, mode="reflect"), 0, 1)
        if m in ("bm3d", "bm3d-est"):
            import bm3d

            if m == "bm3d-est":
                sigma = float(restoration.estimate_sigma(tile, channel_axis=-1, average_sigmas=True))
            return np.clip(bm3d.bm3d_rgb(tile.astype(np.float64), max(sigma, 1e-3) * self.strength), 0, 1)
        if m == "nlm":
            return np.clip(
                restoration.denoise_nl_means(
                    tile,
                    h=0.8 * sigma * self.strength,
                    sigma=sigma,
                    fast_mode=True,
                    patch_size=5,
                    patch_distance=6,
                    channel_axis=-1,
                ),
                0,
                1,
            )
        if m == "tv":
            return np.clip(
                restoration.denoise_tv_chambolle(tile, weight=max(sigma, 1e-3) * self.strength, channel_axis=-1), 0, 1
            )
        if m == "wavelet":
            return np.clip(
                restoration.denoise_wavelet(
                    tile,
                    sigma=sigma * self.strength,
                    channel_axis=-1,
                    mode="soft",
                    method="BayesShrink",
                    convert2ycbcr=True,
                    rescale_sigma=True,
                ),
                0,
                1,
            )
        if m in ("wiener", "richardson_lucy"):
            assert self.kernel is not None
            pad = self.kernel.shape[0]
            out = []
            for c in range(tile.shape[-1]):
                ch = np.pad(tile[..., c].astype(np.float64), pad, mode="reflect")
                if m == "wiener":
                    res = restoration.wiener(ch, self.kernel, 0.01 * self.strength, clip=False)
                else:
                    res = restoration.richardson_lucy(
                        np.clip(ch, 1e-4, 1), self.kernel, num_iter=max(1, int(round(20 * self.strength))), clip=False
                    )
                out.append(res[pad:-pad, pad:-pad])
            return np.clip(np.stack(out, axis=-1), 0, 1)
        raise ValueError(f"unknown tuned classical method {m!r}")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "sigma": self.sigma, "strength": self.strength}


def _bm3d_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bm3d") is not None


def tuned_candidates(task_name: str, degradation: Any, bm3d_estimated: bool = True) -> list[Candidate]:
    """Baselines tuned on the truth for one protocol entry: spline for SR; NLM, TV, wavelet and BM3D with the
    true σ (several strengths) and BM3D with σ estimated; Wiener and Richardson–Lucy with the true kernel."""
    out: list[Candidate] = []
    if task_name.startswith("sr"):
        out.append(Candidate("tuned:spline", TunedClassicalEngine("spline")))
    elif task_name == "denoise":
        sigma = float(getattr(degradation, "noise_sigma", 0.0)) / 255
        for m, strengths in (("nlm", (0.8, 1.0, 1.25)), ("tv", (0.8, 1.2, 1.8)), ("wavelet", (1.0,))):
            out += [
                Candidate(f"tuned:{m} true σ ×{k}", TunedClassicalEngine(m, sigma=sigma, strength=k)) for k in strengths
            ]
        if _bm3d_available():
            out.append(Candidate("tuned:bm3d true σ", TunedClassicalEngine("bm3d", sigma=sigma)))
            if bm3d_estimated:
                out.append(Candidate("classical:bm3d σ estimated", TunedClassicalEngine("bm3d-est")))
        else:
            log.warning("bm3d is not installed: the BM3D baselines are skipped (pip install bm3d)")
    elif task_name == "deblur" and getattr(degradation, "kernel_size", 0):
        from lpfm_toolkit.engine.degrade import gaussian_kernel

        d = degradation
        k = gaussian_kernel(d.kernel_size, d.sigma_x, d.sigma_y, d.theta).numpy().astype(np.float64)
        out += [
            Candidate(f"tuned:wiener true kernel ×{s}", TunedClassicalEngine("wiener", kernel=k, strength=s))
            for s in (0.1, 0.3, 1.0)
        ]
        out += [
            Candidate(
                f"tuned:richardson_lucy true kernel ×{s}", TunedClassicalEngine("richardson_lucy", kernel=k, strength=s)
            )
            for s in (0.5, 1.5)
        ]
    return out


def classical_candidates(task_name: str) -> list[Candidate]:
    """Every classical method for a task (deblurring also with the PSF width tuned over 1.5/2/2.5 px)."""
    task = task_from_name(task_name)
    out = [Candidate(f"classical:{m}", ClassicalEngine(method=m)) for m in METHODS[task.kind]]
    if task_name == "deblur":
        out += [
            Candidate(f"classical:{m} psf σ={s}", ClassicalEngine(method=m, psf_sigma=s))
            for m in METHODS[task.kind]
            for s in (2.0, 2.5)
        ]
    return out


def evaluate(
    clean: np.ndarray,
    candidates: Sequence[Candidate],
    protocols: Sequence[str] | None = None,
    seed: int = 0,
    progress: EvalProgress | None = None,
    examples_dir: Path | None = None,
    tuned: bool = True,
    baselines: bool = True,
    bm3d_estimated: bool = True,
) -> EvalReport:
    """Score classical baselines and ``candidates`` (learned engines) on degraded copies of ``clean`` tiles.

    ``tuned``: also the baselines given the truth (:func:`tuned_candidates`: true σ, true kernel, BM3D).
    ``baselines=False`` scores ``candidates`` only (the degraded tiles are the same for the same seed).
    """
    from scipy.stats import spearmanr

    from lpfm_toolkit.engine.degrade import evaluation_protocol

    protocol = evaluation_protocol()
    chosen = list(protocols) if protocols else list(protocol)
    unknown = [p for p in chosen if p not in protocol]
    if unknown:
        raise ConfigError(f"unknown degradations {unknown}", f"choose from {', '.join(protocol)}")
    report = EvalReport(
        meta={
            "tiles": int(len(clean)),
            "tile_size": int(clean.shape[1]),
            "seed": seed,
            "protocols": {p: protocol[p][1].to_dict() for p in chosen},
        }
    )
    jobs = [
        (p, c)
        for p in chosen
        for c in (classical_candidates(protocol[p][0]) if baselines else [])
        + (tuned_candidates(*protocol[p], bm3d_estimated=bm3d_estimated) if tuned and baselines else [])
        + list(candidates)
    ]
    done = 0
    examples: dict[str, dict[str, np.ndarray]] = {}
    for p_index, proto in enumerate(chosen):
        task_name, degradation = protocol[proto]
        task = task_from_name(task_name)
        degraded = degrade_tiles(clean, degradation, seed + p_index)
        examples[proto] = {"clean": clean[0], "degraded": degraded[0]}
        for cand in [c for (p, c) in jobs if p == proto]:
            engine = cand.engine
            engine.check(task, ["R", "G", "B"])
            engine.prepare(task, _mosaic(degraded))
            t0 = time.perf_counter()
            seeds = [seed * 1_000_003 + i for i in range(len(degraded))]
            outs, uncs = [], []
            for i in range(len(degraded)):
                res = engine.process(degraded[i : i + 1], task, seeds[i : i + 1])
                outs.append(res.pixels[0])
                if res.uncertainty is not None:
                    uncs.append(res.uncertainty[0])
            seconds = (time.perf_counter() - t0) / len(degraded)
            out = np.clip(np.stack(outs), 0, 1)
            tile_psnr = [psnr(o, c) for o, c in zip(out, clean)]
            tile_mse = [float(np.mean((o.astype(np.float64) - c) ** 2)) for o, c in zip(out, clean)]
            row = {
                "protocol": proto,
                "task": task_name,
                "method": cand.label,
                "learned": cand.learned,
                "psnr": float(np.mean(tile_psnr)),
                "ssim": float(np.mean([ssim(o, c) for o, c in zip(out, clean)])),
                "mae": float(np.mean(np.abs(out - clean))),
                "seconds_per_tile": seconds,
            }
            report.rows.append(row)
            report.per_tile.setdefault(proto, {})[cand.label] = tile_psnr
            examples[proto][cand.label] = out[0]
            if uncs:
                unc = np.stack(uncs)
                per_tile_unc = unc.reshape(len(unc), -1).mean(axis=1)
                rho, pval = spearmanr(per_tile_unc, tile_mse)
                report.spearman.setdefault(cand.label, {})[proto] = {"rho": float(rho), "p": float(pval)}
                examples[proto][cand.label + " uncertainty"] = unc[0]
            done += 1
            if progress is not None:
                progress(done, len(jobs))
            log.info("%s %s: %.2f dB", proto, cand.label, row["psnr"])
    _pooled_spearman(report)
    report.meta["examples"] = examples
    return report


def _pooled_spearman(report: EvalReport) -> None:
    """Add each candidate's mean ρ over the degradations it was scored on."""
    for per in report.spearman.values():
        rhos = [v["rho"] for v in per.values() if not math.isnan(v["rho"])]
        if rhos:
            per["mean over degradations"] = {"rho": float(np.mean(rhos)), "p": float("nan")}


def _mosaic(tiles: np.ndarray) -> np.ndarray:
    """Tiles side by side: the 'overview' classical engines fit whole-region statistics on."""
    return np.concatenate(list(tiles), axis=1)


# ---------------------------------------------------------------------------------------------- HTML


def _png(pixels: np.ndarray, size: int) -> str:
    from PIL import Image

    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = _heat(pixels[..., 0])
    img = Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8))
    img = img.resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _heat(u: np.ndarray) -> np.ndarray:
    """A black→red→yellow→white map of an uncertainty image scaled to its 99th percentile."""
    v = np.clip(u / max(float(np.percentile(u, 99)), 1e-6), 0, 1)
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)


def write_html(report: EvalReport, path: str | Path, title: str = "lpfm evaluate") -> Path:
    """An HTML page: the tables, then per degradation the clean, degraded and restored first tile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 256
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}figure{display:inline-block;margin:4px;text-align:center}"
        "figcaption{font-size:12px;max-width:256px}</style>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{report.meta.get('tiles')} held-out tiles of {report.meta.get('tile_size')} px; seed "
        f"{report.meta.get('seed')}. Crops below are the first tile, pixel-replicated to {size} px.</p>",
        _md_tables_to_html(report),
    ]
    best_psnr = {(r["protocol"], r["method"]): r["psnr"] for r in report.rows}
    for proto, images in report.meta.get("examples", {}).items():
        parts.append(f"<h2>{html.escape(proto)}</h2><div>")
        for label, px in images.items():
            score = best_psnr.get((proto, label))
            caption = label + (f" — {score:.2f} dB (mean)" if score is not None else "")
            parts.append(
                f"<figure><img width={size} src='data:image/png;base64,{_png(px, size)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    path.write_text("\n".join(parts))
    return path


def _md_tables_to_html(report: EvalReport) -> str:
    rows = [
        "<table><tr><th>degradation</th><th>method</th><th>PSNR (dB)</th><th>SSIM</th><th>MAE (/255)</th>"
        "<th>s/tile</th></tr>"
    ]
    for r in report.rows:
        style = " style='font-weight:bold'" if r["learned"] else ""
        rows.append(
            f"<tr{style}><td>{html.escape(r['protocol'])}</td><td>{html.escape(r['method'])}</td>"
            f"<td>{r['psnr']:.2f}</td><td>{r['ssim']:.4f}</td><td>{r['mae'] * 255:.2f}</td>"
            f"<td>{r['seconds_per_tile']:.2f}</td></tr>"
        )
    rows.append("</table>")
    if report.spearman:
        rows.append("<h2>Uncertainty vs error (Spearman ρ over held-out tiles)</h2><ul>")
        for label, per in report.spearman.items():
            items = ", ".join(f"{html.escape(k)}: ρ={v['rho']:+.2f}" for k, v in per.items())
            rows.append(f"<li>{html.escape(label)}: {items}</li>")
        rows.append("</ul>")
    return "\n".join(rows)


def write_json(report: EvalReport, path: str | Path) -> Path:
    path = Path(path)
    data = report.to_json()
    data["meta"] = {k: v for k, v in data["meta"].items() if k != "examples"}
    path.write_text(json.dumps(data, indent=2))
    return path

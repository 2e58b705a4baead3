"""``lpfm demo``'s gain picture: a clean region of the sample slide, degraded realistically, then restored.

The region comes from the bottom band of the bundled CC0 slide that the shipped bundle's training held
out. It is degraded the way a scanner or a careless export would (optical blur, scikit-image's
anti-aliased down-sampling, sensor noise, JPEG), restored by every classical method of the task and by
the learned engine, and shown as full-resolution crops — degraded, best classical, lpfm, truth — with
the PSNR of each against the truth. Library code: nothing is printed; the CLI prints the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpfm_toolkit.errors import ConfigError

SAMPLE_SLIDE = Path(__file__).resolve().parent / "data" / "cmu_small_region.svs"
HELD_OUT = 0.15  # bottom fraction of the sample slide the shipped recipe does not train on

#: prompt → degradation applied to the clean crop (blind-model parameters, see engine.degrade)
DEMO_DEGRADATIONS: dict[str, dict[str, Any]] = {
    "sr x2": {
        "scale": 2,
        "down_kernel": "skimage",
        "blur_kind": "gaussian_iso",
        "sigma_x": 0.6,
        "sigma_y": 0.6,
        "noise_sigma": 3.0,
        "jpeg_quality": 85,
    },
    "sr x4": {
        "scale": 4,
        "down_kernel": "skimage",
        "blur_kind": "gaussian_iso",
        "sigma_x": 0.8,
        "sigma_y": 0.8,
        "noise_sigma": 2.0,
        "jpeg_quality": 90,
    },
    "denoise": {"noise_sigma": 20.0, "poisson_peak": 120.0, "jpeg_quality": 92},
    "deblur": {"blur_kind": "defocus", "radius": 2.5, "noise_sigma": 2.0, "jpeg_quality": 92},
}


@dataclass
class DemoResult:
    """Where the picture went and what it shows."""

    picture: Path
    task: str
    psnr: dict[str, float] = field(default_factory=dict)  # panel label → PSNR (dB) against the truth
    best_classical: str = ""
    gain_db: float = 0.0  # lpfm − best classical

    def lines(self) -> list[str]:
        """What a CLI prints: one line per panel, then the gain."""
        out = [f"{label}: {value:.2f} dB" for label, value in self.psnr.items()]
        out.append(f"gain of lpfm over the best classical method ({self.best_classical}): {self.gain_db:+.2f} dB")
        out.append(f"picture: {self.picture}")
        return out


def clean_crop(size: int = 256, slide: Path = SAMPLE_SLIDE) -> np.ndarray:
    """The most textured tissue square of ``size`` px in the held-out bottom band of the sample slide."""
    from lpfm_toolkit.engine.train import is_tissue, read_rgb

    img = read_rgb(slide)
    band = img[int(round(img.shape[0] * (1 - HELD_OUT))) :]
    best, best_score = None, -1.0
    for y in range(0, band.shape[0] - size + 1, size // 2):
        for x in range(0, band.shape[1] - size + 1, size // 2):
            crop = band[y : y + size, x : x + size]
            if not is_tissue(crop):
                continue
            gy, gx = np.gradient(crop.mean(axis=-1))
            score = float(np.mean(np.hypot(gx, gy)))
            if score > best_score:
                best, best_score = crop, score
    if best is None:
        raise ConfigError(f"no tissue square of {size} px in the held-out band of {slide.name}")
    return np.ascontiguousarray(best, dtype=np.float32)


def gain_demo(
    out_dir: str | Path, engine: Any, prompt: str = "sr x2", size: int = 256, seed: int = 0, classical: Any = None
) -> DemoResult:
    """Degrade a clean crop, restore it with every classical method and with ``engine``; write the picture.

    ``engine``: the learned engine (anything with the engine contract); ``classical`` defaults to every
    method of :class:`~lpfm_toolkit.engine.classical.ClassicalEngine` for the task, each fitted on the
    degraded crop as ``lpfm enhance`` would.
    """
    from lpfm_toolkit.engine.classical import METHODS, ClassicalEngine
    from lpfm_toolkit.engine.degrade import BlindParams, _active, apply_blind
    from lpfm_toolkit.prompts import parse_prompt

    key = prompt.strip().lower()
    if key not in DEMO_DEGRADATIONS:
        raise ConfigError(
            f"the gain demo has no degradation for {prompt!r}", f"use one of: {', '.join(DEMO_DEGRADATIONS)}"
        )
    task = parse_prompt(prompt)
    truth = clean_crop(size)
    params = BlindParams(**DEMO_DEGRADATIONS[key])
    params.order = [op for op in ("blur", "down", "noise", "jpeg") if _active(params, op)]
    degraded, _ = apply_blind(truth, params, np.random.default_rng(seed))
    outputs: dict[str, np.ndarray] = {}
    engines = classical or [ClassicalEngine(method=m) for m in METHODS[task.kind]]
    for eng in engines:
        eng.check(task, ["R", "G", "B"])
        eng.prepare(task, degraded)
        outputs[f"classical: {eng.method_for(task)}"] = eng.process(degraded[None], task, [seed]).pixels[0]
    engine.check(task, ["R", "G", "B"])
    engine.prepare(task, degraded)
    learned = engine.process(degraded[None], task, [seed]).pixels[0]
    scores = {label: _psnr(px, truth) for label, px in outputs.items()}
    best = max(scores, key=scores.__getitem__)
    lpfm_score = _psnr(learned, truth)
    shown = degraded if task.scale == 1 else degraded.repeat(task.scale, 0).repeat(task.scale, 1)
    zoom = f" (pixels x{task.scale})" if task.scale > 1 else ""
    panels = [
        (f"degraded{zoom}", shown, _psnr(shown, truth)),
        (f"best classical ({best.split(': ')[1]})", outputs[best], scores[best]),
        ("lpfm", learned, lpfm_score),
        ("truth", truth, math.inf),
    ]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = _write_panels(
        panels, out_dir / f"demo-gain-{key.replace(' ', '')}.png", title=f"{task.label}: {_describe(params)}"
    )
    psnr = {"degraded": panels[0][2], **{k: v for k, v in scores.items()}, "lpfm": lpfm_score}
    return DemoResult(
        picture=picture, task=task.label, psnr=psnr, best_classical=best, gain_db=lpfm_score - scores[best]
    )


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, 0, 1).astype(np.float64) - b) ** 2))
    return 10 * math.log10(1 / max(mse, 1e-12))


def _describe(p: Any) -> str:
    parts = []
    if p.blur_kind == "gaussian_iso":
        parts.append(f"blur sigma {p.sigma_x:g} px")
    elif p.blur_kind == "defocus":
        parts.append(f"defocus r {p.radius:g} px")
    if p.scale > 1:
        parts.append(f"anti-aliased x{p.scale} down-sampling")
    if p.noise_sigma or p.poisson_peak:
        parts.append(f"noise sigma {p.noise_sigma:g}/255" + (" + shot noise" if p.poisson_peak else ""))
    if p.jpeg_quality:
        parts.append(f"JPEG q{p.jpeg_quality}")
    return ", ".join(parts)


def _write_panels(panels: list[tuple[str, np.ndarray, float]], path: Path, title: str) -> Path:
    """Panels side by side at 1:1 pixels, each captioned with its PSNR; written atomically.

    Captions are ASCII: PIL's built-in font has no σ or ×."""
    from PIL import Image, ImageDraw

    h, w = panels[0][1].shape[:2]
    gap, head, foot = 8, 26, 22
    canvas = Image.new("RGB", (len(panels) * (w + gap) - gap, head + h + foot), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 6), title, fill="black")
    for i, (label, px, score) in enumerate(panels):
        x0 = i * (w + gap)
        tile = Image.fromarray((np.clip(px[:h, :w], 0, 1) * 255 + 0.5).astype(np.uint8))
        canvas.paste(tile, (x0, head))
        caption = label if math.isinf(score) else f"{label}: {score:.2f} dB"
        draw.text((x0 + 2, head + h + 5), caption, fill="black")
    tmp = path.with_name(path.name + ".part")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path

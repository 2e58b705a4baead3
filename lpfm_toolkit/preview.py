"""Before/after pictures: the source crop, the enhanced crop and (if present) the uncertainty map, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lpfm_toolkit.pipeline import WorkItem, to_float
from lpfm_toolkit.sources.base import ImageHandle

#: PNG text key that marks a before/after picture as lpfm's own
PREVIEW_MARK = "lpfm-preview-of"


def _to_rgb8(img: np.ndarray) -> np.ndarray:
    f = to_float(img)
    if f.shape[2] == 1:
        f = np.repeat(f, 3, axis=2)
    elif f.shape[2] == 2:
        f = np.concatenate([f, np.zeros_like(f[:, :, :1])], axis=2)
    elif f.shape[2] > 3:
        f = f[:, :, :3]
    if img.dtype != np.uint8:  # fluorescence: stretch for display
        hi = np.percentile(f, 99.5) or 1.0
        f = f / hi
    return (np.clip(f, 0, 1) * 255 + 0.5).astype(np.uint8)


def _heat(u: np.ndarray) -> np.ndarray:
    """Uncertainty as a black → red → yellow ramp, scaled to its 99th percentile."""
    u = u[:, :, 0] / (np.percentile(u, 99) or 1.0)
    u = np.clip(u, 0, 1)
    return (np.stack([np.clip(2 * u, 0, 1), np.clip(2 * u - 1, 0, 1), np.zeros_like(u)], -1) * 255).astype(np.uint8)


def write_preview(
    handle: ImageHandle,
    item: WorkItem,
    output: str | Path,
    png: str | Path,
    uncertainty: str | Path | None = None,
    crop: int = 384,
) -> Path:
    """Write ``png`` with the centre crop (``crop`` output pixels) of the input, output and uncertainty."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    from lpfm_toolkit.sources import open_image

    s = item.task.scale
    r = item.region
    cw, ch = min(crop // s, r.width), min(crop // s, r.height)
    cx, cy = r.x + (r.width - cw) // 2, r.y + (r.height - ch) // 2
    before = _to_rgb8(handle.read_region(item.level, cx, cy, cw, ch)).repeat(s, 0).repeat(s, 1)
    ox, oy = (cx - r.x) * s, (cy - r.y) * s
    with open_image(output) as out:
        after = _to_rgb8(out.read_region(0, ox, oy, cw * s, ch * s))
    label = item.task.label.replace("×", "x").replace("→", "->")
    panels = [("input" + (f" (x{s} nearest)" if s > 1 else ""), before), (f"lpfm {label}", after)]
    if uncertainty:
        with open_image(uncertainty) as unc:
            panels.append(("uncertainty (std)", _heat(unc.read_region(0, ox, oy, cw * s, ch * s))))
    h, w = after.shape[:2]
    canvas = Image.new("RGB", (len(panels) * (w + 10) + 10, h + 40), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, img) in enumerate(panels):
        x = 10 + i * (w + 10)
        canvas.paste(Image.fromarray(img), (x, 30))
        draw.text((x, 8), label, fill="black")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.name + ".partial")
    info = PngInfo()
    info.add_text(PREVIEW_MARK, str(output))
    try:
        canvas.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(png)
    finally:
        tmp.unlink(missing_ok=True)
    return png


def is_preview(path: str | Path) -> bool:
    """Whether ``path`` is a before/after PNG lpfm wrote (so a re-run may replace it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and PREVIEW_MARK in getattr(im, "text", {})
    except (OSError, ValueError, SyntaxError):
        return False

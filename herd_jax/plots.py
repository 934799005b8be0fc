"""Line plots as PNG with PIL alone (no plotting dependency): the run's reward curve and benchmarks.

A plot is a set of named series, each a line (`mean`) with an optional translucent band
(`lo`..`hi`: ± std, or min..max over seeds) over the same x values.
"""
from __future__ import annotations

import pathlib
from typing import NamedTuple, Sequence

import numpy as np

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]


class Series(NamedTuple):
    name: str
    x: np.ndarray  # f[n]
    mean: np.ndarray  # f[n]
    lo: np.ndarray | None = None  # f[n] band bottom
    hi: np.ndarray | None = None  # f[n] band top


def line_plot(series: Sequence[Series], *, title: str, xlabel: str, width: int = 900, height: int = 560, legend: bool = True):
    """A PIL image: the series' lines over their bands, axes with 6 ticks, the title and x label."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    left, right, top, bottom = 80, 190 if legend else 30, 40, 60
    image = Image.new("RGB", (width, height), "white")
    series = [s for s in (_finite(s) for s in series) if len(s.x)]
    values = [v for s in series for v in (s.mean, s.lo, s.hi) if v is not None]
    xs = np.concatenate([s.x for s in series]) if series else np.zeros(1)
    ys = np.concatenate(values) if values else np.zeros(1)
    x0, x1 = float(xs.min()), float(xs.max())
    x1 = x1 if x1 > x0 else x0 + 1.0
    y0, y1 = float(ys.min()), float(ys.max())
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
    py = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
    bands = Image.new("RGBA", image.size, (0, 0, 0, 0))
    for i, s in enumerate(series):  # every band first, so no band dims another series' line
        if s.lo is not None and s.hi is not None and len(s.x) > 1:
            layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
            polygon = [(px(a), py(b)) for a, b in zip(s.x, s.hi)] + [(px(a), py(b)) for a, b in zip(s.x[::-1], s.lo[::-1])]
            ImageDraw.Draw(layer).polygon(polygon, fill=PALETTE[i % len(PALETTE)] + (45,))
            bands = Image.alpha_composite(bands, layer)
    image = Image.alpha_composite(image.convert("RGBA"), bands).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        xv, yv = x0 + i * (x1 - x0) / 5, y0 + i * (y1 - y0) / 5
        draw.line([px(xv), height - bottom, px(xv), height - bottom + 5], fill="black")
        draw.text((px(xv) - 12, height - bottom + 8), f"{xv:.0f}", fill="black", font=font)
        draw.line([left - 5, py(yv), left, py(yv)], fill="black")
        draw.text((8, py(yv) - 6), f"{yv:.4f}", fill="black", font=font)
    draw.text((left + (width - left - right) // 2 - 40, height - 25), xlabel, fill="black", font=font)
    draw.text((left, 12), title, fill="black", font=font)
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        if len(s.x) > 1:
            draw.line([(px(a), py(b)) for a, b in zip(s.x, s.mean)], fill=color, width=3)
        else:
            draw.ellipse([px(s.x[0]) - 3, py(s.mean[0]) - 3, px(s.x[0]) + 3, py(s.mean[0]) + 3], fill=color)
        if legend:
            ly = top + 10 + 18 * i
            draw.line([width - right + 12, ly + 6, width - right + 36, ly + 6], fill=color, width=3)
            draw.text((width - right + 42, ly), s.name, fill="black", font=font)
    return image


def side_by_side(images: Sequence, path: str | pathlib.Path) -> None:
    """Saves images next to each other as one PNG."""
    from PIL import Image

    out = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    out.save(path)


def _finite(s: Series) -> Series:
    ok = np.isfinite(np.asarray(s.mean, float))
    pick = lambda v: None if v is None else np.asarray(v, float)[ok]
    return Series(s.name, np.asarray(s.x, float)[ok], np.asarray(s.mean, float)[ok], pick(s.lo), pick(s.hi))

"""Say which shape, shape colour and background colour a picture shows, from plain pixel statistics.

After a 3x3 median filter: background = the median colour of the border pixels; shape colour = the median of the
pixels far from it; foreground mask = pixels nearer the shape colour than the background colour (the midpoint, so a
blurred edge neither grows nor shrinks the shape), kept to its largest 8-connected region (a decoder's stray speckle
at the border must not widen the bounding box); shape = how much of its bounding box that region fills (square ≈ 1,
circle ≈ π/4, triangle ≈ 1/2).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .dataset import COLORS, POSITIONS

PALETTE_NAMES = list(COLORS)
PALETTE = np.array([COLORS[n] for n in PALETTE_NAMES], dtype=np.float32)
FOREGROUND_DISTANCE = 45.0  # RGB distance from the background that counts as foreground (closest pair: ~76)


@dataclass(frozen=True)
class Judgement:
    shape: str | None
    color: str | None
    background: str
    position: str | None
    fill: float
    area: float  # foreground fraction of the picture


def nearest_color(rgb: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def judge(image: Image.Image) -> Judgement:
    # A 3x3 median first: speckle a decoder leaves must not count as foreground or widen the bounding box.
    pixels = np.asarray(image.convert("RGB").filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    background = nearest_color(background_rgb)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2))
    far = distance > FOREGROUND_DISTANCE
    if far.sum() < 0.005 * h * w:
        return Judgement(None, None, background, None, 0.0, float(far.mean()))
    core = distance >= np.median(distance[far])  # the inner half of the far pixels: no blurred edge in the colour
    shape_rgb = np.median(pixels[core], axis=0)
    color = nearest_color(shape_rgb)
    mask = ((pixels - shape_rgb) ** 2).sum(axis=2) < distance**2
    area = float(mask.mean())
    mask = largest_region(mask)
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum() / box)
    # Sharp renders: triangle 0.53-0.60, circle 0.74-0.79, square 0.98-1; blurred (σ 1.5 px) triangle up to 0.67.
    shape = "square" if fill > 0.88 else "circle" if fill > 0.70 else "triangle"
    cy, cx = ys.mean() / h, xs.mean() / w
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Judgement(shape, color, background, position, fill, area)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask (a flood fill: pictures are 64x64)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny in range(max(y - 1, 0), min(y + 2, h)):
                for nx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    ys, xs = zip(*best)
    out[list(ys), list(xs)] = True
    return out

"""Say what a picture of simple shapes shows, from plain pixel statistics, or say that it shows no known shape.

After a 3x3 median filter: background = the median colour of the border pixels; the shapes = the 8-connected regions
of pixels far from it (largest first); each region's colour = the median of its inner half (no blurred edge in it);
its mask = the pixels nearer that colour than the background's (the midpoint, so a blurred edge neither grows nor
shrinks it), kept to its largest region. The mask is compared with each shape as the dataset draws it, centred on the
mask's bounding box and as large as its longer side: the shape it overlaps best (intersection over union) is what it
shows, if that overlap reaches `MIN_OVERLAP` (a star's thin points get a lower bar). Otherwise it is unrecognised
(`shape` None): a blob, a rounded square or an egg is not a circle. The margin is how far the best overlap clears both
the bar and the runner-up's overlap (negative when unrecognised): pictures near a decision boundary have small margins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .dataset import COLORS, POSITIONS, SHAPE_ASPECT, SHAPES, Scene, draw_shape

PALETTE_NAMES = list(COLORS)
PALETTE = np.array([COLORS[n] for n in PALETTE_NAMES], dtype=np.float32)
FOREGROUND_DISTANCE = 45.0  # RGB distance from the background that counts as foreground (closest pair: ~76)
MIN_SHAPE_AREA = 0.004  # of the picture: smaller regions are specks, not shapes
# The intersection over union a shape needs: sharp renders reach 0.93-1, blurred ones (σ 1.5 px) 0.86 and up, but a
# blurred small star only ~0.79 (its thin points fade); a union of three discs reaches 0.81 as a circle, an egg 0.79.
MIN_OVERLAP = 0.83
MIN_OVERLAP_STAR = 0.75


@dataclass(frozen=True)
class SeenShape:
    """One shape found in a picture; `shape` None means unrecognised."""

    shape: str | None
    color: str
    x: float  # bounding box centre, as a fraction of the width
    y: float
    area: float  # of the picture
    margin: float  # how far its overlap clears the bar and the runner-up; negative when unrecognised
    overlaps: dict[str, float] = field(default_factory=dict)  # intersection over union with each drawn shape

    @property
    def position(self) -> str:
        return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - self.x) ** 2 + (POSITIONS[p][1] - self.y) ** 2)


@dataclass(frozen=True)
class Judgement:
    """What a one-shape picture shows (its largest shape), in the terms of `dataset.Scene`."""

    shape: str | None
    color: str | None
    background: str
    position: str | None
    area: float  # foreground fraction of the picture
    margin: float = -1.0
    shapes: list[SeenShape] = field(default_factory=list)


@dataclass(frozen=True)
class PairJudgement:
    """How a picture compares with a `dataset.PairScene`: each part right or wrong."""

    background: bool
    a: bool  # shape A is there in its colour and of its kind
    b: bool
    relation: bool
    count: bool  # no third shape
    margins: tuple[float, float] = (-1.0, -1.0)  # shape A's and B's shape margins (-1 when missing)
    seen_relation: str | None = None

    @property
    def all_right(self) -> bool:
        return self.background and self.a and self.b and self.relation and self.count


def nearest_color(rgb: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def classify(mask: np.ndarray) -> tuple[str | None, float, dict[str, float]]:
    """The shape that `mask` overlaps best, its margin, and every shape's overlap; None when no overlap is enough."""
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    pad = max(bottom - top, right - left) // 2 + 2
    y0, x0 = max(top - pad, 0), max(left - pad, 0)
    crop = mask[y0 : bottom + pad, x0 : right + pad]
    cx, cy = (left + right) / 2 - x0, (top + bottom) / 2 - y0
    overlaps = {}
    for kind in SHAPES:
        half = max((bottom - top) / 2, (right - left) / 2 / SHAPE_ASPECT.get(kind, 1.0))
        drawn = drawn_mask(kind, crop.shape, cx, cy, half)
        overlaps[kind] = float((drawn & crop).sum() / (drawn | crop).sum())
    ranked = sorted(overlaps, key=overlaps.get, reverse=True)
    best, second = overlaps[ranked[0]], overlaps[ranked[1]]
    bar = MIN_OVERLAP_STAR if ranked[0] == "star" else MIN_OVERLAP
    margin = best - max(bar, second)
    return (ranked[0] if best >= bar else None), round(margin, 4), overlaps


def drawn_mask(kind: str, shape: tuple[int, int], cx: float, cy: float, half: float) -> np.ndarray:
    """Where the dataset would paint `kind` centred at (cx, cy) with half-size `half`, in pixels (4x supersampled)."""
    big = Image.new("L", (shape[1] * 4, shape[0] * 4), 0)
    draw_shape(ImageDraw.Draw(big), kind, 255, 0, cx * 4, cy * 4, half * 4)
    return np.asarray(big.resize((shape[1], shape[0]), Image.Resampling.BOX)) >= 128


def judge_shapes(image: Image.Image, limit: int = 3) -> tuple[str, list[SeenShape]]:
    """The background colour and up to `limit` shapes, largest first."""
    pixels = np.asarray(image.convert("RGB").filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    background = nearest_color(background_rgb)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2))
    far = distance > FOREGROUND_DISTANCE
    shapes = []
    for region in regions(far, limit, int(MIN_SHAPE_AREA * h * w)):
        core = region & (distance >= np.median(distance[region]))  # the inner half: no blurred edge
        shape_rgb = np.median(pixels[core], axis=0)
        nearer = ((pixels - shape_rgb) ** 2).sum(axis=2) < distance**2
        mask = largest_region(nearer & grow(region, 2))
        ys, xs = np.nonzero(mask)
        kind, margin, overlaps = classify(mask)
        shapes.append(SeenShape(kind, nearest_color(shape_rgb), (xs.min() + xs.max() + 1) / 2 / w,
                                (ys.min() + ys.max() + 1) / 2 / h, float(mask.mean()), margin, overlaps))  # fmt: skip
    return background, shapes


def judge(image: Image.Image) -> Judgement:
    """The largest shape of a picture, for one-shape scenes."""
    background, shapes = judge_shapes(image)
    if not shapes:
        return Judgement(None, None, background, None, 0.0)
    main = shapes[0]
    return Judgement(main.shape, main.color, background, main.position, sum(s.area for s in shapes), main.margin,
                     shapes)  # fmt: skip


def judge_pair(image: Image.Image, scene) -> PairJudgement:
    """Compare a picture with a two-shape scene: background, each shape's colour and kind, their relation."""
    background, shapes = judge_shapes(image)
    by_color = {}
    for s in shapes:
        by_color.setdefault(s.color, s)  # the largest region of each colour
    a, b = by_color.get(scene.color_a), by_color.get(scene.color_b)
    seen_relation = relation(a, b) if a and b else None
    big = [s for s in shapes if s.area >= 0.3 * min(x.area for x in (a, b) if x)] if (a or b) else shapes
    return PairJudgement(
        background=background == scene.background,
        a=bool(a and a.shape == scene.shape_a),
        b=bool(b and b.shape == scene.shape_b),
        relation=seen_relation == scene.relation,
        count=len(big) == 2,
        margins=(a.margin if a else -1.0, b.margin if b else -1.0),
        seen_relation=seen_relation,
    )


def judge_scene(image: Image.Image, scene) -> dict[str, bool]:
    """Each factor of `scene` right or wrong, for either kind of scene."""
    if isinstance(scene, Scene):
        j = judge(image)
        return {
            "color": j.color == scene.color,
            "background": j.background == scene.background,
            "shape": j.shape == scene.shape,
            "position": j.position == scene.position,
        }
    p = judge_pair(image, scene)
    return {"background": p.background, "shapes": p.a and p.b, "relation": p.relation, "all": p.all_right}


def relation(a: SeenShape, b: SeenShape) -> str:
    """Where A is with respect to B: the larger of the horizontal and vertical offsets decides."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


# ----------------------------------------------------------------------------------- mask geometry
def grow(mask: np.ndarray, steps: int = 1, eight: bool = True) -> np.ndarray:
    """Dilate a boolean mask by `steps` pixels (3x3 neighbourhood, or the 4 neighbours)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        if eight:
            grown[1:, 1:] |= out[:-1, :-1]
            grown[1:, :-1] |= out[:-1, 1:]
            grown[:-1, 1:] |= out[1:, :-1]
            grown[:-1, :-1] |= out[1:, 1:]
        out = grown
    return out


def flood(allowed: np.ndarray, seeds: np.ndarray, eight: bool = True) -> np.ndarray:
    """The pixels of `allowed` connected to `seeds`."""
    reached = seeds & allowed
    while True:
        grown = grow(reached, 1, eight) & allowed
        if (grown == reached).all():
            return reached
        reached = grown


def regions(mask: np.ndarray, limit: int, min_area: int) -> list[np.ndarray]:
    """Up to `limit` 8-connected regions of at least `min_area` pixels, largest first."""
    found, left = [], mask.copy()
    for _ in range(4 * limit):  # a bounded search: noise has many tiny regions
        if left.sum() < min_area:
            break
        ys, xs = np.nonzero(left)
        seed = np.zeros_like(left)
        seed[ys[0], xs[0]] = True
        region = flood(left, seed)
        left &= ~region
        if region.sum() >= min_area:
            found.append(region)
    return sorted(found, key=lambda r: -int(r.sum()))[:limit]


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask (empty for an empty mask)."""
    found = regions(mask, 1, 1)
    return found[0] if found else mask

"""Procedural pictures of simple shapes on plain backgrounds, with English and Chinese captions.

Two kinds of scene, generated on the fly from a seed (nothing is downloaded):
- `Scene`: one shape (circle, square, triangle, star or ring) in one of 8 colours, at one of 5 positions and 2 sizes;
- `PairScene`: two shapes of different colours side by side or one above the other, with the relation in the
  caption ("a red circle left of a blue square", "蓝色正方形上方的红色圆形").
Every factor is known, so a picture drawn from a caption can be judged by `zstudio.demo.evaluator`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIDE = 128  # the demo model's native picture size

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
             "white": "白色", "black": "黑色"}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star", "ring")
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "ring": "圆环"}
POSITIONS: dict[str, tuple[float, float]] = {
    "centre": (0.5, 0.5),
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
}
POSITIONS_EN = {"centre": "in the centre", "left": "on the left", "right": "on the right", "top": "at the top",
                "bottom": "at the bottom"}  # fmt: skip
POSITIONS_ZH = {"centre": "中间", "left": "左边", "right": "右边", "top": "上方", "bottom": "下方"}
SIZES = {"small": 0.3, "large": 0.5}  # side or diameter as a fraction of the picture's side
SIZES_ZH = {"small": "小", "large": "大"}
# Two-shape scenes: "A <relation> B". Both shapes are PAIR_SIZE of the side, their centres PAIR_OFFSETS apart.
RELATIONS = ("left", "right", "above", "below")
RELATIONS_EN = {"left": ["left of", "to the left of"], "right": ["right of", "to the right of"],
                "above": ["above"], "below": ["below", "under"]}  # fmt: skip
RELATIONS_ZH = {"left": "左边", "right": "右边", "above": "上方", "below": "下方"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
PAIR_SIZE = 0.32
PAIR_OFFSETS = (0.27, 0.73)
STAR_INNER = 0.45  # inner radius of the star's points over the outer radius
RING_INNER = 0.55  # the ring's hole radius over its outer radius
SHAPE_ASPECT = {"star": 2 * math.sin(2 * math.pi / 5) / (1 + math.cos(math.pi / 5))}  # width over height; others 1


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    """One shape on a plain background."""

    shape: str
    color: str
    background: str
    position: str
    size: str

    def triples(self) -> list[tuple[str, str, str]]:
        """The (shape, colour, background) combinations it shows: what the held-out split is made of."""
        return [(self.shape, self.color, self.background)]

    @property
    def default_placement(self) -> bool:
        """Large and centred: what a caption that names no position or size shows (one picture per caption; a
        caption that fits ten placements teaches the model their average, a blob)."""
        return self.position == "centre" and self.size == "large"

    def captions_en(self) -> list[str]:
        c, s, b, p, z = self.color, self.shape, self.background, POSITIONS_EN[self.position], self.size
        placed = [
            f"{b} background, {z} {c} {s} {p}",
            f"a {z} {c} {s} {p}, plain {b} background",
            f"a picture of a {z} {c} {s} {p} on {b}",
        ]
        if not self.default_placement:
            return placed
        return [f"{article(c)} {c} {s} on a {b} background", f"{c} {s}, {b} background", *placed]

    def captions_zh(self) -> list[str]:
        c, s, b = COLORS_ZH[self.color], SHAPES_ZH[self.shape], COLORS_ZH[self.background]
        p, z = POSITIONS_ZH[self.position], SIZES_ZH[self.size]
        placed = [f"{b}背景，{p}有一个{z}的{c}{s}", f"{p}一个{z}{c}{s}，纯{b}背景", f"{z}{c}{s}在{p}，{b}背景"]
        if not self.default_placement:
            return placed
        return [f"{b}背景上的{c}{s}", f"一个{c}{s}，{b}底色", *placed]

    def shapes(self) -> list[tuple[str, str, float, float, float]]:
        """(kind, colour, centre x, centre y, size) of each shape, as fractions of the side."""
        x, y = POSITIONS[self.position]
        return [(self.shape, self.color, x, y, SIZES[self.size])]


@dataclass(frozen=True)
class PairScene:
    """Two shapes of different colours on a plain background: shape A is `relation` of shape B."""

    shape_a: str
    color_a: str
    shape_b: str
    color_b: str
    background: str
    relation: str

    def triples(self) -> list[tuple[str, str, str]]:
        return [(self.shape_a, self.color_a, self.background), (self.shape_b, self.color_b, self.background)]

    def captions_en(self) -> list[str]:
        a = f"{self.color_a} {self.shape_a}"
        b = f"{self.color_b} {self.shape_b}"
        bg = self.background
        out = []
        for rel in RELATIONS_EN[self.relation]:
            out += [f"{article(a)} {a} {rel} {article(b)} {b} on a {bg} background",
                    f"{bg} background, {article(a)} {a} {rel} {article(b)} {b}"]  # fmt: skip
        return out

    def captions_zh(self) -> list[str]:
        a = COLORS_ZH[self.color_a] + SHAPES_ZH[self.shape_a]
        b = COLORS_ZH[self.color_b] + SHAPES_ZH[self.shape_b]
        rel, bg = RELATIONS_ZH[self.relation], COLORS_ZH[self.background]
        return [f"{b}{rel}的{a}，{bg}背景", f"{bg}背景上，{a}在{b}的{rel}", f"{a}在{b}{rel}，纯{bg}背景"]

    def mirrored(self) -> PairScene:
        """The same picture told the other way round: "A left of B" is "B right of A"."""
        return PairScene(self.shape_b, self.color_b, self.shape_a, self.color_a, self.background,
                         OPPOSITE[self.relation])  # fmt: skip

    def shapes(self) -> list[tuple[str, str, float, float, float]]:
        first, second = PAIR_OFFSETS
        if self.relation in ("left", "right"):
            xa, xb = (first, second) if self.relation == "left" else (second, first)
            return [(self.shape_a, self.color_a, xa, 0.5, PAIR_SIZE), (self.shape_b, self.color_b, xb, 0.5, PAIR_SIZE)]
        ya, yb = (first, second) if self.relation == "above" else (second, first)
        return [(self.shape_a, self.color_a, 0.5, ya, PAIR_SIZE), (self.shape_b, self.color_b, 0.5, yb, PAIR_SIZE)]


def all_scenes() -> list[Scene]:
    return [
        Scene(shape, color, background, position, size)
        for shape in SHAPES
        for color in COLORS
        for background in COLORS
        if background != color
        for position in POSITIONS
        for size in SIZES
    ]


def all_pair_scenes() -> list[PairScene]:
    """Every two-shape picture once: A left of B, or A above B (their mirrors are the same pictures)."""
    return [
        PairScene(sa, ca, sb, cb, bg, relation)
        for sa in SHAPES
        for ca in COLORS
        for sb in SHAPES
        for cb in COLORS
        if cb != ca
        for bg in COLORS
        if bg not in (ca, cb)
        for relation in ("left", "above")
    ]


def random_scene(rng: random.Random) -> Scene:
    color, background = rng.sample(list(COLORS), 2)
    return Scene(rng.choice(SHAPES), color, background, rng.choice(list(POSITIONS)), rng.choice(list(SIZES)))


def random_pair_scene(rng: random.Random) -> PairScene:
    color_a, color_b, background = rng.sample(list(COLORS), 3)
    return PairScene(rng.choice(SHAPES), color_a, rng.choice(SHAPES), color_b, background, rng.choice(RELATIONS))


def shape_outline(kind: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """The polygon of a triangle (apex up) or a five-pointed star (point up), fitting a 2·half box at (cx, cy)."""
    if kind == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    # The star's outer radius makes its box 2·half tall; its centre moves down so the box is centred.
    radius = 2 * half / (1 + math.cos(math.pi / 5))
    top = cy - half
    centre_y = top + radius
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * STAR_INNER
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + r * math.cos(angle), centre_y + r * math.sin(angle)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, fill, background, cx: float, cy: float, half: float) -> None:
    box = (cx - half, cy - half, cx + half, cy + half)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "ring":
        draw.ellipse(box, fill=fill)
        inner = half * RING_INNER
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    else:
        draw.polygon(shape_outline(kind, cx, cy, half), fill=fill)


def render(scene: Scene | PairScene, side: int = SIDE) -> Image.Image:
    """Draw the scene; supersampled 4x then reduced, so edges are smooth as a decoder would draw them."""
    big = side * 4
    background = COLORS[scene.background]
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    for kind, color, x, y, size in scene.shapes():
        draw_shape(draw, kind, COLORS[color], background, x * big, y * big, size * big / 2)
    return image.resize((side, side), Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------------------------- splits
HELD_OUT = 28  # (shape, colour, background) triples, of 280, that training never shows in any scene


def held_out_triples(seed: int = 0, count: int = HELD_OUT) -> set[tuple[str, str, str]]:
    """Triples never shown in training; each shape, colour and background still appears in other triples."""
    triples = [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]
    return set(random.Random(seed).sample(triples, count))


def split(scenes: list, seed: int = 0) -> tuple[list, list]:
    """(training, held-out): a scene is held out when any of its shapes is a held-out triple."""
    held = held_out_triples(seed)
    train = [s for s in scenes if not set(s.triples()) & held]
    test = [s for s in scenes if set(s.triples()) & held]
    return train, test


def split_scenes(seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    return split(all_scenes(), seed)


def split_pair_scenes(seed: int = 0) -> tuple[list[PairScene], list[PairScene]]:
    """Both ways of telling each picture ("A left of B", "B right of A") land on the same side of the split."""
    train, test = split(all_pair_scenes(), seed)
    return train + [s.mirrored() for s in train], test + [s.mirrored() for s in test]

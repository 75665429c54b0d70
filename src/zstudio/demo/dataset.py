"""Procedural pictures of one simple shape on a plain background, with English and Chinese captions.

Generated on the fly from a seed: nothing is downloaded. Every factor is known, so a picture drawn from its caption
can be judged by `zstudio.demo.evaluator`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

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
SHAPES = ("circle", "square", "triangle")
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
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
SIZES = {"small": 0.3, "large": 0.5}  # side or diameter as a fraction of the image side
SIZES_ZH = {"small": "小", "large": "大"}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    position: str
    size: str

    def captions_en(self) -> list[str]:
        c, s, b, p, z = self.color, self.shape, self.background, POSITIONS_EN[self.position], self.size
        return [
            f"a {c} {s} on a {b} background",
            f"{b} background, {z} {c} {s} {p}",
            f"a {z} {c} {s} {p}, plain {b} background",
        ]

    def captions_zh(self) -> list[str]:
        c, s, b = COLORS_ZH[self.color], SHAPES_ZH[self.shape], COLORS_ZH[self.background]
        p, z = POSITIONS_ZH[self.position], SIZES_ZH[self.size]
        return [f"{b}背景上的{c}{s}", f"{b}背景，{p}有一个{z}的{c}{s}", f"{p}一个{z}{c}{s}，纯{b}背景"]


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


def random_scene(rng: random.Random) -> Scene:
    color, background = rng.sample(list(COLORS), 2)
    return Scene(rng.choice(SHAPES), color, background, rng.choice(list(POSITIONS)), rng.choice(list(SIZES)))


def render(scene: Scene, side: int = 64) -> Image.Image:
    """Draw the scene; supersampled 4x then reduced, so edges are smooth as a decoder would draw them."""
    big = side * 4
    image = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy = (v * big for v in POSITIONS[scene.position])
    half = SIZES[scene.size] * big / 2
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((side, side), Image.Resampling.LANCZOS)

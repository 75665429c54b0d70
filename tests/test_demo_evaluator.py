import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from zstudio.demo.dataset import (
    COLORS,
    SHAPES,
    PairScene,
    Scene,
    all_pair_scenes,
    all_scenes,
    random_pair_scene,
    random_scene,
    render,
)
from zstudio.demo.evaluator import judge, judge_pair, judge_scene


def noisy(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + np.random.default_rng(seed).normal(0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_dataset_covers_every_combination_with_captions_in_both_languages():
    scenes = all_scenes()
    assert len(scenes) == 5 * 8 * 7 * 5 * 2
    assert set(SHAPES) >= {"circle", "square", "triangle", "star", "ring"}
    scene = scenes[0]
    assert all(scene.color in c and scene.shape in c for c in scene.captions_en())
    assert len(scene.captions_en()) >= 3 and len(scene.captions_zh()) >= 3
    assert any("背景" in c for c in scene.captions_zh())
    assert len(all_pair_scenes()) == 5 * 8 * 5 * 7 * 6 * 2


def test_pair_captions_name_both_shapes_and_the_relation():
    scene = PairScene("circle", "red", "square", "blue", "white", "above")
    assert "a red circle above a blue square on a white background" in scene.captions_en()
    assert "蓝色正方形上方的红色圆形，白色背景" in scene.captions_zh()
    assert scene.mirrored() == PairScene("square", "blue", "circle", "red", "white", "below")
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene.mirrored())))  # the same picture


def test_evaluator_reads_rendered_scenes_with_every_shape():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(200)]
    judged = [judge(render(s)) for s in scenes]
    assert all((j.shape, j.color, j.background, j.position) == (s.shape, s.color, s.background, s.position)
               for j, s in zip(judged, scenes))  # fmt: skip
    assert {s.shape for s in scenes} == set(SHAPES)
    assert min(j.margin for j in judged) > 0.05  # clear of every decision boundary


@pytest.mark.parametrize("blur", [0.0, 1.5])
def test_evaluator_reads_two_shape_scenes(blur):
    rng = random.Random(1)
    scenes = [random_pair_scene(rng) for _ in range(60)]
    for scene in scenes:
        image = render(scene).filter(ImageFilter.GaussianBlur(blur)) if blur else render(scene)
        judged = judge_pair(image, scene)
        assert judged.all_right, (scene, judged)
        assert min(judged.margins) > 0


def test_evaluator_catches_a_wrong_relation_colour_or_kind():
    scene = PairScene("circle", "red", "star", "blue", "white", "left")
    image = render(scene)
    assert not judge_pair(image, PairScene("circle", "red", "star", "blue", "white", "right")).relation
    assert not judge_pair(image, PairScene("circle", "red", "star", "blue", "white", "above")).relation
    assert not judge_pair(image, PairScene("circle", "green", "star", "blue", "white", "left")).a
    assert not judge_pair(image, PairScene("circle", "red", "ring", "blue", "white", "left")).b
    one = render(Scene("circle", "red", "white", "left", "small"))
    assert not judge_pair(one, scene).all_right  # the second shape is missing
    assert judge_scene(image, scene) == {"background": True, "shapes": True, "relation": True, "all": True}


def test_evaluator_survives_noise_like_a_decoder_leaves():
    rng = random.Random(2)
    scenes = [random_scene(rng) for _ in range(100)]
    judged = [judge(noisy(render(s), 12, i)) for i, s in enumerate(scenes)]
    right = sum((j.shape, j.color, j.background) == (s.shape, s.color, s.background) for j, s in zip(judged, scenes))
    assert right >= 97


def test_evaluator_reads_blurred_scenes_like_a_small_decoder_draws():
    """A blurred edge must not change the shape: the mask splits edge pixels at the colours' midpoint."""
    rng = random.Random(3)
    scenes = [random_scene(rng) for _ in range(100)]
    judged = [judge(render(s).filter(ImageFilter.GaussianBlur(1.5))) for s in scenes]
    assert all((j.shape, j.color, j.background) == (s.shape, s.color, s.background) for j, s in zip(judged, scenes))


def blob(draw: ImageDraw.ImageDraw) -> None:
    for box in [(30, 30, 80, 80), (60, 50, 100, 95), (40, 60, 75, 100)]:
        draw.ellipse(box, fill=COLORS["red"])


@pytest.mark.parametrize(
    "paint",
    [
        blob,
        lambda d: d.ellipse((40, 34, 88, 94), fill=COLORS["red"]),  # an egg
        lambda d: d.ellipse((30, 45, 100, 85), fill=COLORS["red"]),  # a flat ellipse
        lambda d: d.polygon([(30, 40), (100, 30), (90, 100), (50, 80)], fill=COLORS["red"]),  # a quadrilateral
    ],
    ids=["blob", "egg", "ellipse", "quadrilateral"],
)
def test_a_blob_is_not_a_circle(paint):
    image = Image.new("RGB", (128, 128), COLORS["blue"])
    paint(ImageDraw.Draw(image))
    judged = judge(image)
    assert judged.color == "red" and judged.background == "blue"
    assert judged.shape is None and judged.margin < 0, judged.shapes[0].overlaps


def test_a_rounded_square_is_not_a_circle():
    image = Image.new("RGB", (128, 128), COLORS["blue"])
    ImageDraw.Draw(image).rounded_rectangle((34, 34, 94, 94), radius=18, fill=COLORS["red"])
    assert judge(image).shape != "circle"


def test_evaluator_does_not_see_shapes_in_noise():
    pixels = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert judge(Image.fromarray(pixels)).shape is None
    flat = judge(Image.new("RGB", (128, 128), COLORS["blue"]))
    assert flat.shape is None and flat.background == "blue"


def test_evaluator_ignores_a_stray_speckle_away_from_the_shape():
    """Decoders leave the odd off-colour pixel at a picture's edge; it must not widen the shape's bounding box."""
    rng = random.Random(4)
    for _ in range(30):
        scene = random_scene(rng)
        pixels = np.asarray(render(scene)).copy()
        corner = (
            (slice(124, 126), slice(2, 4)) if scene.position in ("right", "top") else (slice(2, 4), slice(124, 126))
        )
        pixels[corner] = COLORS[scene.color]  # a 2x2 speckle in the shape's colour, in a far corner
        judged = judge(Image.fromarray(pixels))
        assert (judged.shape, judged.color, judged.position) == (scene.shape, scene.color, scene.position), scene

import random

import numpy as np
from PIL import Image

from zstudio.demo.dataset import COLORS, all_scenes, random_scene, render
from zstudio.demo.evaluator import judge


def test_dataset_covers_every_combination_with_captions_in_both_languages():
    scenes = all_scenes()
    assert len(scenes) == 3 * 8 * 7 * 5 * 2
    scene = scenes[0]
    assert all(scene.color in c and scene.shape in c for c in scene.captions_en()[:1])
    assert any("背景" in c for c in scene.captions_zh())


def test_evaluator_reads_rendered_scenes():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(200)]
    judged = [judge(render(s)) for s in scenes]
    assert all(j.background == s.background for j, s in zip(judged, scenes))
    assert all(j.color == s.color for j, s in zip(judged, scenes))
    assert sum(j.shape == s.shape for j, s in zip(judged, scenes)) >= 196
    assert sum(j.position == s.position for j, s in zip(judged, scenes)) >= 196


def test_evaluator_survives_noise_like_a_decoder_leaves():
    rng = random.Random(1)
    noise = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(100)]
    right = 0
    for scene in scenes:
        pixels = np.asarray(render(scene), dtype=np.float32) + noise.normal(0, 12, (64, 64, 3))
        j = judge(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
        right += (j.shape, j.color, j.background) == (scene.shape, scene.color, scene.background)
    assert right >= 90


def test_evaluator_does_not_see_shapes_in_noise():
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    noise_judgement = judge(Image.fromarray(pixels))
    flat = judge(Image.new("RGB", (64, 64), COLORS["blue"]))
    assert flat.shape is None and flat.background == "blue"
    assert noise_judgement.area > 0.3  # noise is judged as noise-covered, not as a clean shape


def test_evaluator_reads_blurred_scenes_like_a_small_decoder_draws():
    """A blurred edge must not change the shape class: the mask splits edge pixels at the colours' midpoint."""
    from PIL import ImageFilter

    rng = random.Random(3)
    scenes = [random_scene(rng) for _ in range(100)]
    judged = [judge(render(s).filter(ImageFilter.GaussianBlur(1.5))) for s in scenes]
    assert (
        sum((j.shape, j.color, j.background) == (s.shape, s.color, s.background) for j, s in zip(judged, scenes)) >= 95
    )


def test_evaluator_ignores_a_stray_speckle_away_from_the_shape():
    """Decoders leave the odd off-colour pixel at a picture's edge; it must not widen the shape's bounding box."""
    rng = random.Random(4)
    scenes = [random_scene(rng) for _ in range(50)]
    for scene in scenes:
        pixels = np.asarray(render(scene)).copy()
        pixels[0:2, 60:62] = COLORS[scene.color]  # a 2x2 speckle in the shape's colour, in the top-right corner
        if scene.position in ("right", "top"):
            pixels[0:2, 60:62] = COLORS[scene.background]
            pixels[62:64, 0:2] = COLORS[scene.color]
        judged = judge(Image.fromarray(pixels))
        assert (judged.shape, judged.color, judged.position) == (scene.shape, scene.color, scene.position), scene

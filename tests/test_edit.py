"""Editing a picture: image-to-image, inpainting and outpainting.

The tiny checkpoint holds the engine to diffusers' ZImageImg2ImgPipeline and ZImageInpaintPipeline (CPU, float32); the
trained demo model shows the edits do what they say (a colour changes, kept pixels stay); bad files are refused in one
line before any model work.
"""

import hashlib
import io
import json
import re
import shlex
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline
from PIL import Image, ImageDraw

from zstudio import GenerationCancelled, GenerationParams, Generator, edit
from zstudio.cli import main
from zstudio.demo.dataset import Scene, render
from zstudio.demo.evaluator import judge
from zstudio.outputs import read_metadata
from zstudio.params import ParamError

PROMPT = "a green circle on a blue background"


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def noise_image(path: Path, width: int, height: int, seed: int = 0) -> str:
    """A source with detail everywhere, so a kept or lost pixel shows."""
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def box_mask(path: Path, width: int, height: int, box: tuple[int, int, int, int]) -> str:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    mask.save(path)
    return str(path)


def far_from(mask: np.ndarray, distance: int) -> np.ndarray:
    """Pixels more than `distance` px (Chebyshev) away from every white mask pixel: beyond the blended edge."""
    ys, xs = np.nonzero(mask)
    far = np.ones(mask.shape, dtype=bool)
    far[
        max(ys.min() - distance, 0) : ys.max() + distance + 1, max(xs.min() - distance, 0) : xs.max() + distance + 1
    ] = 0
    return far


def count_transformer_calls(pipe) -> list[int]:
    calls = []
    pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    return calls


# --------------------------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_image_to_image_matches_diffusers_img2img_pipeline(generator, tmp_path, cfg):
    source = noise_image(tmp_path / "source.png", 136, 100)  # not multiples of 16: cropped to 128x96
    params = GenerationParams(prompt="a red circle", negative_prompt="blurry", image=source, strength=0.7,
                              num_inference_steps=4, cfg_scale=cfg, seed=11, num_images=2)  # fmt: skip
    ours = generator.generate_images(params)
    canvas = edit.validate(params).image
    pipe = ZImageImg2ImgPipeline(**generator.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    calls = count_transformer_calls(pipe)
    for mine, seed in zip(ours.images, ours.seeds):
        # One call per seed: diffusers' batch draws every image's VAE sample from the first generator, so a batch
        # image could not be re-made alone; the engine gives each image its own seed, and matches this call.
        calls.clear()
        theirs = pipe(prompt=params.prompt, negative_prompt=params.negative_prompt, image=canvas, strength=0.7,
                      num_inference_steps=4, guidance_scale=cfg,
                      generator=torch.Generator("cpu").manual_seed(seed)).images[0]  # fmt: skip
        assert mine.size == theirs.size == (128, 96)
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1
    assert ours.metadata[0]["transformer_evaluations"] == len(calls) == 3  # int(4 - 4 x 0.7) = 1 step skipped
    assert np.abs(pixels(ours.images[0]) - pixels(canvas)).mean() > 10  # it did repaint


def test_inpainting_matches_diffusers_inpaint_pipeline_with_its_overlay(generator, tmp_path):
    source = noise_image(tmp_path / "source.png", 128, 128)
    mask = box_mask(tmp_path / "mask.png", 128, 128, (32, 40, 95, 100))
    params = GenerationParams(prompt="a red circle", image=source, mask=mask, strength=0.8, mask_blur=3,
                              num_inference_steps=4, cfg_scale=0.0, seed=3, num_images=2)  # fmt: skip
    ours = generator.generate_images(params)
    prepared = edit.validate(params)
    pipe = ZImageInpaintPipeline(**generator.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    calls = count_transformer_calls(pipe)
    for mine, seed in zip(ours.images, ours.seeds):
        calls.clear()
        theirs = pipe(prompt=params.prompt, image=prepared.image, mask_image=prepared.mask, strength=0.8,
                      num_inference_steps=4, guidance_scale=0.0,
                      generator=torch.Generator("cpu").manual_seed(seed)).images[0]  # fmt: skip
        # The pipeline returns the whole decoded picture; the pixels outside the mask are put back with diffusers'
        # own overlay and blur, as its Stable Diffusion inpainting documents.
        processor = pipe.image_processor
        theirs = processor.apply_overlay(processor.blur(prepared.mask, 3), prepared.image, theirs)
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1
    assert ours.metadata[0]["transformer_evaluations"] == len(calls) == 4  # int(4 - 4 x 0.8) = 0 steps skipped


# --------------------------------------------------------------------------------------------- behaviour
def test_inpainting_keeps_every_pixel_outside_the_blended_edge(generator, tmp_path):
    source = noise_image(tmp_path / "source.png", 128, 96)
    mask_path = box_mask(tmp_path / "mask.png", 128, 96, (40, 30, 80, 60))
    mask = np.asarray(Image.open(mask_path)) > 0
    for blur in (0, 4):
        image = generator.generate_images(GenerationParams(prompt="x", image=source, mask=mask_path, mask_blur=blur,
                                                           num_inference_steps=2, seed=1)).images[0]  # fmt: skip
        diff = np.abs(pixels(image) - pixels(Image.open(source))).max(axis=2)
        assert diff[far_from(mask, 3 * blur)].max() == 0  # the source itself, not a VAE round trip of it
        assert diff[mask].mean() > 20  # inside, repainted (strength 1.0 by default with a mask)
        if blur:
            assert 0 < diff[~mask & ~far_from(mask, 3 * blur)].mean() < diff[mask].mean()  # the soft edge


def test_outpainting_extends_the_canvas_and_keeps_the_original(generator, tmp_path):
    source = noise_image(tmp_path / "source.png", 96, 64)
    result = generator.generate_images(GenerationParams(prompt="x", image=source, outpaint={"left": 32, "top": 16},
                                                        num_inference_steps=2, seed=2))  # fmt: skip
    image = pixels(result.images[0])
    assert image.shape == (80, 128, 3)
    kept = image[16 + 12 :, 32 + 12 :]  # beyond the blend edge (3 x the default blur of 4)
    assert np.array_equal(kept, pixels(Image.open(source))[12:, 12:])
    replicated = np.repeat(pixels(Image.open(source))[:1, :1], 16, axis=0)  # what the new area started from
    assert np.abs(image[:16, :32] - replicated[:, :1]).mean() > 10
    assert result.metadata[0]["edit"]["mode"] == "outpaint" and result.params.strength == 1.0


def test_transparent_pixels_are_the_mask_and_opaque_images_are_image_to_image(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (200, 30, 30, 255))
    ImageDraw.Draw(rgba).rectangle((16, 16, 47, 31), fill=(0, 0, 0, 0))
    rgba.save(tmp_path / "hole.png")
    prepared = edit.validate(GenerationParams(prompt="x", image=str(tmp_path / "hole.png")))
    mask = np.asarray(prepared.mask) > 0
    assert mask.sum() == 32 * 16 and mask[16:32, 16:48].all()  # transparent = repaint
    assert prepared.recipe["mask"] == {"from": "alpha"} and prepared.params.strength == 1.0
    Image.new("RGBA", (64, 64), (1, 2, 3, 255)).save(tmp_path / "opaque.png")
    prepared = edit.validate(GenerationParams(prompt="x", image=str(tmp_path / "opaque.png")))
    assert prepared.mask is None and prepared.recipe["mode"] == "image-to-image" and prepared.params.strength == 0.6


def test_size_rule_crops_to_multiples_of_16_or_scales_to_cover_never_stretching(tmp_path):
    source = Image.open(noise_image(tmp_path / "s.png", 270, 203))
    own = edit.validate(GenerationParams(prompt="x", image=str(tmp_path / "s.png")))
    assert own.image.size == (256, 192)  # rounded down, centre-cropped: 14 px off the width, 11 off the height
    assert np.array_equal(pixels(own.image), pixels(source)[5 : 5 + 192, 7 : 7 + 256])
    assert own.recipe["fit"] == "crop"
    wide = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (128, 1)))
    wide.convert("RGB").save(tmp_path / "wide.png")  # 256x128, a horizontal ramp
    square = edit.validate(GenerationParams(prompt="x", image=str(tmp_path / "wide.png"), width=64, height=64))
    expected = wide.convert("RGB").resize((128, 64), Image.Resampling.LANCZOS).crop((32, 0, 96, 64))
    assert np.array_equal(pixels(square.image), pixels(expected))  # scaled by 1/2 both ways, then the centre
    assert square.recipe["fit"] == "scale and crop"
    tall = edit.validate(GenerationParams(prompt="x", image=str(tmp_path / "wide.png"), height=64))
    assert tall.image.size == (128, 64)  # one side given: the other keeps the aspect


def test_pil_images_work_through_the_python_api_and_remake_from_their_files(generator, tmp_path):
    source = Image.open(noise_image(tmp_path / "s.png", 64, 64)).copy()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    paths, _, summary = generator.generate(prompt="x", image=source, mask=mask, strength=0.9, num_inference_steps=2,
                                           seed=4, output_dir=tmp_path / "out")  # fmt: skip
    params = summary["params"]
    assert Path(params["image"]).parent == generator.settings.cache_dir / "inputs"
    assert np.array_equal(pixels(Image.open(params["image"])), pixels(source))
    again, _, _ = generator.generate(**{k: v for k, v in params.items()}, output_dir=tmp_path / "again")
    assert np.array_equal(pixels(Image.open(paths[0])), pixels(Image.open(again[0])))
    assert json.loads(json.dumps(summary))["params"]["mask"] == params["mask"]  # parameters stay JSON


def test_each_edited_image_of_a_batch_can_be_remade_alone(generator, tmp_path):
    source = noise_image(tmp_path / "s.png", 64, 64)
    batch = generator.generate_images(GenerationParams(prompt="x", image=source, num_inference_steps=3, seed=20,
                                                       num_images=3))  # fmt: skip
    alone = generator.generate_images(GenerationParams(prompt="x", image=source, num_inference_steps=3, seed=22))
    assert np.abs(pixels(batch.images[2]) - pixels(alone.images[0])).max() <= 1  # as text-to-image's batches
    assert not np.array_equal(pixels(batch.images[0]), pixels(batch.images[1]))


def test_progress_counts_the_steps_an_edit_runs_and_cancel_stops_it(generator, tmp_path):
    source = noise_image(tmp_path / "s.png", 64, 64)
    seen = []
    generator.generate_images(GenerationParams(prompt="x", image=source, strength=0.5, num_inference_steps=8, seed=1),
                              progress=lambda i, n: seen.append((i, n)))  # fmt: skip
    assert seen == [(i, 4) for i in range(1, 5)]

    def cancel(i, n):
        if i == 2:
            raise GenerationCancelled()

    with pytest.raises(GenerationCancelled):
        generator.generate_images(GenerationParams(prompt="x", image=source, num_inference_steps=8, seed=1),
                                  progress=cancel)  # fmt: skip


# ------------------------------------------------------------------------------------------ the CLI and show
def test_cli_edit_records_the_recipe_and_show_remakes_it(tiny_dir, tmp_path, monkeypatch):
    source = noise_image(tmp_path / "source.png", 80, 64)
    mask = box_mask(tmp_path / "mask.png", 80, 64, (10, 10, 40, 40))
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    args = ["edit", "source.png", "a red circle", "--mask", "mask.png", "--outpaint", "right=16", "--strength", "0.75",
            "--mask-blur", "2", "--steps", "4", "--seed", "9", "--model", str(tiny_dir), "--out", str(out),
            "--negative", "blurry", "--cfg", "1.5", "--cfg-normalization", "1.2", "--cfg-truncation", "0.9",
            "--max-tokens", "77"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    path = output_path(result.output)
    meta = read_metadata(path)
    assert Image.open(path).size == (96, 64)
    recipe = meta["edit"]
    assert recipe["source"] == {"sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest(), "width": 80,
                                "height": 64, "format": "PNG"}  # fmt: skip
    assert recipe["mask"] == {"from": "file", "sha256": hashlib.sha256(Path(mask).read_bytes()).hexdigest(),
                              "format": "PNG"}  # fmt: skip
    assert (recipe["strength"], recipe["outpaint"], meta["params"]["mask_blur"]) == (0.75, {"right": 16}, 2)
    assert meta["transformer_evaluations"] == 3  # int(4 - 4 x 0.75) = 1 step skipped
    assert "Denoising strength: 0.75" in Image.open(path).text["parameters"]

    assert meta["params"]["image"] == source  # recorded in full: the remake works from any folder
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    shown = CliRunner().invoke(main, ["show", str(path)])
    assert shown.exit_code == 0, shown.output
    assert recipe["source"]["sha256"] in shown.output and "outpaint         right=16" in shown.output
    assert "image sha256     " + recipe["source"]["sha256"] + " (80x64 PNG)" in shown.output
    assert "canvas           96x64, crop to 96x64" in shown.output and "cfg norm/trunc   1.2 / 0.9" in shown.output
    remake = shown.output.split("remake           ")[1].strip()
    # Every field of the recipe that differs from generate's defaults is in the remake, the ones without a
    # control in other doors too.
    for option in ('--negative "blurry"', "--cfg 1.5", "--cfg-normalization 1.2", "--cfg-truncation 0.9",
                   "--max-tokens 77"):  # fmt: skip
        assert option in remake
    redo = CliRunner().invoke(main, [*shlex.split(remake)[1:], "--model", str(tiny_dir), "--out", str(tmp_path / "r")])
    assert redo.exit_code == 0, redo.output
    assert np.array_equal(pixels(Image.open(path)), pixels(Image.open(output_path(redo.output))))


def output_path(output: str) -> Path:
    """The file a CLI run printed (stderr's loading bars share CliRunner's output)."""
    return Path(re.search(r"([^\s\]]+\.png)\tseed=", output).group(1))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: what a decompression bomb looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str, str]]:
    """name: (CLI arguments after `edit`, field, words of the message)."""
    good = noise_image(tmp / "good.png", 64, 64)
    (tmp / "notes.txt").write_text("not a picture")
    Image.new("RGB", (64, 64)).save(tmp / "anim.gif")
    (tmp / "bomb.png").write_bytes(png_claiming(8000, 8000))
    (tmp / "huge.png").write_bytes(png_claiming(20000, 20000))
    buffer = io.BytesIO()
    Image.open(good).save(buffer, format="PNG")
    (tmp / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.new("L", (32, 32), 255).save(tmp / "small_mask.png")
    Image.new("L", (64, 64), 0).save(tmp / "black_mask.png")
    Image.new("RGB", (40, 64)).save(tmp / "tiny.png")
    return {
        "not an image": (["notes.txt"], "image", "not a PNG, JPEG or WebP image"),
        "unsupported format": (["anim.gif"], "image", "not a PNG, JPEG or WebP image"),
        "missing": (["nowhere.png"], "image", "is not a file"),
        "over the pixel cap": (["bomb.png"], "image", "64.0 megapixels; at most 50 are accepted"),
        "over Pillow's bomb limit": (["huge.png"], "image", "decompression-bomb limit"),
        "truncated": (["cut.png"], "image", "could not be decoded"),
        "too small": (["tiny.png"], "image", "40x64 is too small"),
        "mask size": (["good.png", "--mask", "small_mask.png"], "mask", "is 32x32, the image 64x64"),
        "empty mask": (["good.png", "--mask", "black_mask.png"], "mask", "has no white pixel"),
        "strength": (["good.png", "--strength", "1.5"], "strength", "1.5 is outside 0-1"),
        "strength runs no step": (["good.png", "--strength", "0"], "strength", "runs no step"),
        "outpaint side": (["good.png", "--outpaint", "up=64"], "outpaint", "unknown side 'up'"),
        "outpaint syntax": (["good.png", "--outpaint", "left:64"], "outpaint", "is not SIDE=PIXELS"),
        "outpaint too large": (["good.png", "--outpaint", "left=2000"], "outpaint", "past the largest picture"),
        "mask blur": (["good.png", "--mask-blur", "-1"], "mask_blur", "outside 0-64"),
    }


BAD_CASES = ["not an image", "unsupported format", "missing", "over the pixel cap", "over Pillow's bomb limit",
             "truncated", "too small", "mask size", "empty mask", "strength", "strength runs no step",
             "outpaint side", "outpaint syntax", "outpaint too large", "mask blur"]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_refused_in_one_line_with_exit_2_and_no_output(tiny_dir, tmp_path, monkeypatch, case):
    cases = bad_inputs(tmp_path)
    assert list(cases) == BAD_CASES
    arguments, field, words = cases[case]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["edit", arguments[0], "x", *arguments[1:], "--model", str(tiny_dir),
                                       "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and f"error: {field}: " in result.output and words in result.output
    assert not out.exists() or not list(out.iterdir())


def test_bad_files_are_refused_before_the_weights_load(tiny_dir, tmp_path):
    generator = Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path)
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ParamError, match="image: notes.txt is not a PNG"):
        generator.generate_images(GenerationParams(prompt="x", image=str(tmp_path / "notes.txt")))
    assert generator.pipe is None


def test_input_caps_are_configurable(tmp_path):
    source = noise_image(tmp_path / "s.png", 64, 64)
    params = GenerationParams(prompt="x", image=source)
    with pytest.raises(ParamError, match="at most 0.004 are accepted"):
        edit.validate(params, max_input_pixels=4000)
    with pytest.raises(ParamError, match=r"MiB; at most 0.00\d+ MiB is accepted"):
        edit.validate(params, max_input_bytes=1000)


def test_edit_fields_are_checked_without_files():
    with pytest.raises(ParamError, match="mask: applies only to an edit"):
        GenerationParams(prompt="x", mask="m.png")
    with pytest.raises(ParamError, match="outpaint.left: -5 is outside"):
        GenerationParams(prompt="x", image="a.png", outpaint={"left": -5})
    p = GenerationParams(prompt="x", image="a.png", outpaint={"right": 32, "left": 0, "top": 16})
    assert p.outpaint == {"right": 32, "top": 16}  # canonical: no empty sides, in the documented order
    assert GenerationParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


# ----------------------------------------------------------------------------------------- the demo model
@pytest.fixture(scope="module")
def demo():
    return Generator(model="demo", device="cpu", dtype="float32").load()


@pytest.fixture(scope="module")
def red_circle(tmp_path_factory, demo):
    """The demo dataset's own drawing of "a red circle on a blue background", at the demo model's size."""
    path = tmp_path_factory.mktemp("demo") / "red_circle.png"
    render(Scene("circle", "red", "blue", "centre", "large"), side=demo.profile.width).save(path)
    return path


def edit_20_seeds(demo, **fields):
    images = []
    for first in (0, 8, 16):
        params = GenerationParams(prompt=PROMPT, seed=first, num_images=min(8, 20 - first), **fields)
        images += demo.generate_images(params).images
    return [judge(image) for image in images]


def test_demo_image_to_image_changes_the_colour_and_follows_the_source(demo, red_circle):
    """The issue's bar: at strength 0.6-0.8 the shape's colour changes and its position holds in at least 80% of 20
    seeds. Measured on demo model version 2 (128x128, 20 steps, CFG 3): 20/20 at 0.6, 0.7 and 0.8 (colour green,
    background blue, centred, a circle). Asserted at both ends of the range, with the issue's 16 of 20."""
    for strength in (0.6, 0.8):
        judged = edit_20_seeds(demo, image=str(red_circle), strength=strength)
        right = [j.color == "green" and j.background == "blue" and j.position == "centre" for j in judged]
        assert sum(right) >= 16, (strength, judged)


def test_demo_inpainting_repaints_only_inside_the_mask(demo, red_circle, tmp_path):
    side = demo.profile.width
    mask = box_mask(tmp_path / "mask.png", side, side, (side // 4 - 2, side // 4 - 2, 3 * side // 4 + 1,
                                                        3 * side // 4 + 1))  # fmt: skip
    inside = np.asarray(Image.open(mask)) > 0
    judged, outside = [], []
    for image in demo.generate_images(GenerationParams(prompt=PROMPT, image=str(red_circle), mask=mask, seed=0,
                                                       num_images=8, mask_blur=2)).images:  # fmt: skip
        diff = np.abs(pixels(image) - pixels(Image.open(red_circle)))
        outside.append(diff[far_from(inside, 6)].mean())
        judged.append(judge(image))
    assert max(outside) <= 2  # beyond the blend edge (3 x mask_blur): the source's pixels
    assert sum(j.color == "green" and j.background == "blue" for j in judged) >= 6  # measured: 8 of 8


def test_demo_outpainting_keeps_the_original_region(demo, red_circle):
    side = demo.profile.width
    result = demo.generate_images(GenerationParams(prompt=PROMPT, image=str(red_circle), outpaint={"right": side},
                                                   seed=0, num_images=4))  # fmt: skip
    for image in result.images:
        assert image.size == (2 * side, side)
        kept = np.abs(pixels(image)[:, : side - 12] - pixels(Image.open(red_circle))[:, : side - 12])
        assert kept.mean() <= 2
        assert judge(image.crop((side, 0, 2 * side, side))).background == "blue"  # the new area continues it


def test_strength_cuts_the_schedule_as_diffusers_get_timesteps_does(generator):
    """The engine's copy of diffusers' rounding (float products, int truncation) fails here the day diffusers'
    changes."""
    pipe = ZImageImg2ImgPipeline(**generator.pipe.components)
    for steps in (1, 4, 8, 9, 20, 50):
        pipe.scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=0.5)
        for strength in (0.0, 0.1, 0.3, 0.6, 0.7, 0.75, 0.8, 0.95, 1.0):
            _, runs = pipe.get_timesteps(steps, strength, "cpu")
            assert steps - edit.start_step(steps, strength) == runs, (steps, strength)


def test_edit_benchmark_times_each_kind_of_call_on_the_cpu(tiny_dir, tmp_path):
    """The GPU benchmark's own code path, on the tiny checkpoint: every kind of call runs and is reported."""
    from zstudio.bench.edit import main as bench_main

    report = bench_main(["--cpu-smoke", str(tiny_dir), "--size", "128x128", "--calls", "1", "--json",
                         str(tmp_path / "edit.json")])  # fmt: skip
    assert json.loads((tmp_path / "edit.json").read_text())["size"] == "128x128"
    evaluations = {key: report[key]["transformer_evaluations"] for key in
                   ("image_to_image", "inpaint", "inpaint_at_strength")}  # fmt: skip
    steps = report["text_to_image"]["transformer_evaluations"]
    cut = steps - int(steps - steps * 0.6)  # diffusers' get_timesteps: the last strength x steps of the schedule
    assert evaluations == {"image_to_image": cut, "inpaint": steps, "inpaint_at_strength": cut}


def test_image_pixels_are_diffusers_image_processor_output():
    """The VAE's input made on the device (uint8 across, then x / 255 · 2 − 1) equals diffusers' VaeImageProcessor
    output exactly, for RGB and for a picture that needs converting."""
    from diffusers.image_processor import VaeImageProcessor

    from zstudio.edit import image_pixels

    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    for picture in (rgb, rgb.convert("L").convert("RGB"), Image.fromarray(rng.integers(0, 256, (48, 80), np.uint8))):
        expected = VaeImageProcessor(vae_scale_factor=8).preprocess(picture.convert("RGB")).float()
        got = image_pixels(picture)
        assert got.shape == (1, 3, 48, 80) and got.is_contiguous() and got.dtype == torch.float32
        assert torch.equal(got, expected)

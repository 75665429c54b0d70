"""ControlNet (zstudio.control and the engine's control steps) on the tiny checkpoint's tiny ControlNet, CPU fp32."""

import cv2
import numpy as np
import pytest
import torch
from diffusers import ZImageControlNetModel, ZImageControlNetPipeline
from PIL import Image, ImageDraw

from zstudio import GenerationParams, Generator, control
from zstudio.params import CONTROL_TYPES, ParamError
from zstudio.tiny import CONTROLNET_FOLDER

SIZE = {"width": 128, "height": 128, "num_inference_steps": 3}


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def shape_file(tmp_path_factory):
    """A rendered shape (a white disc and a grey bar on black), larger than the output and of another aspect."""
    image = Image.new("RGB", (192, 160), "black")
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 30, 130, 120), fill="white")
    draw.rectangle((140, 20, 170, 140), fill=(128, 128, 128))
    path = tmp_path_factory.mktemp("control") / "shape.png"
    image.save(path)
    return path


@pytest.fixture(scope="module")
def controlled(tiny_dir, tmp_path_factory):
    return Generator(model=str(tiny_dir), device="cpu", controlnet=str(tiny_dir / CONTROLNET_FOLDER),
                     outputs=tmp_path_factory.mktemp("outputs")).load()  # fmt: skip


def run(generator, **kw):
    return generator.generate_images(GenerationParams(prompt="a red circle", seed=7, **SIZE, **kw))


def reference_pipeline(cls, generator, tiny_dir):
    """diffusers' own ControlNet pipeline `cls` over the generator's components and the tiny ControlNet's file."""
    pipe = generator.pipe
    reference = cls(
        scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        transformer=pipe.transformer,
        controlnet=ZImageControlNetModel.from_pretrained(tiny_dir / CONTROLNET_FOLDER, torch_dtype=torch.float32),
    )  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_pixels_match_diffusers_controlnet_pipeline(controlled, tiny_dir, shape_file, cfg):
    params = GenerationParams(prompt="a red circle", negative_prompt="blurry", seed=11, num_images=2, cfg_scale=cfg,
                              control=str(shape_file), control_scale=0.9, **SIZE)  # fmt: skip
    ours = controlled.generate_images(params)
    reference = reference_pipeline(ZImageControlNetPipeline, controlled, tiny_dir)
    fitted = control.validate(params, controlled.controlnet_source, 128, 128).image
    images = reference(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=128,
        height=128,
        num_inference_steps=3,
        guidance_scale=cfg,
        control_image=fitted,
        controlnet_conditioning_scale=0.9,
        num_images_per_prompt=2,
        latents=controlled.prepare_latents(ours.seeds, 128, 128),
    ).images
    without = run(controlled, negative_prompt="blurry", num_images=2, cfg_scale=cfg)
    for mine, theirs, plain in zip(ours.images, images, without.images):
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1
        assert np.abs(pixels(mine) - pixels(plain)).max() > 8  # the ControlNet changed the picture


def test_scale_zero_gives_the_pixels_without_control(controlled, shape_file):
    plain = run(controlled)
    zero = run(controlled, control=str(shape_file), control_scale=0.0)
    assert np.array_equal(pixels(plain.images[0]), pixels(zero.images[0]))


def test_a_range_covering_no_step_is_refused_and_a_partial_one_applies(controlled, shape_file):
    """With 3 steps, control from 0.9 to 1 covers no whole step (diffusers' rule): refused in one line rather than
    run without control; 0.3-0.7 covers the middle step and changes the picture."""
    assert [control.active(GenerationParams(prompt="x", control="c", control_start=0.3), i, 3) for i in range(3)] == [
        False, True, True]  # fmt: skip
    with pytest.raises(ParamError) as err:
        run(controlled, control=str(shape_file), control_start=0.9)
    assert err.value.field == "control_start" and "covers none of the 3 steps" in str(err.value)
    middle = run(controlled, control=str(shape_file), control_start=0.3, control_end=0.7)
    assert not np.array_equal(pixels(middle.images[0]), pixels(run(controlled).images[0]))
    # An edit runs the schedule's tail: at strength 0.3 of 3 steps only the last runs, which 0-0.5 misses.
    with pytest.raises(ParamError, match="covers none of the 1 steps"):
        run(controlled, image=str(shape_file), strength=0.3, control=str(shape_file), control_end=0.5)


@pytest.mark.parametrize("layout", ["folder", "single file"])
def test_inpainting_with_a_controlnet_without_inpaint_channels_is_refused_before_loading(tiny_dir, shape_file,
                                                                                        tmp_path, layout):  # fmt: skip
    """A Union 1.0-style ControlNet (16 input channels) cannot take the inpainting channels: said at validation, from
    its config.json or its safetensors header, before any weights load."""
    torch.manual_seed(0)
    reference = ZImageControlNetModel.from_pretrained(tiny_dir / CONTROLNET_FOLDER)
    config = {k: reference.config[k] for k in ("dim", "n_refiner_layers", "n_heads", "n_kv_heads")}
    ZImageControlNetModel(control_layers_places=[0], control_in_dim=16, **config).save_pretrained(tmp_path / "v1")
    spec = tmp_path / "v1"
    if layout == "single file":
        spec = tmp_path / "v1" / "diffusion_pytorch_model.safetensors"
        (tmp_path / "v1" / "config.json").unlink()
    assert control.control_in_dim(control.resolve(str(spec))) == 16
    generator = Generator(model=str(tiny_dir), device="cpu", controlnet=str(spec))
    mask = tmp_path / "mask.png"
    Image.new("L", Image.open(shape_file).size, 255).save(mask)
    with pytest.raises(ParamError) as err:
        generator.generate_images(GenerationParams(prompt="x", **SIZE, image=str(shape_file), mask=str(mask),
                                                   control=str(shape_file)))  # fmt: skip
    assert err.value.field == "mask" and "control_in_dim 33" in str(err.value) and "has 16" in str(err.value)
    # The same through the picture's transparency alone (no mask file): also refused before loading.
    see_through = Image.open(shape_file).convert("RGBA")
    see_through.putalpha(Image.new("L", see_through.size, 0))
    see_through.save(tmp_path / "alpha.png")
    with pytest.raises(ParamError) as err:
        generator.generate_images(GenerationParams(prompt="x", **SIZE, image=str(tmp_path / "alpha.png"),
                                                   control=str(shape_file)))  # fmt: skip
    assert err.value.field == "mask" and "has 16" in str(err.value)
    assert generator.pipe is None


def test_canny_matches_opencv_on_a_rendered_shape(shape_file):
    params = GenerationParams(prompt="x", control=str(shape_file), control_preprocess="canny")
    got = control.validate(params, control.ControlNetSource("union", shape_file, None, control.UNION_TYPES), 128, 128)
    fitted = Image.open(shape_file).resize((154, 128), Image.Resampling.LANCZOS).crop((13, 0, 141, 128))
    expected = cv2.Canny(np.asarray(fitted.convert("L")), 100, 200)
    assert got.image.size == (128, 128)
    assert np.array_equal(np.asarray(got.image)[..., 0], expected)
    assert expected.max() == 255 and (expected > 0).mean() < 0.2  # edges, not a filled picture
    assert got.recipe["preprocessor"] == "canny" and got.recipe["source_sha256"] != got.recipe["sha256"]


def test_metadata_records_the_control_recipe(controlled, shape_file):
    import hashlib

    result = run(controlled, control=str(shape_file), control_type="canny", control_scale=0.5, control_end=0.8)
    recipe = result.metadata[0]["control"]
    assert recipe["sha256"] == hashlib.sha256(shape_file.read_bytes()).hexdigest()
    assert (recipe["type"], recipe["scale"], recipe["start"], recipe["end"]) == ("canny", 0.5, 0.0, 0.8)
    assert recipe["controlnet"].endswith(CONTROLNET_FOLDER)
    assert result.metadata[0]["params"]["control"] == str(shape_file.resolve())


def test_control_combines_with_image_to_image(controlled, shape_file):
    edited = run(controlled, control=str(shape_file), image=str(shape_file), strength=0.6)
    assert edited.metadata[0]["edit"]["mode"] == "image-to-image" and "control" in edited.metadata[0]


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_inpainting_with_control_matches_diffusers_controlnet_inpaint_pipeline(controlled, tiny_dir, shape_file,
                                                                             tmp_path, cfg):  # fmt: skip
    from diffusers import ZImageControlNetInpaintPipeline

    picture = Image.new("RGB", (128, 128), (40, 90, 160))
    ImageDraw.Draw(picture).rectangle((10, 70, 118, 110), fill=(200, 180, 40))
    picture.save(tmp_path / "picture.png")
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 16, 96, 80))
    mask.save(tmp_path / "mask.png")
    params = GenerationParams(prompt="a red circle", negative_prompt="blurry", seed=11, cfg_scale=cfg, mask_blur=0,
                              image=str(tmp_path / "picture.png"), mask=str(tmp_path / "mask.png"),
                              control=str(shape_file), control_scale=0.9, **SIZE)  # fmt: skip
    ours = controlled.generate_images(params)
    assert ours.metadata[0]["edit"]["mode"] == "inpaint" and "control" in ours.metadata[0]
    reference = reference_pipeline(ZImageControlNetInpaintPipeline, controlled, tiny_dir)
    fitted = control.validate(params, controlled.controlnet_source, 128, 128).image
    theirs = reference(
        prompt=params.prompt, negative_prompt=params.negative_prompt, width=128, height=128, num_inference_steps=3,
        guidance_scale=cfg, image=picture, mask_image=mask, control_image=fitted, controlnet_conditioning_scale=0.9,
        latents=controlled.prepare_latents(ours.seeds, 128, 128),
    ).images[0]  # fmt: skip
    from diffusers.image_processor import VaeImageProcessor

    theirs = VaeImageProcessor().apply_overlay(mask, picture, theirs)  # ours pastes the kept area back
    assert np.abs(pixels(ours.images[0]) - pixels(theirs)).max() <= 1
    inside = np.asarray(mask) > 0
    assert np.abs(pixels(ours.images[0]) - pixels(picture))[inside].max() > 8  # the masked area was repainted


def test_inpainting_with_control_below_full_strength_starts_from_the_picture(controlled, shape_file):
    half = run(controlled, control=str(shape_file), image=str(shape_file), outpaint={"left": 64}, strength=0.5)
    full = run(controlled, control=str(shape_file), image=str(shape_file), outpaint={"left": 64})
    assert half.metadata[0]["transformer_evaluations"] < full.metadata[0]["transformer_evaluations"]
    assert not np.array_equal(pixels(half.images[0]), pixels(full.images[0]))


def test_controlnet_loads_from_a_single_file_and_refuses_a_missing_repo(tiny_dir):
    file = tiny_dir / CONTROLNET_FOLDER / "diffusion_pytorch_model.safetensors"
    source = control.resolve(str(file))
    assert source.config == file.parent
    generator = Generator(model=str(tiny_dir), device="cpu", controlnet=str(file)).load()
    reference = ZImageControlNetModel.from_pretrained(file.parent)
    loaded = dict(generator.controlnet.named_parameters())
    assert all(torch.equal(loaded[name], value) for name, value in reference.named_parameters())
    with pytest.raises(ParamError) as err:
        control.resolve("nobody-here/no-such-controlnet")  # tests run offline (HF_HUB_OFFLINE=1)
    assert "not in the Hugging Face cache" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"control": "NOTANIMAGE"}, "control", "not a PNG"),
        ({"control_type": "scribble"}, "control_type", "not a type ControlNet"),
        ({"control_preprocess": "depth"}, "control_preprocess", "preprocessor depth needs"),
    ],
)
def test_bad_control_is_refused_before_anything_loads(tiny_dir, shape_file, tmp_path, fields, field, words):
    if fields.get("control") == "NOTANIMAGE":
        (tmp_path / "notes.png").write_text("not an image")
        fields = {"control": str(tmp_path / "notes.png")}
    generator = Generator(model=str(tiny_dir), device="cpu", controlnet=str(tiny_dir / CONTROLNET_FOLDER))
    with pytest.raises(ParamError) as err:
        generator.generate_images(GenerationParams(prompt="x", **SIZE, **{"control": str(shape_file), **fields}))
    assert err.value.field == field and words in str(err.value) and "\n" not in str(err.value)
    assert generator.pipe is None  # refused before the weights loaded


def test_control_without_a_controlnet_is_refused(generator, shape_file):
    with pytest.raises(ParamError, match="needs a ControlNet"):
        run(generator, control=str(shape_file))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"control_scale": 2.5}, "control_scale"),
        ({"control_scale": float("nan")}, "control_scale"),
        ({"control_start": 0.6, "control_end": 0.5}, "control_start"),
        ({"control_type": "sketchy"}, "control_type"),
        ({"control_preprocess": True}, "control_preprocess"),  # no type to preprocess for
        ({"control": None, "control_type": "canny"}, "control_type"),
    ],
)
def test_parameters_refuse_out_of_range_control(fields, field):
    with pytest.raises(ParamError) as err:
        GenerationParams(prompt="x", **{"control": "c.png", **fields})
    assert err.value.field == field


def test_every_control_type_has_a_preprocessor_entry():
    assert set(CONTROL_TYPES) == {"none", *control.PREPROCESSORS}
    runnable = [name for name, p in control.PREPROCESSORS.items() if p.run is not None]
    assert runnable == ["canny", "depth", "hed", "mlsd", "lineart", "pose"]  # scribble and tile: no Union condition


def test_cli_generates_with_control_and_show_prints_the_recipe(tiny_dir, shape_file, tmp_path):
    from click.testing import CliRunner

    from zstudio.cli import main

    runner = CliRunner()
    args = ["generate", "a red circle", "--model", str(tiny_dir), "--device", "cpu", "--size", "64x64", "--steps",
            "2", "--seed", "3", "--out", str(tmp_path), "--controlnet", str(tiny_dir / CONTROLNET_FOLDER),
            "--control", str(shape_file), "--control-type", "canny", "--control-preprocess", "--control-scale",
            "0.7", "--control-end", "0.5"]  # fmt: skip
    made = runner.invoke(main, args)
    assert made.exit_code == 0, made.output
    shown = runner.invoke(main, ["show", made.stdout.split("\t")[0]])
    assert "made by preprocessor canny" in shown.stdout and "control scale    0.7, steps 0-0.5" in shown.stdout
    assert "--control-type canny --control-scale 0.7 --control-start 0 --control-end 0.5 --control-preprocess" in (
        shown.stdout)  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--control-scale", "3"], "control_scale: 3.0 is outside 0-2"),
        (["--control-type", "tile"], "control_type: 'tile' is not a type"),
        (["--control-type", "pose", "--control-preprocess"], "preprocessor pose needs"),
        (["--controlnet", ""], "control: needs a ControlNet"),
    ],
)
def test_cli_refuses_bad_control_in_one_line_with_exit_2(tiny_dir, shape_file, tmp_path, extra, words):
    from click.testing import CliRunner

    from zstudio.cli import main

    args = ["generate", "x", "--model", str(tiny_dir), "--device", "cpu", "--size", "64x64", "--out", str(tmp_path),
            "--controlnet", str(tiny_dir / CONTROLNET_FOLDER), "--control", str(shape_file), *extra]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and words in result.output and len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing ran, nothing saved


def test_control_over_http_by_upload_name_and_never_a_path(tiny_dir, shape_file, tmp_path):
    """The native API takes the control image by an upload's or an output's name, like `image`; a server path is a
    422 naming the field, and a server without a ControlNet refuses control before queueing."""
    import hashlib

    from helpers import Running, wait_done
    from zstudio.outputs import read_metadata
    from zstudio.server.app import create_app

    generator = Generator(model=str(tiny_dir), device="cpu", controlnet=str(tiny_dir / CONTROLNET_FOLDER))
    with Running(create_app(generator.load(), tmp_path / "outputs", state=tmp_path / "state", ui=False)) as client:
        body = {"prompt": "a red circle", "seed": 7, **SIZE, "control_scale": 0.9}
        files = {"control": ("shape.png", shape_file.read_bytes(), "image/png")}
        import json

        job = client.post("/api/v1/generations", data={"params": json.dumps(body)}, files=files).json()
        done = wait_done(client, job["id"])
        assert done["status"] == "done", done
        sha = hashlib.sha256(shape_file.read_bytes()).hexdigest()
        record = read_metadata(tmp_path / "outputs" / done["outputs"][0])
        assert record["control"]["sha256"] == sha and record["params"]["control"] == f"{sha}.png"
        refused = client.post("/api/v1/generations", json={**body, "control": str(shape_file)})
        assert refused.status_code == 422 and "control" in refused.text
    plain = Generator(model=str(tiny_dir), device="cpu")
    with Running(create_app(plain.load(), tmp_path / "out2", state=tmp_path / "state2", ui=False)) as client:
        name = done["outputs"][0]
        (tmp_path / "out2").mkdir(exist_ok=True)
        (tmp_path / "out2" / name).write_bytes((tmp_path / "outputs" / name).read_bytes())
        refused = client.post("/api/v1/generations", json={**body, "control": name})
        assert refused.status_code == 422 and "control" in refused.text, refused.text
        assert client.get("/api/v1/history").json()["total"] == 0


def test_controlnet_demo_names_the_shipped_canny_controlnet():
    from zstudio import control as control_module

    source = control_module.resolve("demo")
    assert source.path == control_module.DEMO and (source.path / "config.json").is_file()
    assert "canny" in control_module._types(source.path)

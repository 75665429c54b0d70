"""The A1111 API's ControlNet field (alwayson_scripts.controlnet, the sd-webui-controlnet extension's) over real HTTP,
with the real `webuiapi` client and its ControlNetUnit, on the tiny checkpoint and its tiny ControlNet."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageDraw

from helpers import Running
from zstudio.engine import Generator
from zstudio.server.app import create_app
from zstudio.tiny import CONTROLNET_FOLDER

QUICK = {"steps": 2, "cfg_scale": 0, "width": 128, "height": 128, "seed": 5}


def fresh() -> dict:
    """webuiapi writes its ControlNet units into its `alwayson_scripts={}` default, shared by every later call of the
    process (a mutable default argument): each call here passes its own dict."""
    return {"alwayson_scripts": {}}


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    generator = Generator(model=str(tiny_dir), device="cpu", controlnet=str(tiny_dir / CONTROLNET_FOLDER)).load()
    root = tmp_path_factory.mktemp("a1111-control")
    runner = Running(create_app(generator, root / "outputs", state=root / "state", ui=False))
    client = runner.__enter__()
    yield runner, client
    runner.__exit__(None, None, None)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    image = Image.new("RGB", (128, 128), "black")
    ImageDraw.Draw(image).ellipse((30, 30, 100, 100), fill="white")
    return image


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def record(image: Image.Image) -> dict:
    return json.loads(image.text["zstudio"]) if "zstudio" in image.text else {}


def test_webuiapi_controlnet_unit_draws_with_canny_control(served, picture):
    runner, _ = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=runner.port, sampler="Euler")
    unit = webuiapi.ControlNetUnit(image=picture, module="canny", model="union", weight=0.8, guidance_start=0.0,
                                   guidance_end=0.5, threshold_a=100, threshold_b=200, resize_mode="Crop and Resize",
                                   pixel_perfect=True)  # fmt: skip
    controlled = api.txt2img(prompt="a disc", controlnet_units=[unit], **QUICK, **fresh())
    plain = api.txt2img(prompt="a disc", **QUICK, **fresh())
    assert controlled.info["ignored"] == []
    params = controlled.images[0].text["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: ' in params
    assert "Weight: 0.8, Guidance Start: 0, Guidance End: 0.5" in params
    assert record(controlled.images[0])["control"]["type"] == "canny"
    diff = np.abs(np.asarray(controlled.image).astype(int) - np.asarray(plain.image).astype(int)).max()
    assert diff > 8  # the control changed the picture


def test_unit_settings_that_differ_are_reported_and_bad_units_refused(served, picture):
    runner, client = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=runner.port, sampler="Euler")
    unit = webuiapi.ControlNetUnit(image=picture, module="canny", weight=0.5)  # webuiapi's defaults: 64/64, 512 px
    result = api.txt2img(prompt="a disc", controlnet_units=[unit], **QUICK, **fresh())
    names = [line.split(":")[0].rsplit(".", 1)[-1] for line in result.info["ignored"]]
    assert names == ["threshold_a", "processor_res", "resize_mode"]
    body = {"prompt": "x", **QUICK, "alwayson_scripts": {"controlnet": {"args": [
        {"image": b64(picture), "module": "canny"}, {"image": b64(picture), "module": "none"}]}}}  # fmt: skip
    cases = [
        (body, "2 units are enabled"),
        ({**body, "alwayson_scripts": {"controlnet": {"args": [{"image": b64(picture), "module": "depth_midas"}]}}},
         "preprocessor depth needs"),
        ({**body, "alwayson_scripts": {"controlnet": {"args": [{"image": b64(picture), "module": "reference_only"}]}}},
         "not a preprocessor this server knows"),
        ({**body, "alwayson_scripts": {"controlnet": {"args": [{"module": "canny", "weight": 3}]}}},
         "give the control picture"),
        ({**body, "alwayson_scripts": {"controlnet": {"args": [{"image": b64(picture), "weight": 3}]}}},
         "alwayson_scripts.controlnet.args.weight"),
    ]  # fmt: skip
    for request, words in cases:
        r = client.post("/sdapi/v1/txt2img", json=request)
        assert r.status_code == 422 and words in r.text, r.text


def test_img2img_unit_without_an_image_uses_the_init_image(served, picture):
    _, client = served
    body = {"prompt": "a disc", **QUICK, "init_images": [b64(picture)], "denoising_strength": 0.8,
            "alwayson_scripts": {"ControlNet": {"args": [{"module": "none", "model": "canny-union", "weight": 0.7,
                                                          "enabled": True}, {"enabled": False}]}}}  # fmt: skip
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    recipe = record(image)["control"]
    assert (recipe["type"], recipe["scale"], "preprocessor" in recipe) == ("canny", 0.7, False)  # type from `model`
    assert record(image)["edit"]["mode"] == "image-to-image"

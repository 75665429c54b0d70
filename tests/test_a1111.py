"""The AUTOMATIC1111 API (/sdapi/v1) over real HTTP, with the real `webuiapi` client and Open WebUI's request shape,
on the tiny checkpoint on the CPU."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import pytest
import webuiapi
from PIL import Image

from helpers import TOKEN, Running, wait_for
from zstudio.engine import Generator
from zstudio.server.app import create_app

QUICK = {"steps": 1, "cfg_scale": 0}
LONG = {"prompt": "x", "width": 1024, "height": 1024, "steps": 100}  # many seconds on the CPU; always cancelled


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    root = tmp_path_factory.mktemp("a1111")
    runner = Running(create_app(generator, root / "outputs", state=root / "state", ui=False))
    client = runner.__enter__()
    yield runner, client
    runner.__exit__(None, None, None)


def ignored_names(info: dict) -> list[str]:
    return [line.split(":")[0] for line in info["ignored"]]


def test_webuiapi_txt2img_gives_batch_size_times_n_iter_images_with_their_seeds(served):
    runner, _ = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=runner.port)
    result = api.txt2img(prompt="红色圆形", width=128, height=64, seed=7, batch_size=2, n_iter=2, **QUICK)
    assert [image.size for image in result.images] == [(128, 64)] * 4
    assert result.info["seed"] == 7 and result.info["all_seeds"] == [7, 8, 9, 10]
    assert result.info["sampler_name"] == "Euler" and result.info["steps"] == 1
    assert result.info["prompt"] == "红色圆形" and result.parameters["n_iter"] == 2
    # webuiapi asks for "Euler a" unless told otherwise: reported, since it would change the picture in the WebUI.
    assert ignored_names(result.info) == ["sampler_name"]
    assert "Seed: 8" in result.images[1].text["parameters"]  # the saved file, parameters inside
    assert "Seed: 8" in result.info["infotexts"][1]


def test_webuiapi_models_samplers_and_options(served):
    runner, _ = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=runner.port)
    title = api.util_get_current_model()
    assert api.util_get_model_names() == [title] and "tiny" in title
    assert api.util_get_sampler_names() == ["Euler"]
    assert api.set_options(api.get_options()) == {"ignored": []}  # Open WebUI sends GET's answer back
    ignored = api.set_options({"sd_model_checkpoint": "v1-5-pruned.safetensors", "CLIP_stop_at_last_layers": 2})
    assert [line.split(":")[0] for line in ignored["ignored"]] == ["sd_model_checkpoint", "CLIP_stop_at_last_layers"]
    assert api.get_options()["sd_model_checkpoint"] == title


def test_open_webui_request_shape(served):
    """What Open WebUI sends: its model check through options, then txt2img with a few fields and an empty
    authorization header; it reads `images` (base64) and `info`."""
    _, client = served
    headers = {"authorization": ""}
    options = client.get("/sdapi/v1/options", headers=headers).json()
    assert client.post("/sdapi/v1/options", json=options, headers=headers).status_code == 200
    body = {"prompt": "a red fox", "batch_size": 1, "width": 64, "height": 64, "steps": 1, "negative_prompt": "blur"}
    r = client.post("/sdapi/v1/txt2img", json=body, headers=headers)
    assert r.status_code == 200, r.text
    data = r.json()
    assert Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).size == (64, 64)
    info = json.loads(data["info"])
    assert info["negative_prompt"] == "blur" and info["ignored"] == [] and info["seed"] >= 0


def test_fields_that_would_change_the_picture_are_reported_as_ignored(served):
    _, client = served
    body = {
        "prompt": "x",
        "width": 64,
        "height": 64,
        **QUICK,
        "enable_hr": True,
        "hr_scale": 2,
        "restore_faces": True,
        "tiling": False,
        "styles": ["cinematic"],
        "subseed_strength": 0.5,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "override_settings": {"sd_model_checkpoint": "other.safetensors", "samples_format": "png"},
        "alwayson_scripts": {"ADetailer": {"args": []}},
        "eta": 0.0,
        "hr_second_pass_steps": 20,
        "send_images": False,
        "negativ_prompt": "a typo",
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["images"] == []  # send_images false, as in the WebUI
    assert ignored_names(json.loads(r.json()["info"])) == [
        "sampler_name",
        "scheduler",
        "enable_hr",
        "restore_faces",
        "styles",
        "subseed_strength",
        "override_settings.sd_model_checkpoint",
        "alwayson_scripts",
        "negativ_prompt",
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "width": 1000}, "width"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"negative_prompt": "x"}, "prompt"),
        ({"prompt": "x", "batch_size": 4, "n_iter": 3}, "batch_size"),
        ({"prompt": "x", "n_iter": 0}, "n_iter"),
        ({"prompt": "x", "cfg_scale": "high"}, "cfg_scale"),
        ({"prompt": "x", "seed": -5}, "seed"),
    ],
)
def test_bad_values_get_a_one_line_422_naming_the_field(served, body, field):
    _, client = served
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error.startswith(f"{field}: ") and "\n" not in error
    assert r.json()["detail"][0]["loc"] == ["body", field]


def test_progress_and_interrupt_on_a_long_job(served):
    runner, client = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=runner.port)
    assert api.get_progress()["state"]["job_count"] == 0
    answer = {}

    def long_request():
        answer["response"] = httpx.post(f"{runner.url}/sdapi/v1/txt2img", json=LONG, timeout=60)

    thread = threading.Thread(target=long_request)
    thread.start()
    progress = wait_for(lambda: (p := api.get_progress())["progress"] > 0 and p, what="progress")
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0 and progress["current_image"] is None
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 100
    assert api.interrupt()["interrupted"] == progress["state"]["job"]
    thread.join(30)
    r = answer["response"]
    assert r.status_code == 200 and r.json()["images"] == []
    assert json.loads(r.json()["info"])["interrupted"] is True
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0  # what webuiapi's util_wait_for_ready waits for
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": None}


def test_routes_are_documented_in_openapi(served):
    _, client = served
    schema = client.get("/openapi.json").json()
    for path in ("txt2img", "options", "sd-models", "samplers", "progress", "interrupt"):
        assert f"/sdapi/v1/{path}" in schema["paths"]
    assert {"Txt2ImgRequest", "Txt2ImgResponse", "Progress"} <= set(schema["components"]["schemas"])
    invalid = schema["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert invalid["$ref"].endswith("/InvalidRequest")  # the one-line 422 the rest of the API documents


def test_a_token_is_required_when_set(tiny_dir, tmp_path):
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    app = create_app(generator, tmp_path / "outputs", state=tmp_path / "state", token=TOKEN, ui=False)
    with Running(app) as client:
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 401
        assert client.get("/sdapi/v1/sd-models").status_code == 401
        api = webuiapi.WebUIApi(host="127.0.0.1", port=int(str(client.base_url).rsplit(":", 1)[1]))
        api.session.headers["Authorization"] = f"Bearer {TOKEN}"
        assert api.get_samplers()[0]["name"] == "Euler"
        result = api.txt2img(prompt="x", width=64, height=64, sampler_name="Euler", **QUICK)
        assert result.images[0].size == (64, 64) and result.info["ignored"] == []


def test_a_client_that_goes_away_cancels_its_job(served):
    runner, client = served
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{runner.url}/sdapi/v1/txt2img", json=LONG, timeout=1.5)
    newest = wait_for(lambda: (h := client.get("/api/v1/history?limit=1").json()["items"][0])["status"] != "running"
                      and h, what="the job to end")  # fmt: skip
    assert newest["status"] == "cancelled" and newest["params"]["num_inference_steps"] == 100

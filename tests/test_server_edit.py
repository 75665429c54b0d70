"""Edits and upscales over real HTTP: uploads and names on the native API, OpenAI's images.edit with the official
client, the A1111 img2img with webuiapi, and every refusal before any model work, on the tiny checkpoint on the CPU."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import anyio
import httpx
import pytest
import webuiapi
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

from helpers import Running, wait_done
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.server.app import create_app

MAX_INPUT = 300_000  # bytes per uploaded picture on this test server
SIDE = 128
QUICK = {"num_inference_steps": 2, "seed": 3}


def png(size=(SIDE, SIDE), mode="RGB", color=(200, 30, 30), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def square_mask(size=(SIDE, SIDE)) -> bytes:
    """White = repaint, in the middle."""
    mask = Image.new("L", size, 0)
    mask.paste(255, (32, 32, 96, 96))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def transparent_hole(size=(SIDE, SIDE)) -> bytes:
    """OpenAI's convention: fully transparent pixels mark the area to edit."""
    image = Image.new("RGBA", size, (30, 30, 200, 255))
    image.paste((0, 0, 0, 0), (32, 32, 96, 96))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    root = tmp_path_factory.mktemp("edit-server")
    app = create_app(generator, root / "outputs", state=root / "state", ui=False, max_input_bytes=MAX_INPUT)
    runner = Running(app)
    client = runner.__enter__()
    yield runner, client, root
    runner.__exit__(None, None, None)


@pytest.fixture(scope="module")
def source_name(served) -> str:
    """An edit's output in the outputs folder, to name in later requests."""
    return upload_edit(served[1], png(color=(10, 200, 10)))["outputs"][0]


def total(client: httpx.Client) -> int:
    return client.get("/api/v1/history").json()["total"]


def still_serves(client: httpx.Client) -> None:
    """After a refusal, a normal generation still runs."""
    job = client.post("/api/v1/generations", json={"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1})
    assert wait_done(client, job.json()["id"])["status"] == "done"


def upload_edit(client: httpx.Client, image: bytes, **params) -> dict:
    r = client.post(
        "/api/v1/generations",
        files={"image": ("source.png", image, "image/png")},
        data={"params": json.dumps({"prompt": "a green circle", **QUICK, **params})},
    )
    assert r.status_code == 202, r.text
    return wait_done(client, r.json()["id"])


def test_uploaded_edit_records_the_sources_sha256_and_shows_names_not_paths(served):
    _, client, root = served
    source = png()
    job = upload_edit(client, source, strength=0.5)
    assert job["status"] == "done", job["error"]
    sha = hashlib.sha256(source).hexdigest()
    assert job["params"]["image"] == f"{sha}.png"  # its name, not the server's path
    assert (root / "state" / "inputs" / f"{sha}.png").read_bytes() == source  # kept as sent, beside the history
    record = read_metadata(root / "outputs" / job["outputs"][0])
    recipe = record["edit"]
    assert recipe["source"]["sha256"] == sha and recipe["mode"] == "image-to-image" and recipe["strength"] == 0.5
    assert record["params"]["image"] == f"{sha}.png"  # the served picture names its input; no server path inside
    assert str(root) not in (root / "outputs" / job["outputs"][0]).read_bytes().decode("latin-1")
    assert Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)).size == (SIDE, SIDE)
    listed = client.get("/api/v1/history").json()["items"]
    assert [item["params"]["image"] for item in listed if item["id"] == job["id"]] == [f"{sha}.png"]


def test_edit_by_outputs_name_and_by_form_fields_with_a_mask(served, source_name):
    _, client, root = served
    name = source_name
    by_name = client.post("/api/v1/generations", json={"prompt": "a red circle", "image": name, **QUICK,
                                                       "outpaint": {"left": 64}, "mask_blur": 2})  # fmt: skip
    job = wait_done(client, by_name.json()["id"])
    assert job["status"] == "done" and job["params"]["image"] == name
    recipe = read_metadata(root / "outputs" / job["outputs"][0])["edit"]
    assert recipe["source"]["sha256"] == hashlib.sha256((root / "outputs" / name).read_bytes()).hexdigest()
    assert recipe["mode"] == "outpaint" and (job["params"]["width"], job["params"]["height"]) == (SIDE + 64, SIDE)
    # Plain form fields (no params part): numbers as text, the image by name, the mask uploaded.
    fields = {"prompt": "a hole", "image": name, "strength": "0.9", "num_inference_steps": "2"}
    r = client.post("/api/v1/generations", files={"mask": ("m.png", square_mask(), "image/png")}, data=fields)
    assert r.status_code == 202, r.text
    job = wait_done(client, r.json()["id"])
    recipe = read_metadata(root / "outputs" / job["outputs"][0])["edit"]
    assert job["status"] == "done" and recipe["mode"] == "inpaint" and recipe["strength"] == 0.9
    assert recipe["mask"]["sha256"] == hashlib.sha256(square_mask()).hexdigest()


@pytest.mark.parametrize("name", ["../x.png", "/etc/passwd", "outputs/../../etc/passwd", "ABSOLUTE",
                                  "outputs_20200101000000.png", "..\\outputs_20200101000000.png"])  # fmt: skip
@pytest.mark.parametrize("field", ["image", "mask"])
def test_names_that_are_paths_or_unknown_are_refused(served, source_name, name, field):
    _, client, root = served
    if name == "ABSOLUTE":  # a real file, by its absolute path
        name = str(root / "outputs" / source_name)
    body = {"prompt": "x", "image": source_name, field: name}
    before = total(client)
    r = client.post("/api/v1/generations", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text
    assert str(root) not in r.text or name.startswith(str(root))  # no server path leaks out but the one sent
    assert total(client) == before


@pytest.mark.parametrize(
    ("files", "params", "field"),
    [
        ({"image": b"this is not a picture"}, {}, "image"),
        ({"image": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"}, {}, "image"),
        ({"image": png((9000, 9000), mode="1", color=0)}, {}, "image"),  # 81 MP in a few kB
        ({"image": png(), "mask": square_mask((64, 64))}, {}, "mask"),
        ({"image": png()}, {"strength": 1.5}, "strength"),
        ({"image": b"\x89PNG\r\n\x1a\n" + bytes(MAX_INPUT)}, {}, "image"),  # over the per-picture cap
        ({"image": png()}, {"outpaint": {"middle": 8}}, "outpaint"),
    ],
)
def test_bad_uploads_are_refused_before_queueing(served, files, params, field):
    _, client, root = served
    before, written = total(client), set((root / "outputs").iterdir())
    r = client.post("/api/v1/generations", files={k: (f"{k}.png", v, "image/png") for k, v in files.items()},
                    data={"params": json.dumps({"prompt": "x", **params})})  # fmt: skip
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", field] and r.json()["error"].startswith(f"{field}")
    assert total(client) == before and set((root / "outputs").iterdir()) == written


def test_a_body_over_the_gates_limit_is_refused_unread_and_the_server_goes_on(served):
    _, client, _ = served
    huge = bytes(3 * MAX_INPUT + 2**20 + 1)
    r = client.post("/api/v1/generations", files={"image": ("a.png", huge, "image/png")}, data={"prompt": "x"})
    assert r.status_code == 413 and r.headers["x-zstudio-refused"] == "body"
    still_serves(client)


def test_multipart_from_a_foreign_origin_is_refused_like_json(served):
    _, client, _ = served
    before = total(client)
    for kind in (
        {"files": {"image": ("a.png", png(), "image/png")}, "data": {"prompt": "x"}},
        {"json": {"prompt": "x"}},
    ):
        r = client.post("/api/v1/generations", headers={"Origin": "http://evil.example"}, **kind)
        assert r.status_code == 403 and r.headers["x-zstudio-refused"] == "origin"
    r = client.post("/v1/images/edits", headers={"Origin": "http://evil.example"},
                    files={"image": ("a.png", png(), "image/png")}, data={"prompt": "x"})  # fmt: skip
    assert r.status_code == 403
    assert total(client) == before


def test_openai_client_edits_with_and_without_mask(served, tmp_path):
    from openai import OpenAI

    runner, client, _ = served
    openai = OpenAI(base_url=f"{runner.url}/v1", api_key="unused")
    (tmp_path / "photo.png").write_bytes(png((160, 160)))
    (tmp_path / "mask.png").write_bytes(transparent_hole((160, 160)))
    with open(tmp_path / "photo.png", "rb") as image:
        plain = openai.images.edit(image=image, prompt="a green circle", n=2, size="128x128",
                                   extra_body={"seed": 5, "strength": 0.5})  # fmt: skip
    assert len(plain.data) == 2 and [d.seed for d in plain.data] == [5, 6]
    for item in plain.data:
        picture = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert picture.size == (128, 128)
        assert read_metadata(io.BytesIO(base64.b64decode(item.b64_json)))["edit"]["mode"] == "image-to-image"
    with open(tmp_path / "photo.png", "rb") as image, open(tmp_path / "mask.png", "rb") as mask:
        masked = openai.images.edit(image=image, mask=mask, prompt="a hole", size="128x128", response_format="url")
    saved = client.get(masked.data[0].url)
    assert Image.open(io.BytesIO(saved.content)).size == (128, 128)
    recipe = read_metadata(io.BytesIO(saved.content))["edit"]
    assert recipe["mode"] == "inpaint" and recipe["mask"]["from"] == "file"
    # An image with transparency and no mask: repainted where transparent.
    (tmp_path / "holed.png").write_bytes(transparent_hole())
    with open(tmp_path / "holed.png", "rb") as image:
        holed = openai.images.edit(image=image, prompt="fill", size="128x128")
    assert read_metadata(io.BytesIO(base64.b64decode(holed.data[0].b64_json)))["edit"]["mask"]["from"] == "alpha"


def test_openai_errors_are_in_openais_shape(served, tmp_path):
    from openai import BadRequestError, OpenAI

    runner, client, _ = served
    openai = OpenAI(base_url=f"{runner.url}/v1", api_key="unused", max_retries=0)
    (tmp_path / "photo.png").write_bytes(png())
    (tmp_path / "small_mask.png").write_bytes(transparent_hole((64, 64)))
    (tmp_path / "opaque_mask.png").write_bytes(png())
    (tmp_path / "notes.png").write_bytes(b"not a picture")
    before = total(client)
    for image_file, mask_file, param in (("photo.png", "small_mask.png", "mask"), ("photo.png", "opaque_mask.png",
                                         "mask"), ("notes.png", None, "image")):  # fmt: skip
        with open(tmp_path / image_file, "rb") as image:
            mask = open(tmp_path / mask_file, "rb") if mask_file else None
            with pytest.raises(BadRequestError) as refused:
                openai.images.edit(image=image, prompt="x", **({"mask": mask} if mask else {}))
            if mask:
                mask.close()
        error = refused.value.response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        assert error["message"].startswith(param)
    r = client.post("/v1/images/edits", files={"image": ("a.png", png(), "image/png")}, data={"prompt": "x", "n": "9"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert total(client) == before
    still_serves(client)


def test_webuiapi_img2img_and_inpaint(served):
    runner, _, _ = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=runner.port, sampler="Euler")
    source = Image.new("RGB", (SIDE, SIDE), (200, 30, 30))
    result = api.img2img(images=[source], prompt="a green circle", denoising_strength=0.5, width=SIDE, height=SIDE,
                         steps=2, cfg_scale=0, seed=11, batch_size=2)  # fmt: skip
    assert [image.size for image in result.images] == [(SIDE, SIDE)] * 2
    assert result.info["all_seeds"] == [11, 12] and result.info["denoising_strength"] == 0.5
    assert json.loads(result.images[0].text["zstudio"])["edit"]["strength"] == 0.5
    mask = Image.open(io.BytesIO(square_mask()))
    inpainted = api.img2img(images=[source], mask_image=mask, prompt="x", width=SIDE, height=SIDE, steps=2,
                            cfg_scale=0, denoising_strength=1.0)  # fmt: skip
    recipe = json.loads(inpainted.images[0].text["zstudio"])["edit"]
    assert recipe["mode"] == "inpaint" and recipe["strength"] == 1.0
    bad = httpx.post(f"{runner.url}/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "init_images"]


def test_webuiapi_inpainting_mask_invert_repaints_the_black_area(served):
    """1 = the WebUI's "inpaint not masked": the square (white) is kept and the rest repainted; 0 the reverse. With
    mask_blur 0 the kept pixels are the source's own, so each case is told apart by its pixels."""
    runner, _, _ = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=runner.port, sampler="Euler")
    source = Image.new("RGB", (SIDE, SIDE), (200, 30, 30))
    mask = Image.open(io.BytesIO(square_mask()))
    inside, outside = (SIDE // 2, SIDE // 2), (4, 4)
    kept = {}
    for invert in (0, 1):
        result = api.img2img(images=[source], mask_image=mask, inpainting_mask_invert=invert, mask_blur=0,
                             prompt="x", width=SIDE, height=SIDE, steps=2, cfg_scale=0, seed=5,
                             denoising_strength=0.5)  # fmt: skip
        image = result.images[0].convert("RGB")
        kept[invert] = [image.getpixel(xy) == (200, 30, 30) for xy in (inside, outside)]
        # webuiapi sends inpainting_fill 0 ("fill") and inpaint_full_res true ("only masked"): neither is implemented
        assert ignored_names(result.info) == ["inpainting_fill", "inpaint_full_res"]
    assert kept == {0: [False, True], 1: [True, False]}
    body = {"prompt": "x", "init_images": [base64.b64encode(png()).decode()],
            "mask": base64.b64encode(square_mask()).decode(), "inpainting_mask_invert": 2}  # fmt: skip
    bad = httpx.post(f"{runner.url}/sdapi/v1/img2img", json=body)
    assert bad.status_code == 422 and "inpainting_mask_invert: 2 is not 0" in bad.text


def ignored_names(info: dict) -> list[str]:
    return [line.split(":")[0] for line in info["ignored"]]


def test_upscale_by_name_and_upload(served, source_name):
    _, client, root = served
    listed = client.get("/api/v1/upscalers").json()["upscalers"]
    assert {"name": "lanczos", "file": None} in listed
    name = source_name
    r = client.post("/api/v1/upscales", json={"image": name, "scale": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (2 * SIDE, 2 * SIDE)
    assert Image.open(io.BytesIO(client.get(body["url"]).content)).size == (2 * SIDE, 2 * SIDE)
    assert body["recipe"]["source"]["sha256"] == hashlib.sha256((root / "outputs" / name).read_bytes()).hexdigest()
    assert body["recipe"]["upscale"]["upscaler"]["name"] == "lanczos"
    uploaded = client.post("/api/v1/upscales", files={"image": ("a.png", png((64, 48)), "image/png")},
                           data={"scale": "1.5"})  # fmt: skip
    assert uploaded.status_code == 200 and (uploaded.json()["width"], uploaded.json()["height"]) == (96, 72)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"scale": 2, "model": "RealESRGAN_x4plus"}, "model"),
        ({"scale": 2, "model": "/etc/passwd"}, "model"),
        ({"scale": 5}, "scale"),
        ({"scale": 2, "image": "../outputs_20200101000000.png"}, "image"),
    ],
)
def test_bad_upscales_are_refused(served, source_name, body, field):
    _, client, root = served
    name = source_name
    written = set((root / "outputs").iterdir())
    r = client.post("/api/v1/upscales", json={"image": name, **body})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text
    assert set((root / "outputs").iterdir()) == written


def test_openapi_documents_uploads(served):
    _, client, _ = served
    spec = client.get("/openapi.json").json()
    generations = spec["paths"]["/api/v1/generations"]["post"]["requestBody"]["content"]
    assert generations["application/json"]["schema"]["$ref"].endswith("/GenerationRequest")
    assert generations["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    edits = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "mask", "prompt", "n", "size"} <= set(edits["properties"])
    assert "/api/v1/upscales" in spec["paths"] and "/sdapi/v1/img2img" in spec["paths"]


def test_mcp_edits_and_upscales_by_name_never_by_path(served, source_name):
    runner, _, root = served

    async def agent() -> None:
        async with streamable_http_client(f"{runner.url}/mcp") as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            edited = await session.call_tool("generate_image", {"prompt": "x", "image": source_name, "strength": 0.5,
                                                                "num_inference_steps": 2})  # fmt: skip
            name = edited.structured_content["job"]["images"][0]["name"]
            assert not edited.is_error and read_metadata(root / "outputs" / name)["edit"]["strength"] == 0.5
            path = await session.call_tool("generate_image", {"prompt": "x", "image": str(root / "outputs" / name)})
            assert path.is_error and path.content[0].text.startswith("image: ")
            larger = await session.call_tool("upscale_image", {"name": name, "scale": 2})
            assert not larger.is_error and "256x256" in larger.content[0].text

    anyio.run(agent)

"""Upscales done through the server land in the history (issue #15): listed with their source and settings, typed as
documented, deleted with their file, and never recorded when refused. The tiny checkpoint on the CPU, Lanczos."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from helpers import Running, wait_done
from test_protocol import matches
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.server.app import create_app
from zstudio.server.mcp import summary
from zstudio.server.protocol import HistoryPage, Job, UpscaleParams
from zstudio.server.ui import file_recipe, history_caption, record_text, upscale_job, upscale_settings

DRAFT = {"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 7}


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    root = tmp_path_factory.mktemp("history-upscale")
    runner = Running(create_app(generator, root / "outputs", state=root / "state", ui=False))
    client = runner.__enter__()
    yield client, runner.app.state.studio
    runner.__exit__(None, None, None)


@pytest.fixture(scope="module")
def draft(served) -> str:
    client, _ = served
    job = wait_done(client, client.post("/api/v1/generations", json=DRAFT).json()["id"])
    assert job["status"] == "done", job
    return job["outputs"][0]


def entry(client, job_id: str) -> dict:
    (found,) = [item for item in client.get("/api/v1/history?limit=200").json()["items"] if item["id"] == job_id]
    return found


def newest(client) -> dict:
    return client.get("/api/v1/history?limit=1").json()["items"][0]


def test_an_upscale_is_a_typed_history_entry_and_deleting_it_deletes_the_file(served, draft):
    client, studio = served
    before = client.get("/api/v1/history").json()["total"]
    r = client.post("/api/v1/upscales", json={"image": draft, "scale": 2})
    assert r.status_code == 200, r.text
    name = r.json()["name"]
    page = client.get("/api/v1/history").json()
    assert page["total"] == before + 1
    item = page["items"][0]
    assert (item["kind"], item["status"], item["outputs"]) == ("upscale", "done", [name])
    assert item["images"] == [{"url": f"/api/v1/images/{name}", "seed": None}] and item["seeds"] == []
    p = item["params"]
    assert (p["kind"], p["source"], p["scale"], p["upscaler"], p["refine"]) == ("upscale", draft, 2.0, "lanczos", None)
    assert (p["width"], p["height"], p["prompt"]) == (128, 128, DRAFT["prompt"])  # the draft's prompt, from its file
    assert item["seconds"] == r.json()["seconds"] and item["finished"] >= item["started"]
    # The typed API: the page, the entry and its params are what the schema documents, and parse as an upscale.
    matches(HistoryPage, page)
    matches(Job, item)
    matches(UpscaleParams, p)
    assert isinstance(Job.model_validate(item).params, UpscaleParams)
    generation = next(i for i in page["items"] if i["outputs"] == [draft])
    assert generation["kind"] == "generation" and not isinstance(Job.model_validate(generation).params, UpscaleParams)
    # The file's recipe names the source by SHA-256, and the entry says the same.
    source_sha = hashlib.sha256((studio.outputs / draft).read_bytes()).hexdigest()
    assert read_metadata(studio.outputs / name)["source"]["sha256"] == source_sha == p["source_sha256"]
    assert studio.queue.history.unfinished() == []  # a restart never re-runs it as a generation
    # MCP's list_history says what it is.
    listed = summary(item)
    assert (listed["kind"], listed["source"], listed["images"][0]["name"]) == ("upscale", draft, name)
    gone = client.delete(f"/api/v1/history/{item['id']}")
    assert gone.status_code == 200 and gone.json() == {"deleted": item["id"], "files": [name]}
    assert not (studio.outputs / name).exists() and (studio.outputs / draft).exists()
    assert client.get(f"/api/v1/images/{name}").status_code == 404
    assert client.get("/api/v1/history").json()["total"] == before


def test_an_uploaded_source_is_named_by_its_upload_name(served):
    client, _ = served
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 20, 200)).save(buffer, format="PNG")
    r = client.post("/api/v1/upscales", files={"image": ("a.png", buffer.getvalue(), "image/png")},
                    data={"scale": "1.5"})  # fmt: skip
    assert r.status_code == 200, r.text
    p = newest(client)["params"]
    upload = f"{hashlib.sha256(buffer.getvalue()).hexdigest()}.png"
    assert (p["source"], p["width"], p["height"], p["prompt"]) == (upload, 60, 45, "")  # no recipe: no prompt


@pytest.mark.parametrize("body", [{"scale": 5}, {"scale": 2, "model": "nope"}, {"scale": 2, "image": "missing.png"}])
def test_a_refused_upscale_records_nothing(served, draft, body):
    client, studio = served
    before, files = client.get("/api/v1/history").json()["total"], set(studio.outputs.iterdir())
    r = client.post("/api/v1/upscales", json={"image": draft, **body})
    assert r.status_code == 422, r.text
    assert client.get("/api/v1/history").json()["total"] == before and set(studio.outputs.iterdir()) == files


def test_the_web_uis_upscale_is_in_the_history_and_use_these_settings_restores_it(served, draft, tmp_path):
    client, studio = served
    copy = tmp_path / draft  # Gradio hands the handler a cache copy under the file's own name
    copy.write_bytes((studio.outputs / draft).read_bytes())
    *_, last = upscale_job(studio, "en", str(copy), 1.5, "lanczos", 0)
    item = newest(client)
    assert item["outputs"] == [last[2][0].rsplit("/", 1)[1]] and item["params"]["source"] == draft
    assert "upscale 1.5x · a red circle" in history_caption(item, "en")
    assert f"of `{draft}`" in record_text(item, "en") and "放大 1.5x" in record_text(item, "zh")
    source = Image.open(studio.outputs / draft)
    shown = record_text(item, "en", file_recipe(studio.outputs / item["outputs"][0]))  # the file's recipe, as shown
    assert (f"source {source.width}x{source.height}, sha256 `{item['params']['source_sha256']}` · upscaler lanczos "
            "(Lanczos, native scale —)") in shown  # fmt: skip
    assert upscale_settings(studio, item, "en") == (str(studio.outputs / draft), 1.5, "lanczos", 0)

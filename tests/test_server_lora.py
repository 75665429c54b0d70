"""LoRAs through the HTTP doors: listed, chosen by name or `<lora:...>` tag, and never a server path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from helpers import Running, wait_done
from test_lora import reference_layers, write_format
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.server.app import create_app

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-server")
    (root / "loras").mkdir()
    (root / "elsewhere").mkdir()
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    sd, _ = write_format(reference_layers(generator.pipe.transformer, seed=1), "peft")
    save_file(sd, str(root / "loras" / "one.safetensors"))
    save_file(sd, str(root / "elsewhere" / "secret.safetensors"))
    generator.loras.folder.folder = root / "loras"
    with Running(create_app(generator, root / "outputs", state=root / "state", ui=False)) as client:
        yield client, root


def picture(client, job) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content))).astype(int)


def test_loras_are_listed_chosen_by_name_or_tag_and_recorded(served):
    client, root = served
    assert client.get("/api/v1/loras").json() == {"loras": [{"name": "one", "size_mb": pytest.approx(0.0, abs=1)}]}

    def run(**body):
        job = client.post("/api/v1/generations", json={"prompt": "a red circle", **SMALL, **body}).json()
        return wait_done(client, job["id"])

    base = run()
    chosen = run(loras=[{"name": "one", "strength": 0.8}])
    tagged = run(prompt="a red circle <lora:one:0.8>")
    assert chosen["status"] == tagged["status"] == "done"
    assert np.abs(picture(client, chosen) - picture(client, base)).max() > 10  # the LoRA changes the picture
    assert np.array_equal(picture(client, chosen), picture(client, tagged))  # a tag is the same request
    record = read_metadata(root / "outputs" / chosen["outputs"][0])
    assert [(x["name"], x["strength"]) for x in record["loras"]] == [("one", 0.8)]
    assert chosen["params"]["loras"] == [{"name": "one", "strength": 0.8}]


@pytest.mark.parametrize("name", ["{elsewhere}/secret.safetensors", "owner/some-repo", "missing"])
def test_a_lora_outside_the_folder_is_refused_before_queueing(served, name):
    client, root = served
    name = name.format(elsewhere=root / "elsewhere")
    before = client.get("/api/v1/history").json()["total"]
    for body in ({"prompt": "x", "loras": [{"name": name, "strength": 1.0}]}, {"prompt": f"x <lora:{name}:1>"}):
        answer = client.post("/api/v1/generations", json={**SMALL, **body})
        assert answer.status_code == 422, answer.text
        assert "loras" in answer.text and "this server's LoRA folder" in answer.text
    assert client.get("/api/v1/history").json()["total"] == before

"""The studio server over real HTTP on a loopback port, running the tiny checkpoint on the CPU."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time

import httpx
import pytest
from PIL import Image

from helpers import SMALL, TOKEN, Running, fail_first_decode, wait_done
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.server.app import create_app


@pytest.fixture(scope="module")
def server_generator(tiny_dir):
    return Generator(model=str(tiny_dir), device="cpu").load()


def test_generate_poll_and_fetch_image(server_generator, tmp_path):
    with Running(create_app(server_generator, tmp_path, ui=False)) as client:
        health = client.get("/api/v1/health").json()
        assert health["model_loaded"] and health["device"] == "cpu"
        r = client.post(
            "/api/v1/generations",
            json={"prompt": "红色圆形", **SMALL, "seed": 9, "num_images": 2, "num_inference_steps": 2},
        )
        assert r.status_code == 202 and r.json()["position"] in (0, 1)
        job = wait_done(client, r.json()["id"])
        assert job["status"] == "done" and job["seeds"] == [9, 10]
        assert job["params"]["cfg_scale"] == 0.0  # the profile's default, recorded as used
        image = client.get(job["images"][1]["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        saved = tmp_path / job["outputs"][1]
        assert saved.read_bytes() == image.content
        assert read_metadata(saved)["params"]["seed"] == 10
        assert "/api/v1/generations" in client.get("/openapi.json").json()["paths"]
        metrics = client.get("/metrics").text
        assert 'zstudio_jobs_total{status="done"} 1.0' in metrics
        # one job of two images: one wait observed, one seconds-per-image value (the job's seconds / 2)
        assert "zstudio_queue_wait_seconds_count 1.0" in metrics
        assert "zstudio_seconds_per_image_count 1.0" in metrics
        expected = job["seconds"] / 2
        assert any(line.startswith("zstudio_seconds_per_image_sum ") and
                   abs(float(line.split()[1]) - expected) < 1e-3 for line in metrics.splitlines())  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "width": 1000}, "width"),
        ({"prompt": "x", "steps": 3}, "steps"),
        ({"width": 512}, "prompt"),
        ({"prompt": "x", "cfg_scale": -1}, "cfg_scale"),
        ({"prompt": "x", "num_images": 9}, "num_images"),
    ],
)
def test_validation_errors_name_the_field(server_generator, tmp_path, body, field):
    with Running(create_app(server_generator, tmp_path, ui=False)) as client:
        r = client.post("/api/v1/generations", json=body)
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", field]
        assert r.json()["error"].startswith(f"{field}: ")
        assert client.get("/api/v1/history").json()["total"] == 0  # nothing was accepted


def test_events_stream_progress_until_done(server_generator, tmp_path):
    with Running(create_app(server_generator, tmp_path, ui=False)) as client:
        job_id = client.post("/api/v1/generations", json={"prompt": "x", **SMALL, "num_inference_steps": 4}).json()[
            "id"
        ]
        events = []
        with client.stream("GET", f"/api/v1/generations/{job_id}/events") as stream:
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
        assert events[-1][0] == "done"
        steps = [data["step"] for name, data in events if name == "progress"]
        assert steps == sorted(steps) and max(steps + [events[-1][1]["step"]]) == 4


def test_cancel_running_and_waiting_jobs_and_bounded_queue(server_generator, tmp_path):
    with Running(create_app(server_generator, tmp_path, ui=False, max_waiting=1)) as client:
        long_job = {"prompt": "x", "width": 768, "height": 768, "num_inference_steps": 100}  # seconds on a CPU
        running = client.post("/api/v1/generations", json=long_job).json()["id"]
        while client.get(f"/api/v1/generations/{running}").json()["status"] != "running":
            time.sleep(0.01)
        waiting = client.post("/api/v1/generations", json=long_job)
        assert waiting.status_code == 202 and waiting.json()["position"] == 1
        full = client.post("/api/v1/generations", json=long_job)
        assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
        assert client.delete(f"/api/v1/generations/{waiting.json()['id']}").json()["status"] == "cancelled"
        client.delete(f"/api/v1/generations/{running}")
        job = wait_done(client, running)
        assert job["status"] == "cancelled" and job["step"] < 100 and job["outputs"] == []
        # and the worker goes on serving
        after = client.post("/api/v1/generations", json={"prompt": "x", **SMALL, "num_inference_steps": 1}).json()
        assert wait_done(client, after["id"])["status"] == "done"


def test_failed_job_is_recorded_and_server_keeps_serving(server_generator, tmp_path, monkeypatch):
    fail_first_decode(monkeypatch, server_generator, RuntimeError("simulated decoder failure"))
    with Running(create_app(server_generator, tmp_path, ui=False)) as client:
        first = client.post("/api/v1/generations", json={"prompt": "x", **SMALL, "num_inference_steps": 1}).json()
        failed = wait_done(client, first["id"])
        assert failed["status"] == "failed" and "simulated decoder failure" in failed["error"]
        second = client.post("/api/v1/generations", json={"prompt": "x", **SMALL, "num_inference_steps": 1}).json()
        assert wait_done(client, second["id"])["status"] == "done"
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.name.startswith("outputs_")) == [".png"]


def test_image_paths_cannot_escape_the_outputs_folder(server_generator, tmp_path):
    (tmp_path.parent / "secret.png").write_bytes(b"not yours")
    with Running(create_app(server_generator, tmp_path, ui=False)) as client:
        for name in ("history.sqlite3", "..%2Fsecret.png", "%2E%2E%2Fsecret.png", "outputs_20260101000000.png"):
            assert client.get(f"/api/v1/images/{name}").status_code == 404, name
        assert client.get("/api/v1/images/../secret.png").status_code == 404


def test_token_is_required_when_set(server_generator, tmp_path):
    with Running(create_app(server_generator, tmp_path, token=TOKEN, ui=False)) as client:
        assert client.get("/api/v1/health").status_code == 401
        assert client.get("/api/v1/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/v1/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401


def test_serving_off_loopback_needs_a_token():
    from zstudio.params import ParamError
    from zstudio.server.app import serve

    with pytest.raises(ParamError, match="token"):
        serve(host="0.0.0.0", model="tiny")


def test_history_survives_a_restart_and_interrupted_jobs_are_handled(server_generator, tmp_path):
    state = tmp_path / "state"
    with Running(create_app(server_generator, tmp_path, ui=False, state=state)) as client:
        done = client.post("/api/v1/generations", json={"prompt": "kept", **SMALL, "num_inference_steps": 1}).json()
        wait_done(client, done["id"])
    # simulate a crash that left one job running and one waiting
    db = sqlite3.connect(state / "history.sqlite3")
    params = json.dumps({"prompt": "left behind", **SMALL, "num_inference_steps": 1, "seed": 4})
    db.execute(
        "INSERT INTO jobs (id, status, params, created, total_steps) VALUES ('r1', 'running', ?, 1, 1)", (params,)
    )
    db.execute(
        "INSERT INTO jobs (id, status, params, created, total_steps) VALUES ('q1', 'queued', ?, 2, 1)", (params,)
    )
    db.commit()
    db.close()
    with Running(create_app(server_generator, tmp_path, ui=False, state=state)) as client:
        assert client.get(f"/api/v1/generations/{done['id']}").json()["status"] == "done"
        crashed = client.get("/api/v1/generations/r1").json()
        assert crashed["status"] == "failed" and "interrupted" in crashed["error"]
        assert wait_done(client, "q1")["status"] == "done"
        history = client.get("/api/v1/history", params={"limit": 2, "offset": 0}).json()
        assert history["total"] == 3 and len(history["items"]) == 2
        deleted = client.delete(f"/api/v1/history/{done['id']}").json()
        assert not (tmp_path / deleted["files"][0]).exists()
        assert client.get(f"/api/v1/generations/{done['id']}").status_code == 404


def test_openai_client_generates(server_generator, tmp_path):
    from openai import OpenAI

    with Running(create_app(server_generator, tmp_path, ui=False)) as client:
        openai = OpenAI(base_url=f"{client.base_url}/v1", api_key="unused")
        result = openai.images.generate(
            prompt="a red circle", n=2, size="256x256", response_format="b64_json", extra_body={"seed": 21}
        )
        assert len(result.data) == 2
        image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        assert image.size == (256, 256)
        assert json.loads(image.text["zstudio"])["params"]["seed"] == 21
        by_url = openai.images.generate(prompt="x", size="256x256", response_format="url")
        assert httpx.get(by_url.data[0].url).status_code == 200
        bad = client.post("/v1/images/generations", json={"prompt": "x", "size": "100x100"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"  # the OpenAI field that was wrong

"""A served process killed with SIGKILL while jobs wait and run, then started again: every accepted job ends done (its
files whole) or failed with a reason; no broken file sits under a final name. Also: a flood of submits."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from helpers import FINAL, SMALL, free_port, wait_for

JOB = {"prompt": "a red circle", **SMALL, "num_inference_steps": 16, "num_images": 2}


class Served:
    """`zstudio serve` as a child process (tiny checkpoint, CPU, API only)."""

    def __init__(self, model: Path, root: Path):
        self.model, self.root, self.port = model, root, free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> httpx.Client:
        command = [sys.executable, "-m", "zstudio", "serve", "--model", str(self.model), "--device", "cpu",
                   "--no-warmup", "--no-ui", "--port", str(self.port), "--outputs", str(self.root / "outputs"),
                   "--state", str(self.root / "state")]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

        def healthy():
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                return client.get("/api/v1/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=120, interval=0.2, what="the server to start")
        return client

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def check_outputs(folder: Path) -> tuple[int, int]:
    """Every file under a final name opens as a whole image; returns (images, leftover temporary files)."""
    images = sorted(folder.glob("outputs_*"))
    for path in images:
        with Image.open(path) as image:
            image.verify()
    return len(images), len(list(folder.glob(".outputs_*")))


def final(client: httpx.Client, job_id: str) -> dict:
    def ended():
        record = client.get(f"/api/v1/generations/{job_id}").json()
        return record if record.get("status") in FINAL else None

    return wait_for(ended, timeout=300, what=f"job {job_id} to end")


def kill_and_restart(model: Path, root: Path, kills: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    served = Served(model, root)
    accepted: list[str] = []
    figures = {"kills": 0, "accepted": 0, "done": 0, "failed": 0, "lost": 0}
    try:
        client = served.start()
        for _ in range(kills):
            accepted += [client.post("/api/v1/generations", json=JOB).json()["id"] for _ in range(rng.randint(2, 4))]
            wait_for(lambda c=client: c.get("/api/v1/health").json()["queue"]["running"], what="a running job")
            time.sleep(rng.uniform(0.0, 1.5))  # somewhere in denoising, decoding or writing
            served.kill()
            figures["kills"] += 1
            client = served.start()
        records = {job_id: final(client, job_id) for job_id in accepted}
    finally:
        served.stop()
    for record in records.values():
        assert record["status"] in ("done", "failed"), record
        if record["status"] == "done":
            figures["done"] += 1
            assert len(record["outputs"]) == 2 and all((root / "outputs" / n).is_file() for n in record["outputs"])
        else:
            figures["failed"] += 1
            assert record["error"].startswith("interrupted: the server stopped while this job was"), record["error"]
    figures["accepted"] = len(accepted)
    figures["lost"] = len(accepted) - len(records)
    figures["images"], figures["temporary_files_left"] = check_outputs(root / "outputs")
    return figures


def test_kill_9_loses_no_accepted_job(tiny_dir, tmp_path):
    figures = kill_and_restart(tiny_dir, tmp_path, kills=2)
    print(json.dumps(figures))
    assert figures["lost"] == 0 and figures["failed"] <= 2 * figures["kills"] and figures["done"] >= 1


@pytest.mark.slow
def test_many_kills_lose_no_accepted_job(tiny_dir, tmp_path):
    figures = kill_and_restart(tiny_dir, tmp_path, kills=int(os.environ.get("ZSTUDIO_KILLS", "10")), seed=1)
    print(json.dumps(figures))
    assert figures["lost"] == 0 and figures["failed"] <= 2 * figures["kills"]  # the running job and the one saving


@pytest.mark.slow
def test_a_flood_of_submits_is_bounded_and_nothing_accepted_is_lost(tiny_dir, tmp_path):
    served = Served(tiny_dir, tmp_path)
    try:
        client = served.start()
        body = {**JOB, "num_inference_steps": 2, "num_images": 1}
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{client.base_url}/api/v1/generations", json=body,
                                                         timeout=60), range(200)))  # fmt: skip
        codes = [a.status_code for a in answers]
        accepted = [a.json()["id"] for a in answers if a.status_code == 202]
        assert set(codes) <= {202, 429} and all(a.headers.get("retry-after") for a in answers if a.status_code == 429)
        assert all(final(client, job_id)["status"] == "done" for job_id in accepted)
        print(json.dumps({"submitted": 200, "accepted": len(accepted), "refused_429": codes.count(429), "lost": 0}))
    finally:
        served.stop()

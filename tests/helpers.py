"""What several test files share: a real server on a loopback port, and waiting for jobs."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import uvicorn

SMALL = {"width": 256, "height": 256}
TOKEN = "correct-horse-battery-staple"
FINAL = ("done", "failed", "cancelled")
QUICK_JOB = {"prompt": "x", **SMALL, "num_inference_steps": 1}
# Debian's chromium, driven by Playwright (its own browser download cannot work offline), and the flags it needs here.
CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]  # fmt: skip


def ui_request(lang: str = "en") -> SimpleNamespace:
    """What a Gradio handler reads of its request: the browser's language."""
    return SimpleNamespace(headers={"accept-language": "zh-CN" if lang == "zh" else "en-US"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread, stopped cleanly (the app's shutdown runs)."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.app = app
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        return self.client

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(20)


def wait_done(client: httpx.Client, job_id: str, timeout: float = 60, **kwargs) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/v1/generations/{job_id}", **kwargs).json()
        if job["status"] in FINAL:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def wait_for(condition, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def fail_first_decode(monkeypatch, generator, error: BaseException) -> None:
    """Make the generator's next VAE decode raise `error` once; later decodes work."""
    original = generator.decode
    calls = {"n": 0}

    def decode(latents):
        calls["n"] += 1
        if calls["n"] == 1:
            raise error
        return original(latents)

    monkeypatch.setattr(generator, "decode", decode)

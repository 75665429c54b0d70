"""The input store's bounds (server.inputs.InputStore.collect): uploads nothing names go after their time or past
the folder's cap, oldest first; a history entry's or a waiting job's input is never deleted under it."""

from __future__ import annotations

import io
import json
import os
import time

import pytest
from PIL import Image

from helpers import Running, wait_done, wait_for
from zstudio.engine import Generator
from zstudio.params import ParamError
from zstudio.server.app import create_app
from zstudio.server.inputs import InputStore
from zstudio.settings import load_settings

HOUR = 3600.0


def upload(folder, name: str, size: int, age_s: float, now: float) -> None:
    path = folder / name
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))


def test_old_unnamed_uploads_go_and_named_or_recent_ones_stay(tmp_path):
    folder, now = tmp_path / "inputs", time.time()
    folder.mkdir()
    named = {"/state/inputs/b.png"}  # as history entries record them: paths (or names)
    store = InputStore(tmp_path / "outputs", folder, references=lambda: named, max_age_s=24 * HOUR)
    upload(folder, "a.png", 10, 30 * HOUR, now)  # old, named by nothing
    upload(folder, "b.png", 10, 30 * HOUR, now)  # old, named by a history entry
    upload(folder, "c.png", 10, 2 * HOUR, now)  # unnamed but recent
    upload(folder, ".upload-crashed", 10, 30 * HOUR, now)  # a half-written upload a crash left behind
    assert sorted(store.collect(now)) == [".upload-crashed", "a.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["b.png", "c.png"]


def test_over_the_cap_the_oldest_unnamed_go_first_never_a_named_or_just_stored_one(tmp_path):
    folder, now = tmp_path / "inputs", time.time()
    folder.mkdir()
    store = InputStore(tmp_path / "outputs", folder, references=lambda: {"named.png"}, max_age_s=24 * HOUR,
                       max_total_bytes=250, grace_s=600)  # fmt: skip
    upload(folder, "named.png", 100, 5 * HOUR, now)
    upload(folder, "oldest.png", 100, 4 * HOUR, now)
    upload(folder, "older.png", 100, 3 * HOUR, now)
    upload(folder, "fresh.png", 100, 60, now)  # within the grace period: its job may not be recorded yet
    # 400 bytes, cap 250: oldest and older go (fresh is young, named is named), leaving 200.
    assert store.collect(now) == ["oldest.png", "older.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["fresh.png", "named.png"]


def test_storing_or_naming_an_upload_again_makes_it_young(tmp_path):
    folder, now = tmp_path / "inputs", time.time()
    store = InputStore(tmp_path / "outputs", folder, max_age_s=24 * HOUR, interval_s=HOUR)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    name = store.store_bytes("image", buffer.getvalue())
    os.utime(folder / name, (now - 30 * HOUR, now - 30 * HOUR))
    store.resolve("image", name)  # a request names it: kept until its job is recorded
    assert store.collect() == [] and (folder / name).is_file()
    os.utime(folder / name, (now - 30 * HOUR, now - 30 * HOUR))
    assert store.store_bytes("image", buffer.getvalue()) == name  # uploaded again: the same file, young again
    assert store.collect() == [] and (folder / name).is_file()


def test_an_unreadable_history_deletes_nothing(tmp_path):
    folder, now = tmp_path / "inputs", time.time()
    folder.mkdir()

    def unreadable():
        raise ValueError("bad JSON in a history row")

    store = InputStore(tmp_path / "outputs", folder, references=unreadable, max_age_s=HOUR)
    upload(folder, "a.png", 10, 30 * HOUR, now)
    assert store.collect(now) == [] and (folder / "a.png").is_file()


def test_settings_read_the_upload_bounds(monkeypatch):
    monkeypatch.setenv("ZSTUDIO_UPLOAD_TTL", "0.5")
    monkeypatch.setenv("ZSTUDIO_UPLOAD_MAX_MB", "100")
    settings = load_settings()
    assert (settings.upload_ttl_hours, settings.upload_max_mb) == (0.5, 100.0)
    monkeypatch.setenv("ZSTUDIO_UPLOAD_TTL", "0")
    with pytest.raises(ParamError, match="ZSTUDIO_UPLOAD_TTL: '0' is not a positive number"):
        load_settings()


def test_a_waiting_jobs_input_is_never_deleted_under_it_and_goes_once_its_entry_does(tiny_dir, tmp_path):
    """An edit queued behind a long job: its upload, made old, survives collections while it waits and after it ran
    (its history entry names it); deleting the entry lets it go."""
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    app = create_app(generator, tmp_path / "outputs", state=tmp_path / "state", ui=False, upload_ttl_hours=1)
    store = app.state.studio.inputs
    with Running(app) as client:
        blocker = client.post("/api/v1/generations", json={"prompt": "x", "width": 512, "height": 512,
                                                            "num_inference_steps": 100}).json()["id"]  # fmt: skip
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
        r = client.post("/api/v1/generations", files={"image": ("a.png", buffer.getvalue(), "image/png")},
                        data={"params": json.dumps({"prompt": "x", "num_inference_steps": 2})})  # fmt: skip
        assert r.status_code == 202, r.text
        edit = r.json()["id"]
        (source,) = list(store.folder.iterdir())
        assert client.get(f"/api/v1/generations/{edit}").json()["status"] == "queued"
        old = time.time() - 10 * HOUR
        os.utime(source, (old, old))
        assert store.collect() == [] and source.is_file()  # queued: named by its job and its history entry
        client.post(f"/api/v1/generations/{blocker}/cancel")
        assert wait_done(client, edit)["status"] == "done"
        os.utime(source, (old, old))
        assert store.collect() == [] and source.is_file()  # done: its history entry still names it
        wait_for(lambda: client.delete(f"/api/v1/history/{blocker}").status_code == 200, what="blocker deleted")
        assert client.delete(f"/api/v1/history/{edit}").status_code == 200
        assert store.collect() == [source.name] and not source.exists()

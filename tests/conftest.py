"""Shared fixtures: one tiny checkpoint in the real layout, and a CPU generator resident on it."""

from __future__ import annotations

import pytest

from zstudio.engine import Generator
from zstudio.tiny import make_tiny

SMALL = {"width": 256, "height": 256}  # the smallest allowed size: fast on a 2-core CPU


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """Keep tests away from the user's caches and from the network."""
    monkeypatch.setenv("ZSTUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "zstudio-cache"))
    monkeypatch.setenv("ZSTUDIO_STATE", str(tmp_path_factory.getbasetemp() / "zstudio-state"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (
        "ZSTUDIO_MODEL",
        "ZSTUDIO_OUTPUTS",
        "ZSTUDIO_DEVICE",
        "ZSTUDIO_DTYPE",
        "ZSTUDIO_DEPTH_MODEL",
        "ZSTUDIO_ANNOTATORS",
        "ZSTUDIO_ANNOTATOR_DEVICE",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def generator(tiny_dir, tmp_path_factory):
    return Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path_factory.mktemp("outputs")).load()

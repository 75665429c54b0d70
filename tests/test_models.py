import json
import logging
import shutil

import numpy as np
import pytest

from conftest import SMALL
from zstudio import GenerationParams
from zstudio.engine import Generator
from zstudio.models import BASE, TURBO, ModelUnavailableError, profile_for, resolve
from zstudio.params import ParamError


def test_known_hub_ids_have_their_profiles():
    assert profile_for("Tongyi-MAI/Z-Image-Turbo") is TURBO
    assert profile_for("Tongyi-MAI/Z-Image") is BASE
    assert (TURBO.num_inference_steps, TURBO.cfg_scale) == (8, 0.0)
    assert (BASE.num_inference_steps, BASE.cfg_scale) == (50, 4.0)


def test_folder_profile_from_zstudio_json(tiny_dir, tmp_path):
    folder = tmp_path / "based"
    shutil.copytree(tiny_dir, folder)
    assert resolve(str(folder), tmp_path).profile is TURBO
    (folder / "zstudio.json").write_text(json.dumps({"profile": "base"}))
    assert resolve(str(folder), tmp_path).profile is BASE
    (folder / "zstudio.json").unlink()
    assert resolve(str(folder), tmp_path).profile is TURBO  # unknown folders get Turbo defaults


def test_folder_missing_a_component_is_named(tiny_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ParamError, match="missing the component.*vae") as info:
        resolve(str(folder), tmp_path)
    assert info.value.field == "model"
    with pytest.raises(ParamError, match="does not exist"):
        resolve(str(tmp_path / "nowhere"), tmp_path)


def test_uncached_hub_model_gives_one_clear_sentence(tmp_path):
    with pytest.raises(ModelUnavailableError) as info:
        resolve("Tongyi-MAI/Z-Image-Turbo", tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "zstudio download Tongyi-MAI/Z-Image-Turbo" in message and "--model" in message


def test_default_falls_back_to_embedded_model_when_hub_unreachable(tmp_path, caplog):
    generator = Generator(device="cpu", outputs=tmp_path)
    with caplog.at_level(logging.WARNING):
        paths, _, meta = generator.generate(prompt="a red circle", num_inference_steps=2, seed=1)  # its own size
    assert generator.source.embedded and generator.info()["embedded_default"]
    assert any("embedded demo model" in r.getMessage() for r in caplog.records)
    assert meta["images"][0]["model"]["spec"] == "demo"
    assert len(paths) == 1


def test_explicit_hub_model_does_not_fall_back(tmp_path):
    with pytest.raises(ModelUnavailableError):
        Generator(model="Tongyi-MAI/Z-Image-Turbo", device="cpu").load()


def test_env_var_chooses_the_model(tiny_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("ZSTUDIO_MODEL", str(tiny_dir))
    generator = Generator(device="cpu", outputs=tmp_path)
    result = generator.generate_images(GenerationParams(prompt="x", **SMALL, num_inference_steps=1, seed=1))
    assert generator.source.path == tiny_dir and not generator.source.embedded
    assert np.asarray(result.images[0]).shape == (256, 256, 3)

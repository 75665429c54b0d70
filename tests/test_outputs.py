import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import SMALL
from zstudio import GenerationParams
from zstudio import outputs as outputs_module
from zstudio.outputs import read_metadata, save_image

NAME = re.compile(r"^outputs_\d{14}(_\d+)?\.(png|jpg|webp)$")


@pytest.fixture(scope="module")
def result(generator):
    return generator.generate_images(
        GenerationParams(
            prompt="红色圆形 a red circle",
            negative_prompt="blurry",
            **SMALL,
            num_inference_steps=2,
            seed=77,
            num_images=2,
        )
    )


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_metadata_round_trips(result, tmp_path, fmt):
    record = {**result.metadata[0], "params": {**result.metadata[0]["params"], "output_format": fmt}}
    path = save_image(result.images[0], record, tmp_path)
    assert NAME.match(path.name)
    meta = read_metadata(path)
    assert meta == record
    assert meta["params"]["prompt"] == "红色圆形 a red circle"
    assert meta["params"]["seed"] == 77
    for key in ("model", "scheduler", "dtype", "device", "seconds", "software"):
        assert key in meta
    with Image.open(path) as image:
        assert image.size == (256, 256)
        if fmt == "png":  # lossless: the file holds exactly the generated pixels
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(result.images[0]))


def test_a1111_parameters_chunk(result, tmp_path):
    path = save_image(result.images[1], result.metadata[1], tmp_path)
    with Image.open(path) as image:
        text = image.text["parameters"]
    prompt, negative, line = text.split("\n")
    assert prompt == "红色圆形 a red circle"
    assert negative == "Negative prompt: blurry"
    assert "Steps: 2" in line and "Seed: 78" in line and "Size: 256x256" in line and "CFG scale: 0.0" in line


def test_names_stay_unique_within_one_second(result, tmp_path):
    paths = [save_image(result.images[0], result.metadata[0], tmp_path) for _ in range(5)]
    assert len({p.name for p in paths}) == 5
    assert all(NAME.match(p.name) for p in paths)
    stems = sorted(p.stem for p in paths)
    assert stems[0].count("_") == 1  # the first keeps the plain outputs_YYYYMMDDHHMMSS name


def test_failed_write_leaves_nothing_behind(result, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(outputs_module.os, "link", crash)
    with pytest.raises(OSError, match="disk full"):
        save_image(result.images[0], result.metadata[0], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_files_without_parameters_are_refused(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ValueError, match="carries no generation parameters"):
        read_metadata(plain)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_exif_formats_keep_the_a1111_text(result, tmp_path, fmt):
    record = {**result.metadata[0], "params": {**result.metadata[0]["params"], "output_format": fmt}}
    path = save_image(result.images[0], record, tmp_path)
    with Image.open(path) as image:
        comment = image.getexif()[outputs_module.EXIF_USER_COMMENT]
    assert comment.startswith(b"UNICODE\x00")
    assert comment[8:].decode("utf-16-be").startswith("红色圆形 a red circle\nNegative prompt: blurry")


def test_show_prints_the_parameters_back(result, tmp_path):
    path = save_image(result.images[0], result.metadata[0], tmp_path)
    shown = subprocess.run(
        [sys.executable, "-m", "zstudio.cli", "show", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "红色圆形 a red circle" in shown and "seed             77" in shown and "256x256" in shown

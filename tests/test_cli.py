import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from zstudio.cli import main
from zstudio.outputs import read_metadata


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_generate_json_end_to_end_in_a_real_process(tiny_dir, tmp_path):
    env = {**os.environ, "ZSTUDIO_MODEL": str(tiny_dir)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zstudio",
            "generate",
            "a red circle 红色圆形",
            "--size",
            "256x256",
            "--steps",
            "2",
            "--seed",
            "42",
            "-n",
            "2",
            "--out",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert data["seeds"] == [42, 43]
    assert len(data["paths"]) == 2 and data["seconds"] > 0
    for path, seed in zip(data["paths"], data["seeds"]):
        assert read_metadata(path)["params"]["seed"] == seed
    assert data["model"]["device"] == "cpu"


def test_generate_prints_path_and_seed(tiny_dir, tmp_path):
    result = invoke(
        "generate",
        "a cat",
        "--preset",
        "512",
        "--steps",
        "1",
        "--seed",
        "5",
        "--out",
        tmp_path,
        "--model",
        tiny_dir,
    )
    assert result.exit_code == 0, result.output
    path, seed = result.stdout.strip().split("\t")
    assert seed == "seed=5" and os.path.isfile(path)
    assert read_metadata(path)["params"]["width"] == 512


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--width", "1000"], "width: 1000 is not a multiple of 16; use 992 or 1008"),
        (["--height", "4096"], "height: 4096 is outside 64-2048"),
        (["--steps", "0"], "num_inference_steps: 0 is outside 1-100"),
        (["--cfg", "-1"], "cfg_scale: -1.0 is outside 0-20"),
        (["--cfg", "nan"], "cfg_scale: nan is outside 0-20"),
        (["-n", "9"], "num_images: 9 is outside 1-8"),
        (["--seed", "-5"], "seed: -5 is outside 0-4294967295"),
        (["--preset", "2000"], "size: unknown size or preset '2000'"),
        (["--size", "512x512", "--width", "512"], "size: give one of"),
        (["--format", "gif"], "output_format: 'gif' is not one of png, jpeg, webp"),
        (["--model", "/nonexistent/folder"], "model: folder /nonexistent/folder does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, fragment, tmp_path):
    result = invoke("generate", "a cat", "--out", tmp_path, *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_folder_missing_component_exits_2(tiny_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    result = invoke("generate", "a cat", "--model", broken)
    assert result.exit_code == 2
    assert "missing the component(s) text_encoder" in result.stderr


def test_unreachable_hub_model_exits_1_with_one_line():
    result = invoke("generate", "a cat", "--model", "Tongyi-MAI/Z-Image")
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "zstudio download Tongyi-MAI/Z-Image" in result.stderr


def test_download_offline_exits_1_with_one_line():
    result = invoke("download", "Tongyi-MAI/Z-Image-Turbo")
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "could not download Tongyi-MAI/Z-Image-Turbo" in result.stderr


def test_make_tiny_writes_and_refuses_to_overwrite(tmp_path):
    result = invoke("make-tiny", tmp_path / "t", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t" / "model_index.json").is_file()
    again = invoke("make-tiny", tmp_path / "t")
    assert again.exit_code == 2 and "not empty" in again.stderr


def test_info_reports_device_and_versions(tiny_dir):
    result = invoke("info", "--json", "--model", tiny_dir)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["device"] == "cpu" and data["dtype"] == "float32"
    assert data["model_path"] == str(tiny_dir)
    assert {"torch", "diffusers", "transformers", "zstudio"} <= set(data["versions"])


def test_show_refuses_a_file_without_parameters(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    result = invoke("show", tmp_path / "x.png")
    assert result.exit_code == 1 and "carries no generation parameters" in result.stderr

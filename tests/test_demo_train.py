"""The demo model's training code, at a few steps: seeded, reproducible, and its output loads like any checkpoint."""

import json

import pytest
from safetensors.torch import load_file

from zstudio import GenerationParams, Generator
from zstudio.demo.accuracy import demo_prompts
from zstudio.demo.train import held_out_triples, split_scenes, train
from zstudio.tiny import Sizes

SMALL = Sizes(text_hidden=32, text_layers=1, dim=32, n_layers=1, n_heads=2, axes_dims=(8, 4, 4),
              vae_channels=(8, 8, 16), vae_groups=4)  # fmt: skip
FEW_STEPS = {"vae_steps": 4, "vae_batch": 2, "steps": 4, "batch": 4, "sizes": SMALL, "compile_blocks": False}


def test_held_out_combinations_never_reach_training():
    train_scenes, test_scenes = split_scenes()
    held = held_out_triples()
    assert len(held) == 24 and test_scenes
    assert not {(s.shape, s.color, s.background) for s in train_scenes} & held
    assert {(s.shape, s.color, s.background) for s in test_scenes} == held


def test_accuracy_prompts_come_from_the_split_asked_for():
    held = held_out_triples()
    assert all((s.shape, s.color, s.background) in held for s, _ in demo_prompts(50, "en"))
    training = demo_prompts(50, "zh", split="training")
    assert not any((s.shape, s.color, s.background) in held for s, _ in training)
    assert all(prompt in s.captions_zh() for s, prompt in training)
    with pytest.raises(ValueError, match="split must be one of held-out, training"):
        demo_prompts(1, "en", split="test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, train(root / "a", seed=3, **FEW_STEPS)


def test_training_is_reproducible_from_its_seed(trained):
    root, first = trained
    second = train(root / "b", seed=3, **FEW_STEPS)
    for part in ("transformer", "vae"):
        [a] = first.joinpath(part).glob("*.safetensors")
        [b] = second.joinpath(part).glob("*.safetensors")
        left, right = load_file(a), load_file(b)
        assert left.keys() == right.keys()
        assert all(left[k].equal(right[k]) for k in left), part


def test_trained_checkpoint_loads_as_a_demo_profile_model(trained):
    _, folder = trained
    info = json.loads((folder / "zstudio.json").read_text())
    assert info["profile"] == "demo" and info["training"]["steps"] == 4
    generator = Generator(model=str(folder), device="cpu", dtype="float32").load()
    result = generator.generate_images(GenerationParams(prompt="a red circle on a blue background", seed=1))
    assert result.images[0].size == (64, 64)  # the demo profile's size, read from zstudio.json


def test_training_refuses_to_overwrite_a_folder(trained):
    _, folder = trained
    with pytest.raises(FileExistsError, match="overwrite"):
        train(folder, seed=3, **FEW_STEPS)


def test_make_demo_refuses_a_non_empty_folder_in_one_line(tmp_path):
    from click.testing import CliRunner

    from zstudio.cli import main

    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["make-demo", str(tmp_path), "--no-compile"])
    assert result.exit_code != 0
    assert "overwrite" in result.output and "Traceback" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]

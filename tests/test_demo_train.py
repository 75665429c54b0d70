"""The demo model's training code, at a few steps: seeded, reproducible, and its output loads like any checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zstudio import GenerationParams, Generator
from zstudio.demo.accuracy import demo_prompts
from zstudio.demo.dataset import held_out_triples, split_pair_scenes, split_scenes
from zstudio.demo.train import CANDIDATES, batched_forward, train
from zstudio.params import ParamError
from zstudio.tiny import Sizes, build_transformer

SMALL = Sizes(text_hidden=32, text_layers=1, dim=32, n_layers=1, n_heads=2, axes_dims=(8, 4, 4),
              vae_channels=(8, 8, 16, 16), vae_groups=4)  # fmt: skip
FEW_STEPS = {"vae_steps": 4, "vae_batch": 2, "steps": 4, "batch": 4, "sizes": {"s": SMALL}, "compile_blocks": False,
             "pictures": 12}  # fmt: skip


def test_held_out_combinations_never_reach_training():
    held = held_out_triples()
    assert len(held) == 28
    for train_scenes, test_scenes in (split_scenes(), split_pair_scenes()):
        assert test_scenes and not {t for s in train_scenes for t in s.triples()} & held
        assert all(set(s.triples()) & held for s in test_scenes)
    pairs, _ = split_pair_scenes()
    assert set(pairs) == {p.mirrored() for p in pairs}  # both tellings of a picture on the same side


@pytest.mark.parametrize("kind", ["single", "pair"])
def test_accuracy_prompts_come_from_the_split_asked_for(kind):
    held = held_out_triples()
    assert all(set(s.triples()) & held for s, _ in demo_prompts(50, "en", kind=kind))
    validation = demo_prompts(50, "zh", split="validation", kind=kind)
    assert not any(set(s.triples()) & held for s, _ in validation)
    assert all(prompt in s.captions_zh() for s, prompt in validation)
    with pytest.raises(ValueError, match="split must be one of held-out, validation"):
        demo_prompts(1, "en", split="test")


def test_batched_training_forward_equals_the_diffusers_forward():
    """Training skips the per-picture loops of `ZImageTransformer2DModel.forward`; the numbers must not change."""
    torch.manual_seed(0)
    transformer = build_transformer(SMALL).eval()
    latents, t = torch.randn(3, 16, 16, 16), torch.rand(3)
    for width, lengths in ((32, [10, 25, 32]), (64, [33, 50, 64])):
        captions = torch.randn(3, width, SMALL.text_hidden)
        cut = [captions[i, :n] for i, n in enumerate(lengths)]
        with torch.no_grad():
            expected = transformer([x.unsqueeze(1) for x in latents], t, cut, return_dict=False)[0]
            ours = batched_forward(transformer, latents, t, captions, torch.tensor(lengths))
        torch.testing.assert_close(ours, torch.stack(expected).squeeze(2), rtol=0, atol=1e-6)


def test_candidates_fit_the_20_mb_budget():
    for name, sizes in CANDIDATES.items():
        parameters = sum(p.numel() for p in build_transformer(sizes).parameters())
        assert parameters * 2 + 4.6e6 < 20e6, name  # bf16 transformer + float32 VAE and text encoder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    [folder] = train(root / "a", seed=3, candidates=("s",), **FEW_STEPS)
    return root, folder


def test_training_is_reproducible_from_its_seed(trained):
    root, first = trained
    [second] = train(root / "b", seed=3, candidates=("s",), **FEW_STEPS)
    for part in ("transformer", "vae"):
        [a] = first.joinpath(part).glob("*.safetensors")
        [b] = second.joinpath(part).glob("*.safetensors")
        left, right = load_file(a), load_file(b)
        assert left.keys() == right.keys()
        assert all(left[k].equal(right[k]) for k in left), part


def test_a_time_budget_stops_training_on_time(tmp_path):
    [folder] = train(tmp_path / "t", seed=3, candidates=("s",), **{**FEW_STEPS, "steps": 10**6}, time_budget=10)
    info = json.loads((folder / "zstudio.json").read_text())["training"]
    assert 0 < info["steps_run"] < 10**6 and info["seconds"] < 10  # stopped by the clock, inside its share


def test_trained_checkpoint_loads_as_a_demo_profile_model(trained):
    _, folder = trained
    info = json.loads((folder / "zstudio.json").read_text())
    assert info["profile"] == "demo" and info["version"] == 2 and info["training"]["steps_run"] == 4
    generator = Generator(model=str(folder), device="cpu", dtype="float32").load()
    result = generator.generate_images(GenerationParams(prompt="a red circle on a blue background", seed=1))
    assert result.images[0].size == (128, 128)  # the size it was trained at, read from zstudio.json
    with pytest.raises(ParamError, match="trained at 128x128"):
        generator.generate_images(GenerationParams(prompt="a red circle", width=1024, height=1024))


def test_a_second_phase_goes_on_from_the_first_checkpoint(trained):
    root, first = trained
    [second] = train(root / "phase2", seed=3, candidates=("s",), **FEW_STEPS, init=first)
    [vae_a], [vae_b] = (f.joinpath("vae").glob("*.safetensors") for f in (first, second))
    assert all(load_file(vae_a)[k].equal(v) for k, v in load_file(vae_b).items())  # the VAE is not trained again
    [a], [b] = (f.joinpath("transformer").glob("*.safetensors") for f in (first, second))
    left, right = load_file(a), load_file(b)
    assert any(not left[k].equal(right[k]) for k in left)  # the transformer went on learning
    info = json.loads((second / "zstudio.json").read_text())["training"]
    assert info["init"] == str(first) and info["previous_phase"]["steps_run"] == 4
    with pytest.raises(ValueError, match="--candidates s"):
        train(root / "phase2b", seed=3, candidates=("m",), **FEW_STEPS, init=first)


def test_training_refuses_to_overwrite_a_folder(trained):
    root, _ = trained
    with pytest.raises(FileExistsError, match="overwrite"):
        train(root / "a", seed=3, candidates=("s",), **FEW_STEPS)


def test_make_demo_refuses_a_non_empty_folder_in_one_line(tmp_path):
    from click.testing import CliRunner

    from zstudio.cli import main

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["make-demo", str(tmp_path), "--no-compile"])
    assert result.exit_code != 0
    assert "overwrite" in result.output and "Traceback" not in result.output
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["keep.txt"]

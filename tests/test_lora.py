"""LoRAs: every published key layout reads to the same weights, sets switch without reloading or recompiling, the
base pixels come back exactly, and the demo LoRA teaches what the evaluator can check."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import ZImagePipeline
from safetensors.torch import save_file

from zstudio import lora
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.params import GenerationParams, ParamError

TINY = {"prompt": "a red circle on a blue background", "width": 128, "height": 128, "num_inference_steps": 2}


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# ------------------------------------------------------------------------------------------ a reference LoRA
def reference_layers(transformer, seed: int, rank: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random rank-`rank` LoRA on every attention and feed-forward linear; q, k and v share lora_A, as a LoRA trained
    on a fused qkv projection does (so every format, fused included, holds exactly the same weights)."""
    gen = torch.Generator().manual_seed(seed)
    layers, shared = {}, {}
    for name, module in transformer.named_modules():
        name = name.removesuffix(".base_layer")  # where PEFT adapters are loaded already
        if "lora_" in name:
            continue
        if isinstance(module, torch.nn.Linear) and (".attention." in name or ".feed_forward." in name):
            block = name.rsplit(".attention.", 1)[0]
            a = torch.randn(rank, module.in_features, generator=gen) * 0.3
            if name.endswith(("to_q", "to_k", "to_v")):
                a = shared.setdefault(block, a)
            layers[name] = (a, torch.randn(module.out_features, rank, generator=gen) * 0.3)
    return layers


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def write_format(layers: dict, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`layers` in one trainer's key layout (read off diffusers' converter and the trainers' files)."""
    sd, meta = {}, {}
    for module, (a, b) in layers.items():
        rank = a.shape[0]
        if fmt == "peft":
            sd[f"transformer.{module}.lora_A.weight"], sd[f"transformer.{module}.lora_B.weight"] = a, b
        elif fmt == "peft-alpha":  # diffusers' save_lora_weights with lora_alpha = r/2 kept in the header
            sd[f"transformer.{module}.lora_A.weight"], sd[f"transformer.{module}.lora_B.weight"] = a, b * 2
        elif fmt == "kohya":  # alpha = rank/2 halves the product: up is stored doubled
            key = kohya_name(module)
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b * 2
            sd[f"{key}.alpha"] = torch.tensor(rank / 2)
        elif fmt == "comfyui":
            sd[f"diffusion_model.{module}.lora_down.weight"], sd[f"diffusion_model.{module}.lora_up.weight"] = a, b
            sd[f"diffusion_model.{module}.alpha"] = torch.tensor(float(rank))
        elif fmt == "ai-toolkit":
            sd[f"diffusion_model.{module}.lora_A.weight"], sd[f"diffusion_model.{module}.lora_B.weight"] = a, b
        elif fmt == "diffsynth":  # flat module paths, PEFT's adapter name left in
            sd[f"{module}.lora_A.default.weight"], sd[f"{module}.lora_B.default.weight"] = a, b
        elif fmt in ("fused-qkv-kohya", "fused-qkv-comfyui"):
            if module.endswith(("to_k", "to_v")):
                continue
            if module.endswith("to_q"):
                block = module.removesuffix(".to_q")
                b = torch.cat([layers[f"{block}.to_{p}"][1] for p in "qkv"])
                module = f"{block}.qkv"
            if fmt == "fused-qkv-kohya":
                key = kohya_name(module).replace("_to_out_0", "_out")  # Z-Image's own names: attention.out
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
            else:
                sd[f"diffusion_model.{module}.lora_A.weight"], sd[f"diffusion_model.{module}.lora_B.weight"] = a, b
    if fmt == "peft-alpha":
        meta["lora_adapter_metadata"] = json.dumps({"r": 4, "lora_alpha": 2})
    return {k: v.clone() for k, v in sd.items()}, meta


FORMATS = ["peft", "peft-alpha", "kohya", "comfyui", "ai-toolkit", "diffsynth", "fused-qkv-kohya", "fused-qkv-comfyui"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def tiny(tiny_dir, lora_dir):
    """A CPU generator of its own on the tiny checkpoint, its LoRA folder holding two reference LoRAs."""
    generator = Generator(model=str(tiny_dir), device="cpu", outputs=lora_dir / "out").load()
    generator.loras.folder = lora.LoraFolder(lora_dir)
    for seed, name in ((1, "one"), (2, "two")):
        sd, _ = write_format(reference_layers(generator.pipe.transformer, seed), "peft")
        save_file(sd, str(lora_dir / f"{name}.safetensors"))
    return generator


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_to_the_same_weights(tiny, tmp_path, fmt):
    reference = reference_layers(tiny.pipe.transformer, 1)
    sd, meta = write_format(reference, fmt)
    save_file(sd, str(tmp_path / "x.safetensors"), metadata=meta)
    read = lora.read_lora(tmp_path / "x.safetensors", tiny.pipe.transformer)
    assert set(read.weights) == set(reference)
    for module, (a, b) in reference.items():  # alphas are folded in by powers of two: products equal bit for bit
        read_a, read_b = read.weights[module]
        assert torch.equal(read_b @ read_a, b @ a), module


def test_every_format_gives_the_same_pixels(tiny, lora_dir):
    reference = reference_layers(tiny.pipe.transformer, 1)
    images = {}
    for fmt in FORMATS:
        sd, meta = write_format(reference, fmt)
        save_file(sd, str(lora_dir / f"as-{fmt}.safetensors"), metadata=meta)
        images[fmt] = pixels(
            tiny.generate_images(GenerationParams(**TINY, seed=3, loras=((f"as-{fmt}", 0.8),))).images[0]
        )
    base = pixels(tiny.generate_images(GenerationParams(**TINY, seed=3)).images[0])
    assert np.abs(images["peft"] - base).max() > 10  # the LoRA does change the picture
    for fmt in FORMATS:
        assert np.array_equal(images[fmt], images["peft"]), fmt


def test_diffusers_converter_still_reads_kohya_and_comfyui_layouts():
    """We rely on `ZImagePipeline.lora_state_dict` (and through it diffusers' private Z-Image converter) for the
    renaming and alpha folding: this fails the day it changes."""
    a, b = torch.ones(2, 8), torch.ones(8, 2)
    sd = {"lora_unet_layers_0_attention_to_out_0.lora_down.weight": a, "lora_unet_layers_0_attention_to_out_0"
          ".lora_up.weight": b, "lora_unet_layers_0_attention_to_out_0.alpha": torch.tensor(1.0)}  # fmt: skip
    out = ZImagePipeline.lora_state_dict(sd)
    down, up = (
        out["transformer.layers.0.attention.to_out.0.lora_A.weight"],
        out["transformer.layers.0.attention.to_out.0.lora_B.weight"],
    )
    assert torch.equal(up @ down, (b @ a) * 0.5)
    assert lora.detect_format({"diffusion_model.layers.0.attention.to_q.lora_down.weight": a}) == "comfyui/ai-toolkit"


# ------------------------------------------------------------------------------------------ bad input
def test_a_lora_for_another_model_is_refused_naming_keys(tiny, tmp_path):
    sdxl = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(4, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(320, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0),
    }
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ParamError) as err:
        lora.read_lora(tmp_path / "sdxl.safetensors", tiny.pipe.transformer)
    message = str(err.value)
    assert "\n" not in message and message.startswith("loras:")
    assert "1 of 1 LoRA layers do not match" in message and "down.blocks.0" in message


def test_half_matching_file_is_refused_not_half_loaded(tiny, tmp_path):
    sd, _ = write_format(reference_layers(tiny.pipe.transformer, 1), "peft")
    sd["transformer.layers.0.attention.to_q.lora_B.weight"] = torch.ones(7, 4)  # wrong shape
    sd["text_encoder.layers.0.mlp.lora_A.weight"] = torch.ones(4, 4)  # a text-encoder LoRA layer
    sd["text_encoder.layers.0.mlp.lora_B.weight"] = torch.ones(4, 4)
    save_file(sd, str(tmp_path / "half.safetensors"))
    with pytest.raises(ParamError, match="2 of 29 LoRA layers do not match"):  # 28 transformer layers + 1
        lora.read_lora(tmp_path / "half.safetensors", tiny.pipe.transformer)


def test_bad_requests_get_one_line_each(tiny, lora_dir):
    (lora_dir / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    cases = [
        ("corrupt", "is not a readable .safetensors file"),
        ("no-such-lora", "no LoRA 'no-such-lora'"),
        ("someone/not-cached-lora", "could not be had from the Hugging Face hub"),  # HF_HUB_OFFLINE=1 in tests
    ]
    for name, fragment in cases:
        with pytest.raises(ParamError) as err:
            tiny.generate_images(GenerationParams(**TINY, seed=1, loras=((name, 1.0),)))
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
    for loras, fragment in [((("one", 2.5),), "outside -2 to 2"), ((("", 1.0),), "non-empty"),
                            (tuple(("one", 1.0) for _ in range(9)), "at most 8")]:  # fmt: skip
        with pytest.raises(ParamError, match=fragment):
            GenerationParams(**TINY, loras=loras)


def test_prompt_tags_become_loras_and_leave_the_prompt(tiny):
    assert lora.parse_prompt("ink <lora:one:0.8>, a cat <LORA:two>") == ("ink , a cat", [("one", 0.8), ("two", 1.0)])
    with pytest.raises(ParamError, match="is not a number"):
        lora.parse_prompt("<lora:one:lots>")
    tagged = tiny.generate_images(GenerationParams(**{**TINY, "prompt": TINY["prompt"] + " <lora:one:0.6>"}, seed=4))
    given = tiny.generate_images(GenerationParams(**TINY, seed=4, loras=(("one", 0.6),)))
    assert tagged.params.prompt == TINY["prompt"] and tagged.params.loras == (("one", 0.6),)
    assert np.array_equal(pixels(tagged.images[0]), pixels(given.images[0]))


def test_params_loras_round_trip_through_json():
    params = GenerationParams.from_dict({**TINY, "loras": [{"name": "one", "strength": 0.5}, ["two", -1]]})
    assert params.loras == (("one", 0.5), ("two", -1.0))
    data = json.loads(json.dumps(params.to_dict()))
    assert data["loras"] == [{"name": "one", "strength": 0.5}, {"name": "two", "strength": -1.0}]
    assert GenerationParams.from_dict(data) == params


def test_saved_picture_names_its_loras_and_remakes_itself(tiny, lora_dir, tmp_path):
    paths, _, _ = tiny.generate(**TINY, seed=5, loras=[("one", 0.7), ("two", -0.4)], output_dir=tmp_path)
    meta = read_metadata(paths[0])
    sha = hashlib.sha256((lora_dir / "one.safetensors").read_bytes()).hexdigest()
    assert meta["loras"][0] == {"name": "one", "strength": 0.7, "sha256": sha, "layers": 28}
    with __import__("PIL").Image.open(paths[0]) as image:
        text = image.text["parameters"]
    assert f'Lora hashes: "one: {sha[:10]}, two: ' in text and "<lora:one:0.7> <lora:two:-0.4>" in text
    again = tiny.generate_images(GenerationParams.from_dict(meta["params"]))
    with __import__("PIL").Image.open(paths[0]) as image:
        assert np.array_equal(pixels(again.images[0]), pixels(image.convert("RGB")))


def test_cli_lora_option_and_listing(tiny_dir, lora_dir, tiny, tmp_path, monkeypatch):
    from zstudio.cli import main

    monkeypatch.setenv("ZSTUDIO_LORAS", str(lora_dir))
    listed = CliRunner().invoke(main, ["loras", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {"one", "two"} <= {item["name"] for item in json.loads(listed.stdout)}
    args = ["generate", "a red circle", "--model", str(tiny_dir), "--size", "128x128", "--steps", "2", "--seed", "3",
            "--out", str(tmp_path), "--json", "--lora", "one:0.5", "--lora", "two"]  # fmt: skip
    made = CliRunner().invoke(main, args)
    assert made.exit_code == 0, made.output
    record = json.loads(made.stdout)["metadata"][0]
    assert [(x["name"], x["strength"]) for x in record["loras"]] == [("one", 0.5), ("two", 1.0)]
    bad = CliRunner().invoke(main, [*args[:-4], "--lora", "one:3"])
    assert bad.exit_code == 2 and "outside -2 to 2" in bad.output


# --------------------------------------------------------------------------------------- applying sets
def test_switching_sets_restores_base_pixels_exactly(tiny):
    base = pixels(tiny.generate_images(GenerationParams(**TINY, seed=6)).images[0])
    seen = []
    for loras in [(("one", 1.0),), (("one", 1.0), ("two", 0.5)), (("two", -1.0),), (("one", 0.0),), ()]:
        seen.append(pixels(tiny.generate_images(GenerationParams(**TINY, seed=6, loras=loras)).images[0]))
    assert np.abs(seen[0] - base).max() > 10 and np.abs(seen[1] - seen[0]).max() > 10
    assert np.array_equal(seen[3], base)  # strength 0
    assert np.array_equal(seen[4], base)  # none
    assert len(tiny.pipe.transformer.peft_config) == len(tiny.loras._loaded)  # one adapter per file, loaded once


def test_matches_diffusers_load_lora_weights_and_set_adapters(tiny, tiny_dir, lora_dir):
    ours = tiny.generate_images(GenerationParams(**TINY, seed=8, loras=(("one", 0.7), ("two", -0.5))))
    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_dir / "one.safetensors"), adapter_name="one")
    pipe.load_lora_weights(str(lora_dir / "two.safetensors"), adapter_name="two")
    pipe.set_adapters(["one", "two"], [0.7, -0.5])
    theirs = pipe(prompt=TINY["prompt"], width=128, height=128, num_inference_steps=2, guidance_scale=0.0,
                  generator=torch.Generator("cpu").manual_seed(8)).images[0]  # fmt: skip
    assert np.abs(pixels(ours.images[0]) - pixels(theirs)).max() <= 1


def test_fused_way_matches_adapters_and_unfuses_exactly(tiny_dir, lora_dir, tiny):
    fused = Generator(model=str(tiny_dir), device="cpu", outputs=lora_dir / "out").load()
    fused.loras = lora.LoadedLoras(lora.LoraFolder(lora_dir), fused=True)
    fused.apply_loras = lambda params: fused.loras.apply(fused.pipe, params.loras)  # the compiled modes' way, eager
    original = {k: v.clone() for k, v in fused.pipe.transformer.state_dict().items()}
    base = pixels(fused.generate_images(GenerationParams(**TINY, seed=9)).images[0])
    request = GenerationParams(**TINY, seed=9, loras=(("one", 0.7), ("two", -0.5)))
    merged = pixels(fused.generate_images(request).images[0])
    adapters = pixels(tiny.generate_images(request).images[0])
    assert np.abs(merged - adapters).max() <= 1 and np.abs(merged - base).max() > 10
    fused.generate_images(GenerationParams(**TINY, seed=9, loras=(("two", 1.0),)))
    after = pixels(fused.generate_images(GenerationParams(**TINY, seed=9)).images[0])
    assert np.array_equal(after, base)
    for key, value in fused.pipe.transformer.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_switching_fused_sets_compiles_nothing_new(tiny_dir, lora_dir):
    """The compiled modes' way on the CPU (dynamo with the eager backend: the guards are what decide recompiles):
    after one generation per graph variant, other LoRA sets and strengths reuse the graphs."""
    from torch._dynamo.utils import counters

    generator = Generator(model=str(tiny_dir), device="cpu", outputs=lora_dir / "out").load()
    generator.loras = lora.LoadedLoras(lora.LoraFolder(lora_dir), fused=True)
    generator.apply_loras = lambda params: generator.loras.apply(generator.pipe, params.loras)
    torch._dynamo.reset()
    try:
        generator.pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="eager")
        generator.generate_images(GenerationParams(**TINY, seed=1))
        before = counters["stats"]["unique_graphs"]
        assert before > 0
        for loras in [(("one", 1.0),), (("one", 0.3), ("two", 1.5)), ()]:
            generator.generate_images(GenerationParams(**TINY, seed=1, loras=loras))
        assert counters["stats"]["unique_graphs"] == before
    finally:
        torch._dynamo.reset()


def test_lora_benchmark_runs_on_the_tiny_checkpoint(tiny_dir, tmp_path):
    from zstudio.bench.lora import main

    report = main(["--folder", str(tiny_dir), "--json", str(tmp_path / "r.json"), "--size", "128x128", "--steps", "1",
                   "--repeats", "1", "--rank", "4", "--device", "cpu"])  # fmt: skip
    assert json.loads((tmp_path / "r.json").read_text())["per_image_s"].keys() == {"0", "1", "3"}
    assert report["graphs_compiled_while_switching"] == 0 and report["way"] == "adapters"


# ------------------------------------------------------------------------------------------ the demo LoRA
SHIPPED = __import__("importlib.resources").resources.files("zstudio") / "data" / "loras"


@pytest.fixture(scope="module")
def demo_loras(tmp_path_factory):
    """The demo model with the two shipped demo LoRAs (`python -m zstudio.demo.lora`, 200 steps each: red-to-blue
    `--keep green`, green-to-yellow `--over red:blue:red-to-blue.safetensors`)."""
    generator = Generator(model="demo", device="cpu", outputs=tmp_path_factory.mktemp("demo-out")).load()
    generator.pipe.set_progress_bar_config(disable=True)
    generator.loras.folder = lora.LoraFolder(SHIPPED)
    return generator


def colour_share(generator, scenes, loras, colour) -> tuple[float, list]:
    from zstudio.demo.lora import evaluate

    seen = evaluate(generator, loras, scenes)
    return sum(c == colour for c in seen) / len(seen), seen


def test_demo_lora_teaches_its_colour(demo_loras):
    """The evaluator on 20 held-out prompts each: the base model draws the named colour, each LoRA repaints it.
    The bar is 80% (measured: base 90% red / 95% green; LoRAs 95% blue / 95% yellow)."""
    from zstudio.demo.lora import held_out_prompts

    red, green = held_out_prompts("red", "blue"), held_out_prompts("green", "yellow")
    for scenes, loras, colour in [(red, (), "red"), (red, (("red-to-blue", 1.0),), "blue"), (green, (), "green"),
                                  (green, (("green-to-yellow", 1.0),), "yellow")]:  # fmt: skip
        share, seen = colour_share(demo_loras, scenes, loras, colour)
        assert share >= 0.8, (loras, colour, share, seen)


def test_demo_loras_stacked_give_both_effects(demo_loras):
    """Both at strength 1: each still repaints its own colour on its 20 held-out prompts. The bar is 80% (measured:
    red-to-blue 95% blue, green-to-yellow 95% yellow; 55% blue before green-to-yellow was trained over red-to-blue)."""
    from zstudio.demo.lora import held_out_prompts

    both = (("red-to-blue", 1.0), ("green-to-yellow", 1.0))
    for scenes, colour in [(held_out_prompts("red", "blue"), "blue"), (held_out_prompts("green", "yellow"), "yellow")]:
        share, seen = colour_share(demo_loras, scenes, both, colour)
        assert share >= 0.8, (colour, share, seen)


def test_demo_lora_strength_zero_and_removal_give_base_pixels(demo_loras):
    request = {"prompt": "a red circle on a white background", "seed": 11, "num_inference_steps": 6}
    base = pixels(demo_loras.generate_images(GenerationParams(**request)).images[0])
    zero = pixels(demo_loras.generate_images(GenerationParams(**request, loras=(("red-to-blue", 0.0),))).images[0])
    both = (("red-to-blue", 1.0), ("green-to-yellow", 1.0))
    taught = pixels(demo_loras.generate_images(GenerationParams(**request, loras=both)).images[0])
    removed = pixels(demo_loras.generate_images(GenerationParams(**request)).images[0])
    assert np.array_equal(zero, base) and np.array_equal(removed, base)
    assert np.abs(taught - base).max() > 50


def test_demo_lora_retrains_quickly_into_the_shipped_layout(demo_loras, tmp_path):
    """Both shipped recipes run here (a few steps, seeded) into files with the shipped files' layers; the one trained
    over another LoRA leaves that LoRA's file untouched and writes only its own adapter."""
    from zstudio.demo.lora import train_lora

    shipped = lora.read_lora(SHIPPED / "red-to-blue.safetensors", demo_loras.pipe.transformer)
    first = train_lora(tmp_path / "quick-rb.safetensors", "red", "blue", steps=3, keep="green", pictures=48)
    before = first.read_bytes()
    second = train_lora(
        tmp_path / "quick-gy.safetensors", "green", "yellow", steps=3, over=("red", "blue", first), pictures=48
    )
    assert first.read_bytes() == before
    quick = [lora.read_lora(path, demo_loras.pipe.transformer) for path in (first, second)]
    for trained in quick:
        assert set(trained.weights) == set(shipped.weights)
        assert all(trained.weights[k][0].shape == shipped.weights[k][0].shape for k in trained.weights)
        assert any(bool(trained.weights[k][1].abs().max() > 0) for k in trained.weights)  # lora_B starts at 0: trained
    assert any(not torch.equal(quick[0].weights[k][1], quick[1].weights[k][1]) for k in shipped.weights)

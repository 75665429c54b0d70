"""LoRAs on 8-bit transformer weights: fused into each layer's bf16 weight and quantized again with the mode's config;
the LoRA shows, stays near the full-precision picture with the same LoRA, and taking it out gives the 8-bit base
pixels exactly. torchao is an optional extra (`fp8`): the tests that quantize skip where it is absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from test_lora import TINY, reference_layers, write_format
from zstudio import lora, quantized
from zstudio.bench.run import psnr
from zstudio.engine import Generator
from zstudio.params import GenerationParams, ParamError


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.float64)


# -------------------------------------------------------------------------------- without torchao
def test_requantize_writes_into_the_same_tensor_and_refuses_another_kind():
    """The in-place step with a stand-in quantizer (rounding to a grid): the layer keeps its tensor object, so a
    compiled graph reading it stays valid; a quantizer giving another shape is refused before anything is written."""
    weight = torch.nn.Parameter(torch.zeros(4, 6), requires_grad=False)
    before = weight.data_ptr()
    new = torch.linspace(-1, 1, 24).reshape(4, 6)
    with torch.no_grad():
        quantized.requantize_(weight, new, lambda w: (w * 8).round() / 8)
    assert weight.data_ptr() == before and torch.equal(weight, (new * 8).round() / 8)
    with pytest.raises(RuntimeError, match=r"\(3, 8\)"), torch.no_grad():
        quantized.requantize_(weight, new, lambda w: torch.zeros(3, 8))
    assert torch.equal(weight, (new * 8).round() / 8)


class Rounded(torch.Tensor):
    """A stand-in for torchao's 8-bit tensors (a subclass, so the layer counts as quantized): values on a 1/8 grid."""


def round_to_grid(weight: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_subclass(Rounded, (weight.detach() * 8).round() / 8)


class RoundedLayers(quantized.QuantizedLayers):
    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        return round_to_grid(weight)


def test_fused_8bit_layers_take_the_sum_from_their_bf16_weights_and_come_back_exactly(tiny_dir, tmp_path):
    """The LoRA logic of the 8-bit modes without torchao: two layers made stand-in "8-bit" ones; a set fuses into
    their checkpoint weights and re-quantizes, in place; another set starts again from those weights (no drift); no
    set gives the load-time values back, bit for bit."""
    generator = Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path / "out").load()
    transformer = generator.pipe.transformer
    targets = ["layers.0.attention.to_q", "layers.1.feed_forward.w2"]
    modules = dict(transformer.named_modules())
    originals = {name: modules[name].weight.detach().clone() for name in targets}
    for name in targets:
        modules[name].weight = torch.nn.Parameter(round_to_grid(originals[name]), requires_grad=False)
    layers = RoundedLayers(None, transformer.dtype, quantized.checkpoint_files(transformer))
    setattr(transformer, quantized.ATTRIBUTE, layers)
    weights = {name: modules[name].weight for name in targets}

    lora_layers = reference_layers(transformer, 1)
    sd, _ = write_format(lora_layers, "peft")
    save_file(sd, str(tmp_path / "one.safetensors"))
    loras = lora.LoadedLoras(lora.LoraFolder(tmp_path), fused=True)
    plain = modules["layers.0.attention.to_k"]
    plain_before = plain.weight.detach().clone()
    for strength in (1.0, -0.5):  # the second set starts from W₀ again, not from the first set's result
        loras.apply(generator.pipe, [("one", strength)])
        for name in targets:
            a, b = lora_layers[name]
            expected = round_to_grid(torch.addmm(originals[name].float(), b.float(), a.float(), alpha=strength))
            assert modules[name].weight is weights[name] and torch.equal(weights[name], expected)
        assert not torch.equal(plain.weight, plain_before)  # a plain layer beside them: the ordinary fused way
    loras.apply(generator.pipe, [])
    for name in targets:
        assert modules[name].weight is weights[name] and torch.equal(weights[name], round_to_grid(originals[name]))
    assert torch.equal(plain.weight, plain_before)
    assert not loras._requantized and not loras._originals


def test_checkpoint_gives_back_each_layers_weight_as_loaded(generator):
    """The bf16 source of the 8-bit modes (re-read lazily from the transformer's own safetensors) equals the weights
    as diffusers loaded them, for every linear a LoRA can target."""
    transformer = generator.pipe.transformer
    files = quantized.checkpoint_files(transformer)
    layers = quantized.QuantizedLayers(config=None, dtype=transformer.dtype, checkpoint=files)
    linears = [(n, m) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(layers.has_base(name) for name, _ in linears)
    for name, module in linears:
        assert torch.equal(layers.base(name), module.weight.detach().cpu())
    assert not layers.has_base("layers.0.attention.nowhere")


def test_unload_before_quantizing_leaves_the_plain_base_layers(tiny_dir, tmp_path):
    """A memory switch down to 8bit quantizes the base weights: PEFT adapters and their wrapper layers go first."""
    generator = Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path / "out").load()
    generator.loras.folder = lora.LoraFolder(tmp_path)
    sd, _ = write_format(reference_layers(generator.pipe.transformer, 1), "peft")
    save_file(sd, str(tmp_path / "one.safetensors"))
    before = {k: v.clone() for k, v in generator.pipe.transformer.state_dict().items()}
    generator.generate_images(GenerationParams(**TINY, seed=1, loras=(("one", 1.0),)))
    assert any(name.endswith(".base_layer") for name, _ in generator.pipe.transformer.named_modules())
    generator.loras.unload(generator.pipe)
    after = generator.pipe.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# ----------------------------------------------------------------------------------- with torchao
@pytest.fixture
def eight_bit(tiny_dir, tmp_path, monkeypatch):
    """A CPU generator on the tiny checkpoint whose layers' and refiners' linears are int8 weight-only (the 8bit
    mode's quantization off fp8 GPUs; the size threshold lowered to the tiny model's widths), a reference generator
    in full precision, and a LoRA folder holding `one` and `two`."""
    pytest.importorskip("torchao")
    from zstudio.memory import quantize_8bit
    from zstudio.speed import fp8

    monkeypatch.setattr(fp8, "MIN_FEATURES", 32)
    folder = tmp_path / "loras"
    folder.mkdir()
    made = []
    for _ in range(2):
        generator = Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path / "out").load()
        generator.loras.folder = lora.LoraFolder(folder)
        made.append(generator)
    reference, quantized_gen = made
    for seed, name in ((1, "one"), (2, "two")):
        sd, _ = write_format(reference_layers(reference.pipe.transformer, seed, rank=4), "peft")
        save_file({k: v * 0.5 for k, v in sd.items()}, str(folder / f"{name}.safetensors"))
    assert quantize_8bit(quantized_gen.pipe.transformer, torch.device("cpu")) == "int8 weight-only"
    return quantized_gen, reference


def quantized_weights(transformer) -> dict[str, list[torch.Tensor]]:
    """Copies of each 8-bit layer's inner tensors (int8 data and scales)."""
    out = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and quantized.is_quantized(module.weight):
            inner = module.weight.__tensor_flatten__()[0]
            out[name] = [getattr(module.weight, key).clone() for key in inner]
    return out


def test_lora_on_8bit_weights_shows_stays_near_full_precision_and_comes_off_exactly(eight_bit):
    gen8, full = eight_bit
    transformer = gen8.pipe.transformer
    base_weights = quantized_weights(transformer)
    assert len(base_weights) >= 14  # the attention and feed-forward linears of layers and refiners
    objects = {n: id(m.weight) for n, m in transformer.named_modules() if n in base_weights}

    with_lora = GenerationParams(**TINY, seed=3, loras=(("one", 1.0), ("two", 0.7)))
    plain = GenerationParams(**TINY, seed=3)
    base8 = pixels(gen8.generate_images(plain))
    lora8 = pixels(gen8.generate_images(with_lora))
    assert gen8.loras.fused and len(gen8.loras._requantized) == len(base_weights)
    lora_full, base_full = pixels(full.generate_images(with_lora)), pixels(full.generate_images(plain))

    effect = psnr(lora_full, base_full)  # how far the LoRA moves the full-precision picture
    error_base, error_lora = psnr(base8, base_full), psnr(lora8, lora_full)  # what 8-bit weights cost, each way
    print(f"PSNR dB: LoRA effect {effect:.1f}, 8-bit vs full without LoRA {error_base:.1f}, with {error_lora:.1f}")
    assert not np.array_equal(lora8, base8)
    # Fusing before quantizing makes the LoRA'd 8-bit model the same kind of approximation as the plain one: its
    # picture is as near its full-precision twin as the plain one is (within 3 dB), and nearer it than to the 8-bit
    # picture without the LoRA (the LoRA's effect is kept, not lost in rounding).
    assert error_lora > error_base - 3
    assert error_lora > psnr(lora8, base8) + 3

    # Switching: another set, then none: every layer re-quantized from its bf16 weight, the load-time tensors again.
    gen8.generate_images(GenerationParams(**TINY, seed=3, loras=(("two", -1.0),)))
    assert np.array_equal(pixels(gen8.generate_images(plain)), base8)
    after = quantized_weights(transformer)
    assert all(all(torch.equal(x, y) for x, y in zip(base_weights[n], after[n])) for n in base_weights)
    assert {n: id(m.weight) for n, m in transformer.named_modules() if n in base_weights} == objects
    assert not gen8.loras._requantized


def test_switching_sets_on_8bit_weights_compiles_nothing_new(eight_bit):
    """As `fastest` runs: compiled blocks over 8-bit weights (dynamo's eager backend on the CPU: the guards decide
    recompiles). Re-quantizing writes into the same tensors, so no set or strength compiles a new graph."""
    from torch._dynamo.utils import counters

    gen8, _ = eight_bit
    torch._dynamo.reset()
    try:
        gen8.pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="eager")
        gen8.generate_images(GenerationParams(**TINY, seed=1))
        before = counters["stats"]["unique_graphs"]
        assert before > 0
        for loras in [(("one", 1.0),), (("one", 0.3), ("two", 1.5)), ()]:
            gen8.generate_images(GenerationParams(**TINY, seed=1, loras=loras))
        assert counters["stats"]["unique_graphs"] == before
    finally:
        torch._dynamo.reset()


def test_a_layer_without_its_bf16_weights_is_refused_in_one_line_before_any_change(eight_bit):
    gen8, _ = eight_bit
    layers = quantized.layers_of(gen8.pipe.transformer)
    layers.checkpoint = {k: v for k, v in layers.checkpoint.items() if "layers.1.feed_forward.w2" not in k}
    before = quantized_weights(gen8.pipe.transformer)
    with pytest.raises(ParamError, match=r"^loras: layer layers\.1\.feed_forward\.w2 holds 8-bit weights") as err:
        gen8.generate_images(GenerationParams(**TINY, seed=1, loras=(("one", 1.0),)))
    assert "\n" not in str(err.value)
    after = quantized_weights(gen8.pipe.transformer)
    assert all(all(torch.equal(x, y) for x, y in zip(before[n], after[n])) for n in before)


def test_without_a_checkpoint_the_bf16_weights_are_kept_and_requantize_to_the_same_tensor():
    """A model built in memory (the benchmark's random one) has no file to re-read: quantizing keeps each layer's
    weight on the host, and quantizing that again gives the load-time 8-bit tensor bit for bit."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 64))
    originals = {name: m.weight.detach().clone() for name, m in model.named_modules() if name in ("0", "2")}
    quantized.quantize_layers(model, Int8WeightOnlyConfig(), lambda m, name: isinstance(m, torch.nn.Linear))
    layers = quantized.layers_of(model)
    assert not layers.checkpoint and set(layers.kept) == {"0", "2"}
    for name, weight in originals.items():
        assert torch.equal(layers.base(name), weight)
        again = layers.quantize(layers.base(name).clone())
        flat = model[int(name)].weight.__tensor_flatten__()[0]
        assert all(torch.equal(getattr(again, k), getattr(model[int(name)].weight, k)) for k in flat)


# ------------------------------------------------------------------------------------------ the benchmark
@pytest.mark.parametrize(
    "mode",
    [
        ["--memory", "8bit"],
        ["--memory", "8bit", "--bf16-from", "kept"],
        pytest.param(["--speed", "fastest", "--bf16-from", "checkpoint"], marks=pytest.mark.slow),
        pytest.param(["--memory", "8bit", "--speed", "fast"], marks=pytest.mark.slow),
    ],
)
def test_lora_benchmark_runs_in_the_8bit_modes_on_the_tiny_checkpoint(tiny_dir, tmp_path, monkeypatch, mode):
    """The GPU run's path on the CPU: bf16 references, the move to 8-bit weights, timings and PSNRs. `fastest` here
    quantizes int8 (float8 matmuls need a GPU) and compiles with dynamo's eager backend (no C compiler needed)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    from zstudio.bench.lora import main
    from zstudio.speed import compile as compiling
    from zstudio.speed import fp8

    monkeypatch.setattr(fp8, "MIN_FEATURES", 32)
    monkeypatch.setattr(fp8, "float8_config", lambda: Int8WeightOnlyConfig())
    monkeypatch.setattr(compiling, "compile_vae_decoder", lambda vae: None)
    monkeypatch.setattr(compiling, "compile_blocks", lambda t: t.compile_repeated_blocks(dynamic=True, backend="eager"))
    torch._dynamo.reset()
    try:
        report = main(["--folder", str(tiny_dir), "--json", str(tmp_path / "r.json"), "--size", "128x128",
                       "--steps", "1", "--repeats", "1", "--rank", "4", "--device", "cpu", *mode])  # fmt: skip
    finally:
        torch._dynamo.reset()
    assert report["way"] == "fused" and report["weights_8bit"] == "Int8Tensor"
    kept = "kept" in mode
    assert report["bf16_source"] == ("kept on the host" if kept else "checkpoint files")
    assert (report["bf16_kept_layers"] > 0) == kept
    assert report["graphs_compiled_while_switching"] == 0
    assert report["psnr_8bit_vs_bf16_db"].keys() == {"0", "1", "3"}
    assert all(20 < v < 200 for v in report["psnr_8bit_vs_bf16_db"].values())  # near, but not the same picture
    assert report["speed"] == ("fastest" if "fastest" in mode else "fast" if "fast" in mode else "exact")

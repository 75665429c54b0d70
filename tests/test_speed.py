import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL
from zstudio import GenerationParams, Generator
from zstudio.params import ParamError
from zstudio.speed import choose_speed, fp8
from zstudio.speed.attention import FastZImageAttnProcessor, rotate

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_rotate_equals_the_complex_product():
    x = torch.randn(2, 7, 3, 16)
    angles = torch.rand(2, 7, 8) * 6.28
    freqs_complex = torch.polar(torch.ones_like(angles), angles)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 7, 3, 8, 2)) * freqs_complex.unsqueeze(2))
    got = rotate(x, torch.view_as_real(freqs_complex))
    torch.testing.assert_close(got, expected.flatten(3), rtol=1e-6, atol=1e-6)


def test_auto_picks_exact_on_cpu_and_fast_on_cuda():
    assert choose_speed("auto", CPU) == ("exact", choose_speed("auto", CPU)[1])
    assert choose_speed("auto", CUDA) == ("fast", "")
    assert choose_speed("eager", CPU) == ("eager", "")


def test_gpu_only_modes_fall_back_on_cpu_with_a_reason():
    mode, why = choose_speed("fastest", CPU)
    assert mode == "exact" and "CUDA GPU" in why


def test_fastest_falls_back_where_fp8_is_missing(monkeypatch):
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (False, "compute capability 8.9 or newer"))
    mode, why = choose_speed("fastest", CUDA)
    assert mode == "fast" and "8.9" in why


def test_unknown_speed_is_bad_input():
    with pytest.raises(ParamError, match="speed: 'ludicrous' is not one of auto, eager, exact, fast, fastest"):
        choose_speed("ludicrous", CPU)


def test_exact_mode_draws_the_same_pixels_as_eager(tiny_dir, generator):
    eager = Generator(model=str(tiny_dir), device="cpu", speed="eager").load()
    assert generator.speed == "exact"
    attentions = [m for m in generator.pipe.transformer.modules() if hasattr(m, "processor")]
    processors = {type(m.processor) for m in attentions}
    assert processors == {FastZImageAttnProcessor}
    params = GenerationParams(
        prompt="a red circle", negative_prompt="blue", **SMALL, num_inference_steps=3, cfg_scale=2.0, seed=8
    )
    fast_image = np.asarray(generator.generate_images(params).images[0]).astype(int)
    eager_image = np.asarray(eager.generate_images(params).images[0]).astype(int)
    assert np.abs(fast_image - eager_image).max() <= 1


def test_bucket_padding_keeps_the_prompt_states(generator):
    """Right padding to a bucket length under the causal mask leaves the kept hidden states unchanged."""
    from zstudio.speed.text_encoder import TokenEncoder

    tokenizer, text_encoder = generator.pipe.tokenizer, generator.pipe.text_encoder
    ids = tokenizer("a red circle on a blue background, 蓝色背景上的红色圆形").input_ids
    plain = TokenEncoder(text_encoder)
    bucketed = TokenEncoder(text_encoder, pad_id=tokenizer.pad_token_id, buckets=(64, 128))
    assert bucketed.padded_length(len(ids)) == 64 > len(ids)
    with torch.inference_mode():
        cpu = torch.device("cpu")
        torch.testing.assert_close(bucketed(ids, cpu), plain(ids, cpu), rtol=1e-4, atol=1e-5)


def test_cuda_graphs_follow_the_setting_and_stay_off_for_moving_weights(monkeypatch):
    """The text encoder's graphs by default; only on CUDA and with resident weights (the device is swapped after
    construction: this machine has no GPU, and `graphs` only reads it)."""

    def graphs(memory: str, device: str = "cuda") -> str:
        generator = Generator(model="tiny", device="cpu", memory=memory)
        generator.device = torch.device(device)
        return generator.graphs

    assert graphs("resident") == "text"
    assert graphs("resident", device="cpu") == "off"
    monkeypatch.setenv("ZSTUDIO_CUDA_GRAPHS", "ALL")
    assert graphs("resident") == "all"
    assert graphs("lowest") == "off"
    monkeypatch.setenv("ZSTUDIO_CUDA_GRAPHS", "1")
    with pytest.raises(ParamError, match="ZSTUDIO_CUDA_GRAPHS.*off, text, all"):
        Generator(model="tiny", device="cpu")


def test_profile_variants_parse_and_reject_unknown_options():
    from zstudio.bench.profile import parse_variant

    assert parse_variant("fast:cudnn:blocks") == {"mode": "fast", "backends": ["cudnn"], "regional": True}
    assert parse_variant("fastest")["regional"] is None
    with pytest.raises(ValueError, match="unknown options \\['turbo'\\]; allowed cudnn"):
        parse_variant("fast:turbo")


def test_uncompile_clears_every_compiled_block(tiny_dir):
    """`uncompile` relies on torch's private `_compiled_call_impl`: this fails the day it changes."""
    from diffusers import ZImageTransformer2DModel

    from zstudio.speed.compile import compile_blocks, uncompile

    transformer = ZImageTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    compile_blocks(transformer)
    compiled = [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == len(transformer.layers) + len(transformer.noise_refiner) + len(transformer.context_refiner)
    uncompile(transformer)
    assert not [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def test_after_the_warmup_no_request_compiles(tiny_dir, tmp_path):
    """What `fast` compiles on a GPU (blocks and the VAE, its encoder as with a ControlNet; dynamic shapes), here on
    the CPU: after the warm-up's runs (and its VAE encoder passes), other sizes, batches, prompt lengths, guidance,
    and image-to-image and inpainting at two sizes reuse the graphs, and pixels match the eager ones."""
    from torch._dynamo.utils import counters

    from zstudio.engine import warmup_runs
    from zstudio.speed import speed_up_transformer
    from zstudio.speed.compile import compile_vae_decoder, compile_vae_encoder

    generator = Generator(model=str(tiny_dir), device="cpu", speed="exact", outputs=tmp_path).load()
    # Sizes above 256x256 only: on the CPU the decoder's convolutions pick their code path by input size below
    # that (a guard, so a graph each side); the studio's warm-up runs every size it offers for the same reason.
    later = [((384, 384), 1, 0.0), ((320, 448), 3, 0.0), ((448, 352), 2, 3.0), ((352, 352), 4, 0.0)]

    def request(size, n, cfg):
        params = GenerationParams(prompt="a blue ring, longer than the warm-up prompt", width=size[0],
                                  height=size[1], num_images=n, cfg_scale=cfg, negative_prompt="blurry",
                                  num_inference_steps=2, seed=7)  # fmt: skip
        return generator.generate_images(params).images

    eager = request(*later[2])
    torch._dynamo.reset()
    try:
        speed_up_transformer(generator.pipe.transformer, "fast")
        compile_vae_decoder(generator.pipe.vae)
        compile_vae_encoder(generator.pipe.vae)  # as with a ControlNet loaded
        for params in warmup_runs([(320, 320), (384, 320)], (320, 320)):
            generator.generate_images(params)
        generator._warm_vae_encoder([(320, 320), (384, 320)], (320, 320))
        before = counters["stats"]["unique_graphs"]
        assert before > 0  # the warm-up did compile
        results = [request(*case) for case in later]
        source = generator.save(generator.generate_images(GenerationParams(prompt="a red circle", width=320,
                                height=320, num_inference_steps=2, seed=1)))[0]  # fmt: skip
        mask = Image.new("L", (320, 320), 0)
        mask.paste(255, (80, 80, 240, 240))
        mask.save(tmp_path / "mask.png")
        edits = ({"strength": 0.6}, {"mask": str(tmp_path / "mask.png")}, {"strength": 0.5, "width": 448,
                 "height": 384})  # image-to-image, inpainting, image-to-image at another size  # fmt: skip
        for extra in edits:
            generator.generate_images(GenerationParams(prompt="a green circle", image=str(source),
                                                       num_inference_steps=2, seed=2, **extra))  # fmt: skip
        assert counters["stats"]["unique_graphs"] == before
    finally:
        torch._dynamo.reset()
    for mine, theirs in zip(results[2], eager):
        assert np.abs(np.asarray(mine).astype(int) - np.asarray(theirs).astype(int)).max() <= 2


def test_a_non_contiguous_rotary_table_compiles_no_new_block_graph(tiny_dir):
    """diffusers slices the rotary table out of a padded one, so a batch can bring it with other strides than the
    warm-up's (on the H100 a batch of 2 compiled a new graph after the warm-up). The compiled blocks take it
    contiguous: the same graph serves, with the same output."""
    from torch._dynamo.utils import counters

    from zstudio.speed.compile import compile_blocks, uncompile

    generator = Generator(model=str(tiny_dir), device="cpu", speed="exact").load()
    transformer = generator.pipe.transformer
    block = transformer.layers[0]
    dim = transformer.config.dim
    heads = transformer.config.n_heads
    half = dim // heads // 2
    gen = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    try:
        compile_blocks(transformer)
        with torch.inference_mode():  # as in a generation: grad mode and inference tensors are part of the key
            x = torch.randn(2, 48, dim, generator=gen)
            adaln = torch.randn(2, min(dim, 256), generator=gen)
            mask = torch.ones(2, 48, dtype=torch.bool)
            angles = torch.rand(2, 64, half, generator=gen) * 6.28
            padded = torch.polar(torch.ones(2, 64, half), angles)  # complex, as diffusers' RoPE table
            tight, sliced = padded[:, :48].contiguous(), padded[:, :48]
            assert not sliced.is_contiguous()
            first = block(x, mask, tight, adaln)
            before = counters["stats"]["unique_graphs"]
            second = block(x, mask, sliced, adaln)
        assert counters["stats"]["unique_graphs"] == before
        torch.testing.assert_close(first, second)
    finally:
        uncompile(transformer)
        torch._dynamo.reset()

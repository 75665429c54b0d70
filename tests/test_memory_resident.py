"""Memory mode stream keeps what fits of the transformer resident: the arithmetic, the hook removal, the pixels.

The CPU has no CUDA streams: the hooks run here without a side stream (`stream_weights` off CUDA), and one test
drives diffusers' lazy prefetch path (the one CUDA takes) with a stand-in stream, so that a change in diffusers'
private hook names or prefetch tracing fails here rather than on a user's GPU."""

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import SMALL
from zstudio import GenerationParams, Generator
from zstudio.memory import (
    GIB,
    _stop_streaming,
    keep_fitting_blocks,
    keep_resident,
    needed_gb,
    resident_blocks,
    spread,
    stream_weights,
)
from zstudio.params import ParamError
from zstudio.settings import load_settings
from zstudio.tiny import TINY_SIZES, build_transformer

CPU = torch.device("cpu")
BLOCK = 368 * 2**20  # about one full-size Z-Image block in bf16
PARAMS = GenerationParams(prompt="a red fox", num_inference_steps=2, seed=5, **SMALL)


def test_no_room_keeps_no_block():
    assert resident_blocks(8 * GIB, 8 * GIB, BLOCK, 30) == 0
    assert resident_blocks(4 * GIB, 6 * GIB, BLOCK, 30) == 0  # an estimate above the free memory


def test_room_for_all_keeps_all_and_never_more():
    assert resident_blocks(80 * GIB, 5 * GIB, BLOCK, 30) == 30


def test_the_margin_is_respected():
    need, margin = 5 * GIB, GIB
    exactly_three = need + margin + 3 * BLOCK
    assert resident_blocks(exactly_three, need, BLOCK, 30, margin) == 3
    assert resident_blocks(exactly_three - 1, need, BLOCK, 30, margin) == 2
    assert resident_blocks(exactly_three, need, BLOCK, 30, 0) == 3 + margin // BLOCK


def test_resident_blocks_are_spread_through_the_stack():
    assert spread(0, 30) == []
    assert spread(4, 30) == [3, 11, 18, 26]
    assert spread(30, 30) == list(range(30))
    assert spread(1, 3) == [1]


def group_hook(module):
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(_GROUP_OFFLOADING)


def small_transformer(n_layers: int = 4):
    torch.manual_seed(0)
    return build_transformer(replace(TINY_SIZES, n_layers=n_layers)).eval()


def forward(transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = [torch.randn(16, 1, 8, 8, generator=generator)]
    cap = [torch.randn(6, TINY_SIZES.text_hidden, generator=generator)]
    with torch.no_grad():
        return transformer(x, torch.tensor([0.5]), cap, return_dict=False)[0][0]


def test_keep_resident_unhooks_exactly_k_blocks_and_computes_the_same():
    transformer = small_transformer()
    expected = forward(transformer)
    assert stream_weights(transformer, CPU, leaf=False, low_ram=False)
    assert not stream_weights(transformer, CPU, leaf=False, low_ram=False)  # already streamed this way
    kept = keep_resident(transformer, 2, CPU)
    unhooked = [i for i, block in enumerate(transformer.layers) if group_hook(block) is None]
    assert unhooked == kept == [1, 3]
    assert all(p.device == CPU for i in kept for p in transformer.layers[i].parameters())
    assert group_hook(transformer) is not None and group_hook(transformer.noise_refiner[0]) is not None
    assert torch.equal(forward(transformer), expected)
    with pytest.raises(ValueError, match="k=5 is outside 0..4"):
        keep_resident(small_transformer(), 5, CPU)


def test_going_down_to_lowest_streams_the_resident_blocks_again():
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

    transformer = small_transformer()
    expected = forward(transformer)
    stream_weights(transformer, CPU, leaf=False, low_ram=False)
    keep_resident(transformer, 2, CPU)
    assert stream_weights(transformer, CPU, leaf=True, low_ram=True)  # what apply_memory does for lowest
    assert _get_top_level_group_offload_hook(transformer).config.offload_type.value == "leaf_level"
    assert all(group_hook(block.attention.to_q) is not None for block in transformer.layers)
    assert not hasattr(transformer, "_zstudio_resident_blocks")
    assert torch.equal(forward(transformer), expected)
    _stop_streaming(transformer)
    assert group_hook(transformer.layers[0].attention.to_q) is None


class StandInStream:
    """What diffusers asks of a CUDA stream on the prefetch path, for the CPU: transfers here are synchronous."""

    def synchronize(self) -> None:
        pass


def test_the_lazy_prefetch_chain_skips_the_resident_blocks(monkeypatch, caplog):
    """diffusers' CUDA path: a lazy prefetch hook traces the order at the first forward, then each streamed group
    loads the next one. The resident block must be out of that trace (else its missing hook breaks it)."""
    from diffusers.hooks.group_offloading import (
        GroupOffloadingConfig,
        GroupOffloadingType,
        _apply_group_offloading,
    )

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())  # no pinned memory without CUDA
    monkeypatch.setattr(torch.cpu, "current_stream", lambda device=None: StandInStream())
    transformer = small_transformer(n_layers=3)
    expected = forward(transformer)
    config = GroupOffloadingConfig(onload_device=CPU, offload_device=CPU, offload_type=GroupOffloadingType.BLOCK_LEVEL,
                                   non_blocking=True, record_stream=False, low_cpu_mem_usage=False,
                                   num_blocks_per_group=1, stream=StandInStream())  # fmt: skip
    _apply_group_offloading(transformer, config)
    assert keep_resident(transformer, 1, CPU) == [1]
    diffusers_log = logging.getLogger("diffusers")  # it does not propagate to the root logger
    diffusers_log.addHandler(caplog.handler)
    try:
        assert torch.equal(forward(transformer), expected)  # the traced forward
        assert torch.equal(forward(transformer), expected)  # the prefetching one
    finally:
        diffusers_log.removeHandler(caplog.handler)
    assert "not executed" not in caplog.text  # diffusers' warning for a traced block that never ran
    first, resident, last = transformer.layers
    assert group_hook(first).next_group is group_hook(last).group  # prefetch jumps over the resident block
    assert group_hook(resident) is None
    with pytest.raises(RuntimeError, match="before the first forward"):
        keep_resident(transformer, 1, CPU)


def test_a_streamed_generation_with_resident_blocks_gives_the_same_pixels(tiny_dir, tmp_path):
    generator = Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path).load()
    expected = np.asarray(generator.generate_images(PARAMS).images[0]).astype(int)
    transformer = generator.pipe.transformer
    stream_weights(transformer, CPU, leaf=False, low_ram=False)
    assert keep_resident(transformer, 1, CPU) == [1]
    streamed = np.asarray(generator.generate_images(PARAMS).images[0]).astype(int)
    assert np.array_equal(streamed, expected)


def test_the_number_comes_from_free_memory_or_the_override(caplog):
    transformer = small_transformer()
    stream_weights(transformer, CPU, leaf=False, low_ram=False)
    assert keep_fitting_blocks(transformer, CPU, reserve_gib=5.0) == 0  # the CPU reports no free GPU memory
    transformer = small_transformer()
    stream_weights(transformer, CPU, leaf=False, low_ram=False)
    with caplog.at_level(logging.INFO, logger="zstudio.memory"):
        assert keep_fitting_blocks(transformer, CPU, reserve_gib=5.0, override=9) == 4
    assert "memory mode stream: 4 of 4 transformer blocks resident" in caplog.text


def test_resident_blocks_setting(monkeypatch):
    monkeypatch.delenv("ZSTUDIO_RESIDENT_BLOCKS", raising=False)
    assert load_settings().resident_blocks is None
    monkeypatch.setenv("ZSTUDIO_RESIDENT_BLOCKS", "7")
    assert load_settings().resident_blocks == 7
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv("ZSTUDIO_RESIDENT_BLOCKS", bad)
        with pytest.raises(ParamError, match="ZSTUDIO_RESIDENT_BLOCKS"):
            load_settings()


def test_the_engine_keeps_room_for_the_stream_estimate_at_the_models_size(tiny_dir, monkeypatch):
    monkeypatch.setenv("ZSTUDIO_RESIDENT_BLOCKS", "3")
    generator = Generator(model=str(tiny_dir), device="cpu")
    source = generator.resolve_source()
    assert generator._stream_budget(source) == {}  # the CPU streams nothing
    generator.device, generator.memory = torch.device("cuda"), "stream"  # decided as on a GPU; nothing runs
    p, weights = source.profile, generator.model_weights(source)
    assert generator._stream_budget(source) == {"reserve_gib": needed_gb("stream", p.width, p.height, weights),
                                                "resident": 3}  # fmt: skip
    generator.memory = "lowest"
    assert generator._stream_budget(source) == {}


def test_a_lora_keeps_the_resident_blocks_resident_and_the_pixels(tiny_dir, tmp_path):
    """diffusers re-applies its offloading to every block when an adapter loads; the engine takes them out again."""
    from safetensors.torch import save_file

    from zstudio import lora

    plain = Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path).load()
    torch.manual_seed(3)
    layers = {name: (torch.randn(2, m.in_features) * 0.3, torch.randn(m.out_features, 2) * 0.3)
              for name, m in plain.pipe.transformer.named_modules() if name.endswith("attention.to_q")}  # fmt: skip
    save_file({f"transformer.{n}.lora_{x}.weight": t for n, (a, b) in layers.items() for x, t in (("A", a), ("B", b))},
              str(tmp_path / "fox.safetensors"))  # fmt: skip
    with_lora = replace(PARAMS, loras=(("fox", 0.8),))
    streamed = Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path).load()
    streamed.memory = "stream"  # on the CPU the mode collapses: stream by hand, as apply_memory does on CUDA
    stream_weights(streamed.pipe.transformer, CPU, leaf=False, low_ram=False)
    keep_resident(streamed.pipe.transformer, 1, CPU)
    for generator in (plain, streamed):
        generator.loras.folder = lora.LoraFolder(tmp_path)
    expected = np.asarray(plain.generate_images(with_lora).images[0]).astype(int)
    got = np.asarray(streamed.generate_images(with_lora).images[0]).astype(int)
    blocks = streamed.pipe.transformer.layers
    assert [group_hook(b) is None for b in blocks] == [False, True]
    assert group_hook(blocks[0]) is not None and group_hook(streamed.pipe.transformer) is not None
    assert np.array_equal(got, expected) and np.abs(expected - pixels_of(plain)).max() > 0  # the LoRA acts


def pixels_of(generator) -> np.ndarray:
    return np.asarray(generator.generate_images(PARAMS).images[0]).astype(int)


def test_out_of_memory_in_stream_first_streams_the_resident_blocks_too(tiny_dir, tmp_path, caplog):
    """The first retry stays in stream (same pixels) with every block streamed; only a second failure goes lower."""
    generator = Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path).load()
    expected = pixels_of(generator)
    generator.memory = "stream"  # on the CPU the mode collapses: stream by hand, as apply_memory does on CUDA
    transformer = generator.pipe.transformer
    stream_weights(transformer, CPU, leaf=False, low_ram=False)
    keep_resident(transformer, 1, CPU)
    raised = []

    def out_of_memory_once(step, total):
        if not raised:
            raised.append(step)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with caplog.at_level(logging.WARNING, logger="zstudio.engine"):
        result = generator.generate_images(PARAMS, progress=out_of_memory_once)
    assert "retrying once with every transformer block streamed (1 were resident)" in caplog.text
    assert generator.memory == "stream" and result.metadata[0]["memory_mode"] == "stream"
    assert all(group_hook(block) is not None for block in transformer.layers)
    assert np.array_equal(np.asarray(result.images[0]).astype(int), expected)

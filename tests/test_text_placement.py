"""Where the text encoder lives below resident (zstudio.text_placement): the choice, and what each placement encodes."""

import copy
import importlib.util

import pytest
import torch

from zstudio import models, text_placement
from zstudio.engine import Generator
from zstudio.memory import Z_IMAGE, choose_memory, choose_text, host_needed_gb, needed_gb
from zstudio.speed.text_encoder import TokenEncoder
from zstudio.text_placement import (
    choose_text_placement,
    embedding_error,
    module_gib,
    text_8bit_gib,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GB = 2**30
ALL = ("resident", "offload-text", "8bit", "stream", "lowest")
PLENTY = 128 * GB  # host RAM
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao (extra fp8) absent")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned streaming needs a CUDA GPU")


def placement_at(cap_gib: float, host_bytes: int | None = PLENTY, int8: bool = True, monkeypatch=None) -> tuple:
    """(mode, text placement) that auto gives the full-size model at 1024x1024 with `cap_gib` free."""
    mode = choose_memory("auto", CUDA, int(cap_gib * GB), modes=ALL)[0]
    monkeypatch.setattr(text_placement, "host_available_bytes", lambda: host_bytes)
    monkeypatch.setattr(text_placement, "int8_available", lambda: int8)
    return mode, choose_text(mode, CUDA, int(cap_gib * GB))[0]


def test_each_cap_gets_the_text_encoder_that_fits(monkeypatch):
    """The issue's caps: int8 on the GPU beside the 8-bit transformer at 16 GiB, streamed from a pinned copy below."""
    assert placement_at(40, monkeypatch=monkeypatch) == ("resident", "resident")
    assert placement_at(21, monkeypatch=monkeypatch) == ("offload-text", "resident-8bit")  # 16.3 + 4.1 GiB
    assert placement_at(16, monkeypatch=monkeypatch) == ("8bit", "resident-8bit")  # 11.2 + 4.1 GiB
    assert placement_at(12, monkeypatch=monkeypatch) == ("8bit", "streamed-pinned")
    assert placement_at(8, monkeypatch=monkeypatch) == ("stream", "streamed-pinned")
    assert placement_at(6, monkeypatch=monkeypatch) == ("stream", "streamed-pinned")  # stream peaked at 5.19 GiB
    assert placement_at(5, monkeypatch=monkeypatch) == ("lowest", "streamed-pinned")


def test_without_torchao_or_host_ram_the_encoder_streams(monkeypatch):
    assert placement_at(16, int8=False, monkeypatch=monkeypatch) == ("8bit", "streamed-pinned")
    assert placement_at(12, host_bytes=24 * GB, monkeypatch=monkeypatch) == ("8bit", "streamed")  # 19 + 7.5 + 4
    assert placement_at(8, host_bytes=None, monkeypatch=monkeypatch) == ("stream", "streamed")
    mode, why = choose_text_placement("8bit", CUDA, 12 * GB, 11.2, 7.46, 20 * GB, True, host_needed_gb("8bit"))
    assert mode == "streamed" and "host RAM available 20.0 GiB" in why and "needs 30.5 GiB" in why


def test_after_an_out_of_memory_switch_the_encoder_streams_pinned_only_where_ram_remains(monkeypatch):
    """Weights are loaded by then: only what is still to come (stream's pinned transformer copy) is set aside."""
    monkeypatch.setattr(text_placement, "host_available_bytes", lambda: 20 * GB)
    assert text_placement.default_placement("8bit", CUDA, 7.46) == "streamed-pinned"  # 7.46 + 4 <= 20
    assert text_placement.default_placement("stream", CUDA, 7.46, host_needs_gib=11.46) == "streamed"
    assert text_placement.default_placement("stream", CPU, 7.46) == "resident"


def test_off_cuda_and_in_resident_the_encoder_stays_as_loaded():
    assert choose_text_placement("8bit", CPU, None, 11.2, 7.46, PLENTY)[0] == "resident"
    assert choose_text_placement("resident", CUDA, 80 * GB, 23.6, 7.46, PLENTY)[0] == "resident"


def test_the_estimate_counts_the_int8_encoder_and_the_pinned_copies():
    assert text_8bit_gib(Z_IMAGE.text_encoder) == pytest.approx(4.10, abs=0.01)
    assert needed_gb("8bit", text_8bit=True) == pytest.approx(needed_gb("8bit") + 4.10, abs=0.01)
    assert needed_gb("resident", text_8bit=True) == needed_gb("resident")  # bf16 there already
    assert host_needed_gb("stream") == pytest.approx(host_needed_gb("8bit") + Z_IMAGE.transformer)
    assert host_needed_gb("resident") == 0.0


def test_embedding_error_is_zero_for_equal_states_and_grows_with_noise():
    states = torch.randn(12, 64)
    same = embedding_error(states, states)
    assert same["relative_error"] == 0.0 and same["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    noisy = embedding_error(states, states + 0.1 * torch.randn(12, 64))
    assert 0.05 < noisy["relative_error"] < 0.2 and noisy["cosine_min"] < 1.0


def encode(text_encoder, ids: list[int], device: torch.device = CPU) -> torch.Tensor:
    with torch.inference_mode():
        return TokenEncoder(text_encoder)(ids, device).float().cpu()


def prompt_ids(generator, text: str = "a red fox in fresh snow, morning light") -> list[int]:
    wrapped = generator.pipe.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                           add_generation_prompt=True)  # fmt: skip
    return generator.pipe.tokenizer(wrapped).input_ids


@needs_torchao
def test_int8_text_encoder_encodes_close_to_the_full_precision_one(generator):
    from torchao.quantization import Int8Tensor

    ids = prompt_ids(generator)
    reference = encode(generator.pipe.text_encoder, ids)
    int8 = copy.deepcopy(generator.pipe.text_encoder)
    text_placement.quantize_text_encoder_8bit(int8, CPU)
    assert isinstance(int8.layers[0].mlp.up_proj.weight, Int8Tensor)
    assert module_gib(int8.layers) < 0.35 * module_gib(generator.pipe.text_encoder.layers)  # float32 here
    error = embedding_error(reference, encode(int8, ids))
    assert error["relative_error"] > 0  # quantized, so not the same numbers
    assert error["cosine_min"] > 0.999 and error["relative_error"] < 0.02


def test_a_reloaded_text_encoder_encodes_as_the_loaded_one(generator):
    """The bf16 reload after an int8 encoder must give way (switching down to a streamed mode)."""
    ids = prompt_ids(generator)
    reloaded = models.load_text_encoder(generator.source, generator.dtype)
    assert torch.equal(encode(reloaded, ids), encode(generator.pipe.text_encoder, ids))


@needs_cuda
def test_streaming_from_a_pinned_copy_gives_identical_embeddings(generator):
    ids = prompt_ids(generator)
    reference = encode(copy.deepcopy(generator.pipe.text_encoder).to(CUDA), ids, CUDA)
    for placement in ("streamed-pinned", "streamed"):
        streamed = copy.deepcopy(generator.pipe.text_encoder)
        text_placement.place_text_encoder(streamed, placement, CUDA)
        assert torch.equal(encode(streamed, ids, CUDA), reference), placement


def test_compiled_speeds_run_where_the_transformer_stays_on_the_gpu(tiny_dir):
    generator = Generator(model=str(tiny_dir), device="cpu")
    for memory, speed, expected in (("offload-text", "fast", "fast"), ("8bit", "fast", "fast"),
                                    ("8bit", "fastest", "fast"), ("stream", "fast", "exact"),
                                    ("lowest", "fastest", "exact")):  # fmt: skip
        generator.memory, generator.speed = memory, speed
        generator._match_speed_to_memory()
        assert generator.speed == expected, (memory, speed)


def test_images_record_where_the_text_encoder_was(generator):
    from conftest import SMALL
    from zstudio import GenerationParams

    result = generator.generate_images(GenerationParams(prompt="a cat", num_inference_steps=1, seed=1, **SMALL))
    assert result.metadata[0]["text_encoder"] == "resident" == generator.info()["text_encoder"]


def test_a_host_token_table_encodes_exactly_and_is_nothing_the_streaming_moves(generator):
    """Streamed placements look the prompt's rows up in host memory: the same states, and the table is no
    parameter or buffer (diffusers' offloading hooks move those, 0.78 GB per prompt for Qwen3-4B)."""
    ids = prompt_ids(generator)
    reference = encode(generator.pipe.text_encoder, ids)
    hosted = copy.deepcopy(generator.pipe.text_encoder)
    table = hosted.get_input_embeddings().weight
    text_placement.keep_embedding_on_host(hosted)
    text_placement.keep_embedding_on_host(hosted)  # once is enough: a second call changes nothing
    embedding = hosted.get_input_embeddings()
    assert isinstance(embedding, text_placement.HostEmbedding) and torch.equal(embedding.table, table)
    assert all(p is not table for p in hosted.parameters()) and not list(embedding.parameters())
    assert torch.equal(encode(hosted, ids), reference)

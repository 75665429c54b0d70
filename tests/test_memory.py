import gc

import numpy as np
import pytest
import torch

from conftest import SMALL
from zstudio import GenerationParams, Generator
from zstudio.memory import OutOfMemory, choose_memory
from zstudio.params import ParamError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GB = 2**30


def test_auto_picks_the_fastest_mode_that_fits():
    assert choose_memory("auto", CUDA, 40 * GB)[0] == "resident"
    assert choose_memory("auto", CUDA, 16 * GB)[0] == "offload-text"
    assert choose_memory("auto", CUDA, 14 * GB, 512, 512)[0] == "offload-text"
    assert choose_memory("auto", CUDA, 12 * GB, 512, 512)[0] == "8bit"
    assert choose_memory("auto", CUDA, 12 * GB)[0] == "8bit"
    assert choose_memory("auto", CUDA, 8 * GB)[0] == "stream"
    mode, why = choose_memory("auto", CUDA, 2 * GB)
    assert mode == "lowest" and "may not fit" in why
    assert choose_memory("auto", CPU, None)[0] == "resident"


def test_explicit_modes_and_fallbacks():
    assert choose_memory("stream", CUDA, 80 * GB) == ("stream", "")
    for requested in ("8bit", "stream", "lowest"):
        mode, why = choose_memory(requested, CPU, None)
        assert mode == "offload-text" and "CUDA GPU" in why
    with pytest.raises(ParamError, match="memory: 'tiny' is not one of auto, resident"):
        choose_memory("tiny", CPU, None)


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def oom_at_step(step: int):
    state = {"raised": False}

    def progress(i, total):
        if i == step and not state["raised"]:
            state["raised"] = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    return progress


PARAMS = GenerationParams(prompt="a red circle", **SMALL, num_inference_steps=4, seed=5)


def pixels(result):
    return np.asarray(result.images[0]).astype(int)


def test_auto_recovers_from_out_of_memory_in_the_next_mode(tiny_dir):
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    expected = pixels(generator.generate_images(PARAMS))
    baseline = live_tensors()
    result = generator.generate_images(PARAMS, progress=oom_at_step(2))
    assert generator.memory == "offload-text"
    assert result.metadata[0]["memory_mode"] == "offload-text"
    assert np.abs(pixels(result) - expected).max() <= 1
    del result
    assert live_tensors() <= baseline  # what the failed run took was given back


def test_explicit_mode_reports_the_next_mode_and_keeps_working(tiny_dir):
    generator = Generator(model=str(tiny_dir), device="cpu", memory="resident").load()
    with pytest.raises(OutOfMemory, match="memory mode offload-text needs less: use --memory offload-text"):
        generator.generate_images(PARAMS, progress=oom_at_step(3))
    assert generator.memory == "resident"
    assert pixels(generator.generate_images(PARAMS)).std() > 5


def test_offloaded_text_encoder_gives_the_same_pixels(tiny_dir, generator):
    offloaded = Generator(model=str(tiny_dir), device="cpu", memory="offload-text").load()
    assert offloaded.info()["memory_mode"] == "offload-text"
    assert np.abs(pixels(offloaded.generate_images(PARAMS)) - pixels(generator.generate_images(PARAMS))).max() <= 1


def test_many_generations_do_not_accumulate_tensors(generator):
    """The resident generator keeps nothing per generation beyond its bounded prompt cache."""
    sizes = [(256, 256), (320, 256), (256, 384), (384, 384)]

    def run(i):
        w, h = sizes[i % len(sizes)]
        generator.generate_images(GenerationParams(prompt=f"prompt {i % 3}", width=w, height=h,
                                                   num_inference_steps=1, seed=i))  # fmt: skip

    for i in range(8):
        run(i)
    settled = live_tensors()
    for i in range(8, 40):
        run(i)
    assert live_tensors() <= settled

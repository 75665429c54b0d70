import gc

import numpy as np
import pytest
import torch

from conftest import SMALL
from zstudio import GenerationParams, Generator
from zstudio.memory import (
    HEADROOM_GIB,
    MEASURED_PEAK_GIB,
    NEXT_MODE,
    ModelWeights,
    OutOfMemory,
    available_modes,
    choose_memory,
    needed_gb,
    next_modes,
)
from zstudio.params import ParamError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GB = 2**30


ALL = ("resident", "offload-text", "8bit", "stream", "lowest")
NO_TORCHAO = ("resident", "offload-text", "stream", "lowest")


def test_auto_picks_the_fastest_mode_that_fits():
    assert choose_memory("auto", CUDA, 40 * GB, modes=ALL)[0] == "resident"
    assert choose_memory("auto", CUDA, 23.5 * GB, modes=ALL)[0] == "offload-text"  # 23.38 GiB measured + headroom
    assert choose_memory("auto", CUDA, 16 * GB, modes=ALL)[0] == "8bit"  # offload-text peaked at 16.09
    assert choose_memory("auto", CUDA, 16 * GB, 512, 512, modes=ALL)[0] == "offload-text"
    assert choose_memory("auto", CUDA, 11.5 * GB, modes=ALL)[0] == "8bit"
    assert choose_memory("auto", CUDA, 8 * GB, modes=ALL)[0] == "stream"
    mode, why = choose_memory("auto", CUDA, 2 * GB, modes=ALL)
    assert mode == "lowest" and "may not fit" in why
    assert choose_memory("auto", CPU, None)[0] == "resident"


def test_auto_never_picks_a_mode_whose_dependencies_are_missing():
    """The issue's case: 11.5 GiB free picked 8bit on a default install without torchao, which failed at load."""
    mode, why = choose_memory("auto", CUDA, 11.5 * GB, modes=NO_TORCHAO)
    assert mode == "stream" and "8bit" not in why
    with pytest.raises(ParamError, match="memory: mode 8bit needs torchao"):
        choose_memory("8bit", CUDA, 80 * GB, modes=NO_TORCHAO)
    assert next_modes(NO_TORCHAO)["offload-text"] == "stream"  # out-of-memory retries skip it too
    assert NEXT_MODE == next_modes(available_modes())


def test_estimates_reproduce_the_measured_peaks_and_grow_with_size_and_model():
    for mode, (at_512, at_1024) in MEASURED_PEAK_GIB.items():
        assert needed_gb(mode, 512, 512) == pytest.approx(at_512 + HEADROOM_GIB)
        assert needed_gb(mode, 1024, 1024) == pytest.approx(at_1024 + HEADROOM_GIB)
        assert needed_gb(mode, 2048, 2048) > needed_gb(mode, 1024, 1024)
    small = ModelWeights(transformer=1.0, text_encoder=1.0, vae=0.1)
    assert needed_gb("resident", weights=small) < needed_gb("resident") - 15
    assert needed_gb("stream", weights=small) == pytest.approx(needed_gb("stream"))  # streamed: weights stay off


def test_model_weights_are_read_from_the_folder(tiny_dir):
    weights = ModelWeights.from_folder(tiny_dir)
    # The pipeline's own components (the tiny checkpoint's controlnet/ is loaded only when asked for).
    parts = ("transformer", "text_encoder", "vae")
    on_disk = sum(f.stat().st_size for part in parts for f in (tiny_dir / part).rglob("*.safetensors")) / GB
    assert weights.transformer > 0 and weights.text_encoder > 0 and weights.vae > 0
    assert weights.on_gpu("resident") == pytest.approx(on_disk)


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


def test_auto_memory_is_chosen_again_for_the_model_that_loads(monkeypatch):
    """On a 2 GiB card Z-Image's estimates say `lowest`; the demo model's own weights and size fit resident."""
    import zstudio.engine as engine_module
    from zstudio.models import demo_source

    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: 2 * 2**30)
    generator = engine_module.Generator(model="demo", device="cpu", memory="auto")
    generator.device = torch.device("cuda")  # decided as on a GPU; nothing is loaded or run here
    assert choose_memory("auto", generator.device, 2 * 2**30)[0] == "lowest"
    generator._choose_memory_for(demo_source())
    assert generator.memory == "resident"


def test_a_switch_that_runs_out_of_memory_too_gives_a_clear_error(tiny_dir, monkeypatch):
    generator = Generator(model=str(tiny_dir), device="cpu").load()

    def switch(mode):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, while switching)")

    monkeypatch.setattr(generator, "switch_memory", switch)
    with pytest.raises(OutOfMemory, match="again while moving to memory mode offload-text; restart with --memory"):
        generator.generate_images(PARAMS, progress=oom_at_step(2))
    monkeypatch.undo()
    assert pixels(generator.generate_images(PARAMS)).std() > 5  # still serving in the mode it had

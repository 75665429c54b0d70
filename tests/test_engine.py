import threading

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline

from conftest import SMALL
from zstudio import GenerationCancelled, GenerationParams, Generator, get_generator
from zstudio import engine as engine_module


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def run(generator, **kw):
    return generator.generate_images(
        GenerationParams(**{"prompt": "a red circle on a blue background", **SMALL, "num_inference_steps": 3, **kw})
    )


@pytest.fixture(scope="module")
def reference_pipe(tiny_dir):
    """diffusers' own pipeline on the same folder, called as its model card shows."""
    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cfg", [0.0, 3.0])
def test_pixels_match_diffusers_pipeline(generator, reference_pipe, cfg):
    params = GenerationParams(
        prompt="蓝色背景上的红色圆形, a red circle",
        negative_prompt="blurry, low quality",
        width=256,
        height=320,
        num_inference_steps=4,
        cfg_scale=cfg,
        seed=1234,
        num_images=2,
    )
    ours = generator.generate_images(params)
    reference = reference_pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=256,
        height=320,
        num_inference_steps=4,
        guidance_scale=cfg,
        num_images_per_prompt=2,
        generator=[torch.Generator("cpu").manual_seed(s) for s in ours.seeds],
    ).images
    assert ours.seeds == [1234, 1235]
    for mine, theirs in zip(ours.images, reference):
        assert mine.size == (256, 320)
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1
        assert pixels(mine).std() > 5  # a real picture of noise, not a blank


def test_cfg_and_negative_prompt_change_the_picture(generator):
    plain = pixels(run(generator, seed=7).images[0])
    guided = pixels(run(generator, seed=7, cfg_scale=4.0, negative_prompt="green").images[0])
    other_negative = pixels(run(generator, seed=7, cfg_scale=4.0, negative_prompt="yellow square").images[0])
    assert np.abs(plain - guided).max() > 10
    assert np.abs(guided - other_negative).max() > 10


def test_same_seed_gives_same_pixels(generator):
    first = run(generator, seed=99).images[0]
    generator._prompt_cache.clear()  # also through a fresh prompt encoding
    second = run(generator, seed=99).images[0]
    assert np.array_equal(pixels(first), pixels(second))
    assert not np.array_equal(pixels(first), pixels(run(generator, seed=100).images[0]))


def test_each_batch_image_can_be_remade_alone(generator):
    batch = run(generator, seed=500, num_images=3)
    assert batch.seeds == [500, 501, 502]
    alone = run(generator, seed=502).images[0]
    assert np.abs(pixels(batch.images[2]) - pixels(alone)).max() <= 1
    assert [m["params"]["seed"] for m in batch.metadata] == [500, 501, 502]
    assert all(m["params"]["num_images"] == 1 for m in batch.metadata)


def test_random_seed_is_reported_and_reproduces(generator):
    result = run(generator, seed=-1, num_images=2)
    first = result.seeds[0]
    assert 0 <= first <= 2**32 - 2 and result.seeds[1] == first + 1
    assert result.params.seed == first
    again = run(generator, seed=result.metadata[1]["params"]["seed"]).images[0]
    assert np.abs(pixels(again) - pixels(result.images[1])).max() <= 1


def test_unpadded_prompt_encoding_equals_padded(generator):
    """Right padding under the causal mask does not change the kept hidden states."""
    text = "一只猫坐在窗台上 a cat on a windowsill"
    ours = generator.encode_prompt(text, 512).embeds
    padded = generator.pipe._encode_prompt(text, device=generator.device, max_sequence_length=512)[0]
    assert ours.shape == padded.shape
    torch.testing.assert_close(ours, padded, rtol=1e-4, atol=1e-5)


def test_long_prompt_is_truncated_and_recorded(generator):
    long_prompt = "a very long prompt about a red circle " * 40
    result = run(generator, prompt=long_prompt, max_sequence_length=64, seed=1)
    assert result.metadata[0]["prompt_truncated"] is True
    assert result.metadata[0]["prompt_tokens"] == 64
    short = run(generator, prompt="a red circle", seed=1)
    assert short.metadata[0]["prompt_truncated"] is False
    assert short.metadata[0]["prompt_tokens"] < 64


def test_progress_reports_every_step_and_cancel_stops(generator):
    seen = []
    generator.generate_images(
        GenerationParams(prompt="x", **SMALL, num_inference_steps=5, seed=1),
        progress=lambda i, n: seen.append((i, n)),
    )
    assert seen == [(i, 5) for i in range(1, 6)]

    def cancel_at_two(step, total):
        if step == 2:
            raise GenerationCancelled()

    with pytest.raises(GenerationCancelled):
        generator.generate_images(
            GenerationParams(prompt="x", **SMALL, num_inference_steps=5, seed=1), progress=cancel_at_two
        )
    assert np.asarray(run(generator, seed=1).images[0]).std() > 5  # the generator still works afterwards


def test_generate_returns_paths_time_metadata(generator, tmp_path):
    paths, seconds, metadata = generator.generate(
        prompt="a red circle",
        negative_prompt="",
        **SMALL,
        num_inference_steps=2,
        cfg_scale=0.0,
        num_images=2,
        seed=11,
        output_dir=tmp_path,
    )
    assert len(paths) == 2 and all(p.startswith(str(tmp_path)) and p.endswith(".png") for p in paths)
    assert isinstance(seconds, float) and seconds > 0
    assert metadata["seeds"] == [11, 12]
    assert metadata["params"]["num_inference_steps"] == 2
    assert len(metadata["images"]) == 2
    assert set(metadata["timings"]) == {"encode", "denoise", "decode", "total", "save"}


def test_default_turbo_image_is_diffusers_eight_step_sampling(generator, reference_pipe):
    """The Turbo default is the model card's sampling as diffusers 0.42 runs it: num_inference_steps=8, that is 8
    transformer evaluations at sigmas 1, 7/8, ..., 1/8 (before the shift), then the last step to 0."""
    calls = []
    hook = generator.pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        ours = generator.generate_images(GenerationParams(prompt="a red circle on a blue background", **SMALL, seed=5))
    finally:
        hook.remove()
    assert ours.params.num_inference_steps == 8 and ours.params.cfg_scale == 0.0
    assert len(calls) == 8
    assert ours.metadata[0]["transformer_evaluations"] == 8
    reference = reference_pipe(
        prompt="a red circle on a blue background",
        **SMALL,
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    assert np.abs(pixels(ours.images[0]) - pixels(reference)).max() <= 1
    sigmas = generator.pipe.scheduler.sigmas
    assert len(sigmas) == 9 and float(sigmas[-1]) == 0.0


def test_bad_input_is_rejected_before_model_work(tiny_dir):
    lazy = Generator(model=str(tiny_dir), device="cpu")
    with pytest.raises(ValueError, match="width: 1000 is not a multiple of 16"):
        lazy.generate(prompt="x", width=1000)
    with pytest.raises(ValueError, match="unknown parameter"):
        lazy.generate(prompt="x", guidance=3)
    assert lazy.pipe is None


def test_threads_share_one_generator(generator):
    expected = {s: pixels(run(generator, seed=s).images[0]) for s in (21, 22, 23)}
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = pixels(run(generator, seed=seed).images[0])
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed, image in expected.items():
        assert np.abs(results[seed] - image).max() <= 1


def test_get_generator_is_one_lazy_process_wide_instance(tiny_dir, monkeypatch):
    monkeypatch.setattr(engine_module, "_generator", None)
    first = get_generator(model=str(tiny_dir), device="cpu")
    assert first.pipe is None  # lazy: nothing loaded until the first generation
    assert get_generator() is first
    assert get_generator(model=str(tiny_dir)) is first
    first.load()
    pipe = first.pipe
    first.load()
    assert first.pipe is pipe  # loaded once


def test_warmup_generates_without_saving(tiny_dir, tmp_path):
    warm = Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path)
    seconds = warm.warmup(sizes=((256, 256),))
    assert seconds > 0 and warm.pipe is not None
    assert not tmp_path.exists() or not any(tmp_path.iterdir())

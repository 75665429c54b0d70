"""ControlNet in the compiled speed modes (zstudio.speed.speed_up_controlnet), on the tiny checkpoint, CPU fp32.

The fast modes need a CUDA GPU, so the test installs on a CPU generator what they install on a GPU (the same
functions), with the compiler backend swapped to "eager": dynamo still traces every graph, guards it and recompiles
when a guard fails exactly as with inductor (recompiles are decided before the backend is called), only no kernels
are generated. Counting the graphs dynamo hands to the backend therefore counts compiles, in seconds instead of the
minutes inductor takes on a CPU.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from zstudio import GenerationParams, Generator
from zstudio.engine import control_warmup_runs, warmup_runs
from zstudio.speed import compile as compile_module
from zstudio.speed import speed_up_controlnet, speed_up_transformer
from zstudio.tiny import CONTROLNET_FOLDER


def test_control_on_and_off_after_the_warmup_compiles_nothing(tiny_dir, tmp_path, monkeypatch):
    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    picture = Image.new("RGB", (128, 128), "black")
    ImageDraw.Draw(picture).ellipse((30, 30, 100, 100), fill="white")
    picture.save(tmp_path / "disc.png")
    generator = Generator(model=str(tiny_dir), device="cpu", speed="exact", outputs=tmp_path,
                          controlnet=str(tiny_dir / CONTROLNET_FOLDER)).load()  # fmt: skip

    def request(with_control: bool, n: int = 1, cfg: float = 0.0):
        extra = {"control": str(tmp_path / "disc.png"), "control_scale": 0.9} if with_control else {}
        params = GenerationParams(prompt="a white disc, a longer prompt than the warm-up's", width=128, height=128,
                                  num_inference_steps=2, seed=5, num_images=n, cfg_scale=cfg, **extra)  # fmt: skip
        return [np.asarray(image).astype(int) for image in generator.generate_images(params).images]

    eager_with, eager_without = request(True), request(False)
    monkeypatch.setattr(compile_module, "BACKEND", counting_backend)
    torch._dynamo.reset()
    try:
        speed_up_transformer(generator.pipe.transformer, "fast")
        speed_up_controlnet(generator.controlnet, "fast")
        assert all(b._zstudio_control_forward for b in generator.controlnet.control_layers)  # the compiled middle
        runs = [r.replace(num_inference_steps=1) for r in warmup_runs([(128, 128)], (128, 128))]
        for params in runs + control_warmup_runs(runs, str(tmp_path / "disc.png")):
            generator.generate_images(params)
        warm = len(compiled)
        assert warm > 0  # the warm-up did compile the blocks
        later = [request(True), request(False), request(True, n=3), request(False, n=2), request(True, cfg=2.0)]
        assert len(compiled) == warm  # control switched on and off, other batches, guidance: no new graph
    finally:
        torch._dynamo.reset()
    assert np.abs(later[0][0] - eager_with[0]).max() <= 1  # the compiled ControlNet draws what the eager one does
    assert np.abs(later[1][0] - eager_without[0]).max() <= 1
    assert np.abs(later[0][0] - later[1][0]).max() > 8  # and control still changes the picture


def test_control_benchmark_runs_on_the_tiny_checkpoint(tiny_dir, tmp_path):
    import json

    from zstudio.bench.control import main

    report = main(["--folder", str(tiny_dir), "--json", str(tmp_path / "r.json"), "--size", "128x128", "--steps", "1",
                   "--repeats", "1", "--device", "cpu"])  # fmt: skip
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["per_image_s"].keys() == {"without", "with", "without_again"}
    assert report["ratio"] > 0 and report["graphs_compiled_after_warmup"] == 0


LAYOUTS = {  # diffusers' three ControlNet layouts: Union 2.x, Union 1.0, and control blocks run as the refiner too
    "2.x": {"add_control_noise_refiner": "control_noise_refiner", "control_in_dim": 33},
    "1.0": {"add_control_noise_refiner": None, "control_refiner_layers_places": None, "control_in_dim": 16},
    "control_layers": {"add_control_noise_refiner": "control_layers", "control_in_dim": 33},
}


def _random_controlnet(transformer, places: list[int], **layout):
    from diffusers import ZImageControlNetModel

    from zstudio.tiny import TINY_SIZES, build_controlnet

    config = {**build_controlnet(TINY_SIZES).config, "control_layers_places": places, **layout}
    controlnet = ZImageControlNetModel.from_config(config)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.normal_(0, 0.05)
    return ZImageControlNetModel.from_transformer(controlnet.eval(), transformer)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sync_free_forward_gives_diffusers_hints(tiny_dir, layout):
    """zstudio's ControlNet forward (`speed.control_forward`: no boolean-mask assignments, no all-true masks, no
    hint re-stacking) returns diffusers' `ZImageControlNetModel.forward` hints, for every layout diffusers has, for
    one image and for a batch whose prompts differ in length (padded, so masked). This fails the day diffusers
    changes its forward."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    from zstudio.speed import control_forward

    transformer = ZImageTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    torch.manual_seed(0)
    controlnet = _random_controlnet(transformer, [0, 1], **LAYOUTS[layout])
    in_dim = controlnet.config.control_in_dim
    for lengths in ([7], [7, 40]):  # prompts are padded to 32 tokens: 7 and 40 differ
        latents = [torch.randn(16, 1, 8, 8) for _ in lengths]
        prompts = [torch.randn(n, transformer.config.cap_feat_dim) for n in lengths]
        context = torch.randn(len(lengths), in_dim, 1, 8, 8)
        timestep = torch.full((len(lengths),), 0.4)
        with torch.inference_mode():
            reference = controlnet(latents, timestep, prompts, context, conditioning_scale=0.7)
            control_forward.install(controlnet, ZImageTransformerBlock.forward)
            try:
                ours = controlnet(latents, timestep, prompts, context, conditioning_scale=0.7)
            finally:
                control_forward.uninstall(controlnet)
        assert not any("forward" in vars(m) for m in controlnet.modules())  # diffusers' forward is back
        assert reference.keys() == ours.keys() == set(controlnet.config.control_layers_places)
        for k in reference:
            torch.testing.assert_close(ours[k], reference[k], rtol=1e-5, atol=1e-6)
        assert all(reference[k].abs().max() > 1e-3 for k in reference)  # hints that are not all zero


def test_compiled_control_blocks_do_not_grow_with_the_block_count(tiny_dir, monkeypatch):
    """The compiled ControlNet gives diffusers' hints, and a ControlNet of 6 control blocks compiles no more graphs
    than one of 2: one compiled block function serves every block, the position-dependent parts stay outside."""
    from diffusers import ZImageTransformer2DModel

    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    monkeypatch.setattr(compile_module, "BACKEND", counting_backend)
    transformer = ZImageTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    torch.manual_seed(0)
    counts = []
    for places in ([0, 1], [0, 1, 2, 3, 4, 5]):
        controlnet = _random_controlnet(transformer, places, **LAYOUTS["2.x"])
        latents = [torch.randn(16, 1, 8, 8)]
        prompt = [torch.randn(7, transformer.config.cap_feat_dim)]
        context = torch.randn(1, controlnet.config.control_in_dim, 1, 8, 8)
        timestep = torch.tensor([0.5])
        with torch.inference_mode():
            reference = controlnet(latents, timestep, prompt, context, conditioning_scale=1.0)
            torch._dynamo.reset()
            compiled.clear()
            try:
                compile_module.compile_control_blocks(controlnet)
                ours = controlnet(latents, timestep, prompt, context, conditioning_scale=1.0)
                counts.append(len(compiled))
            finally:
                compile_module.uncompile(controlnet)
                torch._dynamo.reset()
            assert not any("forward" in vars(b) for b in controlnet.modules())  # uncompile restores diffusers'

        assert reference.keys() == ours.keys()
        for k in reference:
            torch.testing.assert_close(ours[k], reference[k], rtol=1e-5, atol=1e-6)
    assert counts[0] == counts[1] and counts[0] > 0


@pytest.mark.parametrize("layout", ["1.0", "2.x"])
def test_transformer_reuses_the_controlnets_refined_tokens_where_they_are_its_own(tiny_dir, layout):
    """Union 1.0's ControlNet runs the transformer's noise and context refiners on the transformer's own inputs, so
    the transformer takes their output (`shared_refiners`) instead of running them again: its velocity is the same
    as with them run, and each refiner ran once a step instead of twice. Union 2.x adds hints inside its noise
    refiner, so nothing is shared there."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    from zstudio.speed import control_forward

    transformer = ZImageTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer").eval()
    torch.manual_seed(1)
    controlnet = _random_controlnet(transformer, [0, 1], **LAYOUTS[layout])
    calls = {"noise": 0, "context": 0}
    refiners = transformer.noise_refiner, transformer.context_refiner
    transformer.noise_refiner[0].register_forward_hook(lambda *a: calls.__setitem__("noise", calls["noise"] + 1))
    transformer.context_refiner[0].register_forward_hook(lambda *a: calls.__setitem__("context", calls["context"] + 1))
    for lengths in ([7, 7], [7, 40]):
        latents = [torch.randn(16, 1, 8, 8) for _ in lengths]
        prompts = [torch.randn(n, transformer.config.cap_feat_dim) for n in lengths]
        context = torch.randn(len(lengths), controlnet.config.control_in_dim, 1, 8, 8)
        timestep = torch.full((len(lengths),), 0.3)
        with torch.inference_mode():
            hints = controlnet(latents, timestep, prompts, context, conditioning_scale=0.8)
            reference = transformer(latents, timestep, prompts, controlnet_block_samples=hints, return_dict=False)[0]
            control_forward.install(controlnet, ZImageTransformerBlock.forward)
            try:
                calls.update(noise=0, context=0)
                hints = controlnet(latents, timestep, prompts, context, conditioning_scale=0.8)
                with control_forward.shared_refiners(transformer, controlnet):
                    ours = transformer(latents, timestep, prompts, controlnet_block_samples=hints, return_dict=False)[0]
            finally:
                control_forward.uninstall(controlnet)
        runs = 1 if layout == "1.0" else 2
        assert calls == {"noise": runs, "context": runs}
    if layout == "1.0":  # a forward whose transformer call never came (it failed), then back to diffusers' forward:
        control_forward.install(controlnet, ZImageTransformerBlock.forward)
        with torch.inference_mode():
            controlnet(latents, timestep, prompts, context, conditioning_scale=0.8)
        assert "_zstudio_refined" in vars(controlnet)
        control_forward.uninstall(controlnet)
        assert "_zstudio_refined" not in vars(controlnet)  # nothing stale for the next transformer call
        assert (transformer.noise_refiner, transformer.context_refiner) == refiners  # put back
        assert "_zstudio_refined" not in vars(controlnet)
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_control_quality_benchmark_runs_on_the_tiny_checkpoint(tiny_dir, tmp_path):
    """The benchmark that holds zstudio's controlled images against diffusers' ZImageControlNetPipeline: on the
    CPU (exact) both draw the same pictures, for both Union layouts."""
    from zstudio.bench.control_quality import main

    report = main(["--folder", str(tiny_dir), "--size", "128", "--steps", "2", "--device", "cpu", "--speed", "exact",
                   "--json", str(tmp_path / "q.json")])  # fmt: skip
    assert sorted(report["psnr_db"]) == ["1.0", "2.1"]
    assert all(score > 40 for scores in report["psnr_db"].values() for score in scores)


def test_union_1_layout_through_the_engine_draws_what_diffusers_forward_draws(tiny_dir, tmp_path, monkeypatch):
    """A Union 1.0-layout ControlNet through the engine with zstudio's forward and shared refiners (installed as the
    fast modes install them, compiler backend "eager") draws the picture diffusers' own forward draws."""
    from zstudio.bench.control_quality import random_controlnet

    random_controlnet("1.0", 128, torch.device("cpu"), torch.float32).save_pretrained(tmp_path / "union1")
    picture = Image.new("RGB", (128, 128), "black")
    ImageDraw.Draw(picture).rectangle((20, 40, 90, 100), fill="white")
    picture.save(tmp_path / "box.png")
    generator = Generator(model=str(tiny_dir), device="cpu", speed="exact", outputs=tmp_path,
                          controlnet=str(tmp_path / "union1")).load()  # fmt: skip
    params = GenerationParams(prompt="a white box", width=128, height=128, num_inference_steps=2, seed=3,
                              control=str(tmp_path / "box.png"), control_scale=1.0)  # fmt: skip
    reference = np.asarray(generator.generate_images(params).images[0]).astype(int)
    monkeypatch.setattr(compile_module, "BACKEND", "eager")
    torch._dynamo.reset()
    try:
        speed_up_controlnet(generator.controlnet, "fast")
        assert generator.controlnet._zstudio_control_forward
        ours = np.asarray(generator.generate_images(params).images[0]).astype(int)
    finally:
        compile_module.uncompile(generator.controlnet)
        torch._dynamo.reset()
    without = np.asarray(generator.generate_images(params.replace(control=None)).images[0]).astype(int)
    assert np.abs(ours - reference).max() <= 1
    assert np.abs(reference - without).max() > 8  # the ControlNet does change the picture

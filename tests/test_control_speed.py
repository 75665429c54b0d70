"""ControlNet in the compiled speed modes (zstudio.speed.speed_up_controlnet), on the tiny checkpoint, CPU fp32.

The fast modes need a CUDA GPU, so the test installs on a CPU generator what they install on a GPU (the same
functions), with the compiler backend swapped to "eager": dynamo still traces every graph, guards it and recompiles
when a guard fails exactly as with inductor (recompiles are decided before the backend is called), only no kernels
are generated. Counting the graphs dynamo hands to the backend therefore counts compiles, in seconds instead of the
minutes inductor takes on a CPU.
"""

import numpy as np
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
        assert all(b._zstudio_compiled_core for b in generator.controlnet.control_layers)  # the compiled middle
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


def test_compiled_control_blocks_match_diffusers_and_do_not_grow_with_the_block_count(tiny_dir, monkeypatch):
    """The control block's forward with its middle compiled gives diffusers' `ZImageControlTransformerBlock.forward`
    outputs exactly (this fails the day diffusers changes the block), and a ControlNet of 6 control blocks compiles
    no more graphs than one of 2: the position-dependent stacking is left out of the graph."""
    from diffusers import ZImageControlNetModel, ZImageTransformer2DModel

    from zstudio.tiny import TINY_SIZES, build_controlnet

    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    monkeypatch.setattr(compile_module, "BACKEND", counting_backend)
    transformer = ZImageTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    torch.manual_seed(0)
    counts = []
    for places in ([0, 1], [0, 1, 2, 3, 4, 5]):
        controlnet = build_controlnet(TINY_SIZES)
        config = {**controlnet.config, "control_layers_places": places}
        controlnet = ZImageControlNetModel.from_config(config)
        with torch.no_grad():
            for p in controlnet.parameters():
                p.normal_(0, 0.05)
        controlnet = ZImageControlNetModel.from_transformer(controlnet.eval(), transformer)
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
            assert not any("forward" in vars(b) for b in controlnet.control_layers)  # uncompile restores diffusers'

        assert reference.keys() == ours.keys() and all(torch.equal(reference[k], ours[k]) for k in reference)
    assert counts[0] == counts[1] and counts[0] > 0

"""ControlNet in the memory modes: the estimate and auto choice count its weights, and the modes accept control.

On the CPU the modes collapse (`choose_memory`): what runs here is the estimate, the choice (for a CUDA device, from
a given free memory), control in offload-text, and the streamed modes' own copies of the transformer's shared parts
(the streaming itself needs CUDA streams)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from zstudio import GenerationParams, Generator
from zstudio.memory import GIB, STREAMED, Z_IMAGE, ModelWeights, choose_memory, needed_gb
from zstudio.tiny import CONTROLNET_FOLDER

UNION_GIB = 6.9  # about the Union 2.1 ControlNet's own bf16 weights (3.7 B parameters)
CUDA = torch.device("cuda")  # choose_memory only reads the device's type: no GPU needed


def test_the_estimate_counts_a_resident_controlnet_but_not_a_streamed_one():
    with_control = ModelWeights(Z_IMAGE.transformer, Z_IMAGE.text_encoder, Z_IMAGE.vae, controlnet=UNION_GIB)
    for mode in ("resident", "offload-text", "8bit"):
        assert needed_gb(mode, weights=with_control) == pytest.approx(needed_gb(mode) + UNION_GIB)
    for mode in STREAMED:
        assert needed_gb(mode, weights=with_control) == pytest.approx(needed_gb(mode))


def test_auto_takes_a_lower_mode_when_the_controlnet_would_not_fit():
    with_control = ModelWeights(Z_IMAGE.transformer, Z_IMAGE.text_encoder, Z_IMAGE.vae, controlnet=UNION_GIB)
    free = int((needed_gb("resident") + 1) * GIB)  # room for the model alone, not for its ControlNet
    assert choose_memory("auto", CUDA, free)[0] == "resident"
    mode, reason = choose_memory("auto", CUDA, free, weights=with_control)
    assert mode == "offload-text" and "needs about" in reason
    assert choose_memory("auto", CUDA, int(12 * GIB), weights=with_control)[0] == "stream"


@pytest.fixture(scope="module")
def disc(tmp_path_factory):
    image = Image.new("RGB", (128, 128), "black")
    ImageDraw.Draw(image).ellipse((30, 30, 100, 100), fill="white")
    path = tmp_path_factory.mktemp("disc") / "disc.png"
    image.save(path)
    return path


def controlled(tiny_dir, tmp_path, memory: str) -> Generator:
    generator = Generator(model=str(tiny_dir), device="cpu", controlnet=str(tiny_dir / CONTROLNET_FOLDER),
                          outputs=tmp_path, memory="offload-text")  # fmt: skip
    generator.memory = memory  # on the CPU the streamed modes collapse to offload-text: force the placement logic
    return generator.load()


def draw(generator: Generator, disc) -> np.ndarray:
    params = GenerationParams(prompt="a white disc", width=128, height=128, num_inference_steps=2, seed=3,
                              control=str(disc), control_scale=0.8)  # fmt: skip
    result = generator.generate_images(params)
    assert result.metadata[0]["memory_mode"] == generator.memory and "control" in result.metadata[0]
    return np.asarray(result.images[0]).astype(int)


def test_the_weights_count_the_configured_controlnet(tiny_dir, tmp_path):
    generator = Generator(model=str(tiny_dir), device="cpu", controlnet=str(tiny_dir / CONTROLNET_FOLDER))
    weights = generator.model_weights(generator.resolve_source())
    size = (tiny_dir / CONTROLNET_FOLDER / "diffusion_pytorch_model.safetensors").stat().st_size / GIB
    assert weights.controlnet == pytest.approx(size) and size > 0
    plain = Generator(model=str(tiny_dir), device="cpu")
    assert plain.model_weights(plain.resolve_source()).controlnet == 0.0


def test_streamed_modes_give_the_controlnet_its_own_copies_and_the_same_pixels(tiny_dir, tmp_path, disc):
    shared = controlled(tiny_dir, tmp_path, "offload-text")
    streamed = controlled(tiny_dir, tmp_path, "stream")
    assert shared.controlnet.noise_refiner is shared.pipe.transformer.noise_refiner
    assert streamed.controlnet.noise_refiner is not streamed.pipe.transformer.noise_refiner
    assert streamed.controlnet.cap_embedder is not streamed.pipe.transformer.cap_embedder
    assert np.array_equal(draw(shared, disc), draw(streamed, disc))

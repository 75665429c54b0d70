"""The full-size Z-Image-Turbo architecture, built with random weights directly on the GPU.

Speed and memory do not depend on weight values, so the benchmark needs no download. Weights are drawn
normal(0, 0.02) (norm scales 1 + that), never zeros, which would hide unwritten outputs and run unrealistically fast.
"""

from __future__ import annotations

import contextlib

import torch

TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512],
)  # fmt: skip
TEXT_ENCODER = dict(
    hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    intermediate_size=9728, vocab_size=151936, max_position_embeddings=40960, rope_theta=1_000_000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip

# alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union-2.1 in diffusers' ZImageControlNetModel layout (VideoX-Fun's
# config/z_image/z_image_control_2.1.yaml: control blocks beside every second transformer layer, a control noise
# refiner, 33 input channels; diffusers' single-file loader tells 2.x apart by `control_layers.14.*`).
CONTROLNET = dict(
    control_layers_places=list(range(0, 30, 2)), control_refiner_layers_places=[0, 1], control_in_dim=33,
    add_control_noise_refiner="control_noise_refiner", all_patch_size=(2,), all_f_patch_size=(1,), dim=3840,
    n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
)  # fmt: skip


# The first release, "Z-Image-Turbo-Fun-Controlnet-Union" (1.0): 6 control blocks, no control refiner, 16 channels.
CONTROLNET_1 = dict(
    control_layers_places=[0, 5, 10, 15, 20, 25], control_in_dim=16, all_patch_size=(2,), all_f_patch_size=(1,),
    dim=3840, n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
)  # fmt: skip
UNIONS = {"2.1": CONTROLNET, "1.0": CONTROLNET_1}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def randomize_(module: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32) * std
        if param.dim() == 1 and "norm" in name.lower():
            noise += 1.0
        param.copy_(noise)


def build_transformer(device: torch.device, dtype: torch.dtype, generator: torch.Generator):
    """The full-size transformer alone, random weights drawn from `generator` on `device`."""
    from diffusers import ZImageTransformer2DModel

    with torch.device(device), _default_dtype(dtype):
        transformer = ZImageTransformer2DModel(**TRANSFORMER)
        randomize_(transformer, generator)
    return transformer.eval()


def build_controlnet(device: torch.device, dtype: torch.dtype, generator: torch.Generator, **config):
    """The full-size Union 2.x ControlNet's own blocks (`CONTROLNET`, or `config`), random weights on `device`; it
    takes the transformer's embedders and refiners when installed (`Generator.install_controlnet`)."""
    from diffusers import ZImageControlNetModel

    with torch.device(device), _default_dtype(dtype):
        controlnet = ZImageControlNetModel(**(config or CONTROLNET))
        randomize_(controlnet, generator)
    return controlnet.eval()


def build_full_pipeline(device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A ZImagePipeline of the real sizes with random weights; the tokenizer is zstudio's small BPE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    from ..tiny import build_tokenizer

    rng = torch.Generator(device).manual_seed(seed)
    transformer = build_transformer(device, dtype, rng)
    with torch.device(device), _default_dtype(dtype):
        text_encoder = Qwen3Model(Qwen3Config(**TEXT_ENCODER))
        randomize_(text_encoder, rng)
        vae = AutoencoderKL(**VAE)
        randomize_(vae, rng)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
        tokenizer=build_tokenizer(), scheduler=scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


RANDOM = "random-full-size"


def random_generator(device: str = "cuda", **kwargs):
    """A `Generator` over `build_full_pipeline`: what the GPU benchmarks time (speed and memory do not depend on the
    weight values). `kwargs` go to `Generator.from_pipeline` (speed, memory, outputs)."""
    from pathlib import Path

    from ..engine import Generator
    from ..models import TURBO, ModelSource

    source = ModelSource(spec=RANDOM, path=Path("."), profile=TURBO)
    return Generator.from_pipeline(build_full_pipeline(torch.device(device)), source, **kwargs)

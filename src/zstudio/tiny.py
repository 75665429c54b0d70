"""`make-tiny`: a complete, tiny, randomly initialised Z-Image checkpoint in the real diffusers layout.

Every test loads it through the same `from_pretrained` code as the real 33 GB model, so the loading,
encoding, sampling and decoding paths are exercised for real, only at a few MB.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

# Qwen's chat template, reduced to what the pipeline uses: one user turn, then the assistant's opening,
# with the `enable_thinking` switch that Qwen3 templates carry.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TOKENIZER_VOCAB_SIZE = 1024
CONTROLNET_FOLDER = "controlnet"  # the tiny ControlNet, inside the tiny checkpoint's folder
CONTROL_IN_DIM = 33  # as Union 2.x: control latents (16) + inpainting mask (1) + masked-image latents (16)


@dataclass(frozen=True)
class Sizes:
    """The knobs that make a checkpoint tiny; the demo model uses the same builder with larger ones."""

    text_hidden: int = 32
    text_layers: int = 3
    dim: int = 32
    n_layers: int = 2
    n_refiner_layers: int = 1
    n_heads: int = 2
    axes_dims: tuple[int, int, int] = (8, 4, 4)  # sums to dim / n_heads
    vae_channels: tuple[int, ...] = (16, 16, 32, 32)
    vae_groups: int = 8


TINY_SIZES = Sizes()


def corpus_lines() -> list[str]:
    text = resources.files("zstudio").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer():
    """Train a small byte-level BPE with Qwen2's normaliser and pre-tokeniser, wrapped as `Qwen2Tokenizer`."""
    from tokenizers import Tokenizer, trainers
    from transformers import Qwen2Tokenizer

    template = Qwen2Tokenizer()  # empty vocab; carries Qwen2's normaliser, pre-tokeniser and decoder
    backend: Tokenizer = template.backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=_byte_alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_lines(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def build_components(seed: int = 0, sizes: Sizes = TINY_SIZES) -> dict:
    """The five pipeline components, each initialised from `seed` alone."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    transformer = build_transformer(sizes)
    torch.manual_seed(seed + 1)
    vae = build_vae(sizes)
    torch.manual_seed(seed + 2)
    text_encoder = build_text_encoder(sizes, len(tokenizer))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def build_transformer(sizes: Sizes):
    """A `ZImageTransformer2DModel` of these sizes, initialised from torch's global generator."""
    from diffusers import ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel(
        in_channels=16,
        dim=sizes.dim,
        n_layers=sizes.n_layers,
        n_refiner_layers=sizes.n_refiner_layers,
        n_heads=sizes.n_heads,
        n_kv_heads=sizes.n_heads,
        cap_feat_dim=sizes.text_hidden,
        axes_dims=list(sizes.axes_dims),
        axes_lens=[1024, 512, 512],
    )
    with torch.no_grad():  # created with torch.empty upstream: give them defined values
        transformer.x_pad_token.normal_(0.0, 0.02)
        transformer.cap_pad_token.normal_(0.0, 0.02)
    return transformer


def build_vae(sizes: Sizes):
    """A Flux-style 16-channel `AutoencoderKL`; each entry of `vae_channels` is one 2x down/up-sampling block."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(sizes.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(sizes.vae_channels),
        block_out_channels=list(sizes.vae_channels),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=sizes.vae_groups,
        sample_size=256,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_text_encoder(sizes: Sizes, vocab_size: int):
    """A small `Qwen3Model` standing in for Qwen3-4B."""
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(
        Qwen3Config(
            hidden_size=sizes.text_hidden,
            intermediate_size=2 * sizes.text_hidden,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=vocab_size,
            max_position_embeddings=1024,
            rope_theta=1_000_000.0,
        )
    )


def build_controlnet(sizes: Sizes):
    """A `ZImageControlNetModel` matching `build_transformer(sizes)`, laid out as the Union 2.x releases are: control
    blocks on transformer layers 0 and 1, a control noise refiner, and a 33-channel control input (16 control-image
    latents, 1 inpainting mask, 16 masked-image latents). Initialised from torch's global generator."""
    from diffusers import ZImageControlNetModel

    controlnet = ZImageControlNetModel(
        control_layers_places=list(range(sizes.n_layers)),
        control_refiner_layers_places=list(range(sizes.n_refiner_layers)),
        control_in_dim=CONTROL_IN_DIM,
        add_control_noise_refiner="control_noise_refiner",
        dim=sizes.dim,
        n_refiner_layers=sizes.n_refiner_layers,
        n_heads=sizes.n_heads,
        n_kv_heads=sizes.n_heads,
    )
    with torch.no_grad():  # diffusers zero-initialises the hint projections; random ones make the hints count
        for name, parameter in controlnet.named_parameters():
            if name.endswith(("after_proj.weight", "before_proj.weight")):
                parameter.normal_(0.0, 0.2)
    return controlnet.eval()


def make_tiny(directory: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny checkpoint to `directory` atomically (built aside, then renamed into place), with a tiny
    ControlNet for its transformer in `controlnet/`: a ControlNet folder of the real layout (config.json +
    diffusion_pytorch_model.safetensors), loaded as `--controlnet DIR/controlnet`."""
    from diffusers import ZImagePipeline

    from .models import quiet_loading

    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True or pick another folder")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        pipe = ZImagePipeline(**build_components(seed))
        with quiet_loading():
            pipe.save_pretrained(staging, safe_serialization=True)
            torch.manual_seed(seed + 3)
            build_controlnet(TINY_SIZES).save_pretrained(staging / CONTROLNET_FOLDER, safe_serialization=True)
        (staging / "zstudio.json").write_text(
            json.dumps({"name": "zstudio-tiny", "seed": seed, "profile": "turbo"}, indent=2) + "\n"
        )
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target

"""Memory modes: where each component lives, chosen automatically from the card's free memory.

| mode          | what                                                                               |
|---------------|------------------------------------------------------------------------------------|
| resident      | everything on the GPU (fastest)                                                    |
| offload-text  | text encoder in CPU memory, its layers streamed through the GPU to encode a new    |
|               | prompt (repeated prompts come from a cache); transformer and VAE resident          |
| 8bit          | + the transformer's large linear layers in 8 bits (float8 on GPUs with fp8 tensor  |
|               | cores, int8 weight-only elsewhere; torchao): half its memory, approximate pixels   |
| stream        | text encoder as above; the transformer's bf16 blocks streamed from CPU memory one  |
|               | at a time, transfers overlapped with compute on a CUDA stream (group offloading)   |
| lowest        | + leaf-level streaming and a tiled, sliced VAE decode                              |

The memory each mode needs is an estimate (weights plus activations scaling with pixels, below) that `auto`
compares with the card's free memory; `python -m zstudio.bench.memory` measures the real peaks.
"""

from __future__ import annotations

import logging

import torch

from .params import check_choice

log = logging.getLogger(__name__)

MEMORY_MODES = ("resident", "offload-text", "8bit", "stream", "lowest")
NEXT_MODE = {"resident": "offload-text", "offload-text": "8bit", "8bit": "stream", "stream": "lowest", "lowest": None}
# Streamed modes keep bf16 weights: diffusers 0.42's CUDA-stream offloading cannot move torchao's 8-bit tensors.
EIGHT_BIT = ("8bit",)
STREAMED = ("stream", "lowest")
WEIGHTS_GB = {"resident": 20.5, "offload-text": 12.5, "8bit": 6.8, "stream": 1.5, "lowest": 0.5}
# Estimated, not yet measured at batch 1: the 26.6 GB peak in docs/BENCHMARKS.md includes batch-4 runs. At
# 1024x1024 one transformer layer's largest tensors are ~0.1 GB (4224 tokens x 10240 x bf16) and the VAE decode's
# ~0.3 GB (128 channels x 1024² x bf16), a few alive at a time.
ACTIVATIONS_GB_AT_1MP = 2.5
HEADROOM_GB = 0.75


class OutOfMemory(RuntimeError):
    """A generation ran out of GPU memory; the message names the next mode that would fit."""


def needed_gb(mode: str, width: int = 1024, height: int = 1024) -> float:
    activations = ACTIVATIONS_GB_AT_1MP * width * height / 2**20
    if mode == "lowest":
        activations /= 2  # tiled decode; the transformer's activations stay
    return WEIGHTS_GB[mode] + activations + HEADROOM_GB


def choose_memory(requested: str, device: torch.device, free_bytes: int | None, width: int = 1024,
                  height: int = 1024) -> tuple[str, str]:  # fmt: skip
    """(mode, reason): `auto` takes the fastest mode whose estimate fits the free memory for this size."""
    requested = check_choice("memory", requested, ("auto", *MEMORY_MODES))
    if device.type != "cuda":
        if requested in ("8bit", *STREAMED):
            return "offload-text", (f"memory mode {requested} (8-bit or streamed weights) is for CUDA GPUs; "
                                    f"on {device} using offload-text")  # fmt: skip
        return ("resident" if requested == "auto" else requested), ""
    if requested != "auto":
        return requested, ""
    free_gb = (free_bytes or 0) / 2**30
    for mode in MEMORY_MODES:
        if needed_gb(mode, width, height) <= free_gb:
            return mode, f"memory mode {mode}: needs about {needed_gb(mode, width, height):.1f} GB, {free_gb:.1f} free"
    return "lowest", f"memory mode lowest: only {free_gb:.1f} GB free; even this mode may not fit"


def quantize_8bit(transformer, device: torch.device) -> str:
    """8-bit weights for the large linears, quantized on the GPU one layer at a time (no full bf16 copy there)."""
    from .speed.fp8 import float8_config, fp8_supported, large_linear_filter

    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise RuntimeError("8-bit memory modes need torchao: pip install 'zstudio[fp8]' (or torchao)") from None
    if getattr(transformer, "_zstudio_8bit", None):
        return transformer._zstudio_8bit
    if fp8_supported(device)[0]:
        kind, config = "float8", float8_config()
    else:
        kind, config = "int8 weight-only", Int8WeightOnlyConfig(set_inductor_config=False)
    quantize_(transformer, config, filter_fn=large_linear_filter, device=device)
    transformer._zstudio_8bit = kind
    log.info("transformer linears quantized to %s", kind)
    return kind


def apply_memory(pipe, mode: str, device: torch.device) -> None:
    """Place the components for `mode`; the pipeline may start anywhere (loading puts it in CPU memory)."""
    pipe.vae.to(device)
    if device.type != "cuda":
        pipe.text_encoder.to(device)
        pipe.transformer.to(device)
        return
    if mode == "resident":
        pipe.text_encoder.to(device)
    else:  # it runs once per new prompt: stream its layers through the GPU instead of moving 8 GB in and out
        # No pinned copy: it runs once per new prompt, and the copy would cost 8 GB of host RAM.
        stream_weights(pipe.text_encoder, device, leaf=False, low_ram=True)
    if mode in EIGHT_BIT:
        quantize_8bit(pipe.transformer, device)
    if mode not in STREAMED:
        pipe.transformer.to(device)
        return
    stream_weights(pipe.transformer, device, leaf=mode == "lowest", low_ram=mode == "lowest")
    if mode == "lowest":
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()


def stream_weights(module: torch.nn.Module, device: torch.device, leaf: bool, low_ram: bool) -> None:
    """Keep `module`'s weights in pinned CPU memory and bring them to `device` one block (or one leaf layer) at a
    time, the next transfer overlapped with the current block's compute on a side CUDA stream.

    `low_ram` pins each group only while it transfers instead of keeping a pinned copy of every weight. Measured
    (docs/BENCHMARKS.md): with the copies, host RAM peaks at 49 GB for 20.5 GB of weights; without, 23.4 GB, but
    the streamed transformer is about twice as slow (5.1 s against 2.6 s at 1024x1024). `lowest` takes the lean
    way; `stream` the fast one."""
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

    kind = "leaf_level" if leaf else "block_level"
    hook = _get_top_level_group_offload_hook(module)
    if hook is not None and hook.config.offload_type.value == kind:
        return
    _stop_streaming(module)
    module.to("cpu")
    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=kind,
        num_blocks_per_group=None if leaf else 1,
        use_stream=True,
        low_cpu_mem_usage=low_ram,
    )


def _stop_streaming(module: torch.nn.Module) -> None:
    """Remove diffusers' group-offloading hooks, so that a lower mode can put its own in place."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
        _is_group_offload_enabled,
    )

    if not _is_group_offload_enabled(module):
        return
    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)


def free_after_failure(device: torch.device) -> None:
    """Give back what a failed generation held, so the next one starts from the same baseline."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

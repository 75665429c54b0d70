"""Memory modes: where each component lives, chosen automatically from the card's free memory.

| mode          | what                                                                               |
|---------------|------------------------------------------------------------------------------------|
| resident      | everything on the GPU (fastest; about 27 GB at 1024x1024 measured on the H100)     |
| offload-text  | text encoder in CPU memory, moved in only to encode a new prompt (prompts repeat:  |
|               | cached embeddings skip it); transformer and VAE resident                           |
| stream        | + the transformer's blocks streamed from CPU memory one at a time, transfers       |
|               | overlapped with compute on a CUDA stream (diffusers group offloading)              |
| lowest        | + leaf-level streaming and a tiled, sliced VAE decode                              |

The 8-bit-weight modes of the memory issue are not here yet. The memory each mode needs is an estimate (weights
plus activations scaling with pixels, below); the modes' own peaks are still to be measured on a GPU.
"""

from __future__ import annotations

import logging

import torch

from .params import check_choice

log = logging.getLogger(__name__)

MEMORY_MODES = ("resident", "offload-text", "stream", "lowest")
NEXT_MODE = {"resident": "offload-text", "offload-text": "stream", "stream": "lowest", "lowest": None}
WEIGHTS_GB = {"resident": 20.5, "offload-text": 12.5, "stream": 1.5, "lowest": 0.5}
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
        if requested in ("stream", "lowest"):
            return "offload-text", f"memory mode {requested} streams to a CUDA GPU; on {device} using offload-text"
        return ("resident" if requested == "auto" else requested), ""
    if requested != "auto":
        return requested, ""
    free_gb = (free_bytes or 0) / 2**30
    for mode in MEMORY_MODES:
        if needed_gb(mode, width, height) <= free_gb:
            return mode, f"memory mode {mode}: needs about {needed_gb(mode, width, height):.1f} GB, {free_gb:.1f} free"
    return "lowest", f"memory mode lowest: only {free_gb:.1f} GB free; even this mode may not fit"


def apply_memory(pipe, mode: str, device: torch.device) -> None:
    """Place the components for `mode`; the pipeline may start anywhere (loading puts it in CPU memory)."""
    pipe.vae.to(device)
    pipe.text_encoder.to(device if mode == "resident" else torch.device("cpu"))
    if mode in ("resident", "offload-text") or device.type != "cuda":
        pipe.transformer.to(device)
        return
    pipe.transformer.to("cpu")
    pipe.transformer.enable_group_offload(
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level" if mode == "stream" else "leaf_level",
        num_blocks_per_group=1 if mode == "stream" else None,
        use_stream=True,
    )
    if mode == "lowest":
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()


def free_after_failure(device: torch.device) -> None:
    """Give back what a failed generation held, so the next one starts from the same baseline."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

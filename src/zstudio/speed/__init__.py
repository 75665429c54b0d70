"""Speed modes, chosen by name. Each technique lives in its own module; this one decides which apply.

| mode    | what it does                                                              | output            |
|---------|---------------------------------------------------------------------------|-------------------|
| eager   | diffusers' modules as loaded                                              | reference         |
| exact   | preferred SDPA backend (cuDNN on Hopper), no compile                      | within fp rounding|
| fast    | exact + real-valued RoPE, the transformer's blocks and the VAE decoder    | within bf16 noise |
|         | compiled with dynamic shapes; the text encoder in 4 length buckets        |                   |
|         | replayed as CUDA graphs (ZSTUDIO_CUDA_GRAPHS=text, resident on CUDA)      |                   |
| fastest | fast + fp8 matmuls (torchao), Hopper/Ada                                  | approximate       |
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..params import check_choice

log = logging.getLogger(__name__)

SPEED_MODES = ("eager", "exact", "fast", "fastest")
GRAPH_CHOICES = ("off", "text", "all")  # what the fast modes replay as CUDA graphs (ZSTUDIO_CUDA_GRAPHS)


def choose_speed(requested: str, device: torch.device) -> tuple[str, str]:
    """Return (mode, reason): `auto` is the fastest exact mode the device supports; others fall back with a reason."""
    requested = check_choice("speed", requested, ("auto", *SPEED_MODES))
    if device.type != "cuda":
        if requested in ("fast", "fastest"):
            return "exact", f"{requested} needs a CUDA GPU (torch.compile and fp8 kernels); using exact on {device}"
        if requested == "auto":
            return "exact", f"on {device} the compiled and fp8 paths do not pay; using exact"
        return requested, ""
    if requested == "auto":
        return "fast", ""
    if requested == "fastest":
        from .fp8 import fp8_supported

        ok, why = fp8_supported(device)
        if not ok:
            return "fast", f"fastest unavailable ({why}); using fast"
    return requested, ""


def apply_speed(pipe, mode: str, graphs: str = "off", cache_dir: Path | None = None):
    """Install the mode's techniques on a loaded pipeline (once); returns the text encoder runner to use.

    `graphs` (GRAPH_CHOICES) says what replays as CUDA graphs: nothing (`off`, and always where weights move between
    devices: captured graphs pin their memory), the text encoder in 4 length buckets captured from its eager modules
    (`text`, the default), or also the whole transformer as one graph (`all`). Measurements: docs/BENCHMARKS.md."""
    from .text_encoder import BUCKETS, TokenEncoder

    if mode == "eager":
        return TokenEncoder(pipe.text_encoder)
    speed_up_transformer(pipe.transformer, mode, graphs=graphs == "all")
    if mode in ("fast", "fastest"):
        from .compile import compile_vae_decoder, use_persistent_cache

        if cache_dir is not None:
            use_persistent_cache(cache_dir)
        compile_vae_decoder(pipe.vae)
        if graphs != "off":
            pad_id = pipe.tokenizer.pad_token_id or 0
            return TokenEncoder(pipe.text_encoder, pad_id=pad_id, buckets=BUCKETS, graphs=True)
    return TokenEncoder(pipe.text_encoder)


def speed_up_transformer(transformer, mode: str, whole: bool = False, graphs: bool = False) -> None:
    """The transformer's part of a mode: compiled blocks with dynamic shapes (speed.compile), or the whole model as
    one graph (`whole`; with `graphs` also replayed as CUDA graphs)."""
    from .attention import use_fast_attention

    use_fast_attention(transformer, real_rope=mode in ("fast", "fastest"))
    if mode == "fastest":
        from .fp8 import quantize_fp8

        quantize_fp8(transformer)
    if mode in ("fast", "fastest"):
        from .compile import compile_blocks, compile_transformer

        if whole or graphs:
            compile_transformer(transformer, graphs=graphs)
        else:
            compile_blocks(transformer)


def speed_up_controlnet(controlnet, mode: str) -> None:
    """The ControlNet's part of a mode, as the transformer's: the same attention processor (it shares the
    transformer's rotary embedder, real-valued in the fast modes, which diffusers' processor cannot take) and, in the
    fast modes, its own blocks compiled with dynamic shapes. Its weights stay bf16 in `fastest` (no fp8): its hints
    are added to the transformer's activations, and a bf16 ControlNet keeps them as trained."""
    if mode == "eager":
        return
    from .attention import use_fast_attention

    use_fast_attention(controlnet, real_rope=mode in ("fast", "fastest"))
    if mode in ("fast", "fastest"):
        from .compile import compile_control_blocks

        compile_control_blocks(controlnet)

"""Speed modes, chosen by name. Each technique lives in its own module; this one decides which apply.

| mode    | what it does                                                              | output            |
|---------|---------------------------------------------------------------------------|-------------------|
| eager   | diffusers' modules as loaded                                              | reference         |
| exact   | preferred SDPA backend (cuDNN on Hopper), no compile                      | within fp rounding|
| fast    | exact + real-valued RoPE, torch.compile of the transformer and the VAE    | within bf16 noise |
|         | decoder, text encoder padded to 4 bucket lengths and run as CUDA graphs   |                   |
| fastest | fp8 matmuls (torchao) + compiled blocks, Hopper/Ada; EXPERIMENTAL       | approximate       |
"""

from __future__ import annotations

import logging

import torch

from ..params import check_choice

log = logging.getLogger(__name__)

SPEED_MODES = ("eager", "exact", "fast", "fastest")
GRAPH_CHOICES = ("text", "all", "off")  # what the fast modes replay as CUDA graphs (ZSTUDIO_CUDA_GRAPHS)


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


def apply_speed(pipe, mode: str, graphs: str = "text"):
    """Install the mode's techniques on a loaded pipeline (once); returns the text encoder runner to use.

    `graphs` (GRAPH_CHOICES) says what replays as CUDA graphs: the text encoder (default: 50 → 7 ms per prompt),
    also the transformer (`all`: opt-in, it measured only ~1% faster at 1024x1024), or nothing (`off`, and always
    where weights move between devices: captured graphs pin their memory)."""
    from .text_encoder import BUCKETS, TokenEncoder

    if mode == "eager":
        return TokenEncoder(pipe.text_encoder)
    speed_up_transformer(pipe.transformer, mode, graphs=graphs == "all")
    if mode in ("fast", "fastest"):
        from .compile import compile_vae_decoder

        compile_vae_decoder(pipe.vae)
        pad_id = pipe.tokenizer.pad_token_id or 0
        if graphs != "off":
            return TokenEncoder(pipe.text_encoder, pad_id=pad_id, buckets=BUCKETS, graphs=True)
    return TokenEncoder(pipe.text_encoder)


def speed_up_transformer(transformer, mode: str, regional: bool | None = None, graphs: bool = False) -> None:
    """The transformer's part of a mode. `regional` compiles the repeated blocks only (default: for fastest);
    `graphs` replays the whole-model compile as CUDA graphs."""
    from .attention import use_fast_attention

    use_fast_attention(transformer, real_rope=mode in ("fast", "fastest"))
    if mode == "fastest":
        from .fp8 import quantize_fp8

        quantize_fp8(transformer)
    if mode in ("fast", "fastest"):
        from .compile import compile_blocks, compile_transformer

        regional = mode == "fastest" if regional is None else regional
        if regional:
            compile_blocks(transformer)
        else:
            compile_transformer(transformer, graphs=graphs)

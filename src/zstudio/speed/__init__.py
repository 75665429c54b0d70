"""Speed modes, chosen by name. Each technique lives in its own module; this one decides which apply.

| mode    | what it does                                                              | output            |
|---------|---------------------------------------------------------------------------|-------------------|
| eager   | diffusers' modules as loaded                                              | reference         |
| exact   | preferred SDPA backend (cuDNN on Hopper), no compile                      | within fp rounding|
| fast    | exact + real-valued RoPE, torch.compile of the transformer blocks and the | within bf16 noise |
|         | VAE decoder, text encoder padded to 4 bucket lengths and run as CUDA graphs |                 |
| fastest | fp8 matmuls (torchao) + compiled blocks, Hopper/Ada; EXPERIMENTAL       | approximate       |
"""

from __future__ import annotations

import logging

import torch

from ..params import check_choice

log = logging.getLogger(__name__)

SPEED_MODES = ("eager", "exact", "fast", "fastest")


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


def apply_speed(pipe, mode: str, text_graphs: bool = True):
    """Install the mode's techniques on a loaded pipeline (once); returns the text encoder runner to use.

    `text_graphs=False` where the text encoder moves between devices (captured graphs pin its memory)."""
    from .text_encoder import BUCKETS, TokenEncoder

    if mode == "eager":
        return TokenEncoder(pipe.text_encoder)
    from .attention import use_fast_attention

    use_fast_attention(pipe.transformer, real_rope=mode in ("fast", "fastest"))
    if mode == "fastest":
        from .fp8 import quantize_fp8

        quantize_fp8(pipe.transformer)
    if mode in ("fast", "fastest"):
        from .compile import compile_blocks, compile_transformer, compile_vae_decoder

        (compile_blocks if mode == "fastest" else compile_transformer)(pipe.transformer)
        compile_vae_decoder(pipe.vae)
        pad_id = pipe.tokenizer.pad_token_id or 0
        if text_graphs:
            return TokenEncoder(pipe.text_encoder, pad_id=pad_id, buckets=BUCKETS, graphs=True)
    return TokenEncoder(pipe.text_encoder)

"""Speed modes, chosen by name. Each technique lives in its own module; this one decides which apply.

| mode    | what it does                                                              | output            |
|---------|---------------------------------------------------------------------------|-------------------|
| eager   | diffusers' modules as loaded                                              | reference         |
| exact   | real-valued RoPE + preferred SDPA backend (cuDNN on Hopper), no compile   | within fp rounding|
| fast    | exact + torch.compile of the transformer blocks and the VAE decoder       | within bf16 noise |
| fastest | fast + float8 matmuls in the transformer (torchao), Hopper/Ada GPUs       | approximate       |
"""

from __future__ import annotations

import logging

import torch

from ..params import ParamError

log = logging.getLogger(__name__)

SPEED_MODES = ("eager", "exact", "fast", "fastest")


def choose_speed(requested: str, device: torch.device) -> tuple[str, str]:
    """Return (mode, reason): `auto` is the fastest exact mode the device supports; others fall back with a reason."""
    requested = (requested or "auto").strip().lower()
    if requested not in (*SPEED_MODES, "auto"):
        raise ParamError("speed", f"{requested!r} is not one of auto, {', '.join(SPEED_MODES)}")
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


def apply_speed(pipe, mode: str) -> None:
    """Install the mode's techniques on a loaded pipeline (once, before the first generation)."""
    if mode == "eager":
        return
    from .attention import use_fast_attention

    use_fast_attention(pipe.transformer)
    if mode == "fastest":
        from .fp8 import quantize_fp8

        quantize_fp8(pipe.transformer)
    if mode in ("fast", "fastest"):
        from .compile import compile_transformer, compile_vae_decoder

        compile_transformer(pipe.transformer)
        compile_vae_decoder(pipe.vae)

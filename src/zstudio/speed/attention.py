"""Attention with the fastest SDPA backend the GPU has, and a real-valued rotary embedding for the compiler.

diffusers' Z-Image processor applies RoPE through complex numbers, which torch.compile cannot generate code for,
and leaves SDPA's backend choice to the default order (flash before cuDNN). Here the rotary tables are kept as
(cos, sin) pairs and rotated with real arithmetic in float32 — the same operations the complex product performs —
and SDPA prefers cuDNN, then flash, then the others.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PREFERRED_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


BACKEND_NAMES = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def prefer_backends(names: list[str]) -> None:
    """Change the SDPA preference order (benchmarks); set it before the first compile, which bakes the choice in."""
    PREFERRED_BACKENDS[:] = [BACKEND_NAMES[n] for n in names]


def _backend_context():
    try:
        return sdpa_kernel(PREFERRED_BACKENDS, set_priority=True)
    except TypeError:  # torch < 2.6 has no priority order: keep its default choice
        return contextlib.nullcontext()


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); freqs: (batch, seq, head_dim/2, 2) holding (cos, sin)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[..., 0].unsqueeze(2), freqs[..., 1].unsqueeze(2)
    out = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def rotate_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """diffusers' own rotation: fewer kernels in eager mode, but the compiler cannot generate code for it."""
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * freqs.unsqueeze(2)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class RealRopeEmbedder:
    """Drop-in for diffusers' RopeEmbedder that returns (cos, sin) tables instead of complex ones."""

    def __init__(self, original):
        self.theta = original.theta
        self.axes_dims = original.axes_dims
        self.axes_lens = original.axes_lens
        self.tables: list[torch.Tensor] | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        from diffusers.models.transformers.transformer_z_image import RopeEmbedder

        if self.tables is None or self.tables[0].device != ids.device:
            complex_tables = RopeEmbedder.precompute_freqs_cis(self.axes_dims, self.axes_lens, theta=self.theta)
            self.tables = [torch.view_as_real(t).to(ids.device) for t in complex_tables]
        return torch.cat([table[ids[:, i]] for i, table in enumerate(self.tables)], dim=-2)


class FastZImageAttnProcessor:
    """Z-Image single-stream attention: same math as diffusers' processor, real RoPE, preferred backends."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            rope = rotate_complex if freqs_cis.is_complex() else rotate
            query, key = rope(query, freqs_cis), rope(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        if self._parallel_config is not None:  # zstudio.parallel: diffusers' Ulysses all-to-all around SDPA
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, parallel_config=self._parallel_config
            )
            return attn.to_out[0](out.flatten(2, 3).to(query.dtype))
        with _backend_context():
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask
            )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        return attn.to_out[0](out)


def use_fast_attention(transformer, real_rope: bool = True) -> None:
    """Swap in the backend-preferring processor on every attention layer, and the real-valued RoPE if asked."""
    from diffusers.models.controlnets.controlnet_z_image import ZSingleStreamAttnProcessor as ControlProcessor
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    if real_rope and not isinstance(transformer.rope_embedder, RealRopeEmbedder):
        transformer.rope_embedder = RealRopeEmbedder(transformer.rope_embedder)
    processor = FastZImageAttnProcessor()
    for module in transformer.modules():  # the ControlNet's blocks carry diffusers' copy of the processor class
        if isinstance(getattr(module, "processor", None), (ZSingleStreamAttnProcessor, ControlProcessor)):
            module.processor = processor

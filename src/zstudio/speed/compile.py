"""torch.compile for the transformer's repeated blocks and the VAE decoder.

Regional compilation (one compiled block reused by all 34) keeps the one-off cost to tens of seconds instead of a
minute, and the compiler's caches (inductor's FX graph cache, on by default) make later starts cheaper still.
"""

from __future__ import annotations

import torch


def compile_transformer(transformer, fullgraph: bool = True) -> None:
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    transformer.compile_repeated_blocks(fullgraph=fullgraph)


def compile_vae_decoder(vae) -> None:
    vae.to(memory_format=torch.channels_last)
    vae.decoder.compile(fullgraph=False)

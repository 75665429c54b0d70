"""torch.compile for the transformer, the VAE decoder and the text encoder, shaped so that no request stalls.

The transformer is compiled block by block (diffusers' `compile_repeated_blocks`: one compiled block serves all 34)
with dynamic sizes from the start: batch size, image tokens and prompt tokens are symbols, so a new resolution, batch
or prompt length reuses the graphs instead of recompiling. Compiling the whole model instead specialises on the
Python lists the model takes (one graph per batch size and padding case) and took minutes per new shape
(docs/perf-notes.md). What still differs between requests (batch 1 or more, with or without an attention mask,
blocks with and without modulation) is a handful of graph variants, all compiled by the warm-up
(`Generator.warmup`) before the first request.

The compiler's on-disk caches (FX graphs, AOT autograd) live under zstudio's cache folder, so a second start only
traces, and loads the compiled kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# The compiler backend of every graph compiled here; tests swap in "eager" (dynamo's tracing, guards and recompiles
# exactly as with inductor, without generating kernels, which takes minutes on a CPU).
BACKEND = "inductor"


def use_persistent_cache(folder: Path) -> None:
    """Keep inductor's caches in `folder` (unless TORCHINDUCTOR_CACHE_DIR is set): /tmp does not survive reboots."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))


def _allow_variants() -> None:
    """One code object (the block's forward) holds a graph per variant (batch 1 or more, masked or not, modulated
    or not): more than dynamo's default of 8 entries before it gives up and runs eager."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def compile_blocks(transformer) -> None:
    """Regional compilation with symbolic shapes: one block's graph, reused by every block and every request size."""
    _allow_variants()
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, backend=BACKEND)


def compile_transformer(transformer, graphs: bool = False) -> None:
    """The whole model as one graph, replayed as CUDA graphs (ZSTUDIO_CUDA_GRAPHS=all, opt-in): each new batch size
    or padding case compiles again, so the warm-up covers the offered shapes."""
    _allow_variants()
    transformer.compile(mode="reduce-overhead" if graphs else None, backend=BACKEND)


def compile_control_blocks(controlnet) -> None:
    """The ControlNet's own blocks compiled as the transformer's are (symbolic shapes, one code object for all of
    them); the blocks it shares with the transformer (refiners) are compiled already. Each control block differs in
    how many hints it stacks (its position), a guard per position: up to 15 graph variants per batch/mask case for
    the Union 2.x layout, so the cache limit is raised to hold them all."""
    from diffusers.models.controlnets.controlnet_z_image import ZImageControlTransformerBlock

    _allow_variants()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    for block in controlnet.modules():
        if isinstance(block, ZImageControlTransformerBlock):
            block.compile(fullgraph=True, dynamic=True, backend=BACKEND)


def drop_graphs() -> None:
    """Free the memory that recorded CUDA graphs hold (before a lower memory mode takes over)."""
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
    except ImportError:  # pragma: no cover - every supported torch has it
        return
    reset_cudagraph_trees()


def uncompile(transformer) -> None:
    """Undo `compile_blocks` and `compile_transformer` (lower memory modes run eager)."""
    transformer._compiled_call_impl = None
    for block in transformer.modules():
        if block is not transformer and getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None


def compile_vae_decoder(vae) -> None:
    vae.to(memory_format=torch.channels_last)
    vae.decoder.compile(dynamic=True, backend=BACKEND)

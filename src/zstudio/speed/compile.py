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

import functools
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
    """Regional compilation with symbolic shapes: one block's graph, reused by every block and every request size.

    Each compiled block gets its rotary table contiguous (`_contiguous_freqs`): diffusers slices the table out of a
    padded one (`pad_sequence(...)[:, :n]`), so whether it arrives contiguous depends on the batch's prompt
    lengths, and dynamo guards on the strides: a batch of 2 after the warm-up compiled a new graph on the H100
    (5.9-6.6 s, docs/BENCHMARKS.md) until this."""
    _allow_variants()
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, backend=BACKEND)
    for block in transformer.modules():
        compiled = getattr(block, "_compiled_call_impl", None)
        if compiled is not None and block is not transformer:
            block._compiled_call_impl = functools.partial(_contiguous_freqs, compiled)


def _contiguous_freqs(compiled, *args, **kwargs):
    """Call a compiled block (`ZImageTransformerBlock.forward(x, attn_mask, freqs_cis, adaln_input, ...)`) with its
    rotary table contiguous; outside the graph, so its strides never reach a guard. (`_compiled_call_impl` is
    torch's own slot for `nn.Module.compile`; tests/test_speed.py fails if it goes.)"""
    if kwargs.get("freqs_cis") is not None:
        kwargs["freqs_cis"] = kwargs["freqs_cis"].contiguous()
    elif len(args) > 2 and args[2] is not None:
        args = (*args[:2], args[2].contiguous(), *args[3:])
    return compiled(*args, **kwargs)


def compile_transformer(transformer, graphs: bool = False) -> None:
    """The whole model as one graph, replayed as CUDA graphs (ZSTUDIO_CUDA_GRAPHS=all, opt-in): each new batch size
    or padding case compiles again, so the warm-up covers the offered shapes."""
    _allow_variants()
    transformer.compile(mode="reduce-overhead" if graphs else None, backend=BACKEND)


def compile_control_blocks(controlnet) -> None:
    """The ControlNet's blocks compiled like the transformer's (symbolic shapes, one graph serving every block), run
    by zstudio's sync-free ControlNet forward (`control_forward`).

    A control block is a transformer block between two steps that depend on its position (diffusers' unbinds the
    hints the blocks before it stacked, and stacks one more). Compiled whole, each position is a graph of its own
    (dynamo guards on the stack's length): 17 for Union 2.x, per batch and guidance case, minutes of warm-up each. So
    only the middle is compiled, exactly diffusers' `ZImageTransformerBlock.forward` with the block as `self`; the
    position-dependent parts run as they are. The refiners the ControlNet shares with the transformer are compiled
    with it."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    from . import control_forward

    _allow_variants()
    core = torch.compile(ZImageTransformerBlock.forward, fullgraph=True, dynamic=True, backend=BACKEND)
    control_forward.install(controlnet, core)


def drop_graphs() -> None:
    """Free the memory that recorded CUDA graphs hold (before a lower memory mode takes over)."""
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
    except ImportError:  # pragma: no cover - every supported torch has it
        return
    reset_cudagraph_trees()


def uncompile(transformer) -> None:
    """Undo `compile_blocks`, `compile_transformer` and `compile_control_blocks` (lower memory modes run eager)."""
    from . import control_forward

    control_forward.uninstall(transformer)  # a ControlNet's sync-free forward and its blocks' compiled middle
    transformer._compiled_call_impl = None
    for block in transformer.modules():
        if block is not transformer and getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None


def compile_vae_decoder(vae) -> None:
    vae.to(memory_format=torch.channels_last)
    vae.decoder.compile(dynamic=True, backend=BACKEND)


def compile_vae_encoder(vae) -> None:
    """The VAE encoder compiled with dynamic sizes, where every request uses it: with a ControlNet (each control
    image goes through it). Compiling it costs start-up time that text-to-image alone never gets back, so edits
    without a ControlNet keep it eager (measured: docs/perf-notes.md, session 9)."""
    if getattr(vae.encoder, "_compiled_call_impl", None) is None:
        vae.to(memory_format=torch.channels_last)
        vae.encoder.compile(dynamic=True, backend=BACKEND)

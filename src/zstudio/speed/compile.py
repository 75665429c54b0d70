"""torch.compile for the transformer and the VAE decoder.

The whole transformer is compiled, not just its repeated blocks: at 512x512 the patchify, RoPE lookup and
padding code between the blocks costs as much as the blocks' fused elementwise work saves (measured: regional
0.305 s vs whole-model 0.266 s on the H100, docs/perf-notes.md). Shapes are left to the compiler's automatic
dynamic mode: the first resolution compiles a static graph, the second a graph with symbolic sizes that then serves
every resolution and prompt length (prompt lengths vary with every prompt: static graphs would recompile for each).
The compiler's on-disk caches let later starts skip most of the work.

With `graphs` (resident weights on a CUDA GPU) the compiled transformer also runs as CUDA graphs (inductor's
"reduce-overhead" mode: per input shape, one call runs normally, the next records, later calls replay), so a step's
~700 kernel launches and the Python wrapper that issues them become one replay. The recording shares one memory
pool across shapes; outputs stay valid until the next call, which the step loop respects.
"""

from __future__ import annotations

import torch


def compile_transformer(transformer, graphs: bool = False) -> None:
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    transformer.compile(mode="reduce-overhead" if graphs else None)


def drop_graphs() -> None:
    """Free the memory that recorded CUDA graphs hold (before a lower memory mode takes over)."""
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
    except ImportError:  # pragma: no cover - every supported torch has it
        return
    reset_cudagraph_trees()


def compile_blocks(transformer) -> None:
    """Regional compilation: one compiled block reused by all 34. Used with float8 weights, where compiling the whole
    model did not finish its first 1024x1024 call within 8 minutes on the H100 (blocks alone: 120 s)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    transformer.compile_repeated_blocks(fullgraph=True)


def compile_vae_decoder(vae) -> None:
    vae.to(memory_format=torch.channels_last)
    vae.decoder.compile()

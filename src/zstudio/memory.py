"""Memory modes: where each component lives, chosen automatically from the card's free memory.

| mode          | what                                                                               |
|---------------|------------------------------------------------------------------------------------|
| resident      | everything on the GPU (fastest)                                                    |
| offload-text  | text encoder int8 on the GPU where it fits, else in CPU memory with its layers     |
|               | streamed through the GPU for a new prompt (zstudio.text_placement; repeated        |
|               | prompts come from a cache); transformer and VAE resident                           |
| 8bit          | + the transformer's large linear layers in 8 bits (float8 on GPUs with fp8 tensor  |
|               | cores, int8 weight-only elsewhere; torchao): half its memory, approximate pixels   |
| stream        | text encoder as above; the transformer's bf16 blocks streamed from CPU memory one  |
|               | at a time, transfers overlapped with compute on a CUDA stream (group offloading);  |
|               | as many of its main blocks as the card holds beside that stay resident             |
| lowest        | + leaf-level streaming and a tiled, sliced VAE decode                              |

A ControlNet (zstudio.control) is resident in bf16 in the first three modes and streamed like the transformer in the
last two; the estimate counts its weights (`ModelWeights.controlnet`).

`auto` takes the fastest mode that (a) can run here (8bit needs torchao, an optional extra: `pip install
'zstudio[fp8]'`) and (b) fits the card's free memory by an estimate built from measured peaks: for each mode the
peak reserved memory of the full-size model at 512x512 and 1024x1024 (docs/BENCHMARKS.md, "memory modes"), as the
weights a mode keeps on the GPU plus a fixed part plus activations growing with the pixels. For another model pass
its `ModelWeights.from_folder(path)` (the weights part then comes from its own files); beyond 1024x1024 the pixel
term is extrapolated. Within the chosen mode, `choose_text` places the text encoder (an int8 copy on the GPU where it
fits beside the mode's estimate; that size is an estimate until measured).

In `stream` every block that crosses PCIe costs time on every forward (the link, not the GPU, sets the pace), so
the main blocks that fit in what the card has left after the mode's own estimate and a margin (`resident_blocks`)
stay on the GPU, spread through the stack (`keep_resident`); `ZSTUDIO_RESIDENT_BLOCKS` sets their number instead
(0: stream every block). `auto`'s estimate is unchanged: the resident blocks only take memory left over. Out of
memory in `stream`, the engine first streams those blocks too (`release_resident`), then moves down.

torchao stays optional: its wheels are built against one torch release each, and a mismatched pair fails at import,
which would break a default install that never uses 8-bit weights.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import free_memory_bytes
from .params import ParamError, check_choice
from .text_placement import text_8bit_gib

log = logging.getLogger(__name__)

MEMORY_MODES = ("resident", "offload-text", "8bit", "stream", "lowest")
# Streamed modes keep bf16 weights: diffusers 0.42's CUDA-stream offloading cannot move torchao's 8-bit tensors.
EIGHT_BIT = ("8bit",)
STREAMED = ("stream", "lowest")
GIB = 2**30


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_modes() -> tuple[str, ...]:
    """The modes whose dependencies are installed, fastest first."""
    return tuple(m for m in MEMORY_MODES if m not in EIGHT_BIT or installed("torchao"))


def next_modes(modes: tuple[str, ...]) -> dict[str, str | None]:
    return {mode: (modes[i + 1] if i + 1 < len(modes) else None) for i, mode in enumerate(modes)}


# Where an out-of-memory retry goes from each mode (skipping modes that cannot run here).
NEXT_MODE = next_modes(available_modes())


@dataclass(frozen=True)
class ModelWeights:
    """GiB of weights per component, as loaded (bf16 for Z-Image)."""

    transformer: float
    text_encoder: float
    vae: float
    controlnet: float = 0.0  # a configured ControlNet's own weights (zstudio.control.size_gib); 0 without one

    @classmethod
    def from_folder(cls, path: Path) -> ModelWeights:
        """Read from a diffusers folder's safetensors sizes (the weights of a bf16 checkpoint, as stored)."""

        def gib(component: str) -> float:
            return sum(f.stat().st_size for f in (path / component).glob("*.safetensors")) / GIB

        return cls(gib("transformer"), gib("text_encoder"), gib("vae"))

    def on_gpu(self, mode: str) -> float:
        """The weights a mode keeps on the GPU between generations. A ControlNet stays bf16 beside the transformer
        except in the streamed modes, where its blocks (the transformer's size) stream too."""
        if mode == "resident":
            return self.transformer + self.text_encoder + self.vae + self.controlnet
        if mode == "offload-text":
            return self.transformer + self.vae + self.controlnet
        if mode in EIGHT_BIT:
            return self.transformer / 2 + self.vae + self.controlnet
        return 0.0  # streamed: one block at a time, in the fixed part


# Z-Image-Turbo in bf16 (20.5 GB of safetensors): what the measurements below were taken with.
Z_IMAGE = ModelWeights(transformer=11.46, text_encoder=7.46, vae=0.16)
# Peak reserved GiB of the full-size model, measured per mode at 512x512 and 1024x1024 on an H100
# (docs/BENCHMARKS.md, 2026-11-23 "memory modes", `python -m zstudio.bench.memory`).
MEASURED_PEAK_GIB = {
    "resident": (20.84, 23.38),
    "offload-text": (13.59, 16.09),
    "8bit": (8.42, 10.93),
    "stream": (2.68, 5.19),
    "lowest": (2.21, 4.69),
}
MEASURED_MP = (512 * 512 / 1e6, 1024 * 1024 / 1e6)
HEADROOM_GIB = 0.25  # fragmentation and the allocator's rounding on a card that is not otherwise empty
# Left free beside stream's resident blocks: the estimate is a fit to two measured sizes, and a ControlNet's streamed
# block or another process's allocation must not turn a kept block into an out-of-memory retry.
RESIDENT_MARGIN_GIB = 1.0


class OutOfMemory(RuntimeError):
    """A generation ran out of GPU memory; the message names the next mode that would fit."""


def needed_gb(mode: str, width: int = 1024, height: int = 1024, weights: ModelWeights = Z_IMAGE,
              text_8bit: bool = False) -> float:  # fmt: skip
    """Estimated peak GiB for one image of `width` x `height` in `mode`, for a model with `weights`; with
    `text_8bit`, plus the text encoder kept on the GPU in int8 (an estimate until measured: zstudio.text_placement)."""
    (small, large), (mp_small, mp_large) = MEASURED_PEAK_GIB[mode], MEASURED_MP
    per_mp = (large - small) / (mp_large - mp_small)  # activations: mostly the VAE decode
    fixed = small - per_mp * mp_small - Z_IMAGE.on_gpu(mode)
    text = text_8bit_gib(weights.text_encoder) if text_8bit and mode != "resident" else 0.0
    return weights.on_gpu(mode) + fixed + per_mp * width * height / 1e6 + HEADROOM_GIB + text


def choose_text(mode: str, device: torch.device, free_bytes: int | None, width: int = 1024, height: int = 1024,
                weights: ModelWeights = Z_IMAGE) -> tuple[str, str]:  # fmt: skip
    """(placement, reason) for the text encoder in `mode` (zstudio.text_placement): int8 on the GPU where it fits
    beside the mode's estimate for this size, else streamed (pinned where host RAM allows)."""
    from .text_placement import choose_text_placement, host_available_bytes, int8_available

    return choose_text_placement(mode, device, free_bytes, needed_gb(mode, width, height, weights),
                                 weights.text_encoder, host_available_bytes(), int8_available(),
                                 host_needed_gb(mode, weights))  # fmt: skip


def host_needed_gb(mode: str, weights: ModelWeights = Z_IMAGE) -> float:
    """Host RAM a mode takes before any pinned text-encoder copy, as an upper bound: the bf16 weights as loaded (the
    low modes load into host memory; measured peaks were lower, 13.4-23.5 GB for 20.5 GB of files, docs/BENCHMARKS.md
    "Loading") plus stream's pinned copy of the transformer (and of a ControlNet)."""
    if mode == "resident":
        return 0.0
    loaded = weights.transformer + weights.text_encoder + weights.vae + weights.controlnet
    return loaded + (weights.transformer + weights.controlnet if mode == "stream" else 0.0)


def choose_memory(requested: str, device: torch.device, free_bytes: int | None, width: int = 1024,
                  height: int = 1024, weights: ModelWeights = Z_IMAGE, modes: tuple[str, ...] | None = None
                  ) -> tuple[str, str]:  # fmt: skip
    """(mode, reason): `auto` takes the fastest runnable mode whose estimate fits the free memory for this size.

    `modes` are those that can run (default: those whose dependencies are installed)."""
    requested = check_choice("memory", requested, ("auto", *MEMORY_MODES))
    modes = available_modes() if modes is None else modes
    if device.type != "cuda":
        if requested in ("8bit", *STREAMED):
            return "offload-text", (f"memory mode {requested} (8-bit or streamed weights) is for CUDA GPUs; "
                                    f"on {device} using offload-text")  # fmt: skip
        return ("resident" if requested == "auto" else requested), ""
    if requested != "auto":
        if requested not in modes:
            raise ParamError("memory", f"mode {requested} needs torchao: pip install 'zstudio[fp8]' (or torchao)")
        return requested, ""
    free_gb = (free_bytes or 0) / GIB
    for mode in modes:
        need = needed_gb(mode, width, height, weights)
        if need <= free_gb:
            return mode, f"memory mode {mode}: needs about {need:.1f} GiB at {width}x{height}, {free_gb:.1f} free"
    skipped = "" if "8bit" in modes else " (8bit skipped: torchao is not installed)"
    return modes[-1], f"memory mode {modes[-1]}: only {free_gb:.1f} GiB free; even this mode may not fit{skipped}"


def quantize_8bit(transformer, device: torch.device) -> str:
    """8-bit weights for the large linears, quantized on the GPU one layer at a time (no full bf16 copy there)."""
    from .quantized import quantize_layers
    from .speed.fp8 import float8_config, fp8_supported, large_linear_filter

    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise RuntimeError("8-bit memory modes need torchao: pip install 'zstudio[fp8]' (or torchao)") from None
    if getattr(transformer, "_zstudio_8bit", None):
        return transformer._zstudio_8bit
    if fp8_supported(device)[0]:
        kind, config = "float8", float8_config()
    else:
        kind, config = "int8 weight-only", Int8WeightOnlyConfig(set_inductor_config=False)
    quantize_layers(transformer, config, large_linear_filter, device)  # records what LoRAs need to re-quantize
    transformer._zstudio_8bit = kind
    log.info("transformer linears quantized to %s", kind)
    return kind


def apply_memory(pipe, mode: str, device: torch.device, text: str | None = None, reserve_gib: float | None = None,
                 resident: int | None = None) -> None:  # fmt: skip
    """Place the components for `mode`; the pipeline may start anywhere (loading puts it in CPU memory).

    `text` is the text encoder's placement (zstudio.text_placement, from `choose_text`); None: resident in mode
    resident, else streamed (pinned where host RAM allows). In `stream`, `reserve_gib` is what the mode itself needs
    at the model's size (default: `needed_gb("stream")`, Z-Image at 1024x1024) and `resident` the number of blocks
    to keep on the GPU (None: as many as fit beside `reserve_gib`; `keep_fitting_blocks`)."""
    from .text_placement import default_placement, module_gib, place_text_encoder

    pipe.vae.to(device)
    if device.type != "cuda":
        pipe.text_encoder.to(device)
        pipe.transformer.to(device)
        return
    if mode == "resident":
        pipe.text_encoder.to(device)
    else:  # it runs once per new prompt: int8 on the GPU, or its layers streamed, never 8 GB moved in and out
        place_text_encoder(pipe.text_encoder, text or default_placement(mode, device, module_gib(pipe.text_encoder)),
                           device)  # fmt: skip
    if mode in EIGHT_BIT:
        quantize_8bit(pipe.transformer, device)
    if mode not in STREAMED:
        pipe.transformer.to(device)
        return
    applied = stream_weights(pipe.transformer, device, leaf=mode == "lowest", low_ram=mode == "lowest")
    if mode == "stream" and applied:
        keep_fitting_blocks(pipe.transformer, device, needed_gb("stream") if reserve_gib is None else reserve_gib,
                            resident)  # fmt: skip
    if mode == "lowest":
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()


def stream_weights(module: torch.nn.Module, device: torch.device, leaf: bool, low_ram: bool) -> bool:
    """Keep `module`'s weights in pinned CPU memory and bring them to `device` one block (or one leaf layer) at a
    time, the next transfer overlapped with the current block's compute on a side CUDA stream.

    `low_ram` pins each group only while it transfers instead of keeping a pinned copy of every weight. Measured
    (docs/BENCHMARKS.md): with the copies, host RAM peaks at 49 GB for 20.5 GB of weights; without, 23.4 GB, but
    the streamed transformer is about twice as slow (5.1 s against 2.6 s at 1024x1024). `lowest` takes the lean
    way; `stream` the fast one. Off CUDA (tests) the same hooks move weights without a side stream.

    True when the hooks were put in place now; False when `module` already streamed this way."""
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

    kind = "leaf_level" if leaf else "block_level"
    hook = _get_top_level_group_offload_hook(module)
    if hook is not None and hook.config.offload_type.value == kind:
        return False
    _stop_streaming(module)
    module.__dict__.pop("_zstudio_resident_blocks", None)
    module.to("cpu")
    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=kind,
        num_blocks_per_group=None if leaf else 1,
        use_stream=device.type == "cuda",
        low_cpu_mem_usage=low_ram,
    )
    return True


def resident_blocks(free_bytes: int, needed_bytes: int, block_bytes: int, blocks: int,
                    margin_bytes: int = int(RESIDENT_MARGIN_GIB * GIB)) -> int:  # fmt: skip
    """How many of `blocks` blocks of `block_bytes` fit in `free_bytes` beside the mode's own `needed_bytes` and a
    safety margin: 0 where nothing is left, never more than `blocks`."""
    if block_bytes <= 0:
        return blocks
    room = free_bytes - needed_bytes - margin_bytes
    return max(0, min(blocks, room // block_bytes))


def spread(k: int, blocks: int) -> list[int]:
    """`k` of `blocks` indices spaced evenly through the stack: a resident block computes while the next streamed
    one still crosses PCIe, where a run of resident blocks at one end would leave the link idle that long."""
    return [(2 * i + 1) * blocks // (2 * k) for i in range(k)]


def keep_resident(transformer: torch.nn.Module, k: int, device: torch.device) -> list[int]:
    """Take `k` of the transformer's main blocks (`layers`, spread through the stack) out of block-level streaming
    and put them on `device` for good; the indices kept.

    Must run after `stream_weights` and before the first forward: diffusers traces the prefetch chain (which block
    loads which next) at the first forward with streams, so the blocks left hooked then prefetch each other past the
    resident ones. The unmatched-modules group on the transformer itself is untouched. Uses diffusers' hook names and
    the lazy prefetch hook's list of tracked blocks (private: tests/test_memory_resident.py fails if they change)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    layers = transformer.layers
    if not 0 <= k <= len(layers):
        raise ValueError(f"keep_resident: k={k} is outside 0..{len(layers)} (the transformer's blocks)")
    top = HookRegistry.check_if_exists_or_initialize(transformer)
    unmatched = top.get_hook(_GROUP_OFFLOADING)
    if unmatched is None or unmatched.config.offload_type.value != "block_level":
        raise RuntimeError("keep_resident needs the transformer streamed block by block (stream_weights) first")
    lazy = top.get_hook(_LAZY_PREFETCH_GROUP_OFFLOADING)
    if k and unmatched.config.stream is not None and lazy is None:
        raise RuntimeError("keep_resident must run before the first forward: the prefetch chain is already traced")
    names = {module: name for name, module in transformer.named_modules()}
    kept = spread(k, len(layers))
    for i in kept:
        block = layers[i]
        registry = HookRegistry.check_if_exists_or_initialize(block)
        registry.remove_hook(_GROUP_OFFLOADING, recurse=False)
        registry.remove_hook(_LAYER_EXECUTION_TRACKER, recurse=False)  # present with streams: it traces the order
        if lazy is not None:
            lazy._layer_execution_tracker_module_names.discard(names[block])
        block.to(device)  # its group's pinned copy goes with the removed hook
    transformer._zstudio_resident_blocks = len(kept)
    return kept


def keep_resident_again(transformer: torch.nn.Module, device: torch.device) -> bool:
    """Loading or deleting a LoRA adapter makes diffusers re-apply its offloading to every block
    (`_maybe_remove_and_reapply_group_offloading`): take stream's resident blocks out of it again. True if it did."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    k = getattr(transformer, "_zstudio_resident_blocks", 0)
    if not k:
        return False
    first = transformer.layers[spread(k, len(transformer.layers))[0]]
    if not hasattr(first, "_diffusers_hook") or first._diffusers_hook.get_hook(_GROUP_OFFLOADING) is None:
        return False  # still resident
    keep_resident(transformer, k, device)
    return True


def release_resident(transformer: torch.nn.Module, device: torch.device) -> int:
    """Put stream's resident blocks back under streaming (all blocks streamed, as before they were kept): the first
    answer to an out-of-memory error in stream, before moving down to `lowest`. The number released (0: none)."""
    k = getattr(transformer, "_zstudio_resident_blocks", 0)
    if k:
        _stop_streaming(transformer)
        stream_weights(transformer, device, leaf=False, low_ram=False)
    return k


def keep_fitting_blocks(transformer: torch.nn.Module, device: torch.device, reserve_gib: float,
                        override: int | None = None) -> int:  # fmt: skip
    """Keep as many main blocks resident as the card's free memory (under a per-process cap, the cap's) holds beside
    `reserve_gib` and `RESIDENT_MARGIN_GIB`, or `override` of them; logs and returns the number."""
    layers = transformer.layers
    block_bytes = sum(t.numel() * t.element_size() for t in (*layers[0].parameters(), *layers[0].buffers()))
    if override is None:
        k = resident_blocks(free_memory_bytes(device) or 0, int(reserve_gib * GIB), block_bytes, len(layers))
    else:
        k = min(override, len(layers))
    keep_resident(transformer, k, device)
    log.info("memory mode stream: %d of %d transformer blocks resident (%.1f GiB), the rest streamed", k,
             len(layers), k * block_bytes / GIB)  # fmt: skip
    return k


def _stop_streaming(module: torch.nn.Module) -> None:
    """Remove diffusers' group-offloading hooks, so that a lower mode can put its own in place (blocks kept resident
    have none; `module.to("cpu")` after this brings them back with the rest)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
        _is_group_offload_enabled,
    )

    if not _is_group_offload_enabled(module):
        return
    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)


def free_after_failure(device: torch.device) -> None:
    """Give back what a failed generation held, so the next one starts from the same baseline."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

"""8-bit transformer layers that can be changed after quantizing: the torchao config each layer was quantized with,
where its bf16 weight comes back from, and re-quantizing one layer in place.

What LoRAs need in the 8-bit modes (memory `8bit`, speed `fastest`): a LoRA is fused into a layer's **bf16** weight
(`W₀ + Σ strength·B·A`, float32 sums) and the sum is quantized again with the same config, one layer at a time on the
layer's device; a set that leaves a layer re-quantizes `W₀` alone, which gives back the very tensor the mode made
at load (quantizing is deterministic), so switching never drifts.

`W₀` comes from one of two places (docs/LORA.md):
- the checkpoint the transformer was loaded from (`config._name_or_path`, its `*.safetensors`), read lazily one
  tensor at a time with `safetensors.safe_open` when a LoRA first touches a layer: no host memory held for it, no
  cost to a run without LoRAs (the OS's page cache keeps recently read layers);
- where there is no checkpoint (a transformer built in memory: the random full-size benchmark model), a host copy
  of each quantized layer kept at quantize time (pinned when the weights live on a GPU).

The new 8-bit tensor is copied *into* the existing one (torchao's `copy_` copies each inner tensor, `qdata` and
`scale`), so modules, tensor objects, subclasses, shapes and dtypes stay the same: compiled graphs do not recompile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ATTRIBUTE = "_zstudio_quantized"  # where a transformer carries its QuantizedLayers


def kind(weight: torch.Tensor) -> type:
    """The tensor's class, a Parameter counted as the plain tensor it wraps (torchao's weights are their subclass)."""
    return torch.Tensor if type(weight) in (torch.Tensor, torch.nn.Parameter) else type(weight)


def is_quantized(weight: torch.Tensor) -> bool:
    """A tensor subclass (torchao's Int8Tensor, Float8Tensor, ...) rather than a plain weight."""
    return kind(weight) is not torch.Tensor


def checkpoint_files(transformer: torch.nn.Module) -> dict[str, Path]:
    """Tensor name → `.safetensors` file of the folder the transformer was loaded from (diffusers records it as
    `config._name_or_path`); empty for a transformer built in memory. Reads only the files' headers."""
    from safetensors import safe_open

    folder = getattr(getattr(transformer, "config", None), "_name_or_path", None)
    if not folder or not Path(folder).is_dir():
        return {}
    files = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return files


@dataclass
class QuantizedLayers:
    """How a transformer's large linears were quantized (`config`, torchao's), and their bf16 weights' source."""

    config: Any
    dtype: torch.dtype  # the weights' dtype before quantizing (bf16 on a GPU)
    checkpoint: dict[str, Path] = field(default_factory=dict)  # tensor name → file
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # module name → host copy (no checkpoint)

    def has_base(self, module_name: str) -> bool:
        return module_name in self.kept or f"{module_name}.weight" in self.checkpoint

    def base(self, module_name: str) -> torch.Tensor:
        """The layer's weight as loaded, before quantizing (on the host)."""
        if module_name in self.kept:
            return self.kept[module_name]
        from safetensors import safe_open

        key = f"{module_name}.weight"
        with safe_open(str(self.checkpoint[key]), framework="pt") as handle:
            return handle.get_tensor(key).to(self.dtype)  # as diffusers cast it at load

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (plain, on its device) quantized with this transformer's config: a torchao tensor."""
        from torchao.quantization import quantize_

        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        quantize_(linear, self.config)
        return linear.weight


def quantize_layers(transformer: torch.nn.Module, config: Any, filter_fn: Callable[[torch.nn.Module, str], bool],
                    device: torch.device | None = None) -> None:  # fmt: skip
    """torchao's `quantize_` over the layers `filter_fn` picks, recording what re-quantizing them later needs; where
    the transformer has no checkpoint on disk, the bf16 weights are kept on the host first."""
    from torchao.quantization import quantize_

    # Named as LoRAs name them: without the `.base_layer` of a PEFT wrapper
    chosen = {name.removesuffix(".base_layer"): module for name, module in transformer.named_modules()
              if filter_fn(module, name)}  # fmt: skip
    dtype = next((m.weight.dtype for m in chosen.values()), torch.bfloat16)
    layers = QuantizedLayers(config, dtype, checkpoint_files(transformer))
    for name, module in chosen.items():
        if not layers.has_base(name):
            layers.kept[name] = host_copy(module.weight, share_cpu=True)
    if layers.kept:
        gib = sum(t.numel() * t.element_size() for t in layers.kept.values()) / 2**30
        log.info("no checkpoint on disk for %d quantized layers: their bf16 weights kept on the host for LoRAs "
                 "(%.2f GiB)", len(layers.kept), gib)  # fmt: skip
    quantize_(transformer, config, filter_fn=filter_fn, device=device)
    setattr(transformer, ATTRIBUTE, layers)


def host_copy(weight: torch.Tensor, share_cpu: bool = False) -> torch.Tensor:
    """A CPU copy of `weight`, pinned when it lives on a GPU (so copying it back runs at the bus's full speed).
    `share_cpu`: a CPU weight is kept as it is, for callers that replace the module's tensor and never write into it
    (quantizing); LoRA fusing writes into the weight, so it takes a real copy."""
    if weight.device.type == "cpu":
        return weight.detach() if share_cpu else weight.detach().clone()
    copy = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=weight.device.type == "cuda")
    copy.copy_(weight.detach())
    return copy


def summed(base: torch.Tensor, device: torch.device, parts: list[tuple[float, torch.Tensor, torch.Tensor]]
           ) -> torch.Tensor:  # fmt: skip
    """W₀ + Σ strength·B·A in float32 on `device`: a fused LoRA set's weight, before casting or quantizing."""
    total = base.to(device, torch.float32, non_blocking=True, copy=True)
    for strength, a, b in parts:
        total.addmm_(b.to(device, torch.float32), a.to(device, torch.float32), alpha=strength)
    return total


def requantize_(weight: torch.Tensor, new: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Write `quantize(new)` into the 8-bit `weight` in place: the same tensor object, subclass, shape and dtype
    afterwards, so compiled graphs that read it stay valid. `quantize` is `QuantizedLayers.quantize` (injectable:
    the tests check this logic with a stand-in quantizer where torchao is absent)."""
    fresh = quantize(new.to(weight.device, weight.dtype))
    if (kind(fresh), fresh.shape, fresh.dtype) != (kind(weight), weight.shape, weight.dtype):
        raise RuntimeError(f"re-quantizing gave a {kind(fresh).__name__} {tuple(fresh.shape)} {fresh.dtype}, not the "
                           f"layer's {kind(weight).__name__} {tuple(weight.shape)} {weight.dtype}")  # fmt: skip
    weight.copy_(fresh)  # torchao: each inner tensor (qdata, scale) copied; refuses a metadata mismatch


def layers_of(transformer: torch.nn.Module) -> QuantizedLayers | None:
    return getattr(transformer, ATTRIBUTE, None)

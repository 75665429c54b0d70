"""float8 matmuls for the transformer's large linear layers through torchao (GPUs with fp8 tensor cores).

Approximate: activations and weights are rounded to e4m3 with one scale per row; results stay near bf16
(the benchmark reports PSNR against the bf16 pipeline) but are not bit-for-bit the same picture.
"""

from __future__ import annotations

import torch

MIN_FEATURES = 1024  # small projections (timestep, adaLN, final layer) stay in bf16: tiny cost, precision-sensitive


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "float8 matmuls need a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"float8 matmuls need compute capability 8.9 or newer (this GPU is {major}.{minor})"
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False, "torchao is not installed (pip install torchao)"
    return True, ""


def large_linear_filter(module: torch.nn.Module, name: str) -> bool:
    return (
        isinstance(module, torch.nn.Linear)
        and module.in_features >= MIN_FEATURES
        and module.out_features >= MIN_FEATURES
        and ("layers." in name or "refiner." in name)
        and "adaLN" not in name
    )


def float8_config():
    """torchao's per-row float8 config. `set_inductor_config=False`: otherwise torchao turns on inductor's
    coordinate-descent autotuning for the whole process, and every later compile (the text encoder's graphs too)
    tunes each kernel for minutes: the "fastest stall" (docs/bench/2026-11-23-fastest-stall.log)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def quantize_fp8(transformer) -> None:
    from ..quantized import quantize_layers

    quantize_layers(transformer, float8_config(), large_linear_filter)  # records what LoRAs need to re-quantize

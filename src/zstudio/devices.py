"""Which device and dtype a generation runs on: auto picks CUDA (bf16), then Apple MPS, then CPU."""

from __future__ import annotations

import torch

from .params import ParamError

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def pick_device(name: str = "auto") -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ParamError("device", f"{name!r} is not a device; use auto, cuda, cuda:N, mps or cpu") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParamError("device", "cuda was asked for but this torch build sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ParamError("device", "mps was asked for but Apple's Metal backend is not available")
    if device.type not in ("cuda", "mps", "cpu"):
        raise ParamError("device", f"{name!r} is not supported; use auto, cuda, cuda:N, mps or cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the model's native precision); float32 on CPU, where it is exact and portable."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ParamError("dtype", f"{name!r} is not one of auto, bfloat16, float16, float32")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device, or None where torch cannot tell."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None

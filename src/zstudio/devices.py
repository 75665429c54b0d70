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
    """Free memory on a CUDA device, or None where torch cannot tell. Under a per-process cap
    (`torch.cuda.set_per_process_memory_fraction`: how the benchmarks simulate smaller cards) the free part of the cap:
    what the card reports ignores the cap, and auto would choose for the whole card."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    fraction = memory_fraction(device)
    if fraction < 1.0:
        free = min(free, int(total * fraction) - torch.cuda.memory_reserved(device))
    return max(int(free), 0)


def memory_fraction(device: torch.device) -> float:
    """The per-process cap as a fraction of the card (1.0: none). Where torch cannot read it back (releases
    without `get_per_process_memory_fraction`), only caps set through `cap_memory` are seen."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is not None:
        return float(getter(device))
    return _fractions.get(device.index or 0, 1.0)


_fractions: dict[int, float] = {}


def cap_memory(device: torch.device, gib: float | None) -> None:
    """Cap this process's GPU memory at `gib` (None: the whole card), as on a smaller card: past the cap an
    allocation fails with out-of-memory."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if gib is None else min(gib * 2**30 / total, 1.0)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    _fractions[device.index or 0] = fraction
